"""End to end: odd and broken image files through extract() and the CLI."""

import io
import os

import numpy as np
import pytest
from PIL import Image

import oddimages as odd
from cnncodes import CodeStore, extract
from cnncodes._cli.main import main

REASONS = {
    "truncated.jpg": "cannot decode: image file is truncated",
    "empty.jpg": "empty file (0 bytes)",
    "notes.jpg": "not an image (PIL cannot identify the file format)",
    "bomb.png": "decompression bomb: ",
    "bad_strips.tif": "cannot decode: ",
}


@pytest.fixture
def odd_folder(tmp_path):
    folder = tmp_path / "odd"
    valid, broken = odd.make_odd_folder(folder)
    assert sorted(broken) == sorted(REASONS)
    return folder, valid, broken


def _cli(folder, out) -> int:
    return main(["extract", str(folder), "-o", str(out), "--image-size", "64", "--workers", "0", "--quiet"])


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(odd.photo_like_png(seed))).save(buf, "JPEG")
    return buf.getvalue()


def test_extract_odd_folder(odd_folder, tmp_path, fast):
    """Check that every valid odd image gets one finite row and every broken one a failure."""
    folder, valid, broken = odd_folder
    out = tmp_path / "codes.h5"
    result = extract(folder, out=out, **fast)

    assert result.n_images == len(valid) + len(broken)
    assert result.n_extracted == len(valid)
    assert sorted(rid for rid, _ in result.failures) == sorted(broken)
    store = CodeStore(out)
    ids = list(store.ids)
    assert sorted(ids) == sorted(valid) and len(set(ids)) == len(ids)
    assert odd.UNICODE_NAME in ids
    failures = dict(store.failures)
    assert failures == dict(result.failures)
    for rid, why in failures.items():
        assert why.startswith(REASONS[rid]), f"{rid}: {why!r}"
    for layer in store.layers:
        codes = store.codes(layer)
        assert codes.shape[0] == len(valid)
        assert np.isfinite(codes).all(), f"non-finite codes in {layer}"
        zero_rows = [ids[i] for i in np.flatnonzero(~codes.any(axis=1))]
        assert not zero_rows, f"all-zero codes for {zero_rows}"


def test_cli_exit_code_and_failure_report(odd_folder, tmp_path, capsys):
    """Check that the CLI returns 1 and prints how many images failed, naming each one."""
    folder, valid, broken = odd_folder
    assert _cli(folder, tmp_path / "codes.h5") == 1
    stdout = capsys.readouterr().out
    assert f"{len(valid) + len(broken)} images: {len(valid)} extracted" in stdout
    assert f"{len(broken)} failed;" in stdout
    assert f"{len(broken)} images failed and are recorded in the store:" in stdout
    for rid in broken:
        assert f"  {rid}: {REASONS[rid]}" in stdout


def test_rerun_extracts_nothing_and_keeps_failures(odd_folder, tmp_path, fast, capsys):
    """Check that re-running after the CLI extracts nothing and keeps rows and failure records."""
    folder, valid, broken = odd_folder
    out = tmp_path / "codes.h5"
    assert _cli(folder, out) == 1
    before = CodeStore(out)
    ids, codes, failures = list(before.ids), before.codes(), before.failures
    result = extract(folder, out=out, **fast)
    assert result.n_extracted == 0 and result.n_reused == 0
    assert result.n_unchanged == len(valid) + len(broken)
    after = CodeStore(out)
    assert list(after.ids) == ids
    np.testing.assert_array_equal(after.codes(), codes)
    assert after.failures == failures and len(failures) == len(broken)
    assert sorted(r for r, _ in result.known_failures) == sorted(broken)
    capsys.readouterr()
    assert _cli(folder, out) == 1  # recorded failures still make the exit status say so
    stdout = capsys.readouterr().out
    assert f"{len(broken)} unchanged images failed in an earlier run" in stdout
    assert "0 failed;" in stdout


@pytest.mark.parametrize("fixed, content", [
    ("truncated.jpg", "new"), ("empty.jpg", "new"), ("notes.jpg", "copy-of-cmyk.jpg"),
], ids=["truncated-new-content", "empty-new-content", "text-now-identical-to-a-row"])
def test_fixed_file_gets_row_and_loses_failure(odd_folder, tmp_path, fast, fixed, content):
    """Check that a repaired broken file gets a row on re-run and its failure record goes."""
    folder, valid, broken = odd_folder
    out = tmp_path / "codes.h5"
    extract(folder, out=out, **fast)
    data = _jpeg(seed=7) if content == "new" else (folder / "cmyk.jpg").read_bytes()
    (folder / fixed).write_bytes(data)
    result = extract(folder, out=out, **fast)
    assert (result.n_extracted, result.n_reused) == ((1, 0) if content == "new" else (0, 1))
    assert result.failures == []
    store = CodeStore(out)
    ids = list(store.ids)
    assert sorted(ids) == sorted(valid + [fixed])
    assert sorted(dict(store.failures)) == sorted(set(broken) - {fixed})
    row = store.codes()[ids.index(fixed)]
    assert np.isfinite(row).all() and row.any()
    if content != "new":
        np.testing.assert_array_equal(row, store.codes()[ids.index("cmyk.jpg")])


def test_non_image_extension_is_skipped(tmp_path, fast):
    """Check that a non-image file in a folder source is reported in skipped_files, not failed."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.png").write_bytes(odd.photo_like_png(1))
    (folder / "b.jpg").write_bytes(_jpeg(2))
    (folder / "readme.txt").write_text("photos from the garden\n")
    result = extract(folder, out=tmp_path / "codes.h5", **fast)
    assert result.skipped_files == [("readme.txt", "not an image file extension")]
    assert result.failures == [] and result.n_images == 2
    store = CodeStore(tmp_path / "codes.h5")
    assert sorted(store.ids) == ["a.png", "b.jpg"] and store.failures == []
    assert "1 files skipped: readme.txt (not an image file extension)" in result.summary()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_a_failure(tmp_path, fast):
    """Check that a file without read permission becomes a failure, not a crash."""
    folder = tmp_path / "locked"
    folder.mkdir()
    (folder / "ok.png").write_bytes(odd.photo_like_png(1))
    locked = folder / "locked.jpg"
    locked.write_bytes(_jpeg(2))
    locked.chmod(0)
    try:
        result = extract(folder, out=tmp_path / "codes.h5", **fast)
    finally:
        locked.chmod(0o644)
    assert result.failures == [("locked.jpg", "cannot read file: Permission denied")]
    store = CodeStore(tmp_path / "codes.h5")
    assert list(store.ids) == ["ok.png"]
    assert store.failures == [("locked.jpg", "cannot read file: Permission denied")]


def test_dangling_symlink_is_a_failure(tmp_path, fast):
    """Check that an image name whose file is gone (dangling symlink) becomes a failure."""
    folder = tmp_path / "links"
    folder.mkdir()
    (folder / "ok.png").write_bytes(odd.photo_like_png(1))
    (folder / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    result = extract(folder, out=tmp_path / "codes.h5", **fast)
    assert result.failures == [("gone.jpg", "cannot read file: No such file or directory")]
    store = CodeStore(tmp_path / "codes.h5")
    assert list(store.ids) == ["ok.png"]
    assert store.failures == [("gone.jpg", "cannot read file: No such file or directory")]
