"""Image retrieval with faiss: the photos of a folder nearest to a query photo, by cosine similarity.

    python examples/knn_retrieval.py ../shared/datasets/flowers5 \\
        --query ../shared/datasets/flowers5/sunflower/1022552002_2b93faf9e7_n.jpg -o neighbours.png

The folder's block5 codes (MobileNetV2, average-pooled) go into --store; a FaissKNNClassifier
with metric="cosine" indexes them (rows L2-normalised, exact inner-product search). The
query is extracted on its own, so it may lie outside the folder; photos with the query's
content (the query itself, or a copy) are left out of its neighbours. The k nearest are
printed with their cosine similarity and drawn in a contact sheet: the query on the left,
the neighbours in a row, titled with their class and similarity.

--limit N indexes the first N photos (by name) of each class, for a quick run.
"""

import argparse
import hashlib
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write the PNG without a display
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image, ImageOps

from cnncodes import CodeStore, FaissKNNClassifier, extract

from _common import photos  # examples/ is on sys.path when a script runs




def show(ax, path, title, **style):
    ax.imshow(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    ax.set_title(title, fontsize=9, **style)
    ax.axis("off")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a folder with one subfolder per class")
    p.add_argument("--query", required=True, help="the query photo (inside the folder or not)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--store", default="retrieval.h5")
    p.add_argument("-o", "--out", default="neighbours.png")
    p.add_argument("--limit", type=int, help="the first N photos of each class (quick runs)")
    args = p.parse_args()
    # An existing store is extended with its own layer set (a store refuses a run asking for
    # other layers, even fewer); block5 must be among them.
    layers = CodeStore(args.store).layers if Path(args.store).exists() else ["block5"]

    items = photos(args.data, args.limit)
    result = extract([path for path, _ in items], labels=[c for _, c in items], out=args.store,
                     layers=layers, root=args.data)
    print(result.summary())
    store = CodeStore(args.store)
    ids = {path.relative_to(args.data).as_posix() for path, _ in items}
    rows = np.flatnonzero([rid in ids for rid in store.ids])  # this run's photos only
    # CodeStore's properties read the file on each access: read them once.
    store_ids, shas, labels = store.ids, store.sha256, np.array(store.class_names)[store.labels]
    index = FaissKNNClassifier(metric="cosine").fit(store.codes("block5")[rows], labels[rows])

    # The query's code, with the store's settings (a temporary store of one row).
    with tempfile.TemporaryDirectory() as tmp:
        extract([args.query], out=Path(tmp, "query.h5"), **store.spec.narrow("block5").extract_kwargs(),
                progress=False)
        query = CodeStore(Path(tmp, "query.h5")).codes("block5")
    sha = hashlib.sha256(Path(args.query).read_bytes()).hexdigest()
    same = int(np.sum(shas[rows] == sha))  # the query itself (or copies) in the index
    dist, nearest = index.kneighbors(query, n_neighbors=min(args.k + same, len(rows)))
    hits = [(rows[i], 1 - d) for d, i in zip(dist[0], nearest[0]) if shas[rows[i]] != sha][:args.k]

    print(f"\nquery {args.query}; {len(hits)} nearest of {len(rows)} photos "
          f"({same} with the query's content left out), block5 cosine similarity:")
    for rank, (r, sim) in enumerate(hits, 1):
        print(f"{rank:3d}  {sim:.3f}  {labels[r]:<10} {store_ids[r]}")

    fig, axes = plt.subplots(1, len(hits) + 1, figsize=(2.2 * (len(hits) + 1), 2.8))
    folder = Path(args.query).parent.name  # the query's class, when it sits in a class folder
    show(axes[0], args.query, f"query\n{folder if folder in labels else Path(args.query).name}",
         fontweight="bold", color="tab:blue")
    for ax, (r, sim) in zip(axes[1:], hits):
        show(ax, Path(args.data, store_ids[r]), f"{labels[r]}\n{sim:.3f}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"\ncontact sheet: {args.out}")


if __name__ == "__main__":
    main()
