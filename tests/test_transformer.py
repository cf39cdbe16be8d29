"""Tests of CNNCodes, the scikit-learn transformer: pipelines, CV, the cache, arrays, errors."""

import hashlib
import pickle
import re
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.utils import estimator_checks

import cnncodes._transform.transformer as transformer_module
from cnncodes import (
    CnnCodesError,
    CodeStore,
    SourceError,
    UnknownBackboneError,
    UnknownLayerError,
    extract,
)
from cnncodes._store.store import StoreLock
from cnncodes import CNNCodes, FailedImagesError

SMALL = dict(image_size=64, num_workers=0)


@pytest.fixture(scope="module")
def paths(sample_dir):
    """The 40 bundled photos as path strings, sorted."""
    return sorted(str(p) for p in sample_dir.rglob("*.jpg"))


@pytest.fixture(scope="module")
def labels(paths):
    return [Path(p).parent.name for p in paths]


@pytest.fixture
def extractions(monkeypatch):
    """Record every extract() call of the transformer: (layer, images asked, n_extracted)."""
    calls = []
    real = transformer_module.extract

    def counting(source, **kw):
        result = real(source, **kw)
        calls.append((kw["layers"][0], len(source), result.n_extracted))
        return result

    monkeypatch.setattr(transformer_module, "extract", counting)
    return calls


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _small_images(paths, size=64):
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size))) for p in paths])


# --------------------------------------------------------------------------- pipelines


def test_pipeline_fits_and_predicts_on_paths(paths, labels, tmp_path):
    """Check that CNNCodes + LogisticRegression fit and predict on paths, with extract()'s codes."""
    model = make_pipeline(CNNCodes(layer="block4", cache=tmp_path / "cache", **SMALL),
                          LogisticRegression(max_iter=2000))
    model.fit(paths[::2], labels[::2])
    predicted = model.predict(paths[1::2])
    assert len(predicted) == 20 and set(predicted) <= set(labels)
    assert model.score(paths[::2], labels[::2]) >= 0.9  # 20 points in 96-d: (nearly) separable

    codes = model[0]
    assert codes.layer_ == "block4" and codes.n_features_out_ == 96
    assert re.fullmatch(r"mobilenet_v2-block4-avg-[0-9a-f]{8}\.h5", codes.cache_path_.name)
    assert codes.cache_path_.parent == tmp_path / "cache"
    assert list(codes.get_feature_names_out()[[0, -1]]) == ["block4_0", "block4_95"]
    Z = codes.transform(paths[::-1])
    assert Z.dtype == np.float32 and Z.shape == (40, 96)

    ref = tmp_path / "ref.h5"
    extract(paths, out=ref, layers=["block4"], progress=False, **SMALL)
    store = CodeStore(ref)
    row = {sha: k for k, sha in enumerate(store.sha256)}
    expected = store.codes("block4")[[row[_sha(p)] for p in paths[::-1]]]
    np.testing.assert_allclose(Z, expected, rtol=1e-4, atol=1e-5)


