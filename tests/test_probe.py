"""The linear-probe protocol: normalisation steps, grouped CV folds, several layers, mirror-image rows."""

import shutil

import numpy as np
import pytest

from cnncodes import CnnCodesError, CodeStore, StoreMismatchError, extract
from cnncodes._cli.main import main
from cnncodes._classify.fit import CodeNormalizer, _folds, fit, layer_codes
from cnncodes._models.model import load, predict, save

RUN = dict(image_size=64, batch_size=8, num_workers=0, progress=False, precision="float32")


@pytest.fixture(scope="module")
def stores(tmp_path_factory, sample_dir):
    """The 40 bundled photos (block4 + block5, 64 px): plain, mirror-image and flip-averaged codes."""
    root = tmp_path_factory.mktemp("probe")
    data = root / "photos"
    shutil.copytree(sample_dir, data)
    out = {}
    for tta in ("none", "mirror", "flip"):
        out[tta] = root / f"{tta}.h5"
        extract(data, out=out[tta], layers=["block4", "block5"], tta=tta, **RUN)
    return out, data


def test_power_and_l2_normalisation_values():
    """Check that power is the signed square root then unit length, and l2 unit length alone."""
    X = np.array([[4.0, -9.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 2.0]])
    power = CodeNormalizer(kind="power").fit(X).transform(X)
    root = np.array([2.0, -3.0, 0.0])
    assert np.allclose(power[0], root / np.linalg.norm(root))
    assert np.array_equal(power[1], np.zeros(3))  # a zero code stays zero, not NaN
    l2 = CodeNormalizer(kind="l2").fit(X).transform(X)
    assert np.allclose(l2[2], X[2] / np.sqrt(6)) and np.allclose(np.linalg.norm(l2[[0, 2]], axis=1), 1)
    with pytest.raises(CnnCodesError, match="unknown normalize 'max'. Valid values: 'l2', 'power' or None."):
        fit(X, ["a", "b", "a"], normalize="max")


def test_sgd_refuses_probe_options():
    """Check that the streaming classifier refuses normalize, augment and several layers in one line."""
    with pytest.raises(CnnCodesError, match="classifier='sgd' streams one stored layer as it is"):
        fit(np.zeros((4, 2)), ["a", "b", "a", "b"], classifier="sgd", normalize="power")


def test_cv_folds_keep_identical_content_on_one_side():
    """Check that the C search's folds never put rows of one content (sha256) on both sides."""
    y = np.array(["a", "b"] * 30)
    groups = np.array([f"sha{k // 3}" for k in range(60)])  # each content three times
    for train, test in _folds(y, groups, 5, 0):
        assert not set(groups[train]) & set(groups[test])


def test_normalised_model_saves_loads_and_predicts(stores, tmp_path):
    """Check that a normalize='power' pipeline carries the step, and a saved file loads and predicts."""
    paths, data = stores
    model = fit(paths["none"], layer="block5", normalize="power", C=1.0)
    assert list(model.named_steps) == ["normalize", "scale", "logreg"]
    X = CodeStore(paths["none"]).codes("block5")
    path = save(model, tmp_path / "m.skops")
    assert np.allclose(load(path).predict_proba(X), model.predict_proba(X))


def test_several_layers_are_concatenated_and_predict_from_photos(stores, tmp_path):
    """Check fit(layer=[block4, block5]): codes side by side, each layer normalised on its own,
    and predict on photos re-extracts both layers."""
    paths, data = stores
    store = CodeStore(paths["none"])
    model = fit(store, layer=["block4", "block5"], normalize="l2", C=1.0)
    X = layer_codes(store, ["block4", "block5"])
    assert X.shape == (40, 96 + 1280) and np.array_equal(X[:, 96:], store.codes("block5"))
    # Each layer's part of a row is scaled to unit length separately.
    normed = model.named_steps["normalize"].transform(X)
    assert np.allclose(np.linalg.norm(normed[:, :96], axis=1), 1) and np.allclose(np.linalg.norm(normed[:, 96:], axis=1), 1)
    assert model.cnncodes_["layer"] == ["block4", "block5"]
    assert list(model.cnncodes_["extractor"]["layers"]) == ["block4", "block5"]
    path = save(model, tmp_path / "two.skops")
    preds = predict(path, data, batch_size=8, num_workers=0)
    assert [p.labels[0] for p in preds] == list(model.predict(X))


def test_mirror_codes_are_training_rows(stores):
    """Check tta='mirror' codes: the flip-averaged codes are the mean of plain and mirror codes, and
    fit(augment=...) adds one mirror row per training photo."""
    paths, _ = stores
    plain, mirror, flip = (CodeStore(paths[t]) for t in ("none", "mirror", "flip"))
    order = {sha: k for k, sha in enumerate(mirror.sha256)}
    m = mirror.codes("block5")[[order[s] for s in plain.sha256]]
    assert not np.allclose(m, plain.codes("block5"))
    order = {sha: k for k, sha in enumerate(flip.sha256)}
    f = flip.codes("block5")[[order[s] for s in plain.sha256]]
    assert np.allclose(f, (plain.codes("block5") + m) / 2, atol=1e-4)
    rows = np.arange(30)
    model = fit(plain, layer="block5", rows=rows, augment=paths["mirror"], C=1.0)
    info = model.cnncodes_["fit"]
    assert info["n_train"] == 30 and info["n_augment"] == 30
    with pytest.raises(CnnCodesError, match=r"augment='flip.h5' holds tta 'flip' codes; augmentation rows "
                                            r"are mirror images' codes: extract them with tta='mirror'"):
        fit(plain, layer="block5", augment=paths["flip"], C=1.0)


def test_augment_store_of_other_settings_is_refused(stores, tmp_path):
    """Check that mirror codes made with another backbone setting are refused, naming the setting."""
    paths, data = stores
    other = tmp_path / "other.h5"
    extract(data, out=other, layers=["block4", "block5"], tta="mirror", pooling="max", **RUN)
    with pytest.raises(StoreMismatchError, match="other.h5 was made with pooling 'max', but this run asks for "
                                                 "pooling 'avg'.*--tta mirror"):
        fit(paths["none"], layer="block5", augment=other, C=1.0)


def test_cli_fit_with_two_layers_power_and_mirror_rows(stores, tmp_path, capsys):
    """Check `cnncodes fit --layer block4 --layer block5 --normalize power --augment mirror.h5`."""
    paths, _ = stores
    out = tmp_path / "m.skops"
    code = main(["fit", str(paths["none"]), "-o", str(out), "--layer", "block4", "--layer", "block5",
                 "--normalize", "power", "--augment", str(paths["mirror"]), "--cv", "3", "--jobs", "1"])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert "fit logreg on 40 rows of none.h5 (block4+block5, 1376 dims) and 40 mirror rows, C=" in printed
    model = load(out)
    assert list(model.estimator.named_steps) == ["normalize", "scale", "logreg"]
