"""Tests of the code store: round trip, provenance, incremental runs, mismatch, lock, sources."""

import json
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from cnncodes import (
    CodeStore,
    SourceError,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
    extract,
)
from cnncodes._store.store import FORMAT, Journal


def _sha(path):
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_round_trip(photos, tmp_path, fast):
    """Check that rows, labels, class names, codes and provenance come back as written."""
    out = tmp_path / "codes.h5"
    result = extract(photos, out=out, layers=["block5", "features.13"], **fast)
    store = CodeStore(out)
    expected_ids = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.jpg"))
    assert list(store.ids) == expected_ids
    assert store.class_names == ["daisy", "rose", "tulip"]
    assert [store.class_names[i] for i in store.labels] == [i.split("/")[0] for i in expected_ids]
    assert store.codes("block4").shape == (12, 96)
    assert store.codes("block5").shape == (12, 1280)
    assert store.codes("features.13").shape == (12, 96)  # raw node names work on read too
    assert list(store.sha256) == [_sha(photos / i) for i in expected_ids]
    assert store.layers == ["block4", "block5"]
    assert store.spec["weights"] == "IMAGENET1K_V1"
    assert store.spec["weights_sha256"].startswith("b0353104")
    assert store.spec["preprocessing"]["crop_size"] == 64
    assert result.n_extracted == 12 and result.n_rows == 12 and not result.failures
    assert np.isfinite(store.codes("block5")).all()
    assert (np.abs(store.codes("block5")).sum(axis=1) > 0).all()


def test_plain_h5py_reads_everything(photos, tmp_path, fast):
    """Check that the store is self-describing and readable without cnncodes."""
    out = tmp_path / "codes.h5"
    extract(photos, out=out, layers=["block4"], **fast)
    store = CodeStore(out)
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == FORMAT and f.attrs["format_version"] == 2
        spec = json.loads(f.attrs["spec"])
        assert spec["backbone"] == "mobilenet_v2" and spec["layers"] == {"block4": "features.13"}
        assert "torch" in json.loads(f.attrs["versions"])
        np.testing.assert_array_equal(f["codes/block4"][:], store.codes("block4"))
        assert [s.decode() for s in f["ids"][:]] == list(store.ids)
        assert f["codes/block4"].attrs["node"] == "features.13"
        # Format 2: a virtual dataset over segment files, named relative to the root's folder.
        assert f["codes/block4"].is_virtual and f["codes/block4"].shape == (12, 96)
        sources = f["codes/block4"].virtual_sources()
        assert sources and all(s.file_name.startswith("codes.h5.d/segment-") for s in sources)
    for seg in (tmp_path / "codes.h5.d").iterdir():
        with h5py.File(seg, "r") as g:
            assert g["codes/block4"].chunks is not None and g["codes/block4"].shape[1] == 96


def test_codes_match_a_direct_forward_pass(photos, tmp_path, fast):
    """Check that each row holds the codes of its own image (no misalignment)."""
    import torch

    from cnncodes._backbones.registry import get_backbone
    from cnncodes._backbones.codes_model import CodesModel
    from cnncodes._input.images import Preprocess, decode, resize_batch
    from cnncodes._backbones.weights import load_model, resolve
    from torchvision.models import MobileNet_V2_Weights

    out = tmp_path / "codes.h5"
    extract(photos, out=out, layers=["block5"], precision="float32", **fast)
    store = CodeStore(out)
    spec = get_backbone("mobilenet_v2")
    model = CodesModel(load_model(spec, resolve(spec)), {"features.18": "block5"}, "avg").eval()
    prep = Preprocess.from_weights(MobileNet_V2_Weights.IMAGENET1K_V1, 64, resize="device")
    assert store.spec["preprocessing"]["resize"] == "device"  # the default
    rows = [4, 0, 11]
    batch = resize_batch([decode((photos / store.ids[r]).read_bytes(), prep) for r in rows], prep,
                         torch.device("cpu"))
    with torch.inference_mode():
        direct = model(prep.normalize(batch))["block5"].numpy()
    np.testing.assert_allclose(store.codes("block5")[rows], direct, rtol=1e-4, atol=1e-5)


def test_float16_store(photos, tmp_path, fast):
    """Check that dtype='float16' stores half-precision codes close to the float32 ones."""
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    extract(photos, out=a, **fast)
    extract(photos, out=b, dtype="float16", **fast)
    assert CodeStore(b).codes().dtype == np.float16
    np.testing.assert_allclose(CodeStore(b).codes().astype(np.float32), CodeStore(a).codes(), rtol=2e-3, atol=2e-3)


