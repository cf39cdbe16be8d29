"""Model files that load without running code (skops); prediction and evaluation with any kind of model."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnncodes._errors import CnnCodesError, InvalidParameterError, ModelFileError, StoreMismatchError
from cnncodes._io import atomic_write, top_k as top_k_columns
from cnncodes._outputs import MODEL as MODEL_FILE
from cnncodes._outputs import check_output
from cnncodes._models.results import (  # below every kind of model, which all give these
    Evaluation,
    PhotoModel,
    Prediction,
    Predictions,
    all_failed_error,
    evaluation,
)
from cnncodes._spec import ExtractorSpec
from cnncodes._stats import CONFIDENCE, N_RESAMPLES, Interval, accuracy_intervals, check_resampling
from cnncodes._store.store import CodeStore

MODEL_FORMAT = "cnncodes.model"
MODEL_VERSION = 1
# Types cnncodes writes besides the public scikit-learn ones skops trusts by itself.
TRUSTED = [
    "cnncodes._fit.CodeNormalizer",  # its __module__, stable
    "cnncodes.FaissKNNClassifier",  # its __module__ since 0.2
    "cnncodes._knn.FaissKNNClassifier",  # files written before 0.2
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
]


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
    with atomic_write(path) as fh:  # a model file is whole or absent
        fh.write(sio.dumps(bundle))
    return path


@dataclass
class Model(PhotoModel):
    """A loaded model file: the estimator and what it was made from.

    ``extractor`` is the spec that made its training codes (one layer), None for a model
    fitted on arrays. It classifies photos by extracting their codes with that spec first.
    """

    reads_codes = True  # a class attribute (not a field): a network up to codes, then the estimator

    estimator: object
    classes: list[str]
    extractor: ExtractorSpec | None
    fit: dict | None
    train_ids: list[str] | None
    path: str
    train_sha256: list[str] | None = None

    def predict_proba(self, X):
        return self.estimator.predict_proba(X)

    def predict_photos(self, images, *, top_k: int = 1, store=None, progress: bool = False,
                       **run) -> Predictions:
        """Top-k labels of photos, extracted with the model's spec (into `store`, or a temporary one)."""
        from cnncodes._classify.fit import layer_codes

        with _codes_for(self, images, store, progress, run) as (codes, layer, failures):
            X, ids = layer_codes(codes, layer), codes.ids
        if len(ids) == 0:
            if failures:
                raise all_failed_error(failures)
            raise CnnCodesError(f"no photos to predict in {images!r}; give a folder, CSV or list of image files.")
        proba = self.predict_proba(X)
        classes = np.array([str(c) for c in self.estimator.classes_], dtype=object)  # plain str, not np.str_
        order = top_k_columns(proba, top_k)
        return Predictions([Prediction(str(rid), list(classes[o]), [float(p) for p in proba[i, o]])
                            for i, (rid, o) in enumerate(zip(ids, order))], failures)

    def evaluate(self, data, *, progress: bool = False, n_resamples: int = N_RESAMPLES,
                 confidence: float = CONFIDENCE, random_state=0, **run) -> Evaluation:
        """The evaluation on a code store (read as it is) or a labelled folder (extracted first)."""
        stats = dict(n_resamples=n_resamples, confidence=confidence, random_state=random_state)
        path = Path(data.path if isinstance(data, CodeStore) else data)
        if isinstance(data, CodeStore) or path.is_file() and path.suffix in (".h5", ".hdf5"):
            store = data if isinstance(data, CodeStore) else CodeStore(path)
            return _evaluate_store(self, store, _check_store(self, store), path,
                                   f"all labelled rows of {path.name}", stats)
        with _codes_for(self, data, None, progress, run) as (store, layer, _):
            ev = _evaluate_store(self, store, layer, path, f"all labelled images of {path}", stats)
            ev.provenance["store"] = f"a temporary store of {path}"
            return ev


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
    from cnncodes._finetune._checkpoint import is_checkpoint_file

    if path.suffix.lower() in (".pt", ".pth") or is_checkpoint_file(path):  # from `cnncodes finetune`
        from cnncodes._errors import WeightsError
        from cnncodes._finetune._predict import load_finetuned

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


