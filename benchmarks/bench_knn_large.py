"""Large-N kNN: recall@10 of FaissKNNClassifier's IVF and HNSW indexes against exact search.

Synthetic CNN-code-like data: 200,000 training and 2,000 query codes of 1280 dimensions
(MobileNetV2's pre-logits size). Real pooled CNN codes are not uniform noise: they are
mostly positive, lie near a low-dimensional manifold and cluster by class and by visual
mode. The generator imitates that: 100 classes x 10 modes placed in a 64-d latent space,
each point a mode centre plus gaussian spread, mapped to 1280-d by a random linear map,
plus isotropic noise, rectified. Its defaults were set so that its statistics match those of
real MobileNetV2 block5 codes of flowers5 (`--calibrate codes.h5` prints both): relative
contrast (mean distance / distance to the 10th neighbour, which sets how hard the search
is) 1.34 vs 1.36 at 896 points; principal components for 50 / 90 % of the variance 20 / 135
vs 16 / 168. `--latent-dim 1280 --noise 1` gives a much harder, isotropic case.

For each index and each query-time setting it prints build (fit) seconds, query seconds
for all queries, the speed-up against the exact flat index measured in the same run,
recall@10 (the share of the exact 10 nearest neighbours that the index finds) and the
agreement of the 10-NN majority vote with the exact one. The query-time settings
(``nprobe``, ``ef_search``) change through ``set_params`` without a refit.

    python benchmarks/bench_knn_large.py                           # 200k x 1280, 2k queries
    python benchmarks/bench_knn_large.py --n-train 20000 --quick   # a quick run
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import faiss
import numpy as np

from cnncodes._classify.knn import FaissKNNClassifier, default_nlist

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs


def code_like(n, dim=1280, *, n_classes=100, modes=10, latent_dim=64, spread=0.9, noise=0.5,
              offset=1.0, seed=0):
    """Return (X, y): clustered, low-intrinsic-dimension, non-negative float32 codes.

    Mode centres are standard normal in a `latent_dim`-d space; a point is its mode centre
    plus ``spread`` times standard normal noise there, mapped to `dim` dimensions by a
    fixed random matrix (unit variance per output), plus ``noise`` times isotropic noise,
    shifted by ``offset`` (pooled ReLU activations are mostly positive), rectified, and
    scaled per dimension by log-normal factors (some channels are far more active). Generated in blocks so that only the output is held in memory.
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_classes * modes, latent_dim)).astype(np.float32)
    proj = (rng.standard_normal((latent_dim, dim)) / np.sqrt(latent_dim)).astype(np.float32)
    scale = np.exp(0.5 * rng.standard_normal(dim)).astype(np.float32)
    mode = rng.integers(n_classes * modes, size=n)
    X = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 20_000):
        m = mode[start:start + 20_000]
        z = centers[m] + spread * rng.standard_normal((len(m), latent_dim), dtype=np.float32)
        block = z @ proj
        block += noise * rng.standard_normal(block.shape, dtype=np.float32) + offset
        np.maximum(block, 0, out=block)
        block *= scale
        X[start:start + len(m)] = block
    return X, mode // modes


def recall_at(found, exact):
    """Mean share of each query's exact neighbours that `found` holds too."""
    k = exact.shape[1]
    hits = (found[:, :, None] == exact[:, None, :]).any(axis=2).sum(axis=1)
    return float(np.mean(hits / k))


def vote(y, ind):
    """The majority label of each row of neighbour indices (ties: the smallest label)."""
    labels = y[ind]
    n_classes = int(y.max()) + 1
    counts = np.zeros((len(ind), n_classes), dtype=np.int32)
    np.add.at(counts, (np.repeat(np.arange(len(ind)), ind.shape[1]), labels.ravel()), 1)
    return counts.argmax(axis=1)


def data_stats(X):
    """(relative contrast at 10 neighbours, PCs for 50 % and 90 % of the variance, share of zeros)."""
    d2 = (X * X).sum(1)[:, None] + (X * X).sum(1)[None] - 2 * X @ X.T
    d = np.sqrt(np.maximum(d2, 0))
    np.fill_diagonal(d, np.inf)
    s = np.sort(d, axis=1)[:, :-1]
    ev = np.cumsum(np.linalg.svd(X - X.mean(0), compute_uv=False) ** 2)
    ev /= ev[-1]
    return (float(np.median(s, axis=1).mean() / s[:, 9].mean()), int(np.searchsorted(ev, 0.5)) + 1,
            int(np.searchsorted(ev, 0.9)) + 1, float(np.mean(X == 0)))


