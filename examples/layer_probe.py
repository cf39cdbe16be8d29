"""Extract three layers of MobileNetV2 in one pass and compare them with a linear probe.

    python examples/layer_probe.py ../shared/datasets/flowers5 -o flowers5.h5

Re-running reuses the store: only new photos are extracted. Codes come back as numpy arrays
aligned with labels, ready for any scikit-learn estimator.
"""

import argparse

from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cnncodes import CodeStore, extract


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a folder with one subfolder per class")
    p.add_argument("-o", "--out", default="codes.h5")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--layers", nargs="+", default=["block3", "block4", "block5"])
    args = p.parse_args()

    result = extract(args.data, out=args.out, backbone=args.backbone, layers=args.layers)
    print(result.summary())
    store = CodeStore(args.out)
    y = store.labels
    keep = y >= 0
    print(f"\n{'layer':<8} {'dims':>5}  held-out accuracy (75/25 stratified split, random_state=0)")
    for layer in store.layers:
        X = store.codes(layer)[keep]
        X_train, X_test, y_train, y_test = train_test_split(
            X, y[keep], test_size=0.25, stratify=y[keep], random_state=0)
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000))
        model.fit(X_train, y_train)
        print(f"{layer:<8} {X.shape[1]:>5}  {model.score(X_test, y_test):.3f}")


if __name__ == "__main__":
    main()
