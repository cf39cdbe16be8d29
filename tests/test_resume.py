"""Tests that a run killed with SIGKILL at any point resumes to the uninterrupted result."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cnncodes import CodeStore, extract
from cnncodes._store.store import Journal


def _start(data, out, *extra, workers=0):
    cmd = [sys.executable, "-m", "cnncodes", "extract", str(data), "-o", str(out), "--quiet",
           "--image-size", "64", "--batch-size", "1", "--workers", str(workers), "--layer", "block4",
           "--layer", "block5", "--precision", "float32", *extra]  # auto would choose by timing, run by run
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_after(proc, out, n_batches, timeout=120):
    journal = Journal(out)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(journal.batches()) >= n_batches:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no journal batches appeared")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample_dir):
    """An uninterrupted run over the 40 bundled photos."""
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    extract(sample_dir, out=out, layers=["block4", "block5"], image_size=64, batch_size=1,
            num_workers=0, precision="float32", progress=False)
    return CodeStore(out)


def _assert_same(store, reference):
    assert list(store.ids) == list(reference.ids)
    assert len(set(store.ids)) == len(store)
    np.testing.assert_array_equal(store.labels, reference.labels)
    for layer in ("block4", "block5"):
        diff = np.abs(store.codes(layer) - reference.codes(layer)).max()
        assert diff <= 1e-6, f"{layer}: max abs diff {diff}"


@pytest.mark.parametrize("n_batches", [1, 17, 35], ids=["early", "middle", "late"])
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, sample_dir, reference, n_batches):
    """Check that SIGKILL mid-run, then the same command, gives every image once, same codes."""
    out = tmp_path / "codes.h5"
    proc = _start(sample_dir, out)
    _kill_after(proc, out, n_batches)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and Journal(out).exists()  # the store is only ever replaced whole
    rerun = _start(sample_dir, out)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read().decode()
    assert not Journal(out).exists() and not os.path.exists(f"{out}.lock")
    _assert_same(CodeStore(out), reference)


def test_sigkill_with_decoding_workers_then_immediate_rerun(tmp_path, sample_dir, reference):
    """Check that orphaned decoding workers of a killed run do not keep the store locked."""
    out = tmp_path / "codes.h5"
    proc = _start(sample_dir, out, workers=2)
    _kill_after(proc, out, 5)
    rerun = _start(sample_dir, out, workers=2)  # at once: the orphans may still be alive
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read().decode()
    _assert_same(CodeStore(out), reference)


def test_sigkill_while_growing_keeps_the_old_store(tmp_path, sample_dir, reference):
    """Check that killing a run on a grown folder leaves the previous store readable as it was."""
    data = tmp_path / "photos"
    shutil.copytree(sample_dir, data)
    moved = tmp_path / "later"
    shutil.move(data / "tulip", moved)
    out = tmp_path / "codes.h5"
    first = _start(data, out)
    assert first.wait(timeout=300) == 0
    before = CodeStore(out)
    shutil.move(moved, data / "tulip")
    proc = _start(data, out)
    _kill_after(proc, out, 3)
    after_kill = CodeStore(out)  # reopens, unchanged
    assert list(after_kill.ids) == list(before.ids)
    np.testing.assert_array_equal(after_kill.codes("block5"), before.codes("block5"))
    rerun = _start(data, out)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read().decode()
    store = CodeStore(out)
    assert sorted(store.ids) == sorted(reference.ids) and len(set(store.ids)) == 40
    ref = dict(zip(reference.ids, reference.codes("block5")))
    for rid, vec in zip(store.ids, store.codes("block5")):
        assert np.abs(vec - ref[rid]).max() <= 1e-6
