"""Tests of FaissKNNClassifier: sklearn's estimator battery, parity with KNeighborsClassifier,
the approximate indexes, error messages and persistence (pickle, clone, skops)."""

import copy
import doctest
import pickle
import re

import faiss
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.neighbors import KNeighborsClassifier
from sklearn.utils.estimator_checks import parametrize_with_checks

import cnncodes._classify.knn
from cnncodes._classify.knn import FaissKNNClassifier, default_nlist

skops_io = pytest.importorskip("skops.io")

SKLEARN_METRIC = {"l2": "euclidean", "cosine": "cosine"}


def gaussian(n_train=500, n_query=200, dim=64, n_classes=4, seed=0):
    """Random gaussian codes and labels: no ties between distances."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_train + n_query, dim)).astype(np.float32)
    y = rng.integers(n_classes, size=n_train + n_query)
    return X[:n_train], y[:n_train], X[n_train:]


def clustered(n, dim, n_classes=10, modes=4, sep=0.8, seed=0):
    """Code-like data: a few gaussian modes per class, rectified like pooled CNN activations."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=sep, size=(n_classes, modes, dim))
    y = rng.integers(n_classes, size=n)
    X = centers[y, rng.integers(modes, size=n)] + rng.normal(size=(n, dim))
    return np.maximum(X, 0).astype(np.float32), y


# ------------------------------------------------------------------ estimator battery


@parametrize_with_checks(
    [
        FaissKNNClassifier(),
        FaissKNNClassifier(metric="cosine", weights="distance"),
        FaissKNNClassifier(index="hnsw"),
        FaissKNNClassifier(index="ivf", nprobe=2),
        FaissKNNClassifier(metric="ip"),
        FaissKNNClassifier(precision="float32"),
        FaissKNNClassifier(precision="bfloat16", metric="cosine"),
    ],
    # No expected failures: every check of the battery passes.
)
def test_sklearn_estimator_checks(estimator, check):
    """Check that the classifier passes scikit-learn's estimator checks."""
    check(estimator)


# ------------------------------------------------------------------ parity with scikit-learn


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("weights", ["uniform", "distance"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_same_as_kneighborsclassifier(metric, weights, precision):
    """Check that neighbours, distances, probabilities and labels are those of sklearn's brute KNN."""
    X, y, Q = gaussian()
    ours = FaissKNNClassifier(metric=metric, weights=weights, precision=precision).fit(X, y)
    ref = KNeighborsClassifier(algorithm="brute", metric=SKLEARN_METRIC[metric], weights=weights)
    ref.fit(X, y)

    dist, ind = ours.kneighbors(Q)
    ref_dist, ref_ind = ref.kneighbors(Q)
    np.testing.assert_array_equal(ind, ref_ind)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours.predict_proba(Q), ref.predict_proba(Q), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(ours.predict(Q), ref.predict(Q))

    # other n_neighbors, indices only
    np.testing.assert_array_equal(
        ours.kneighbors(Q, n_neighbors=17, return_distance=False),
        ref.kneighbors(Q, n_neighbors=17, return_distance=False),
    )
    # X=None: the training points, each left out of its own neighbours
    dist, ind = ours.kneighbors()
    ref_dist, ref_ind = ref.kneighbors()
    np.testing.assert_array_equal(ind, ref_ind)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(ours.predict(None), ref.predict(None))


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_same_as_kneighborsclassifier_on_codes(metric, precision):
    """Check that on clustered, rectified code-like data with string labels the labels match sklearn's."""
    X, y = clustered(3000, 256, sep=0.4)
    names = np.array(["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay"])
    X, Q, y, yq = X[:2500], X[2500:], names[y[:2500]], names[y[2500:]]
    ours = FaissKNNClassifier(n_neighbors=7, metric=metric, precision=precision).fit(X, y)
    ref = KNeighborsClassifier(7, algorithm="brute", metric=SKLEARN_METRIC[metric]).fit(X, y)
    np.testing.assert_array_equal(ours.classes_, ref.classes_)
    pred = ours.predict(Q)
    np.testing.assert_array_equal(pred, ref.predict(Q))
    assert 0.6 < np.mean(pred == yq) < 0.95  # neither trivial nor noise: votes are contested
    np.testing.assert_array_equal(ours.kneighbors(Q)[1], ref.kneighbors(Q)[1])
    np.testing.assert_allclose(ours.predict_proba(Q), ref.predict_proba(Q))


def test_exact_matches_get_all_the_weight():
    """Check that with weights='distance' a query equal to a training point takes its label only."""
    X = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 1.1], [0.0, 1.2]], dtype=np.float32)
    clf = FaissKNNClassifier(n_neighbors=3, weights="distance").fit(X, [0, 1, 1, 1])
    np.testing.assert_array_equal(clf.predict_proba([[0.0, 0.0]]), [[1.0, 0.0]])
    np.testing.assert_array_equal(clf.predict([[0.0, 0.0], [0.0, 0.8]]), [0, 1])


