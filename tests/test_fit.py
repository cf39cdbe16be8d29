"""Tests of fit, the leak-free split, model files, predict and evaluate (Python and CLI)."""

import io
import shutil
import zipfile

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.linear_model import LogisticRegression

from cnncodes import CnnCodesError, CodeStore, StoreMismatchError, extract
from cnncodes._cli.main import main
from cnncodes._classify.fit import fit, split_store
from cnncodes._models.model import ModelFileError, evaluate, load, predict, save


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(n_samples=300, centers=3, n_features=16, cluster_std=4.0, random_state=0)
    return X.astype(np.float32), np.array(["a", "b", "c"])[y]


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory, sample_dir):
    """The 40 bundled photos at 64 px, block4 + block5, with one duplicate under two labels."""
    root = tmp_path_factory.mktemp("fit")
    data = root / "photos"
    shutil.copytree(sample_dir, data)
    dup = sorted((data / "rose").iterdir())[0]
    shutil.copy(dup, data / "tulip" / "dup_of_rose.jpg")
    out = root / "codes.h5"
    extract(data, out=out, layers=["block4", "block5"], image_size=64, num_workers=0, progress=False)
    return out, data


@pytest.mark.parametrize("classifier", ["logreg", "linear_svm", "knn"])
def test_fit_on_arrays(blobs, classifier):
    """Check that each classifier fits, predicts the class names and gives probabilities."""
    X, y = blobs
    model = fit(X[:200], y[:200], classifier=classifier)
    assert list(model.classes_) == ["a", "b", "c"]
    proba = model.predict_proba(X[200:])
    assert proba.shape == (100, 3) and np.allclose(proba.sum(axis=1), 1)
    assert model.score(X[200:], y[200:]) > 0.8
    assert model.cnncodes_["extractor"] is None and model.cnncodes_["fit"]["n_train"] == 200