def _as_model(model) -> PhotoModel:
    """A loaded model of any kind, from a model, a path or a fitted estimator."""
    if isinstance(model, PhotoModel):
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
    from cnncodes._extract.extract import extract

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
        raise InvalidParameterError(f"top_k must be an integer >= 1, got {top_k!r}.")
    run = _run_options(batch_size, device, num_workers)
    return _as_model(model).predict_photos(images, top_k=top_k, store=store, progress=progress, **run)

def evaluate(model, data, *, progress: bool = False, batch_size: int | None = None, device="auto",
             num_workers="auto", n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
             random_state: int | None = 0) -> Evaluation:
    """Evaluate a model on a code store or a labelled folder, on content it was not trained on.

    Rows whose image content (sha256) the model saw in training are left out, so on the
    store it was fitted from (with ``rows=`` or ``--test-size``) the figure is a held-out
    one, and a copy of a training photo elsewhere cannot inflate it.

    Parameters
    ----------
    model : path, Model, fitted estimator from :func:`fit`, or a fine-tuned network
    data : path or CodeStore
        A code store (read as it is) or a labelled folder / CSV (extracted with the model's
        settings).
    batch_size, device, num_workers
        The extraction of a folder, as in :func:`predict`.
    n_resamples : int
        Bootstrap resamples of the confidence intervals (at least 100).
    confidence : float
        Level of the intervals (0.95: 95 %).
    random_state : int or None
        Seed of the resampling: the same seed gives the same intervals.

    Returns
    -------
    Evaluation
        ``accuracy``; ``interval`` and ``mean_per_class`` (stratified bootstrap intervals of
        the accuracy and of the mean per-class accuracy); ``per_class`` precision, recall
        and F1; ``confusion``; and the per-row ids, labels, predictions and probabilities.

    Examples
    --------
    >>> ev = evaluate("model.skops", "codes.h5")                     # doctest: +SKIP
    >>> print(ev.interval)                                           # doctest: +SKIP
    0.9122 (95 % CI 0.8946 to 0.9288)
    """
    check_resampling(n_resamples, confidence)
    run = _run_options(batch_size, device, num_workers)
    return _as_model(model).evaluate(data, progress=progress, n_resamples=n_resamples, confidence=confidence,
                                     random_state=random_state, **run)


def _evaluate_store(model: Model, store: CodeStore, layer: list, path: Path, on: str, stats: dict) -> Evaluation:
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
    from cnncodes._classify.fit import layer_codes

    X = layer_codes(store, layer)[rows]
    pred = np.asarray(model.estimator.predict(X)).astype(str)
    try:
        proba = np.asarray(model.predict_proba(X), dtype=np.float64)
    except AttributeError:  # an estimator without probabilities: no gallery
        proba = None
    from cnncodes._analysis.render import provenance

    return evaluation(y, pred, model.classes, on, ids=[str(i) for i in store.ids[rows]], proba=proba,
                      proba_classes=[str(c) for c in model.estimator.classes_],
                      root=store.attrs.get("data_root"), provenance=provenance(model, store, layer), **stats)