def test_grid_search_over_layers_extracts_each_image_once_per_layer(paths, labels, tmp_path,
                                                                    extractions):
    """Check that a grid over layer x C extracts each (image, layer) once, into 3 stores."""
    cache = tmp_path / "cache"
    grid = {"cnncodes__layer": ["block3", "block4", "block5"],
            "logisticregression__C": [0.1, 1, 10]}
    search = GridSearchCV(
        make_pipeline(CNNCodes(cache=cache, **SMALL), LogisticRegression(max_iter=2000)),
        grid, cv=StratifiedKFold(3, shuffle=True, random_state=0),
    )
    search.fit(paths, labels)
    assert search.best_params_["cnncodes__layer"] in grid["cnncodes__layer"]
    assert search.best_params_["logisticregression__C"] in grid["logisticregression__C"]
    assert len(search.cv_results_["params"]) == 9

    extracted = Counter()
    for layer, _, n in extractions:
        extracted[layer] += n
    assert extracted == {"block3": 40, "block4": 40, "block5": 40}
    stores = sorted(p for p in cache.iterdir() if p.suffix == ".h5")  # each with its segment folder
    assert [re.sub("-[0-9a-f]{8}", "-H", p.name) for p in stores] == [
        "mobilenet_v2-block3-avg-H.h5", "mobilenet_v2-block4-avg-H.h5", "mobilenet_v2-block5-avg-H.h5"]
    shas = {_sha(p) for p in paths}
    for store_path, dim in zip(stores, (32, 96, 1280)):
        store = CodeStore(store_path)
        assert len(store) == 40 and set(store.sha256) == shas
        assert len(set(store.ids)) == 40 and store.codes().shape == (40, dim)
        assert all(rid.endswith(".jpg") and not rid.startswith("/") for rid in store.ids)

    # Once cached, a whole new search (here over C only) extracts nothing at all.
    n_calls = len(extractions)
    again = GridSearchCV(
        make_pipeline(CNNCodes(layer="block4", cache=cache, **SMALL), LogisticRegression(max_iter=2000)),
        {"logisticregression__C": [0.1, 1]}, cv=3,
    ).fit(paths, labels)
    assert len(extractions) == n_calls and again.best_score_ > 0.2


def test_cross_val_score_clone_and_pickle(paths, labels, tmp_path):
    """Check that cross_val_score, clone and pickling a fitted pipeline work."""
    model = make_pipeline(CNNCodes(layer="block5", cache=tmp_path, **SMALL),
                          LogisticRegression(max_iter=2000))
    scores = cross_val_score(model, paths, labels, cv=3)
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 1))

    copy = clone(model)
    assert copy.get_params()["cnncodes__layer"] == "block5"
    assert not hasattr(copy[0], "layer_")

    model.fit(paths, labels)
    restored = pickle.loads(pickle.dumps(model))
    assert restored[0].cache_path_ == model[0].cache_path_
    np.testing.assert_array_equal(restored.predict(paths), model.predict(paths))
    np.testing.assert_array_equal(restored.predict_proba(paths), model.predict_proba(paths))


def test_fit_sets_attributes_and_leaves_params_alone(paths, extractions):
    """Check that fit returns self, extracts nothing, and sets only trailing-underscore state."""
    est = CNNCodes(layer="features.13", pooling="flatten", image_size=64)
    before = est.get_params()
    assert est.fit(paths) is est
    assert est.get_params() == before
    assert extractions == []
    # A raw node name maps to its alias; flatten codes are C x H x W at this input size.
    assert est.layer_ == "block4" and est.n_features_out_ == 96 * 4 * 4
    assert est.cache_path_.name.startswith("mobilenet_v2-block4-flatten-")
    # Without a cache folder, the process's private temporary one is used.
    assert est.cache_path_.parent == transformer_module._session_cache()
    # Settings that change codes change the store file; streaming settings do not.
    name = est.cache_path_.name
    assert CNNCodes(layer="block4", pooling="flatten", image_size=64, batch_size=3,
                    device="cpu").fit(paths).cache_path_.name == name
    assert CNNCodes(layer="block4", pooling="flatten", image_size=96).fit(paths).cache_path_.name != name


def test_set_output_and_feature_names(paths, tmp_path):
    """Check that set_output returns the transformer and feature names follow the layer.

    pandas is not installed in this environment, so the DataFrame output itself is not
    exercised here; sklearn builds it from get_feature_names_out, which is checked.
    """
    est = CNNCodes(layer="block3", cache=tmp_path, **SMALL)
    assert est.set_output(transform="default") is est
    Z = est.fit_transform(paths[:3])
    assert isinstance(Z, np.ndarray) and Z.shape == (3, 32)
    names = est.get_feature_names_out()
    assert names.dtype == object and list(names) == [f"block3_{i}" for i in range(32)]
    assert list(make_pipeline(est).get_feature_names_out()) == list(names)


# --------------------------------------------------------------------------- arrays


