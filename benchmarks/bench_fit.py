"""Fit time of the linear classifiers at 50k x 1280 (synthetic codes), and the tutorial's default.

`cnncodes.fit` with a fixed C (one fit) and with C="auto" (cross-validated), against the
plain `make_pipeline(StandardScaler(), LogisticRegression())` every tutorial writes, on the
same data in the same run; with held-out accuracy so speed is not bought with accuracy.

    python benchmarks/bench_fit.py                       # 50k x 1280
    python benchmarks/bench_fit.py --n-train 5000        # a quick run
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs
from bench_knn import synthetic_codes


def main(argv=None):
    from cnncodes import fit

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--auto", action="store_true", help="also time C='auto' (5-fold CV over the C grid)")
    args = p.parse_args(argv)
    X, y = synthetic_codes(args.n_train + args.n_test, args.dim)
    X, Xt, y, yt = X[: args.n_train], X[args.n_train:], y[: args.n_train], y[args.n_train:]
    print(f"# {cpu_name()}, {os.cpu_count()} cores, scikit-learn {sklearn.__version__}; "
          f"{args.n_train} x {args.dim} float32 train, {args.n_test} test, 10 classes")
    print(f"# command: python benchmarks/bench_fit.py --n-train {args.n_train}" + (" --auto" if args.auto else ""))
    runs = [("tutorial: StandardScaler + LogisticRegression() (C=1, lbfgs)",
             lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X, y))]
    for clf in ("logreg", "linear_svm"):
        c = 0.01 if clf == "logreg" else 0.001
        runs.append((f"cnncodes fit(classifier='{clf}', C={c})",
                     lambda clf=clf, c=c: fit(X, y, classifier=clf, C=c)))
        if args.auto:
            runs.append((f"cnncodes fit(classifier='{clf}', C='auto')",
                         lambda clf=clf: fit(X, y, classifier=clf)))
    rows = []
    for name, make in runs:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = make()
        secs = time.perf_counter() - t0
        rows.append((name, secs, float(np.mean(model.predict(Xt) == yt))))
        print(f"{name}: {secs:.1f} s", flush=True)
    base = rows[0][1]
    print("| fit | seconds | vs tutorial | held-out accuracy |")
    print("|---|---|---|---|")
    for name, secs, acc in rows:
        print(f"| {name} | {secs:.1f} | {secs / base:.2f}x time | {acc:.3f} |")


if __name__ == "__main__":
    main()
