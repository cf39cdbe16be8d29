"""The extraction core: plan what is new, stream it through the frozen backbone, journal, merge."""

from __future__ import annotations

import contextlib
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from cnncodes._backbones.registry import (
    check_pooling,
    code_sizes,
    get_backbone,
    shallow_to_deep,
)
from cnncodes._extract.accel import resolve_device, resolve_precision, reuse_freed_memory
from cnncodes._choices import DEFAULT_BACKBONE, DTYPES, ENGINES, IMAGENET, RESIZES, TTAS
from cnncodes._errors import CnnCodesError, InvalidParameterError, StoreMismatchError
from cnncodes._extract.forward import CodesForward, batches, loader
from cnncodes._outputs import STORE, check_output
from cnncodes._extract.precision import measure_precision, resumed_choice, save_choice
from cnncodes._input.images import DEFAULT_MAX_PIXELS, Preprocess
from cnncodes._input.sources import Item, change_key, data_root, hash_item, read_source
from cnncodes._spec import ExtractorSpec
from cnncodes._store.store import (FORMAT_VERSION, UNKNOWN_STAT, CodeStore, Journal, StoreLock, merge, remote_store, remove_unmapped,
                     store_path)
from cnncodes._backbones.weights import preprocess_for, resolve

ON_OTHER_ROOT = ("refuse", "replace")
HASH_CHUNK = 64
SLOW_READ_SECONDS = 200e-6  # a file read and hashed slower than this, on average: threads
# compile="auto" on a CPU: the first PROBE_BATCHES batches run eagerly, and the model is
# compiled when the eager forward pass of the images left would take COMPILE_MIN_SECONDS or
# more. torch.compile costs 20-35 s on a 2-core CPU (a few seconds once its kernels are
# cached). Since the eager path stopped faulting its activations in at every batch
# (reuse_freed_memory), compiling gains little: model only, bfloat16, 2 cores, MobileNetV2
# 1.05-1.15x (438 -> 465 img/s), ResNet50 1.17-1.19x (89 -> 105 img/s). A first compilation
# is repaid from about 2-7 minutes of eager work; auto compiles from 5.
COMPILE_MIN_SECONDS = 300.0
PROBE_BATCHES = 2  # eager batches before compile="auto" decides (the last one timed)
# A file modified this close to the moment it was listed may be modified again within the
# file system's timestamp resolution without its stat key changing (git's "racy" files):
# its stat key is recorded as unknown, so the next run reads it once more.
RACY_NS = 2_000_000_000


@dataclass
class ExtractResult:
    """What one `extract` run did; `summary()` gives the text the CLI prints."""

    path: str
    n_images: int
    n_extracted: int = 0
    n_reused: int = 0  # identical content already computed: codes copied, not recomputed
    n_unchanged: int = 0  # already in the store
    n_resumed: int = 0  # done by an interrupted run (in its journal), merged now
    n_hashed: int = 0  # files read to hash them (the others were recognised by their stat key)
    converted_from: int | None = None  # the store's format version, when this run converted it
    failures: list[tuple[str, str]] = field(default_factory=list)  # this run's (id, reason)
    # failures recorded by an earlier run for files still unchanged in the source
    known_failures: list[tuple[str, str]] = field(default_factory=list)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    conflicts: list[list[tuple[str, str]]] = field(default_factory=list)  # groups with this run's rows
    n_rows: int = 0
    seconds: float = 0.0
    compute_seconds: float = 0.0
    layers: dict[str, int] = field(default_factory=dict)  # alias -> code size
    precision_choice: str = ""  # how precision="auto" chose a new store's precision
    # a store in object storage: {"segments": names uploaded, "bytes": bytes sent}
    uploaded: dict | None = None

    def take_plan(self, plan) -> None:
        """What the plan decided without computing: hashed, unchanged, resumed, known failures."""
        self.n_hashed, self.n_unchanged, self.n_resumed = plan.n_hashed, plan.n_unchanged, plan.n_resumed
        self.known_failures = plan.known_failures
        self.failures = list(plan.failures)

    @property
    def images_per_second(self) -> float:
        return self.n_extracted / self.compute_seconds if self.compute_seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [
            f"{self.n_images} images: {self.n_extracted} extracted "
            f"({self.images_per_second:.1f} img/s), {self.n_reused} reused from identical "
            f"content, {self.n_unchanged} already in the store, "
            + (f"{self.n_resumed} resumed from an interrupted run, " if self.n_resumed else "")
            + f"{len(self.failures)} failed; "
            f"{self.seconds:.1f} s in all.",
            f"{self.path}: {self.n_rows} rows; "
            + ", ".join(f"{a} ({d})" for a, d in self.layers.items()) + ".",
        ]
        if self.precision_choice:
            lines.append(self.precision_choice)
        if self.uploaded is not None:
            lines.append(f"uploaded {len(self.uploaded['segments'])} segment(s) and the root "
                         f"({self.uploaded['bytes'] / 1e6:.1f} MB) to {self.path}.")
        if self.converted_from is not None:
            lines.append(f"converted {Path(self.path).name} from store format {self.converted_from} to "
                         f"{FORMAT_VERSION} (once): its rows now live in {Path(self.path).name}.d/, and "
                         f"later runs write only what is new.")
        if self.failures:
            lines.append(f"{len(self.failures)} images failed and are recorded in the store:")
            lines += [f"  {rid}: {why}" for rid, why in self.failures[:20]]
            if len(self.failures) > 20:
                lines.append(f"  ... and {len(self.failures) - 20} more (CodeStore(path).failures).")
        if self.known_failures:
            lines.append(f"{len(self.known_failures)} unchanged images failed in an earlier run "
                         f"(recorded; fix or remove them):")
            lines += [f"  {rid}: {why}" for rid, why in self.known_failures[:20]]
        if self.skipped_files:
            lines.append(f"{len(self.skipped_files)} files skipped: "
                         + "; ".join(f"{i} ({why})" for i, why in self.skipped_files[:5])
                         + (" ..." if len(self.skipped_files) > 5 else ""))
        if self.conflicts:
            lines.append(f"{len(self.conflicts)} identical images carry different labels among this "
                         f"run's rows (kept as separate rows; all of them: CodeStore(path).conflicts()):")
            lines += ["  " + " = ".join(f"{i} [{lab}]" for i, lab in g) for g in self.conflicts[:10]]
        return "\n".join(lines)


