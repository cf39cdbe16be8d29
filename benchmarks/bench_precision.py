"""Does bfloat16 extraction cost accuracy? logreg on bfloat16 vs float32 codes of the same photos.

Extracts a data set twice (precision float32 and bfloat16, block4 + block5), reports the
per-row cosine between the two, and the held-out accuracy of `fit(classifier="logreg")`
on each (the same leak-free 75/25 split, random_state 0, the same C grid). One split of
1,082 held-out photos moves by a photo or two on noise, so the difference at a fixed C is
also reported over `--splits` random splits (mean ± std of the per-split differences).

    python benchmarks/bench_precision.py ../shared/datasets/flowers5 --work /tmp/prec
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs


def main():
    from cnncodes import CodeStore, evaluate, extract, fit, split_store

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path)
    p.add_argument("--work", type=Path, help="folder for the two stores (kept; re-runs reuse them)")
    p.add_argument("--splits", type=int, default=5, help="random splits for the fixed-C difference (default 5)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="cnncodes-prec-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# {cpu_name()}, {os.cpu_count()} cores; {args.data}")
    print(f"# command: python benchmarks/bench_precision.py {args.data}")
    stores, secs = {}, {}
    for precision in ("float32", "bfloat16"):
        t0 = time.perf_counter()
        extract(args.data, out=work / f"{precision}.h5", layers=["block4", "block5"], precision=precision,
                progress=False)
        secs[precision] = time.perf_counter() - t0
        stores[precision] = CodeStore(work / f"{precision}.h5")
    a, b = stores["float32"], stores["bfloat16"]
    assert list(a.ids) == list(b.ids)
    # C by cross-validation on each store, and C fixed at float32's choice for both: the CV
    # choice can flip between neighbouring grid points on noise, which is not the codes' doing.
    print("| layer | cosine bf16 vs fp32, min / mean | C | logreg fp32 | logreg bf16 | difference |")
    print("|---|---|---|---|---|---|")
    for layer in ("block4", "block5"):
        x, z = a.codes(layer), b.codes(layer)
        cos = (x * z).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(z, axis=1)
        acc, chosen = {}, {}
        for name, store in stores.items():
            train, _ = split_store(store, test_size=0.25, random_state=0)
            model = fit(store, layer=layer, rows=train, classifier="logreg")
            acc[name], chosen[name] = evaluate(model, store).accuracy, model.cnncodes_["fit"]["C"]
        fixed = {}
        for name, store in stores.items():
            train, _ = split_store(store, test_size=0.25, random_state=0)
            fixed[name] = evaluate(fit(store, layer=layer, rows=train, C=chosen["float32"]), store).accuracy
        print(f"| {layer} | {cos.min():.5f} / {cos.mean():.5f} | by CV: {chosen['float32']:g} / "
              f"{chosen['bfloat16']:g} | {acc['float32']:.4f} | {acc['bfloat16']:.4f} | "
              f"{100 * (acc['bfloat16'] - acc['float32']):+.2f} points |")
        print(f"| {layer} | | fixed {chosen['float32']:g} | {fixed['float32']:.4f} | {fixed['bfloat16']:.4f} | "
              f"{100 * (fixed['bfloat16'] - fixed['float32']):+.2f} points |")
        diffs = []
        for seed in range(args.splits):
            got = {}
            for name, store in stores.items():
                train, _ = split_store(store, test_size=0.25, random_state=seed)
                got[name] = evaluate(fit(store, layer=layer, rows=train, C=chosen["float32"]), store).accuracy
            diffs.append(100 * (got["bfloat16"] - got["float32"]))
        print(f"| {layer} | | fixed {chosen['float32']:g}, {args.splits} splits | | | "
              f"{np.mean(diffs):+.2f} ± {np.std(diffs):.2f} points (per split: "
              f"{', '.join(f'{d:+.2f}' for d in diffs)}) |")
    if min(secs.values()) > 5:  # both really extracted in this run
        print(f"extraction: float32 {secs['float32']:.0f} s, bfloat16 {secs['bfloat16']:.0f} s "
              f"({secs['float32'] / secs['bfloat16']:.2f}x)")


if __name__ == "__main__":
    main()
