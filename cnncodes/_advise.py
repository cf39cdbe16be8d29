"""The four-scenario advisor: measure a data set, place it in the guide's table, recommend, run."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._errors import CnnCodesError
from ._spec import WeightsRef

# --- Where the lines of the four-scenario table are drawn (see `place`) -------------------
#
# Size. A data set is "large" when its classes have a median of at least 500 images. Below
# that, fine-tuning millions of weights on a validation split of a few dozen images per class
# overfits and stops on noise, while a linear probe on frozen codes is already strong; the
# fine-tuning tutorials (cats vs dogs, flowers) work with 700-1,000 images per class. The
# median, not the smallest class, so that one rare class does not decide for the others.
LARGE_PER_CLASS = 500
# How much of the network a large set can afford to retrain: the top three blocks below
# 2,000 images per class, the top four below 10,000, all of it above (one more block when the
# set is different from ImageNet, whose lower features then need to move too). Measured on
# flowers5 (860 images per class, MobileNetV2, held-out 25 %): five runs from block4 (top two
# blocks) reached 0.765-0.806, from block3 (top three) 0.822; MobileNetV2's block5 is
# a single 1x1 convolution, so "the top block" alone barely adapts the features.
UNFREEZE_PER_CLASS = (2_000, 10_000)
# Similarity 1, the ImageNet head. Mean top-1 softmax probability of the full pretrained
# network on a sample of the images, divided by the network's own ImageNet top-1 accuracy
# (for a roughly calibrated network, its mean confidence on ImageNet's validation photos).
# MobileNetV2 (accuracy 0.72) gives the soft 128-px photos of flowers5, whose classes are
# mostly not ImageNet classes, 0.26 (ratio 0.37), and upsampled 8x8 digits 0.11 (ratio
# 0.15). Below a ratio of 0.25 the head no longer recognises the images as anything.
SIMILAR_CONFIDENCE_RATIO = 0.25
# Similarity 2, the layer sweep. An earlier layer that beats the last one by 2 points or
# more (and by more than the fold-to-fold spread of that difference) shows that the top of
# the network has specialised in features this data set cannot use.
DIFFERENT_GAIN = 0.02
# A linear probe this accurate leaves fine-tuning little to win for its cost.
LINEAR_IS_ENOUGH = 0.98
# Fine-tuning settings recommended (AdamW, as cnncodes.finetune uses, and its defaults): the
# pretrained layers 5x slower than the new head on a similar set (keep what ImageNet taught;
# on flowers5 from block4, 2e-4 gave 0.806 and 5e-5 0.789), 2.5x faster than that on a different
# one (the features have further to move). 8 epochs with a cosine schedule: on flowers5 the
# validation loss still fell at epoch 8, and each epoch costs minutes on a CPU.
LR = {"similar": 2e-4, "different": 5e-4}
HEAD_LR = 1e-3
EPOCHS = 8
HEAD_IMAGES = 256


@dataclass
class HeadStats:
    """How the pretrained network's own ImageNet classifier reacts to the images."""

    n_images: int
    confidence: float  # mean top-1 softmax probability
    entropy: float  # mean entropy of the softmax, divided by log(n_classes): 0 sure, 1 clueless
    imagenet_accuracy: float  # the weights' own ImageNet top-1 accuracy
    top_labels: list[tuple[str, float]] = field(default_factory=list)  # most frequent top-1 labels

    @property
    def ratio(self) -> float:
        return self.confidence / self.imagenet_accuracy