def test_callable_weights():
    """Check that a callable gets the distances and its weights drive the vote, as in sklearn."""
    X, y, Q = gaussian()
    weights = lambda dist: np.exp(-dist)  # noqa: E731
    ours = FaissKNNClassifier(n_neighbors=9, weights=weights).fit(X, y)
    ref = KNeighborsClassifier(9, algorithm="brute", weights=weights).fit(X, y)
    np.testing.assert_allclose(ours.predict_proba(Q), ref.predict_proba(Q), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(ours.predict(Q), ref.predict(Q))


def test_inner_product_distances_are_negated_similarities():
    """Check that metric='ip' returns -<x, y>, nearest (largest product) first."""
    X, y, Q = gaussian(n_train=300, n_query=20)
    dist, ind = FaissKNNClassifier(metric="ip", n_neighbors=4).fit(X, y).kneighbors(Q)
    products = Q.astype(np.float64) @ X.T.astype(np.float64)
    np.testing.assert_array_equal(ind, np.argsort(-products, axis=1)[:, :4])
    np.testing.assert_allclose(dist, -np.take_along_axis(products, ind, axis=1), rtol=1e-4)
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_training_points_with_duplicates_leave_themselves_out():
    """Check that kneighbors(X=None) never returns a point as its own neighbour, even duplicated."""
    X, y, _ = gaussian(n_train=50)
    X, y = np.repeat(X, 3, axis=0), np.repeat(y, 3)
    for index in ["flat", "hnsw", "ivf"]:
        dist, ind = FaissKNNClassifier(n_neighbors=2, index=index).fit(X, y).kneighbors()
        assert not np.any(ind == np.arange(len(X))[:, None]), index
        np.testing.assert_allclose(dist, 0, atol=1e-3)
        assert np.all(ind // 3 == np.arange(len(X))[:, None] // 3), index


def test_n_jobs_sets_and_restores_faiss_threads():
    """Check that n_jobs gives the same answers and leaves faiss's thread count as it was."""
    X, y, Q = gaussian()
    before = faiss.omp_get_max_threads()
    one = FaissKNNClassifier(n_jobs=1).fit(X, y)
    np.testing.assert_array_equal(one.predict(Q), FaissKNNClassifier(n_jobs=-1).fit(X, y).predict(Q))
    assert faiss.omp_get_max_threads() == before


# ------------------------------------------------------------------ approximate indexes


@pytest.fixture(scope="module")
def codes_20k():
    """20k x 128 clustered training codes, 1000 queries, and their exact 10 neighbours."""
    X, y = clustered(21000, 128)
    X, Q, y, yq = X[:20000], X[20000:], y[:20000], y[20000:]
    exact = FaissKNNClassifier(n_neighbors=10).fit(X, y)
    return X, y, Q, yq, exact.kneighbors(Q, return_distance=False), exact.score(Q, yq)


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_index_recall_and_accuracy(codes_20k, index):
    """Check that IVF and HNSW find >= 90 % of the exact 10 neighbours and classify as well."""
    X, y, Q, yq, exact_ind, exact_score = codes_20k
    clf = FaissKNNClassifier(n_neighbors=10, index=index).fit(X, y)
    ind = clf.kneighbors(Q, return_distance=False)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ind, exact_ind)])
    assert recall >= 0.9, recall
    assert clf.score(Q, yq) >= exact_score - 0.02
    assert clf.nlist_ == (default_nlist(20000) if index == "ivf" else None)


