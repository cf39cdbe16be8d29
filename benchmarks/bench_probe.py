"""The linear probe, new protocol vs today's, on stored codes: held-out accuracy with intervals.

Today's protocol (cnncodes before issue 18): standardised codes, logistic regression with C
picked by LogisticRegressionCV over half decades of 1e-4 ... 10, plain stratified 5-fold CV.
The new one: ``fit(..., C="auto")``: every decade of 1e-6 ... 1e5 (warm-started, stopped three
decades past the best), then quarter decades around the best, folds grouped by content, refit on
all training rows. Both run on the same feature variants: block5 or block4+block5, with or without
``normalize="power"``, with or without the mirror images' codes as extra training rows.

The split is `split_store(test_size=0.25, random_state=0)`; the default is chosen on the
cross-validation accuracy of the training rows, never on the held-out quarter. Intervals: 95 %
percentile bootstrap over the held-out rows (2,000 resamples); for the difference new - today,
a paired bootstrap on the same resamples.

    python benchmarks/bench_probe.py STORE MIRROR_STORE [--name flowers5] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
import warnings

import numpy as np
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from cnncodes import CodeStore, fit, split_store
from cnncodes._classify.fit import _augment_rows, _half_decades, _normalizer, layer_codes

TODAY_GRID = _half_decades(-4, 1)  # the grid C="auto" searched for logreg before
BOOT = 2000


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("Model name")), platform.processor())
    return line.split(":", 1)[-1].strip()


def today(store, layer, rows, normalize, augment, jobs):
    """Today's protocol on the same features: LogisticRegressionCV, ungrouped stratified folds."""
    X = layer_codes(store, layer)[rows]
    y = np.array(store.class_names, dtype=object)[store.labels[rows]].astype(str)
    if augment is not None:
        Xa, keep, _ = _augment_rows(store, augment, layer, rows)
        X, y = np.vstack([X, Xa]), np.concatenate([y, y[keep]])
    steps = [("normalize", _normalizer(normalize, store, layer))] if normalize else []
    prefix = Pipeline([*steps, ("scale", StandardScaler())]).fit(X)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        search = LogisticRegressionCV(Cs=list(TODAY_GRID), cv=folds, max_iter=3000, n_jobs=jobs,
                                      scoring="accuracy").fit(prefix.transform(X), y)
    cv = float(np.mean([s.mean(axis=0) for s in search.scores_.values()], axis=0).max())
    return Pipeline([*prefix.steps, ("logreg", search)]), float(search.C_[0]), cv


def bootstrap(correct: np.ndarray, base: np.ndarray | None, seed: int = 0):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(correct), size=(BOOT, len(correct)))
    acc = correct[idx].mean(1)
    lo, hi = np.percentile(acc, [2.5, 97.5])
    if base is None:
        return (lo, hi), None
    diff = acc - base[idx].mean(1)
    return (lo, hi), tuple(np.percentile(diff, [2.5, 97.5]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("mirror")
    ap.add_argument("--name", default="flowers5")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    store = CodeStore(args.store)
    train, test = split_store(store, test_size=0.25, random_state=0)
    y_test = np.array(store.class_names, dtype=object)[store.labels[test]].astype(str)
    print(f"{args.name}: {len(train)} training rows, {len(test)} held-out rows; CPU {cpu_model()}", flush=True)
    rows_out = []
    for layer in (["block5"], ["block4", "block5"]):
        for normalize in (None, "power"):
            for augment in (None, args.mirror):
                X_test = layer_codes(store, layer)[test]
                t = time.perf_counter()
                old, old_c, old_cv = today(store, layer if len(layer) > 1 else layer[0], train, normalize,
                                           augment, args.jobs)
                old_s = time.perf_counter() - t
                old_ok = old.predict(X_test) == y_test
                t = time.perf_counter()
                new = fit(store, layer=layer if len(layer) > 1 else layer[0], rows=train, normalize=normalize,
                          augment=augment, n_jobs=args.jobs)
                new_s = time.perf_counter() - t
                info = new.cnncodes_["fit"]
                new_ok = new.predict(X_test) == y_test
                (olo, ohi), _ = bootstrap(old_ok.astype(float), None)
                (nlo, nhi), (dlo, dhi) = bootstrap(new_ok.astype(float), old_ok.astype(float))
                row = dict(layer="+".join(layer), normalize=normalize or "none", flip_rows=augment is not None,
                           today_C=old_c, today_cv=old_cv, today_acc=float(old_ok.mean()), today_ci=(olo, ohi),
                           today_s=old_s, new_C=info["C"], new_cv=info["cv_scores"][f"{info['C']:g}"],
                           new_acc=float(new_ok.mean()), new_ci=(nlo, nhi), diff_ci=(dlo, dhi), new_s=new_s,
                           searched=len(info["cv_scores"]))
                rows_out.append(row)
                print(json.dumps(row), flush=True)
    print()
    print(f"| layer | normalize | mirror rows | today: C (CV) | today held-out [95 % CI] | new: C (CV) "
          f"| new held-out [95 % CI] | new - today [95 % CI] | fit s today / new |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['layer']} | {r['normalize']} | {'yes' if r['flip_rows'] else 'no'} "
              f"| {r['today_C']:.3g} ({r['today_cv']:.3f}) | {r['today_acc']:.3f} [{r['today_ci'][0]:.3f}, {r['today_ci'][1]:.3f}] "
              f"| {r['new_C']:.3g} ({r['new_cv']:.3f}) | {r['new_acc']:.3f} [{r['new_ci'][0]:.3f}, {r['new_ci'][1]:.3f}] "
              f"| {r['new_acc'] - r['today_acc']:+.3f} [{r['diff_ci'][0]:+.3f}, {r['diff_ci'][1]:+.3f}] "
              f"| {r['today_s']:.0f} / {r['new_s']:.0f} |")
    best = max(rows_out, key=lambda r: r["new_cv"])
    print(f"\nbest by CV on the training rows (new protocol): {best['layer']}, normalize {best['normalize']}, "
          f"mirror rows {'yes' if best['flip_rows'] else 'no'} (CV {best['new_cv']:.3f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows_out, fh, indent=1)


if __name__ == "__main__":
    main()
