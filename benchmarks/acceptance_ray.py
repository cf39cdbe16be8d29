"""Acceptance of the Ray engine: local Ray, 2 workers, a folder of photos, against one machine.

1. Extracts the folder with ``engine="ray"`` (2 actors, float32) and, with ``--kill``, kills
   one actor process (SIGKILL) once a few shards are written; if the run fails it re-runs.
   With ``--kill-driver-after N`` the run's driver is a child process, SIGKILLed (with its
   local Ray cluster, one process group) once N journal files are written, then re-run here.
2. Compares the joined store with a single-process float32 store of the same folder
   (``--reference``; made here when missing): same ids and labels, every id exactly once,
   max abs difference of the codes.

    python benchmarks/acceptance_ray.py /work/shared/datasets/flowers5 --reference single.h5 --kill
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np

from cnncodes import CodeStore, extract
from cnncodes._store.store import Journal


def actor_pids() -> list[int]:
    """Pids of the processes running the backbone actors (Ray names them after the class)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "_CodesWorker" in cmd:
                pids.append(int(proc.name))
    return pids


def killer(out: Path, after: int, log: list) -> None:
    """Wait until `after` shards are written, then SIGKILL one actor process."""
    journal = Journal(out)
    while len(journal.files()) < after:
        time.sleep(0.5)
    pids = actor_pids()
    if pids:
        os.kill(pids[0], signal.SIGKILL)
    log.append((time.perf_counter(), len(journal.files()), pids))


def compare(store: CodeStore, ref: CodeStore) -> dict:
    ids = list(store.ids)
    dup = sum(c - 1 for c in collections.Counter(ids).values())
    order = {rid: k for k, rid in enumerate(ids)}
    missing = [rid for rid in ref.ids if rid not in order]
    rows = np.array([order[rid] for rid in ref.ids if rid in order])
    keep = np.array([rid in order for rid in ref.ids])
    names, ref_names = np.array(store.class_names), np.array(ref.class_names)
    same_labels = bool(np.all(names[store.labels[rows]] == ref_names[ref.labels[keep]]))
    diff = float(np.abs(store.codes("block5")[rows] - ref.codes("block5")[keep]).max())
    return {"rows": len(store), "ref_rows": len(ref), "duplicates": dup, "missing": len(missing),
            "same_labels": same_labels, "max_abs_diff": diff}


def main(argv=None):
    import ray

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data")
    parser.add_argument("--reference", required=True, help="single-process float32 store")
    parser.add_argument("--out", default="ray_acceptance.h5")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--kill", action="store_true", help="kill one actor mid-run")
    parser.add_argument("--kill-after", type=int, default=10, help="shards written before the kill")
    parser.add_argument("--kill-driver-after", type=int, help="journal files written before the driver is killed")
    parser.add_argument("--replace", action="store_true", help="delete an existing --out store first")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common = dict(layers=["block5"], precision="float32", progress=False)
    ref_path = Path(args.reference)
    if not ref_path.exists():
        t0 = time.perf_counter()
        extract(args.data, out=ref_path, **common)
        print(f"single-process reference: {time.perf_counter() - t0:.0f} s")
    out = Path(args.out)
    if args.child:
        pass  # the parent made the way clear
    elif out.exists() and not args.replace:
        raise SystemExit(f"{out} exists; give a new --out, or --replace to delete it (and its "
                         f"{out.name}.d/ and {out.name}.partial/) first.")
    else:
        import shutil

        for p in (out, Path(f"{out}.d"), Path(f"{out}.partial")):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    if args.child:  # the driver to be killed
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        extract(args.data, out=out, engine="ray", ray_workers=args.workers, **common)
        return
    if args.kill_driver_after:
        import subprocess
        import sys

        child = subprocess.Popen([sys.executable, __file__, args.data, "--reference", str(ref_path), "--out", str(out),
                                  "--workers", str(args.workers), "--cpus", str(args.cpus), "--child"],
                                 start_new_session=True)
        log = []
        if args.kill:
            threading.Thread(target=killer, args=(out, args.kill_after, log), daemon=True).start()
        journal = Journal(out)
        while len(journal.files()) < args.kill_driver_after and child.poll() is None:
            time.sleep(0.5)
        files = len(journal.files())
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        time.sleep(3)
        if log:
            print(f"killed actor pid {log[0][2][0] if log[0][2] else None} after {log[0][1]} journal files")
        print(f"killed the driver (and its local Ray) after {files} journal files; "
              f"{len(journal.done()[0])} images journalled; store exists: {out.exists()}")
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        t1 = time.perf_counter()
        result = extract(args.data, out=out, engine="ray", ray_workers=args.workers, **common)
        print(f"re-run: {result.n_resumed} resumed, {result.n_extracted} extracted, "
              f"{result.n_unchanged} unchanged, {time.perf_counter() - t1:.0f} s")
        print(compare(CodeStore(out), CodeStore(ref_path)))
        ray.shutdown()
        return
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    log = []
    if args.kill:
        threading.Thread(target=killer, args=(out, args.kill_after, log), daemon=True).start()
    t0 = time.perf_counter()
    try:
        result = extract(args.data, out=out, engine="ray", ray_workers=args.workers, **common)
        print(f"ray run: {result.n_extracted} extracted, {len(result.failures)} failed, "
              f"{time.perf_counter() - t0:.0f} s")
    except Exception as exc:  # noqa: BLE001 - report it, then re-run
        print(f"ray run failed after {time.perf_counter() - t0:.0f} s: {type(exc).__name__}: {exc}")
        t1 = time.perf_counter()
        result = extract(args.data, out=out, engine="ray", ray_workers=args.workers, **common)
        print(f"re-run: {result.n_resumed} resumed, {result.n_extracted} extracted, "
              f"{result.n_unchanged} unchanged, {time.perf_counter() - t1:.0f} s")
    if log:
        _, n, pids = log[0]
        print(f"killed actor pid {pids[0] if pids else None} (of {pids}) after {n} shards")
    print(compare(CodeStore(out), CodeStore(ref_path)))
    ray.shutdown()


if __name__ == "__main__":
    main()
