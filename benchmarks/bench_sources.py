"""Sources: the same photos as a folder, WebDataset shards, one Parquet file and S3 objects.

Writes the three copies of a folder of class folders (shards and rows in the folder's order,
so that batches hold the same images), starts a local S3-compatible server (moto, its own
process) and uploads the photos, then for each source:

- extracts it into its own store (float32) and reports images/s, with the ratio to the
  folder measured in the same run;
- compares its sha256 -> (label, codes) mapping with the folder's (max abs difference);
- re-runs it unchanged and counts the image bytes read (through ``read_bytes``).

With ``--ray`` it also extracts the S3 copy with ``engine="ray"`` (2 workers) and reports the
driver's image bytes read, its peak memory, and whether the store equals the folder's; the
Ray run writes its store into S3 too, and reports the segment bytes its driver downloaded.

With ``--remote-store`` it writes the folder's store into S3 (``s3://bench/stores/codes.h5``):
95 % of the photos first, an unchanged re-run, then all of them; and reads it from a second
working copy before and after the growth. It reports the bytes each step moved each way,
against the store's size.

    python benchmarks/bench_sources.py /work/shared/datasets/flowers5 --work /tmp/bench-sources --ray
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name  # noqa: E402

import cnncodes._extract.extract  # noqa: E402
from cnncodes import CodeStore, extract  # noqa: E402
from cnncodes._input.sources import read_source  # noqa: E402

SETTINGS = dict(backbone="mobilenet_v2", layers=["block5"], precision="float32", progress=False)


class Counter:
    """Counts the images and bytes this process reads through cnncodes' read_bytes."""

    def __init__(self):
        self.images = self.bytes = 0
        self.real = cnncodes._input.sources.read_bytes
        cnncodes._input.sources.read_bytes = self

    def __call__(self, item, storage_options=None):
        data = self.real(item, storage_options)
        self.images += 1
        self.bytes += len(data)
        return data

    def reset(self):
        self.images = self.bytes = 0


