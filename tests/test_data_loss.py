"""Tests of issue 21's data-loss items: writers never overwrite a file of another kind, a store is
not silently extended from another data root, one photo is a source, and stores honour the umask."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import cnncodes
from cnncodes import CodeStore, OutputExistsError, StoreMismatchError, extract, finetune, save
from cnncodes._cli.main import main
from cnncodes._outputs import file_kind
from cnncodes._store.store import StoreLock, _atomic_savez

CLI_FAST = ["--image-size", "64", "--batch-size", "4", "--workers", "0", "--quiet"]


def _digest(path):
    """sha256 of a file, or of a store: its root and every segment file."""
    path = Path(path)
    h = hashlib.sha256(path.read_bytes())
    folder = Path(f"{path}.d")
    for seg in sorted(folder.iterdir()) if folder.is_dir() else []:
        h.update(seg.name.encode() + seg.read_bytes())
    return h.hexdigest()


@pytest.fixture
def store(tmp_path, photos, fast):
    out = tmp_path / "small.h5"
    extract(photos, out=out, **fast)
    return out


@pytest.fixture
def model(store):
    return cnncodes.fit(CodeStore(store), classifier="logreg", C=1.0)


# ----------------------------------------------------------------- item 1: writers


def test_fit_into_its_own_store_is_refused(store, tmp_path, capsys):
    """Check that `cnncodes fit small.h5 -o small.h5` exits 2 before fitting, names the store,
    and leaves it intact; refitting into a model file stays allowed."""
    before = _digest(store)
    assert main(["fit", str(store), "-o", str(store), "--C", "1"]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and "small.h5" in err and "a cnncodes code store (12 rows)" in err
    assert "Choose another output path, or delete small.h5 first" in err
    assert "fit logreg" not in capsys.readouterr().out  # refused before fitting
    assert _digest(store) == before and len(CodeStore(store)) == 12
    model_path = tmp_path / "model.skops"
    assert main(["fit", str(store), "-o", str(model_path), "--C", "1"]) == 0
    assert main(["fit", str(store), "-o", str(model_path), "--C", "2"]) == 0  # same kind: overwritten
    assert cnncodes.load(model_path).fit["C"] == 2


def _victims(tmp_path, store, photos):
    folder = tmp_path / "data"
    folder.mkdir()
    return {
        "store": (store, "a cnncodes code store"),
        "photo": (next((photos / "daisy").iterdir()), "an image"),
        "folder": (folder, "a folder"),
        "text": (_write(tmp_path / "notes.txt", "keep me\n"), "a text file"),
    }


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("victim", ["store", "photo", "folder", "text"])
def test_save_refuses_other_kinds(model, store, photos, tmp_path, victim):
    """Check that cnncodes.save refuses to overwrite a store, a photo, a folder or a text file,
    naming what it is, and leaves it as it was."""
    path, what = _victims(tmp_path, store, photos)[victim]
    before = _digest(path) if path.is_file() else sorted(os.listdir(path))
    with pytest.raises(OutputExistsError, match=f"refusing to overwrite .*it is {what}.*model file"):
        save(model, path)
    assert (_digest(path) if path.is_file() else sorted(os.listdir(path))) == before


def test_save_overwrites_a_model_file(model, tmp_path):
    """Check that saving over a model file (its own kind) or an empty file is allowed."""
    out = tmp_path / "m.skops"
    save(model, out)
    save(model, out)
    assert cnncodes.load(out).classes == ["daisy", "rose", "tulip"]
    (tmp_path / "empty.skops").touch()
    save(model, tmp_path / "empty.skops")
    assert file_kind(tmp_path / "empty.skops")[0] == "model"


@pytest.mark.parametrize("victim, words", [
    ("model", "it is a skops model file.*with a code store"),
    ("folder", "it is a folder"),
    ("text", "it is a text file"),
], ids=["model", "folder", "text"])
def test_extract_refuses_a_non_store_out(model, photos, tmp_path, fast, victim, words, capsys):
    """Check that extract (Python and CLI) refuses an `out` that is not a code store, instead of
    'not a readable HDF5 file', and leaves it intact."""
    paths = {"model": tmp_path / "m.skops", "folder": tmp_path / "codes", "text": tmp_path / "t.h5"}
    path = paths[victim]
    if victim == "model":
        save(model, path)
    elif victim == "folder":
        path.mkdir()
    else:
        path.write_text("hello")
    before = _digest(path) if path.is_file() else None
    with pytest.raises(OutputExistsError, match=words):
        extract(photos, out=path, **fast)
    assert main(["extract", str(photos), "-o", str(path), *CLI_FAST]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (_digest(path) if path.is_file() else path.is_dir())
    if before:
        assert _digest(path) == before


def test_finetune_refuses_a_store_out(store, photos, capsys):
    """Check that finetune (Python and CLI) refuses to write its checkpoint over a code store."""
    before = _digest(store)
    with pytest.raises(OutputExistsError, match="it is a cnncodes code store.*fine-tuned checkpoint"):
        finetune(photos, out=store, epochs=1, progress=False)
    assert main(["finetune", str(photos), "-o", str(store), "--epochs", "1", "--quiet"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert _digest(store) == before


def test_predict_csv_and_evaluate_plot_refuse_a_store(model, store, photos, tmp_path, capsys):
    """Check that `predict --csv` and `evaluate --plot` refuse a store as their output before any
    work, and that `predict --csv` may overwrite its own earlier CSV."""
    model_path = save(model, tmp_path / "m.skops")
    before = _digest(store)
    photo = str(next((photos / "rose").iterdir()))
    assert main(["predict", str(model_path), photo, "--csv", str(store), "--quiet"]) == 2
    assert "--csv" in capsys.readouterr().err
    assert main(["evaluate", str(model_path), str(store), "--plot", str(store), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err and "PNG plot" in err
    assert _digest(store) == before
    csv = tmp_path / "pred.csv"
    assert main(["predict", str(model_path), photo, "--csv", str(csv), "--quiet"]) == 0
    assert main(["predict", str(model_path), photo, "--csv", str(csv), "--quiet"]) == 0
    assert csv.read_text().startswith("id,label1,probability1")
    source_csv = _write(tmp_path / "list.csv", f"{photo},rose\n")
    assert main(["predict", str(model_path), photo, "--csv", str(source_csv), "--quiet"]) == 2
    assert "it is a text file (a CSV)" in capsys.readouterr().err
    assert source_csv.read_text() == f"{photo},rose\n"


def test_sweep_plot_refuses_a_store_before_the_work(store):
    """Check that sweep(plot=...) refuses a store as the plot before probing any layer."""
    before = _digest(store)
    with pytest.raises(OutputExistsError, match="PNG plot"):
        cnncodes.sweep(store, plot=store, cv=2)
    assert _digest(store) == before


# ----------------------------------------------------------------- item 2: data roots


@pytest.fixture
def two_roots(tmp_path, photos):
    """Folders A and B with the same relative paths; B's daisies are other photos."""
    a = photos
    b = tmp_path / "B"
    shutil.copytree(a, b)
    roses = sorted((a / "rose").iterdir())
    for daisy, rose in zip(sorted((b / "daisy").iterdir()), roses):
        shutil.copy(rose, daisy)
        os.utime(daisy, (1_700_000_000, 1_700_000_000))
    return a, b


