"""Tests of store format 2: segments written once, stat keys instead of reads, the conversion of
version 1 stores, write failures contained, stray files removed, and `cnncodes check`."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import cnncodes._extract.extract
import cnncodes._store.store
from cnncodes import CodeStore, StoreError, extract, load
from cnncodes._cli.main import main
from cnncodes._errors import StoreWriteError
from cnncodes._store.store import TIER_FANOUT, append_rows, check

V1 = Path(__file__).parent / "data" / "v1"


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


OLD = 1_700_000_000  # 2023-11-14: an mtime long past


def _age(folder):
    """Give every file the same mtime in the past: files modified just before a run are
    'racy' and read again (see RACY_NS), as git does."""
    then = OLD
    for p in Path(folder).rglob("*"):
        if p.is_file():
            os.utime(p, (then, then))


def _segments(out):
    return sorted(Path(f"{out}.d").iterdir())


@pytest.fixture
def aged(photos):
    _age(photos)
    return photos


def _add(sample_dir, photos, cls="daisy", name="late.jpg", index=-1):
    dst = photos / cls / name
    shutil.copy(sorted((sample_dir / cls).iterdir())[index], dst)
    _age(photos)
    return dst


def test_a_run_writes_only_its_new_rows(aged, tmp_path, sample_dir, fast):
    """Check that adding a photo writes one new segment and leaves the stored ones as they were."""
    out = tmp_path / "codes.h5"
    extract(aged, out=out, **fast)
    (first,) = _segments(out)
    digest, before = _sha(first), CodeStore(out).codes("block5")
    _add(sample_dir, aged)
    result = extract(aged, out=out, **fast)
    assert (result.n_extracted, result.n_unchanged, result.n_hashed) == (1, 12, 1)
    segments = _segments(out)
    assert [s.name for s in segments] == ["segment-000000.h5", "segment-000001.h5"]
    assert _sha(segments[0]) == digest  # never rewritten
    with h5py.File(segments[1], "r") as g:
        assert [s.decode() for s in g["ids"][:]] == ["daisy/late.jpg"]
    store = CodeStore(out)
    assert len(store) == 13 and list(store.ids).index("daisy/late.jpg") == 12
    np.testing.assert_array_equal(store.codes("block5")[:12], before)
    assert store.segments == ["segment-000000.h5", "segment-000001.h5"]


def test_an_unchanged_rerun_reads_no_image(aged, tmp_path, fast, reads):
    """Check that files with their stored stat key are not opened, and --rehash reads them all."""
    out = tmp_path / "codes.h5"
    extract(aged, out=out, **fast)
    st = os.stat(aged / "rose" / sorted(os.listdir(aged / "rose"))[0])
    row = list(CodeStore(out).ids).index(f"rose/{sorted(os.listdir(aged / 'rose'))[0]}")
    assert tuple(CodeStore(out).stat[row]) == (st.st_size, st.st_mtime_ns, st.st_ino)
    reads.clear()
    result = extract(aged, out=out, **fast)
    assert reads == [] and result.n_hashed == 0 and result.n_unchanged == 12
    segments = [(_sha(s), s.name) for s in _segments(out)]
    result = extract(aged, out=out, rehash=True, **fast)
    assert len(reads) == 12 and result.n_hashed == 12
    assert (result.n_unchanged, result.n_extracted, result.n_reused) == (12, 0, 0)
    assert [(_sha(s), s.name) for s in _segments(out)] == segments  # nothing to write


def test_a_fresh_file_is_read_again_until_it_settles(photos, tmp_path, fast, reads):
    """Check that a file modified just before its listing is stored with an unknown stat key."""
    for p in photos.rglob("*.jpg"):
        p.touch()  # modified just now
    out = tmp_path / "codes.h5"
    extract(photos, out=out, **fast)  # the files are less than RACY_NS old: racy
    assert (CodeStore(out).stat == -1).all()
    reads.clear()
    assert extract(photos, out=out, **fast).n_hashed == 12
    _age(photos)
    result = extract(photos, out=out, **fast)  # read once more, then known by their stat key
    assert result.n_hashed == 12 and result.n_extracted == 0 and (CodeStore(out).stat >= 0).all()
    assert extract(photos, out=out, **fast).n_hashed == 0


def test_a_touched_file_is_hashed_once_and_keeps_its_codes(aged, tmp_path, fast, reads):
    """Check that a file with a new mtime but the same content is read once, not re-extracted."""
    out = tmp_path / "codes.h5"
    extract(aged, out=out, **fast)
    before = dict(zip(CodeStore(out).ids, CodeStore(out).codes("block5")))
    touched = aged / "tulip" / sorted(os.listdir(aged / "tulip"))[1]
    then = time.time() - 600
    os.utime(touched, (then, then))
    reads.clear()
    result = extract(aged, out=out, **fast)
    assert reads == [str(touched)] and (result.n_extracted, result.n_unchanged) == (0, 12)
    store = CodeStore(out)
    assert len(store) == 12 and len(set(store.ids)) == 12
    row = list(store.ids).index(f"tulip/{touched.name}")
    assert store.stat[row][1] == os.stat(touched).st_mtime_ns
    for rid, codes in zip(store.ids, store.codes("block5")):
        np.testing.assert_array_equal(codes, before[rid])
    reads.clear()
    assert extract(aged, out=out, **fast).n_hashed == 0 and reads == []


def test_a_changed_file_supersedes_its_row(aged, tmp_path, sample_dir, fast):
    """Check that new content under a stored id replaces its row: one row per id, new codes."""
    out = tmp_path / "codes.h5"
    extract(aged, out=out, **fast)
    target = aged / "daisy" / sorted(os.listdir(aged / "daisy"))[0]
    shutil.copy(sorted((sample_dir / "daisy").iterdir())[-1], target)  # other content, same id
    _age(aged)
    result = extract(aged, out=out, **fast)
    assert (result.n_extracted, result.n_unchanged) == (1, 11)
    store = CodeStore(out)
    assert len(store) == 12 and len(set(store.ids)) == 12
    row = list(store.ids).index(f"daisy/{target.name}")
    assert store.sha256[row] == _sha(target)
    alone = tmp_path / "alone.h5"
    extract([target], out=alone, **fast)
    cos = store.codes("block5")[row] @ CodeStore(alone).codes("block5")[0]
    cos /= np.linalg.norm(store.codes("block5")[row]) * np.linalg.norm(CodeStore(alone).codes("block5")[0])
    assert cos > 0.999
    with h5py.File(out, "r") as f:  # the root maps 11 + 1 rows; the old row is left unmapped
        assert f["ids"].shape == (12,) and f["segments/rows"][:].tolist() == [12, 1]
    assert check(out).ok


def test_the_store_moves_with_its_folder(aged, tmp_path, fast):
    """Check that the root names its segments relative to itself: a moved store still reads."""
    out = tmp_path / "codes.h5"
    extract(aged, out=out, **fast)
    codes, ids = CodeStore(out).codes("block5"), CodeStore(out).ids
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(out, moved / "codes.h5")
    shutil.move(f"{out}.d", moved / "codes.h5.d")
    cwd = os.getcwd()
    os.chdir("/")
    try:
        with h5py.File(moved / "codes.h5", "r") as f:
            np.testing.assert_array_equal(f["codes/block5"][:], codes)
        assert list(CodeStore(moved / "codes.h5").ids) == list(ids)
    finally:
        os.chdir(cwd)


def test_a_missing_segment_is_named(aged, tmp_path, sample_dir, fast, capsys):
    """Check that a store without one of its segments refuses to read (never zeros) and says which."""
    out = tmp_path / "codes.h5"
    extract(aged, out=out, **fast)
    _add(sample_dir, aged)
    extract(aged, out=out, **fast)
    (out.parent / "codes.h5.d" / "segment-000000.h5").unlink()
    with pytest.raises(StoreError, match=r"codes.h5 is incomplete: 1 segment file\(s\) are missing from "
                                         r"codes.h5.d/ \(segment-000000.h5\).*move or copy them together"):
        CodeStore(out)
    result = check(out)
    assert not result.ok and result.problems == ["codes.h5.d/segment-000000.h5: missing"]
    assert main(["check", str(out)]) == 1
    assert "1 problem(s)" in capsys.readouterr().out


def test_check_finds_damaged_codes_and_changed_files(aged, tmp_path, fast, capsys):
    """Check that `check` reports non-finite codes by segment, and with rehash, changed images."""
    out = tmp_path / "codes.h5"
    extract(aged, out=out, **fast)
    assert main(["check", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"{out}: OK (12 rows in 1 segment(s))."
    changed = aged / "rose" / sorted(os.listdir(aged / "rose"))[2]
    changed.write_bytes(changed.read_bytes() + b"more")
    result = check(out, rehash=True)
    assert result.rehashed == 12 and result.problems == [
        f"rose/{changed.name}: the file changed since it was extracted (sha256 differs)"]
    with h5py.File(_segments(out)[0], "r+") as g:
        g["codes/block5"][3] = np.nan
    assert check(out).problems == ["codes.h5.d/segment-000000.h5: codes/block5: 1 rows hold non-finite codes (NaN/inf)"]
    segment = _segments(out)[0]
    segment.write_bytes(segment.read_bytes()[:3000])  # truncated
    with pytest.raises(StoreError, match=r"codes.h5: cannot read codes/block5 \(.*truncated file.*\). A file of "
                                         r"the store may be damaged: `cnncodes check .*codes.h5` names it."):
        CodeStore(out).codes("block5")
    (problem,) = check(out).problems
    assert problem.startswith("codes.h5.d/segment-000000.h5: unreadable (") and "truncated file" in problem


def test_small_segments_are_merged_tiered(aged, tmp_path, fast):
    """Check that many small appends keep the segment count bounded, and every row readable."""
    out = tmp_path / "codes.h5"
    extract(aged, out=out, **fast)
    rng = np.random.default_rng(0)
    added = {}
    for k in range(3 * TIER_FANOUT):
        codes = rng.standard_normal((1, 1280)).astype("float32")
        rid = f"synthetic/{k:03d}.jpg"
        added[rid] = codes[0]
        append_rows(out, ids=[rid], sha256=[hashlib.sha256(rid.encode()).hexdigest()], labels=["rose"],
                    codes={"block5": codes}, stat=[(1, 1, k)])
        assert len(_segments(out)) <= 2 * (TIER_FANOUT - 1) + 1
    store = CodeStore(out)
    assert len(store) == 12 + 3 * TIER_FANOUT and len(set(store.ids)) == len(store)
    rows = {rid: i for i, rid in enumerate(store.ids)}
    for rid, codes in added.items():
        np.testing.assert_array_equal(store.codes("block5")[rows[rid]], codes)
    assert [s.name for s in _segments(out)] == store.segments and check(out).ok


def _v1_photos(tmp_path, sample_dir):
    """The photos the version 1 fixture was made from (tests/data/v1/README.md)."""
    root = tmp_path / "photos"
    for cls in ("daisy", "rose", "tulip"):
        (root / cls).mkdir(parents=True)
        for f in sorted((sample_dir / cls).iterdir())[:4]:
            shutil.copy(f, root / cls / f.name)
    (root / "daisy" / "broken.jpg").write_bytes(b"not a jpeg at all\n")  # as make_fixtures.py wrote it
    _age(root)
    return root


def test_a_version_1_store_is_converted_once(tmp_path, sample_dir, reads):
    """Check that extending a version 1 store converts it once: same rows and codes, a segment,
    the model fitted on it still predicts the same, and the next run reads nothing."""
    photos = _v1_photos(tmp_path, sample_dir)
    out = tmp_path / "codes.h5"
    shutil.copy(V1 / "codes.h5", out)
    v1 = CodeStore(out)
    assert v1.format_version == 1
    v1_codes = {rid: c for rid, c in zip(v1.ids, v1.codes("block5"))}
    v1_failures, v1_ids, v1_classes = v1.failures, list(v1.ids), v1.class_names
    settings = dict(layers=["block4", "block5"], dtype="float16", num_workers=0, progress=False)
    result = extract(photos, out=out, **settings)
    assert result.converted_from == 1 and result.n_extracted == 0 and result.n_unchanged == 13
    assert "converted codes.h5 from store format 1 to 2 (once)" in result.summary()
    store = CodeStore(out)
    assert store.format_version == 2 and sorted(store.ids) == sorted(v1_ids)
    assert store.failures == v1_failures and store.class_names == v1_classes
    for rid, codes in zip(store.ids, store.codes("block5")):
        np.testing.assert_array_equal(codes, v1_codes[rid])
    expected = json.loads((V1 / "expected.json").read_text())["model"]
    model = load(V1 / "model.skops")
    pred = dict(zip(store.ids, model.estimator.predict(store.codes(expected["layer"]))))
    assert [pred[rid] for rid in v1_ids] == expected["predictions"]
    reads.clear()
    again = extract(photos, out=out, **settings)
    assert again.converted_from is None and "converted" not in again.summary()
    assert again.n_hashed == 0 and reads == [] and again.known_failures == v1_failures


def _cli_in_child(args, limit_bytes, *, preflight=True):
    """Run the CLI in a child process with a file-size limit (as a full disk would stop it)."""
    code = (
        "import sys, resource, cnncodes._store.store as s\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))\n"
        + ("" if preflight else "s._check_room = lambda *a: None\n")
        + "from cnncodes._cli.main import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("preflight", [True, False], ids=["refused-before-writing", "failed-inside-hdf5"])
def test_a_file_size_limit_stops_the_run_in_one_line(aged, tmp_path, sample_dir, preflight):
    """Check that a write failure (EFBIG) ends with one line and exit 2, the old store intact,
    no stray file, and that the next run completes."""
    out = tmp_path / "codes.h5"
    args = ["extract", str(aged), "-o", str(out), "--quiet", "--image-size", "64", "--batch-size", "4",
            "--workers", "0", "--pooling", "flatten", "--layer", "block4"]
    assert main(args) == 0
    for cls in ("daisy", "rose", "tulip"):
        for k in (4, 5, 6, 7):
            shutil.copy(sorted((sample_dir / cls).iterdir())[k], aged / cls / f"new{k}.jpg")
    _age(aged)
    digest, before = _sha(out), sorted(p.name for p in tmp_path.rglob("*"))
    done = _cli_in_child(args, 60_000, preflight=preflight)  # batches of 4: 25 KB; the segment: 74 KB
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("cnncodes extract: error: file too large (a file-size limit, ulimit -f, or "
                                  "the file system's) while writing ")
    assert "codes.h5.d/segment-000001.h5; raise the limit or write elsewhere, and re-run: codes.h5 is " \
           "unchanged, and the 12 rows already journalled are kept." in done.stderr
    assert _sha(out) == digest
    after = sorted(p.name for p in tmp_path.rglob("*"))
    assert not [n for n in after if n.endswith(".tmp")] and "segment-000001.h5" not in after
    assert Path(f"{out}.partial").is_dir()  # the journal: the extracted rows are kept
    assert main(args) == 0
    store = CodeStore(out)
    assert len(store) == 24 and check(out).ok and not Path(f"{out}.partial").exists()


def test_no_space_left_while_journalling(aged, tmp_path, sample_dir, fast, monkeypatch, capsys):
    """Check that ENOSPC on a journal batch names the file and what is kept; the rerun resumes."""
    out = tmp_path / "codes.h5"
    extract(aged, out=out, **fast)
    for k in (4, 5, 6, 7, 8, 9):
        shutil.copy(sorted((sample_dir / "rose").iterdir())[k % 8], aged / "rose" / f"new{k}.jpg")
    _age(aged)
    digest = _sha(out)
    real, room = cnncodes._store.store._atomic_savez, [1]  # batches that still fit

    def full_disk(path, arrays):
        if not room[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        room[0] -= 1
        real(path, arrays)

    monkeypatch.setattr(cnncodes._store.store, "_atomic_savez", full_disk)
    with pytest.raises(StoreWriteError, match=r"^no space left on device while writing .*codes.h5.partial/"
                                              r"batch-000001.npz; free space and re-run: codes.h5 is "
                                              r"unchanged, and the 4 rows already journalled are kept.$"):
        extract(aged, out=out, **fast)
    assert _sha(out) == digest
    args = ["extract", str(aged), "-o", str(out), "--quiet", "--image-size", "64", "--batch-size", "4",
            "--workers", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left on device while writing" in err
    monkeypatch.undo()
    result = extract(aged, out=out, **fast)
    assert result.n_resumed == 4 and result.n_extracted + result.n_reused == 2 and len(CodeStore(out)) == 18


def test_no_space_left_for_the_root(aged, tmp_path, sample_dir, fast, monkeypatch):
    """Check that ENOSPC while writing the root keeps the old store and removes the new segment."""
    out = tmp_path / "codes.h5"
    extract(aged, out=out, **fast)
    _add(sample_dir, aged)
    digest = _sha(out)

    def full_disk(tmp, **kwargs):
        Path(tmp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cnncodes._store.store, "_write_root", full_disk)
    with pytest.raises(StoreWriteError, match=r"no space left on device while writing .*codes.h5; free "
                                              r"space and re-run: codes.h5 is unchanged, and the 1 rows"):
        extract(aged, out=out, **fast)
    assert _sha(out) == digest and [s.name for s in _segments(out)] == ["segment-000000.h5"]
    assert not list(tmp_path.glob(".codes.h5.*.tmp"))
    monkeypatch.undo()
    result = extract(aged, out=out, **fast)
    assert result.n_resumed == 1 and len(CodeStore(out)) == 13


def test_stray_files_of_a_killed_run_are_removed(aged, tmp_path, fast):
    """Check that the next run holding the lock removes temporaries and unmapped segments."""
    out = tmp_path / "codes.h5"
    extract(aged, out=out, **fast)
    strays = [tmp_path / ".codes.h5.x1y2.tmp", out.parent / "codes.h5.d" / ".segment-000007.h5.tmp",
              out.parent / "codes.h5.d" / "segment-000042.h5"]
    for p in strays:
        p.write_bytes(b"left by a kill")
    Path(f"{out}.partial").mkdir()
    (Path(f"{out}.partial") / ".tmp-abc.npz").write_bytes(b"half")
    result = extract(aged, out=out, **fast)
    assert result.n_unchanged == 12 and not any(p.exists() for p in strays)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.h5", "codes.h5.d", "photos"]
    assert [s.name for s in _segments(out)] == ["segment-000000.h5"]


def test_rows_are_found_by_id_hash_and_checked_against_the_id(aged, tmp_path, fast, monkeypatch):
    """Check that the id_hash index finds rows, and that ids sharing a hash are never confused."""
    out = tmp_path / "codes.h5"
    extract(aged, out=out, **fast)
    store = CodeStore(out)
    ids = list(store.ids)
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["id_hash"][:], cnncodes._store.store.id_hashes(ids))
        np.testing.assert_array_equal(f["sha_key"][:], cnncodes._store.store.sha_keys(f["sha256"][:].tolist()))
    asked = [ids[5], "daisy/not-there.jpg", ids[0], ids[11]]
    assert store.rows_of(asked).tolist() == [5, -1, 0, 11]
    assert store.rows_with_sha([store.sha256[3], "0" * 64]).tolist() == [3]
    # Every id hashed alike (written and asked so): the index matches each id to the first row,
    # and the check against the ids themselves sorts it out.
    monkeypatch.setattr(cnncodes._store.store, "id_hashes", lambda xs: np.zeros(len(xs), dtype=np.int64))
    collided = tmp_path / "collided.h5"
    extract(aged, out=collided, **fast)
    store = CodeStore(collided)
    assert (h5py.File(collided, "r")["id_hash"][:] == 0).all()
    assert store.rows_of(asked).tolist() == [5, -1, 0, 11]
    result = extract(aged, out=collided, **fast)
    assert (result.n_unchanged, result.n_extracted, result.n_hashed) == (12, 0, 0)


def test_a_reader_never_mixes_two_versions_of_the_store(aged, tmp_path, sample_dir, fast):
    """Check that a reader opened before a run replaced the store refuses to read, and says why."""
    out = tmp_path / "codes.h5"
    extract(aged, out=out, **fast)
    reader = CodeStore(out)
    _add(sample_dir, aged)
    extract(aged, out=out, **fast)
    with pytest.raises(StoreError, match="codes.h5 was replaced by another run while it was read. Open it "
                                         r"again \(CodeStore\(path\)\) to read the new rows."):
        reader.codes("block5")
    assert CodeStore(out).codes("block5").shape == (13, 1280)


def test_output_into_a_closed_pipe_is_quiet(aged, tmp_path, fast):
    """Check that `cnncodes info STORE | true` (a reader gone at once) ends without a traceback."""
    out = tmp_path / "codes.h5"
    extract(aged, out=out, **fast)
    done = subprocess.run(f"{sys.executable} -m cnncodes info {out} | true", shell=True,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(cnncodes.__file__).parents[1])})
    assert done.stderr == "" and done.returncode == 0  # the pipeline's status is the reader's
