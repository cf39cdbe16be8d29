"""The four-scenario table's rules: where measured data sits (`place`) and what to do (`recommend`).

Pure decisions on plain numbers: no torch, no files, no network. `cnncodes._analysis.measure` takes the
measurements, `cnncodes._analysis.advise` puts the two together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from cnncodes._errors import CnnCodesError

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