def test_unchanged_rerun_does_nothing(photos, tmp_path, fast):
    """Check that re-running on an unchanged folder computes nothing and leaves the file alone."""
    import os

    for p in photos.rglob("*.jpg"):  # not modified just now (a "racy" file is read again once)
        os.utime(p, (1_700_000_000, 1_700_000_000))
    out = tmp_path / "codes.h5"
    extract(photos, out=out, **fast)
    before = (out.stat().st_mtime_ns, _sha(out))
    result = extract(photos, out=out, **fast)
    assert (result.n_extracted, result.n_reused, result.n_unchanged) == (0, 0, 12)
    assert (out.stat().st_mtime_ns, _sha(out)) == before
    assert not Journal(out).exists() and not Path(f"{out}.lock").exists()


@pytest.mark.parametrize("slow", [False, True], ids=["one-thread", "threads"])
def test_files_hash_alike_in_this_thread_or_in_threads(tmp_path, monkeypatch, slow):
    """Check that planning hashes every file in order, an unreadable one as its reason,
    whether the reads come quickly (this thread) or slowly (the rest by 8 threads)."""
    import hashlib

    import cnncodes._extract.extract as ex

    monkeypatch.setattr(ex, "HASH_CHUNK", 4)
    # Every chunk slow (from the second chunk on, threads), or none, whatever the machine's load.
    monkeypatch.setattr(ex, "SLOW_READ_SECONDS", -1.0 if slow else 1e9)
    used = []
    monkeypatch.setattr(ex, "ThreadPoolExecutor", lambda **kw: used.append(kw) or ThreadPoolExecutor(**kw))
    paths = []
    for k in range(23):
        f = tmp_path / f"f{k:02d}.bin"
        f.write_bytes(bytes([k]) * (k + 1))
        paths.append(str(f))
    paths[17] = str(tmp_path / "missing.bin")
    hashed = ex._hash_files(paths)
    assert len(hashed) == 23
    for k, (sha, why) in enumerate(hashed):
        if k == 17:
            assert sha is None and why.startswith("cannot read file: No such file")
        else:
            assert why is None and sha == hashlib.sha256(bytes([k]) * (k + 1)).hexdigest()
    assert used == ([{"max_workers": 8}] if slow else [])


def test_incremental_add_and_label_conflict(photos, tmp_path, sample_dir, fast):
    """Check that new images are extracted, copies reused, old rows kept bit for bit."""
    out = tmp_path / "codes.h5"
    extract(photos, out=out, **fast)
    old = CodeStore(out)
    old_codes = dict(zip(old.ids, old.codes()))
    new_photo = sorted((sample_dir / "tulip").iterdir())[-1]
    shutil.copy(new_photo, photos / "tulip" / "new.jpg")
    (photos / "sunflower").mkdir()
    duplicate = sorted((photos / "rose").iterdir())[0]
    shutil.copy(duplicate, photos / "sunflower" / "same_as_rose.jpg")
    result = extract(photos, out=out, **fast)
    assert (result.n_extracted, result.n_reused, result.n_unchanged) == (1, 1, 12)
    store = CodeStore(out)
    assert len(store) == 14
    assert store.class_names == ["daisy", "rose", "tulip", "sunflower"]  # old indices kept
    codes = dict(zip(store.ids, store.codes()))
    for rid, vec in old_codes.items():
        np.testing.assert_array_equal(codes[rid], vec)
    np.testing.assert_array_equal(codes["sunflower/same_as_rose.jpg"], codes[f"rose/{duplicate.name}"])
    labels = dict(zip(store.ids, store.labels))
    assert store.class_names[labels["sunflower/same_as_rose.jpg"]] == "sunflower"
    assert result.conflicts == [[(f"rose/{duplicate.name}", "rose"), ("sunflower/same_as_rose.jpg", "sunflower")]]
    assert "1 identical images carry different labels" in result.summary()
    # The reader finds the same group, over the whole store and among the run's contents.
    shas = dict(zip(store.ids, store.sha256))
    assert store.conflicts() == store.conflicts(among=[shas["sunflower/same_as_rose.jpg"]]) == result.conflicts


