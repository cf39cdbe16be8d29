"""Files written by released cnncodes keep loading: a format_version 1 store and its model.

The fixtures in tests/data/v1 were made by commit 2343f10 with tests/data/v1/make_fixtures.py
(see its README); expected.json holds what that code read back from them. Every test works on
a copy in tmp_path, so that no reader can change the committed files.
"""

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import cnncodes

DATA = Path(__file__).parent / "data" / "v1"
EXPECTED = json.loads((DATA / "expected.json").read_text())
FILES = ("codes.h5", "model.skops")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def v1(tmp_path) -> Path:
    """A copy of the v1 store and model file."""
    folder = tmp_path / "v1"
    folder.mkdir()
    for name in FILES:
        shutil.copyfile(DATA / name, folder / name)
    return folder


def test_fixture_files_are_the_ones_v1_wrote():
    """Check that the committed fixtures are byte for byte the files make_fixtures.py wrote."""
    assert {name: _sha256(DATA / name) for name in FILES} == EXPECTED["files_sha256"]
    assert EXPECTED["made_by"]["commit"].startswith("2343f10")
    assert EXPECTED["format_version"] == 1


def test_plain_h5py_reads_the_v1_layout(v1):
    """Check that h5py alone finds the v1 attributes and datasets with their shapes and types."""
    with h5py.File(v1 / "codes.h5", "r") as f:
        assert f.attrs["format"] == "cnncodes.codes"
        assert int(f.attrs["format_version"]) == 1
        assert json.loads(f.attrs["spec"]) == EXPECTED["spec"]
        assert f.attrs["data_root"] == "/tmp/cnncodes-v1-fixture/photos"
        block5 = f["codes/block5"][:]
        block4 = f["codes/block4"][:]
        ids = [s.decode() for s in f["ids"][:]]
        labels = f["labels"][:]
    assert block5.shape == (12, 1280) and block5.dtype == np.float16
    assert block4.shape == (12, 96) and block4.dtype == np.float16
    assert ids == EXPECTED["ids"]
    assert labels.tolist() == EXPECTED["labels"]
    np.testing.assert_array_equal(block5[[0, 5, 11], :4],
                                  np.array([EXPECTED["block5_head"][r] for r in ("0", "5", "11")]))


def test_codestore_opens_the_v1_store_with_its_rows(v1):
    """Check that CodeStore gives the v1 store's rows, ids, hashes, labels, classes and spec."""
    store = cnncodes.CodeStore(v1 / "codes.h5")
    assert len(store) == EXPECTED["n_rows"] == 12
    assert store.ids.tolist() == EXPECTED["ids"]
    assert store.sha256.tolist() == EXPECTED["sha256"]
    assert store.labels.tolist() == EXPECTED["labels"]
    assert store.class_names == EXPECTED["class_names"] == ["daisy", "rose", "tulip"]
    assert store.layers == EXPECTED["layers"] == ["block4", "block5"]
    assert store.backbone == "mobilenet_v2"
    # A newer reader may fill settings v1 did not write, but must keep every value it did.
    assert {key: store.spec[key] for key in EXPECTED["spec"]} == EXPECTED["spec"]
    assert store.conflicts() == []


def test_codestore_reads_the_v1_failure(v1):
    """Check that the corrupt photo of the v1 run is listed with its content hash and reason."""
    store = cnncodes.CodeStore(v1 / "codes.h5")
    assert [list(r) for r in store.failure_records()] == EXPECTED["failures"]
    assert store.failures == [("daisy/broken.jpg", "not an image (PIL cannot identify the file format)")]
    assert "daisy/broken.jpg" not in store.ids


@pytest.mark.parametrize("layer", ["block4", "block5"])
def test_codestore_reads_the_v1_codes(v1, layer):
    """Check that each layer's codes come back with the v1 shape and exactly the v1 values."""
    store = cnncodes.CodeStore(v1 / "codes.h5")
    codes = store.codes(layer)
    assert codes.shape == tuple(EXPECTED["code_shapes"][layer])
    assert store.codes_shape(layer) == codes.shape
    as_f16 = np.ascontiguousarray(codes, "<f2")
    np.testing.assert_array_equal(as_f16, codes)  # float16 values, whatever type is returned
    assert hashlib.sha256(as_f16.tobytes()).hexdigest() == EXPECTED["codes_sha256"][layer]
    # The same codes under the layer's node name.
    np.testing.assert_array_equal(store.codes(EXPECTED["spec"]["layers"][layer]), codes)


def test_codestore_gives_the_listed_block5_values(v1):
    """Check that the first block5 values of rows 0, 5 and 11 match expected.json to float16 precision."""
    codes = cnncodes.CodeStore(v1 / "codes.h5").codes("block5")
    for row, head in EXPECTED["block5_head"].items():
        np.testing.assert_allclose(codes[int(row), :4].astype(np.float64), head, rtol=2**-10, atol=0)
    assert np.count_nonzero(codes[0, :4]) == 2  # 0.0, 0.2815, 0.0, 0.5137


def test_load_reads_the_v1_model_file(v1):
    """Check that cnncodes.load rebuilds the v1 model with its classes, extractor and training rows."""
    model = cnncodes.load(v1 / "model.skops")
    want = EXPECTED["model"]
    assert model.classes == want["classes"] == ["daisy", "rose", "tulip"]
    assert list(model.estimator.classes_) == want["classes"]
    assert model.extractor["layers"] == {"block5": "features.18"}
    assert model.extractor["weights_sha256"] == EXPECTED["spec"]["weights_sha256"]
    assert model.train_ids == want["train_ids"] and len(model.train_ids) == 9
    assert model.fit["classifier"] == "logreg" and model.fit["C"] == want["C"]
    assert model.estimator.named_steps["logreg"].coef_.shape == (3, 1280)