def test_array_input_is_cached_by_content(paths, tmp_path, extractions):
    """Check that uint8 image arrays give the codes of the same images saved as PNG files."""
    images = _small_images(paths[:6])
    est = CNNCodes(layer="block4", cache=tmp_path / "cache", **SMALL)
    Z = est.fit_transform(images)
    assert Z.shape == (6, 96) and Z.dtype == np.float32
    assert sum(n for *_, n in extractions) == 6

    # The same array again (a copy, a list of images, reordered): nothing extracted.
    n_calls = len(extractions)
    np.testing.assert_array_equal(est.transform(images.copy()), Z)
    np.testing.assert_array_equal(est.transform(list(images)), Z)
    np.testing.assert_array_equal(est.transform(images[::-1]), Z[::-1])
    assert len(extractions) == n_calls
    assert not list(Path(tmp_path / "cache").glob("*.png"))  # PNGs live only while extracted

    files = []
    for k, image in enumerate(images):
        files.append(tmp_path / f"{k}.png")
        Image.fromarray(image).save(files[-1])
    np.testing.assert_allclose(est.transform(files), Z, rtol=1e-4, atol=1e-5)

    grey = images.mean(axis=-1).round().astype(np.uint8)
    np.testing.assert_allclose(est.transform(grey), est.transform(np.repeat(grey[..., None], 3, -1)),
                               rtol=1e-4, atol=1e-5)
    assert len(CodeStore(est.cache_path_)) == 6 + 6 + 6 + 6  # arrays, files, grey, grey as RGB


def test_random_weights_are_the_same_network_across_transforms(paths, tmp_path):
    """Check that weights=None gives the codes of one random network, however it is called."""
    kw = dict(weights=None, layer="block2", image_size=32, num_workers=0)
    one_by_one = CNNCodes(cache=tmp_path / "a", **kw).fit(paths[:2])
    first, second = one_by_one.transform(paths[:1]), one_by_one.transform(paths[1:2])
    together = CNNCodes(cache=tmp_path / "b", **kw).fit_transform(paths[:2])
    np.testing.assert_allclose(np.vstack([first, second]), together, rtol=1e-5, atol=1e-6)


def test_transform_waits_for_another_writer_of_the_store(paths, tmp_path):
    """Check that transform waits while the cache store is locked, then extracts."""
    est = CNNCodes(layer="block3", cache=tmp_path, **SMALL).fit(paths[:2])
    lock = StoreLock(est.cache_path_).acquire()
    timer = threading.Timer(0.5, lock.release)
    t0 = time.monotonic()
    timer.start()
    try:
        Z = est.transform(paths[:2])
    finally:
        timer.cancel()
        lock.release()
    assert time.monotonic() - t0 >= 0.5
    assert Z.shape == (2, 32) and len(CodeStore(est.cache_path_)) == 2


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("X", "match"),
    [
        (np.zeros((10, 5)), re.escape(
            "CNNCodes expects image paths or a uint8 image array of shape (N, H, W, 3); "
            "got a float64 array of shape (10, 5)")),
        (np.zeros((2, 8, 8, 3)), r"float64 array of shape \(2, 8, 8, 3\)\. Convert images in \[0, 1\]"),
        (np.zeros((2, 3, 8, 8), np.uint8), r"shape \(2, 3, 8, 8\)\. The last axis must hold the 3 RGB"),
        ([1, 2, 3], r"got an int64 array of shape \(3,\)"),
        ("photo.jpg", r"got a single str 'photo.jpg'\. Wrap it in a list: \['photo.jpg'\]"),
        ([], "got no images"),
        (["a.jpg", 3], r"expects image paths \(str or Path\); got int 3"),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 9, 3), np.uint8)], "images of different sizes"),
    ],
    ids=["2d-float", "float-images", "channels-first", "ints", "single-str", "empty",
         "mixed-list", "ragged-images"],
)
def test_bad_input_is_refused_with_what_was_expected(X, match):
    """Check that fit refuses what is not image paths or a uint8 image array, saying why."""
    with pytest.raises(SourceError, match=match):
        CNNCodes().fit(X)


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        (dict(layer="block9"), UnknownLayerError, "layer 'block9' is not an alias.*Valid aliases: block1"),
        (dict(backbone="alexnet"), UnknownBackboneError, "unknown backbone 'alexnet'. Valid backbones:"),
        (dict(pooling="median"), CnnCodesError, "unknown pooling 'median'"),
        (dict(dtype="int8"), CnnCodesError, "unknown dtype 'int8'"),
        (dict(image_size=0), CnnCodesError, "image_size must be a positive int or None, got 0"),
    ],
    ids=["layer", "backbone", "pooling", "dtype", "image-size"],
)
def test_bad_settings_are_refused_at_fit(paths, params, error, match):
    """Check that fit refuses unknown settings with the library's own errors."""
    est = CNNCodes(**params)  # stores them without complaint (the sklearn contract)
    with pytest.raises(error, match=match):
        est.fit(paths)


