"""What advise measures on a data set: its classes' sizes, the ImageNet head's reaction, a learning curve."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnncodes._errors import CnnCodesError
from cnncodes._analysis.rules import HeadStats
from cnncodes._spec import WeightsRef


@dataclass
class LabelledData:
    """A data set as advise reads it before measuring: class sizes, images for the head, what to sweep."""

    counts: dict[str, int]  # class -> labelled images, every image counted
    backbone: str  # a store's own backbone, else the one asked for
    sweep_data: object  # what to sweep: the store, or the image source
    store: object = None  # where the sweep extracts to (None for a store)
    images: object = None  # the image source, for Advice.run(); None when not at hand
    weights_id: str | None = None  # a store's weights; None: whatever the sweep used
    image_size: int | None = None
    head_pool: list = field(default_factory=list)  # images the ImageNet head may be shown
    head_labels: list[str] = field(default_factory=list)  # their classes
    notes: list[str] = field(default_factory=list)  # what could not be read, and why


def read_labelled(data, *, backbone: str, store, image_size) -> LabelledData:
    """Read `data` (an image source or a code store) for advise; refuse it without labels."""
    from cnncodes._analysis.sweep import is_store_path

    read = _from_store(data, image_size) if is_store_path(data) else _from_source(
        data, backbone, store, image_size)
    if not read.counts:
        raise CnnCodesError(f"{data} has no labelled images. Check that the folder has one subfolder "
                            f"per class (or that the CSV has a label column).")
    return read


def _from_store(data, image_size) -> LabelledData:
    """A store: swept as it is; the head sees its images if the folder it came from is still there."""
    from cnncodes._backbones.registry import get_backbone
    from cnncodes._store.store import CodeStore

    codes = data if isinstance(data, CodeStore) else CodeStore(data)
    names = codes.class_names
    lab = codes.labels[codes.labels >= 0]
    read = LabelledData(counts={names[c]: int(n) for c, n in zip(*np.unique(lab, return_counts=True))},
                        backbone=codes.backbone, sweep_data=codes, weights_id=codes.spec.weights.id,
                        image_size=image_size)
    root = Path(str(codes.attrs.get("data_root", "")))
    if codes.attrs.get("source_kind") == "class-folders" and root.is_dir():
        read.images = str(root)
        for rid, c in zip(codes.ids, codes.labels):
            if c >= 0 and (root / rid).is_file():
                read.head_pool.append(str(root / rid))
                read.head_labels.append(names[c])
    else:
        read.notes.append(f"the images of {codes.path.name} are not at hand ({root or 'unknown folder'}), "
                          f"so the ImageNet head was not run")
    crop = codes.spec.preprocessing.crop_size
    if codes.spec.weights.is_torchvision \
            and crop != _preprocess_for(get_backbone(read.backbone), read.weights_id).crop_size:
        read.image_size = crop  # fine-tuning on the store's images must match its codes (init_head)
    return read


def _from_source(data, backbone, store, image_size) -> LabelledData:
    """Images (a folder, a CSV, ...): every labelled one counted, swept and shown to the head."""
    from cnncodes._input.sources import read_source

    labelled = [it for it in read_source(data).items if it.label is not None]
    labels = [it.label for it in labelled]
    return LabelledData(counts=dict(sorted(Counter(labels).items())), backbone=backbone, sweep_data=data,
                        store=store, images=data, image_size=image_size, head_pool=labelled,
                        head_labels=labels)


def head_on_sample(read: LabelledData, n: int, random_state, *, weights_id: str, device,
                   notes: list[str]) -> HeadStats | None:
    """The ImageNet head on up to `n` images spread evenly over the classes; None when it cannot run."""
    from cnncodes._io import stratified_sample

    if not read.head_pool:
        return None
    if not WeightsRef.from_id(weights_id).is_torchvision:
        notes.append(f"weights {weights_id} have no ImageNet head to ask, so the similarity rests on "
                     f"the layer sweep")
        return None
    keep = stratified_sample(read.head_labels, n, random_state, balanced=True)
    return imagenet_head([read.head_pool[k] for k in keep], backbone=read.backbone, weights=weights_id,
                         device=device)


def _preprocess_for(spec_b, weights_id: str, image_size=None):
    from cnncodes._backbones.registry import weights_enum
    from cnncodes._input.images import Preprocess

    return Preprocess.from_weights(weights_enum(spec_b)[weights_id], image_size)


def imagenet_head(paths, *, backbone: str = "mobilenet_v2", weights="imagenet", batch_size: int = 32,
                  device="auto") -> HeadStats:
    """Run the full pretrained network, ImageNet head included, on images; summarise its softmax.

    The images are preprocessed as the weights were trained (their own resize and crop, 224
    px for ImageNet weights), whatever image size codes are extracted at: the question is
    whether the network, as trained, recognises them. Images that cannot be decoded are
    skipped.

    Parameters
    ----------
    paths : list of paths, URLs or source items
    backbone : str
    weights : str
        ImageNet weights of torchvision (``"imagenet"``, ``"DEFAULT"``, a weights name).

    Returns
    -------
    HeadStats
    """
    import torch

    from cnncodes._extract.accel import resolve_device
    from cnncodes._backbones.registry import get_backbone, weights_enum
    from cnncodes._input.images import ImageDecodeError, decode
    from cnncodes._input.sources import read_bytes
    from cnncodes._backbones.weights import load_model, resolve

    spec_b = get_backbone(backbone)
    w = resolve(spec_b, weights)
    members = weights_enum(spec_b).__members__
    if w.id not in members:
        raise CnnCodesError(f"the ImageNet head needs torchvision ImageNet weights, got {w.id!r}; "
                            f"use weights='imagenet'.")
    member = members[w.id]
    prep = _preprocess_for(spec_b, w.id)
    dev = resolve_device(device)
    model = load_model(spec_b, w).to(dev).eval()
    categories = member.meta["categories"]
    probs = []
    batch = []

    def flush():
        with torch.inference_mode():
            x = prep.normalize(torch.stack(batch).to(dev))
            probs.append(model(x).float().softmax(dim=1).cpu())
        batch.clear()

    for path in paths:
        try:
            batch.append(decode(read_bytes(path), prep))
        except (OSError, ImageDecodeError):
            continue
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not probs:
        raise CnnCodesError("none of the sampled images could be decoded for the ImageNet head.")
    p = torch.cat(probs)
    top = p.max(dim=1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=1) / math.log(p.shape[1])
    counts = Counter(top.indices.tolist()).most_common(5)
    return HeadStats(
        n_images=int(p.shape[0]), confidence=float(top.values.mean()), entropy=float(entropy.mean()),
        imagenet_accuracy=float(member.meta["_metrics"]["ImageNet-1K"]["acc@1"]) / 100.0,
        top_labels=[(categories[i], c / p.shape[0]) for i, c in counts],
    )


def more_labels(result, random_state, notes) -> tuple[bool, str] | None:
    """Would more labels help? The slope of a two-point learning curve at the sweep's best layer.

    Half the training images per class against all of them, 3 draws, with the C the sweep
    chose (no cross-validation again): a few fits.
    """
    from cnncodes._analysis.curve import learning_curve
    from cnncodes._store.store import CodeStore

    best = result.best
    store = CodeStore(result.store)
    counts = np.bincount(store.labels[store.labels >= 0])
    half = max(1, int(0.75 * counts[counts > 0].min()) // 2)  # half of the smallest class's training part
    try:
        curve = learning_curve(store, sizes=(half, "all"), repeats=3, layer=best.layer,
                               C=float(np.median(best.Cs)), random_state=random_state, n_jobs=1)
    except CnnCodesError as exc:
        notes.append(f"no learning curve: {exc}")
        return None
    return curve.more_labels_help()