@dataclass
class Measurements:
    """Everything the advice is based on; plain numbers, so it can be built by hand.

    ``layers`` lists the sweep as ``(alias, dims, mean accuracy, std)`` shallow to deep;
    ``gain_std`` is the fold-to-fold standard deviation of (best - last) accuracy.
    """

    n_images: int
    class_counts: dict[str, int]
    head: HeadStats | None = None
    layers: list[tuple[str, int, float, float]] = field(default_factory=list)
    gain_std: float = 0.0
    cv: int = 5
    notes: list[str] = field(default_factory=list)  # what could not be measured, and why
    # From the slope of a short learning curve at the best layer: (likely to help, the sentence)
    more_labels: tuple[bool, str] | None = None

    @property
    def n_classes(self) -> int:
        return len(self.class_counts)

    @property
    def per_class_min(self) -> int:
        return min(self.class_counts.values())

    @property
    def per_class_median(self) -> float:
        return float(np.median(list(self.class_counts.values())))

    @property
    def smallest_class(self) -> str:
        return min(self.class_counts, key=lambda c: (self.class_counts[c], c))

    @property
    def best(self):
        return max(self.layers, key=lambda r: r[2]) if self.layers else None

    @property
    def last(self):
        return self.layers[-1] if self.layers else None

    @property
    def gain(self) -> float:
        return self.best[2] - self.last[2] if self.layers else 0.0

    def compact_layer(self):
        """The smallest code within one standard error of the best mean (the 1-SE rule)."""
        best = self.best
        se = best[3] / math.sqrt(max(self.cv, 1))
        close = [r for r in self.layers if r[2] >= best[2] - se]
        return min(close, key=lambda r: (r[1], -r[2]))


@dataclass
class Scenario:
    """A cell of the four-scenario table, with the reasons for each coordinate."""

    size: str  # "small" | "large"
    similarity: str  # "similar" | "different"
    size_reason: str
    similarity_reasons: list[str]

    @property
    def cell(self) -> str:
        return f"{self.size} × {self.similarity} {'to' if self.similarity == 'similar' else 'from'} ImageNet"


@dataclass
class Recommendation:
    """What to do: a linear classifier on one layer, or fine-tuning with these settings."""

    strategy: str  # "linear" | "finetune"
    layer: str  # linear: the layer to fit on; finetune: the best frozen layer (for reference)
    summary: str
    reasons: list[str]
    classifier: str = "logreg"
    unfreeze: str | None = None
    blocks: int = 0  # top blocks unfrozen (fine-tuning)
    lr: float | None = None
    head_lr: float | None = None
    epochs: int | None = None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _num(x: float) -> str:
    """1e-4, 3e-4, 1e-3: learning rates as people write them."""
    return f"{x:.0e}".replace("e-0", "e-").replace("e+0", "e")


