"""The four-scenario advisor: measure a data set, place it in the guide's table, recommend, run.

The rules (`place`, `recommend`, their thresholds) are in `cnncodes._analysis.rules`, the measurements
in `cnncodes._analysis.measure`; this module puts them together and carries the advice out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnncodes._cache import in_session_cache
from cnncodes._errors import CnnCodesError
from cnncodes._analysis.measure import head_on_sample, more_labels, read_labelled
# HeadStats as HeadStats: still importable from here, its home before the split.
from cnncodes._analysis.rules import (
    HEAD_IMAGES,
    HeadStats as HeadStats,
    Measurements,
    Recommendation,
    Scenario,
    _num,
    place,
    recommend,
)


@dataclass
class AdviceRun:
    """What :meth:`Advice.run` did."""

    strategy: str
    path: Path
    result: object  # the fitted Pipeline (linear) or the FinetuneResult
    summary: str


@dataclass
class Advice:
    """The advisor's verdict: measurements, the scenario cell, the recommendation; `report()`."""

    data: str
    backbone: str
    weights: str
    measurements: Measurements
    scenario: Scenario
    recommendation: Recommendation
    sweep: object = None  # the SweepResult
    images: object = None  # the image source, for run(); None when only a store was given
    store: str | None = None
    image_size: int | None = None
    seconds: float = 0.0
    # The user's options that the printed `cnncodes advise ... --run` must repeat, as
    # CLI flag -> value (only those that differ from the defaults).
    options: dict = field(default_factory=dict)

    def report(self) -> str:
        """The advice in plain words, with the numbers behind it."""
        m, s, r = self.measurements, self.scenario, self.recommendation
        counts = m.class_counts
        lines = [f"cnncodes advise: {self.data} ({self.backbone}, {self.weights})", "", "Measured"]
        lines.append(f"  size: {m.n_images:,} images, {m.n_classes} classes; images per class: min "
                     f"{m.per_class_min:,} (class {m.smallest_class!r}), median {m.per_class_median:g}, max "
                     f"{max(counts.values()):,}")
        if m.head is not None:
            h = m.head
            lines.append(f"  ImageNet head on {h.n_images} images: mean top-1 probability {h.confidence:.3f} "
                         f"({h.ratio:.2f} × its ImageNet accuracy {h.imagenet_accuracy:.3f}), normalised "
                         f"entropy {h.entropy:.2f}; top labels: "
                         + ", ".join(f"{n} {100 * f:.0f} %" for n, f in h.top_labels[:5]))
        if m.layers:
            best = m.best[0]
            lines.append(f"  layer sweep ({m.cv}-fold CV, linear probe): " + ", ".join(
                f"{a} {mean:.3f} ± {std:.3f}" + (" (best)" if a == best else "")
                for a, _, mean, std in m.layers))
        if m.more_labels is not None:
            lines.append(f"  learning curve: {m.more_labels[1]}")
        lines += [f"  note: {n}" for n in m.notes]
        lines += ["", f"Scenario: {s.cell}", f"  - {s.size_reason}"]
        lines += [f"  - {why}" for why in s.similarity_reasons]
        lines += ["", f"Recommendation: {r.summary}"]
        lines += [f"  - {why}" for why in r.reasons]
        lines += ["", "Do it:"] + [f"  {c}" for c in self.commands()]
        return "\n".join(lines)

    def commands(self) -> list[str]:
        """The commands (and Python call) that carry the recommendation out."""
        from cnncodes._backbones.registry import get_backbone

        r = self.recommendation
        data = self.images if isinstance(self.images, (str, Path)) else "DATA"
        size = "" if self.image_size is None else f", image_size={self.image_size}"
        size_cli = "" if self.image_size is None else f" --image-size {self.image_size}"
        # A store the user named (or gave as data) holds every swept layer already.
        kept = self.store if self.store and not in_session_cache(self.store) else None
        # The same advice again, then carried out: the same data, settings and store.
        flags = "".join(f" {flag} {value}" for flag, value in self.options.items())
        again = (f"cnncodes advise {self.data}" if kept == self.data else (
            f"cnncodes advise {data} --backbone {self.backbone}{size_cli}" + (f" --store {kept}" if kept else ""))
        ) + flags
        if r.strategy == "linear":
            if kept:
                steps = [f"cnncodes fit {kept} --layer {r.layer} --classifier {r.classifier} -o model.skops"]
            else:
                steps = [f"cnncodes extract {data} --backbone {self.backbone} --layer {r.layer}{size_cli} "
                         f"-o codes.h5",
                         f"cnncodes fit codes.h5 --layer {r.layer} --classifier {r.classifier} -o model.skops"]
            return steps + [f"or all in one: {again} --run -o model.skops"]
        head = get_backbone(self.backbone).default_layer
        steps = [] if kept else [
            f"cnncodes extract {data} --backbone {self.backbone} --layer {head}{size_cli} -o codes.h5"]
        return steps + [
            f"python: finetune({str(data)!r}, out='finetuned.pt', backbone={self.backbone!r}, "
            f"unfreeze={r.unfreeze!r}, lr={_num(r.lr)}, head_lr={_num(r.head_lr)}, epochs={r.epochs}, "
            f"init_head={str(kept or 'codes.h5')!r}{size})",
            f"or all in one: {again} --run -o finetuned.pt",
        ]

    def run(self, out=None, *, progress: bool = True, n_jobs: int | None = -1) -> AdviceRun:
        """Carry the recommendation out and write the result to `out`.

        Linear: every image is extracted (the sweep's store is extended when it probed a
        sample), a logistic regression is fitted on the recommended layer (C by CV) and
        saved as a ``.skops`` model (default ``model.skops``). Fine-tuning:
        :func:`cnncodes.finetune` with the recommended settings, its head
        initialised from the sweep's store when it holds the pre-logits codes (default
        ``finetuned.pt``).
        """
        r = self.recommendation
        if r.strategy == "linear":
            return self._run_linear(Path(out or "model.skops"), progress, n_jobs)
        return self._run_finetune(Path(out or "finetuned.pt"), progress, n_jobs)

    def _run_linear(self, out: Path, progress, n_jobs) -> AdviceRun:
        from cnncodes._extract.extract import extract
        from cnncodes._classify.fit import fit
        from cnncodes._models.model import save
        from cnncodes._input.sources import read_source
        from cnncodes._store.store import CodeStore

        layer = self.recommendation.layer
        store = CodeStore(self.store)
        rows = None
        if self.sweep is not None and self.sweep.extract is not None:
            # The sweep extracted images (perhaps a sample of them): extract the rest into the
            # same store, with its settings, then fit on every image of the source.
            src = read_source(self.images)
            extract(self.images, out=store.path, **store.spec.extract_kwargs(), progress=progress)
            store = CodeStore(store.path)
            wanted = {it.id for it in src.items if it.label is not None}
            ids = store.ids
            rows = np.array([k for k in np.flatnonzero(store.labels >= 0) if ids[k] in wanted], dtype=int)
        model = fit(store, layer=layer, classifier=self.recommendation.classifier, rows=rows, n_jobs=n_jobs)
        save(model, out)
        info = model.cnncodes_["fit"]
        summary = (f"fit {info['classifier']} on {info['n_train']:,} images ({layer}, "
                   f"{store.codes_shape(layer)[1]} dims), C={info['C']:g}; cross-validated accuracy of "
                   f"this layer in the sweep {self._score(layer)}. Wrote {out}.")
        return AdviceRun("linear", out, model, summary)

    def _weights_arg(self, store):
        """The `weights=` that rebuilds the store's network: a name, a checkpoint path, or None."""
        from cnncodes._backbones.weights import _IMAGENET_MEMBER, IMAGENET

        arg = store.spec.weights.extract_arg()
        return IMAGENET if arg == _IMAGENET_MEMBER else arg

    def _score(self, layer: str) -> str:
        for a, _, mean, std in self.measurements.layers:
            if a == layer:
                return f"{mean:.3f} ± {std:.3f}"
        return "n/a"

    def _run_finetune(self, out: Path, progress, n_jobs) -> AdviceRun:
        from cnncodes._backbones.registry import get_backbone
        from cnncodes._store.store import CodeStore

        try:
            from cnncodes._finetune import finetune
        except ImportError as exc:
            raise CnnCodesError(f"fine-tuning is not available in this installation ({exc}); "
                                f"fit a linear classifier instead: cnncodes fit.") from None
        r = self.recommendation
        if self.images is None:
            raise CnnCodesError(
                f"fine-tuning trains on the images, but {self.data} is a code store whose image folder "
                f"is not available; run `cnncodes advise IMAGE_FOLDER --run` on the images.")
        spec_b = get_backbone(self.backbone)
        store = CodeStore(self.store)
        init_head = None
        default_node = spec_b.layer(spec_b.default_layer).node
        if default_node in store.spec.layers.values() and store.spec.pooling == "avg" \
                and self.backbone != "convnext_tiny":
            init_head = str(store.path)  # the two-stage recipe: the head starts as the linear probe
        weights = self._weights_arg(store)
        result = finetune(self.images, out=out, backbone=self.backbone, weights=weights,
                          unfreeze=r.unfreeze, epochs=r.epochs, lr=r.lr, head_lr=r.head_lr,
                          init_head=init_head, image_size=self.image_size, n_jobs=n_jobs, progress=progress)
        return AdviceRun("finetune", out, result, result.summary())


