"""Learning curve: held-out accuracy against images per class, from repeated training subsets."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnncodes._errors import CnnCodesError, InvalidParameterError
from cnncodes._io import save_figure
from cnncodes._outputs import PNG, check_output
from cnncodes._stats import CONFIDENCE, N_RESAMPLES, Interval, accuracy_intervals, check_resampling

SIZES = (1, 2, 5, 10, 20, 50, "all")
# Accuracy gained per doubling of the images per class, at the end of the curve, above which
# more labels are said to be likely to help (1 point per doubling).
HELPS_PER_DOUBLING = 0.01


@dataclass
class CurvePoint:
    """One size of the curve: its accuracy over the repeats and the interval of their mean.

    ``interval`` bootstraps the test rows (stratified) of the mean correctness over the
    repeats, so it is the uncertainty of the test set; ``scores`` holds each repeat's
    accuracy, whose spread is that of the training draws.
    """

    size: int | str  # images per class asked for, or "all"
    per_class: float  # mean training images per class actually used
    n_train: int
    interval: Interval
    mean_per_class: Interval
    scores: np.ndarray
    correct: np.ndarray = field(repr=False)  # mean correctness over the repeats, per test row

    @property
    def accuracy(self) -> float:
        return self.interval.estimate


@dataclass
class LearningCurve:
    """What :func:`learning_curve` measured, smallest training set first."""

    points: list[CurvePoint]
    layer: str
    classifier: str
    C: float
    repeats: int
    n_test: int
    store: str
    class_names: list[str]
    y_test: np.ndarray = field(repr=False)
    seconds: float = 0.0

    def gain_per_doubling(self) -> Interval | None:
        """Accuracy gained per doubling of images per class between the last two points.

        A paired, stratified bootstrap interval over the test rows (both points are scored
        on the same rows); None for a curve of a single point.
        """
        if len(self.points) < 2:
            return None
        prev, last = self.points[-2], self.points[-1]
        doublings = max(np.log2(last.per_class / prev.per_class), 1e-9)
        d, _ = accuracy_intervals(last.correct - prev.correct, self.y_test, n_resamples=last.interval.n_resamples,
                                  confidence=last.interval.confidence, random_state=0)
        return Interval(d.estimate / doublings, d.low / doublings, d.high / doublings, d.confidence, d.n_resamples)

    def more_labels_help(self) -> tuple[bool, str]:
        """Whether more labels are likely to help, judged from the slope at the end of the curve."""
        g = self.gain_per_doubling()
        if g is None:
            return False, "a curve of one point has no slope; measure more sizes."
        prev, last = self.points[-2], self.points[-1]
        said = (f"from {prev.per_class:g} to {last.per_class:g} images per class the held-out accuracy went "
                f"{prev.accuracy:.3f} -> {last.accuracy:.3f}, {100 * g.estimate:+.1f} points per doubling "
                f"({100 * g.confidence:g} % CI {100 * g.low:+.1f} to {100 * g.high:+.1f})")
        if g.estimate >= HELPS_PER_DOUBLING and g.low > 0:
            return True, f"more labels are likely to help: {said}."
        if g.estimate >= HELPS_PER_DOUBLING:
            return True, f"more labels may help, though the gain is within the noise: {said}."
        return False, (f"more labels are unlikely to help much (the curve has flattened): {said}; "
                       f"try another layer, backbone or fine-tuning instead.")

    def as_dicts(self) -> list[dict]:
        """One dict per point (size, per_class, n_train, accuracy, low, high, std), e.g. for pandas."""
        return [{"size": p.size, "per_class": p.per_class, "n_train": p.n_train, "accuracy": p.accuracy,
                 "low": p.interval.low, "high": p.interval.high, "std": float(np.std(p.scores)),
                 "mean_per_class_accuracy": p.mean_per_class.estimate} for p in self.points]

    def table(self) -> str:
        """The curve as a plain-text table, with the verdict on more labels."""
        level = f"{100 * self.points[0].interval.confidence:g} % CI"
        head = ("per class", "train", "accuracy", level, "± repeats", "mean per-class")
        rows = [head] + [(str(p.size) if p.size == "all" else f"{p.size}",
                          f"{p.n_train}", f"{p.accuracy:.4f}", f"{p.interval.low:.4f} to {p.interval.high:.4f}",
                          f"{np.std(p.scores):.4f}", f"{p.mean_per_class.estimate:.4f}") for p in self.points]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [f"learning curve of {Path(self.store).name} ({self.layer}, {self.classifier} C={self.C:g}): "
                 f"held-out accuracy on {self.n_test} test images, {self.repeats} training draws per size"]
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append(self.more_labels_help()[1])
        return "\n".join(lines)

    def plot(self, path) -> Path:
        """Write the curve (accuracy with its interval against images per class) as a PNG; needs matplotlib."""
        from cnncodes._optional import require_pyplot

        plt = require_pyplot("plotting the learning curve")
        path = Path(path)
        check_output(path, PNG)
        x = [p.per_class for p in self.points]
        y = [p.accuracy for p in self.points]
        err = [[p.accuracy - p.interval.low for p in self.points], [p.interval.high - p.accuracy for p in self.points]]
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        ax.errorbar(x, y, yerr=err, marker="o", capsize=4)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(p.size) if p.size == "all" else f"{p.per_class:g}" for p in self.points])
        ax.set_xlabel("training images per class")
        ax.set_ylabel("held-out accuracy")
        ax.set_title(f"learning curve: {self.layer}, {self.n_test} test images")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_figure(fig, path, dpi=120)
        plt.close(fig)
        return path


def parse_sizes(text: str) -> list:
    """``"1,2,5,all"`` -> ``[1, 2, 5, "all"]`` (the --sizes of ``cnncodes curve``)."""
    out = []
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        try:
            out.append("all" if part.lower() == "all" else int(part))
        except ValueError:
            raise CnnCodesError(f"--sizes: {part!r} is not a number of images per class; give integers "
                                f"and 'all' separated by commas, e.g. 1,2,5,10,20,50,all.") from None
    return out


def _check_sizes(sizes) -> list:
    out = []
    for s in sizes:
        if s == "all" or isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1:
            out.append(s if s == "all" else int(s))
        else:
            raise CnnCodesError(f"sizes are images per class (integers >= 1) or 'all', got {s!r}. "
                                f"Example: sizes=(1, 2, 5, 10, 20, 50, 'all').")
    if not out:
        raise CnnCodesError("sizes is empty; give images per class, e.g. (1, 2, 5, 10, 20, 50, 'all').")
    return sorted(set(out), key=lambda s: float("inf") if s == "all" else s)


def learning_curve(store, sizes=SIZES, *, repeats: int = 5, layer: str | None = None, classifier: str = "logreg",
                   C="auto", test_size: float = 0.25, random_state: int | None = 0, n_resamples: int = N_RESAMPLES,
                   confidence: float = CONFIDENCE, n_jobs: int | None = -1) -> LearningCurve:
    """Held-out accuracy against training images per class: would more labels help?

    The labelled rows are split as :func:`cnncodes.split_store` splits them (stratified,
    identical content on one side); for each size, `repeats` training subsets of that many
    images per class are drawn from the training side (fewer for a class that has fewer),
    a classifier is fitted on each and scored on the same test rows.

    Parameters
    ----------
    store : path or CodeStore
    sizes : sequence of int or "all"
        Training images per class. Sizes at or above the largest class are one point, "all".
    repeats : int
        Training draws per size ("all" is drawn once: every draw would be the same).
    layer : str, optional
        Stored layer (the deepest by default).
    classifier : {"logreg"}
        Logistic regression on standardised codes.
    C : "auto" or float
        Its regularisation. "auto" chooses C once, by cross-validation on the whole training
        side (as :func:`cnncodes.fit` does), and uses it for every size: a subset of one or
        two images per class cannot cross-validate.
    test_size, random_state
        The split, as in :func:`cnncodes.split_store`; `random_state` also seeds the draws
        and the bootstrap.
    n_resamples, confidence
        The intervals, as in :func:`cnncodes.evaluate`.
    n_jobs : int, optional
        Jobs of the cross-validation of C="auto".

    Returns
    -------
    LearningCurve
        ``points`` (:class:`CurvePoint`: accuracy with its interval, per-repeat scores),
        ``table()``, ``plot(path)``, ``more_labels_help()``.

    Examples
    --------
    >>> curve = learning_curve("codes.h5", layer="block5", repeats=5)  # doctest: +SKIP
    >>> print(curve.table())                                         # doctest: +SKIP
    """
    from cnncodes._classify.fit import _as_store, fit, split_store

    t0 = time.perf_counter()
    check_resampling(n_resamples, confidence)
    if classifier != "logreg":
        raise CnnCodesError(f"learning_curve fits classifier='logreg' (a calibrated SVM needs 3 images per "
                            f"class to fit), got {classifier!r}.")
    if not isinstance(repeats, (int, np.integer)) or isinstance(repeats, bool) or repeats < 1:
        raise InvalidParameterError(f"repeats must be an integer >= 1 (training draws per size), got {repeats!r}.")
    sizes = _check_sizes(sizes)
    codes = _as_store(store)
    layer = codes.spec.alias(layer, lambda name: CnnCodesError(
        f"{codes.path.name} holds layers {', '.join(codes.layers)}, not {name!r}."))
    train, test = split_store(codes, test_size=test_size, random_state=random_state)
    X = codes.codes(layer)
    names = np.array(codes.class_names, dtype=object)
    y_all = names[codes.labels].astype(str) if len(names) else np.zeros(len(X), dtype=str)
    Xtr, ytr, Xte, yte = X[train], y_all[train], X[test], y_all[test]
    classes, counts = np.unique(ytr, return_counts=True)
    full = fit(Xtr, ytr, C=C, n_jobs=n_jobs, random_state=random_state)  # the "all" point, and C
    C = full.cnncodes_["fit"]["C"]
    rng = np.random.default_rng(random_state)
    by_class = [np.flatnonzero(ytr == c) for c in classes]
    points, seen = [], set()
    for size in sizes:
        k = None if size == "all" or size >= counts.max() else size
        if k in seen:
            continue
        seen.add(k)
        draws = 1 if k is None else repeats
        correct = np.zeros((draws, len(yte)))
        n_train = 0
        for r in range(draws):
            if k is None:
                model, n_train = full, len(ytr)
            else:
                idx = np.concatenate([rng.choice(g, min(k, len(g)), replace=False) for g in by_class])
                model, n_train = fit(Xtr[idx], ytr[idx], C=C, random_state=random_state), len(idx)
            correct[r] = np.asarray(model.predict(Xte)).astype(str) == yte
        mean = correct.mean(axis=0)
        interval, balanced = accuracy_intervals(mean, yte, n_resamples=n_resamples, confidence=confidence,
                                                random_state=random_state)
        points.append(CurvePoint("all" if k is None else k, n_train / len(classes), n_train, interval, balanced,
                                 correct.mean(axis=1), mean))
    return LearningCurve(points, layer, classifier, float(C), repeats, len(yte), str(codes.path),
                         [str(c) for c in classes], yte, time.perf_counter() - t0)