# Where a new store's images are resized: with torch, where the model runs (on a CPU, or in
# the Ray engine's decoding tasks, on their CPU), not by PIL in the decoding processes. On a
# CPU too: one core resizes flowers5's photos 6x faster as channels-last uint8 batches than
# PIL does one photo at a time (18,400 against 3,000 img/s, benchmarks/bench_resize.py), and
# the decoding threads or processes only decode.
DEFAULT_RESIZE = "device"


def _versions() -> dict:
    import h5py
    import PIL
    import torchvision

    from cnncodes import __version__

    return {"cnncodes": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "h5py": h5py.__version__, "pillow": PIL.__version__,
            "python": platform.python_version()}


def extract(
    source,
    *,
    out,
    backbone: str = DEFAULT_BACKBONE,
    layers=None,
    pooling: str = "avg",
    weights=IMAGENET,
    labels=None,
    image_size: int | None = None,
    batch_size: int = 64,
    device="auto",
    num_workers="auto",
    dtype: str = "float32",
    precision: str = "auto",
    compile="auto",
    tta: str | None = None,
    jpeg_draft: bool | None = None,
    resize: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    root=None,
    engine: str = "local",
    ray_address: str | None = None,
    ray_workers: int | None = None,
    gpus_per_worker: float = 0,
    rehash: bool = False,
    on_other_root: str = "refuse",
    image_column: str | None = None,
    label_column: str | None = None,
    storage_options: dict | None = None,
    model=None,
    name: str | None = None,
    preprocessing=None,
) -> ExtractResult:
    """Extract CNN codes of images into an HDF5 code store; resume and skip what is there.

    Parameters
    ----------
    source : path, URL, list of paths, or a ``datasets.Dataset``
        A folder with one subfolder per class (labels from the folder names), a flat folder
        (no labels), a ``.csv`` of ``path[,label]`` (paths or URLs), a list of image paths;
        an fsspec URL of a folder (``s3://bucket/photos/``, ``gs://``, ``az://``,
        ``memory://``); WebDataset tar shards (``"shards/train-{000000..000009}.tar"``,
        local or remote); a Parquet file or folder, a ``datasets`` ``save_to_disk`` folder
        or a ``Dataset`` with an image column. See the "Data sources" guide.
    out : path
        The ``.h5`` store to create or extend. Re-running extracts only new content.
    backbone : str
        A registered backbone (``cnncodes.list_backbones()``), a timm model as
        ``"timm:<model name>"`` (``pip install 'cnncodes[timm]'``), or a name given to
        :func:`cnncodes.register_backbone`.
    layers : str or list of str, optional
        Aliases (``"block4"``) or raw FX node names (module paths for timm models and your
        own modules); the backbone's pre-logits layer when omitted. All layers are read in
        one forward pass. With `model`: alias -> module path (``{"block4": "layer3"}``).
    pooling : {"avg", "max", "gem", "flatten", "spp", "cls", "cls+avg"}
        How a feature map becomes a vector: ``spp`` concatenates average pools over 1x1,
        2x2 and 4x4 grids. Token outputs (ViT blocks): ``avg`` averages the patch tokens,
        ``cls`` takes the class token, ``cls+avg`` both; register tokens are dropped.
    weights : str, path or None
        ``"imagenet"`` (the original IMAGENET1K_V1 weights, the best for transfer),
        ``"DEFAULT"`` (torchvision's default), a torchvision weights name, a local checkpoint
        file, or ``None`` for random weights (never used unless asked for).
    labels : list, optional
        One label per path, when `source` is a list of paths.
    image_size : int, optional
        Crop size; when omitted, the crop a fine-tuned checkpoint was trained at, else the
        weights' own preprocessing (resize/crop ratio kept).
    batch_size, device, num_workers
        Streaming settings; ``device="auto"`` uses CUDA when present. ``num_workers="auto"``
        times decoding against the forward pass on the first batches and decodes the rest in
        this process when that is cheap (it then never competes with the model's threads),
        in worker processes otherwise; a number forces that many workers (0: none). They do
        not change the codes beyond floating-point noise.
    dtype : {"float32", "float16"}
        Storage type of the codes.
    precision : {"auto", "float32", "bfloat16", "float16"}
        Arithmetic of the forward pass. ``"auto"`` follows an existing store (or the
        interrupted first run being resumed). For a new store it measures, before anything is
        written: where the device offers more than float32 (a CPU with AVX-512 BF16 or AMX:
        float32 with BatchNorm folded and bfloat16; CUDA: float32, bfloat16, float16), each
        candidate runs the first 16 images once untimed and twice timed, and the fastest
        whose codes agree with float32's to cosine 0.999 in every row is kept (ResNet50 gains
        1.75x from bfloat16 on 2 AMD cores; MobileNetV2 may run faster in float32). A run too
        short to repay that (under 960 images on a CPU, 1,440 on a GPU) takes the rule
        instead: bfloat16 where the hardware runs it natively, float32 elsewhere. The choice
        and its timings are printed and kept in ``attrs["precision_choice"]``; the precision
        is recorded in the store's spec: codes of different precision are never mixed. See
        docs/precision.md.
    compile : bool or "auto"
        Run the model through ``torch.compile`` (20-35 s to compile on a CPU, a few seconds
        once its kernels are cached; then 1.05-1.2x faster). ``"auto"``, on a CPU: the first
        two batches run eagerly and are timed, and the model is compiled when the images
        left would take five minutes or more (MobileNetV2: ~130,000 images on 2 cores;
        ResNet50: ~27,000). The codes are the same either way.
    tta : {"none", "flip", "mirror"}, optional
        Test-time augmentation: ``"flip"`` averages the codes of each image and its mirror
        image (twice the compute); ``"mirror"`` stores the mirror image's codes alone, for
        training rows (``fit(..., augment=mirror_store)``). Follows an existing store when omitted, else ``"none"``.
    jpeg_draft : bool, optional
        Decode JPEGs at least 4x larger than the resize target at a reduced DCT scale
        (never below 2x the target), which makes large photos several times cheaper to
        decode. Follows an existing store when omitted, else on.
    resize : {"workers", "device"}, optional
        Where images are resized and centre-cropped. ``"device"``: the decoding threads or
        processes only decode, and torch resizes the uint8 images where the model runs
        (antialiased, as PIL), a batch at a time: on a CPU one core resizes flowers5's photos
        6x faster than PIL, on a GPU the CPU is spared the work (with Ray, the decoding tasks
        run torch's resize). ``"workers"``: PIL resizes each image where it is decoded,
        torchvision's transform of the weights to the pixel. Follows an existing store when
        omitted, else ``"device"``. The two differ by rounding only: enlarged images get the
        same pixels on a CPU; reduced ones differ in a few pixels (0.2 % on real photos) by
        one or two grey levels, codes within cosine 0.99999; a GPU resizes in float, within
        one grey level of PIL (codes within cosine 0.997). Recorded in the store, so the two
        are never mixed.
    max_pixels : int
        Larger images are recorded as failures (decompression-bomb guard).
    progress : bool
        Show a progress bar with images/s on stderr.
    root : path, optional
        For a list of paths only: ids are the paths relative to `root` (every image must lie
        under it, else `SourceError`). By default they are relative to the common parent of
        the list, which changes with the list; ``root="/"`` gives ids that do not, so that
        appending other subsets of the same images never stores one file under two ids.
    engine : {"local", "ray"}
        ``"ray"`` runs reading, decoding and the backbone on a Ray cluster (``pip install
        'cnncodes[ray]'``): this process lists and plans without reading an image; Ray Data
        tasks read and decode each image from where it is; a pool of `ray_workers` actors
        (one model each, `gpus_per_worker` GPUs each) writes the codes as segment files of
        the store, which the commit maps in place. Skipping and resuming are the same. Every
        worker needs the images (the same path or URL), the weights file (the same path, or
        ``CNNCODES_WEIGHTS_PATH``) and the store's folder. See docs/sources.md.
    ray_address : str, optional
        The cluster (``"auto"``, ``"ray://head:10001"``); by default the one this process
        joined, else a local one started for the run.
    ray_workers : int, optional
        Actors running the backbone; by default one per `gpus_per_worker` GPUs of the
        cluster, or half its CPUs.
    gpus_per_worker : float
        GPUs per actor (0: CPU actors).
    rehash : bool
        Read and hash every file again. By default a file whose size, mtime (ns) and inode
        are those stored with its row is taken as unchanged without being read, as git's
        index does; a file rewritten with the same size within the same mtime tick and inode
        (rare; the tick is nanoseconds on ext4, xfs and btrfs) is then missed, and
        ``rehash=True`` (``--rehash``) finds it.
    image_column, label_column : str, optional
        A table's image and label columns (defaults ``image`` and ``label``); for tar shards
        `label_column` is the member extension holding the label (default ``cls``, then
        ``txt``, then ``json``'s ``"label"``).
    storage_options : dict, optional
        Passed to fsspec for URLs (``{"endpoint_url": ...}``, credentials ...); by default
        fsspec's own configuration and the usual environment variables (``AWS_ENDPOINT_URL``,
        ``AWS_ACCESS_KEY_ID`` ...).
    on_other_root : {"refuse", "replace"}
        When `out` is a store extracted from another data root (its ``attrs["data_root"]``):
        ids are paths relative to the root, so ``daisy/1.jpg`` of two folders is one id.
        ``"refuse"`` (the default) raises `StoreMismatchError`, before any image is decoded,
        when an image of this run has the id of a stored row but other content (its row
        would be replaced); moved data (the same content) and images of new ids go on.
        ``"replace"`` (``--replace-root``): such rows are replaced. Either way the store's
        ``data_root`` becomes this run's root, the earlier ones listed in
        ``attrs["earlier_data_roots"]``.

    model : torch.nn.Module, optional
        Your own network instead of `backbone`: registered as `name` with
        :func:`cnncodes.register_backbone` (`layers` a mapping alias -> module path,
        `preprocessing`); the store records `name` and the sha256 of its state dict.
    name : str, optional
        With `model`: the backbone name recorded (required).
    preprocessing : Preprocess or torchvision transform preset, optional
        With `model`: what the network expects (ImageNet's 256 / 224 by default).

    Returns
    -------
    ExtractResult

    Examples
    --------
    >>> from cnncodes import extract, CodeStore                        # doctest: +SKIP
    >>> extract("flowers/", out="codes.h5", layers=["block4", "block5"])  # doctest: +SKIP
    >>> CodeStore("codes.h5").codes("block4").shape                      # doctest: +SKIP
    (4317, 96)
    """
    t0 = time.perf_counter()
    dev = _check_settings(pooling=pooling, dtype=dtype, tta=tta, engine=engine, compile=compile, resize=resize,
                          device=device, precision=precision, batch_size=batch_size, on_other_root=on_other_root)
    backbone, spec_b, infos = _backbone_layers(backbone, layers, engine, model=model, name=name,
                                               preprocessing=preprocessing)
    remote = remote_store(out, storage_options)  # a store in object storage: a working copy here
    out = remote.local if remote is not None else store_path(out)
    if remote is None:
        check_output(out, STORE, option="out")  # a model, a photo, a folder ... is never overwritten
    run = _Run(out=out, remote=remote, backbone=backbone, spec_b=spec_b, infos=infos, dev=dev,
               w=resolve(spec_b, weights),
               src=read_source(source, labels, root=root, image_column=image_column, label_column=label_column,
                               storage_options=storage_options),
               pooling=pooling, dtype=dtype, precision=precision, tta=tta, compile=compile, batch_size=batch_size,
               num_workers=num_workers, max_pixels=max_pixels, progress=progress, engine=engine,
               ray=dict(address=ray_address, workers=ray_workers, gpus_per_worker=gpus_per_worker))
    out.parent.mkdir(parents=True, exist_ok=True)
    with StoreLock(out), (remote.lock() if remote is not None else contextlib.nullcontext()):
        _open_store(run, image_size=image_size, jpeg_draft=jpeg_draft, resize=resize)
        _settle_spec(run)
        # Remote data, and every image of a Ray run, is read once, where it is decoded: the
        # plan decides from the listing's keys and never reads an image to hash it.
        plan = _plan(run.src.items, run.store, run.journal, rehash=rehash,
                     hash_in_plan=not run.src.remote and engine == "local", storage_options=run.src.storage_options)
        new_root = run.store is not None and _check_root(run.store, run.src, plan, on_other_root, run.journal)
        run.result.take_plan(plan)
        failed_shas, index = _compute(run, plan)
        _journal_kept(plan, failed_shas, run.journal, index, run.result)
        _commit(run, new_root)
    run.result.seconds = time.perf_counter() - t0
    return run.result


