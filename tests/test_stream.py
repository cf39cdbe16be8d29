"""Tests of fit_streaming: chunk-by-chunk reads of the store, the scaler pass, accuracy close to
the in-memory fit, fit(classifier="sgd"), persistence and error messages."""

import h5py
import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler

import cnncodes._classify.stream
from cnncodes import CodeStore, extract, fit, fit_streaming, load, save, split_store
from cnncodes._errors import CnnCodesError


@pytest.fixture(scope="module")
def store(tmp_path_factory, sample_dir):
    """A real store: MobileNetV2 block5 codes of the 40 sample photos (5 classes)."""
    out = tmp_path_factory.mktemp("stream") / "codes.h5"
    extract(str(sample_dir), out=out, backbone="mobilenet_v2", batch_size=8, num_workers=0,
            progress=False)
    return CodeStore(out)


def test_reads_chunk_by_chunk(store, monkeypatch):
    """Check that the codes are read in slices, never more than chunk_rows rows at a time."""
    reads = []
    real = cnncodes._classify.stream._read_rows

    def spy(ds, start, stop):
        assert isinstance(ds, h5py.Dataset)  # straight from the file, not a loaded array
        reads.append((start, stop))
        return real(ds, start, stop)

    monkeypatch.setattr(cnncodes._classify.stream, "_read_rows", spy)
    train, _ = split_store(store)
    model = fit_streaming(store, rows=train, chunk_rows=16, epochs=3)
    info = model.cnncodes_["fit"]
    assert max(stop - start for start, stop in reads) <= 16
    assert info["max_rows_in_memory"] <= 16
    assert info["reads"] == len(reads)
    # one pass for the scaler, then one per epoch, each over all training rows
    read_rows = [r for start, stop in reads for r in range(start, stop)]
    assert set(read_rows) >= set(train.tolist())
    assert info["chunks"] >= 4 * int(np.ceil(len(train) / 16))
    assert info["n_train"] == len(train) and model.cnncodes_["train_ids"] == list(store.ids[train])


def test_scaler_pass_equals_in_memory_scaler(store):
    """Check that the streamed scaler has the mean and variance of StandardScaler on all rows."""
    train, _ = split_store(store)
    model = fit_streaming(store, rows=train, chunk_rows=8, epochs=1)
    ref = StandardScaler().fit(store.codes("block5")[train])
    np.testing.assert_allclose(model["scale"].mean_, ref.mean_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model["scale"].var_, ref.var_, rtol=1e-4, atol=1e-8)


def test_accuracy_close_to_in_memory_fit(store):
    """Check that streamed SGD classifies held-out photos about as well as in-memory logreg.

    40 photos are few, so the accuracies are averaged over three 50/50 splits; on flowers5
    (4,317 photos) the two reach 0.751 and 0.742 (docs/guide.md, "Large stores").
    """
    X, names = store.codes("block5"), np.array(store.class_names)
    y = names[store.labels]
    acc_exact, acc_stream, agree = [], [], []
    for seed in range(3):
        train, test = split_store(store, test_size=0.5, random_state=seed)
        exact = fit(store, rows=train, C=0.1)
        streamed = fit_streaming(store, rows=train, chunk_rows=8, random_state=seed)
        assert np.mean(streamed.predict(X[train]) == y[train]) == 1.0  # separable, as for logreg
        acc_exact.append(np.mean(exact.predict(X[test]) == y[test]))
        acc_stream.append(np.mean(streamed.predict(X[test]) == y[test]))
        agree.append(np.mean(exact.predict(X[test]) == streamed.predict(X[test])))
        assert list(streamed.classes_) == store.class_names
    assert np.mean(acc_stream) >= np.mean(acc_exact) - 0.1, (acc_exact, acc_stream)
    assert np.mean(agree) >= 0.7, agree


def test_fit_sgd_dispatches_and_saves(store, tmp_path):
    """Check that fit(classifier='sgd') streams, and that the model saves and loads."""
    model = fit(store.path, classifier="sgd")
    assert model.cnncodes_["fit"]["classifier"] == "sgd"
    assert model.cnncodes_["extractor"]["backbone"] == "mobilenet_v2"
    X = store.codes("block5")
    loaded = load(save(model, tmp_path / "sgd.skops"))
    np.testing.assert_array_equal(loaded.estimator.predict(X), model.predict(X))
    np.testing.assert_allclose(loaded.predict_proba(X).sum(axis=1), 1.0)


def test_arrays_and_h5py_datasets(store):
    """Check that arrays and h5py datasets stream too, and give the same model for the same data."""
    X, y = store.codes("block5"), np.array(store.class_names)[store.labels]
    from_array = fit_streaming(X, y, chunk_rows=16)
    with h5py.File(store.path, "r") as f:
        from_file = fit_streaming(f["codes/block5"], y, chunk_rows=16)
    np.testing.assert_allclose(from_array["sgd"].coef_, from_file["sgd"].coef_, rtol=1e-5, atol=1e-6)
    assert from_array.cnncodes_["extractor"] is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss="squared"), "unknown loss 'squared' for the streaming fit. Valid losses"),
        (dict(chunk_rows=0), "chunk_rows must be an integer >= 1, got 0"),
        (dict(epochs=1.5), "epochs must be an integer >= 1, got 1.5"),
        (dict(alpha=-1), "alpha must be a positive number, got -1"),
        (dict(layer="block9"), "has no layer 'block9'; it holds block5"),
        (dict(rows=[0]), "fit needs at least 2 classes, got 1"),
    ],
    ids=["loss", "chunk_rows", "epochs", "alpha", "layer", "one-class"],
)
def test_errors(store, kwargs, message):
    """Check that bad arguments are refused with what was wrong."""
    with pytest.raises(CnnCodesError, match=message):
        fit_streaming(store, **kwargs)


def test_arrays_need_labels(store):
    """Check that arrays without labels are refused with how to pass them."""
    with pytest.raises(CnnCodesError, match=r"needs labels: fit_streaming\(X, y\)"):
        fit_streaming(store.codes("block5"))