def test_auto_c_matches_a_manual_search(blobs):
    """Check that C='auto' searches decades from 1e-6 upwards (to 1 at least), then quarter
    decades around the best, each scored as a plain cross-validation would, and picks the
    lowest log loss among the Cs within one standard error of the best accuracy."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    X, y = blobs
    model = fit(X, y, classifier="logreg", cv=3)
    info = model.cnncodes_["fit"]
    folds = StratifiedKFold(3, shuffle=True, random_state=0)
    Xs = model[:-1].transform(X)  # the standardised codes the search saw
    acc, loss = info["cv_scores"], info["cv_log_loss"]
    assert acc.keys() == loss.keys()
    searched = sorted(float(c) for c in acc)
    decades = [c for c in searched if np.isclose(np.log10(c), round(np.log10(c)))]
    assert decades[0] == 1e-6 and np.allclose(np.diff(np.log10(decades)), 1) and decades[-1] >= 1
    best = info["C"]
    top = max(acc.values())
    within = [c for c in searched if acc[f"{c:g}"] >= top - np.sqrt(top * (1 - top) / len(y)) - 1e-12]
    assert best in within and loss[f"{best:g}"] == min(loss[f"{c:g}"] for c in within)
    fine = [c for c in searched if c not in decades]
    assert fine and all(0 < abs(np.log10(c / min(decades, key=lambda d: abs(np.log10(d / best))))) <= 0.75 + 1e-9
                        for c in fine)
    # Below 1e-4 the coefficients are ~1e-4 and predictions near ties, which float noise flips.
    for c in [c for c in searched if c >= 1e-4]:
        manual = cross_val_score(LogisticRegression(C=c, max_iter=3000), Xs, y, cv=folds).mean()
        assert acc[f"{c:g}"] == pytest.approx(manual, abs=0.02), c
    assert model.named_steps["logreg"].C == best


def test_auto_c_keeps_probabilities_on_few_images(tmp_path):
    """Check that on the 200 demo photos C='auto' does not pick the near-uniform end (C = 1e-6,
    where every class gets 0.2) although its CV accuracy is one image higher there."""
    import cnncodes
    from cnncodes import extract, split_store

    demo = cnncodes.sample_dir().parent / "flowers_demo"
    out = tmp_path / "demo.h5"
    extract(str(demo), out=out, image_size=64, batch_size=32, num_workers=0, progress=False)
    train, test = split_store(out, test_size=0.25, random_state=0)
    model = fit(str(out), rows=train)
    assert model.cnncodes_["fit"]["C"] >= 1e-4
    proba = model.predict_proba(cnncodes.CodeStore(out).codes()[test])
    assert proba.max(axis=1).mean() > 0.25  # 0.2: uniform over the 5 classes


def test_fixed_c_and_binary(blobs):
    """Check that a numeric C is used as given and that two classes work."""
    X, y = blobs
    keep = y != "c"
    model = fit(X[keep], y[keep], classifier="linear_svm", C=0.5)
    assert model.cnncodes_["fit"]["C"] == 0.5 and "cv_scores" not in model.cnncodes_["fit"]
    assert model.predict_proba(X[keep]).shape == (keep.sum(), 2)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(classifier="forest"), "unknown classifier 'forest'. Valid classifiers: logreg, linear_svm, knn"),
        (dict(C=-1), "C must be 'auto' or a positive number, got -1"),
        (dict(C="big"), "C must be 'auto' or a positive number"),
    ],
    ids=["classifier", "negative-C", "text-C"],
)
def test_fit_argument_errors(blobs, kwargs, words):
    """Check that bad fit arguments are refused with what is valid."""
    X, y = blobs
    with pytest.raises(CnnCodesError, match=words):
        fit(X, y, **kwargs)


def test_fit_data_errors(blobs):
    """Check that missing labels, one class and tiny classes get clear errors."""
    X, y = blobs
    with pytest.raises(CnnCodesError, match=r"needs labels: fit\(X, y\)"):
        fit(X)
    with pytest.raises(CnnCodesError, match="at least 2 classes, got 1"):
        fit(X[y == "a"], y[y == "a"])
    lonely = np.concatenate([y[:20], ["z"]])
    with pytest.raises(CnnCodesError, match="every class needs at least 2 training images"):
        fit(np.vstack([X[:20], X[:1]]), lonely)


def test_split_keeps_identical_content_on_one_side(sample_store):
    """Check that the split is stratified, disjoint, and never splits identical content."""
    out, _ = sample_store
    store = CodeStore(out)
    train, test = split_store(store, test_size=0.25, random_state=0)
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == len(store) == 41
    shas = store.sha256
    assert not {shas[r] for r in train} & {shas[r] for r in test}
    counts = np.bincount(store.labels[test], minlength=5)
    assert counts.min() >= 1 and counts.max() <= 3
    again = split_store(store, test_size=0.25, random_state=0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    with pytest.raises(CnnCodesError, match="test_size must be between 0 and 1, got 1.5"):
        split_store(store, test_size=1.5)


def test_fit_from_store_records_the_extractor(sample_store):
    """Check that a model fit on a store knows its layer, extractor spec and training ids."""
    out, _ = sample_store
    store = CodeStore(out)
    train, _ = split_store(store)
    model = fit(out, layer="block4", rows=train, C=1.0)
    meta = model.cnncodes_
    assert meta["layer"] == "block4"
    assert meta["extractor"]["layers"] == {"block4": "features.13"}
    assert meta["extractor"]["weights"] == "IMAGENET1K_V1" and meta["extractor"]["image_size"] == 64
    assert meta["train_ids"] == [str(i) for i in store.ids[train]]
    assert list(model.classes_) == store.class_names
    assert model.named_steps["scale"].n_features_in_ == 96


def test_save_load_predict_evaluate(sample_store, tmp_path):
    """Check that a saved model loads, classifies new photos, and evaluates on held-out rows."""
    out, data = sample_store
    train, test = split_store(out)
    model = fit(out, layer="block5", rows=train, C=0.1)
    path = save(model, tmp_path / "m.skops")
    loaded = load(path)
    X = CodeStore(out).codes("block5")
    np.testing.assert_allclose(loaded.estimator.predict_proba(X), model.predict_proba(X))
    assert loaded.classes == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    photos = sorted((data / "daisy").iterdir())[:3]
    preds = predict(path, [str(p) for p in photos], top_k=3)
    assert [p.id for p in preds] == [p.name for p in photos]
    for p in preds:
        assert len(p.labels) == 3 and p.probabilities == sorted(p.probabilities, reverse=True)
        assert set(p.labels) <= set(loaded.classes) and 0 < sum(p.probabilities) <= 1 + 1e-9
    # The same photos through the model's own extractor give the stored codes' predictions.
    rows = {rid: k for k, rid in enumerate(CodeStore(out).ids)}
    direct = model.predict_proba(X[[rows[f"daisy/{p.name}"] for p in photos]])
    np.testing.assert_allclose([p.probabilities[0] for p in preds], direct.max(axis=1), atol=1e-5)
    ev = evaluate(path, out)
    assert ev.n == len(test) and "held-out rows" in ev.on
    assert ev.confusion.sum() == len(test) and 0 <= ev.accuracy <= 1
    y = np.array(CodeStore(out).class_names)[CodeStore(out).labels[test]]
    assert ev.accuracy == pytest.approx((model.predict(X[test]) == y).mean())


def test_predict_and_evaluate_remove_their_temporary_codes(sample_store, tmp_path, monkeypatch):
    """Check that codes extracted for predict / evaluate without a store are deleted afterwards."""
    import tempfile

    out, data = sample_store
    train, _ = split_store(out)
    model = fit(out, layer="block5", rows=train, C=0.1)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    preds = predict(model, [str(p) for p in sorted((data / "rose").iterdir())[:2]])
    assert len(preds) == 2 and list(scratch.iterdir()) == []
    ev = evaluate(model, data)
    assert ev.n > 0 and list(scratch.iterdir()) == []
    kept = tmp_path / "kept.h5"
    predict(model, [str(p) for p in sorted((data / "rose").iterdir())[:2]], store=kept)
    assert list(CodeStore(kept).ids) == [p.name for p in sorted((data / "rose").iterdir())[:2]]


def test_evaluate_refuses_a_store_of_other_settings(sample_store, tmp_path, photos):
    """Check that evaluating on codes made differently is refused, naming both settings."""
    out, _ = sample_store
    model = fit(out, layer="block5", C=0.1)
    other = tmp_path / "other.h5"
    extract(photos, out=other, layers=["block5"], image_size=96, num_workers=0, progress=False)
    with pytest.raises(StoreMismatchError, match="centre crop 96.*centre crop 64"):
        evaluate(model, other)
    only4 = tmp_path / "only4.h5"
    extract(photos, out=only4, layers=["block4"], image_size=64, num_workers=0, progress=False)
    with pytest.raises(StoreMismatchError, match="holds layers block4; the model needs block5"):
        evaluate(model, only4)


def test_model_fit_on_arrays_cannot_predict_photos(blobs, tmp_path, sample_dir):
    """Check that a model without an extractor spec says why it cannot classify photos."""
    X, y = blobs
    path = save(fit(X, y, C=1.0), tmp_path / "arrays.skops")
    with pytest.raises(CnnCodesError, match="fitted on arrays, not on a code store"):
        predict(path, sample_dir)


def _crafted(path, type_module, type_name):
    """Rewrite a real model file so that its schema names another type (an attack)."""
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    schema = files["schema.json"].decode()
    schema = schema.replace('"__module__": "sklearn.linear_model._logistic"', f'"__module__": "{type_module}"')
    schema = schema.replace('"__class__": "LogisticRegression"', f'"__class__": "{type_name}"')
    files["schema.json"] = schema.encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, b in files.items():
            z.writestr(n, b)
    path.write_bytes(buf.getvalue())


def test_a_model_file_crafted_to_run_code_is_refused(blobs, tmp_path):
    """Check that a file naming an unsafe type is refused before anything is constructed."""
    X, y = blobs
    path = save(fit(X, y, C=1.0), tmp_path / "evil.skops")
    _crafted(path, "os", "system")
    with pytest.raises(ModelFileError, match=r"types cnncodes does not trust: os\.system.*Loading it could run code"):
        load(path)
    assert main(["predict", str(path), str(tmp_path)]) == 2


def test_a_pickle_is_not_a_model_file(tmp_path):
    """Check that a pickle renamed .skops is refused and never unpickled."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    path = tmp_path / "model.skops"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ModelFileError, match="not a readable cnncodes model file"):
        load(path)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ModelFileError, match="does not exist. Make one with `cnncodes fit`"):
        load(tmp_path / "missing.skops")