def place(m: Measurements) -> Scenario:
    """Place measured data in the four-scenario table (size x similarity to ImageNet).

    Size: "large" when the median class has at least ``LARGE_PER_CLASS`` images. Similarity:
    "different" when either measurement says so (the ImageNet head's relative confidence
    below ``SIMILAR_CONFIDENCE_RATIO``, or an earlier layer beating the last by at least
    ``DIFFERENT_GAIN`` and by more than the fold-to-fold spread); "similar" otherwise.
    """
    med = m.per_class_median
    if med >= LARGE_PER_CLASS:
        size = "large"
        size_reason = (f"large: the median class has {med:g} images (≥ {LARGE_PER_CLASS}), enough "
                       f"to fine-tune the top of the network with a validation split to stop on")
    else:
        size = "small"
        size_reason = (f"small: the median class has {med:g} images (< {LARGE_PER_CLASS}); fine-tuning "
                       f"millions of weights on so few overfits, a linear classifier on codes does not")
    different, reasons = False, []
    if m.head is not None:
        h = m.head
        labels = ", ".join(f"{name} {100 * share:.0f} %" for name, share in h.top_labels[:3])
        if h.ratio < SIMILAR_CONFIDENCE_RATIO:
            different = True
            reasons.append(
                f"ImageNet head → different: it does not recognise the images, mean top-1 probability "
                f"{h.confidence:.2f} on {h.n_images} images, {h.ratio:.2f} × its ImageNet accuracy "
                f"{h.imagenet_accuracy:.2f} (< {SIMILAR_CONFIDENCE_RATIO}); most frequent labels {labels}")
        else:
            reasons.append(
                f"ImageNet head → similar: it recognises the images, mean top-1 probability {h.confidence:.2f} "
                f"on {h.n_images} images, {h.ratio:.2f} × its ImageNet accuracy {h.imagenet_accuracy:.2f} "
                f"(≥ {SIMILAR_CONFIDENCE_RATIO}); most frequent labels {labels}")
    if len(m.layers) >= 2:
        best, last = m.best, m.last
        if best[0] != last[0] and m.gain >= DIFFERENT_GAIN and m.gain > m.gain_std:
            different = True
            reasons.append(
                f"layer sweep → different: an earlier layer is better, {best[0]} reaches {best[2]:.3f} ± {best[3]:.3f}, "
                f"{_pct(m.gain)} points above the last layer {last[0]} ({last[2]:.3f} ± {last[3]:.3f}; "
                f"≥ {_pct(DIFFERENT_GAIN)} points, fold-to-fold spread {_pct(m.gain_std)})")
        elif best[0] == last[0]:
            second = max(m.layers[:-1], key=lambda r: r[2])
            reasons.append(
                f"layer sweep → similar: the last layer is the best, {last[0]} reaches {last[2]:.3f} ± {last[3]:.3f}, "
                f"{_pct(last[2] - second[2])} points above the best earlier layer {second[0]} "
                f"({second[2]:.3f})")
        else:
            # Name the condition(s) that held, never one that did not.
            small, noisy = m.gain < DIFFERENT_GAIN, m.gain <= m.gain_std
            why = " and ".join(
                ([f"less than {_pct(DIFFERENT_GAIN)} points"] if small else [])
                + ([f"within the fold-to-fold spread {_pct(m.gain_std)}"] if noisy else []))
            reasons.append(
                f"layer sweep → similar: no earlier layer is clearly better, {best[0]} ({best[2]:.3f} ± {best[3]:.3f}) is "
                f"{_pct(m.gain)} points above the last layer {last[0]} ({last[2]:.3f}), {why}, so not "
                f"counted as different")
    if not reasons:
        reasons.append("not measured (no ImageNet head, fewer than 2 layers swept): assumed similar")
    elif different and len(reasons) > 1:
        reasons.append("one measurement saying 'different' is enough: the top of the network then "
                       "cannot be relied on as it is")
    return Scenario(size, "different" if different else "similar", size_reason, reasons)


def _unfreeze(per_class: float, similar: bool, aliases: list[str]) -> tuple[str, int]:
    low, high = UNFREEZE_PER_CLASS
    n = 3 if per_class < low else 4 if per_class < high else len(aliases)
    if not similar:
        n += 1
    n = min(n, len(aliases))
    return ("all" if n == len(aliases) else aliases[len(aliases) - n]), n