def calibrate(store_path, args, n=896):
    """Print the statistics of `n` random rows of a real store next to those of the generator."""
    from cnncodes import CodeStore

    store = CodeStore(store_path)
    real = store.codes(store.layers[-1]).astype(np.float32)
    real = real[np.random.default_rng(args.seed).permutation(len(real))[:n]]
    fake, _ = code_like(n, real.shape[1], n_classes=len(store.class_names), modes=10,
                        latent_dim=args.latent_dim, noise=args.noise, seed=args.seed)
    print("| data | relative contrast @10 | PCs for 50 % | PCs for 90 % | zeros |\n|---|---|---|---|---|")
    for name, X in ((f"{store.path.name} {store.layers[-1]}", real), ("code_like", fake)):
        print(f"| {name} | " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v)
                                          for v in data_stats(X)) + " |")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=200_000, help="training codes (200000)")
    parser.add_argument("--n-query", type=int, default=2_000, help="query codes (2000)")
    parser.add_argument("--dim", type=int, default=1280, help="code size (1280, MobileNetV2)")
    parser.add_argument("--latent-dim", type=int, default=64, help="intrinsic dimension (64)")
    parser.add_argument("--noise", type=float, default=0.5, help="isotropic noise (0.5)")
    parser.add_argument("--calibrate", metavar="STORE",
                        help="only compare the data's statistics with a real code store's")
    parser.add_argument("--k", type=int, default=10, help="neighbours for recall@k (10)")
    parser.add_argument("--metric", default="l2", choices=["l2", "cosine"])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--skip", choices=["ivf", "hnsw"], nargs="*", default=[])
    parser.add_argument("--quick", action="store_true", help="fewer settings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.calibrate:
        return calibrate(args.calibrate, args)
    if args.quick:
        args.nprobe, args.ef_search = [8, 32], [32, 128]

    (X, y), gen_s = timed(lambda: code_like(args.n_train + args.n_query, args.dim,
                                            latent_dim=args.latent_dim, noise=args.noise,
                                            seed=args.seed))
    X, Q, y = X[: args.n_train], X[args.n_train:], y[: args.n_train]
    k = args.k
    print(f"{cpu_name()}, {os.cpu_count()} cores, faiss {faiss.__version__} "
          f"({faiss.omp_get_max_threads()} threads), numpy {np.__version__}\n"
          f"{args.n_train} x {args.dim} float32 training codes (latent dim {args.latent_dim}, "
          f"noise {args.noise}), {args.n_query} queries, metric {args.metric}, recall@{k}; "
          f"data made in {gen_s:.1f} s\n", flush=True)

    rows = []  # (index, settings, build s, query s, recall, vote agreement)
    # The reference is faiss's float32 flat search, as in the recorded tables (the bfloat16
    # search gives the same neighbours faster on CPUs with native bfloat16: bench_knn.py).
    flat = FaissKNNClassifier(metric=args.metric, precision="float32")
    _, build_s = timed(lambda: flat.fit(X, y))
    exact, exact_s = timed(lambda: flat.kneighbors(Q, n_neighbors=k, return_distance=False))
    exact_vote = vote(y, exact)
    rows.append(("flat (exact, float32)", "", build_s, exact_s, 1.0, 1.0))
    print(f"flat: build {build_s:.1f} s, query {exact_s:.2f} s", flush=True)
    flat = None  # free the index before building the next one
    gc.collect()

    plans = [("ivf", {}, [{"nprobe": p} for p in args.nprobe]),
             ("hnsw", {"hnsw_m": args.hnsw_m}, [{"ef_search": e} for e in args.ef_search])]
    for index, build_params, query_params in plans:
        if index in args.skip:
            continue
        clf = FaissKNNClassifier(metric=args.metric, index=index, **build_params)
        _, build_s = timed(lambda: clf.fit(X, y))
        built = ", ".join([f"nlist={clf.nlist_}"] if index == "ivf" else
                          [f"M={args.hnsw_m}"])
        print(f"{index} ({built}): build {build_s:.1f} s", flush=True)
        for params in query_params:
            clf.set_params(**params)  # query-time settings: no refit
            found, query_s = timed(lambda: clf.kneighbors(Q, n_neighbors=k, return_distance=False))
            recall = recall_at(found, exact)
            agree = float(np.mean(vote(y, found) == exact_vote))
            settings = f"{built}, " + ", ".join(f"{a}={v}" for a, v in params.items())
            rows.append((index, settings, build_s, query_s, recall, agree))
            print(f"  {settings}: query {query_s:.2f} s, recall@{k} {recall:.3f}, "
                  f"vote agreement {agree:.3f}", flush=True)
        clf = None
        gc.collect()

    defaults = FaissKNNClassifier()
    print(f"\ndefaults: nprobe={defaults.nprobe}, ef_search={defaults.ef_search}, "
          f"hnsw_m={defaults.hnsw_m}, nlist=None -> {default_nlist(args.n_train)} here\n")
    print(f"| index | settings | build s | query s ({args.n_query} queries) | speed-up vs exact "
          f"| recall@{k} | 10-NN vote = exact |")
    print("|---|---|---|---|---|---|---|")
    for index, settings, build_s, query_s, recall, agree in rows:
        print(f"| {index} | {settings} | {build_s:.1f} | {query_s:.2f} | {exact_s / query_s:.1f}x "
              f"| {recall:.3f} | {agree:.3f} |")


if __name__ == "__main__":
    main()