def write_copies(folder: Path, work: Path, n_shards: int) -> tuple[str, str, list]:
    """(shard pattern, parquet path, items) of the folder's labelled photos, in its order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = [i for i in read_source(str(folder)).items if i.label is not None]
    per = -(-len(items) // n_shards)
    shards = work / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(shards / f"train-{s:06d}.tar", "w") as tar:
            for it in items[s * per:(s + 1) * per]:
                key = it.id.replace("/", "_").rsplit(".", 1)[0].replace(".", "_")
                ext = it.id.rsplit(".", 1)[-1].lower()
                for name, payload in ((f"{key}.txt", it.label.encode()), (f"{key}.{ext}", Path(it.path).read_bytes())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    table = pa.table({"image": [{"bytes": Path(it.path).read_bytes(), "path": it.id} for it in items],
                      "label": [it.label for it in items], "id": [it.id for it in items]})
    pq.write_table(table, work / "photos.parquet", row_group_size=256)
    return str(shards) + "/train-{000000..%06d}.tar" % (n_shards - 1), str(work / "photos.parquet"), items


def start_s3(work: Path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(work / "moto.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    return server, endpoint


def upload(items, endpoint: str) -> str:
    import s3fs
    from concurrent.futures import ThreadPoolExecutor

    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir("photos")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda it: fs.pipe(f"photos/flowers/{it.id}", Path(it.path).read_bytes()), items))
    return "s3://photos/flowers/"


def by_content(path) -> dict:
    store = CodeStore(path)
    names = store.class_names
    return {sha: (names[lab], code) for sha, lab, code in zip(store.sha256, store.labels, store.codes("block5"))}


def compare(path, ref: dict) -> dict:
    got = by_content(path)
    same_labels = got.keys() == ref.keys() and all(got[s][0] == ref[s][0] for s in ref)
    diff = max((float(np.abs(got[s][1] - ref[s][1]).max()) for s in ref if s in got), default=float("nan"))
    return {"same_content_and_labels": bool(same_labels), "max_abs_diff": diff, "rows": len(got)}


def ray_child(url: str, out: Path) -> None:
    """The Ray run's driver: extract the S3 copy with 2 workers; print what it read and held."""
    counter = Counter()
    t = time.perf_counter()
    result = extract(url, out=out, engine="ray", ray_workers=2, **SETTINGS)
    print(json.dumps({"source": "S3 objects, engine=ray, 2 workers", "extracted": result.n_extracted,
                      "failed": len(result.failures), "seconds": round(time.perf_counter() - t, 1),
                      "driver_images_read": counter.images, "driver_bytes_read": counter.bytes,
                      "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


class Moved:
    """Bytes a remote store's working copy downloaded (RemoteStore._get) in this process."""

    def __init__(self):
        from cnncodes._store import remote as _remote

        self.bytes, self.files, real = 0, [], _remote.RemoteStore._get

        def get(store, remote, local):
            real(store, remote, local)
            self.bytes += Path(local).stat().st_size
            self.files.append(Path(local).name)

        _remote.RemoteStore._get = get

    def take(self) -> tuple[int, list]:
        out = (self.bytes, self.files)
        self.bytes, self.files = 0, []
        return out


def remote_store_rows(folder: Path, work: Path, ray: bool = False) -> list[dict]:
    """Grow a store in S3 from 95 % of the photos to all; what each step moved."""
    moved = Moved()
    grow = work / "grow"
    if grow.exists():
        import shutil

        shutil.rmtree(grow)
    photos = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    held = set(photos[::20])  # every 20th photo comes in the second run

    def link(keep):
        for p in photos:
            if p in keep:
                target = grow / p.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    target.symlink_to(p.resolve())

    url = f"s3://bench/stores/codes-{os.getpid()}.h5"
    from cnncodes._input.items import filesystem

    filesystem(url)[0].mkdir("bench")
    rows = []

    def step(name, run, target=url):
        t = time.perf_counter()
        out = run()
        down, files = moved.take()
        up = out.uploaded["bytes"] if getattr(out, "uploaded", None) else 0
        size = sum(int(v) for v in _sizes(target).values())
        rows.append({"step": name, "seconds": round(time.perf_counter() - t, 2), "uploaded_bytes": up,
                     "downloaded_bytes": down, "downloaded_files": len(files), "store_bytes": size})
        print(json.dumps(rows[-1]), flush=True)

    link(set(photos) - held)
    os.environ["CNNCODES_CACHE_DIR"] = str(work / "cache-writer")
    step("first run, 95 % of the photos", lambda: extract(str(grow), out=url, **SETTINGS))
    step("unchanged re-run", lambda: extract(str(grow), out=url, **SETTINGS))
    os.environ["CNNCODES_CACHE_DIR"] = str(work / "cache-reader")
    step("a second machine reads it", lambda: CodeStore(url))
    link(held)
    os.environ["CNNCODES_CACHE_DIR"] = str(work / "cache-writer")
    step(f"{len(held)} photos added", lambda: extract(str(grow), out=url, **SETTINGS))
    os.environ["CNNCODES_CACHE_DIR"] = str(work / "cache-reader")
    step("the second machine reads it again", lambda: CodeStore(url))
    if ray:  # the actors upload their segments; the driver downloads none
        ray_url = url.replace("codes-", "ray-")
        os.environ["CNNCODES_CACHE_DIR"] = str(work / "cache-ray-driver")
        step("engine=ray, 2 workers, all photos", lambda: extract(str(grow), out=ray_url, engine="ray",
                                                                  ray_workers=2, **SETTINGS), ray_url)
        os.environ["CNNCODES_CACHE_DIR"] = str(work / "cache-reader")
        rows[-1].update(compare(ray_url, by_content(url)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _print_remote(rows) -> None:
    print(f"\n{'store in S3 (moto)':<36} {'time':>9}  {'uploaded':>10}  {'downloaded':>10}  store")
    for r in rows:
        print(f"{r['step']:<36} {r['seconds']:>7.1f} s  {r['uploaded_bytes'] / 1e6:>7.2f} MB  "
              f"{r['downloaded_bytes'] / 1e6:>7.2f} MB  {r['store_bytes'] / 1e6:.1f} MB")


def _sizes(url: str) -> dict:
    from cnncodes._input.items import filesystem

    fs, inner = filesystem(url)
    return {p: fs.info(p)["size"] for p in fs.find(inner.rsplit("/", 1)[0]) if p.startswith(inner)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-sources"))
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--ray", action="store_true", help="also the Ray engine (2 workers) on the S3 copy")
    ap.add_argument("--remote-store", action="store_true", help="also a store in S3, grown by 5 %%")
    ap.add_argument("--remote-store-only", action="store_true", help="only the store in S3")
    ap.add_argument("--ray-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ray_child:
        return ray_child(args.ray_child, args.work / "ray.h5")
    # The work folder is this benchmark's: it replaces its stores there on every run, so a
    # folder holding anything else (a typo for one's own data) is refused.
    marker = args.work / ".bench-sources"
    if args.work.is_dir() and any(args.work.iterdir()) and not marker.exists():
        sys.exit(f"{args.work} is not empty and was not made by this benchmark; give a new folder "
                 f"(--work), it rewrites the stores in it.")
    args.work.mkdir(parents=True, exist_ok=True)
    marker.touch()
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {args.folder}")
    server, endpoint = start_s3(args.work)
    if args.remote_store_only:
        try:
            _print_remote(remote_store_rows(args.folder, args.work, ray=args.ray))
        finally:
            server.terminate()
        return
    pattern, parquet, items = write_copies(args.folder, args.work, args.shards)
    counter = Counter()
    rows = []
    try:
        s3_url = upload(items, endpoint)
        sources = [("folder", str(args.folder), {}), (f"{args.shards} tar shards", pattern, {"label_column": "txt"}),
                   ("one Parquet file", parquet, {}), ("S3 objects (moto)", s3_url, {})]
        # Warm-up (weights loaded, first batches), so that the folder is not charged for it.
        extract([it.path for it in items[:128]], out=args.work / "warmup.h5", **SETTINGS)
        ref = None
        for name, source, opts in sources:
            out = args.work / f"{name.split()[0]}.h5"
            for stale in (out, Path(str(out) + ".d")):
                if stale.is_file():
                    stale.unlink()
                elif stale.is_dir():
                    import shutil

                    shutil.rmtree(stale)
            counter.reset()
            first = extract(source, out=out, **SETTINGS, **opts)
            read_first = (counter.images, counter.bytes)
            counter.reset()
            t = time.perf_counter()
            again = extract(source, out=out, **SETTINGS, **opts)
            rerun_s = time.perf_counter() - t
            ref = ref or by_content(out)
            row = {"source": name, "images": first.n_images, "extracted": first.n_extracted,
                   "failed": len(first.failures), "seconds": round(first.seconds, 1),
                   "img_s": round(first.n_extracted / first.seconds, 1),
                   "images_read_first": read_first[0], "rerun_images_read": counter.images,
                   "rerun_bytes_read": counter.bytes, "rerun_seconds": round(rerun_s, 2),
                   "rerun_extracted": again.n_extracted, **compare(out, ref)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        base = rows[0]["img_s"]
        print(f"\n{'source':<20} {'img/s':>7} {'vs folder':>9} {'re-run reads':>13} {'max |diff|':>11}")
        for r in rows:
            print(f"{r['source']:<20} {r['img_s']:>7.1f} {r['img_s'] / base:>8.2f}x "
                  f"{r['rerun_bytes_read']:>11d} B {r['max_abs_diff']:>11.2e}")
        if args.ray:  # in a process of its own: its peak memory is the driver's alone
            out = args.work / "ray.h5"
            out.unlink(missing_ok=True)
            run = subprocess.run([sys.executable, __file__, str(args.folder), "--ray-child", s3_url,
                                  "--work", str(args.work)], capture_output=True, text=True)
            if run.returncode:
                print(run.stderr[-3000:])
            row = json.loads(run.stdout.strip().splitlines()[-1])
            print(json.dumps({**row, **compare(out, ref)}), flush=True)
        if args.remote_store:
            _print_remote(remote_store_rows(args.folder, args.work, ray=args.ray))
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