def recommend(m: Measurements, scenario: Scenario, aliases: list[str]) -> Recommendation:
    """The recommendation for a placed data set; `aliases` are the backbone's blocks, shallow to deep."""
    if not m.layers:
        raise CnnCodesError("no layer sweep to recommend a layer from; sweep at least one layer.")
    best = m.best
    chosen = m.compact_layer()
    why_layer = (f"{chosen[0]} has the highest cross-validated accuracy, {chosen[2]:.3f} ± {chosen[3]:.3f} "
                 f"({m.cv}-fold)" if chosen[0] == best[0] else
                 f"{best[0]} has the highest mean ({best[2]:.3f} ± {best[3]:.3f}) but {chosen[0]} is within "
                 f"one standard error ({chosen[2]:.3f} ± {chosen[3]:.3f}) with {best[1] // max(chosen[1], 1)}× "
                 f"smaller codes ({chosen[1]} vs {best[1]} dims): the one-standard-error rule prefers it")
    similar = scenario.similarity == "similar"
    linear_enough = best[2] >= LINEAR_IS_ENOUGH
    if scenario.size == "small" or linear_enough:
        if scenario.size == "small":
            lead = ("codes from the top of the network" if similar else
                    "codes from an earlier layer, before the network specialises in ImageNet's classes")
            reasons = [f"small data set: {m.per_class_median:g} images in the median class",
                       f"the guide's cell: a linear classifier on {lead}"]
        else:
            reasons = [f"large data set, but the linear probe already reaches {best[2]:.3f} (≥ "
                       f"{LINEAR_IS_ENOUGH}): fine-tuning has at most {_pct(1 - best[2])} points to win"]
        if not similar and chosen[0] == m.last[0]:
            reasons.append(f"the sweep finds no earlier layer better than {chosen[0]} on this data set, "
                           f"so the measured best is used rather than the rule of thumb")
        reasons.append(why_layer)
        return Recommendation(
            "linear", chosen[0],
            f"fit a linear classifier (logistic regression, C by cross-validation) on {chosen[0]} codes; "
            f"expected accuracy {chosen[2]:.3f} ± {chosen[3]:.3f}",
            reasons, classifier="logreg")
    unfreeze, n = _unfreeze(m.per_class_median, similar, aliases)
    lr = LR[scenario.similarity]
    what = "the whole network" if unfreeze == "all" else (
        f"the top block of the network ({unfreeze})" if n == 1
        else f"the top {n} blocks of the network (from {unfreeze})")
    low, high = UNFREEZE_PER_CLASS
    reasons = [
        f"large data set: {m.per_class_median:g} images in the median class",
        "the guide's cell: " + ("fine-tune with a small learning rate, as much of the network as the "
                                "images per class allow" if similar else
                                "fine-tune from ImageNet weights (still better than from scratch), deeper "
                                "and faster than a similar set"),
        f"unfreeze {what}: {m.per_class_median:g} images per class "
        + (f"(< {low:,}: the top three blocks; < {high:,}: four; more: all)" if similar else
           f"(< {low:,}: the top three blocks, < {high:,}: four, more: all; one more because the set "
           f"is different from ImageNet)"),
        f"learning rate {_num(lr)} for the pretrained layers, {_num(HEAD_LR)} for the new head (AdamW): "
        + (f"{HEAD_LR / lr:g}× slower, to keep what ImageNet taught" if similar else
           f"{lr / LR['similar']:g}× faster than for a similar set, as the features have further to move"),
        f"start from the linear probe (two-stage): the best frozen layer {best[0]} reaches "
        f"{best[2]:.3f} ± {best[3]:.3f}; fine-tuning should beat that",
    ]
    return Recommendation(
        "finetune", best[0],
        f"fine-tune {what}, lr {_num(lr)} (head {_num(HEAD_LR)}), up to {EPOCHS} epochs with "
        f"early stopping; beat the linear probe's {best[2]:.3f}",
        reasons, unfreeze=unfreeze, blocks=n, lr=lr, head_lr=HEAD_LR, epochs=EPOCHS)


# ---------------------------------------------------------------------------- measuring


def _preprocess_for(spec_b, weights_id: str, image_size=None):
    from ._backbones import weights_enum
    from ._images import Preprocess

    return Preprocess.from_weights(weights_enum(spec_b)[weights_id], image_size)