def test_changed_file_is_recomputed(photos, tmp_path, sample_dir, fast):
    """Check that a file replaced under the same name gets the codes of its new content."""
    out = tmp_path / "codes.h5"
    extract(photos, out=out, **fast)
    target = sorted((photos / "daisy").iterdir())[0]
    rid = f"daisy/{target.name}"
    before = dict(zip(CodeStore(out).ids, CodeStore(out).codes()))[rid]
    Image.open(target).transpose(Image.FLIP_TOP_BOTTOM).save(target, quality=95)
    result = extract(photos, out=out, **fast)
    assert result.n_extracted == 1 and result.n_rows == 12
    store = CodeStore(out)
    after = dict(zip(store.ids, store.codes()))[rid]
    assert not np.allclose(before, after)
    assert dict(zip(store.ids, store.sha256))[rid] == _sha(target)


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(layers=["block4"]), "layers 'block5=features.18'.*'block4=features.13'"),
        (dict(pooling="max"), "pooling 'avg'.*'max'"),
        (dict(backbone="resnet18", weights=None), "backbone 'mobilenet_v2'.*'resnet18'"),
        (dict(weights=None), "weights 'IMAGENET1K_V1'.*'random'"),
        (dict(image_size=96), "preprocessing .*centre crop 64.*centre crop 96"),
        (dict(dtype="float16"), "dtype 'float32'.*'float16'"),
    ],
    ids=["layer", "pooling", "backbone", "weights", "preprocessing", "dtype"],
)
def test_mismatch_is_refused(photos, tmp_path, fast, change, words):
    """Check that a run with other settings is refused, naming both values, store untouched."""
    out = tmp_path / "codes.h5"
    extract(photos, out=out, **fast)
    digest = _sha(out)
    shutil.copy(sorted((photos / "rose").iterdir())[0], photos / "rose" / "extra.jpg")
    with pytest.raises(StoreMismatchError, match=words) as info:
        extract(photos, out=out, **{**fast, **change})
    assert "write to another file" in str(info.value)
    assert _sha(out) == digest and not Path(f"{out}.lock").exists()


def test_second_writer_is_refused(photos, tmp_path, fast):
    """Check that a store locked by another live process cannot be written."""
    out = tmp_path / "codes.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from cnncodes._store.store import StoreLock
            with StoreLock({str(out)!r}):
                print("locked", flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=rf"being written by another process \(pid {holder.pid}\)"):
            extract(photos, out=out, **fast)
    finally:
        holder.kill()
        holder.wait()
    # The kernel drops the lock with its holder: the next run goes through.
    from cnncodes._store.store import StoreLock

    with StoreLock(out):  # the same process cannot lock twice either
        with pytest.raises(StoreLockedError, match="this process"):
            extract(photos, out=out, **fast)
    assert extract(photos, out=out, **fast).n_rows == 12


def test_failed_merge_keeps_old_store_and_journal(photos, tmp_path, sample_dir, fast, monkeypatch):
    """Check that a crash while merging leaves the old store intact and the rerun completes."""
    import cnncodes._store.store as store_mod

    out = tmp_path / "codes.h5"
    extract(photos, out=out, **fast)
    digest = _sha(out)
    shutil.copy(sorted((sample_dir / "daisy").iterdir())[-1], photos / "daisy" / "late.jpg")

    real_replace = store_mod.os.replace

    def crash(src, dst):
        if Path(dst) == out:  # only the final step of the merge; journal writes go through
            raise OSError("simulated crash during merge")
        real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        extract(photos, out=out, **fast)
    monkeypatch.undo()
    assert _sha(out) == digest and Journal(out).exists()
    assert not list(tmp_path.glob(".codes.h5.*.tmp"))
    result = extract(photos, out=out, **fast)
    assert result.n_extracted == 0 and (result.n_unchanged, result.n_resumed) == (12, 1)
    assert "1 resumed from an interrupted run" in result.summary()
    assert len(CodeStore(out)) == 13 and not Journal(out).exists()


def test_merge_is_idempotent(photos, tmp_path, sample_dir, fast, monkeypatch):
    """Check that a journal left behind after a merge (kill before cleanup) adds nothing twice."""
    out = tmp_path / "codes.h5"
    monkeypatch.setattr(Journal, "remove", lambda self: None)
    extract(photos, out=out, **fast)
    assert Journal(out).exists()
    monkeypatch.undo()
    result = extract(photos, out=out, **fast)
    store = CodeStore(out)
    assert len(store) == 12 and len(set(store.ids)) == 12 and result.n_extracted == 0


def test_journal_of_other_settings_is_refused(photos, tmp_path, fast, monkeypatch):
    """Check that an interrupted run is never resumed with other settings."""
    out = tmp_path / "codes.h5"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the run dies after journalling, before merging

    monkeypatch.setattr("cnncodes._extract.extract.merge", killed)
    with pytest.raises(KeyboardInterrupt):
        extract(photos, out=out, **fast)
    monkeypatch.undo()
    assert Journal(out).batches() and not out.exists()
    with pytest.raises(StoreMismatchError, match="interrupted run in codes.h5.partial.*pooling 'avg'.*'max'"):
        extract(photos, out=out, **{**fast, "pooling": "max"})


