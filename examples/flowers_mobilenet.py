"""The flowers tutorial with CNN codes: two MobileNetV2 layers, three classifiers, a model file.

    python examples/flowers_mobilenet.py ../shared/datasets/flowers5 --store flowers5.h5

Extracts block4 and block5 in one pass, splits the store 75/25 (stratified; identical photos
stay on one side), fits a logistic regression, a linear SVM and a kNN (cosine) on each layer,
and scores them on the held-out photos. The best one is saved to a .skops file, loaded back
(without unpickling) and used to classify three held-out photos, which extracts them anew.

--limit N uses the first N photos (by name) of each class, for a quick run.
"""

import argparse
import time
from pathlib import Path

import numpy as np

from cnncodes import CodeStore, extract, fit, load, predict, save, split_store

from _common import photos  # examples/ is on sys.path when a script runs




def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a folder with one subfolder per class")
    p.add_argument("--store", default="flowers5.h5")
    p.add_argument("--model", default="flowers5.skops", help="where to save the best model")
    p.add_argument("--limit", type=int, help="the first N photos of each class (quick runs)")
    args = p.parse_args()

    items = photos(args.data, args.limit)
    result = extract([path for path, _ in items], labels=[c for _, c in items], out=args.store,
                     layers=["block4", "block5"], root=args.data)
    print(result.summary())
    store = CodeStore(args.store)
    # The store may hold more photos than this run (an earlier, larger run): split it all,
    # then keep this run's photos, so that a photo is on the same side in every run.
    ids = {path.relative_to(args.data).as_posix() for path, _ in items}
    mine = np.flatnonzero([rid in ids for rid in store.ids])
    train, test = (rows[np.isin(rows, mine)] for rows in split_store(store, test_size=0.25))
    # CodeStore's properties read the file on each access: read them once.
    store_ids, labels = store.ids, np.array(store.class_names)[store.labels]
    y_test = labels[test]
    print(f"\n{len(train)} train / {len(test)} test photos; C of the linear models by 5-fold CV")

    print(f"\n{'layer':<7} {'classifier':<11} {'dims':>5} {'C':>7} {'fit s':>6}  test accuracy")
    scores = {}
    for layer in ["block4", "block5"]:
        X_test = store.codes(layer)[test]
        for classifier in ["logreg", "linear_svm", "knn"]:
            t = time.perf_counter()
            model = fit(store, layer=layer, classifier=classifier, rows=train)
            seconds = time.perf_counter() - t
            acc = float(np.mean(model.predict(X_test) == y_test))
            scores[layer, classifier] = acc, model
            C = model.cnncodes_["fit"].get("C")
            print(f"{layer:<7} {classifier:<11} {X_test.shape[1]:>5} {'-' if C is None else f'{C:.2g}':>7} "
                  f"{seconds:>6.1f}  {acc:.4f}")

    (layer, classifier), (acc, best) = max(scores.items(), key=lambda kv: kv[1][0])
    path = save(best, args.model)
    print(f"\nbest: {classifier} on {layer} ({acc:.4f}); saved to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    model = load(path)

    # One held-out photo of each of the first three classes, classified from the file alone.
    firsts = {}
    for r in test:
        firsts.setdefault(labels[r], r)
    chosen = [firsts[c] for c in sorted(firsts)[:3]]
    files = [str(Path(args.data, store_ids[r])) for r in chosen]
    true = {Path(f).name: labels[r] for f, r in zip(files, chosen)}
    print(f"\ntop-3 of {len(files)} held-out photos with the reloaded model:")
    for pred in predict(model, files, top_k=3):
        top = ", ".join(f"{label} {p:.3f}" for label, p in zip(pred.labels, pred.probabilities))
        print(f"  {pred.id} (true: {true[Path(pred.id).name]}): {top}")


if __name__ == "__main__":
    main()