def test_query_time_parameters_need_no_refit():
    """Check that nprobe = nlist makes a fitted IVF index exact without refitting."""
    X, y, Q = gaussian(n_train=2000)
    exact = FaissKNNClassifier(n_neighbors=10).fit(X, y).kneighbors(Q, return_distance=False)
    ivf = FaissKNNClassifier(n_neighbors=10, index="ivf", nlist=40, nprobe=1).fit(X, y)
    assert not np.array_equal(ivf.kneighbors(Q, return_distance=False), exact)
    ivf.set_params(nprobe=40)
    np.testing.assert_array_equal(ivf.kneighbors(Q, return_distance=False), exact)


def test_short_ivf_lists_still_give_k_neighbours():
    """Check that queries whose visited IVF lists hold fewer than k points get k real neighbours."""
    X, y, Q = gaussian(n_train=400)
    exact = FaissKNNClassifier(n_neighbors=100).fit(X, y).kneighbors(Q, return_distance=False)
    ivf = FaissKNNClassifier(n_neighbors=100, index="ivf", nlist=10, nprobe=1).fit(X, y)
    ind = ivf.kneighbors(Q, return_distance=False)
    assert ind.min() >= 0
    np.testing.assert_array_equal(np.sort(ind, axis=1), np.sort(exact, axis=1))


def test_default_nlist():
    """Check that the default nlist is about 4 sqrt(n), with >= 39 points per list."""
    assert default_nlist(50_000) == 894
    assert default_nlist(20_000) == 512
    assert default_nlist(100) == 2
    assert default_nlist(1) == 1


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "params, message",
    [
        ({"metric": "manhattan"},
         "Expected metric to be one of 'l2', 'cosine', 'ip', but got metric='manhattan'"),
        ({"weights": "gaussian"},
         "Expected weights to be one of 'uniform', 'distance', but got weights='gaussian'"),
        ({"index": "ivfpq"},
         "Expected index to be one of 'flat', 'ivf', 'hnsw', but got index='ivfpq'"),
        ({"n_neighbors": 0}, "Expected n_neighbors to be an integer >= 1, but got n_neighbors=0"),
        ({"n_neighbors": 2.5}, "Expected n_neighbors to be an integer >= 1, but got n_neighbors=2.5"),
        ({"nlist": -3}, "Expected nlist to be an integer >= 1 or None, but got nlist=-3"),
        ({"n_jobs": 0}, "Expected n_jobs to be None or a non-zero integer"),
        ({"metric": "ip", "weights": "distance"}, "Expected a metric with non-negative distances"),
        ({"index": "ivf", "nlist": 50},
         "Expected nlist <= n_samples for index='ivf', but nlist = 50, n_samples = 20"),
    ],
    ids=["metric", "weights", "index", "n_neighbors-0", "n_neighbors-float", "nlist", "n_jobs",
         "ip-distance", "nlist-too-large"],
)
def test_bad_parameters(params, message):
    """Check that fit refuses bad parameters with a message naming the value and the choices."""
    X, y, _ = gaussian(n_train=20)
    with pytest.raises(ValueError, match=re.escape(message)):
        FaissKNNClassifier(**params).fit(X, y)


