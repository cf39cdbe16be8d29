"""Classical classifiers on CNN codes: `fit` with cross-validated C, and a leak-free split."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from ._errors import CnnCodesError
from ._store import CodeStore

CLASSIFIERS = ("logreg", "linear_svm", "knn", "sgd")
def _half_decades(lo: int, hi: int) -> tuple[float, ...]:
    return tuple(float(c) for c in np.round(np.logspace(lo, hi, 2 * (hi - lo) + 1), 12))


# Where each model's optimum lies on standardised codes (measured on flowers5: the hinge
# loss wants far stronger regularisation, and LinearSVC at C >= 0.1 is both slow and worse).
C_GRIDS = {"logreg": _half_decades(-4, 1), "linear_svm": _half_decades(-5, -1)}


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
        raise CnnCodesError(f"test_size must be between 0 and 1, got {test_size}.")
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
        X = store.codes(layer)
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


def _best_c(classifier, X, y, cv, n_jobs):
    from sklearn.model_selection import GridSearchCV

    if classifier == "logreg":
        from sklearn.linear_model import LogisticRegressionCV

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # sklearn's transition notices
            grid = C_GRIDS["logreg"]
            search = LogisticRegressionCV(Cs=list(grid), cv=cv, max_iter=3000, n_jobs=n_jobs,
                                          scoring="accuracy")
            search.fit(X, y)
        scores = np.mean([s.mean(axis=0) for s in search.scores_.values()], axis=0)
        return float(search.C_[0]), dict(zip(grid, scores))
    from sklearn.svm import LinearSVC

    grid = C_GRIDS["linear_svm"]
    search = GridSearchCV(LinearSVC(dual=True, max_iter=5000), {"C": list(grid)}, cv=cv, n_jobs=n_jobs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at the weak end of a sweep
        search.fit(X, y)
    return float(search.best_params_["C"]), dict(zip(grid, search.cv_results_["mean_test_score"]))


def fit(
    codes,
    labels=None,
    *,
    classifier: str = "logreg",
    layer: str | None = None,
    C="auto",
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
    layer : str, optional
        Which stored layer to use (the deepest one by default).
    C : "auto" or float
        Inverse regularisation of the linear models; ``"auto"`` picks it by stratified
        `cv`-fold cross-validation on the training rows (warm-started for logreg), in
        half-decade steps over ``1e-4 ... 10`` (logreg) or ``1e-5 ... 0.1`` (linear_svm).
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
        raise CnnCodesError(f"unknown classifier {classifier!r}. Valid classifiers: {', '.join(CLASSIFIERS)}.")
    if not (C == "auto" or isinstance(C, (int, float)) and C > 0):
        raise CnnCodesError(f"C must be 'auto' or a positive number, got {C!r}.")
    if not (isinstance(cv, (int, np.integer)) and not isinstance(cv, bool) and cv >= 2):
        raise CnnCodesError(f"cv must be an integer >= 2 (the folds of the cross-validation that picks "
                            f"C='auto'), got {cv!r}. Pass cv=2 or more (--cv on the command line).")
    if classifier == "sgd":
        from ._stream import fit_streaming

        return fit_streaming(codes, labels, layer=layer, rows=rows, random_state=random_state)
    t0 = time.perf_counter()
    X, y, store, layer, rows = _load_xy(codes, labels, layer, rows)
    if len(np.unique(y)) < 2:
        raise CnnCodesError(f"fit needs at least 2 classes, got {len(np.unique(y))} ({np.unique(y)[:3]}).")
    info = {"classifier": classifier, "n_train": int(len(y))}
    if classifier == "knn":
        from ._knn import FaissKNNClassifier

        model = Pipeline([("knn", FaissKNNClassifier(n_neighbors=n_neighbors, metric=metric))])
        model.fit(X, y)
    else:
        scaler = StandardScaler().fit(X)
        Xs = scaler.transform(X)
        if C == "auto":
            smallest = int(np.unique(y, return_counts=True)[1].min())
            if smallest < 2:
                raise CnnCodesError("C='auto' cross-validates, so every class needs at least 2 "
                                    "training images; give C a number or add images.")
            folds = StratifiedKFold(n_splits=min(cv, smallest), shuffle=True, random_state=random_state)
            C, scores = _best_c(classifier, Xs, y, folds, n_jobs)
            info["cv_scores"] = {f"{c:g}": float(s) for c, s in scores.items()}
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
        model = Pipeline([("scale", scaler), (classifier, head)])
    info["seconds"] = time.perf_counter() - t0
    model.cnncodes_ = fit_meta(info, layer, store, rows)
    return model


def fit_meta(info: dict, layer, store: CodeStore | None, rows) -> dict:
    """What a fitted model carries for `save`: fit details, layer, extractor spec, training rows."""
    return {
        "fit": info,
        "layer": layer,
        "extractor": None if store is None else _extractor_spec(store, layer),
        "train_ids": None if store is None else [str(i) for i in store.ids[rows]],
        "train_sha256": None if store is None else sorted({str(h) for h in store.sha256[rows]}),
        "store": None if store is None else str(store.path),
    }


def _extractor_spec(store: CodeStore, layer: str) -> dict:
    """The store's settings narrowed to one layer: what extracting new photos needs.

    A model file's dict (`ExtractorSpec.to_model_json`): the estimator carries it, and skops
    files hold no cnncodes types.
    """
    return store.spec.narrow(layer).to_model_json()