def _sha_by_id(out):
    s = CodeStore(out)
    return dict(zip(s.ids, (x.decode() if isinstance(x, bytes) else x for x in s.sha256)))


def test_extending_from_another_root_is_refused(two_roots, tmp_path, fast, capsys):
    """Check that a run from another data root whose images would replace stored rows is refused
    (Python and CLI), naming both roots and the options, and leaves the store intact."""
    a, b = two_roots
    out = tmp_path / "AB.h5"
    extract(a, out=out, **fast)
    before = _digest(out)
    with pytest.raises(StoreMismatchError, match=f"data root '{a}'.*are in '{b}'.*4 of them.*"
                                                 r"-o other\.h5.*--replace-root"):
        extract(b, out=out, **fast)
    assert main(["extract", str(b), "-o", str(out), *CLI_FAST]) == 2
    assert "--replace-root" in capsys.readouterr().err
    assert _digest(out) == before and not Path(f"{out}.partial").exists()
    assert CodeStore(out).attrs["data_root"] == str(a)


def test_replace_root_replaces_the_rows(two_roots, tmp_path, fast):
    """Check that on_other_root='replace' replaces the rows with the same ids and records the new
    data root, listing the earlier one."""
    a, b = two_roots
    out = tmp_path / "AB.h5"
    extract(a, out=out, **fast)
    old = _sha_by_id(out)
    extract(b, out=out, on_other_root="replace", **fast)
    new = _sha_by_id(out)
    assert sorted(new) == sorted(old)
    daisies = [i for i in new if i.startswith("daisy/")]
    assert daisies and all(new[i] != old[i] for i in daisies)
    assert all(new[i] == old[i] for i in new if not i.startswith("daisy/"))
    attrs = CodeStore(out).attrs
    assert attrs["data_root"] == str(b) and json.loads(attrs["earlier_data_roots"]) == [str(a)]


