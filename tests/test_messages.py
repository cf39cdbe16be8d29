"""Messages a new user met (issue 21, items 8 and 10): each says what was wrong and what to do."""

import re
import shutil

import numpy as np
import pytest
from PIL import Image

import cnncodes
from cnncodes import CodeStore, StoreMismatchError, evaluate, extract, predict, split_store
from cnncodes._cli.main import main
from cnncodes._errors import CnnCodesError, SourceError, StoreError
from cnncodes._input.sources import read_source

SMALL = dict(layers=["block5"], image_size=64, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def store_and_model(tmp_path_factory, sample_dir):
    """A store of 3 classes x 3 photos at 64 px and a model fitted on it."""
    root = tmp_path_factory.mktemp("messages")
    for cls in ("daisy", "rose", "tulip"):
        (root / "photos" / cls).mkdir(parents=True)
        for f in sorted((sample_dir / cls).iterdir())[:3]:
            shutil.copy(f, root / "photos" / cls / f.name)
    out = root / "codes.h5"
    extract(root / "photos", out=out, **SMALL)
    model = root / "m.skops"
    assert main(["fit", str(out), "--C", "1", "-o", str(model)]) == 0
    return root, out, model


def test_jfif_and_jpe_files_are_images(tmp_path):
    """Check that .jfif and .jpe files are listed as images, not skipped."""
    for name in ("a.jfif", "b.jpe", "c.JFIF"):
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="JPEG")
    src = read_source(tmp_path)
    assert sorted(i.id for i in src.items) == ["a.jfif", "b.jpe", "c.JFIF"]
    assert src.skipped == []


def test_csv_of_urls_lists_the_urls_unmangled(tmp_path):
    """Check that a CSV of URLs lists each URL as its id and its address (not a local path
    with "https:/" collapsed), with its label; the objects are read when extracted."""
    csv = tmp_path / "urls.csv"
    csv.write_text("path,label\nhttps://upload.example.org/a.jpg,cat\n")
    src = read_source(csv)
    assert [(i.id, i.path, i.label) for i in src.items] == [
        ("https://upload.example.org/a.jpg", "https://upload.example.org/a.jpg", "cat")]
    assert src.remote


@pytest.mark.parametrize("sep", [";", "\t", ","], ids=["semicolon", "tab", "comma"])
def test_csv_delimiter_is_detected(tmp_path, sep):
    """Check that ; and tab separated CSVs are read as path and label, as comma ones are."""
    csv = tmp_path / "list.csv"
    csv.write_text(f"path{sep}label\na.jpg{sep}cat\nb.jpg{sep}dog\n")
    src = read_source(csv)
    assert [(i.id, i.label) for i in src.items] == [("a.jpg", "cat"), ("b.jpg", "dog")]


def test_csv_of_another_delimiter_is_refused_naming_it(tmp_path):
    """Check that a | separated CSV is refused with a message naming '|' and the ones read."""
    csv = tmp_path / "list.csv"
    csv.write_text("a.jpg|cat\nb.jpg|dog\n")
    with pytest.raises(SourceError, match=r"separated by '\|'.*',', ';' or a tab"):
        read_source(csv)


def test_folder_given_as_store_says_it_is_a_folder(tmp_path, capsys):
    """Check that a folder where a store is expected is called a folder, in Python and the CLI."""
    folder = tmp_path / "small"
    folder.mkdir()
    with pytest.raises(StoreError, match="is a folder, not a code store.*cnncodes extract"):
        CodeStore(folder)
    assert main(["info", str(folder)]) != 0
    err = capsys.readouterr().err
    assert "is a folder, not a code store" in err and "does not exist" not in err
    assert main(["fit", str(folder), "-o", str(tmp_path / "m.skops")]) != 0
    assert "is a folder, not a code store" in capsys.readouterr().err


def test_settings_mismatch_gives_advice_for_evaluate_and_predict(store_and_model, tmp_path, capsys):
    """Check that evaluate and predict --store advise what they can do, not extract's -o."""
    root, _, model = store_and_model
    other = tmp_path / "other.h5"
    extract(root / "photos", out=other, layers=["block5"], image_size=96, num_workers=0, progress=False)
    with pytest.raises(StoreMismatchError, match="centre crop 96.*store extracted with the model's settings"):
        evaluate(model, other)
    with pytest.raises(StoreMismatchError, match=r"--store other\.h5.*leave --store out") as info:
        predict(model, root / "photos" / "rose", store=other)
    assert "-o other.h5" not in str(info.value)
    assert main(["evaluate", str(model), str(other)]) != 0
    err = capsys.readouterr().err
    assert "model's settings" in err and "-o other.h5" not in err
    assert main(["predict", str(model), str(root / "photos" / "rose"), "--store", str(other), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "--store other.h5" in err and "-o other.h5" not in err


def test_test_size_names_classes_with_too_few_images(tmp_path, sample_dir, capsys):
    """Check that fit --test-size names a class with one image by name, not by index."""
    for cls, n in (("daisy", 3), ("rose", 3), ("tulip", 1)):
        (tmp_path / "photos" / cls).mkdir(parents=True)
        for f in sorted((sample_dir / cls).iterdir())[:n]:
            shutil.copy(f, tmp_path / "photos" / cls / f.name)
    out = tmp_path / "codes.h5"
    extract(tmp_path / "photos", out=out, **SMALL)
    with pytest.raises(CnnCodesError, match=r"at least 2 distinct images.*'tulip' \(1\).*no --test-size"):
        split_store(out, test_size=0.5)
    assert main(["fit", str(out), "--test-size", "0.5", "--C", "1", "-o", str(tmp_path / "m.skops")]) != 0
    err = capsys.readouterr().err
    assert "'tulip' (1)" in err and "[2]" not in err


@pytest.mark.parametrize("call, words", [
    (lambda tmp: cnncodes.extract(tmp, out=tmp / "x.h5", dtype="float64"), "unknown dtype 'float64'. Valid dtypes: float32, float16."),
    (lambda tmp: cnncodes.extract(tmp, out=tmp / "x.h5", batch_size=0), "batch_size must be >= 1, got 0."),
    (lambda tmp: cnncodes.fit(np.eye(4), ["a", "b", "a", "b"], classifier="forest"),
     "unknown classifier 'forest'. Valid classifiers: logreg, linear_svm, knn"),
    (lambda tmp: cnncodes.CNNCodes(dtype="float64").fit([str(tmp / "a.jpg")]), "unknown dtype 'float64'"),
], ids=["extract-dtype", "extract-batch", "fit-classifier", "transformer-dtype"])
def test_bad_parameters_are_value_errors(tmp_path, call, words):
    """Check that a bad argument raises InvalidParameterError, a CnnCodesError and a ValueError
    (what scikit-learn's own estimators raise), with its valid values."""
    with pytest.raises(cnncodes.InvalidParameterError, match=re.escape(words)) as info:
        call(tmp_path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, cnncodes.CnnCodesError)
