"""Run every benchmark in turn and print their tables (the single entry point).

    python benchmarks/run_all.py ../shared/datasets/flowers5            # the RESULTS.md runs
    python benchmarks/run_all.py ../shared/datasets/flowers5 --quick    # a few minutes
    python benchmarks/run_all.py ../shared/datasets/flowers5 --only extract knn

Each benchmark runs in its own process, one after the other (never two at once: they would
measure each other). Their ratios are measured side by side inside each script.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def plan(data: str, quick: bool) -> dict[str, list[str]]:
    n = "300" if quick else "all"
    return {
        "extract": ["bench_extract.py", data, "--n", n] + ([] if quick else ["--compile"]),
        "extract-resnet50": ["bench_extract.py", data, "--n", "200" if quick else "1000", "--backbone",
                             "resnet50", "--weights", "random", "--no-reruns"] + ([] if quick else ["--compile"]),
        "resize": ["bench_resize.py", data] + (["--n", "500"] if quick else []),
        "precision": ["bench_precision.py", data],
        "memory": ["bench_memory.py", data, "--n", "2000" if quick else "10000"],
        "knn": ["bench_knn.py"] + (["--n-train", "5000", "--n-query", "1000"] if quick else []),
        "fit": ["bench_fit.py"] + (["--n-train", "5000"] if quick else []),
        "knn-large": ["bench_knn_large.py"] + (["--n-train", "20000"] if quick else []),
        "transfer": ["bench_transfer.py", data] + (["--epochs", "1", "--scratch-epochs", "1"] if quick else []),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a folder of class subfolders, e.g. ../shared/datasets/flowers5")
    p.add_argument("--quick", action="store_true", help="small sizes: checks the scripts, not the figures")
    p.add_argument("--only", nargs="+", help="run only these benchmarks")
    args = p.parse_args()
    runs = plan(args.data, args.quick)
    unknown = set(args.only or []) - set(runs)
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(runs)}")
    failed = []
    for name, argv in runs.items():
        if args.only and name not in args.only:
            continue
        print(f"\n## {name}: python benchmarks/{' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        if subprocess.run([sys.executable, str(HERE / argv[0]), *argv[1:]], cwd=HERE.parent).returncode:
            failed.append(name)
        print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