def imagenet_head(paths, *, backbone: str = "mobilenet_v2", weights="imagenet", batch_size: int = 32,
                  device="auto") -> HeadStats:
    """Run the full pretrained network, ImageNet head included, on images; summarise its softmax.

    The images are preprocessed as the weights were trained (their own resize and crop, 224
    px for ImageNet weights), whatever image size codes are extracted at: the question is
    whether the network, as trained, recognises them. Images that cannot be decoded are
    skipped.

    Parameters
    ----------
    paths : list of paths, URLs or source items
    backbone : str
    weights : str
        ImageNet weights of torchvision (``"imagenet"``, ``"DEFAULT"``, a weights name).

    Returns
    -------
    HeadStats
    """
    import torch

    from ._accel import resolve_device
    from ._backbones import get_backbone, weights_enum
    from ._images import ImageDecodeError, decode
    from ._sources import read_bytes
    from ._weights import load_model, resolve

    spec_b = get_backbone(backbone)
    w = resolve(spec_b, weights)
    members = weights_enum(spec_b).__members__
    if w.id not in members:
        raise CnnCodesError(f"the ImageNet head needs torchvision ImageNet weights, got {w.id!r}; "
                            f"use weights='imagenet'.")
    member = members[w.id]
    prep = _preprocess_for(spec_b, w.id)
    dev = resolve_device(device)
    model = load_model(spec_b, w).to(dev).eval()
    categories = member.meta["categories"]
    probs = []
    batch = []

    def flush():
        with torch.inference_mode():
            x = prep.normalize(torch.stack(batch).to(dev))
            probs.append(model(x).float().softmax(dim=1).cpu())
        batch.clear()

    for path in paths:
        try:
            batch.append(decode(read_bytes(path), prep))
        except (OSError, ImageDecodeError):
            continue
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not probs:
        raise CnnCodesError("none of the sampled images could be decoded for the ImageNet head.")
    p = torch.cat(probs)
    top = p.max(dim=1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=1) / math.log(p.shape[1])
    counts = Counter(top.indices.tolist()).most_common(5)
    return HeadStats(
        n_images=int(p.shape[0]), confidence=float(top.values.mean()), entropy=float(entropy.mean()),
        imagenet_accuracy=float(member.meta["_metrics"]["ImageNet-1K"]["acc@1"]) / 100.0,
        top_labels=[(categories[i], c / p.shape[0]) for i, c in counts],
    )


def _stratified(paths_by_class: dict[str, list[str]], n: int, random_state) -> list[str]:
    """Up to `n` paths, as evenly spread over the classes as their sizes allow."""
    rng = np.random.default_rng(random_state)
    pools = {c: [ps[i] for i in rng.permutation(len(ps))] for c, ps in sorted(paths_by_class.items())}
    out, k = [], 0
    while len(out) < n and any(k < len(ps) for ps in pools.values()):
        for ps in pools.values():
            if k < len(ps) and len(out) < n:
                out.append(ps[k])
        k += 1
    return out


# ---------------------------------------------------------------------------- the advice


