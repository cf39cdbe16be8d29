"""Classical classifiers on CNN codes: `fit` with cross-validated C, and a leak-free split."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted, validate_data

from cnncodes._choices import CLASSIFIERS, NORMALIZE
from cnncodes._errors import CnnCodesError, InvalidParameterError
from cnncodes._classify.fit_meta import fit_meta
from cnncodes._store.store import CodeStore

def _half_decades(lo: int, hi: int) -> tuple[float, ...]:
    return tuple(float(c) for c in np.round(np.logspace(lo, hi, 2 * (hi - lo) + 1), 12))


# Where the linear SVM's optimum lies on standardised codes (measured on flowers5: the hinge
# loss wants far stronger regularisation, and LinearSVC at C >= 0.1 is both slow and worse).
C_GRIDS = {"linear_svm": _half_decades(-5, -1)}
# Logistic regression: the literature's range (Kornblith et al. 2019, DINOv2: 10^-6 ... 10^5;
# the best C of ImageNet features spans 0.006 to 1000 across data sets), searched coarse to
# fine: every decade, then quarter decades around the best one.
C_DECADES = (-6, 5)
MIN_LAST_DECADE = 0  # the upward search runs at least to C = 10 ** MIN_LAST_DECADE


class CodeNormalizer(TransformerMixin, BaseEstimator):
    """Normalise each code vector: ``"l2"`` to unit length, ``"power"`` signed square root then L2.

    Stateless; a step of the fitted pipeline (before the scaler), so one store serves both.
    """

    def __init__(self, *, kind="power"):
        self.kind = kind

    def fit(self, X, y=None):
        if self.kind not in NORMALIZE:
            raise InvalidParameterError(f"unknown normalize {self.kind!r}. Valid values: 'l2', 'power' or None.")
        validate_data(self, X, reset=True)
        return self

    def transform(self, X):
        check_is_fitted(self, "n_features_in_")
        X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
        if self.kind == "power":
            X = np.sign(X) * np.sqrt(np.abs(X))
        norms = np.linalg.norm(X, axis=1, keepdims=True)
        return X / np.maximum(norms, np.finfo(X.dtype).tiny)


CodeNormalizer.__module__ = 'cnncodes._fit'  # the name model files record (cnncodes/_fit.py re-exports it)


def split_store(store, *, test_size: float = 0.25, random_state: int | None = 0):
    """Stratified train/test split of a store's labelled rows, identical content on one side.

    Rows with the same content sha256 (e.g. one photo under two class folders) form one
    group and go to the same side, so no test image is also a training image.

    Returns
    -------
    train, test : ndarray of int
        Row indices into the store.
    """
    store = _as_store(store)
    return split_groups(store.labels, store.sha256, test_size=test_size, random_state=random_state,
                        where=store.path.name, class_names=store.class_names)


def split_groups(labels, sha256, *, test_size: float = 0.25, random_state: int | None = 0,
                 where: str = "the images", class_names=None):
    """The split of :func:`split_store` for any rows given as (label index, content sha256).

    `labels` holds a class index per row (-1 for unlabelled rows, which are left out);
    `sha256` the content hash per row. Rows sharing a hash form one group, labelled by its
    first row, and go to the same side. The same rows in the same order give the same split
    whether they come from a store or straight from a folder (fine-tuning uses this).
    `class_names` (one per label index) name the classes in errors.

    Returns
    -------
    train, test : ndarray of int
        Row indices.
    """
    labels, shas = np.asarray(labels), np.asarray(sha256, dtype=object)
    rows = np.flatnonzero(labels >= 0)
    if not 0 < test_size < 1:
        raise InvalidParameterError(f"test_size must be between 0 and 1, got {test_size}.")
    first = {}
    for r in rows:  # one representative per content, labelled with its first label
        first.setdefault(shas[r], r)
    reps = np.array(list(first.values()))
    name = (lambda i: repr(str(class_names[i]))) if class_names is not None else (lambda i: f"class {i}")
    counts = np.bincount(labels[reps]) if len(reps) else np.zeros(0, dtype=int)
    few = [i for i in np.flatnonzero(counts) if counts[i] < 2]
    if few:
        listed = ", ".join(f"{name(i)} ({counts[i]})" for i in few)
        raise CnnCodesError(
            f"cannot make a stratified split of {where}: each class needs at least 2 distinct images, "
            f"one for each side, and {len(few)} class(es) have fewer: {listed}. Add images to "
            f"{'it' if len(few) == 1 else 'them'}, or fit without a test split (no --test-size).")
    try:
        rep_train, rep_test = train_test_split(reps, test_size=test_size, stratify=labels[reps],
                                               random_state=random_state)
    except ValueError as exc:
        raise CnnCodesError(f"cannot make a stratified split of {where}: {exc}. "
                            f"Each class needs at least 2 distinct images.") from None
    test_shas = {shas[r] for r in rep_test}
    is_test = np.array([shas[r] in test_shas for r in rows], dtype=bool)
    return rows[~is_test], rows[is_test]


def _as_store(codes) -> CodeStore:
    return codes if isinstance(codes, CodeStore) else CodeStore(codes)


def _load_xy(codes, labels, layer, rows):
    """Return X, y (class names as strings) and the store (or None) for arrays or a store."""
    if isinstance(codes, (str, Path, CodeStore)):
        store = _as_store(codes)
        layer = layer or store.layers[-1]
        if not isinstance(layer, str):
            layer = list(dict.fromkeys(layer))
            layer = layer[0] if len(layer) == 1 else layer
        X = layer_codes(store, layer)
        names = np.array(store.class_names, dtype=object)
        idx = store.labels
        if rows is None:
            rows = np.flatnonzero(idx >= 0)
        if len(rows) == 0:
            raise CnnCodesError(f"{store.path.name} has no labelled rows; extract a folder with one "
                                f"subfolder per class, or a CSV with labels.")
        return X[rows], names[idx[rows]].astype(str), store, layer, rows
    if labels is None:
        raise CnnCodesError("fit(X) on arrays needs labels: fit(X, y).")
    X = np.asarray(codes)
    if rows is not None:
        X, labels = X[rows], np.asarray(labels)[rows]
    return X, np.asarray(labels), None, layer, rows


def _folds(y, groups, cv, random_state):
    """Stratified CV folds; rows of the same content (a group) never on both sides."""
    smallest = int(np.unique(y, return_counts=True)[1].min())
    if smallest < 2:
        raise CnnCodesError("C='auto' cross-validates, so every class needs at least 2 "
                            "training images; give C a number or add images.")
    n = min(cv, smallest)
    if groups is None or len(set(groups)) == len(groups):
        return list(StratifiedKFold(n_splits=n, shuffle=True, random_state=random_state).split(y, y))
    return list(StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=random_state).split(y, y, groups))


def _fold_path(X, y, train, test, Cs, state):
    """Fit logreg on one fold at each C in turn, warm-starting from the previous C's solution."""
    from sklearn.linear_model import LogisticRegression

    if state is None:
        state = LogisticRegression(max_iter=1000, warm_start=True)
    from sklearn.metrics import log_loss

    scores = []
    Xtr, ytr, Xte, yte = X[train], y[train], X[test], y[test]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at the weak end of the range
        for C in Cs:
            state.set_params(C=C).fit(Xtr, ytr)
            proba = state.predict_proba(Xte)
            scores.append((float(np.mean(state.classes_[proba.argmax(1)] == yte)),
                           float(log_loss(yte, proba, labels=state.classes_))))
    return scores, state