def test_v1_model_predicts_the_v1_store_rows(v1):
    """Check that the v1 model, on the v1 store's codes, predicts the v1 labels and probabilities."""
    model = cnncodes.load(v1 / "model.skops")
    store = cnncodes.CodeStore(v1 / "codes.h5")
    (layer,) = model.extractor["layers"]
    X = store.codes(layer)
    predictions = model.estimator.predict(X).tolist()
    assert predictions == EXPECTED["model"]["predictions"]
    assert predictions == [store.class_names[i] for i in store.labels]  # all 12 right
    np.testing.assert_allclose(model.predict_proba(X), EXPECTED["model"]["probabilities"], atol=2e-6)


def test_evaluate_runs_the_v1_model_on_the_v1_store(v1):
    """Check that evaluate accepts the v1 pair as compatible and scores the 3 held-out rows."""
    evaluation = cnncodes.evaluate(v1 / "model.skops", v1 / "codes.h5")
    want = EXPECTED["model"]["evaluate"]
    assert (evaluation.n, evaluation.accuracy) == (want["n"], want["accuracy"]) == (3, 1.0)
    assert evaluation.on == want["on"]
    assert evaluation.classes == ["daisy", "rose", "tulip"]
    np.testing.assert_array_equal(evaluation.confusion, np.eye(3, dtype=int))


def test_reading_leaves_the_v1_files_unchanged(v1):
    """Check that every read of the store and the model leaves both files byte for byte as they
    were, and writes nothing beside them (no lock, journal or upgraded copy)."""
    assert {name: _sha256(v1 / name) for name in FILES} == EXPECTED["files_sha256"]
    store = cnncodes.CodeStore(v1 / "codes.h5")
    repr(store)
    for layer in store.layers:
        store.codes(layer), store.codes_shape(layer)
    store.labels, store.class_names, store.sha256, store.failures, store.conflicts()
    with h5py.File(v1 / "codes.h5", "r") as f:
        f["codes/block5"][:]
    model = cnncodes.load(v1 / "model.skops")
    model.predict_proba(store.codes("block5"))
    cnncodes.evaluate(model, store)
    assert {name: _sha256(v1 / name) for name in FILES} == EXPECTED["files_sha256"]
    assert sorted(p.name for p in v1.iterdir()) == sorted(FILES)


def test_v1_model_predicts_new_photos(v1, tmp_path, sample_dir):
    """Check that the v1 model's extractor settings still drive an extraction: its held-out
    photos, taken from the bundled sample, get the v1 labels, from codes close to the v1 ones."""
    test_ids = EXPECTED["model"]["test_ids"]
    store_path = tmp_path / "new.h5"
    predictions = cnncodes.predict(v1 / "model.skops", [sample_dir / i for i in test_ids], store=store_path)
    assert [p.id for p in predictions] == test_ids
    assert [p.labels[0] for p in predictions] == [i.split("/")[0] for i in test_ids]
    rows = [EXPECTED["ids"].index(i) for i in test_ids]
    np.testing.assert_allclose([p.probabilities[0] for p in predictions],
                               np.max(np.array(EXPECTED["model"]["probabilities"])[rows], axis=1), atol=1e-3)
    new = cnncodes.CodeStore(store_path).codes("block5").astype(np.float64)
    old = cnncodes.CodeStore(v1 / "codes.h5").codes("block5")[rows].astype(np.float64)
    cosine = (new * old).sum(1) / np.linalg.norm(new, axis=1) / np.linalg.norm(old, axis=1)
    assert cosine.min() > 0.997


# ------------------------------------------------- files written before the package layout moved

PREMOVE = Path(__file__).parent / "data" / "premove"


def test_a_knn_model_file_written_before_the_move_loads_and_predicts(v1):
    """Check that a .skops kNN model of the flat layout (it names cnncodes._knn and
    cnncodes._fit) loads as trusted and predicts what it predicted when written."""
    expected = json.loads((PREMOVE / "expected.json").read_text())
    schema = __import__("zipfile").ZipFile(PREMOVE / "knn.skops").read("schema.json").decode()
    assert '"cnncodes._knn"' in schema and '"cnncodes._fit"' in schema  # what the fixture tests
    model = cnncodes.load(PREMOVE / "knn.skops")
    codes = cnncodes.CodeStore(v1 / "codes.h5").codes("block5")
    assert [str(c) for c in model.estimator.predict(codes)] == expected["knn_predictions"]


def test_a_pipeline_pickled_before_the_move_loads_and_predicts(sample_dir):
    """Check that a pickled scikit-learn pipeline with CNNCodes (it names
    cnncodes._transformer.CNNCodes) unpickles and gives the probabilities it gave."""
    import pickle

    raw = (PREMOVE / "pipeline.pkl").read_bytes()
    assert b"cnncodes._transformer" in raw
    pipe = pickle.loads(raw)
    expected = json.loads((PREMOVE / "expected.json").read_text())
    photos = [str(sample_dir / p) for p in expected["pipeline_photos"]]
    assert [str(c) for c in pipe.predict(photos)] == expected["pipeline_predictions"]
    np.testing.assert_allclose(pipe.predict_proba(photos), expected["pipeline_proba"], atol=1e-5)