def test_replace_root_flag(two_roots, tmp_path, capsys):
    """Check that `cnncodes extract --replace-root` replaces A's daisies by B's."""
    a, b = two_roots
    out = tmp_path / "AB.h5"
    assert main(["extract", str(a), "-o", str(out), *CLI_FAST]) == 0
    old = _sha_by_id(out)
    assert main(["extract", str(b), "-o", str(out), "--replace-root", *CLI_FAST]) == 0
    new = _sha_by_id(out)
    assert new["daisy/" + sorted(os.listdir(b / "daisy"))[0]] != old["daisy/" + sorted(os.listdir(a / "daisy"))[0]]


def test_moved_data_and_same_root_are_not_refused(photos, tmp_path, fast):
    """Check that re-running the same folder, a moved store, and the same photos copied to another
    folder extend the store without a refusal or a recomputation."""
    out = tmp_path / "codes.h5"
    extract(photos, out=out, **fast)
    assert extract(photos, out=out, **fast).n_extracted == 0
    moved = tmp_path / "elsewhere" / "codes.h5"
    moved.parent.mkdir()
    shutil.move(out, moved)
    shutil.move(f"{out}.d", f"{moved}.d")
    assert extract(photos, out=moved, **fast).n_extracted == 0
    copy = tmp_path / "copy"
    shutil.copytree(photos, copy)
    result = extract(copy, out=moved, **fast)
    assert result.n_extracted == 0 and len(CodeStore(moved)) == 12
    assert CodeStore(moved).attrs["data_root"] == str(copy)


# ----------------------------------------------------------------- item 3: one photo


def test_a_single_image_is_a_source(photos, tmp_path, fast, model, capsys):
    """Check that one image file is a source for extract (Python and CLI) and predict, with the
    id rules of a list of paths."""
    photo = sorted((photos / "tulip").iterdir())[0]
    out = tmp_path / "one.h5"
    result = extract(str(photo), out=out, **fast)
    assert result.n_images == 1 and CodeStore(out).ids.tolist() == [photo.name]
    assert CodeStore(out).attrs["data_root"] == str(photo.parent)
    rooted = extract(photo, out=tmp_path / "rooted.h5", root=photos, **fast)
    assert rooted.n_images == 1 and CodeStore(tmp_path / "rooted.h5").ids.tolist() == [f"tulip/{photo.name}"]
    assert main(["extract", str(photo), "-o", str(tmp_path / "cli.h5"), *CLI_FAST]) == 0
    model_path = save(model, tmp_path / "m.skops")
    capsys.readouterr()
    assert main(["predict", str(model_path), str(photo), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(photo.name + "\t")


def test_a_non_image_file_is_still_refused(tmp_path, fast):
    """Check that a file that is neither an image, a folder nor a CSV is refused with what to give."""
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(cnncodes.SourceError, match="is a file, not a folder, a .csv, a .tar shard or a Parquet file.*Give an image file"):
        extract(tmp_path / "a.txt", out=tmp_path / "x.h5", **fast)


# ----------------------------------------------------------------- item 4: umask


def test_store_files_honour_the_umask(photos, tmp_path, fast):
    """Check that with umask 022 the root, its segments, the lock and journal files are 0644
    (the root and journal batches are made by mkstemp, 0600 unless changed)."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "codes.h5"
        extract(photos, out=out, **fast)
        batch = tmp_path / "batch.npz"
        _atomic_savez(batch, {"x": np.zeros(2)})  # how the journal writes each batch
        with StoreLock(out):  # removed when released: its mode is read while held
            lock_mode = oct(Path(f"{out}.lock").stat().st_mode & 0o777)
    finally:
        os.umask(old)
    assert lock_mode == "0o644"
    files = [out, *Path(f"{out}.d").iterdir(), batch]
    assert len(files) >= 3
    assert {str(f.name): oct(f.stat().st_mode & 0o777) for f in files} == {str(f.name): "0o644" for f in files}
    assert oct(Path(f"{out}.d").stat().st_mode & 0o777) == "0o755"