def test_store_format_checks(tmp_path, photos, fast):
    """Check that foreign files and newer format versions are refused with a clear message."""
    with pytest.raises(StoreError, match="does not exist. Create it with `cnncodes extract`"):
        CodeStore(tmp_path / "missing.h5")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = [1, 2]
    with pytest.raises(StoreError, match="not a cnncodes store"):
        CodeStore(foreign)
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(StoreError, match="not a readable HDF5 file"):
        CodeStore(tmp_path / "text.h5")
    out = tmp_path / "codes.h5"
    extract(photos, out=out, **fast)
    with h5py.File(out, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(StoreError, match="format version 99; this cnncodes reads up to 2. Upgrade"):
        CodeStore(out)


def test_unknown_layer_on_read(photos, tmp_path, fast):
    """Check that reading a layer the store lacks names the layers it has."""
    out = tmp_path / "codes.h5"
    extract(photos, out=out, layers=["block4"], **fast)
    with pytest.raises(StoreError, match="has no layer 'block2'; it holds block4"):
        CodeStore(out).codes("block2")


# ------------------------------------------------------------------- sources


def test_csv_source(photos, tmp_path, fast):
    """Check that a CSV of path,label gives those ids and labels, paths relative to the CSV."""
    rows = ["path,label"] + [f"{p.relative_to(photos).as_posix()},{'A' if 'daisy' in str(p) else 'B'}"
                             for p in sorted(photos.rglob("*.jpg"))[:6]]
    csv = photos / "list.csv"
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "codes.h5"
    extract(csv, out=out, **fast)
    store = CodeStore(out)
    assert len(store) == 6 and store.class_names == ["A", "B"]
    assert store.attrs["source_kind"] == "csv"
    assert [store.class_names[i] for i in store.labels] == [r.split(",")[1] for r in rows[1:]]


def test_flat_folder_and_path_list(photos, tmp_path, fast):
    """Check that a flat folder gives unlabelled rows and a path list takes given labels."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(photos.rglob("*.jpg"))[:3]:
        shutil.copy(p, flat / p.name)
    out = tmp_path / "flat.h5"
    extract(flat, out=out, **fast)
    assert list(CodeStore(out).labels) == [-1, -1, -1] and CodeStore(out).class_names == []
    paths = sorted(photos.rglob("*.jpg"))[2:6]  # two classes: ids keep the class folder
    out2 = tmp_path / "list.h5"
    extract([str(p) for p in paths], labels=["x", "y", "x", "y"], out=out2, **fast)
    store = CodeStore(out2)
    assert list(store.ids) == [p.relative_to(photos).as_posix() for p in paths]
    assert [store.class_names[i] for i in store.labels] == ["x", "y", "x", "y"]


def _file(name, text):
    def make(folder):
        (folder / name).write_text(text)
        return folder / name

    return make


def _empty_dir(folder):
    (folder / "empty").mkdir()
    return folder / "empty"


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d: d / "nope", "does not exist"),
        (_empty_dir, "no images found"),
        (_file("a.txt", "x"), "is a file, not a folder, a .csv, a .tar shard or a Parquet file"),
        (_file("bad.csv", "a.jpg,x,y\n"), "row 1 has 3 columns"),
        (_file("half.csv", "a.jpg,x\nb.jpg\n"), "label all or none"),
        (_file("none.csv", "path,label\n"), "has no rows"),
    ],
    ids=["missing", "empty-folder", "plain-file", "csv-columns", "csv-partial-labels", "csv-empty"],
)
def test_bad_sources(tmp_path, fast, make, words):
    """Check that unusable sources are refused with what to do."""
    with pytest.raises(SourceError, match=words):
        extract(make(tmp_path), out=tmp_path / "x.h5", **fast)
    assert not (tmp_path / "x.h5").exists()


def test_labels_for_a_list_only(photos, tmp_path, fast):
    """Check that labels= is refused for folders and must match the number of paths."""
    with pytest.raises(SourceError, match="only for a list of paths"):
        extract(photos, labels=["a"], out=tmp_path / "x.h5", **fast)
    with pytest.raises(SourceError, match="got 2 paths but 1 labels"):
        extract([str(p) for p in sorted(photos.rglob("*.jpg"))[:2]], labels=["a"], out=tmp_path / "x.h5", **fast)


def test_path_list_keeps_symlink_names(photos, tmp_path, fast):
    """Check that a list of symlinks gives the links' own names as ids, like a folder does."""
    links = tmp_path / "links"
    links.mkdir()
    targets = sorted(photos.rglob("*.jpg"))[:3]
    for k, target in enumerate(targets):
        (links / f"link{k}.jpg").symlink_to(target)
    out = tmp_path / "links.h5"
    extract([str(p) for p in sorted(links.iterdir())], root=links, out=out, **fast)
    assert list(CodeStore(out).ids) == ["link0.jpg", "link1.jpg", "link2.jpg"]
    folder = tmp_path / "folder.h5"
    extract(links, out=folder, **fast)
    assert list(CodeStore(folder).ids) == list(CodeStore(out).ids)