def _pick_c(scores: dict, losses: dict, n: int) -> float:
    """The C with the lowest CV log loss among those whose CV accuracy is within one standard
    error of the best (binomial, n rows): accuracy first, and among Cs it cannot tell apart
    the one with the best probabilities. Accuracy alone, on a few hundred images, often peaks
    by one image at C = 1e-6, whose probabilities are near uniform (0.2 for each of 5 classes)."""
    top = max(scores.values())
    se = np.sqrt(top * (1 - top) / max(n, 1))
    tied = [c for c in scores if scores[c] >= top - se - 1e-12]
    return min(tied, key=lambda c: (losses[c], -c))


def _search_logreg(X, y, folds, n_jobs):
    """Coarse to fine C search: every decade, upwards, warm-started, stopped three decades past
    the best (not before C = 1); then quarter decades around the best. Returns (best C, {C: mean CV accuracy})."""
    from joblib import Parallel, delayed

    scores: dict[float, float] = {}
    losses: dict[float, float] = {}
    states = [None] * len(folds)
    lo, hi = C_DECADES
    n = sum(len(te) for _, te in folds)
    with Parallel(n_jobs=n_jobs) as parallel:
        def run(Cs, states):
            out = parallel(delayed(_fold_path)(X, y, tr, te, Cs, st) for (tr, te), st in zip(folds, states))
            for k, C in enumerate(Cs):
                scores[float(C)] = float(np.mean([o[0][k][0] for o in out]))
                losses[float(C)] = float(np.mean([o[0][k][1] for o in out]))
            return [o[1] for o in out]

        for e in range(lo, hi + 1):  # one decade at a time, so the search can stop early
            states = run([10.0 ** e], states)
            best = _pick_c(scores, losses, n)
            # Never before C = 1: on a few hundred images the CV accuracy is flat and noisy at
            # the weak end (1e-6 ... 1e-5, near-uniform probabilities), and three decades of no
            # gain there say little about the usual optimum (1e-3 ... 1).
            if e >= MIN_LAST_DECADE and np.log10(10.0 ** e / best) >= 3 - 1e-9:
                break
        best = _pick_c(scores, losses, n)
        fine = [best * 10 ** q for q in (-0.75, -0.5, -0.25, 0.25, 0.5, 0.75)
                if lo <= np.log10(best) + q <= hi]
        below, above = [c for c in fine if c < best], [c for c in fine if c > best]
        if below:
            run(below, [None] * len(folds))
        if above:
            run(above, [None] * len(folds))
    scores, losses = dict(sorted(scores.items())), dict(sorted(losses.items()))
    return _pick_c(scores, losses, n), scores, losses


