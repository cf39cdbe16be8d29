"""What a model gives back (Prediction, Predictions, Evaluation) and the interface every kind
of model implements for predict, evaluate, report, compare, export and serve."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnncodes._errors import CnnCodesError, FailedImagesError
from cnncodes._io import save_figure
from cnncodes._outputs import PNG, check_output
from cnncodes._stats import CONFIDENCE, N_RESAMPLES, Interval, accuracy_intervals


class PhotoModel:
    """The interface of every kind of model that classifies photos.

    A model on codes (:class:`cnncodes.Model`: a backbone's codes and a scikit-learn
    estimator) and a fine-tuned network (:class:`cnncodes.FineTunedModel`) both give
    `classes`, `path`, `train_sha256` (the content it was trained on, left out of an
    evaluation), `reads_codes` (True when its network ends in codes that an estimator
    classifies, False when the network gives the class scores itself), and the two methods
    below, which :func:`cnncodes.predict` and :func:`cnncodes.evaluate` call.
    """

    reads_codes: bool

    def predict_photos(self, images, *, top_k: int = 1, store=None, progress: bool = False,
                       **run) -> Predictions:
        """Top-k labels of photos (see :func:`cnncodes.predict`); `run`: batch_size, device, num_workers."""
        raise NotImplementedError

    def evaluate(self, data, *, progress: bool = False, n_resamples: int = N_RESAMPLES,
                 confidence: float = CONFIDENCE, random_state=0, **run) -> Evaluation:
        """The `Evaluation` on `data`, leaving out the content it was trained on (see :func:`cnncodes.evaluate`)."""
        raise NotImplementedError


@dataclass
class Prediction:
    """Top-k labels with probabilities for one image."""

    id: str
    labels: list[str]
    probabilities: list[float]


class Predictions(list):
    """The `Prediction` of each photo that could be classified, a list as before.

    ``failures`` lists the photos that could not be read or decoded as ``(id, reason)``
    pairs, so a caller can tell "two predictions" from "two of four photos classified".
    """

    def __init__(self, predictions=(), failures=()):
        super().__init__(predictions)
        self.failures: list[tuple[str, str]] = [(str(i), str(why)) for i, why in failures]


def all_failed_error(failures) -> FailedImagesError:
    """The error for a prediction in which every photo failed, naming each with its reason."""
    lines = [f"  {rid}: {why}" for rid, why in failures[:20]]
    if len(failures) > 20:
        lines.append(f"  ... and {len(failures) - 20} more (FailedImagesError.failures).")
    return FailedImagesError(
        f"every photo failed ({len(failures)}), so there is nothing to predict:\n" + "\n".join(lines)
        + "\nGive readable image files (JPEG, PNG, ...).", list(failures))


@dataclass
class Evaluation:
    """Accuracy with its interval, per-class precision/recall/F1 and the confusion matrix.

    ``interval`` and ``mean_per_class`` are the accuracy and the mean per-class accuracy
    (balanced accuracy) with their 95 % stratified bootstrap confidence intervals
    (:class:`cnncodes._stats.Interval`: ``estimate``, ``low``, ``high``). ``per_class`` holds
    one dict per class (class, precision, recall, f1, support). ``ids``, ``y_true``,
    ``y_pred`` and ``proba`` (columns in the order of ``proba_classes``) are per test row,
    for :func:`compare`, the gallery of :meth:`to_html` and your own analyses.
    """

    accuracy: float
    classes: list[str]
    confusion: np.ndarray
    report: str
    n: int
    on: str = ""
    extra: dict = field(default_factory=dict)
    interval: Interval | None = None
    mean_per_class: Interval | None = None
    per_class: list[dict] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    y_true: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str), repr=False)
    y_pred: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str), repr=False)
    proba: np.ndarray | None = field(default=None, repr=False)
    proba_classes: list[str] = field(default_factory=list)
    root: str | None = None  # the folder the ids are relative to, for thumbnails
    provenance: dict = field(default_factory=dict)

    @property
    def correct(self) -> np.ndarray:
        """1 where the prediction is right, 0 where it is wrong, per test row."""
        return (np.asarray(self.y_pred) == np.asarray(self.y_true)).astype(np.int8)

    def confidences(self) -> np.ndarray | None:
        """The probability the model gave its predicted class, per test row (None without probabilities)."""
        if self.proba is None or not len(self.proba_classes):
            return None
        col = {c: j for j, c in enumerate(self.proba_classes)}
        return self.proba[np.arange(len(self.y_pred)), [col[str(p)] for p in self.y_pred]]

    def gallery(self, k: int = 12) -> dict[str, list[dict]]:
        """The `k` most confident mistakes and the `k` least confident correct predictions.

        Returns ``{"mistakes": [...], "unsure": [...]}``, each row a dict of id, true,
        predicted and probability (of the predicted class); empty lists without probabilities.
        """
        conf = self.confidences()
        if conf is None:
            return {"mistakes": [], "unsure": []}
        right = self.correct.astype(bool)
        wrong = np.flatnonzero(~right)
        wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:k]
        unsure = np.flatnonzero(right)
        unsure = unsure[np.argsort(conf[unsure], kind="stable")][:k]

        def rows(idx):
            return [{"id": str(self.ids[i]), "true": str(self.y_true[i]), "predicted": str(self.y_pred[i]),
                     "probability": float(conf[i])} for i in idx]

        return {"mistakes": rows(wrong), "unsure": rows(unsure)}

    def summary(self) -> str:
        width = max(len(c) for c in self.classes)
        head = " " * (width + 2) + " ".join(f"{c[:8]:>8}" for c in self.classes)
        rows = [f"{c:<{width}}  " + " ".join(f"{v:>8d}" for v in row)
                for c, row in zip(self.classes, self.confusion)]
        lines = [f"accuracy {self.accuracy:.4f} on {self.n} images ({self.on})"]
        if self.interval is not None:
            i, b = self.interval, self.mean_per_class
            lines += [f"  {100 * i.confidence:g} % confidence interval {i.low:.4f} to {i.high:.4f} "
                      f"(stratified bootstrap of the test rows, {i.n_resamples} resamples)",
                      f"mean per-class accuracy {b.format()}"]
        return "\n".join([
            *lines, "",
            self.report.rstrip(), "",
            "confusion matrix (rows: true, columns: predicted)", head, *rows,
        ])

    def to_html(self, path=None, *, curve=None, sweep=None, thumbnails: int = 12, title: str | None = None):
        """One self-contained HTML report of this evaluation (see :func:`cnncodes.report`).

        Returns the HTML text, and writes it to `path` when given (refusing to overwrite a
        file of another kind). `curve` (a :class:`cnncodes.LearningCurve`) and `sweep` (a
        :class:`cnncodes.SweepResult`) add their sections.
        """
        from cnncodes._analysis.render import render, write_html

        html = render(self, curve=curve, sweep=sweep, thumbnails=thumbnails, title=title)
        if path is not None:
            write_html(html, path)
        return html

    def plot(self, path) -> Path:
        """Write the confusion matrix as a PNG (needs matplotlib: pip install 'cnncodes[plot]')."""
        from cnncodes._optional import require_pyplot

        plt = require_pyplot("plotting the confusion matrix")
        check_output(path, PNG)
        from sklearn.metrics import ConfusionMatrixDisplay

        fig, ax = plt.subplots(figsize=(1.2 * len(self.classes) + 2, 1.2 * len(self.classes) + 1.5))
        ConfusionMatrixDisplay(self.confusion, display_labels=self.classes).plot(ax=ax, colorbar=False)
        ax.set_title(f"accuracy {self.accuracy:.3f} on {self.n} images")
        fig.tight_layout()
        save_figure(fig, path, dpi=120)
        plt.close(fig)
        return Path(path)


def evaluation(y, pred, model_classes, on: str, *, ids=None, proba=None, proba_classes=None, root=None,
               provenance=None, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
               random_state: int | None = 0) -> Evaluation:
    """The `Evaluation` of predicted against true class names.

    Rows of classes the model was not trained on cannot be predicted right: they are left
    out with a warning naming those classes, and the evaluation is refused when no class of
    the data is one the model knows. `ids`, `proba` (columns in `proba_classes` order) and
    `root` are kept per row for comparisons and the report's gallery; the intervals are
    stratified by true class.
    """
    from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support

    y, pred = np.asarray(y).astype(str), np.asarray(pred).astype(str)
    ids = np.asarray([str(i) for i in ids] if ids is not None else [f"row {k}" for k in range(len(y))], dtype=object)
    known = np.isin(y, list(model_classes))
    if not known.all():
        unknown = sorted(set(y[~known]))
        if not known.any():
            raise CnnCodesError(
                f"no class of the data is one the model knows: the data has {', '.join(unknown)}; "
                f"the model was trained on {', '.join(model_classes)}. Evaluate it on labelled "
                f"images of those classes.")
        import warnings

        warnings.warn(
            f"{int((~known).sum())} rows of classes the model was not trained on are left out of "
            f"the evaluation: {', '.join(unknown)} (the model knows {', '.join(model_classes)}).",
            UserWarning, stacklevel=3)
        on += f"; {int((~known).sum())} rows of unknown classes left out ({', '.join(unknown)})"
        y, pred, ids = y[known], pred[known], ids[known]
        proba = None if proba is None else np.asarray(proba)[known]
    classes = sorted(set(model_classes) | set(y))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=classes, zero_division=0)
    interval, balanced = accuracy_intervals((pred == y).astype(np.float64), y, n_resamples=n_resamples,
                                            confidence=confidence, random_state=random_state)
    return Evaluation(
        accuracy=float((pred == y).mean()),
        classes=classes,
        confusion=confusion_matrix(y, pred, labels=classes),
        report=classification_report(y, pred, labels=classes, digits=3, zero_division=0),
        n=int(len(y)),
        on=on,
        interval=interval,
        mean_per_class=balanced,
        per_class=[{"class": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
                   for c, p, r, f, n in zip(classes, precision, recall, f1, support)],
        ids=list(ids),
        y_true=y,
        y_pred=pred,
        proba=None if proba is None else np.asarray(proba, dtype=np.float64),
        proba_classes=[str(c) for c in (proba_classes if proba_classes is not None else model_classes)],
        root=None if root is None else str(root),
        provenance=dict(provenance or {}),
    )