@dataclass
class _Run:
    """One extraction run: what it reads and writes, the settings asked for, and what opening
    the store and settling the spec decide (settings left open follow the store)."""

    out: Path
    remote: object  # a RemoteStore, or None
    backbone: str
    spec_b: object
    infos: list
    dev: torch.device
    w: object  # the resolved Weights
    src: object  # the listed Source
    pooling: str
    dtype: str
    precision: str
    tta: str | None
    compile: object
    batch_size: int
    num_workers: object
    max_pixels: int
    progress: bool
    engine: str
    ray: dict
    store: CodeStore | None = None
    journal: Journal | None = None
    prep: Preprocess | None = None
    choice: object = None  # how precision="auto" chose, or None
    spec: ExtractorSpec | None = None
    code_dims: dict = field(default_factory=dict)
    result: ExtractResult | None = None

    def forward(self, precision: str) -> CodesForward:
        """The eager forward pass (the probe times eager models; compile=True starts in _run)."""
        return CodesForward(self.spec_b, self.w, self.infos, self.pooling, self.prep, self.dev, precision,
                            self.tta, batch_size=self.batch_size)


def _open_store(run: _Run, *, image_size, jpeg_draft, resize) -> None:
    """Bring a remote store's working copy up to date, open the store and its journal, and take
    the settings left open from the store being extended (never mixing precisions silently) or
    from an interrupted first run's journal."""
    if run.remote is not None:
        run.remote.pull()
    remove_unmapped(run.out)  # what a killed run left half written: temporaries, orphan segments
    run.store = CodeStore(run.out) if run.out.exists() else None
    stored = run.store.spec if run.store is not None else None
    if run.precision == "auto" and stored is not None:
        run.precision = stored.precision
    run.journal = Journal(run.out, run.remote,
                          next_segment=int(run.store.attrs.get("next_segment", 0)) if run.store else 0)
    run.choice = resumed_choice(run.journal) if run.precision == "auto" and stored is None else None
    if run.choice is not None:  # an interrupted first run chose it: the journal holds its codes
        run.precision = run.choice.precision
    run.tta = run.tta if run.tta is not None else stored.tta if stored is not None else "none"
    run.prep = _preprocess(run.spec_b, run.w, stored, image_size, jpeg_draft, resize)


