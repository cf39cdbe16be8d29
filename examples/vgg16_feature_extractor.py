"""VGG16 as a fixed feature extractor: fc2 and block5 codes, a logistic regression on each.

    python examples/vgg16_feature_extractor.py ../shared/datasets/flowers5 --limit 40

The classic recipe: run every photo through ImageNet VGG16 once, keep the 4096-d fc2
activations (the default layer, the input of the ImageNet classifier) or the last pooled
conv block (block5, 512x7x7, average-pooled to 512), and train a linear classifier on them.
Both layers come from one forward pass; the codes are kept in --store, so a re-run is free.

--weights imagenet (default) uses torchvision's original VGG16 weights, vgg16-397923af.pth:
on a normal machine it is downloaded once (~530 MB) into the torch hub cache; offline, put
the file in a folder of CNNCODES_WEIGHTS_PATH. --weights PATH takes a local state-dict
checkpoint. --weights random builds the network with random weights, to check that the
pipeline runs: its accuracy says nothing about VGG16.
VGG16 is slow on a CPU (about 15 GFLOPs a photo): --limit N keeps N photos per class.
"""

import argparse
from pathlib import Path

import numpy as np

from cnncodes import CodeStore, extract, fit, split_store

from _common import photos  # examples/ is on sys.path when a script runs

RANDOM_WARNING = """
!!! --weights random: VGG16 with RANDOM weights. The codes below come from an untrained
!!! network, so the accuracies only show that the pipeline runs; they are meaningless as
!!! a measure of VGG16 features. Use --weights imagenet (or a checkpoint) for real results.
"""



def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a folder with one subfolder per class")
    p.add_argument("--weights", default="imagenet", help="imagenet | random | PATH of a checkpoint")
    p.add_argument("--store", help="default vgg16-WEIGHTS.h5 (codes of other weights never mix)")
    p.add_argument("--limit", type=int, help="the first N photos of each class (quick runs)")
    args = p.parse_args()
    weights = None if args.weights == "random" else args.weights  # None: random, on request only
    store_path = args.store or f"vgg16-{Path(args.weights).stem}.h5"
    if weights is None:
        print(RANDOM_WARNING)

    items = photos(args.data, args.limit)
    result = extract([path for path, _ in items], labels=[c for _, c in items], out=store_path,
                     backbone="vgg16", layers=["block5", "fc2"], weights=weights, root=args.data)
    print(result.summary())
    store = CodeStore(store_path)
    # Split the whole store, then keep this run's photos (the store may hold an earlier,
    # larger run), so that a photo lands on the same side in every run.
    ids = {path.relative_to(args.data).as_posix() for path, _ in items}
    mine = np.flatnonzero([rid in ids for rid in store.ids])
    train, test = (rows[np.isin(rows, mine)] for rows in split_store(store, test_size=0.25))
    y_test = np.array(store.class_names)[store.labels[test]]

    print(f"\nlogistic regression (C by 5-fold CV), {len(train)} train / {len(test)} test photos, "
          f"{len(store.class_names)} classes, weights {store.spec.weights.id}")
    print(f"{'layer':<7} {'dims':>5} {'C':>7}  test accuracy")
    for layer in ["fc2", "block5"]:
        model = fit(store, layer=layer, rows=train)
        X_test = store.codes(layer)[test]
        acc = np.mean(model.predict(X_test) == y_test)
        print(f"{layer:<7} {X_test.shape[1]:>5} {model.cnncodes_['fit']['C']:>7g}  {acc:.4f}")
    if weights is None:
        print(RANDOM_WARNING)


if __name__ == "__main__":
    main()
