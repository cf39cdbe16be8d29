"""The stratified bootstrap of cnncodes._stats against a Python loop over resamples, same run.

    python benchmarks/bench_bootstrap.py [--rows 100000] [--classes 100] [--resamples 1000]

Both compute the 95 % interval of accuracy and mean per-class accuracy of the same 1/0 column
(stratified by class); the loop draws each resample's rows class by class as a plain
implementation would. Prints both times, the ratio, and that the intervals agree.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name  # noqa: E402


def loop_bootstrap(values, strata, n_resamples, rng):
    classes = np.unique(strata)
    groups = [values[strata == c] for c in classes]
    overall, balanced = np.empty(n_resamples), np.empty(n_resamples)
    for r in range(n_resamples):
        means = np.array([rng.choice(g, len(g)).mean() for g in groups])
        sizes = np.array([len(g) for g in groups])
        overall[r] = means @ sizes / sizes.sum()
        balanced[r] = means.mean()
    return np.quantile(overall, [0.025, 0.975]), np.quantile(balanced, [0.025, 0.975])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--resamples", type=int, default=1000)
    args = ap.parse_args()
    from cnncodes._stats import accuracy_intervals

    rng = np.random.default_rng(0)
    strata = rng.integers(0, args.classes, args.rows)
    values = (rng.random(args.rows) < 0.8).astype(float)
    t = time.perf_counter()
    a, b = accuracy_intervals(values, strata, n_resamples=args.resamples, random_state=0)
    fast = time.perf_counter() - t
    t = time.perf_counter()
    la, lb = loop_bootstrap(values, strata, args.resamples, np.random.default_rng(0))
    slow = time.perf_counter() - t
    print(f"CPU: {cpu_name()}; {args.rows:,} rows, {args.classes} classes, {args.resamples} resamples")
    print(f"cnncodes._stats (vectorised): {fast:.2f} s   accuracy CI {a.low:.4f} to {a.high:.4f}, "
          f"mean per-class {b.low:.4f} to {b.high:.4f}")
    print(f"loop over resamples:          {slow:.2f} s   accuracy CI {la[0]:.4f} to {la[1]:.4f}, "
          f"mean per-class {lb[0]:.4f} to {lb[1]:.4f}")
    print(f"ratio loop / vectorised: {slow / fast:.1f}x")


if __name__ == "__main__":
    main()
