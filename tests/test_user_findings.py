"""Tests of what a new user found (issue 21 items 3, 4, 9, 13): failed photos, unknown classes, one-line errors."""

import csv
import shutil

import numpy as np
import pytest

from cnncodes import CnnCodesError, FailedImagesError, extract
from cnncodes._cli.main import main
from cnncodes._classify.fit import fit
from cnncodes._models.model import Predictions, evaluate, predict, save


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, sample_dir):
    """A logreg model (fixed C, no cross-validation) on 3 classes x 4 bundled photos at 64 px."""
    root = tmp_path_factory.mktemp("findings")
    data = root / "photos"
    for cls in ("daisy", "rose", "tulip"):
        (data / cls).mkdir(parents=True)
        for f in sorted((sample_dir / cls).iterdir())[:4]:
            shutil.copy(f, data / cls / f.name)
    store = root / "codes.h5"
    extract(data, out=store, layers=["block5"], image_size=64, num_workers=0, progress=False)
    return save(fit(store, layer="block5", C=1.0), root / "m.skops")


@pytest.fixture
def mixed(tmp_path, sample_dir):
    """A flat folder of two good photos, a non-image and an empty file."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for f in sorted((sample_dir / "rose").iterdir())[:2]:
        shutil.copy(f, folder / f.name)
    (folder / "notes.jpg").write_bytes(b"this is not a jpeg")
    (folder / "empty.jpg").write_bytes(b"")
    return folder


def _store_of(tmp_path, sample_dir, classes):
    """A store at the model's settings whose class folders are named `classes` (4 photos each)."""
    data = tmp_path / "other"
    for new, old in classes.items():
        (data / new).mkdir(parents=True)
        for f in sorted((sample_dir / old).iterdir())[4:8]:
            shutil.copy(f, data / new / f.name)
    out = tmp_path / "other.h5"
    extract(data, out=out, layers=["block5"], image_size=64, num_workers=0, progress=False)
    return out


def test_predict_returns_the_failed_photos_with_reasons(model_file, mixed):
    """Check that predict() returns a list of the good photos and `failures` naming the others."""
    preds = predict(model_file, mixed)
    assert isinstance(preds, Predictions) and len(preds) == 2
    assert sorted(rid for rid, _ in preds.failures) == ["empty.jpg", "notes.jpg"]
    assert all(why for _, why in preds.failures)
    assert preds[0].labels[0] in ("daisy", "rose", "tulip")


def test_cli_predict_lists_failures_writes_status_and_exits_1(model_file, mixed, tmp_path, capsys):
    """Check that `cnncodes predict --csv` lists failed photos on stderr, writes a status column, exits 1."""
    out = tmp_path / "p.csv"
    assert main(["predict", str(model_file), str(mixed), "--csv", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "2 of 4 photos failed and have no prediction" in err
    assert "notes.jpg: " in err and "empty.jpg: " in err
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4
    status = {r["id"]: r["status"] for r in rows}
    assert sorted(k for k, v in status.items() if v == "ok") == sorted(p.name for p in mixed.iterdir()
                                                                      if p.stat().st_size > 100)
    assert status["notes.jpg"] not in ("", "ok") and status["empty.jpg"] not in ("", "ok")
    assert list(rows[0])[:3] == ["id", "label1", "probability1"] and list(rows[0])[-1] == "status"


def test_all_photos_failing_is_an_error_naming_them(model_file, tmp_path, capsys):
    """Check that predict with every photo unreadable says so with reasons, not a scikit-learn traceback."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"nope")
    (folder / "b.jpg").write_bytes(b"")
    with pytest.raises(FailedImagesError, match=r"(?s)every photo failed \(2\).*a.jpg: not an image") as info:
        predict(model_file, folder)
    assert sorted(rid for rid, _ in info.value.failures) == ["a.jpg", "b.jpg"]
    assert main(["predict", str(model_file), str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "every photo failed (2)" in err and "b.jpg: " in err and "Traceback" not in err


def test_csv_in_a_missing_folder_is_refused_before_extracting(model_file, mixed, tmp_path, capsys, monkeypatch):
    """Check that --csv in a folder that does not exist is a one-line error before any extraction."""
    import cnncodes._extract.extract as ext

    def no_extract(*args, **kwargs):
        raise AssertionError("extracted before checking --csv")

    monkeypatch.setattr(ext, "extract", no_extract)
    code = main(["predict", str(model_file), str(mixed), "--csv", str(tmp_path / "nodir" / "p.csv"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "folder" in err and "nodir" in err and "does not exist" in err and "Traceback" not in err


def test_evaluate_refuses_data_with_no_known_class(model_file, tmp_path, sample_dir, capsys):
    """Check that evaluating on classes the model never saw is refused, naming both sets of classes."""
    store = _store_of(tmp_path, sample_dir, {"cat": "daisy", "dog": "rose"})
    with pytest.raises(CnnCodesError, match="no class of the data is one the model knows.*cat, dog.*daisy, rose, tulip"):
        evaluate(model_file, store)
    assert main(["evaluate", str(model_file), str(store), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no class of the data is one the model knows" in err and "accuracy" not in err


def test_evaluate_leaves_out_unknown_classes_with_a_warning(model_file, tmp_path, sample_dir, capsys):
    """Check that rows of unknown classes are left out, with a warning and a note in the summary."""
    store = _store_of(tmp_path, sample_dir, {"rose": "rose", "cat": "daisy"})
    with pytest.warns(UserWarning, match="4 rows of classes the model was not trained on.*: cat"):
        ev = evaluate(model_file, store)
    assert ev.n == 4 and "unknown classes left out (cat)" in ev.on and "cat" not in ev.classes
    assert main(["evaluate", str(model_file), str(store), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "cnncodes evaluate: warning: 4 rows of classes the model was not trained on" in captured.err
    assert "on 4 images" in captured.out and "unknown classes left out (cat)" in captured.out


@pytest.mark.parametrize("cv", [1, 0, 2.5], ids=["one", "zero", "float"])
def test_fit_refuses_fewer_than_two_folds(cv):
    """Check that fit(cv=...) below 2 or not an integer is refused, saying what to pass."""
    X, y = np.random.default_rng(0).normal(size=(20, 4)), np.array(["a", "b"] * 10)
    with pytest.raises(CnnCodesError, match=r"cv must be an integer >= 2 .*got .*Pass cv=2 or more"):
        fit(X, y, cv=cv)


def test_cli_fit_cv_1_is_a_one_line_error(model_file, tmp_path, capsys):
    """Check that `cnncodes fit --cv 1` is a one-line error with exit 2, and writes no model."""
    out = tmp_path / "m.skops"
    assert main(["fit", str(model_file.parent / "codes.h5"), "--cv", "1", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnncodes fit: error: cv must be an integer >= 2") and "--cv" in err
    assert "Traceback" not in err and not out.exists()


def test_labels_are_plain_str(model_file, mixed):
    """Check that Prediction.labels are plain str (printed 'rose', not np.str_('rose'))."""
    preds = predict(model_file, mixed, top_k=3)
    for p in preds:
        assert all(type(label) is str for label in p.labels) and type(p.id) is str
        assert "np.str_" not in repr(p)
    assert predict.__annotations__["return"] in ("Predictions", Predictions)