def test_too_many_neighbours():
    """Check that asking for more neighbours than fitted samples says both numbers."""
    X, y, Q = gaussian(n_train=5, n_query=3)
    clf = FaissKNNClassifier(n_neighbors=6).fit(X, y)
    expected = "Expected n_neighbors <= n_samples_fit, but n_neighbors = 6, n_samples_fit = 5"
    with pytest.raises(ValueError, match=re.escape(expected)):
        clf.predict(Q)
    with pytest.raises(ValueError, match=re.escape("n_neighbors = 9, n_samples_fit = 5")):
        clf.kneighbors(Q, n_neighbors=9)
    with pytest.raises(ValueError, match=re.escape("Expected n_neighbors < n_samples_fit when X is None")):
        clf.kneighbors(n_neighbors=5)
    assert clf.kneighbors(Q, n_neighbors=5)[1].shape == (3, 5)


def test_predict_before_fit():
    """Check that predict, predict_proba and kneighbors before fit raise NotFittedError."""
    clf = FaissKNNClassifier()
    for method in (clf.predict, clf.predict_proba, clf.kneighbors):
        with pytest.raises(NotFittedError, match="is not fitted yet"):
            method(np.zeros((2, 4)))


def test_wrong_number_of_features():
    """Check that queries with another number of features are refused with both numbers."""
    X, y, _ = gaussian(dim=4)
    clf = FaissKNNClassifier().fit(X, y)
    with pytest.raises(ValueError, match="X has 3 features, but FaissKNNClassifier is expecting 4"):
        clf.predict(np.zeros((2, 3)))


def test_multi_output_targets_are_refused():
    """Check that a 2-D y is refused with the shape and a way out."""
    X, y, _ = gaussian(n_train=20)
    with pytest.raises(ValueError, match=re.escape("but got shape (20, 2)") + ".*MultiOutputClassifier"):
        FaissKNNClassifier().fit(X, np.c_[y, y])


def test_continuous_targets_are_refused():
    """Check that regression targets are refused like sklearn's classifiers do."""
    X, _, _ = gaussian(n_train=20)
    with pytest.raises(ValueError, match="Unknown label type"):
        FaissKNNClassifier().fit(X, np.linspace(0, 1, 20))


# ------------------------------------------------------------------ persistence


FITTED = [
    pytest.param({}, id="flat"),
    pytest.param({"metric": "cosine", "weights": "distance"}, id="cosine"),
    pytest.param({"index": "ivf"}, id="ivf"),
    pytest.param({"index": "hnsw", "metric": "ip"}, id="hnsw-ip"),
]


def _fitted(params):
    X, y, Q = gaussian(n_train=800)
    labels = np.array(["daisy", "rose", "tulip", "iris"])[y]
    return FaissKNNClassifier(**params).fit(X, labels), Q


@pytest.mark.parametrize("params", FITTED)
def test_pickle_and_deepcopy_round_trip(params):
    """Check that pickled and deep-copied models give the same answers and the original still works."""
    clf, Q = _fitted(params)
    dist, ind = clf.kneighbors(Q)
    for other in (pickle.loads(pickle.dumps(clf)), copy.deepcopy(clf)):
        assert type(other.index_) is type(clf.index_)
        assert other.index_ is not clf.index_
        np.testing.assert_array_equal(other.kneighbors(Q)[1], ind)
        np.testing.assert_array_equal(other.kneighbors(Q)[0], dist)
        np.testing.assert_array_equal(other.predict(Q), clf.predict(Q))
        np.testing.assert_array_equal(other.kneighbors()[1], clf.kneighbors()[1])
    assert isinstance(clf.index_, faiss.Index)


