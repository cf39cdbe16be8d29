"""A k-nearest-neighbours classifier on a faiss index: a drop-in for KNeighborsClassifier."""

from __future__ import annotations

import contextlib
import math
import numbers

import faiss
import joblib
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d

from cnncodes._choices import METRICS

try:  # public since scikit-learn 1.6
    from sklearn.utils.validation import validate_data
except ImportError:  # pragma: no cover - scikit-learn < 1.6

    def validate_data(estimator, *args, **kwargs):
        return estimator._validate_data(*args, **kwargs)


# metric name (METRICS, or euclidean for l2) -> scikit-learn's name of that distance (effective_metric_)
_METRICS = {"l2": "euclidean", "euclidean": "euclidean", "cosine": "cosine", "ip": "ip"}
_WEIGHTS = ("uniform", "distance")
_INDEXES = ("flat", "ivf", "hnsw")
_PRECISIONS = ("auto", "float32", "bfloat16")
# Rows of the training set reconstructed at a time for kneighbors(X=None): bounds memory.
_TRAIN_QUERY_BATCH = 8192


def _one_of(name, value, valid, hint):
    return ValueError(
        f"Expected {name} to be one of {', '.join(map(repr, valid))}, but got {name}={value!r}. "
        f"{hint}"
    )


def _check_int(name, value, minimum=1, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(
            f"Expected {name} to be an integer >= {minimum}"
            f"{' or None' if allow_none else ''}, but got {name}={value!r}."
        )


def default_nlist(n_samples: int) -> int:
    """Return the number of IVF lists used when ``nlist=None``: about 4 * sqrt(n_samples).

    Capped so that each list gets at least 39 training points (below that faiss warns that
    k-means has too few points per centroid), and at least 1.
    """
    return max(1, min(int(round(4 * math.sqrt(n_samples))), n_samples // 39))


def _n_threads(n_jobs):
    """``n_jobs`` as a thread count (negative: counted back from the CPUs), None as None."""
    if n_jobs is None:
        return None
    return int(n_jobs) if n_jobs > 0 else max(1, joblib.cpu_count() + 1 + int(n_jobs))


@contextlib.contextmanager
def _omp_threads(n_jobs):
    """Run the block with faiss using ``n_jobs`` OpenMP threads, then restore the old count."""
    n_threads = _n_threads(n_jobs)
    if n_threads is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n_threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _normalize_rows(X):
    """Return a copy of X with unit-length rows; all-zero rows stay zero (cosine distance 1)."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    norms[norms == 0] = 1
    return np.ascontiguousarray(X / norms, dtype=np.float32)


class FaissKNNClassifier(ClassifierMixin, BaseEstimator):
    """Classifier implementing the k-nearest neighbours vote, searched with faiss.

    A drop-in for :class:`sklearn.neighbors.KNeighborsClassifier` on dense float features
    such as CNN codes: with ``index="flat"`` the neighbours, distances, probabilities and
    predictions are those of ``KNeighborsClassifier(algorithm="brute")`` (up to float32
    rounding), and faster on large code matrices (see ``benchmarks/bench_knn.py``; on a CPU
    with native bfloat16 units the exact search runs in bfloat16, see `precision`). ``index="ivf"`` and
    ``index="hnsw"`` trade exactness for speed: on 200,000 code-like 1280-d vectors their
    defaults find 99.7 % and 99.4 % of the exact 10 nearest neighbours, 18x and 16x faster
    than the flat index (``benchmarks/bench_knn_large.py`` prints the recall-vs-speed table;
    raise ``nprobe`` or ``ef_search`` for more recall, lower them for more speed).

    Parameters
    ----------
    n_neighbors : int, default=5
        Number of neighbours that vote. Read at query time, like scikit-learn's.
    metric : {"l2", "cosine", "ip"}, default="l2"
        ``"l2"`` (alias ``"euclidean"``): Euclidean distance. ``"cosine"``: cosine distance
        ``1 - cos(x, y)``; rows are L2-normalised and searched by inner product.
        ``"ip"``: inner product (larger is nearer); :meth:`kneighbors` returns the
        *negated* inner products ``-<x, y>`` so that, as for the other metrics, smaller is
        nearer and the nearest neighbour comes first. ``"ip"`` does not combine with
        ``weights="distance"``, since negated inner products can be negative.
    weights : {"uniform", "distance"} or callable, default="uniform"
        ``"uniform"``: every neighbour has one vote. ``"distance"``: votes weighted by
        ``1 / distance``; a query at distance 0 from some training points gets its votes
        from those points only (as in scikit-learn). A callable gets the distance array
        and returns an array of weights of the same shape.
    index : {"flat", "ivf", "hnsw"}, default="flat"
        ``"flat"``: exact search (``IndexFlatL2`` / ``IndexFlatIP``). ``"ivf"``:
        ``IndexIVFFlat``, k-means trained on the fitted codes, approximate.
        ``"hnsw"``: ``IndexHNSWFlat`` graph, approximate.
    nlist : int, default=None
        Number of IVF lists (``index="ivf"`` only). None: about ``4 * sqrt(n_samples)``,
        at most ``n_samples // 39`` (see :func:`default_nlist`). Must be <= n_samples.
    nprobe : int, default=8
        IVF lists visited per query (``index="ivf"`` only; capped at ``nlist``). Read at
        query time: ``set_params(nprobe=...)`` on a fitted model needs no refit.
    hnsw_m : int, default=32
        Links per node of the HNSW graph (``index="hnsw"`` only).
    ef_search : int, default=64
        Size of the HNSW candidate list at query time (``index="hnsw"`` only; raised to
        ``n_neighbors`` when smaller). Read at query time.
    precision : {"auto", "float32", "bfloat16"}, default="auto"
        Arithmetic of the flat search (``index="flat"`` only); both compare every query
        with every code. ``"float32"``: faiss's float32 search. ``"bfloat16"``: a bfloat16 matrix
        product proposes candidates, each score with a proven bound on its rounding error,
        and the candidates are re-ranked by float64 distances; a query whose bound cannot
        separate its k-th neighbour from the rest is searched again, at last in float64 over
        all codes. The neighbours are those of a float64 brute-force search, and on a CPU
        with native bfloat16 units (AVX-512 BF16, AMX) the search runs several times faster
        than float32 (``benchmarks/bench_knn.py``); it keeps a bfloat16 copy of the codes
        (half their size). ``"auto"``: ``"bfloat16"`` on such a CPU, else
        ``"float32"``. Read at query time.
    n_jobs : int, default=None
        Threads faiss (OpenMP) and the bfloat16 search (torch) use in ``fit`` and in
        queries; the previous counts are restored afterwards. None: the libraries' current
        settings (all cores unless set otherwise). Negative values count back from the
        number of CPUs (-1: all).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels, sorted.
    index_ : faiss.Index
        The index of the fitted codes (L2-normalised for ``metric="cosine"``). For
        ``index="flat"`` it is built at its first use (a float32 search, or reading the
        attribute): the bfloat16 search does not need it.
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of the features seen during fit, when X has string column names.
    n_samples_fit_ : int
        Number of samples in the fitted data.
    effective_metric_ : str
        ``"euclidean"``, ``"cosine"`` or ``"ip"``.
    nlist_ : int or None
        Number of IVF lists of the fitted index (None for the other indexes).
    outputs_2d_ : bool
        Always False: multi-output targets are not supported.

    Notes
    -----
    A flat model keeps the fitted codes, by reference when ``X`` is already C-contiguous
    float32 (as ``KNeighborsClassifier`` does): copy ``X`` before fitting if you will change
    it in place. faiss indexes are not picklable; ``__getstate__`` stores a flat model's
    codes, and an IVF or HNSW index as the uint8 array of ``faiss.serialize_index``, so a
    fitted model pickles, deep-copies and saves with ``skops.io`` (its state holds only
    numpy arrays and builtins).

    Examples
    --------
    >>> import numpy as np
    >>> from cnncodes._classify.knn import FaissKNNClassifier
    >>> X = np.array([[0.0, 0.0], [0.1, 0.0], [1.0, 1.0], [1.0, 0.9]])
    >>> clf = FaissKNNClassifier(n_neighbors=3).fit(X, ["cat", "cat", "dog", "dog"])
    >>> clf.predict([[0.9, 1.0]])
    array(['dog'], dtype='<U3')
    >>> clf.predict_proba([[0.9, 1.0]])
    array([[0.33333333, 0.66666667]])
    """

    def __init__(
        self,
        *,
        n_neighbors=5,
        metric="l2",
        weights="uniform",
        index="flat",
        nlist=None,
        nprobe=8,
        hnsw_m=32,
        ef_search=64,
        precision="auto",
        n_jobs=None,
    ):
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.weights = weights
        self.index = index
        self.nlist = nlist
        self.nprobe = nprobe
        self.hnsw_m = hnsw_m
        self.ef_search = ef_search
        self.precision = precision
        self.n_jobs = n_jobs

    # ------------------------------------------------------------------ parameters

    def _check_query_params(self, metric):
        """Validate the parameters read at query time (they may change after fit)."""
        _check_int("n_neighbors", self.n_neighbors)
        _check_int("nprobe", self.nprobe)
        _check_int("ef_search", self.ef_search)
        if self.n_jobs is not None and (
            isinstance(self.n_jobs, bool)
            or not isinstance(self.n_jobs, numbers.Integral)
            or self.n_jobs == 0
        ):
            raise ValueError(
                f"Expected n_jobs to be None or a non-zero integer (-1 for all CPUs), "
                f"but got n_jobs={self.n_jobs!r}."
            )
        if self.precision not in _PRECISIONS:
            raise _one_of(
                "precision", self.precision, _PRECISIONS,
                "'auto' searches in bfloat16 where the CPU has native bfloat16 units; the "
                "neighbours are exact either way.",
            )
        if self.precision == "bfloat16" and self.index != "flat":
            raise ValueError(
                f"Expected precision='auto' or 'float32' with index={self.index!r}, but got "
                f"precision='bfloat16': the bfloat16 search is the exact flat search. Use "
                f"index='flat', or leave precision='auto'."
            )
        if not callable(self.weights) and self.weights not in _WEIGHTS:
            raise _one_of("weights", self.weights, _WEIGHTS, "Or pass a callable.")
        if self.weights == "distance" and metric == "ip":
            raise ValueError(
                "Expected a metric with non-negative distances for weights='distance', but "
                "got metric='ip', whose distances (negated inner products) can be negative. "
                "Use metric='cosine' with weights='distance', or weights='uniform'."
            )

    def _check_params(self):
        if not isinstance(self.metric, str) or self.metric not in _METRICS:
            raise _one_of(
                "metric", self.metric, METRICS,
                "Use metric='l2' for the Euclidean distance of KNeighborsClassifier's default.",
            )
        if self.index not in _INDEXES:
            raise _one_of(
                "index", self.index, _INDEXES,
                "'flat' is exact; 'ivf' and 'hnsw' are approximate and faster on large data.",
            )
        _check_int("nlist", self.nlist, allow_none=True)
        _check_int("hnsw_m", self.hnsw_m, minimum=2)
        self._check_query_params(_METRICS[self.metric])

    # ------------------------------------------------------------------ fit

    def fit(self, X, y):
        """Index the training codes X with their labels y.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training codes; converted to C-contiguous float32.
        y : array-like of shape (n_samples,)
            Class labels. Multi-output (2-D) targets are not supported.

        Returns
        -------
        self : FaissKNNClassifier
            The fitted classifier.
        """
        self._check_params()
        # multi_output=True lets a 2-D y through, to refuse it here with a better message.
        X, y = validate_data(
            self, X, y, dtype=np.float32, order="C", multi_output=True
        )
        if y.ndim == 2 and y.shape[1] != 1:
            raise ValueError(
                f"Expected y of shape (n_samples,), but got shape {y.shape}: "
                f"{type(self).__name__} does not support multi-output targets. Fit one "
                f"classifier per column, e.g. with sklearn.multioutput.MultiOutputClassifier."
            )
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        self.classes_, self._y = np.unique(y, return_inverse=True)
        self.outputs_2d_ = False
        self.effective_metric_ = _METRICS[self.metric]
        if self.effective_metric_ == "cosine":
            X = _normalize_rows(X)
        n_samples, n_features = X.shape
        faiss_metric = self._faiss_metric()
        self.nlist_ = None
        # What searches need, built on demand: "faiss" (the faiss index) and "bfloat16" (the
        # bfloat16 search). A dict filled in place, so that queries leave __dict__ unchanged.
        self._cache = {}
        self._flat_codes = None
        if self.index == "flat":
            # The exact searches work from the codes themselves. Kept by reference when X is
            # already C-contiguous float32, as KNeighborsClassifier keeps its _fit_X; faiss's
            # index is a copy, built only for a float32 search, since copying 50,000 x 1280
            # codes costs as much as building the bfloat16 search.
            self._flat_codes = X
            if self._uses_bfloat16():  # either set-up is part of fitting
                self._bfloat16_search()
            else:
                self._faiss_index()
        else:
            with _omp_threads(self.n_jobs):
                if self.index == "hnsw":
                    index = faiss.IndexHNSWFlat(n_features, int(self.hnsw_m), faiss_metric)
                else:
                    nlist = default_nlist(n_samples) if self.nlist is None else int(self.nlist)
                    if nlist > n_samples:
                        raise ValueError(
                            f"Expected nlist <= n_samples for index='ivf', but nlist = {nlist}, "
                            f"n_samples = {n_samples}. Lower nlist (or leave it None for "
                            f"{default_nlist(n_samples)}), or fit on more samples."
                        )
                    quantizer = faiss.IndexFlat(n_features, faiss_metric)
                    index = faiss.IndexIVFFlat(quantizer, n_features, nlist, faiss_metric)
                    index.train(X)
                    # kneighbors(X=None) reconstructs the training rows by id.
                    index.make_direct_map()
                    self.nlist_ = nlist
                index.add(X)
            self._cache["faiss"] = index
        self.n_samples_fit_ = int(n_samples)
        return self

    # ------------------------------------------------------------------ search

    def _faiss_metric(self):
        return faiss.METRIC_L2 if self.effective_metric_ == "euclidean" else faiss.METRIC_INNER_PRODUCT

    @property
    def index_(self):
        """The faiss index of the fitted codes (for ``index="flat"``, built at its first use)."""
        cache = self.__dict__.get("_cache")
        if cache is None:
            raise AttributeError(f"{type(self).__name__} has no index_ before fit.")
        return self._faiss_index()

    def _faiss_index(self):
        """The flat faiss index over the fitted codes: IndexFlatL2 or IndexFlatIP."""
        cache = self._cache
        if "faiss" not in cache:
            # the classes that deserialize_index gives back
            flat = faiss.IndexFlatL2 if self._faiss_metric() == faiss.METRIC_L2 else faiss.IndexFlatIP
            index = flat(self._flat_codes.shape[1])
            with _omp_threads(self.n_jobs):
                index.add(self._flat_codes)
            cache["faiss"] = index
        return cache["faiss"]

    def _uses_bfloat16(self):
        if self.index != "flat" or self._flat_codes is None:
            return False
        if self.precision == "auto":
            from cnncodes._extract.accel import cpu_has_fast_bf16

            return cpu_has_fast_bf16()
        return self.precision == "bfloat16"

    def _bfloat16_search(self):
        """The bfloat16 search over the fitted codes (which it keeps by reference)."""
        from cnncodes._classify.bfsearch import BFloat16Flat

        cache = self._cache
        if "bfloat16" not in cache:
            metric = "l2" if self.effective_metric_ == "euclidean" else "ip"
            with self._threads():
                cache["bfloat16"] = BFloat16Flat(self._flat_codes, metric)
        return cache["bfloat16"]

    def _threads(self):
        from cnncodes._classify.bfsearch import torch_threads

        return torch_threads(_n_threads(self.n_jobs))

    def _search(self, Xq, k):
        """Return faiss's (D, I) for float32 queries, re-searching rows with missing hits."""
        k = int(k)
        if self._uses_bfloat16():
            searcher = self._bfloat16_search()
            with self._threads():
                D, I = searcher.search(Xq, k)
            return D.astype(np.float32), I
        index = self.index_
        params = exhaustive = None
        if isinstance(index, faiss.IndexIVF):
            params = faiss.SearchParametersIVF(nprobe=min(int(self.nprobe), index.nlist))
            exhaustive = faiss.SearchParametersIVF(nprobe=index.nlist)
        elif isinstance(index, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW(efSearch=max(int(self.ef_search), k))
            exhaustive = faiss.SearchParametersHNSW(efSearch=max(self.n_samples_fit_, k))
        with _omp_threads(self.n_jobs):
            D, I = index.search(Xq, k, params=params)
            # An approximate search can find fewer than k points (the visited IVF lists hold
            # fewer, or the graph walk ends early): faiss pads with -1. Those rows are searched
            # again exhaustively, so every query gets k real neighbours.
            missing = np.flatnonzero((I < 0).any(axis=1))
            if missing.size and exhaustive is not None:
                D[missing], I[missing] = index.search(Xq[missing], k, params=exhaustive)
        if (I < 0).any():  # pragma: no cover - k <= n_samples_fit_ is checked before
            raise RuntimeError(
                f"faiss returned fewer than {k} neighbours for some queries although the "
                f"index holds {index.ntotal} vectors; refit with index='flat'."
            )
        return D, I

    def _to_distance(self, D):
        """Turn faiss's scores into scikit-learn's distances (smaller is nearer)."""
        if self.effective_metric_ == "euclidean":  # faiss gives squared L2
            return np.sqrt(np.maximum(D, 0, out=D), out=D)
        if self.effective_metric_ == "cosine":  # inner products of unit rows
            return np.clip(1 - D, 0, 2, out=D)
        return np.negative(D, out=D)

    def _check_n_neighbors(self, k, n_queries, query_is_train=False):
        _check_int("n_neighbors", k)
        if query_is_train and k >= self.n_samples_fit_:
            raise ValueError(
                f"Expected n_neighbors < n_samples_fit when X is None (each training point "
                f"is left out of its own neighbours), but n_neighbors = {k}, "
                f"n_samples_fit = {self.n_samples_fit_}. Pass n_neighbors <= "
                f"{self.n_samples_fit_ - 1}, or fit on more samples."
            )
        if k > self.n_samples_fit_:
            raise ValueError(
                f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {k}, "
                f"n_samples_fit = {self.n_samples_fit_}, n_samples = {n_queries}. Pass "
                f"n_neighbors <= {self.n_samples_fit_}, or fit on more samples."
            )

    def _kneighbors_of_training_set(self, k):
        """Neighbours of every training point, the point itself left out (as scikit-learn)."""
        n = self.n_samples_fit_
        all_D = np.empty((n, k), dtype=np.float32)
        all_I = np.empty((n, k), dtype=np.int64)
        for start in range(0, n, _TRAIN_QUERY_BATCH):
            stop = min(start + _TRAIN_QUERY_BATCH, n)
            if self._flat_codes is not None:
                Xq = self._flat_codes[start:stop]
            else:
                Xq = np.ascontiguousarray(self.index_.reconstruct_n(start, stop - start))
            D, I = self._search(Xq, k + 1)
            keep = I != np.arange(start, stop)[:, None]
            # The point itself is not among its k + 1 hits: either an exact search found
            # k + 1 duplicates of it (scikit-learn then drops the first), or an approximate
            # search missed it (then the farthest hit goes).
            lost = keep.all(axis=1)
            keep[lost, 0 if self._flat_codes is not None else k] = False
            all_D[start:stop] = D[keep].reshape(-1, k)
            all_I[start:stop] = I[keep].reshape(-1, k)
        return all_D, all_I

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True):
        """Find the k nearest training points of each query.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            Query codes. None: the training points, each left out of its own neighbours.
        n_neighbors : int, default=None
            Number of neighbours; None uses the ``n_neighbors`` parameter.
        return_distance : bool, default=True
            Whether to return the distances too.

        Returns
        -------
        neigh_dist : ndarray of shape (n_queries, n_neighbors), float32
            Distances, nearest first: Euclidean for ``"l2"``, ``1 - cos`` for ``"cosine"``,
            the negated inner product ``-<x, y>`` for ``"ip"``. Only with
            ``return_distance=True``.
        neigh_ind : ndarray of shape (n_queries, n_neighbors), int64
            Row indices of the neighbours in the training data.
        """
        check_is_fitted(self)
        self._check_query_params(self.effective_metric_)
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        if X is None:
            self._check_n_neighbors(k, self.n_samples_fit_, query_is_train=True)
            D, I = self._kneighbors_of_training_set(k)
        else:
            X = validate_data(self, X, reset=False, dtype=np.float32, order="C")
            if self.effective_metric_ == "cosine":
                X = _normalize_rows(X)
            self._check_n_neighbors(k, X.shape[0])
            D, I = self._search(X, k)
        return (self._to_distance(D), I) if return_distance else I

    # ------------------------------------------------------------------ classify

    def _weights_of(self, dist):
        if self.weights == "uniform":
            return None
        dist = dist.astype(np.float64)
        if self.weights == "distance":
            with np.errstate(divide="ignore"):
                weights = 1.0 / dist
            # A query that coincides with training points is labelled by those points only.
            inf_mask = np.isinf(weights)
            inf_row = inf_mask.any(axis=1)
            weights[inf_row] = inf_mask[inf_row]
            return weights
        return np.asarray(self.weights(dist), dtype=np.float64)

    def predict_proba(self, X):
        """Return the class probabilities of each query: the (weighted) share of its votes.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features) or None
            Query codes. None: the training points, each left out of its own neighbours.

        Returns
        -------
        proba : ndarray of shape (n_queries, n_classes)
            Probabilities, columns in the order of ``classes_``.
        """
        check_is_fitted(self)
        dist, ind = self.kneighbors(X)
        weights = self._weights_of(dist)
        n_queries, n_classes = ind.shape[0], len(self.classes_)
        cells = (np.arange(n_queries)[:, None] * n_classes + self._y[ind]).ravel()
        votes = np.bincount(
            cells,
            weights=None if weights is None else weights.ravel(),
            minlength=n_queries * n_classes,
        ).reshape(n_queries, n_classes)
        total = votes.sum(axis=1, keepdims=True)
        total[total == 0] = 1
        return votes / total

    def predict(self, X):
        """Return the class of each query with the most (weighted) votes.

        Ties go to the class that comes first in ``classes_``, as in scikit-learn.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features) or None
            Query codes. None: the training points, each left out of its own neighbours.

        Returns
        -------
        y : ndarray of shape (n_queries,)
            Predicted labels.
        """
        check_is_fitted(self)
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    # ------------------------------------------------------------------ persistence

    def __getstate__(self):
        # dict(): object.__getstate__ may hand back __dict__ itself, which must not change.
        state = dict(super().__getstate__())
        cache = state.pop("_cache", None)
        # A flat model is its codes (the searches are rebuilt from them at their first use);
        # an approximate index is kept as the uint8 array of faiss.serialize_index.
        if cache is not None and state.get("_flat_codes") is None:
            state["index_"] = faiss.serialize_index(cache["faiss"])
        return state

    def __setstate__(self, state):
        state = dict(state)
        index = state.pop("index_", None)
        if index is not None:
            state["_cache"] = {"faiss": faiss.deserialize_index(index)}
        elif "_flat_codes" in state:  # fitted, flat
            state["_cache"] = {}
        super().__setstate__(state)
FaissKNNClassifier.__module__ = 'cnncodes'  # the public name goes into model files: they load after any internal move


