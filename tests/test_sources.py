"""Data where users keep it: fsspec URLs (memory://, a real S3-compatible server), WebDataset
tar shards, Parquet files and Hugging Face datasets, all read through one source layer.

The same photos as a folder, as objects, as shards and as tables give the same codes; an
unchanged re-run reads no image byte; bad members are recorded failures with their reasons.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from cnncodes import CodeStore, extract
from cnncodes._errors import CnnCodesError, SourceError
from cnncodes._input.sources import read_source
from cnncodes._input.tables import expand_braces

pa = pytest.importorskip("pyarrow", reason="the sources extra: pip install 'cnncodes[sources]'")
import pyarrow.parquet as pq  # noqa: E402

CLASSES = ("daisy", "rose", "tulip")


# ---------------------------------------------------------------------- the data, five ways


@pytest.fixture(scope="module")
def files(sample_dir):
    """(class, file name, bytes) of 9 sample photos: 3 classes x 3."""
    out = []
    for cls in CLASSES:
        for f in sorted((sample_dir / cls).iterdir())[:3]:
            out.append((cls, f.name, f.read_bytes()))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory, files):
    root = tmp_path_factory.mktemp("folder")
    for cls, name, data in files:
        (root / cls).mkdir(exist_ok=True)
        (root / cls / name).write_bytes(data)
        os.utime(root / cls / name, ns=(10**18, 10**18))  # not "racy"
    return root


def write_shards(folder, files, n=2, extra=None):
    """WebDataset shards train-000000.tar ...: <key>.cls (index), <key>.txt (name), <key>.jpg.

    The photos go to the shards in turn, a run of them to each, so that the shards list them
    in the folder's order (and the batches hold the same images: the codes then agree to the
    last bit, not only within float32 batch noise).
    """
    per = -(-len(files) // n)
    for s in range(n):
        with tarfile.open(folder / f"train-{s:06d}.tar", "w") as tar:
            members = [(f"{cls}_{os.path.splitext(name)[0]}", cls, data)
                       for cls, name, data in files[s * per:(s + 1) * per]]
            if extra and s == 0:
                members += extra
            for key, cls, data in members:
                for ext, payload in (("cls", str(CLASSES.index(cls)).encode()), ("txt", cls.encode()),
                                     ("jpg", data)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    info.mtime = 1_000_000
                    tar.addfile(info, io.BytesIO(payload))
    return str(folder) + "/train-{000000..%06d}.tar" % (n - 1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, files):
    return write_shards(tmp_path_factory.mktemp("shards"), files)


def table_of(files, blob=None):
    """The datasets way: an image struct {bytes, path} and a ClassLabel label, with its metadata."""
    images = [{"bytes": data, "path": name} for _, name, data in files]
    labels = [CLASSES.index(cls) for cls, _, _ in files]
    if blob is not None:
        images.append({"bytes": blob, "path": "notes.txt"})
        labels.append(0)
    features = {"image": {"_type": "Image"}, "label": {"names": list(CLASSES), "_type": "ClassLabel"}}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return pa.table({"image": images, "label": labels}).replace_schema_metadata(meta)


@pytest.fixture(scope="module")
def parquet(tmp_path_factory, files):
    path = tmp_path_factory.mktemp("parquet") / "photos.parquet"
    pq.write_table(table_of(files), path, row_group_size=4)
    return str(path)


@pytest.fixture(scope="module")
def s3_folder(s3, files):
    fs, _ = s3
    for cls, name, data in files:
        fs.pipe(f"photos/flowers/{cls}/{name}", data)
    return "s3://photos/flowers/"


def by_content(path):
    """sha256 -> (label name, block5 code) of a store."""
    store = CodeStore(path)
    names = store.class_names
    return {sha: (names[lab], code) for sha, lab, code in zip(store.sha256, store.labels, store.codes())}


# ---------------------------------------------------------------------- equal codes, no re-reads


@pytest.fixture(scope="module")
def folder_store(tmp_path_factory, folder):
    out = tmp_path_factory.mktemp("ref") / "folder.h5"
    extract(folder, out=out, **FAST)
    return out


FAST = dict(backbone="mobilenet_v2", image_size=64, batch_size=4, num_workers=0, progress=False,
            precision="float32")


@pytest.mark.parametrize("kind", ["shards", "parquet", "s3", "memory"])
def test_every_source_gives_the_folders_codes_and_rereads_nothing(kind, request, tmp_path, files,
                                                                  folder_store, reads):
    """Check that the photos as shards, a Parquet file, S3 objects or memory:// objects give
    the folder's labels and codes (by content, max abs diff 1e-6), with readable ids, and that
    an unchanged re-run reads no image."""
    if kind == "memory":
        import fsspec

        mem = fsspec.filesystem("memory")
        for cls, name, data in files:
            mem.pipe(f"/flowers-{os.getpid()}/{cls}/{name}", data)
        source = f"memory:///flowers-{os.getpid()}/"
    else:
        source = request.getfixturevalue({"shards": "shards", "parquet": "parquet", "s3": "s3_folder"}[kind])
    out = tmp_path / "codes.h5"
    opts = {"label_column": "txt"} if kind == "shards" else {}
    first = extract(source, out=out, **FAST, **opts)
    assert first.n_extracted == 9 and not first.failures
    # Remote objects are read once, where they are decoded; local data is hashed first, as
    # files are (in the page cache), to find identical content before computing.
    assert len(reads) == (9 if kind in ("s3", "memory") else 18)
    got, ref = by_content(out), by_content(folder_store)
    assert got.keys() == ref.keys()
    for sha, (label, code) in ref.items():
        assert got[sha][0] == label
        assert np.abs(got[sha][1] - code).max() <= 1e-6
    ids = sorted(CodeStore(out).ids)
    expected = {"shards": "train-000000.tar/daisy_", "parquet": "photos.parquet#0",
                "s3": "daisy/", "memory": "daisy/"}[kind]
    assert any(i.startswith(expected) for i in ids), ids
    assert len(set(ids)) == 9
    reads.clear()
    again = extract(source, out=out, **FAST, **opts)
    assert reads == [] and again.n_extracted == 0 and again.n_unchanged == 9


def test_shard_labels_default_to_the_cls_member(shards):
    """Check that without label_column a shard's label is its .cls member (the WebDataset way)."""
    src = read_source(shards)
    assert src.kind == "shards" and len(src.items) == 9
    assert sorted({i.label for i in src.items}) == ["0", "1", "2"]
    assert src.items[0].id.startswith("train-000000.tar/") and src.items[0].part.startswith("tar:")