@pytest.mark.parametrize("params", FITTED)
def test_skops_round_trip(params):
    """Check that skops saves the model with only numpy and builtin state and loads it back."""
    clf, Q = _fitted(params)
    state = clf.__getstate__()
    if clf.index == "flat":  # the codes themselves
        np.testing.assert_array_equal(state["_flat_codes"], clf._flat_codes)
        assert "index_" not in state
    else:
        assert isinstance(state["index_"], np.ndarray) and state["index_"].dtype == np.uint8
    allowed = (np.ndarray, str, int, float, bool, type(None))
    assert all(isinstance(v, allowed) for v in state.values()), {k: type(v) for k, v in state.items()}

    data = skops_io.dumps(clf)
    untrusted = skops_io.get_untrusted_types(data=data)
    assert untrusted == ["cnncodes.FaissKNNClassifier"]  # its public name, stable across moves
    loaded = skops_io.loads(data, trusted=untrusted)
    np.testing.assert_array_equal(loaded.predict(Q), clf.predict(Q))
    np.testing.assert_array_equal(loaded.predict_proba(Q), clf.predict_proba(Q))
    assert loaded.get_params() == clf.get_params()


def test_clone_is_unfitted_with_same_params():
    """Check that clone copies the parameters and none of the fitted state."""
    clf, _ = _fitted({"index": "hnsw", "ef_search": 100, "n_neighbors": 3})
    twin = clone(clf)
    assert twin.get_params() == clf.get_params()
    assert not hasattr(twin, "index_")
    with pytest.raises(NotFittedError):
        twin.predict(np.zeros((1, 64)))


def test_docstring_example():
    """Check that the examples in the module's docstrings run as written."""
    # The class's __module__ is its public name (cnncodes), so the examples are found from it.
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    module = cnncodes._classify.knn
    for test in doctest.DocTestFinder().find(module, globs=vars(module)) + doctest.DocTestFinder().find(
            module.FaissKNNClassifier, "FaissKNNClassifier", globs=vars(module)):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------ the bfloat16 search