def _settle_spec(run: _Run) -> None:
    """Choose a new store's precision by measuring (local engine), build the spec the store
    records, check it against the store's, and open the journal with it."""
    if run.precision == "auto" and run.engine == "local":  # a new store: measured before any write
        def first_images(n):
            return next(iter(loader(run.src.items[:n], run.prep, run.max_pixels, n, 0, False,
                                    storage_options=run.src.storage_options)))[1]

        run.choice = measure_precision(first_images, run.forward, run.dev, len(run.src.items))
        run.precision = run.choice.precision
    run.precision = resolve_precision(run.precision, run.dev)
    run.code_dims = code_sizes(run.spec_b, run.infos, run.pooling, run.prep.crop_size)
    run.spec = ExtractorSpec(
        backbone=run.backbone, weights=run.w.ref, layers={i.alias: i.node for i in run.infos}, pooling=run.pooling,
        preprocessing={**run.prep.as_dict(), "description": run.prep.describe()},
        precision=run.precision, tta=run.tta, dtype=run.dtype,
    )
    run.result = ExtractResult(run.remote.url if run.remote is not None else str(run.out), len(run.src.items),
                               skipped_files=run.src.skipped, layers=run.code_dims,
                               precision_choice=run.choice.describe() if run.choice is not None else "")
    if run.store is not None:
        run.store.spec.check(run.spec, run.out.name)
    run.journal.open(run.spec)
    if run.choice is not None:
        save_choice(run.journal, run.choice)
    run.journal.clean()