def advise(
    data,
    *,
    backbone: str = "mobilenet_v2",
    store=None,
    weights="imagenet",
    image_size: int | None = None,
    cv: int = 5,
    max_images: int | None = 5000,
    head_images: int = HEAD_IMAGES,
    random_state: int | None = 0,
    batch_size: int = 64,
    device="auto",
    num_workers="auto",
    n_jobs: int | None = -1,
    progress: bool = True,
) -> Advice:
    """Measure a data set, place it in the four-scenario table, and recommend what to do.

    Three measurements: the size (images per class), how the pretrained network's ImageNet
    head reacts to a sample of the images (its mean top-1 probability, relative to its
    ImageNet accuracy), and a layer sweep (:func:`cnncodes.sweep`: where the useful features
    are). The data set is then "small" or "large" and "similar to" or "different from"
    ImageNet (thresholds: ``LARGE_PER_CLASS``, ``SIMILAR_CONFIDENCE_RATIO``, ``DIFFERENT_GAIN``
    in ``cnncodes._analysis.rules``, each explained there), and the advice follows the guide's cell:
    a linear classifier on the measured best layer (small sets), or fine-tuning with a number
    of blocks to unfreeze and learning rates (large sets). ``Advice.run()`` carries it out.

    Parameters
    ----------
    data : folder, CSV, or a code store (``.h5``)
        Labelled images. A store is swept as it is; the ImageNet head then reads its images
        from the folder it was extracted from, when that still exists.
    backbone, weights, image_size, batch_size, device, num_workers
        As in :func:`cnncodes.extract`; ``image_size`` applies to the sweep (the ImageNet
        head always sees the weights' own input size).
    store : path, optional
        Where the sweep extracts its codes (default: a temporary store).
    cv : int
        Folds of the sweep.
    max_images : int or None
        The sweep probes a stratified sample of at most this many images (all of them when
        None); the size counts every image.
    head_images : int
        Images (spread evenly over the classes) shown to the ImageNet head.
    random_state : int or None
        Seeds the samples and the folds.
    n_jobs : int, optional
        Parallel probe fits.
    progress : bool
        Progress bars.

    Returns
    -------
    Advice
        ``.report()``, ``.scenario``, ``.recommendation``, ``.measurements``, ``.sweep``,
        ``.run(out)``.

    Examples
    --------
    >>> from cnncodes import advise                  # doctest: +SKIP
    >>> advice = advise("flowers/")                  # doctest: +SKIP
    >>> print(advice.report())                       # doctest: +SKIP
    >>> advice.run("model.skops")                    # doctest: +SKIP
    """
    from cnncodes._backbones.registry import get_backbone
    from cnncodes._analysis.sweep import is_store_path, sweep

    t0 = time.perf_counter()
    read = read_labelled(data, backbone=backbone, store=store, image_size=image_size)
    spec_b = get_backbone(read.backbone)
    result = sweep(read.sweep_data, backbone=read.backbone, store=read.store, cv=cv, random_state=random_state,
                   max_images=max_images, weights=weights, image_size=read.image_size, batch_size=batch_size,
                   device=device, num_workers=num_workers, n_jobs=n_jobs, progress=progress)
    weights_id = read.weights_id or result.weights
    notes = read.notes
    head = head_on_sample(read, head_images, random_state, weights_id=weights_id, device=device, notes=notes)
    notes += _sweep_notes(result, read.counts, max_images)
    curve = more_labels(result, random_state, notes)
    m = Measurements(
        n_images=sum(read.counts.values()), class_counts=read.counts, head=head,
        layers=[(s.layer, s.dims, s.mean, s.std) for s in result.layers], gain_std=result.gain_std,
        cv=result.cv, notes=notes, more_labels=curve,
    )
    scenario = place(m)
    return Advice(
        data=str(getattr(data, "path", data)), backbone=read.backbone, weights=weights_id, measurements=m,
        scenario=scenario, recommendation=recommend(m, scenario, [i.alias for i in spec_b.layers]),
        sweep=result, images=read.images, store=result.store, image_size=read.image_size,
        seconds=time.perf_counter() - t0,
        options=_given_options(cv=cv, max_images=max_images, head_images=head_images, weights=weights,
                               random_state=random_state, data_is_store=is_store_path(data)),
    )


def _sweep_notes(result, counts: dict[str, int], max_images) -> list[str]:
    """The sweep's notes, after one saying so when it probed a sample of the images."""
    total = sum(counts.values())
    left_out = sum(counts.get(c, 0) for c in result.left_out)
    sampled = [f"the sweep probed a stratified sample of {result.n_images:,} of the {total:,} images "
               f"(max_images={max_images})"] if result.n_images < total - left_out else []
    return sampled + [f"sweep: {n}" for n in result.notes]


def _given_options(*, cv, max_images, head_images, weights, random_state, data_is_store) -> dict:
    """The advise options that differ from the defaults, as CLI flags, to repeat them."""
    defaults = {"--cv": 5, "--max-images": 5000, "--head-images": HEAD_IMAGES, "--weights": "imagenet",
                "--random-state": 0}
    weights = "random" if weights is None else weights
    given = {"--cv": cv, "--max-images": 0 if max_images is None else max_images,
             "--head-images": head_images, "--random-state": random_state}
    if not data_is_store and isinstance(weights, (str, Path)):  # a store knows its own weights
        given["--weights"] = str(weights)
    return {flag: value for flag, value in given.items()
            if value is not None and value != defaults[flag]}