def float64_brute_force(X, Q, k, metric):
    """Reference neighbours: float64 distances (or products), ties to the lower row index."""
    X64, Q64 = X.astype(np.float64), Q.astype(np.float64)
    if metric == "ip":
        score = -(Q64 @ X64.T)
    else:
        score = (Q64 ** 2).sum(1)[:, None] + (X64 ** 2).sum(1)[None, :] - 2 * Q64 @ X64.T
    order = np.argsort(score, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(score, order, axis=1), order


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_bfloat16_scores_stay_within_their_proven_bound(metric):
    """Check that every bfloat16 score lies within the error bound the search certifies with."""
    import torch

    from cnncodes._classify.bfsearch import C_OUT, BFloat16Flat

    X, _ = clustered(2000, 384, sep=0.4, seed=1)
    X[:10] *= 1000.0  # far-off rows with large norms widen the range of scores
    Q, _ = clustered(300, 384, sep=0.4, seed=2)
    search = BFloat16Flat(X, metric)
    S, E = search._scores(torch.from_numpy(Q))
    fl = S.double().numpy()
    X64, Q64 = X.astype(np.float64), Q.astype(np.float64)
    mu = search.mu.double().numpy()  # the centring vector
    exact = Q64 @ (X64 - mu).T  # ip: s = <q, x - mu>
    if metric == "l2":  # s = <q - mu, x - mu> - ||x - mu||^2 / 2
        exact = (Q64 - mu) @ (X64 - mu).T - 0.5 * ((X64 - mu) ** 2).sum(1)[None, :]
    error = np.abs(fl - exact)
    bound = C_OUT * np.abs(fl) + E.numpy()[:, None]
    assert np.all(error <= bound)
    assert np.max(error / bound) > 0.01  # the bound is not vacuous: errors reach a share of it
    assert np.any(fl != exact)  # and the scores really are rounded


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_bfloat16_search_finds_the_float64_neighbours(metric):
    """Check that the bfloat16 search returns the neighbours and values of a float64 brute force."""
    from cnncodes._classify.bfsearch import BFloat16Flat

    X, _ = clustered(6000, 256, sep=0.4, seed=3)
    Q, _ = clustered(700, 256, sep=0.4, seed=4)
    search = BFloat16Flat(X, metric)
    D, I = search.search(Q, 10)
    ref_D, ref_I = float64_brute_force(X, Q, 10, metric)
    np.testing.assert_array_equal(I, ref_I)
    np.testing.assert_allclose(D, -ref_D if metric == "ip" else ref_D, rtol=1e-9, atol=1e-9)
    assert search.stats["queries"] == 700 and search.stats["brute_force"] == 0


def test_bfloat16_search_falls_back_when_the_bound_cannot_separate():
    """Check that near-ties bfloat16 cannot tell apart are re-searched and answered exactly."""
    from cnncodes._classify.bfsearch import BFloat16Flat

    rng = np.random.default_rng(5)
    # 3,000 codes on a shell around the query, at distances 1 +- 1e-5: far below bfloat16's
    # resolution, so no top-13 of the first pass can be certified.
    directions = rng.normal(size=(3000, 64))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    radius = 1 + 1e-5 * rng.uniform(-1, 1, size=(3000, 1))
    center = rng.normal(size=64) * 10
    X = (center + directions * radius).astype(np.float32)
    Q = center[None, :].astype(np.float32).repeat(3, axis=0)
    search = BFloat16Flat(X, "l2")
    D, I = search.search(Q, 5)
    ref_D, ref_I = float64_brute_force(X, Q, 5, "l2")
    np.testing.assert_array_equal(I, ref_I)
    assert search.stats["retried"] == 3 and search.stats["brute_force"] == 3


def test_precision_auto_follows_the_cpu(monkeypatch):
    """Check that precision='auto' searches in bfloat16 only on a CPU with native bfloat16 units."""
    import cnncodes._extract.accel

    X, y, Q = gaussian()
    monkeypatch.setattr(cnncodes._extract.accel, "cpu_has_fast_bf16", lambda: False)
    clf = FaissKNNClassifier().fit(X, y)
    clf.predict(Q)
    assert not clf._uses_bfloat16() and "bfloat16" not in clf._cache
    monkeypatch.setattr(cnncodes._extract.accel, "cpu_has_fast_bf16", lambda: True)
    clf = FaissKNNClassifier().fit(X, y)
    assert clf._uses_bfloat16() and clf._cache["bfloat16"].stats["queries"] == 0
    assert "faiss" not in clf._cache  # the float32 index is built only when needed
    clf.predict(Q)
    assert clf._cache["bfloat16"].stats["queries"] == len(Q)
    # read at query time, like nprobe: no refit needed
    clf.set_params(precision="float32")
    assert not clf._uses_bfloat16()
    np.testing.assert_array_equal(clf.predict(Q), clf.set_params(precision="bfloat16").predict(Q))


def test_precision_errors_say_what_to_do():
    """Check the messages for an unknown precision and for bfloat16 with an approximate index."""
    X, y, _ = gaussian(n_train=100)
    with pytest.raises(ValueError, match=r"precision to be one of 'auto', 'float32', 'bfloat16'.*'auto' searches"):
        FaissKNNClassifier(precision="float16").fit(X, y)
    with pytest.raises(ValueError, match=r"precision='bfloat16'.*exact flat search\. Use index='flat'"):
        FaissKNNClassifier(index="ivf", precision="bfloat16").fit(X, y)


def test_bfloat16_search_survives_pickling():
    """Check that a pickled model drops the bfloat16 copy of its codes and rebuilds it on use."""
    X, y, Q = gaussian()
    clf = FaissKNNClassifier(precision="bfloat16").fit(X, y)
    assert "bfloat16" in clf._cache
    blob = pickle.dumps(clf)
    assert len(blob) < X.nbytes * 1.2  # the float32 codes only, not the bfloat16 rows too
    back = pickle.loads(blob)
    assert back._cache == {}
    np.testing.assert_array_equal(back.predict(Q), clf.predict(Q))
    assert "bfloat16" in back._cache


def test_bfloat16_search_orders_equal_distances_by_row():
    """Check that duplicated codes (equal float64 distances) come back lower row first."""
    from cnncodes._classify.bfsearch import BFloat16Flat

    X, _ = clustered(1500, 128, sep=0.4, seed=6)
    X = np.concatenate([X, X[::-1]])  # every code twice, the copies in reverse order
    Q, _ = clustered(200, 128, sep=0.4, seed=7)
    D, I = BFloat16Flat(X, "l2").search(Q, 6)
    ref_D, ref_I = float64_brute_force(X, Q, 6, "l2")
    np.testing.assert_array_equal(I, ref_I)
    assert np.all(D[:, 0] == D[:, 1])  # the nearest code and its copy


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_bfloat16_search_of_few_codes_is_a_float64_brute_force(metric, monkeypatch):
    """Check that an index too small for candidates, searched in small blocks, is still exact."""
    import cnncodes._classify.bfsearch as bf

    monkeypatch.setattr(bf, "FALLBACK_ROWS", 3)  # blocks of codes and of queries to merge
    monkeypatch.setattr(bf, "BUILD_ROWS", 3)
    monkeypatch.setattr(bf, "BLOCK_QUERIES", 4)
    X, _ = clustered(10, 16, seed=8)
    X = np.concatenate([X, X])  # ties across blocks: the lower row comes first
    Q, _ = clustered(9, 16, seed=9)
    search = bf.BFloat16Flat(X, metric)
    D, I = search.search(Q, 13)  # 13 + EXTRA >= 20 codes: every query by brute force
    ref_D, ref_I = float64_brute_force(X, Q, 13, metric)
    np.testing.assert_array_equal(I, ref_I)
    assert search.stats["brute_force"] == 9 and search.stats["queries"] == 0


@pytest.mark.parametrize("n", [15 * 16, 16 * 16, 16 * 16 + 15, 5003])
@pytest.mark.parametrize("kp", [1, 9, 39])
def test_top_scores_equal_torch_topk(n, kp):
    """Check that the grouped top-k gives torch.topk's scores, with distinct in-range columns."""
    import torch

    from cnncodes._classify.bfsearch import TOP_GROUPS, top_scores

    assert TOP_GROUPS == 16  # the sizes above straddle n // TOP_GROUPS == kp and the tail
    gen = torch.Generator().manual_seed(n * 100 + kp)
    smooth = torch.randn(50, n, generator=gen)
    tied = (smooth * 2).round()  # few distinct values: ties across groups and the tail
    tail_wins = torch.zeros(50, n)
    tail_wins[:, -(n % TOP_GROUPS or 1):] = 1.0  # the largest scores in the last columns
    for S in (smooth, tied, tail_wins):
        S = S.to(torch.bfloat16)
        top, cols = top_scores(S, kp)
        want = torch.topk(S, kp, dim=1).values
        assert torch.equal(top.sort(1, descending=True).values, want)
        assert torch.equal(S.gather(1, cols), top)
        assert cols.min() >= 0 and cols.max() < n
        assert all(len(set(row.tolist())) == kp for row in cols)


def test_flat_faiss_index_is_built_only_when_a_search_needs_it():
    """Check that a bfloat16 flat model copies its codes into faiss only when index_ is used."""
    X, y, Q = gaussian()
    clf = FaissKNNClassifier(precision="bfloat16").fit(X, y)
    assert clf._flat_codes is X  # C-contiguous float32: kept by reference, as scikit-learn does
    clf.predict(Q)
    clf.kneighbors()  # the training set's own neighbours come from the codes too
    assert set(clf._cache) == {"bfloat16"}
    index = clf.index_
    assert isinstance(index, faiss.IndexFlatL2) and index.ntotal == len(X)
    np.testing.assert_array_equal(index.reconstruct_n(0, len(X)), X)
    assert clf.index_ is index
    float32 = FaissKNNClassifier(precision="float32").fit(X, y)
    assert set(float32._cache) == {"faiss"}  # built at fit, where its cost belongs