def _compute(run: _Run, plan) -> tuple[dict, int]:
    """Compute the planned images on Ray or here: (sha256 -> reason of those that failed, the
    journal's next index)."""
    index = run.journal.next_index()
    if not plan.compute:
        return {}, index
    t1 = time.perf_counter()
    if run.engine == "ray":
        from cnncodes._extract.ray_engine import run_ray

        if run.remote is not None:  # the actors' segments there are this run's until it commits
            run.remote.mark(run.spec.to_json())
        failed_shas, index = run_ray(
            plan.compute, backbone=run.backbone, weights=run.w, infos=run.infos, pooling=run.pooling,
            prep=run.prep, precision=run.precision, tta=run.tta, dtype=run.dtype, journal=run.journal, index=index,
            stat_of=plan.stat_of, storage_options=run.src.storage_options,
            classes=_class_table(run.store, run.src.items), batch_size=run.batch_size, max_pixels=run.max_pixels,
            progress=run.progress, result=run.result, **run.ray)
    else:
        reuse = run.choice is not None and run.choice.forward is not None
        forward = run.choice.forward if reuse else run.forward(run.precision)
        if run.compile is True:
            forward.enable_compile(asked=True)
        # The images' rate: from the first image read to the last batch journalled, the
        # model built (as the precision probe builds it: start-up, not part of the rate).
        t1 = time.perf_counter()
        with reuse_freed_memory():  # activations reused, not faulted in anew each batch
            failed_shas, index = _run(plan.compute, forward, run.prep, run.dtype, run.journal, index,
                                      run.batch_size, run.num_workers, run.max_pixels, run.progress, run.result,
                                      plan.stat_of, compile_auto=run.compile == "auto" and run.dev.type == "cpu",
                                      storage_options=run.src.storage_options)
    run.result.compute_seconds = time.perf_counter() - t1
    return failed_shas, index


def _commit(run: _Run, new_root: bool) -> None:
    """Merge the journal into the store (and upload what is new to a remote one); or, with
    nothing journalled, drop the journal."""
    result, store = run.result, run.store
    if not run.journal.files():
        run.journal.remove()
        result.n_rows = len(store) if store is not None else 0
        return
    if store is not None and store.format_version < FORMAT_VERSION:
        result.converted_from = store.format_version
    attrs = _provenance(run.src, run.w)
    if run.choice is not None:
        attrs["precision_choice"] = run.choice.to_json()
    commit = merge(run.out, run.journal, run.spec, run.code_dims, attrs, store=store, new_root=new_root)
    if run.remote is not None:
        result.uploaded = run.remote.push()
    result.n_rows, result.conflicts = commit.rows, commit.conflicts


