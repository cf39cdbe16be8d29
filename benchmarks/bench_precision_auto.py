"""Did precision="auto" pick the faster precision? auto vs --precision float32 / bfloat16, end to end.

For the same photos, in each of `--rounds` rounds (the order rotating from round to round, each
run a new store, the freed memory given back first as a fresh process has it): `extract` with
precision "auto" (what it measured on the first batch and chose), then with each candidate
forced. Prints the choice and the probe's rates per round, the medians, and the ratio of
auto's end-to-end rate to the faster forced one's (median of the rounds' ratios: on a shared
machine the rate drifts within minutes, each round compares runs seconds apart).

    python benchmarks/bench_precision_auto.py ../shared/datasets/flowers5 --n 1000 --rounds 3
    python benchmarks/bench_precision_auto.py ../shared/datasets/flowers5 --backbone resnet50 --weights random
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import h5py

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs
from bench_extract import _median, subset


def main():
    from cnncodes import extract
    from cnncodes._extract.accel import release_freed_memory, resolve_device
    from cnncodes._extract.precision import candidates

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="a folder of class subfolders, e.g. ../shared/datasets/flowers5")
    p.add_argument("--n", default="1000", help="number of images, or 'all' (default 1000)")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", default="imagenet", help="'random' for backbones without offline weights")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    weights = None if args.weights == "random" else args.weights
    forced = candidates(resolve_device("auto"))
    work = Path(tempfile.mkdtemp(prefix="cnncodes-auto-"))
    subset(args.data, work / "data", None if args.n == "all" else int(args.n))
    n = sum(1 for _ in (work / "data").rglob("*.*"))
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"# {cpu_name()}, {os.cpu_count()} cores; {args.backbone}, weights {args.weights}, {n} images, "
          f"batch {args.batch_size}, {args.rounds} rounds; at start: {load}")
    print(f"# command: python benchmarks/bench_precision_auto.py {args.data} --n {args.n} --backbone "
          f"{args.backbone} --weights {args.weights} --rounds {args.rounds}")
    settings = dict(backbone=args.backbone, weights=weights, batch_size=args.batch_size, compile=False,
                    progress=False)
    runs = ["auto", *forced]
    rates = {r: [] for r in runs}
    chosen, ratios = [], []
    for k in range(args.rounds):
        order = runs[k % len(runs):] + runs[:k % len(runs)]
        got = {}
        for run in order:
            out = work / f"{run}-{k}.h5"
            release_freed_memory()
            t0 = time.perf_counter()
            result = extract(work / "data", out=out, precision=run, **settings)
            got[run] = n / (time.perf_counter() - t0)
            rates[run].append(got[run])
            if run == "auto":
                with h5py.File(out, "r") as f:
                    choice = json.loads(f.attrs["precision_choice"])
                chosen.append(choice["precision"])
                print(f"# round {k + 1}: {result.precision_choice}")
            shutil.rmtree(work / f"{run}-{k}.h5.d", ignore_errors=True)
            out.unlink()
        best = max(forced, key=lambda r: got[r])
        ratios.append(got["auto"] / got[best])
        print(f"# round {k + 1} end to end (order {', '.join(order)}): "
              + ", ".join(f"{r} {got[r]:.1f} img/s" for r in runs)
              + f"; auto chose {chosen[-1]}, the faster forced run was {best}")
    print("| run | images/s (median) | rounds |")
    print("|---|---|---|")
    for run in runs:
        name = f"extract, precision auto (chose {', '.join(sorted(set(chosen)))})" if run == "auto" \
            else f"extract --precision {run}"
        print(f"| {name} | {_median(rates[run]):.1f} | {', '.join(f'{x:.1f}' for x in rates[run])} |")
    print(f"auto / the faster forced precision of its round: median {_median(ratios):.2f} "
          f"({', '.join(f'{x:.2f}' for x in ratios)}); at end: "
          + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
