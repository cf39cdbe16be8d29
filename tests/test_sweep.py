"""Tests of the layer sweep: per-layer CV accuracies, store reuse, plots, errors, CLI."""

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cnncodes import CnnCodesError, CodeStore, SweepResult, UnknownLayerError, extract, sweep
from cnncodes._cli.main import main
from cnncodes._analysis.sweep import SWEEP_CS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    """Import a script of examples/ as a module."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FAST = dict(image_size=64, batch_size=16, num_workers=0, progress=False, n_jobs=1)
ALIASES = ["block1", "block2", "block3", "block4", "block5"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, sample_dir):
    """The 40 bundled photos (5 classes x 8) swept over every MobileNetV2 alias, 64 px."""
    store = tmp_path_factory.mktemp("sweep") / "sample.h5"
    return sweep(sample_dir, store=store, cv=5, **FAST)


def _class_folder(root, sample_dir, classes, n):
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for f in sorted((sample_dir / cls).iterdir())[:n]:
            shutil.copy(f, root / cls / f.name)
    return root


def test_sweep_rows_and_table(swept, sample_dir):
    """Check that the sweep scores every alias, shallow to deep, and that the table shows them."""
    r = swept
    assert isinstance(r, SweepResult)
    assert [s.layer for s in r.layers] == ALIASES
    assert [s.node for s in r.layers] == ["features.1", "features.3", "features.6", "features.13", "features.18"]
    assert [s.dims for s in r.layers] == [16, 24, 32, 96, 1280]
    assert r.n_images == 40 and r.n_classes == 5 and r.cv == 5
    assert r.extract.n_extracted == 40 and r.extract.layers == dict(zip(ALIASES, [16, 24, 32, 96, 1280]))
    for s in r.layers:
        assert s.scores.shape == (5,) and np.all((0 <= s.scores) & (s.scores <= 1))
        assert s.mean == pytest.approx(s.scores.mean()) and s.std == pytest.approx(s.scores.std())
        assert len(s.Cs) == 5 and set(s.Cs) <= set(SWEEP_CS["logreg"])
    means = [s.mean for s in r.layers]
    assert r.best_layer == ALIASES[int(np.argmax(means))]
    assert r.gain_over_last == pytest.approx(max(means) - means[-1])
    text = r.table()
    for s in r.layers:
        assert f"{s.mean:.3f} ± {s.std:.3f}" in text and s.node in text
    assert f"best layer: {r.best_layer} ({r.best.mean:.3f} ± {r.best.std:.3f})" in text
    assert text.splitlines()[ALIASES.index(r.best_layer) + 2].endswith("<- best")


def test_digits_favour_an_intermediate_layer(tmp_path):
    """Check that on small upsampled digits (unlike ImageNet) an intermediate layer beats the last.

    80 digits of sklearn's set at 32 px: block4 codes separate them far better than the
    ImageNet-specific block5, the finding the four-scenario guide builds on.
    """
    digits = load_example("digits_folder").write_digits(tmp_path / "digits", size=32, per_class=8)
    r = sweep(digits, cv=4, **{**FAST, "image_size": 32})
    assert r.n_images == 80 and r.n_classes == 10
    assert r.best_layer in ("block3", "block4")
    assert r.best.mean > 0.85 and r.gain_over_last > 0.1
    assert f"{100 * r.gain_over_last:+.1f} points over the last layer block5" in r.table()


def test_sweep_scores_are_held_out_accuracies(swept):
    """Check that a fold's score is the accuracy of the probe fitted on the other folds, with its C."""
    r = swept
    store = CodeStore(r.store)
    y, groups = store.labels[r.rows], store.sha256[r.rows]
    folds = list(StratifiedGroupKFold(5, shuffle=True, random_state=0).split(r.rows, y, groups))
    layer = r.score("block4")
    X = store.codes("block4")[r.rows]
    for k, (train, test) in enumerate(folds):
        assert np.all(r.fold_of[test] == k)
        model = make_pipeline(StandardScaler(), LogisticRegression(C=layer.Cs[k], max_iter=2000))
        model.fit(X[train], y[train])
        assert layer.scores[k] == pytest.approx(np.mean(model.predict(X[test]) == y[test]))


def test_store_input_reuses_codes(swept, sample_dir):
    """Check that sweeping the store (or the folder into it again) extracts nothing and agrees."""
    path = swept.store
    before = (CodeStore(path).path.stat().st_mtime_ns, len(CodeStore(path)))
    again = sweep(path, cv=5, **{k: v for k, v in FAST.items() if k in ("n_jobs", "progress")})
    assert again.extract is None and again.store == path
    assert [s.layer for s in again.layers] == ALIASES
    for a, b in zip(swept.layers, again.layers):
        np.testing.assert_array_equal(a.scores, b.scores)
        assert a.Cs == b.Cs
    folder = sweep(sample_dir, store=path, cv=5, layers=["block4", "block5"], **FAST)
    assert folder.extract.n_extracted == 0 and folder.extract.n_unchanged == 40
    np.testing.assert_array_equal(folder.score("block5").scores, swept.score("block5").scores)
    assert (CodeStore(path).path.stat().st_mtime_ns, len(CodeStore(path))) == before