def test_braces_expand_as_webdataset_writes_them():
    """Check zero-padded ranges and lists."""
    assert expand_braces("s/train-{000..002}.tar") == ["s/train-000.tar", "s/train-001.tar", "s/train-002.tar"]
    assert expand_braces("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]


def test_a_datasets_folder_and_object_read_their_class_names(tmp_path, files):
    """Check a save_to_disk folder and a Dataset object: ClassLabel names, the image struct."""
    datasets = pytest.importorskip("datasets", reason="the dev extra installs datasets")
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=list(CLASSES))})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": d, "path": n} for _, n, d in files],
         "label": [CLASSES.index(c) for c, _, _ in files]}, features=feats)
    ds.save_to_disk(str(tmp_path / "ds"))
    src = read_source(str(tmp_path / "ds"))
    assert src.kind == "table" and len(src.items) == 9
    assert [i.label for i in src.items] == [c for c, _, _ in files]
    loaded = datasets.load_from_disk(str(tmp_path / "ds"))
    same = read_source(loaded)
    assert [i.label for i in same.items] == [i.label for i in src.items]
    with pytest.raises(SourceError, match=r"is a selection .*flatten_indices\(\)"):
        read_source(loaded.select([0, 2]))
    with pytest.raises(SourceError, match=r"lives in memory only; save it with ds.save_to_disk"):
        read_source(ds)


def test_table_columns_are_named_or_refused(tmp_path, files):
    """Check --image-column / --label-column, and a missing column named with the columns there."""
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"jpeg": [d for _, _, d in files], "species": [c for c, _, _ in files],
                             "key": [n for _, n, _ in files]}), path)
    src = read_source(str(path), image_column="jpeg", label_column="species")
    assert [i.id for i in src.items] == [n for _, n, _ in files]  # ids from the key column
    assert [i.label for i in src.items] == [c for c, _, _ in files]
    with pytest.raises(SourceError, match=r"has no column 'image' \(image_column\); its columns: jpeg, species, key"):
        read_source(str(path), image_column="image")


# ---------------------------------------------------------------------- bad members


