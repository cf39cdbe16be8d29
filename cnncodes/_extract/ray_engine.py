"""Extraction on a Ray cluster: decoding in Ray Data tasks, the frozen backbone in an actor pool.

`extract(..., engine="ray")` lists and plans on the driver from the listing's change keys
(what the store holds, what an interrupted run journalled); the driver reads no image. The
images to compute go through a Ray Data pipeline:

    from_items(pos, id, path, part, label)
      -> map_batches(_decode_batch)             Ray tasks: read (file, object, shard member,
                                                 table row), sha256, decode (CPU)
      -> map_batches(_CodesWorker, concurrency=N)  actor pool: one CodesForward per actor,
                                                 GPU when asked; SEGMENT_ROWS rows a call,
                                                 written as one segment file of the store
      -> iter_batches on the driver              one small status row per image

Each actor writes the rows it computes as a segment file in the store's own format
(``codes.h5.partial/segment-<n>.h5``, n = the journal's next index + the position of the
call's first image, so names never clash and a retried call rewrites the same file; written
to a temporary name and renamed). Their labels index the class table the driver planned.
The commit then maps those files into the store where they are (hard-linked, else moved,
into ``codes.h5.d/``) and writes the new root: no code passes through the driver or is
copied. Whatever dies - an actor (Ray restarts it and retries its call), a node, or the
driver - the segments written so far stay, a re-run plans them as resumed, and the commit
keeps each id once.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnncodes._extract.accel import reuse_freed_memory
from cnncodes._errors import CnnCodesError, InvalidParameterError
from cnncodes._input.sources import Item, is_url


@dataclass(frozen=True)
class _Faults:
    """Faults a test injects into a run (none in production); see `_faults`.

    ``actor_exit_after=n`` makes every actor process exit (os._exit, as a crash would) right
    after writing its n-th segment, before returning it; ``driver_abort_after=n`` makes the
    driver raise KeyboardInterrupt after n result batches. 0: never.
    """

    actor_exit_after: int = 0
    driver_abort_after: int = 0


def _faults() -> _Faults:
    """The faults for the run about to start: none. The test hook: tests monkeypatch this function."""
    return _Faults()


# Rows an actor takes per call and writes as one segment of the store (its forward passes run
# batch_size rows at a time): fewer, larger segments for the store to map.
SEGMENT_ROWS = 1024


def import_ray():
    """Return the ``ray`` module with Ray Data, or raise CnnCodesError saying how to get it."""
    from cnncodes._optional import require

    ray = require("ray", "engine='ray' (--engine ray)")
    require("ray.data", "engine='ray' (--engine ray)")
    return ray


def _decode_batch(batch: dict, *, prep, max_pixels: int, storage_options=None) -> dict:
    """Read, hash and decode a batch of images (a Ray task); unreadable ones get an error.

    The task reads each image from where it is (a file, an object, a shard member, a table
    cell): the driver only listed them.

    The images leave the task at the crop size, whatever ``prep.resize``: with ``"device"``
    the task runs torch's resize on its CPU, as one machine does on its CPU.
    """
    import torch

    from cnncodes._extract.forward import Images
    from cnncodes._input.images import resize_batch

    items = [Item(str(i), str(p), str(lab) or None, part=str(part))
             for i, p, lab, part in zip(batch["id"], batch["path"], batch["label"], batch["part"])]
    images = Images(items, prep, max_pixels, storage_options=storage_options)
    pixels = np.zeros((len(items), 3, prep.crop_size, prep.crop_size), dtype=np.uint8)
    shas, errors, decoded = [], [], {}
    for k in range(len(items)):
        _, tensor, sha, why = images[k]
        if tensor is not None:
            decoded[k] = tensor
        shas.append(sha)
        errors.append(why or "")
    if decoded and prep.resize == "device":
        resized = resize_batch(list(decoded.values()), prep, torch.device("cpu"))
        decoded = dict(zip(decoded, resized))
    for k, tensor in decoded.items():
        pixels[k] = tensor.numpy()
    return {"pos": batch["pos"], "id": batch["id"], "label": batch["label"], "image": pixels, "stat": batch["stat"],
            "sha256": np.array(shas, dtype=str), "error": np.array(errors, dtype=object)}


def _weights_here(weights):
    """The weights record with a checkpoint path that exists on this node."""
    from dataclasses import replace

    from cnncodes._backbones.weights import search_dirs

    if not weights.path or os.path.isfile(weights.path):
        return weights
    name = Path(weights.path).name
    for folder in search_dirs():
        if (folder / name).is_file():
            return replace(weights, path=str(folder / name))
    raise CnnCodesError(
        f"the checkpoint {weights.path} is not on the Ray worker {os.uname().nodename}, nor "
        f"{name} in its CNNCODES_WEIGHTS_PATH. Every worker needs the weights file: put it "
        f"at the same path on every node, or set CNNCODES_WEIGHTS_PATH there."
    )


class _CodesWorker:
    """One frozen backbone per Ray actor: decoded batch in, shard file out, statuses back."""

    def __init__(self, *, backbone, weights, layers, pooling, prep, precision, tta, dtype, store,
                 base, use_gpu, cpus, faults, classes, batch_size, remote=None):
        from dataclasses import replace

        import torch

        from cnncodes._backbones.registry import get_backbone
        from cnncodes._extract.forward import CodesForward
        from cnncodes._store.store import Journal

        spec_b = get_backbone(backbone)
        infos = [spec_b.layer(name) for name in layers]
        device = torch.device("cuda" if use_gpu else "cpu")
        if not use_gpu:
            torch.set_num_threads(max(1, int(cpus)))
        # The decoding tasks resized the images already (see _decode_batch).
        self.forward = CodesForward(spec_b, _weights_here(weights), infos, pooling,
                                    replace(prep, resize="workers"), device, precision, tta)
        # For the actor's life (it only runs the backbone): activations reused, not faulted
        # in anew at every batch.
        self._memory = contextlib.ExitStack()
        self._memory.enter_context(reuse_freed_memory())
        self.dtype, self.base, self.faults = dtype, base, faults
        self.classes, self.batch_size = list(classes), batch_size
        self.class_index = {c: i for i, c in enumerate(self.classes)}
        self.remote = remote
        if remote is not None:  # a store in object storage: each segment uploaded as written
            import tempfile

            self._scratch = tempfile.TemporaryDirectory(prefix="cnncodes-actor-")  # removed with the actor
            store = Path(self._scratch.name) / "codes.h5"
        self.journal = Journal(Path(store))
        self.journal.folder.mkdir(parents=True, exist_ok=True)
        self.written = 0

    def __call__(self, batch: dict) -> dict:
        import torch

        pos = batch["pos"].astype(np.int64)
        ids, labels, shas = batch["id"], batch["label"], batch["sha256"]
        reasons = np.array([str(e) for e in batch["error"]], dtype=object)
        ok = np.flatnonzero(reasons == "")
        codes = {}
        if len(ok):
            parts = [self.forward(torch.from_numpy(np.ascontiguousarray(batch["image"][ok[i:i + self.batch_size]])))
                     for i in range(0, len(ok), self.batch_size)]
            codes = {a: np.concatenate([p[a] for p in parts]) for a in parts[0]}
            finite = np.all([np.isfinite(c).all(axis=1) for c in codes.values()], axis=0)
            reasons[ok[~finite]] = "the backbone produced non-finite codes (NaN/inf)"
            codes = {a: c[finite].astype(self.dtype) for a, c in codes.items()}
            ok = ok[finite]
        bad = np.flatnonzero(reasons != "")
        index = self.base + int(pos.min())
        written = self.journal.write_segment(
            index, ids=[str(ids[k]) for k in ok],
            sha256=[str(shas[k]) for k in ok],
            labels=[self.class_index[str(labels[k])] if str(labels[k]) else -1 for k in ok], classes=self.classes,
            codes=codes if len(ok) else {}, stat=batch["stat"][ok],
            failures=[(str(ids[k]), str(shas[k]), str(reasons[k])) for k in bad], fail_stat=batch["stat"][bad],
        )
        if self.remote is not None:
            self._upload(written, index)
        self.written += 1
        if self.faults.actor_exit_after and self.written >= self.faults.actor_exit_after:
            os._exit(1)  # a crash after the shard is written, before Ray hears of it
        return {"pos": pos, "sha256": shas, "reason": reasons.astype(str)}


    def _upload(self, path: Path, index: int) -> None:
        """Put a segment into the store's folder in object storage, under the name the commit
        keeps (``segment-<N>-<n>.h5``; one PUT: whole or absent), then drop the local file."""
        from cnncodes._input.items import filesystem

        fs, inner = filesystem(self.remote["url"], self.remote["storage_options"])
        try:
            fs.put_file(str(path), f"{inner}.d/segment-{self.remote['next_segment']:06d}-{index:06d}.h5")
        finally:
            path.unlink(missing_ok=True)


def _resources(ray, workers, gpus_per_worker):
    """(workers, CPUs per actor, CPUs per decoding task) for the cluster Ray is connected to."""
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 1)), float(total.get("GPU", 0))
    if gpus_per_worker:
        if gpus < gpus_per_worker:
            raise CnnCodesError(
                f"gpus_per_worker={gpus_per_worker} was asked for, but the Ray cluster has "
                f"{gpus:g} GPUs. Add GPU nodes, or use gpus_per_worker=0 (CPU actors)."
            )
        workers = workers or max(1, int(gpus // gpus_per_worker))
        return workers, 1.0, 1.0
    workers = workers or max(1, int(cpus // 2))
    # CPU actors share the cores with the decoding tasks: half the cluster for each.
    actor_cpus = max(0.25, min(1.0, cpus / (2 * workers)))
    return workers, actor_cpus, max(0.25, min(1.0, cpus / 2))


def run_ray(items: list[Item], *, backbone, weights, infos, pooling, prep, precision, tta, dtype,
            journal, index, batch_size, max_pixels, progress, result, stat_of, classes, address=None,
            workers=None, gpus_per_worker=0, storage_options=None):
    """Extract `items` on Ray into shards of `journal`; return (failed sha -> reason, next index).

    Connects to the Ray cluster at `address` (``"auto"``, ``"ray://host:10001"``...), or to
    the one this process already joined, or starts a local one (shut down afterwards).
    """
    from tqdm.auto import tqdm

    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InvalidParameterError(f"ray_workers must be an integer >= 1 or None, got {workers!r}.")
    if not isinstance(gpus_per_worker, (int, float)) or gpus_per_worker < 0:
        raise InvalidParameterError(f"gpus_per_worker must be a number >= 0, got {gpus_per_worker!r}.")
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise CnnCodesError(
                f"cannot connect to the Ray cluster at {address!r} ({exc}). Start it with "
                f"`ray start --head` and pass its address, or leave the address out for a "
                f"local cluster."
            ) from None
    try:
        return _pipeline(ray, items, backbone=backbone, weights=weights, infos=infos, pooling=pooling,
                         prep=prep, precision=precision, tta=tta, dtype=dtype, journal=journal,
                         index=index, stat_of=stat_of, batch_size=batch_size, max_pixels=max_pixels,
                         progress=progress, result=result, workers=workers,
                         gpus_per_worker=gpus_per_worker, tqdm=tqdm, storage_options=storage_options,
                         classes=classes)
    finally:
        if started:
            ray.shutdown()


def _pipeline(ray, items, *, backbone, weights, infos, pooling, prep, precision, tta, dtype, journal,
              index, stat_of, batch_size, max_pixels, progress, result, workers, gpus_per_worker, tqdm,
              storage_options=None, classes=()):
    workers, actor_cpus, decode_cpus = _resources(ray, workers, gpus_per_worker)
    faults = _faults()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows one bar of its own
    ctx.print_on_execution_start = False
    # Each row carries the stat key the driver listed, stored with its codes (see _plan).
    rows = [{"pos": k, "id": it.id, "path": it.path if is_url(it.path) else os.path.abspath(it.path),
             "part": it.part, "label": it.label or "",
             "stat": np.asarray(stat_of[it.id], dtype=np.int64)} for k, it in enumerate(items)]
    n_blocks = max(1, min(len(rows), -(-len(rows) // batch_size)))
    ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
    ds = ds.map_batches(_decode_batch, fn_kwargs={"prep": prep, "max_pixels": max_pixels,
                                                  "storage_options": dict(storage_options or {})},
                        batch_size=batch_size, batch_format="numpy", num_cpus=decode_cpus)
    ds = ds.map_batches(
        _CodesWorker, batch_size=max(batch_size, SEGMENT_ROWS), batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=actor_cpus, num_gpus=gpus_per_worker or None,
        fn_constructor_kwargs={
            "backbone": backbone, "weights": weights, "layers": [i.alias for i in infos],
            "pooling": pooling, "prep": prep, "precision": precision, "tta": tta, "dtype": dtype,
            "store": str(journal.folder)[: -len(".partial")], "base": index,
            "remote": None if journal.remote is None else {
                "url": journal.remote.url, "storage_options": dict(journal.remote.storage_options),
                "next_segment": journal.next_segment},
            "use_gpu": bool(gpus_per_worker), "cpus": actor_cpus, "faults": faults,
            "classes": list(classes), "batch_size": batch_size,
        },
    )  # Ray Data restarts dead actors and retries their batches (max_restarts=-1)
    failed_shas, seen = {}, set()
    bar = tqdm(total=len(items), unit="img", desc=f"extract (ray, {workers} workers)",
               disable=not progress, dynamic_ncols=True)
    try:
        for n, out in enumerate(ds.iter_batches(batch_size=None, batch_format="numpy"), 1):
            for pos, sha, why in zip(out["pos"], out["sha256"], out["reason"]):
                if int(pos) in seen:  # a batch retried after a crash: counted once
                    continue
                seen.add(int(pos))
                if why:
                    result.failures.append((items[int(pos)].id, str(why)))
                    if sha:
                        failed_shas[str(sha)] = str(why)
                else:
                    result.n_extracted += 1
            bar.update(len(out["pos"]))
            if faults.driver_abort_after and n >= faults.driver_abort_after:
                raise KeyboardInterrupt("fault injection: the driver stops here")
    except (KeyboardInterrupt, CnnCodesError):
        raise
    except Exception as exc:  # RayTaskError, RayActorError ... wrap the worker's traceback
        raise CnnCodesError(
            f"the Ray pipeline failed ({type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}). "
            f"Every worker needs cnncodes, the weights file (CNNCODES_WEIGHTS_PATH) and the images "
            f"at the same path; fix that and re-run: finished batches are kept and resumed."
        ) from exc
    finally:
        bar.close()
    if len(seen) != len(items):
        raise CnnCodesError(f"the Ray pipeline returned {len(seen)} of {len(items)} images; re-run "
                            f"to extract the rest (finished batches are kept).")
    return failed_shas, index + len(items)