@dataclass
class Comparison:
    """Two models on the same test rows: accuracy of each and the paired difference a - b.

    ``difference`` and ``mean_per_class_difference`` are :class:`cnncodes._stats.Interval`
    values of accuracy(a) - accuracy(b) and of the same for the mean per-class accuracy,
    from a paired, stratified bootstrap (both models scored on the same resampled rows).
    """

    a: Evaluation
    b: Evaluation
    names: tuple[str, str]
    difference: Interval
    mean_per_class_difference: Interval
    n: int

    @property
    def significant(self) -> bool:
        """True when the interval of the accuracy difference excludes 0."""
        return self.difference.excludes(0.0)

    def verdict(self) -> str:
        """One sentence: which model is better, or that the difference is within the noise."""
        d, (na, nb) = self.difference, self.names
        level = f"{100 * d.confidence:g} %"
        if not self.significant:
            return (f"the {level} interval of the difference includes 0: on these {self.n} images "
                    f"{na} and {nb} cannot be told apart (the difference is within the noise).")
        better, worse = (na, nb) if d.estimate > 0 else (nb, na)
        return (f"the {level} interval of the difference excludes 0: {better} is more accurate than "
                f"{worse} by {100 * abs(d.estimate):.1f} points ({100 * min(abs(d.low), abs(d.high)):.1f} "
                f"to {100 * max(abs(d.low), abs(d.high)):.1f}).")

    def summary(self) -> str:
        na, nb = self.names
        w = max(len(na), len(nb))
        return "\n".join([
            f"{na:<{w}}  accuracy {self.a.interval.format()}",
            f"{nb:<{w}}  accuracy {self.b.interval.format()}",
            f"difference (a - b) on the same {self.n} images: {self.difference.format(signed=True)}; "
            f"mean per-class accuracy {self.mean_per_class_difference.format(signed=True)} "
            f"(paired stratified bootstrap, {self.difference.n_resamples} resamples)",
            self.verdict(),
        ])


def compare(model_a, model_b, data, *, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
            random_state: int | None = 0, progress: bool = False, batch_size: int | None = None,
            device="auto", num_workers="auto") -> Comparison:
    """Compare two models on the same test images: the paired bootstrap interval of a - b.

    Both models are evaluated with :func:`evaluate` on `data`; the rows both of them hold
    out (the same when both were fitted on the same split) are resampled together,
    stratified by class, so the interval is that of the difference itself, far narrower
    than the two separate intervals suggest.

    Parameters
    ----------
    model_a, model_b : path, Model or fitted estimator
        E.g. the same classifier on two layers, or two values of C.
    data : path or CodeStore
        A store holding both models' layers, or a labelled folder (extracted for each).
    n_resamples, confidence, random_state
        As in :func:`evaluate`.

    Returns
    -------
    Comparison
        ``difference`` (accuracy a - b with its interval), ``mean_per_class_difference``,
        ``significant`` (the interval excludes 0), ``summary()``.

    Examples
    --------
    >>> c = compare("block4.skops", "block5.skops", "codes.h5")      # doctest: +SKIP
    >>> print(c.summary())                                           # doctest: +SKIP
    """
    kwargs = dict(n_resamples=n_resamples, confidence=confidence, random_state=random_state, progress=progress,
                  batch_size=batch_size, device=device, num_workers=num_workers)
    a, b = evaluate(model_a, data, **kwargs), evaluate(model_b, data, **kwargs)
    common = sorted(set(a.ids) & set(b.ids))
    if not common:
        raise CnnCodesError("the two models have no test image in common (each leaves out the images it "
                            "was trained on); compare models fitted on the same training split.")
    ia, ib = ({rid: k for k, rid in enumerate(ev.ids)} for ev in (a, b))
    ra, rb = [ia[r] for r in common], [ib[r] for r in common]
    y = np.asarray(a.y_true)[ra]
    if not np.array_equal(y, np.asarray(b.y_true)[rb]):
        raise CnnCodesError("the two evaluations label the same images differently; compare the models on "
                            "one store or folder.")
    diff = a.correct[ra].astype(np.float64) - b.correct[rb]
    d, db = accuracy_intervals(diff, y, n_resamples=n_resamples, confidence=confidence, random_state=random_state)
    return Comparison(a, b, (_model_name(model_a, a), _model_name(model_b, b)), d, db, len(common))


def _model_name(model, ev: Evaluation) -> str:
    if isinstance(model, (str, Path)):
        return Path(model).name
    return ev.provenance.get("model") or type(model).__name__
