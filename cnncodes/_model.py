"""Model files that load without running code (skops), prediction on photos, evaluation."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._errors import CnnCodesError, FailedImagesError, StoreMismatchError
from ._outputs import MODEL as MODEL_FILE
from ._outputs import PNG, check_output
from ._spec import ExtractorSpec
from ._store import CodeStore

MODEL_FORMAT = "cnncodes.model"
MODEL_VERSION = 1
# Types cnncodes writes besides the public scikit-learn ones skops trusts by itself.
TRUSTED = [
    "cnncodes._fit.CodeNormalizer",
    "cnncodes._knn.FaissKNNClassifier",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
]


class ModelFileError(CnnCodesError):
    """A model file cannot be read, or is not trusted."""


def save(model, path, *, extractor: ExtractorSpec | dict | None = None) -> Path:
    """Write a fitted model and what it needs to classify new photos to a ``.skops`` file.

    The file bundles the estimator, the extractor spec (backbone, weights id and sha256,
    layer, pooling, preprocessing), the class names and the ids it was trained on. It is a
    skops file: :func:`load` rebuilds it without unpickling, so a file from a stranger
    cannot run code.
    """
    import skops.io as sio

    meta = dict(getattr(model, "cnncodes_", {}) or {})
    extractor = extractor or meta.get("extractor")
    # The same dict layout as every earlier version wrote (a skops file holds no cnncodes types).
    extractor = None if extractor is None else ExtractorSpec.from_json(extractor).to_model_json()
    bundle = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_VERSION,
        "estimator": model,
        "classes": [str(c) for c in getattr(model, "classes_", [])],
        "extractor": extractor,
        "fit": meta.get("fit"),
        "train_ids": meta.get("train_ids"),
        "train_sha256": meta.get("train_sha256"),
        "store": meta.get("store"),
    }
    path = Path(path)
    check_output(path, MODEL_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    sio.dump(bundle, path)
    return path


@dataclass
class Model:
    """A loaded model file: the estimator and what it was made from.

    ``extractor`` is the spec that made its training codes (one layer), None for a model
    fitted on arrays.
    """

    estimator: object
    classes: list[str]
    extractor: ExtractorSpec | None
    fit: dict | None
    train_ids: list[str] | None
    path: str
    train_sha256: list[str] | None = None

    def predict_proba(self, X):
        return self.estimator.predict_proba(X)


def load(path, *, trusted=()) -> Model:
    """Read a model file written by :func:`save`, refusing any type not known to be safe.

    A ``.pt`` checkpoint written by :func:`cnncodes.finetune` loads too (with
    ``torch.load(weights_only=True)``), as a `FineTunedModel` for :func:`predict` and
    :func:`evaluate`.

    Parameters
    ----------
    trusted : sequence of str
        Extra type names (as listed in the refusal message) to allow. Only for files whose
        origin you trust: allowing a type lets the file construct it.
    """
    import skops.io as sio
    from skops.io.exceptions import UntrustedTypesFoundException

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {str(path)!r} does not exist. Make one with `cnncodes fit`.")
    from ._finetune import is_checkpoint_file, load_finetuned

    if path.suffix.lower() in (".pt", ".pth") or is_checkpoint_file(path):  # from `cnncodes finetune`
        from ._errors import WeightsError

        try:
            return load_finetuned(path)
        except WeightsError as exc:
            raise ModelFileError(str(exc)) from None
    try:
        untrusted = sio.get_untrusted_types(file=path)
        refused = [t for t in untrusted if t not in TRUSTED and t not in trusted]
        if refused:
            raise ModelFileError(
                f"{path.name} contains types cnncodes does not trust: {', '.join(refused)}. "
                f"Loading it could run code. If you trust its origin, pass "
                f"trusted={refused!r} to cnncodes.load."
            )
        bundle = sio.load(path, trusted=[t for t in untrusted if t not in refused])
    except UntrustedTypesFoundException as exc:
        raise ModelFileError(f"{path.name} was refused: {exc}") from None
    except ModelFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file
        raise ModelFileError(f"{str(path)!r} is not a readable cnncodes model file ({type(exc).__name__}: {exc}).") from None
    if not isinstance(bundle, dict) or bundle.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{str(path)!r} is a skops file but not a cnncodes model.")
    if bundle["format_version"] > MODEL_VERSION:
        raise ModelFileError(f"{path.name} has model format {bundle['format_version']}; this cnncodes "
                             f"reads up to {MODEL_VERSION}. Upgrade cnncodes.")
    return Model(bundle["estimator"], bundle["classes"], _extractor(bundle["extractor"]),
                 bundle["fit"], bundle["train_ids"], str(path), bundle.get("train_sha256"))


def _as_model(model) -> Model:
    from ._finetune import FineTunedModel

    if isinstance(model, (Model, FineTunedModel)):
        return model
    if isinstance(model, (str, Path)):
        return load(model)
    meta = getattr(model, "cnncodes_", {}) or {}
    return Model(model, [str(c) for c in model.classes_], _extractor(meta.get("extractor")),
                 meta.get("fit"), meta.get("train_ids"), "", meta.get("train_sha256"))


def _extractor(spec) -> ExtractorSpec | None:
    return None if spec is None else ExtractorSpec.from_json(spec)


@contextmanager
def _codes_for(model: Model, source, store=None, progress=False, run=None):
    """Extract `source` with the model's extractor spec into `store`; yield (store, layer, failures).

    `failures` lists the (id, reason) of the photos that could not be read or decoded.

    Without `store` the codes go to a temporary folder that is removed on leaving the block.
    `run` holds settings of the extraction run (batch_size, device, num_workers) that do not
    change the codes.
    """
    from ._extract import extract

    spec = model.extractor
    if spec is None:
        raise CnnCodesError("this model was fitted on arrays, not on a code store, so it does not "
                            "know how to extract codes; fit it from a store made by `cnncodes extract`.")
    tmp = None if store else tempfile.mkdtemp(prefix="cnncodes-predict-")
    out = Path(store) if store else Path(tmp) / "codes.h5"
    layer = list(spec.layers)  # one layer, or several concatenated
    if store and Path(store).is_file():
        # Checked here, not only by extract, for advice that fits predict: it has no -o.
        CodeStore(store).spec.check(spec, Path(store).name, advice=PREDICT_STORE_ADVICE)
    try:
        result = extract(source, out=out, **spec.extract_kwargs(), **(run or {}), progress=progress)
        yield CodeStore(out), layer, list(result.failures) + list(result.known_failures)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# What to do when a store's settings differ from a model's: evaluate and predict have no -o.
EVALUATE_ADVICE = ("evaluate on a store extracted with the model's settings, or give a folder (or CSV) "
                   "of labelled photos, which are then extracted with the model's settings.")
PREDICT_STORE_ADVICE = ("give another store file (--store other.h5; store= in Python), which is then made "
                        "with the model's settings, or leave --store out to use a temporary one.")


def _check_store(model: Model, store: CodeStore) -> str:
    spec = model.extractor
    layers = list(spec.layers)
    for layer in layers:
        if layer not in store.spec.layers:
            raise StoreMismatchError(
                f"{store.path.name} holds layers {', '.join(store.layers)}; the model needs "
                f"{layer} ({spec.layers[layer]}). Extract that layer, or pass a folder of photos."
            )
    store.spec.narrow(layers).check(spec, store.path.name, advice=EVALUATE_ADVICE)
    return layers


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


def _run_options(batch_size, device, num_workers) -> dict:
    """The extraction settings a caller gave: run settings that leave the codes unchanged."""
    given = dict(batch_size=batch_size, device=device, num_workers=num_workers)
    return {k: v for k, v in given.items() if v is not None and v != "auto"}


def predict(model, images, *, top_k: int = 1, store=None, progress: bool = False, batch_size: int | None = None,
            device="auto", num_workers="auto") -> Predictions:
    """Classify photos with a fitted model: extract them with its spec, return top-k.

    Parameters
    ----------
    model : path, Model, fitted estimator from :func:`fit`, or a fine-tuned network
        A ``.skops`` file or model classifies codes it extracts first; a ``.pt`` checkpoint
        from :func:`cnncodes.finetune` (or its loaded `FineTunedModel`) classifies the
        photos with the network itself.
    images : folder, CSV, list of paths
    store : path, optional
        A store to extract into (and reuse on the next call); a temporary one by default.
        Not for a fine-tuned network, which needs no codes.
    top_k : int
        Labels per photo, at least 1 (fewer when the model knows fewer classes).
    batch_size, device, num_workers
        As in :func:`cnncodes.extract` (for a fine-tuned network, as in its
        ``predict_images``); the default batch size is that function's own.

    Returns
    -------
    Predictions
        A list with one `Prediction` per photo that could be classified; its ``failures``
        attribute lists the others as ``(id, reason)`` pairs.

    Raises
    ------
    FailedImagesError
        When every photo failed (its ``failures`` lists them).
    """
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1:
        raise CnnCodesError(f"top_k must be an integer >= 1, got {top_k!r}.")
    run = _run_options(batch_size, device, num_workers)
    model = _as_model(model)
    from ._finetune import FineTunedModel, predict_finetuned

    if isinstance(model, FineTunedModel):
        if store is not None:
            raise CnnCodesError("store= is for models on codes; a fine-tuned network classifies the photos "
                                "directly. Leave store out.")
        return predict_finetuned(model, images, top_k=top_k, progress=progress, **run)
    from ._fit import layer_codes

    with _codes_for(model, images, store, progress, run) as (codes, layer, failures):
        X, ids = layer_codes(codes, layer), codes.ids
    if len(ids) == 0:
        if failures:
            raise all_failed_error(failures)
        raise CnnCodesError(f"no photos to predict in {images!r}; give a folder, CSV or list of image files.")
    proba = model.predict_proba(X)
    classes = [str(c) for c in model.estimator.classes_]  # plain str, not np.str_
    k = max(1, min(top_k, len(classes)))
    order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    return Predictions([Prediction(str(rid), [classes[j] for j in o], [float(p) for p in proba[i, o]])
                        for i, (rid, o) in enumerate(zip(ids, order))], failures)


@dataclass
class Evaluation:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix of a model on a set."""

    accuracy: float
    classes: list[str]
    confusion: np.ndarray
    report: str
    n: int
    on: str = ""
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        width = max(len(c) for c in self.classes)
        head = " " * (width + 2) + " ".join(f"{c[:8]:>8}" for c in self.classes)
        rows = [f"{c:<{width}}  " + " ".join(f"{v:>8d}" for v in row)
                for c, row in zip(self.classes, self.confusion)]
        return "\n".join([
            f"accuracy {self.accuracy:.4f} on {self.n} images ({self.on})", "",
            self.report.rstrip(), "",
            "confusion matrix (rows: true, columns: predicted)", head, *rows,
        ])

    def plot(self, path) -> Path:
        """Write the confusion matrix as a PNG (needs matplotlib: pip install 'cnncodes[plot]')."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise CnnCodesError("plotting needs matplotlib: pip install 'cnncodes[plot]'.") from None
        check_output(path, PNG)
        from sklearn.metrics import ConfusionMatrixDisplay

        fig, ax = plt.subplots(figsize=(1.2 * len(self.classes) + 2, 1.2 * len(self.classes) + 1.5))
        ConfusionMatrixDisplay(self.confusion, display_labels=self.classes).plot(ax=ax, colorbar=False)
        ax.set_title(f"accuracy {self.accuracy:.3f} on {self.n} images")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)


def evaluate(model, data, *, progress: bool = False, batch_size: int | None = None, device="auto",
             num_workers="auto") -> Evaluation:
    """Evaluate a model on a code store or a labelled folder, on content it was not trained on.

    Rows whose image content (sha256) the model saw in training are left out, so on the
    store it was fitted from (with ``rows=`` or ``--test-size``) the figure is a held-out
    one, and a copy of a training photo elsewhere cannot inflate it.

    `batch_size`, `device` and `num_workers` set the extraction of a folder, as in
    :func:`predict`; a store is read as it is.
    """
    run = _run_options(batch_size, device, num_workers)
    model = _as_model(model)
    from ._finetune import FineTunedModel, evaluate_finetuned

    if isinstance(model, FineTunedModel):  # a network from `cnncodes finetune`: on photos only
        return evaluate_finetuned(model, data, progress=progress, **run)
    path = Path(data.path if isinstance(data, CodeStore) else data)
    if isinstance(data, CodeStore) or path.is_file() and path.suffix in (".h5", ".hdf5"):
        store = data if isinstance(data, CodeStore) else CodeStore(path)
        return _evaluate_store(model, store, _check_store(model, store), path,
                               f"all labelled rows of {path.name}")
    with _codes_for(model, data, None, progress, run) as (store, layer, _):
        return _evaluate_store(model, store, layer, path, f"all labelled images of {path}")


def _evaluate_store(model: Model, store: CodeStore, layer: list, path: Path, on: str) -> Evaluation:
    labels = store.labels
    rows = np.flatnonzero(labels >= 0)
    if model.train_sha256:
        # Leave out every image whose content the model was trained on, whatever its name
        # or store: the figure is then a held-out one.
        seen = set(model.train_sha256)
        shas = store.sha256
        held = np.array([r for r in rows if shas[r] not in seen], dtype=int)
        if len(held) < len(rows):
            on = f"{len(held)} held-out rows of {path.name} (content not used in training)"
        rows = held
    if len(rows) == 0:
        raise CnnCodesError(f"nothing to evaluate in {path}: no labelled rows outside the training set.")
    names = np.array(store.class_names, dtype=object)
    y = names[labels[rows]].astype(str)
    from ._fit import layer_codes

    pred = np.asarray(model.estimator.predict(layer_codes(store, layer)[rows])).astype(str)
    return evaluation(y, pred, model.classes, on)


def evaluation(y, pred, model_classes, on: str) -> Evaluation:
    """The `Evaluation` of predicted against true class names.

    Rows of classes the model was not trained on cannot be predicted right: they are left
    out with a warning naming those classes, and the evaluation is refused when no class of
    the data is one the model knows.
    """
    from sklearn.metrics import classification_report, confusion_matrix

    y, pred = np.asarray(y).astype(str), np.asarray(pred).astype(str)
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
        y, pred = y[known], pred[known]
    classes = sorted(set(model_classes) | set(y))
    return Evaluation(
        accuracy=float((pred == y).mean()),
        classes=classes,
        confusion=confusion_matrix(y, pred, labels=classes),
        report=classification_report(y, pred, labels=classes, digits=3, zero_division=0),
        n=int(len(y)),
        on=on,
    )
