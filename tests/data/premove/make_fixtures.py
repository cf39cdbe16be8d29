"""Make the "before the package layout moved" fixtures of this folder with the cnncodes of
commit d89ae46 (flat modules: ``cnncodes._knn``, ``cnncodes._fit``, ``cnncodes._transformer``).

Files written before the move name those modules: a kNN model file records
``cnncodes._knn.FaissKNNClassifier`` and ``cnncodes._fit.CodeNormalizer``; a pickled
scikit-learn pipeline records ``cnncodes._transformer.CNNCodes``. `tests/test_compat.py`
checks that they keep loading and give the predictions listed in ``expected.json``.
Run against a worktree of that commit::

    cd /work/main && git worktree add /tmp/premove d89ae46
    PYTHONPATH=/tmp/premove CNNCODES_OFFLINE=1 CNNCODES_WEIGHTS_PATH=<the offline weights folder> \\
        /work/main/.venv/bin/python /work/main/tests/data/premove/make_fixtures.py

Inputs: the frozen v1 store beside this folder (``../v1/codes.h5``) and the bundled sample.
"""

import json
import pickle
import sys
from pathlib import Path

import numpy as np

import cnncodes

HERE = Path(__file__).resolve().parent


def main(out: Path) -> None:
    if not (Path(cnncodes.__file__).parent / "_knn.py").is_file():
        sys.exit(f"cnncodes at {cnncodes.__file__} has no flat _knn.py: run this against commit d89ae46.")
    store = cnncodes.CodeStore(HERE.parent / "v1" / "codes.h5")
    knn = cnncodes.fit(store, classifier="knn", layer="block5", normalize="l2", n_jobs=1)
    cnncodes.save(knn, out / "knn.skops")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    sample = Path(str(cnncodes.sample_dir()))
    photos = sorted(str(p) for p in sample.rglob("*.jpg"))[::4]
    labels = [Path(p).parent.name for p in photos]
    pipe = make_pipeline(cnncodes.CNNCodes(layer="block5", image_size=96, precision="float32", progress=False),
                         LogisticRegression(max_iter=2000))
    pipe.fit(photos, labels)
    with open(out / "pipeline.pkl", "wb") as fh:
        pickle.dump(pipe, fh)
    rel = [str(Path(p).relative_to(sample)) for p in photos]
    expected = {
        "knn_predictions": [str(c) for c in cnncodes.load(out / "knn.skops").estimator.predict(store.codes("block5"))],
        "pipeline_photos": rel,
        "pipeline_predictions": [str(c) for c in pipe.predict(photos)],
        "pipeline_proba": np.round(pipe.predict_proba(photos), 6).tolist(),
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=1))
    print(json.dumps(expected)[:300])


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
