"""The cats-vs-dogs tutorial layout, done with CNN codes: extract once, fit a linear classifier.

    python examples/train_validation_folders.py ../shared/datasets/flowers5 -o tv-codes/

DATA/train/<class>/ and DATA/validation/<class>/ are used as they are. A folder with one
subfolder per class (flowers5) is first split 80/20 per class (random_state 0) into that
layout, with symlinks in a temporary folder. Each split is extracted with MobileNetV2 into
its own store (OUT/train.h5, OUT/validation.h5); a logistic regression (C chosen by 5-fold
cross-validation) learns on the train codes and is scored on the validation codes. Every
step is timed: re-running finds the codes stored and skips the extraction.

--limit N takes the first N photos (by name) of each class, before the split, for a quick run.
--train-store and --validation-store may name the same store, e.g. one made from the unsplit
folder with the same settings: rows are picked by id, so a store holding more photos is only
read (ids are paths relative to each split folder, such as daisy/123.jpg).
"""

import time

START = time.perf_counter()  # before the heavy imports (torch), to report the whole run

import argparse
import tempfile
from pathlib import Path

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix
from sklearn.model_selection import train_test_split

from cnncodes import CodeStore, extract, fit

from _common import photos  # examples/ is on sys.path when a script runs




def make_layout(data, tmp, limit):
    """Symlink an 80/20 stratified split of data/<class>/ into tmp/train and tmp/validation."""
    items = photos(data, limit)
    train, val = train_test_split(items, test_size=0.2, stratify=[c for _, c in items], random_state=0)
    for split, part in (("train", train), ("validation", val)):
        for path, label in part:
            link = Path(tmp, split, label, path.name)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
    return Path(tmp)


def extract_split(folder, store, items, layers, whole):
    """Extract the photos of folder/<class>/ into `store`; return the seconds it took."""
    t = time.perf_counter()
    if whole:  # the folder itself: ids are paths relative to it, labels its subfolders
        result = extract(folder, out=store, layers=layers)
    else:
        result = extract([p for p, _ in items], labels=[c for _, c in items], out=store,
                         layers=layers, root=folder)
    print(result.summary())
    return time.perf_counter() - t


def rows_of(store, ids):
    """Store rows of the given ids (a store may hold more images; failed ones are missing)."""
    where = {rid: k for k, rid in enumerate(store.ids)}
    return np.array([where[i] for i in ids if i in where])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="DATA/train/<class>/ and DATA/validation/<class>/, or DATA/<class>/")
    p.add_argument("-o", "--out", default="tv-codes", help="folder of train.h5 and validation.h5")
    p.add_argument("--train-store", help="default OUT/train.h5")
    p.add_argument("--validation-store", help="default OUT/validation.h5")
    p.add_argument("--limit", type=int, help="the first N photos of each class (quick runs)")
    args = p.parse_args()
    train_store = args.train_store or Path(args.out, "train.h5")
    val_store = args.validation_store or Path(args.out, "validation.h5")
    # A store is extended with its own layer set: asking an existing store for fewer layers is
    # refused (settings are never mixed), and extra layers cost nothing in the same forward pass.
    layers = CodeStore(train_store).layers if Path(train_store).exists() else ["block5"]
    times = {}

    data = Path(args.data)
    with tempfile.TemporaryDirectory(prefix="train-validation-") as tmp:
        limit = args.limit
        if not (data / "train").is_dir() or not (data / "validation").is_dir():
            t = time.perf_counter()
            data = make_layout(data, tmp, limit)
            times["make the train/validation layout"] = time.perf_counter() - t
            print(f"{args.data} has no train/ and validation/ folders: made them in {tmp} with "
                  f"symlinks, a stratified 80/20 split per class (random_state=0).")
            limit = None  # applied before the split
        train, val = photos(data / "train", limit), photos(data / "validation", limit)
        train_ids = [p.relative_to(data / "train").as_posix() for p, _ in train]
        val_ids = [p.relative_to(data / "validation").as_posix() for p, _ in val]
        # Ids are paths relative to each split folder: one store can hold both splits only
        # when no file name occurs in both.
        if Path(train_store).resolve() == Path(val_store).resolve() and set(train_ids) & set(val_ids):
            raise SystemExit("train/ and validation/ share file names, so one store cannot hold "
                             "both: give them separate stores.")
        print(f"\n== extract {len(train)} train photos ({', '.join(layers)}) into {train_store}")
        times["extract train"] = extract_split(data / "train", train_store, train, layers, limit is None)
        print(f"\n== extract {len(val)} validation photos into {val_store}")
        times["extract validation"] = extract_split(data / "validation", val_store, val, layers,
                                                    limit is None)

    layer = "block5"
    t = time.perf_counter()
    train_rows = rows_of(CodeStore(train_store), train_ids)
    model = fit(train_store, layer=layer, classifier="logreg", rows=train_rows)
    times["fit logistic regression (C by 5-fold CV)"] = time.perf_counter() - t
    print(f"\n== logistic regression on {len(train_rows)} train codes ({layer}), "
          f"C={model.cnncodes_['fit']['C']:g}")

    t = time.perf_counter()
    store = CodeStore(val_store)
    rows = rows_of(store, val_ids)
    y = np.array(store.class_names)[store.labels[rows]]
    pred = model.predict(store.codes(layer)[rows])
    times["predict validation"] = time.perf_counter() - t
    classes = list(model.classes_)
    print(f"validation accuracy {np.mean(pred == y):.4f} on {len(y)} photos\n")
    print(classification_report(y, pred, digits=3))
    print("confusion matrix (rows: true, columns: predicted)")
    print(" " * 12 + "".join(f"{c[:9]:>10}" for c in classes))
    for c, row in zip(classes, confusion_matrix(y, pred, labels=classes)):
        print(f"{c:<12}" + "".join(f"{v:>10d}" for v in row))

    print("\n== times (this run, measured)")
    for step, seconds in times.items():
        print(f"{seconds:8.1f} s  {step}")
    print(f"{sum(times.values()):8.1f} s  these steps")
    print(f"{time.perf_counter() - START:8.1f} s  the whole run, imports (torch) and printing included")


if __name__ == "__main__":
    main()
