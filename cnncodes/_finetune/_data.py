"""The photos of a fine-tuning run: read, hashed and checked once, split, decoded and augmented in workers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np
import torch

from cnncodes._errors import SourceError
from cnncodes._input.images import DEFAULT_MAX_PIXELS, Preprocess
from cnncodes._input.sources import Item, Source, read_hash_decode, read_source

# Augmentation of the training split: crops of 50-100 % of the image (ImageNet training
# uses 8-100 %, too strong for a few epochs on small photos), mirror images, and light
# colour changes that leave the hue alone.
CROP_SCALE = (0.5, 1.0)
JITTER = dict(brightness=0.15, contrast=0.15, saturation=0.15)


def _name(item) -> str:
    return item.id if isinstance(item, Item) else str(item)


class _Photos(torch.utils.data.Dataset):
    """Reads, hashes and decodes images in DataLoader workers; augments the training split."""

    def __init__(self, paths, labels, prep: Preprocess, augment=None, max_pixels=DEFAULT_MAX_PIXELS,
                 strict=False, storage_options=None):
        # Items of a source (files, objects, shard members, table cells) or plain paths.
        self.paths, self.labels, self.prep = list(paths), labels, prep
        self.augment, self.max_pixels, self.strict = augment, max_pixels, strict
        self.storage_options = storage_options

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        label = -1 if self.labels is None else int(self.labels[i])
        x, sha, why = read_hash_decode(self.paths[i], self.prep, self.max_pixels, self.storage_options)
        if x is None:
            if self.strict:  # sha is "" when the bytes could not be read, else they did not decode
                what = "It was readable" if not sha else "It decoded"
                raise SourceError(f"{_name(self.paths[i])}: {why}. {what} when training began; restore it "
                                  f"and re-run (training resumes).") from None
            return i, None, label, sha, why
        if self.augment is not None:
            x = self.augment(x)
        return i, x, label, sha, None


def _collate(samples):
    ok = [s for s in samples if s[1] is not None]
    return {
        "index": [s[0] for s in ok],
        "x": torch.stack([s[1] for s in ok]) if ok else None,
        "y": torch.tensor([s[2] for s in ok], dtype=torch.long),
        "sha": [s[3] for s in ok],
        "failed": [(s[0], s[3], s[4]) for s in samples if s[1] is None],
    }


def _augmentation(prep: Preprocess):
    """Random resized crop, horizontal flip and light colour jitter on a uint8 CHW tensor."""
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose([
        v2.RandomResizedCrop(prep.crop_size, scale=CROP_SCALE, antialias=True,
                             interpolation=InterpolationMode(prep.interpolation)),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(**JITTER),
    ])


def _train_decode(prep: Preprocess) -> Preprocess:
    # Decode the whole centred square at the resize size; the random crop is taken from it.
    return replace(prep, resize_size=prep.resize_size, crop_size=prep.resize_size)


def default_workers(n: int, batch_size: int) -> int:
    """Decoding and augmenting processes: as for extraction, at most 4."""
    from cnncodes._extract.forward import default_workers

    return default_workers(n, batch_size, most=4)


def workers_for(num_workers, n: int, batch_size: int) -> int:
    """`num_workers` as given, or the default for `n` images ("auto" or None)."""
    return default_workers(n, batch_size) if num_workers in (None, "auto") else int(num_workers)


def _loader(dataset, batch_size, workers, *, shuffle=False, seed=0, device=None):
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=_collate,
        generator=generator, pin_memory=device is not None and device.type == "cuda",
        drop_last=False,
    )


def image_loader(items, prep: Preprocess, batch_size: int, workers: int, *, device=None, storage_options=None):
    """Batches of unlabelled images for prediction; an image that cannot be read is reported, not raised."""
    return _loader(_Photos(items, None, prep, storage_options=storage_options), batch_size, workers, device=device)


def to_input(batch, prep, dev, channels_last):
    """A batch's pixels on the device, normalised (channels last where that is faster)."""
    x = prep.normalize(batch["x"].to(dev, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def progress_bar(progress, total, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=not progress, leave=False, dynamic_ncols=True)


def _scan(items, prep, max_pixels, workers, progress):
    """Hash and decode every image once: content sha256 per item, and what cannot be read."""
    loader = _loader(_Photos(items, None, prep, None, max_pixels), 64, workers)
    shas = [""] * len(items)
    ok = np.zeros(len(items), dtype=bool)
    failures = []
    with progress_bar(progress, len(items), "check images") as bar:
        for batch in loader:
            for i, sha in zip(batch["index"], batch["sha"]):
                shas[i], ok[i] = sha, True
            for i, _, why in batch["failed"]:
                failures.append((items[i].id, why))
            bar.update(len(batch["index"]) + len(batch["failed"]))
    return shas, ok, failures


@dataclass
class Data:
    """The readable labelled images of a run, their content, classes and splits, and how they are read."""

    src: Source
    items: list[Item]
    shas: np.ndarray  # content sha256 per item
    y: np.ndarray  # class index per item
    classes: list[str]
    train_rows: np.ndarray
    val_rows: np.ndarray
    test_rows: np.ndarray
    failures: list[tuple[str, str]]  # (id, reason) of the images left out
    prep: Preprocess
    max_pixels: int
    batch_size: int
    workers: int

    @property
    def counts(self) -> dict:
        return dict(n_train=len(self.train_rows), n_val=len(self.val_rows), n_test=len(self.test_rows))

    def fingerprint(self) -> str:
        """A hash of every image's id, content and label: a resumed run must see the same images."""
        digest = hashlib.sha256()
        for item, sha, lab in zip(self.items, self.shas, self.y):
            digest.update(f"{item.id}\t{sha}\t{lab}\n".encode())
        return digest.hexdigest()

    def eval_loader(self, rows, device):
        """The images of `rows` as extract decodes them; one that became unreadable stops the run."""
        dataset = _Photos([self.items[r] for r in rows], self.y[rows], self.prep, None, self.max_pixels, strict=True)
        return _loader(dataset, self.batch_size, self.workers, device=device)

    def train_set(self, augment: bool):
        """The training images, decoded larger and randomly cropped, mirrored and jittered with `augment`."""
        rows = self.train_rows
        return _Photos([self.items[r] for r in rows], self.y[rows], _train_decode(self.prep) if augment else self.prep,
                       _augmentation(self.prep) if augment else None, self.max_pixels, strict=True)

    def train_loader(self, dataset, seed: int, device):
        """One epoch of the training set, shuffled by `seed`."""
        return _loader(dataset, self.batch_size, self.workers, shuffle=True, seed=seed, device=device)


def load_data(source, *, labels, root, prep: Preprocess, max_pixels: int, batch_size: int, num_workers,
              test_size, val_fraction: float, random_state: int, progress: bool) -> Data:
    """Read the labelled images once (hash, decode, leave out what fails) and split them."""
    src = read_source(source, labels, root=root)
    if any(i.label is None for i in src.items):
        raise SourceError(f"fine-tuning needs labelled images, and {src.root} has none: give a folder with "
                          f"one subfolder per class, a CSV of path,label, or labels= for a list of paths.")
    workers = workers_for(num_workers, len(src.items), batch_size)
    all_shas, ok, failures = _scan(src.items, prep, max_pixels, workers, progress)
    items = [it for it, good in zip(src.items, ok) if good]
    shas = np.array([s for s, good in zip(all_shas, ok) if good], dtype=object)
    classes = sorted({it.label for it in items})
    class_index = {c: k for k, c in enumerate(classes)}
    y = np.array([class_index[it.label] for it in items], dtype=np.int64)
    _check_counts(classes, y, shas, test_size, val_fraction)
    train_rows, val_rows, test_rows = _split(y, shas, test_size, val_fraction, random_state, len(classes))
    return Data(src, items, shas, y, classes, train_rows, val_rows, test_rows, failures, prep, max_pixels,
                int(batch_size), workers)


def _check_counts(classes, y, shas, test_size, val_fraction):
    if len(classes) < 2:
        raise SourceError(f"fine-tuning needs at least 2 classes, got {len(classes)} ({classes}). Give a folder "
                          f"with one subfolder per class.")
    need = 1 + (test_size is not None) + (val_fraction > 0)
    distinct = {}
    for lab, sha in zip(y, shas):
        distinct.setdefault(int(lab), set()).add(sha)
    few = [(classes[k], len(v)) for k, v in sorted(distinct.items()) if len(v) < need]
    if few:
        parts = ["a training"] + (["a held-out test"] if test_size is not None else []) + \
                (["a validation"] if val_fraction > 0 else [])
        raise SourceError(
            "too few images per class: " + ", ".join(f"{c!r} has {n}" for c, n in few)
            + f" distinct image(s), and {', '.join(parts)} split need at least {need} per class. "
            f"Add images, or pass test_size=None / val_fraction=0.")


def _split(y, shas, test_size, val_fraction, random_state, n_classes):
    from cnncodes._classify.fit import split_groups

    rows = np.arange(len(y))
    if test_size is not None:
        rest, test = split_groups(y, shas, test_size=test_size, random_state=random_state)
    else:
        rest, test = rows, rows[:0]
    if val_fraction > 0:
        groups = len(set(shas[rest]))
        fraction = max(val_fraction, (n_classes + 0.5) / groups)  # at least one image per class
        if fraction >= 1:
            raise SourceError(f"too few images for a validation split with one image per class: {groups} "
                              f"distinct training images for {n_classes} classes. Pass val_fraction=0.")
        tr, va = split_groups(y[rest], shas[rest], test_size=fraction, random_state=random_state,
                              where="the training images")
        return rest[tr], rest[va], test
    return rest, rest[:0], test
