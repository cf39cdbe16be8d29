"""Tests of extract(engine="ray") on a local 2-CPU Ray cluster: equality with one machine,
skipping, failures, and a crashed actor or driver followed by a re-run."""

import collections
import shutil

import numpy as np
import pytest

from cnncodes import CodeStore, extract
from cnncodes._errors import CnnCodesError
from cnncodes._store.store import Journal

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'cnncodes[ray]'")
import cnncodes._extract.ray_engine as cray  # noqa: E402

pytestmark = pytest.mark.ray

# Small crops keep the runs short; float32 makes the codes comparable to 1e-5.
SMALL = dict(backbone="mobilenet_v2", image_size=96, batch_size=8, precision="float32", progress=False)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 CPUs, shared by the tests of this module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample_dir):
    """The single-process store of the 40-photo sample, float32."""
    out = tmp_path_factory.mktemp("ref") / "local.h5"
    extract(str(sample_dir), out=out, num_workers=0, **SMALL)
    return CodeStore(out)


def assert_same_store(store, ref):
    """Same ids, labels, class names; codes within 1e-5; every id once."""
    assert len(store) == len(ref)
    assert collections.Counter(store.ids).most_common(1)[0][1] == 1
    order = {rid: k for k, rid in enumerate(store.ids)}
    rows = np.array([order[rid] for rid in ref.ids])
    names, ref_names = np.array(store.class_names), np.array(ref.class_names)
    np.testing.assert_array_equal(names[store.labels[rows]], ref_names[ref.labels])
    np.testing.assert_array_equal(store.sha256[rows], ref.sha256)
    diff = np.abs(store.codes("block5")[rows] - ref.codes("block5")).max()
    assert diff <= 1e-5, diff


def test_ray_equals_local_and_rerun_skips(cluster, reference, sample_dir, tmp_path, monkeypatch):
    """Check that 2 Ray workers give the single-process store, that the store's segments are
    the files the actors wrote (the commit copies no code), and that a re-run computes nothing."""
    import cnncodes._store.store as cstore

    copied = []
    real = cstore._write_segment
    monkeypatch.setattr(cstore, "_write_segment", lambda *a, **k: copied.append(k["ids"]) or real(*a, **k))
    monkeypatch.setattr(cray, "SEGMENT_ROWS", 16)  # several actor calls, several segments
    out = tmp_path / "ray.h5"
    result = extract(str(sample_dir), out=out, engine="ray", ray_workers=2, **SMALL)
    assert result.n_extracted == 40 and not result.failures
    assert not Journal(out).exists()  # the segments were adopted and the journal removed
    assert copied == []
    store = CodeStore(out)
    assert len(store.segments) >= 3 and len(store) == 40
    assert_same_store(CodeStore(out), reference)

    again = extract(str(sample_dir), out=out, engine="ray", ray_workers=2, **SMALL)
    assert (again.n_extracted, again.n_unchanged, again.n_rows) == (0, 40, 40)
    assert_same_store(CodeStore(out), reference)


def test_ray_resizes_where_the_store_says(cluster, reference, sample_dir, tmp_path):
    """Check that the default resize ("device": torch, in the decoding tasks) is recorded as
    one machine records it, and that resize="workers" (PIL) gives the local workers' codes."""
    assert reference.spec["preprocessing"]["resize"] == "device"
    local = tmp_path / "local-workers.h5"
    extract(str(sample_dir), out=local, num_workers=0, resize="workers", **SMALL)
    out = tmp_path / "ray-workers.h5"
    result = extract(str(sample_dir), out=out, engine="ray", ray_workers=2, resize="workers", **SMALL)
    assert result.n_extracted == 40 and CodeStore(out).spec["preprocessing"]["resize"] == "workers"
    assert_same_store(CodeStore(out), CodeStore(local))
    # At 96 px the photos are reduced: the two resizes differ by a grey level here and there.
    assert not np.array_equal(CodeStore(local).codes("block5"), reference.codes("block5"))