def test_folder_into_existing_store_extends_it_with_its_layers(tmp_path, sample_dir):
    """Check that a folder swept into an existing store extracts only new photos, for the stored layers."""
    folder = _class_folder(tmp_path / "photos", sample_dir, ["daisy", "rose", "tulip"], 5)
    first = sorted(p for p in folder.glob("*/*.jpg") if p.name not in
                   {sorted((folder / c).iterdir())[-1].name for c in ("daisy", "rose", "tulip")})
    store = tmp_path / "s.h5"
    extract([str(p) for p in first], labels=[p.parent.name for p in first], root=folder, out=store,
            layers=["block3", "block5"], **{k: v for k, v in FAST.items() if k != "n_jobs"})
    assert len(CodeStore(store)) == 12
    r = sweep(folder, store=store, cv=4, **FAST)
    assert r.extract.n_extracted == 3 and r.extract.n_unchanged == 12
    assert [s.layer for s in r.layers] == ["block3", "block5"] and r.n_images == 15


def test_max_images_probes_a_sample_and_the_store_grows_into_the_folder(tmp_path, sample_dir):
    """Check that max_images extracts a stratified sample under the folder's ids, then the rest."""
    store = tmp_path / "s.h5"
    first = sweep(sample_dir, store=store, cv=4, max_images=25, layers=["block5"], **FAST)
    assert first.n_images == 25 and first.extract.n_extracted == 25
    counts = np.bincount(CodeStore(store).labels[first.rows])
    assert list(counts) == [5, 5, 5, 5, 5]
    ids = set(CodeStore(store).ids)
    assert all(i.split("/")[0] in first.class_names and i.count("/") == 1 for i in ids)
    whole = sweep(sample_dir, store=store, cv=4, **FAST)
    assert whole.extract.n_extracted == 15 and whole.extract.n_unchanged == 25 and whole.n_images == 40
    assert [s.layer for s in whole.layers] == ["block5"]
    on_store = sweep(store, cv=4, max_images=20, n_jobs=1, progress=False)
    assert on_store.n_images == 20 and list(np.bincount(CodeStore(store).labels[on_store.rows])) == [4] * 5


def test_duplicates_stay_in_one_fold(tmp_path, sample_dir):
    """Check that identical content under two names is tested in one fold, never on both sides."""
    folder = _class_folder(tmp_path / "photos", sample_dir, ["daisy", "rose"], 6)
    src = sorted((folder / "rose").iterdir())[0]
    shutil.copy(src, folder / "rose" / "copy_of_first.jpg")
    r = sweep(folder, cv=4, layers=["block4"], **FAST)
    ids = CodeStore(r.store).ids[r.rows]
    a, b = list(ids).index(f"rose/{src.name}"), list(ids).index("rose/copy_of_first.jpg")
    assert r.fold_of[a] == r.fold_of[b]
    assert r.n_images == 13