def test_bad_members_are_recorded_failures(tmp_path, files, s3, reads):
    """Check a truncated JPEG in a shard, a text blob in a Parquet image column and a missing
    object: each a failure with its reason; the rest extracted."""
    cls, name, data = files[0]
    shard_glob = write_shards(tmp_path, files[:4], n=1, extra=[("broken", cls, data[: len(data) // 3])])
    result = extract(shard_glob, out=tmp_path / "tar.h5", **FAST)
    assert result.n_extracted == 4
    assert [(rid, "truncated" in why or "decode" in why) for rid, why in result.failures] == \
        [("train-000000.tar/broken", True)]

    path = tmp_path / "blob.parquet"
    pq.write_table(table_of(files[:4], blob=b"just some notes, not an image"), path)
    result = extract(str(path), out=tmp_path / "pq.h5", **FAST)
    assert result.n_extracted == 4
    assert [rid for rid, _ in result.failures] == ["blob.parquet#4"]
    assert result.failures[0][1] == "not an image (PIL cannot identify the file format)"
    assert "blob.parquet#4" in dict(CodeStore(tmp_path / "pq.h5").failures)

    fs, _ = s3
    fs.pipe("photos/csv/a.jpg", data)
    csv = tmp_path / "objects.csv"
    csv.write_text(f"s3://photos/csv/a.jpg,{cls}\ns3://photos/csv/gone.jpg,{cls}\n")
    result = extract(str(csv), out=tmp_path / "csv.h5", **FAST)
    assert result.n_extracted == 1
    assert result.failures == [("s3://photos/csv/gone.jpg", "cannot read file: no such object "
                                "(s3://photos/csv/gone.jpg)")]


def test_a_shard_cut_short_keeps_what_it_holds(tmp_path, files):
    """Check that a shard truncated inside a member lists the samples before it, and the cut
    one fails with the reason instead of stopping the run."""
    pattern = write_shards(tmp_path, files[:3], n=1)
    shard = tmp_path / "train-000000.tar"
    _, offset, size = read_source(pattern).items[2].part.split(":")
    shard.write_bytes(shard.read_bytes()[:int(offset) + int(size) // 2])  # inside the third image
    src = read_source(pattern)
    assert len(src.items) == 3
    result = extract(src, out=tmp_path / "cut.h5", **FAST)
    assert result.n_extracted == 2
    assert len(result.failures) == 1 and "truncated" in result.failures[0][1]


def test_sources_extra_missing_is_one_line(monkeypatch, parquet):
    """Check that reading a table without pyarrow names the extra to install."""
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(CnnCodesError, match=r"pip install 'cnncodes\[sources\]'"):
        read_source(parquet)


# ---------------------------------------------------------------------- the other commands and the CLI


def test_cli_extracts_shards_and_s3_with_options(tmp_path, shards, s3_folder, s3, folder_store):
    """Check `cnncodes extract 'train-{...}.tar' --label-column txt` and an s3:// folder with
    --storage-option endpoint_url=..."""
    env = {**os.environ, "CNNCODES_OFFLINE": "1"}
    base = [sys.executable, "-m", "cnncodes", "extract", "--image-size", "64", "--batch-size", "4",
            "--workers", "0", "--precision", "float32", "--quiet"]
    run = subprocess.run(base + [shards, "-o", str(tmp_path / "a.h5"), "--label-column", "txt"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "9 extracted" in run.stdout
    no_env = {k: v for k, v in env.items() if k != "AWS_ENDPOINT_URL"}
    run = subprocess.run(base + [s3_folder, "-o", str(tmp_path / "b.h5"), "--storage-option",
                                 f"endpoint_url={s3[1]}"], capture_output=True, text=True, env=no_env)
    assert run.returncode == 0, run.stderr
    assert by_content(tmp_path / "b.h5").keys() == by_content(folder_store).keys()
    run = subprocess.run(base + [s3_folder, "-o", str(tmp_path / "c.h5"), "--storage-option", "oops"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 2
    assert run.stderr.strip().endswith("--storage-option 'oops' is not KEY=VALUE; e.g. --storage-option "
                                       "endpoint_url=http://localhost:9000.")


def test_predict_and_the_transformer_read_objects(tmp_path, s3_folder, folder, parquet):
    """Check that a model predicts a Parquet table and that CNNCodes takes s3:// URLs as X,
    with the codes of the local files."""
    from cnncodes import CNNCodes, fit, predict

    model = fit(extract(folder, out=tmp_path / "train.h5", **FAST).path)
    table = predict(model, parquet)
    local = predict(model, str(folder))
    assert len(table) == 9 and not table.failures
    assert sorted(p.labels[0] for p in table) == sorted(p.labels[0] for p in local)

    urls = [f"{s3_folder}{cls}/{p.name}" for cls in CLASSES for p in sorted((folder / cls).iterdir())]
    paths = [str(folder / cls / p.name) for cls in CLASSES for p in sorted((folder / cls).iterdir())]
    kw = dict(image_size=64, batch_size=4, num_workers=0, precision="float32", progress=False)
    remote = CNNCodes(cache=tmp_path / "t1", **kw)
    here = CNNCodes(cache=tmp_path / "t2", **kw)
    assert np.abs(remote.fit_transform(urls) - here.fit_transform(paths)).max() <= 1e-6
    assert sorted(CodeStore(remote.cache_path_).ids) == sorted(urls)


def test_sweep_and_finetune_read_tables_and_shards(tmp_path, sample_dir, shards):
    """Check that a sweep of a subset of a Parquet table and a fine-tuning on tar shards read
    their images through the source layer (ids of the table, labels of the shards)."""
    from cnncodes import finetune, sweep

    every = [(c, f.name, f.read_bytes()) for c in CLASSES for f in sorted((sample_dir / c).iterdir())]
    pq.write_table(table_of(every), tmp_path / "all.parquet", row_group_size=5)
    result = sweep(str(tmp_path / "all.parquet"), layers=["block4", "block5"], cv=2, max_images=12,
                   store=tmp_path / "sw.h5", image_size=64, batch_size=4, num_workers=0, n_jobs=1,
                   progress=False)
    assert len(result.layers) == 2 and result.n_images == 12 and result.class_names == list(CLASSES)
    ids = set(CodeStore(tmp_path / "sw.h5").ids)
    assert len(ids) == 12 and all(i.startswith("all.parquet#") for i in ids)

    run = finetune(shards, out=tmp_path / "ft.pt", image_size=64, batch_size=4, num_workers=0,
                   precision="float32", progress=False, unfreeze="block5", epochs=1, test_size=None,
                   val_fraction=0.0, early_stopping=None)
    assert run.classes == ["0", "1", "2"] and run.n_train == 9  # the shards' .cls labels


def test_objects_decode_in_worker_processes(tmp_path, s3_folder, folder_store):
    """Check that decoding processes (forked) read S3 objects with their own connections."""
    result = extract(s3_folder, out=tmp_path / "w.h5", **{**FAST, "num_workers": 2})
    assert result.n_extracted == 9 and not result.failures
    got, ref = by_content(tmp_path / "w.h5"), by_content(folder_store)
    assert got.keys() == ref.keys()
    assert max(np.abs(got[s][1] - ref[s][1]).max() for s in ref) <= 1e-6


def _copy_state(folder):
    """(name -> inode, mtime_ns) of a working copy's files: what a pull replaced or added."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*.h5"))}


def test_a_store_in_object_storage_moves_only_what_is_new(tmp_path, folder, files, folder_store, s3,
                                                         monkeypatch, capsys):
    """Check a store at an s3:// URL: the first run uploads one segment and the root; an
    unchanged re-run moves no byte either way; another machine (another cache) reads the
    folder's codes; one more photo uploads one segment, and that machine then downloads that
    segment only; `cnncodes info` reads the URL."""
    from cnncodes._cli.main import main

    fs, _ = s3
    url = "s3://photos/local-stores/codes.h5"
    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path / "here"))
    first = extract(folder, out=url, **FAST)
    assert first.n_extracted == 9 and first.uploaded["segments"] == ["segment-000000.h5"]
    assert first.path == url and url in first.summary()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find("photos/local-stores")) == ["codes.h5", "segment-000000.h5"]
    stamp = fs.info("photos/local-stores/codes.h5")["LastModified"]
    here = next((tmp_path / "here" / "stores").iterdir())
    before = _copy_state(here)
    again = extract(folder, out=url, **FAST)
    assert again.n_unchanged == 9 and again.uploaded is None
    assert _copy_state(here) == before and fs.info("photos/local-stores/codes.h5")["LastModified"] == stamp

    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path / "there"))
    got, ref = by_content(url), by_content(folder_store)
    assert got.keys() == ref.keys()
    assert max(np.abs(got[s][1] - ref[s][1]).max() for s in ref) <= 1e-6
    there = next((tmp_path / "there" / "stores").iterdir())
    seen = _copy_state(there)

    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path / "here"))
    grown = tmp_path / "grown"
    shutil.copytree(folder, grown)
    cls, name, data = files[0]
    from PIL import Image

    Image.open(io.BytesIO(data)).transpose(Image.Transpose.ROTATE_90).save(grown / cls / f"new-{name}")
    more = extract(grown, out=url, on_other_root="replace", **FAST)
    assert more.n_extracted == 1 and more.uploaded["segments"] == ["segment-000001.h5"]

    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path / "there"))
    store = CodeStore(url)
    assert len(store) == 10 and store.url == url
    now = _copy_state(there)
    changed = {n for n in now if now[n] != seen.get(n)}
    assert changed == {"codes.h5", "segment-000001.h5"}  # the root and the new segment, no more
    assert main(["info", url]) == 0
    assert "10 rows" in capsys.readouterr().out.replace(",", "")


def test_a_store_in_object_storage_names_what_is_wrong(tmp_path, folder, s3, monkeypatch):
    """Check the one-line errors of a store in object storage: a writer on another host holds
    it (say who, and what to delete when that run is dead); a segment object is missing; a
    bucket or a folder given instead of a file; no store there; an object of another kind as
    the output (refused, left as it was)."""
    from cnncodes._errors import StoreError, StoreLockedError

    fs, _ = s3
    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path / "cache"))
    url = "s3://photos/errors/codes.h5"
    with pytest.raises(StoreError, match=re.escape("code store 's3://photos/errors/codes.h5' does not exist")):
        CodeStore(url)
    fs.pipe("photos/errors/codes.h5.lock", json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}).encode())
    with pytest.raises(StoreLockedError, match=re.escape("(host elsewhere, pid 1, since then). Wait for it to "
                                                         "finish; if that run is dead, delete s3://photos/errors/"
                                                         "codes.h5.lock and re-run")):
        extract(folder, out=url, **FAST)
    fs.rm("photos/errors/codes.h5.lock")
    extract(folder, out=url, **FAST)
    assert not fs.exists("photos/errors/codes.h5.lock")
    fs.rm("photos/errors/codes.h5.d/segment-000000.h5")
    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path / "fresh"))
    with pytest.raises(StoreError, match=re.escape("is incomplete: 1 segment object(s) it maps are missing")):
        CodeStore(url)
    with pytest.raises(StoreError, match="names a bucket or folder, not a store file"):
        CodeStore("s3://photos/")
    with pytest.raises(StoreError, match=re.escape("s3://photos/errors is a folder; give the store's file")):
        CodeStore("s3://photos/errors")
    # An object of another kind is never taken for a store, nor written over.
    fs.pipe("photos/errors/photo.jpg", b"\xff\xd8\xff not a store")
    with pytest.raises(StoreError, match=r"cannot read the store at s3://photos/errors/photo.jpg"):
        extract(folder, out="s3://photos/errors/photo.jpg", **FAST)
    assert fs.cat("photos/errors/photo.jpg") == b"\xff\xd8\xff not a store"


def test_a_failed_upload_goes_up_with_the_next_run(tmp_path, folder, folder_store, s3, monkeypatch):
    """Check that when uploading a commit fails, the run says so in one line (the store there
    unchanged, the codes kept in the working copy), and the next run uploads them first: the
    store in S3 then holds every row, without recomputing any."""
    from cnncodes._errors import StoreError
    from cnncodes._store.remote import RemoteStore

    fs, _ = s3
    url = "s3://photos/flaky-store/codes.h5"
    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path / "here"))
    real = RemoteStore.push

    def offline(self):
        self.fs, real_fs = _Unreachable(), self.fs
        try:
            return real(self)
        finally:
            self.fs = real_fs

    monkeypatch.setattr(RemoteStore, "push", offline)
    with pytest.raises(StoreError, match=r"cannot write the store at s3://photos/flaky-store/codes.h5: .*The "
                                         r"store there is as it was .* go up with the next run"):
        extract(folder, out=url, **FAST)
    assert not fs.exists("photos/flaky-store/codes.h5")
    monkeypatch.setattr(RemoteStore, "push", real)
    again = extract(folder, out=url, **FAST)
    assert again.n_extracted == 0 and again.n_unchanged == 9
    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path / "there"))
    got, ref = by_content(url), by_content(folder_store)
    assert got.keys() == ref.keys()


class _Unreachable:
    """A file system whose every call fails as an unreachable endpoint does."""

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise OSError(f"endpoint unreachable ({name})")

        return fail