def _check_settings(*, pooling, dtype, tta, engine, compile, resize, device, precision, batch_size,
                    on_other_root):
    """Refuse bad settings before any file is touched; return the device."""
    check_pooling(pooling)
    if dtype not in DTYPES:
        raise InvalidParameterError(f"unknown dtype {dtype!r}. Valid dtypes: {', '.join(DTYPES)}.")
    if tta is not None and tta not in TTAS:
        raise InvalidParameterError(f"unknown tta {tta!r}. Valid values: {', '.join(TTAS)}.")
    if engine not in ENGINES:
        raise InvalidParameterError(f"unknown engine {engine!r}. Valid engines: {', '.join(map(repr, ENGINES))}.")
    if engine == "ray":
        from cnncodes._extract.ray_engine import import_ray

        import_ray()
    if compile not in ("auto", True, False):
        raise InvalidParameterError(f"compile must be True, False or 'auto', got {compile!r}.")
    if resize is not None and resize not in RESIZES:
        raise InvalidParameterError(f"unknown resize {resize!r}. Valid values: {', '.join(RESIZES)} "
                                    f"(where images are resized: in the decoding processes, or on the "
                                    f"model's device).")
    dev = resolve_device(device)
    resolve_precision(precision, dev)
    if batch_size < 1:
        raise InvalidParameterError(f"batch_size must be >= 1, got {batch_size}.")
    if on_other_root not in ON_OTHER_ROOT:
        raise InvalidParameterError(f"unknown on_other_root {on_other_root!r}. Valid values: "
                                    f"{', '.join(ON_OTHER_ROOT)}.")
    return dev


def _backbone_layers(backbone, layers, engine, *, model=None, name=None, preprocessing=None):
    """(backbone name, its spec, the layers asked for as LayerInfo, once each, shallow to deep);
    `model` is registered under `name` first."""
    if model is not None:
        from cnncodes._backbones.custom import register_backbone

        if not name:
            raise CnnCodesError("extract(model=...) needs name='my-net': the backbone name the store records.")
        backbone = register_backbone(name, model, layers=layers, preprocessing=preprocessing)
        layers = list(layers) if hasattr(layers, "items") else layers
    spec_b = get_backbone(backbone)
    if engine == "ray" and spec_b.source == "module":
        raise CnnCodesError(f"{backbone} is an nn.Module registered in this process; Ray's actors cannot "
                            f"build it by name. Extract it with engine='local', or use a timm or built-in backbone.")
    if isinstance(layers, str):
        layers = [layers]
    by_node = {}
    for info in (spec_b.layer(n) for n in (layers or [spec_b.default_layer])):
        by_node.setdefault(info.node, info)
    return backbone, spec_b, shallow_to_deep(spec_b, list(by_node.values()))


def _preprocess(spec_b, w, stored, image_size, jpeg_draft, resize):
    """The preprocessing of this run: settings left open follow the store being extended (so
    that adding images never needs them repeated), then the weights' own."""
    if jpeg_draft is None:
        jpeg_draft = stored.preprocessing.jpeg_draft if stored is not None else True
    if resize is None:
        resize = stored.preprocessing.resize if stored is not None else DEFAULT_RESIZE
    if image_size is None and w.image_size is not None:  # a fine-tuned network: its training crop
        image_size = w.image_size
    return preprocess_for(spec_b, w, image_size, jpeg_draft, resize)


def _journal_kept(plan, failed_shas: dict, journal, index: int, result) -> None:
    """Journal the rows kept as they are and this run's failures (one batch without codes).

    Kept: identical content whose codes are stored (copied, not recomputed) and rows whose
    file only got a new stat key (touched, copied back, or a version 1 store, which had none).
    """
    reused = [(i, s) for i, s in plan.reused if s not in failed_shas]
    late_failures = [(i.id, s, failed_shas[s]) for i, s in plan.reused if s in failed_shas]
    result.n_reused = len(reused)
    result.failures += [(rid, why) for rid, _, why in late_failures]
    kept = reused + plan.refresh
    failures = plan.failures_with_sha + late_failures + plan.refresh_failures
    if kept or failures:
        journal.write(index, ids=[i.id for i, _ in kept], sha256=[s for _, s in kept],
                      labels=[i.label for i, _ in kept],
                      stat=[plan.stat_of[i.id] for i, _ in kept], failures=failures,
                      fail_stat=[plan.stat_of.get(rid, UNKNOWN_STAT) for rid, _, _ in failures])


def _class_table(store: CodeStore | None, items: list[Item]) -> list[str]:
    """The classes the store will have: its own, then the source's new labels (what Ray actors
    index). All of the source's, not only those of the images left to compute, so that a
    re-run after a kill plans the table the killed run's segments index, and they are mapped
    as they are."""
    classes = list(store.class_names) if store is not None else []
    return classes + sorted({i.label for i in items if i.label is not None} - set(classes))


def _check_root(store: CodeStore, src, plan: "_Plan", on_other_root: str, journal: Journal) -> bool:
    """Whether this run's data root differs from the store's; refuse when rows would be lost.

    Ids are paths relative to the data root, so ``daisy/1.jpg`` of two folders is one id: a
    run from another root whose images of stored ids hold other content would replace the
    stored rows. Moved data (the same content at a new root) and images of new ids replace
    nothing and go on; the store then records the new root.
    """
    stored = store.attrs.get("data_root")
    here = data_root(src)
    if stored is None or data_root(stored) == here:
        return False
    replaced = plan.replaced
    if replaced and on_other_root != "replace":
        if not journal.files():
            journal.remove()
        raise StoreMismatchError(
            f"{store.path.name} holds images of data root {stored!r}, and this run's images are in "
            f"{here!r}: {len(replaced)} of them have the id of a stored image but other content "
            f"(e.g. {replaced[0]!r}; ids are paths relative to the data root) and would replace its "
            f"row. Write a new store (-o other.h5), or pass --replace-root (on_other_root='replace') "
            f"to replace those rows and record {here!r} as the store's data root."
        )
    return True