def test_plot_writes_a_png(swept, tmp_path):
    """Check that plot() writes a PNG file, and that a missing matplotlib gives the install hint."""
    out = swept.plot(tmp_path / "plots" / "sweep.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_plot_without_matplotlib(swept, tmp_path, monkeypatch):
    """Check that plotting without matplotlib says how to install it."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(CnnCodesError, match=r"^plotting the layer sweep needs matplotlib, which is not installed: pip install 'cnncodes\[plot\]'\.$"):
        swept.plot(tmp_path / "x.png")


def test_linear_svm_probe(swept):
    """Check that the linear SVM probe runs on a store and picks C from its own grid."""
    r = sweep(swept.store, layers=["block4", "features.18"], classifier="linear_svm", cv=5,
              n_jobs=1, progress=False)
    assert [s.layer for s in r.layers] == ["block4", "block5"] and r.classifier == "linear_svm"
    assert all(set(s.Cs) <= set(SWEEP_CS["linear_svm"]) for s in r.layers)
    assert "linear_svm probe" in r.table()


def test_unknown_layers(swept, sample_dir, tmp_path):
    """Check that an unknown alias, or a layer the store lacks, is refused with the valid names."""
    with pytest.raises(UnknownLayerError, match="layer 'block9' is not an alias.*Valid aliases: block1"):
        sweep(sample_dir, layers=["block9"], store=tmp_path / "x.h5", **FAST)
    assert not (tmp_path / "x.h5").exists()
    r = sweep(swept.store, layers="block2", n_jobs=1, progress=False)
    assert [s.layer for s in r.layers] == ["block2"]
    with pytest.raises(UnknownLayerError, match="layer 'block3' was not swept; the sweep holds block2"):
        r.score("block3")


def test_store_missing_layer(tmp_path, sample_dir):
    """Check that asking a store for a layer it does not hold names the stored ones."""
    folder = _class_folder(tmp_path / "photos", sample_dir, ["daisy", "rose"], 4)
    store = tmp_path / "s.h5"
    extract(folder, out=store, layers=["block3", "block5"], **{k: v for k, v in FAST.items() if k != "n_jobs"})
    with pytest.raises(UnknownLayerError, match=r"s.h5 holds layers block3, block5, not 'block2'. Sweep one of those"):
        sweep(store, layers=["block2"], cv=4, n_jobs=1, progress=False)


@pytest.mark.parametrize(
    "make, kwargs, words",
    [
        ("one_class", {}, r"needs labelled images of at least 2 classes; .* has 1 class \('daisy'\). "
                          r"Check that the folder has one subfolder per class"),
        ("flat", {}, r"at least 2 classes; .* has no labelled images"),
        ("singles", {}, r"needs at least 2 classes of 2 or more distinct images \(one to train on, one to "
                        r"test\); .* has 1 such class\(es\), and 2 class\(es\) of a single image \('daisy', "
                        r"'rose'\). Add images to those classes\.$"),
        ("sample", {"cv": 1}, r"cv must be an integer >= 2"),
        ("sample", {"classifier": "knn"}, r"unknown probe classifier 'knn'. Valid: logreg, linear_svm"),
    ],
    ids=["one-class", "unlabelled", "single-image-classes", "cv-1", "classifier"],
)
def test_bad_inputs_fail_before_extracting(make, kwargs, words, tmp_path, sample_dir):
    """Check that impossible sweeps are refused with what to do, before any image is extracted."""
    if make == "one_class":
        data = _class_folder(tmp_path / "d", sample_dir, ["daisy"], 8)
    elif make == "singles":
        data = _class_folder(tmp_path / "d", sample_dir, ["daisy", "rose"], 1)
        _class_folder(tmp_path / "d", sample_dir, ["tulip"], 8)
    elif make == "flat":
        data = tmp_path / "d"
        data.mkdir()
        for f in sorted((sample_dir / "daisy").iterdir())[:5]:
            shutil.copy(f, data / f.name)
    else:
        data = sample_dir
    with pytest.raises(CnnCodesError, match=words):
        sweep(data, store=tmp_path / "never.h5", **{**FAST, **kwargs})
    assert not (tmp_path / "never.h5").exists()


def test_duplicates_count_once_per_class(tmp_path, sample_dir):
    """Check that a class whose 4 files hold 3 distinct images lowers a 4-fold sweep to 3 folds."""
    folder = _class_folder(tmp_path / "d", sample_dir, ["daisy", "rose"], 4)
    first = sorted((folder / "rose").iterdir())[0]
    last = sorted((folder / "rose").iterdir())[-1]
    shutil.copy(first, last)  # 4 files, 3 distinct contents
    r = sweep(folder, cv=4, layers=["block5"], **FAST)
    assert (r.cv, r.cv_requested) == (3, 4) and r.layers[0].scores.shape == (3,)
    assert ("3 folds instead of the 4 asked for: class 'rose' has 3 distinct images, and every fold "
            "tests every class") in r.notes


def test_store_given_twice(swept, tmp_path):
    """Check that a store as data with store= is refused (nothing to extract into)."""
    with pytest.raises(CnnCodesError, match="data is already a code store; pass the store as data only"):
        sweep(swept.store, store=tmp_path / "other.h5")


def test_cli_sweep(swept, tmp_path, capsys):
    """Check that `cnncodes sweep STORE --plot` prints the table and the best layer and writes the PNG."""
    png = tmp_path / "s.png"
    assert main(["sweep", swept.store, "--quiet", "--jobs", "1", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert f"layer sweep of {swept.store}: mobilenet_v2 (IMAGENET1K_V1), 40 images, 5 classes" in out
    assert swept.table().split("\n", 1)[1] in out  # the same rows: the store's codes, the same folds
    assert f"best layer: {swept.best_layer}" in out and f"wrote {png}" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_sweep_error(sample_dir, tmp_path, capsys):
    """Check that a sweep error is one line on stderr with exit code 2."""
    code = main(["sweep", str(sample_dir), "--cv", "1", "--store", str(tmp_path / "x.h5"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("cnncodes sweep: error: cv must be an integer >= 2 (the number of folds), got 1.")