def test_ray_records_failures_and_extends(cluster, reference, sample_dir, tmp_path):
    """Check that Ray records unreadable images as failures and extends a store made locally."""
    photos = tmp_path / "photos"
    shutil.copytree(sample_dir, photos)
    moved = sorted((photos / "tulip").iterdir())[:4]
    for f in moved:
        f.rename(tmp_path / f.name)
    out = tmp_path / "codes.h5"
    extract(str(photos), out=out, num_workers=0, **SMALL)  # 36 photos, one machine
    for f in moved:
        (tmp_path / f.name).rename(f)
    (photos / "tulip" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    result = extract(str(photos), out=out, engine="ray", ray_workers=2, **SMALL)
    assert (result.n_unchanged, result.n_extracted) == (36, 4)
    assert [rid for rid, _ in result.failures] == ["tulip/broken.jpg"]
    store = CodeStore(out)
    assert [rid for rid, _ in store.failures] == ["tulip/broken.jpg"]
    assert "cannot decode" in store.failures[0][1] or "not an image" in store.failures[0][1]
    assert_same_store(store, reference)


def test_ray_crashed_actors_then_rerun(cluster, reference, sample_dir, tmp_path, monkeypatch):
    """Check that actors crashing after each shard, then a re-run, leave every image exactly once."""
    monkeypatch.setattr(cray, "_faults", lambda: cray._Faults(actor_exit_after=2))
    monkeypatch.setattr(cray, "SEGMENT_ROWS", 8)  # several calls per actor, so that they crash
    out = tmp_path / "crash.h5"
    try:
        # Ray restarts each dead actor and retries its batch: the run may finish as it is.
        extract(str(sample_dir), out=out, engine="ray", ray_workers=2, **SMALL)
    except CnnCodesError as exc:
        assert "re-run" in str(exc)
    monkeypatch.setattr(cray, "_faults", lambda: cray._Faults())  # no faults from here on
    result = extract(str(sample_dir), out=out, engine="ray", ray_workers=2, **SMALL)
    assert result.n_extracted + result.n_unchanged + result.n_resumed == 40
    assert_same_store(CodeStore(out), reference)


def test_ray_killed_driver_then_rerun(cluster, reference, sample_dir, tmp_path, monkeypatch):
    """Check that a driver stopped mid-run keeps its shards, and a re-run resumes them exactly once."""
    monkeypatch.setattr(cray, "_faults", lambda: cray._Faults(driver_abort_after=1))
    monkeypatch.setattr(cray, "SEGMENT_ROWS", 4)
    out = tmp_path / "driver.h5"
    small = dict(SMALL, batch_size=4)
    with pytest.raises(KeyboardInterrupt, match="driver stops"):
        extract(str(sample_dir), out=out, engine="ray", ray_workers=2, **small)
    assert not out.exists()
    done = len(Journal(out).done()[0])
    # at least the batch the driver saw; the actors may have finished more (or all) of them,
    # and tasks already running may still write their shards after this count
    assert 4 <= done <= 40
    monkeypatch.setattr(cray, "_faults", lambda: cray._Faults())  # no faults from here on
    result = extract(str(sample_dir), out=out, engine="ray", ray_workers=2, **small)
    # every image exactly once: what was written is resumed, the rest extracted
    assert result.n_resumed >= done and result.n_resumed + result.n_extracted == 40
    assert_same_store(CodeStore(out), reference)


def test_ray_bad_arguments(cluster, sample_dir, tmp_path):
    """Check that wrong engine settings are refused with what to do."""
    with pytest.raises(CnnCodesError, match="unknown engine 'spark'. Valid engines"):
        extract(str(sample_dir), out=tmp_path / "a.h5", engine="spark", **SMALL)
    with pytest.raises(CnnCodesError, match="ray_workers must be an integer >= 1"):
        extract(str(sample_dir), out=tmp_path / "b.h5", engine="ray", ray_workers=0, **SMALL)
    with pytest.raises(CnnCodesError, match="the Ray cluster has 0 GPUs. Add GPU nodes"):
        extract(str(sample_dir), out=tmp_path / "c.h5", engine="ray", gpus_per_worker=1, **SMALL)


def test_ray_missing_is_explained(monkeypatch, sample_dir, tmp_path):
    """Check that engine='ray' without Ray installed says how to install it."""
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray imports
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(CnnCodesError, match=r"pip install 'cnncodes\[ray\]'"):
        extract(str(sample_dir), out=tmp_path / "x.h5", engine="ray", **SMALL)
    assert not (tmp_path / "x.h5").exists()


def test_cli_engine_ray(cluster, reference, sample_dir, tmp_path, capsys):
    """Check that `cnncodes extract --engine ray --ray-workers 2` writes the single-process store."""
    from cnncodes._cli.main import main

    out = tmp_path / "cli.h5"
    rc = main(["extract", str(sample_dir), "-o", str(out), "--engine", "ray", "--ray-workers", "2",
               "--image-size", "96", "--batch-size", "8", "--precision", "float32", "--quiet"])
    assert rc == 0
    assert "40 extracted" in capsys.readouterr().out
    assert_same_store(CodeStore(out), reference)


def test_cli_ray_flags_need_engine_ray(sample_dir, tmp_path, capsys):
    """Check that Ray flags without --engine ray are refused with what to add."""
    from cnncodes._cli.main import main

    rc = main(["extract", str(sample_dir), "-o", str(tmp_path / "x.h5"), "--ray-workers", "2"])
    assert rc == 2
    assert "--address, --ray-workers and --gpus-per-worker need --engine ray" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()


def test_ray_reads_objects_on_the_workers_only(cluster, reference, s3, sample_dir, tmp_path, monkeypatch):
    """Check that on S3 objects the driver lists and reads no image (the Ray tasks read them),
    and that the store equals the single-process store of the folder."""
    import cnncodes._input.sources

    fs, endpoint = s3
    for f in sorted(sample_dir.rglob("*.jpg")):
        fs.pipe(f"photos/ray/{f.relative_to(sample_dir).as_posix()}", f.read_bytes())
    driver_reads = []
    real = cnncodes._input.sources.read_bytes
    monkeypatch.setattr(cnncodes._input.sources, "read_bytes", lambda item, o=None: driver_reads.append(item) or real(item, o))
    # The workers started before the server: its address goes to them as storage options.
    opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    out = tmp_path / "ray.h5"
    result = extract("s3://photos/ray/", out=out, engine="ray", ray_workers=2, storage_options=opts, **SMALL)
    assert result.n_extracted == 40 and not result.failures
    assert driver_reads == []
    assert_same_store(CodeStore(out), reference)
    assert CodeStore(out).attrs["data_root"] == "s3://photos/ray/"
    again = extract("s3://photos/ray/", out=out, engine="ray", ray_workers=2, storage_options=opts, **SMALL)
    assert again.n_extracted == 0 and again.n_unchanged == 40 and driver_reads == []


def test_ray_writes_a_store_in_object_storage(cluster, reference, s3, sample_dir, tmp_path, monkeypatch):
    """Check a Ray run whose store is itself in S3: the actors upload their segments into the
    store's folder there; a driver stopped mid-run leaves them and a marker; the re-run resumes
    them and commits by mapping them where they are (the driver downloads none: its working
    copy has none of them), every image exactly once, the store equal to the single-process
    one, the marker gone."""
    from cnncodes._store.remote import PENDING, mapped_segments

    fs, endpoint = s3
    for f in sorted(sample_dir.rglob("*.jpg")):
        fs.pipe(f"photos/ray-store/{f.relative_to(sample_dir).as_posix()}", f.read_bytes())
    opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    url, small = "s3://photos/stores/ray.h5", dict(SMALL, batch_size=4)
    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path / "driver"))
    monkeypatch.setattr(cray, "SEGMENT_ROWS", 4)
    monkeypatch.setattr(cray, "_faults", lambda: cray._Faults(driver_abort_after=1))
    with pytest.raises(KeyboardInterrupt, match="driver stops"):
        extract("s3://photos/ray-store/", out=url, engine="ray", ray_workers=2, storage_options=opts, **small)
    monkeypatch.setattr(cray, "_faults", lambda: cray._Faults())  # no faults from here on
    pending = [p.rsplit("/", 1)[-1] for p in fs.ls("photos/stores/ray.h5.d")]
    assert pending and all(PENDING.match(n) for n in pending)
    assert fs.exists("photos/stores/ray.h5.partial/spec.json") and not fs.exists("photos/stores/ray.h5")
    result = extract("s3://photos/ray-store/", out=url, engine="ray", ray_workers=2, storage_options=opts, **small)
    assert result.n_resumed >= 4 and result.n_resumed + result.n_extracted == 40
    assert result.uploaded["segments"] == []  # the actors' segments are there already
    copy = tmp_path / "driver" / "stores"
    working = next(copy.iterdir()) / "ray.h5"
    names = mapped_segments(working)
    assert set(pending) <= set(names) and all(PENDING.match(n) for n in names)
    assert not any(p.suffix == ".h5" for p in working.parent.rglob("segment-*"))  # none came to the driver
    assert not fs.exists("photos/stores/ray.h5.partial/spec.json")
    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path / "reader"))
    assert_same_store(CodeStore(url, storage_options=opts), reference)