def _best_c(classifier, X, y, folds, n_jobs):
    if classifier == "logreg":
        return _search_logreg(X, y, folds, n_jobs)
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import LinearSVC

    grid = C_GRIDS["linear_svm"]
    search = GridSearchCV(LinearSVC(dual=True, max_iter=5000), {"C": list(grid)}, cv=folds, n_jobs=n_jobs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at the weak end of a sweep
        search.fit(X, y)
    return float(search.best_params_["C"]), dict(zip(grid, search.cv_results_["mean_test_score"])), None


def layer_codes(store: CodeStore, layers) -> np.ndarray:
    """The codes of one stored layer, or of several side by side (in the order given)."""
    if isinstance(layers, str):
        return store.codes(layers)
    return np.hstack([store.codes(layer) for layer in layers]) if len(layers) > 1 else store.codes(layers[0])


def _augment_rows(store: CodeStore, augment, layers, rows):
    """Rows of the augmentation store (mirror images' codes) for the training rows' contents."""
    aug = _as_store(augment)
    if aug.spec.tta != "mirror":
        raise CnnCodesError(f"augment={aug.path.name!r} holds tta {aug.spec.tta!r} codes; augmentation rows "
                            f"are mirror images' codes: extract them with tta='mirror' (--tta mirror).")
    from dataclasses import replace

    aug.spec.check(replace(store.spec, tta="mirror"), aug.path.name,
                   advice="extract the augmentation store with the training store's settings and --tta mirror.")
    where = {sha: k for k, sha in enumerate(aug.sha256)}
    shas = store.sha256[rows]
    keep = [k for k, sha in enumerate(shas) if sha in where]
    if not keep:
        raise CnnCodesError(f"{aug.path.name} holds none of the training images: extract the same "
                            f"folder into it with --tta mirror.")
    X = layer_codes(aug, layers)[[where[shas[k]] for k in keep]]
    return X, np.asarray(keep), shas[keep]


def fit(
    codes,
    labels=None,
    *,
    classifier: str = "logreg",
    layer: str | list[str] | None = None,
    C="auto",
    normalize: str | None = None,
    augment=None,
    n_neighbors: int = 10,
    metric: str = "cosine",
    cv: int = 5,
    rows=None,
    n_jobs: int | None = -1,
    random_state: int | None = 0,
) -> Pipeline:
    """Fit a scikit-learn classifier on CNN codes.

    Parameters
    ----------
    codes : path, CodeStore or array of shape (n, d)
        A code store (its labelled rows are used) or a feature matrix.
    labels : array of shape (n,), optional
        Labels when `codes` is an array.
    classifier : {"logreg", "linear_svm", "knn", "sgd"}
        Logistic regression, a linear SVM (probabilities calibrated by Platt scaling),
        k-nearest neighbours through faiss, or ``"sgd"``: logistic regression by SGD over
        chunks of the store, for stores larger than memory (:func:`cnncodes.fit_streaming`
        with its defaults; `C`, `cv` and `n_jobs` do not apply).
    layer : str or list of str, optional
        Which stored layer to use (the deepest one by default); several are concatenated
        (``["block4", "block5"]``), each normalised on its own first when `normalize` is set.
    C : "auto" or float
        Inverse regularisation of the linear models; ``"auto"`` picks it by stratified
        `cv`-fold cross-validation on the training rows, rows of the same content never on
        both sides of a fold, then refits on all of them. logreg: every decade of
        ``1e-6 ... 1e5`` upwards (warm-started, stopped three decades past the best and not
        before 1), then quarter decades around the best; the best is the C with the lowest CV
        log loss among those whose CV accuracy is within one standard error of the highest
        (``info["cv_scores"]``, ``info["cv_log_loss"]``); linear_svm: the most accurate of
        half decades of ``1e-5 ... 0.1``.
    normalize : {"l2", "power"} or None
        A first step of the pipeline: each code scaled to unit length (``"l2"``), or its
        signed square root scaled so (``"power"``); then standardisation, as without.
    augment : path or CodeStore, optional
        A store of mirror-image codes of the same photos (``extract(..., tta="mirror")``,
        otherwise the same settings): each training photo also gives its mirror's codes as
        a training row (the CV folds keep both on one side).
    n_neighbors, metric
        For ``classifier="knn"``: neighbours and ``"cosine"`` | ``"l2"`` | ``"ip"``.
    rows : array of int, optional
        Store rows to train on (e.g. the train side of :func:`split_store`).
    n_jobs : int, optional
        Parallel jobs for the cross-validation (joblib; all cores by default).

    Returns
    -------
    sklearn.pipeline.Pipeline
        Fitted; ``classes_`` are the class names. When fitted from a store it carries
        ``cnncodes_`` (the extractor spec, layer and training rows) for :func:`save`.

    Examples
    --------
    >>> from cnncodes import fit, split_store                        # doctest: +SKIP
    >>> train, test = split_store("codes.h5", test_size=0.25)        # doctest: +SKIP
    >>> model = fit("codes.h5", layer="block5", rows=train)          # doctest: +SKIP
    """
    if classifier not in CLASSIFIERS:
        raise InvalidParameterError(f"unknown classifier {classifier!r}. Valid classifiers: {', '.join(CLASSIFIERS)}.")
    if not (C == "auto" or isinstance(C, (int, float)) and C > 0):
        raise InvalidParameterError(f"C must be 'auto' or a positive number, got {C!r}.")
    if not (isinstance(cv, (int, np.integer)) and not isinstance(cv, bool) and cv >= 2):
        raise InvalidParameterError(f"cv must be an integer >= 2 (the folds of the cross-validation that picks "
                            f"C='auto'), got {cv!r}. Pass cv=2 or more (--cv on the command line).")
    if classifier == "sgd":
        from cnncodes._classify.stream import fit_streaming

        if normalize is not None or augment is not None or not (layer is None or isinstance(layer, str)):
            raise CnnCodesError("classifier='sgd' streams one stored layer as it is: normalize, augment and "
                                "several layers are for logreg, linear_svm and knn.")
        return fit_streaming(codes, labels, layer=layer, rows=rows, random_state=random_state)
    t0 = time.perf_counter()
    if normalize not in (*NORMALIZE, None):
        raise InvalidParameterError(f"unknown normalize {normalize!r}. Valid values: 'l2', 'power' or None.")
    X, y, store, layer, rows = _load_xy(codes, labels, layer, rows)
    if len(np.unique(y)) < 2:
        raise CnnCodesError(f"fit needs at least 2 classes, got {len(np.unique(y))} ({np.unique(y)[:3]}).")
    info = {"classifier": classifier, "n_train": int(len(y))}
    groups = None if store is None else store.sha256[rows]
    if augment is not None:
        if store is None:
            raise CnnCodesError("augment= needs codes from a store (fit('codes.h5', augment='mirror.h5')).")
        Xa, keep, shas = _augment_rows(store, augment, layer, rows)
        X, y, groups = np.vstack([X, Xa]), np.concatenate([y, y[keep]]), np.concatenate([groups, shas])
        info["n_augment"] = int(len(keep))
    steps = []
    if normalize is not None:
        steps.append(("normalize", _normalizer(normalize, store, layer)))
    if classifier == "knn":
        from cnncodes._classify.knn import FaissKNNClassifier

        model = Pipeline([*steps, ("knn", FaissKNNClassifier(n_neighbors=n_neighbors, metric=metric))])
        model.fit(X, y)
    else:
        prefix = Pipeline([*steps, ("scale", StandardScaler())]).fit(X)
        Xs = prefix.transform(X)
        if C == "auto":
            folds = _folds(y, groups, cv, random_state)
            C, scores, losses = _best_c(classifier, Xs, y, folds, n_jobs)
            info["cv_scores"] = {f"{c:g}": float(s) for c, s in scores.items()}
            if losses is not None:
                info["cv_log_loss"] = {f"{c:g}": float(v) for c, v in losses.items()}
        info["C"] = float(C)
        if classifier == "logreg":
            from sklearn.linear_model import LogisticRegression

            head = LogisticRegression(C=C, max_iter=3000)
        else:
            from sklearn.calibration import CalibratedClassifierCV
            from sklearn.svm import LinearSVC

            head = CalibratedClassifierCV(LinearSVC(C=C, dual=True, max_iter=5000), method="sigmoid", cv=3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            head.fit(Xs, y)
        model = Pipeline([*prefix.steps, (classifier, head)])
    info["seconds"] = time.perf_counter() - t0
    model.cnncodes_ = fit_meta(info, layer, store, rows)
    return model


def _normalizer(kind: str, store, layer):
    """The normalisation step: per layer when several are concatenated (each to unit length)."""
    if store is None or isinstance(layer, str):
        return CodeNormalizer(kind=kind)
    from sklearn.compose import ColumnTransformer

    bounds = np.cumsum([0] + [store.codes_shape(name)[1] for name in layer])
    return ColumnTransformer([(name, CodeNormalizer(kind=kind), list(range(a, b)))
                              for name, a, b in zip(layer, bounds[:-1], bounds[1:])])


