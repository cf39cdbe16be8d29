"""kNN benchmark: FaissKNNClassifier (flat, IVF, HNSW) vs KNeighborsClassifier(algorithm="brute").

Synthetic CNN-code-like data (clustered gaussians, rectified, float32, 10 classes). Measures
fit + predict seconds in the same run (the exact searches in --repeats interleaved rounds:
medians, and the range of the per-round ratios), asserts that the exact flat index predicts the same
labels as scikit-learn in float32 (faiss) and in bfloat16 (candidates, float64 re-ranking), and gives recall@10 of the approximate indexes against the exact one.
Prints a markdown table.

    python benchmarks/bench_knn.py                                  # 50k x 1280, 10k queries
    python benchmarks/bench_knn.py --n-train 5000 --n-query 1000    # a quick run
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import sklearn
from sklearn.neighbors import KNeighborsClassifier

import faiss
from cnncodes._classify.knn import FaissKNNClassifier

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs


def synthetic_codes(n, dim, n_classes=10, modes=4, sep=0.5, seed=0):
    """Codes with a few gaussian modes per class, rectified like pooled CNN activations.

    The spread of the mode centres shrinks as dim**-0.25, so that the task is about as hard
    at --dim 128 as at 1280 (a kNN margin grows with sqrt(dim) times the centre spread squared).
    """
    rng = np.random.default_rng(seed)
    scale = sep * (128 / dim) ** 0.25
    centers = rng.normal(scale=scale, size=(n_classes, modes, dim)).astype(np.float32)
    y = rng.integers(n_classes, size=n)
    X = rng.standard_normal(size=(n, dim), dtype=np.float32)
    X += centers[y, rng.integers(modes, size=n)]
    np.maximum(X, 0, out=X)
    return X, y


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def recall_at(found, exact):
    k = exact.shape[1]
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found, exact)]))



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=50_000, help="training codes (50000)")
    parser.add_argument("--n-query", type=int, default=10_000, help="query codes (10000)")
    parser.add_argument("--dim", type=int, default=1280, help="code size (1280, MobileNetV2)")
    parser.add_argument("--n-neighbors", type=int, default=5, help="k of the vote (5)")
    parser.add_argument("--sep", type=float, default=0.5, help="spread of the class modes (0.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds of the exact searches; the table gives medians, "
                             "and each ratio's range over the rounds (3)")
    args = parser.parse_args(argv)

    X, y = synthetic_codes(args.n_train + args.n_query, args.dim, sep=args.sep, seed=args.seed)
    X, Q, y, yq = X[: args.n_train], X[args.n_train :], y[: args.n_train], y[args.n_train :]
    k = args.n_neighbors
    print(
        f"{cpu_name()}, {os.cpu_count()} cores · faiss {faiss.__version__} · scikit-learn "
        f"{sklearn.__version__} · numpy {np.__version__}\n"
        f"train {args.n_train} x {args.dim} float32, {args.n_query} queries, 10 classes, "
        f"k = {k}\n",
        flush=True,
    )

    rows = []  # (method, fit s, predict s, recall@10, accuracy)

    from cnncodes._extract.accel import cpu_has_fast_bf16

    native = cpu_has_fast_bf16()
    print(f"native bfloat16 units: {'yes' if native else 'no (the bfloat16 search is emulated: slow)'}")
    # The exact searches run in interleaved rounds (sklearn, float32, bfloat16, sklearn, ...),
    # so that each round's ratios compare runs minutes apart at most; the table gives medians.
    exact = {"sklearn": [], "float32": [], "bfloat16": []}  # name -> [(fit s, predict s)]
    for r in range(args.repeats):
        ref = KNeighborsClassifier(n_neighbors=k, algorithm="brute")
        _, fit_s = timed(lambda: ref.fit(X, y))
        ref_pred, predict_s = timed(lambda: ref.predict(Q))
        exact["sklearn"].append((fit_s, predict_s))
        print(f"round {r + 1}: sklearn fit {fit_s:.2f} s, predict {predict_s:.2f} s", flush=True)
        for precision in ("float32", "bfloat16"):
            flat = FaissKNNClassifier(n_neighbors=k, precision=precision)
            _, fit_s = timed(lambda: flat.fit(X, y))
            pred, predict_s = timed(lambda: flat.predict(Q))
            n_diff = int(np.sum(pred != ref_pred))
            assert n_diff == 0, f"flat index ({precision}) and sklearn disagree on {n_diff} of {len(Q)} queries"
            exact[precision].append((fit_s, predict_s))
            print(f"round {r + 1}: flat {precision} fit {fit_s:.2f} s, predict {predict_s:.2f} s "
                  f"({sum(exact['sklearn'][-1]) / (fit_s + predict_s):.1f}x); same labels as sklearn",
                  flush=True)
    stats = flat._cache["bfloat16"].stats
    names = {
        "sklearn": "sklearn KNeighborsClassifier(algorithm='brute')",
        "float32": "FaissKNNClassifier(index='flat', precision='float32')",
        "bfloat16": (f"FaissKNNClassifier(index='flat', precision='bfloat16')"
                     f"{' (the default here)' if native else ''}; {stats['retried']} queries "
                     f"re-searched, {stats['brute_force']} by float64 brute force"),
    }
    base = [sum(t) for t in exact["sklearn"]]
    for key, times in exact.items():
        ratios = [b / sum(t) for b, t in zip(base, times)]
        spread = f" ({min(ratios):.1f}-{max(ratios):.1f}x)" if len(ratios) > 1 and key != "sklearn" else ""
        rows.append((names[key], float(np.median([t[0] for t in times])),
                     float(np.median([t[1] for t in times])), None if key == "sklearn" else "exact",
                     np.mean((ref_pred if key == "sklearn" else pred) == yq),
                     f"{np.median(ratios):.1f}x{spread}"))
    exact10 = flat.kneighbors(Q, n_neighbors=10, return_distance=False)

    for index, query_params in [
        ("ivf", [{"nprobe": 8}, {"nprobe": 32}]),
        ("hnsw", [{"ef_search": 64}, {"ef_search": 128}]),
    ]:
        clf = FaissKNNClassifier(n_neighbors=k, index=index)
        _, fit_s = timed(lambda: clf.fit(X, y))
        for params in query_params:
            clf.set_params(**params)  # query-time parameters: no refit
            pred, predict_s = timed(lambda: clf.predict(Q))
            recall = recall_at(clf.kneighbors(Q, n_neighbors=10, return_distance=False), exact10)
            extra = f", nlist={clf.nlist_}" if index == "ivf" else ""
            settings = ", ".join(f"{a}={v}" for a, v in params.items())
            name = f"FaissKNNClassifier(index='{index}', {settings}{extra})"
            rows.append((name, fit_s, predict_s, f"{recall:.3f}", np.mean(pred == yq), None))
            print(f"{index} {params}: fit {fit_s:.2f} s, predict {predict_s:.2f} s, recall@10 "
                  f"{recall:.3f}", flush=True)

    base = float(np.median(base))
    print("\n| method | fit s | predict s | fit + predict s | speed vs sklearn | recall@10 | accuracy |")
    print("|---|---|---|---|---|---|---|")
    for name, fit_s, predict_s, recall, acc, speed in rows:
        total = fit_s + predict_s
        print(f"| {name} | {fit_s:.2f} | {predict_s:.2f} | {total:.2f} | {speed or f'{base / total:.1f}x'} | "
              f"{recall or '(reference)'} | {acc:.3f} |")


if __name__ == "__main__":
    main()