def test_broken_images_raise_naming_the_files(paths, tmp_path):
    """Check that transform names undecodable and unreadable files instead of zero rows."""
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    X = [*paths[:3], str(broken), str(tmp_path / "gone.jpg")]
    est = CNNCodes(cache=tmp_path / "cache", **SMALL).fit(X)
    for attempt in range(2):  # the second time, the failure is known to the store
        with pytest.raises(FailedImagesError, match=(
            r"2 of 5 files could not be read or decoded:\n"
            r"  .*broken\.jpg: .+\n"
            r"  .*gone\.jpg: cannot read file: No such file or directory\n"
            r"Remove them from X \(and their labels from y\)")) as excinfo:
            est.transform(X)
        assert [Path(name).name for name, _ in excinfo.value.failures] == ["broken.jpg", "gone.jpg"]
    assert est.transform(paths[:3]).shape == (3, 1280)  # the good ones were extracted
    assert isinstance(excinfo.value, SourceError)


def test_extract_root_gives_ids_relative_to_it(sample_dir, paths, tmp_path, fast):
    """Check that extract(root=) makes ids relative to root, and refuses images outside it."""
    out = tmp_path / "codes.h5"
    extract([paths[0], paths[-1]], out=out, root=sample_dir, **fast)
    assert sorted(CodeStore(out).ids) == sorted(
        Path(p).relative_to(sample_dir).as_posix() for p in (paths[0], paths[-1]))
    with pytest.raises(SourceError, match=r"1 image\(s\) are outside root .*daisy.*, e\.g\. .*tulip"):
        extract([paths[0], paths[-1]], out=out, root=Path(paths[0]).parent, **fast)
    with pytest.raises(SourceError, match="root= is only for a list of paths"):
        extract(sample_dir, out=out, root=sample_dir, **fast)


# --------------------------------------------------------------------------- sklearn contract

# The data-free checks of sklearn's battery. parametrize_with_checks would give a
# transformer of image paths almost none of them (it feeds 2-D float arrays), so they are
# called one by one, each a test of its own.
DATA_FREE_CHECKS = [
    "check_parameters_default_constructible",
    "check_no_attributes_set_in_init",
    "check_do_not_raise_errors_in_init_or_set_params",
    "check_get_params_invariance",
    "check_set_params",
    "check_estimator_cloneable",
    "check_estimator_repr",
    "check_estimator_tags_renamed",
    "check_valid_tag_types",
    "check_mixin_order",
    "check_transformers_unfitted",
    "check_get_feature_names_out_error",
]


@pytest.mark.parametrize("check", DATA_FREE_CHECKS)
def test_sklearn_data_free_check(check):
    """Check that CNNCodes passes one of sklearn's data-free estimator checks."""
    getattr(estimator_checks, check)("CNNCodes", CNNCodes(layer="block4", cache="/nonexistent"))


def test_sklearn_checks_all_exist():
    """Check that every listed sklearn check exists, so none is silently dropped."""
    missing = [c for c in DATA_FREE_CHECKS if not callable(getattr(estimator_checks, c, None))]
    assert missing == [] and len(DATA_FREE_CHECKS) == 12


def test_tags_say_the_input_is_not_a_2d_array():
    """Check that the tags declare image inputs and no dtype preservation."""
    tags = CNNCodes().__sklearn_tags__()
    assert not tags.input_tags.two_d_array and tags.input_tags.string
    assert tags.transformer_tags.preserves_dtype == [] and not tags.target_tags.required
