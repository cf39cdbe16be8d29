"""Acceptance run for the store: uninterrupted run, SIGKILL halfway + re-run, unchanged re-run.

    python benchmarks/acceptance_resume.py ../shared/datasets/flowers5 --layer block4 --layer block5

Prints rows, images/s, whether the resumed store equals the uninterrupted one (max abs diff),
and the unchanged re-run time as a fraction of the first run.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def cli(data, out, layers, backbone):
    cmd = [sys.executable, "-m", "cnncodes", "extract", str(data), "-o", str(out), "--quiet",
           "--backbone", backbone]
    for layer in layers:
        cmd += ["--layer", layer]
    return cmd


def main():
    from cnncodes import CodeStore
    from cnncodes._store.store import Journal

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path)
    p.add_argument("--layer", action="append", dest="layers", default=None)
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    layers = args.layers or ["block4", "block5"]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cnncodes-acceptance-"))
    work.mkdir(parents=True, exist_ok=True)
    full, killed = work / "full.h5", work / "killed.h5"
    for f in (full, killed):
        f.unlink(missing_ok=True)

    t0 = time.perf_counter()
    done = subprocess.run(cli(args.data, full, layers, args.backbone), capture_output=True, text=True)
    t_full = time.perf_counter() - t0
    print(done.stdout.splitlines()[0])
    print(f"uninterrupted run: exit {done.returncode}, {t_full:.1f} s")

    ref = CodeStore(full)
    n = len(ref)
    proc = subprocess.Popen(cli(args.data, killed, layers, args.backbone),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = Journal(killed)
    half = (n // 2) // 64
    while len(journal.batches()) < half and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    print(f"SIGKILL after {len(journal.batches())} journalled batches (~{len(journal.batches()) * 64} images); "
          f"store exists: {killed.exists()}")
    t0 = time.perf_counter()
    done = subprocess.run(cli(args.data, killed, layers, args.backbone), capture_output=True, text=True)
    print(f"re-run after kill: exit {done.returncode}, {time.perf_counter() - t0:.1f} s; {done.stdout.splitlines()[0]}")
    got = CodeStore(killed)
    same_ids = list(got.ids) == list(ref.ids)
    print(f"rows {len(got)} (uninterrupted {n}), unique ids {len(set(got.ids))}, same ids in same order: {same_ids}, "
          f"labels equal: {np.array_equal(got.labels, ref.labels)}")
    for layer in layers:
        print(f"  {layer}: max abs diff vs uninterrupted = {np.abs(got.codes(layer) - ref.codes(layer)).max():.3g}")

    t0 = time.perf_counter()
    done = subprocess.run(cli(args.data, full, layers, args.backbone), capture_output=True, text=True)
    t_rerun = time.perf_counter() - t0
    print(f"unchanged re-run: {t_rerun:.2f} s = {100 * t_rerun / t_full:.1f} % of the first run; "
          f"{done.stdout.splitlines()[0]}")


if __name__ == "__main__":
    main()