def test_cli_fit_predict_evaluate(sample_store, tmp_path, capsys):
    """Check the CLI chain: fit with a held-out split, predict top-k to CSV, evaluate + plot."""
    out, data = sample_store
    model = tmp_path / "m.skops"
    assert main(["fit", str(out), "--layer", "block5", "--classifier", "logreg", "--C", "0.1",
                 "--test-size", "0.25", "-o", str(model)]) == 0
    text = capsys.readouterr().out
    assert "fit logreg on 31 rows of codes.h5 (block5, 1280 dims), C=0.1" in text  # 41 rows, 40 contents: 10 test
    assert "held-out accuracy" in text and f"wrote {model}" in text
    photos = sorted((data / "rose").iterdir())[:2]
    csv = tmp_path / "p.csv"
    assert main(["predict", str(model), *map(str, photos), "--top-k", "2", "--csv", str(csv), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(photos[0].name + "\t") and len(lines[0].split("\t")) == 3
    assert csv.read_text().splitlines()[0] == "id,label1,probability1,label2,probability2,status"
    png = tmp_path / "cm.png"
    assert main(["evaluate", str(model), str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "held-out rows of codes.h5" in text and "confusion matrix" in text and "precision" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["fit", str(out), "--C", "lots", "-o", str(model)]) == 2
    assert "--C must be 'auto' or a number, got 'lots'" in capsys.readouterr().err


def test_evaluate_leaves_out_training_content_not_names(sample_store, tmp_path):
    """Check that evaluate excludes by content: same names elsewhere count, copies do not."""
    out, data = sample_store
    store = CodeStore(out)
    train, test = split_store(store)
    model = fit(out, layer="block5", rows=train, C=0.1)
    # Another store where every id of the training set names a *different* photo.
    other = tmp_path / "other"
    test_ids = [store.ids[r] for r in test]
    for k, rid in enumerate(store.ids[train][:5]):
        (other / rid).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data / test_ids[k], other / rid)
    # ... and a training photo under a new name.
    shutil.copy(data / store.ids[train[-1]], other / "daisy" / "renamed_training_photo.jpg")
    other_h5 = tmp_path / "other.h5"
    extract(other, out=other_h5, layers=["block5"], image_size=64, num_workers=0, progress=False)
    ev = evaluate(model, other_h5)
    assert ev.n == 5 and "content not used in training" in ev.on