def _is_temporary(path) -> bool:
    from ._transformer import _session_cache

    return Path(path).resolve().parent == _session_cache().resolve()


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
        from ._backbones import get_backbone

        r = self.recommendation
        data = self.images if isinstance(self.images, (str, Path)) else "DATA"
        size = "" if self.image_size is None else f", image_size={self.image_size}"
        size_cli = "" if self.image_size is None else f" --image-size {self.image_size}"
        # A store the user named (or gave as data) holds every swept layer already.
        kept = self.store if self.store and not _is_temporary(self.store) else None
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
        from ._extract import extract
        from ._fit import fit
        from ._model import save
        from ._sources import read_source
        from ._store import CodeStore

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
        from ._weights import _IMAGENET_MEMBER, IMAGENET

        arg = store.spec.weights.extract_arg()
        return IMAGENET if arg == _IMAGENET_MEMBER else arg

    def _score(self, layer: str) -> str:
        for a, _, mean, std in self.measurements.layers:
            if a == layer:
                return f"{mean:.3f} ± {std:.3f}"
        return "n/a"

    def _run_finetune(self, out: Path, progress, n_jobs) -> AdviceRun:
        from ._backbones import get_backbone
        from ._store import CodeStore

        try:
            from .finetuning import finetune
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
    in ``cnncodes._advise``, each explained there), and the advice follows the guide's cell:
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
    from ._backbones import get_backbone
    from ._sources import read_source
    from ._store import CodeStore
    from ._sweep import is_store_path, sweep

    t0 = time.perf_counter()
    notes = []
    images = None
    if is_store_path(data):
        codes = data if isinstance(data, CodeStore) else CodeStore(data)
        backbone = codes.backbone
        names = codes.class_names
        lab = codes.labels[codes.labels >= 0]
        counts = {names[c]: int(n) for c, n in zip(*np.unique(lab, return_counts=True))}
        by_class: dict[str, list[str]] = {}
        root = Path(str(codes.attrs.get("data_root", "")))
        if codes.attrs.get("source_kind") == "class-folders" and root.is_dir():
            images = str(root)
            for rid, c in zip(codes.ids, codes.labels):
                if c >= 0 and (root / rid).is_file():
                    by_class.setdefault(names[c], []).append(str(root / rid))
        else:
            notes.append(f"the images of {codes.path.name} are not at hand ({root or 'unknown folder'}), so "
                         f"the ImageNet head was not run")
        weights_id = codes.spec.weights.id
        sweep_data, store_path = codes, None
        crop = codes.spec.preprocessing.crop_size
        if codes.spec.weights.is_torchvision \
                and crop != _preprocess_for(get_backbone(backbone), weights_id).crop_size:
            image_size = crop  # fine-tuning on the store's images must match its codes (init_head)
    else:
        src = read_source(data)
        labelled = [it for it in src.items if it.label is not None]
        by_class = {}
        for it in labelled:
            by_class.setdefault(it.label, []).append(it)
        counts = {c: len(ps) for c, ps in sorted(by_class.items())}
        images = data
        weights_id = None
        sweep_data, store_path = data, store
    if not counts:
        raise CnnCodesError(f"{data} has no labelled images. Check that the folder has one subfolder "
                            f"per class (or that the CSV has a label column).")
    spec_b = get_backbone(backbone)
    result = sweep(sweep_data, backbone=backbone, store=store_path, cv=cv, random_state=random_state,
                   max_images=max_images, weights=weights, image_size=image_size, batch_size=batch_size,
                   device=device, num_workers=num_workers, n_jobs=n_jobs, progress=progress)
    weights_id = weights_id or result.weights
    head = None
    if by_class:
        if not WeightsRef.from_id(weights_id).is_torchvision:
            notes.append(f"weights {weights_id} have no ImageNet head to ask, so the similarity rests on "
                         f"the layer sweep")
        else:
            sample = _stratified(by_class, head_images, random_state)
            head = imagenet_head(sample, backbone=backbone, weights=weights_id, device=device)
    left_out = sum(counts.get(c, 0) for c in result.left_out)
    if result.n_images < sum(counts.values()) - left_out:
        notes.append(f"the sweep probed a stratified sample of {result.n_images:,} of the "
                     f"{sum(counts.values()):,} images (max_images={max_images})")
    notes += [f"sweep: {n}" for n in result.notes]
    more_labels = _more_labels(result, random_state, notes)
    m = Measurements(
        n_images=sum(counts.values()), class_counts=counts, head=head,
        layers=[(s.layer, s.dims, s.mean, s.std) for s in result.layers], gain_std=result.gain_std,
        cv=result.cv, notes=notes, more_labels=more_labels,
    )
    scenario = place(m)
    rec = recommend(m, scenario, [i.alias for i in spec_b.layers])
    return Advice(
        data=str(getattr(data, "path", data)), backbone=backbone, weights=weights_id, measurements=m,
        scenario=scenario, recommendation=rec, sweep=result, images=images, store=result.store,
        image_size=image_size, seconds=time.perf_counter() - t0,
        options=_given_options(cv=cv, max_images=max_images, head_images=head_images, weights=weights,
                               random_state=random_state, data_is_store=is_store_path(data)),
    )


def _more_labels(result, random_state, notes) -> tuple[bool, str] | None:
    """Would more labels help? The slope of a two-point learning curve at the sweep's best layer.

    Half the training images per class against all of them, 3 draws, with the C the sweep
    chose (no cross-validation again): a few fits.
    """
    from ._curve import learning_curve
    from ._store import CodeStore

    best = result.best
    store = CodeStore(result.store)
    counts = np.bincount(store.labels[store.labels >= 0])
    half = max(1, int(0.75 * counts[counts > 0].min()) // 2)  # half of the smallest class's training part
    try:
        curve = learning_curve(store, sizes=(half, "all"), repeats=3, layer=best.layer,
                               C=float(np.median(best.Cs)), random_state=random_state, n_jobs=1)
    except CnnCodesError as exc:
        notes.append(f"no learning curve: {exc}")
        return None
    return curve.more_labels_help()


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