def _provenance(src, w) -> dict:
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data_root": data_root(src),
        "source_kind": src.kind,
        "weights_path": w.path,
        "versions": _versions(),
        "command": " ".join(sys.argv),
    }


@dataclass
class _Plan:
    compute: list[Item] = field(default_factory=list)
    reused: list[tuple[Item, str]] = field(default_factory=list)
    refresh: list[tuple[Item, str]] = field(default_factory=list)  # same content, new stat key
    refresh_failures: list[tuple[str, str, str]] = field(default_factory=list)  # likewise, failed
    failures_with_sha: list[tuple[str, str, str]] = field(default_factory=list)
    known_failures: list[tuple[str, str]] = field(default_factory=list)
    stat_of: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # id -> stat key to store
    replaced: list[str] = field(default_factory=list)  # stored ids whose file holds other content now
    n_unchanged: int = 0
    n_resumed: int = 0
    n_hashed: int = 0

    @property
    def failures(self):
        return [(rid, why) for rid, _, why in self.failures_with_sha]


class _Known:
    """What the store holds of a run's items, looked up without reading every stored row."""

    def __init__(self, store: CodeStore | None, items: list[Item]):
        self.store = store
        if store is None:
            self.rows, self.fail = np.full(len(items), -1, dtype=np.int64), {}
            return
        self.rows = store.rows_of([i.id for i in items])
        held = np.unique(self.rows[self.rows >= 0])  # their labels and stat keys, not every row's
        self._label = dict(zip(held.tolist(), store._labels_at(held).tolist()))
        self._stat = dict(zip(held.tolist(), map(tuple, store._stat_at(held).tolist())))
        self.names = store.class_names
        stats = store.failure_stats()
        self.fail = {rid: (sha, why, stats.get(rid, UNKNOWN_STAT)) for rid, sha, why in store.failure_records()}

    def label(self, row: int) -> str | None:
        lab = self._label[row]
        return self.names[lab] if lab >= 0 else None

    def stat(self, row: int) -> tuple:
        return self._stat[row]

    def shas_of(self, rows: list[int]) -> dict[int, str]:
        """Stored sha256 of these rows."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if not len(rows) or self.store is None:
            return {}
        return {r: s.decode() for r, s in zip(rows.tolist(), self.store._sha_at(rows).tolist())}

    def stored(self, shas: list[str]) -> set[str]:
        """Those of `shas` some row of the store holds."""
        if self.store is None or not shas or not len(self.store):
            return set()
        rows = self.store.rows_with_sha(shas)
        return {s.decode() for s in self.store._sha_at(rows).tolist()} if len(rows) else set()


def _plan(items: list[Item], store: CodeStore | None, journal: Journal, rehash: bool = False,
          hash_in_plan: bool = True, storage_options=None) -> _Plan:
    """Decide per image: unchanged, reuse identical content, compute, or unreadable.

    An image whose change key (a local file's size, mtime_ns and inode; an object's size,
    mtime and ETag; a shard member's or table row's key from its container's) is the one
    stored with its row, its journalled row or its recorded failure is decided without
    being read. The others are read and hashed (all of them with `rehash`), or, without
    `hash_in_plan`, computed: their bytes are read once, where they are decoded, and
    identical content is then computed again rather than found here.
    """
    plan = _Plan()
    known = _Known(store, items)
    j_ids, j_shas, j_fail = journal.done()
    known_fail = {**known.fail, **j_fail}
    now = time.time_ns()
    to_hash = []
    for item, row in zip(items, known.rows.tolist()):
        try:
            key = change_key(item, storage_options)
        except OSError as exc:
            plan.failures_with_sha.append((item.id, "", f"cannot read file: {exc.strerror or exc}"))
            continue
        # A local file's stat (item.key None) may be racy; a listing's key is what it is.
        plan.stat_of[item.id] = UNKNOWN_STAT if item.key is None and now - key[1] < RACY_NS else key
        if key == UNKNOWN_STAT:
            to_hash.append((item, row))
            continue
        if not rehash:
            if row >= 0 and known.stat(row) == key and known.label(row) == item.label:
                plan.n_unchanged += 1
                continue
            if item.id in j_ids and j_ids[item.id][1] == key:
                plan.n_resumed += 1
                continue
            if item.id in known_fail and known_fail[item.id][2] == key:
                plan.n_unchanged += 1
                plan.known_failures.append((item.id, known_fail[item.id][1]))
                continue
        to_hash.append((item, row))
    if not hash_in_plan:
        for item, row in to_hash:
            plan.compute.append(item)
            if row >= 0:
                plan.replaced.append(item.id)  # perhaps: its content is known once read
        return plan
    plan.n_hashed = len(to_hash)
    hashed = _hash_files([item for item, _ in to_hash], storage_options)
    stored_sha = known.shas_of([row for _, row in to_hash if row >= 0])
    seen_before = known.stored([sha for (item, row), (sha, _) in zip(to_hash, hashed)
                                if sha is not None and stored_sha.get(row) != sha])
    scheduled = set()
    for (item, row), (sha, err) in zip(to_hash, hashed):
        if sha is None:
            plan.failures_with_sha.append((item.id, "", err))
            continue
        if row >= 0 and stored_sha[row] == sha and known.label(row) == item.label:
            plan.n_unchanged += 1
            if known.stat(row) != plan.stat_of[item.id] and plan.stat_of[item.id] != UNKNOWN_STAT:
                plan.refresh.append((item, sha))
        elif item.id in j_ids and j_ids[item.id][0] == sha:
            plan.n_resumed += 1
        elif item.id in known_fail and known_fail[item.id][0] == sha:
            plan.n_unchanged += 1
            plan.known_failures.append((item.id, known_fail[item.id][1]))
            if known_fail[item.id][2] != plan.stat_of[item.id] != UNKNOWN_STAT:  # recorded again, with it
                plan.refresh_failures.append((item.id, sha, known_fail[item.id][1]))
        else:
            if sha in seen_before or sha in j_shas or sha in scheduled:
                plan.reused.append((item, sha))
            else:
                scheduled.add(sha)
                plan.compute.append(item)
            if row >= 0:
                plan.replaced.append(item.id)
    return plan


def _hash_files(items: list[Item], storage_options=None) -> list[tuple[str | None, str | None]]:
    """(sha256, None) or (None, why) per file: in this thread while the files come quickly
    (the page cache, a local disk), by 8 threads once a chunk is slow (a network share).

    Threads only pay where the reads wait: on flowers5 in the page cache one thread hashes
    the 4,317 photos in 0.036 s and 8 threads take 0.072 s (the GIL, handing over).
    """
    def sha(item):
        return hash_item(item, storage_options)

    hashed = [sha(p) for p in items[:HASH_CHUNK]]  # the first files open slowest: untimed
    while len(hashed) < len(items):
        t = time.perf_counter()
        hashed += [sha(p) for p in items[len(hashed):len(hashed) + HASH_CHUNK]]
        if time.perf_counter() - t > HASH_CHUNK * SLOW_READ_SECONDS:
            break
    if len(hashed) < len(items):  # the reads wait: overlap them, HASH_CHUNK files to a task
        chunks = [items[i:i + HASH_CHUNK] for i in range(len(hashed), len(items), HASH_CHUNK)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            hashed += [h for part in pool.map(lambda c: [sha(p) for p in c], chunks) for h in part]
    return hashed


def _run(items, forward, prep, dtype, journal, index, batch_size, num_workers, max_pixels,
         progress, result, stat_of, compile_auto=False, storage_options=None):
    from tqdm.auto import tqdm

    dev = forward.device
    forward_seconds = [0.0]
    loader = batches(items, prep, max_pixels, batch_size, num_workers, dev.type == "cuda", forward_seconds,
                      storage_options)
    failed_shas = {}
    pending = []
    bar = tqdm(total=len(items), unit="img", desc="extract", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=1) as writer:
        for idx, batch, shas, bad in loader:
            failures = []
            for i, sha, why in bad:
                failures.append((items[i].id, sha, why))
                if sha:
                    failed_shas[sha] = why
            codes = {}
            if batch is not None:
                t = time.perf_counter()
                codes = forward(batch)
                forward_seconds.append(time.perf_counter() - t)
                finite = np.all([np.isfinite(c).all(axis=1) for c in codes.values()], axis=0)
                if not finite.all():
                    for k in np.flatnonzero(~finite):
                        why = "the backbone produced non-finite codes (NaN/inf)"
                        failures.append((items[idx[k]].id, shas[k], why))
                        failed_shas[shas[k]] = why
                    keep = np.flatnonzero(finite)
                    idx, shas = [idx[k] for k in keep], [shas[k] for k in keep]
                    codes = {a: c[keep] for a, c in codes.items()}
                codes = {a: c.astype(dtype) for a, c in codes.items()}
            for fut in [p for p in pending if p.done()]:
                fut.result()
                pending.remove(fut)
            pending.append(writer.submit(
                journal.write, index, ids=[items[i].id for i in idx], sha256=shas,
                labels=[items[i].label for i in idx], codes=codes if idx else None, failures=failures,
                stat=[stat_of[items[i].id] for i in idx],
                fail_stat=[stat_of.get(rid, UNKNOWN_STAT) for rid, _, _ in failures],
            ))
            index += 1
            result.n_extracted += len(idx)
            result.failures += [(rid, why) for rid, _, why in failures]
            if compile_auto and len(forward_seconds) > PROBE_BATCHES:  # decided once, on a warm batch
                compile_auto = False
                eager_left = (len(items) - bar.n - len(idx) - len(bad)) * forward_seconds[-1] / batch_size
                if eager_left >= COMPILE_MIN_SECONDS:
                    if progress:
                        tqdm.write(f"compiling the model: about {eager_left:.0f} s of eager work left "
                                   f"(pass --no-compile to skip)")
                    forward.enable_compile()
            bar.update(len(idx) + len(bad))
            bar.set_postfix(failed=len(result.failures), refresh=False)
        for fut in pending:
            fut.result()
    bar.close()
    return failed_shas, index
