"""Fine-tuning the top blocks of a backbone, its safe resumable checkpoints, and their use."""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._accel import autocast, resolve_device, resolve_precision, reuse_freed_memory
from ._backbones import build_model, finish_model, get_backbone, graph_nodes, weights_enum
from ._errors import CnnCodesError, InvalidParameterError, SourceError, WeightsError
from ._images import DEFAULT_MAX_PIXELS, ImageDecodeError, Preprocess, decode
from ._outputs import CHECKPOINT, check_output
from ._sources import Item, Source, read_bytes, read_source
from ._spec import ExtractorSpec
from ._stats import CONFIDENCE, N_RESAMPLES
from ._weights import IMAGENET, load_model, resolve

CHECKPOINT_FORMAT = "cnncodes.finetuned"
CHECKPOINT_VERSION = 1
STATE_FORMAT = "cnncodes.finetune-state"
STATE_SUFFIX = ".resume"
# Augmentation of the training split: crops of 50-100 % of the image (ImageNet training
# uses 8-100 %, too strong for a few epochs on small photos), mirror images, and light
# colour changes that leave the hue alone.
CROP_SCALE = (0.5, 1.0)
JITTER = dict(brightness=0.15, contrast=0.15, saturation=0.15)
TTAS = ("none", "flip")
OPTIMIZERS = ("adamw", "sgd")
# Settings left out when a run is resumed or returned: the initial head is already in the
# saved weights (and the path of the store it came from may move).
_RUNTIME_KEYS = ("init_head",)


# --------------------------------------------------------------------------- results


@dataclass
class EpochStats:
    """Loss and accuracy of one epoch on the training and validation splits."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float
    lr: float  # learning rate of the pretrained layers at the end of the epoch
    head_lr: float


@dataclass
class FinetuneResult:
    """What a :func:`finetune` run did; `summary()` gives the text the CLI prints."""

    path: str
    backbone: str
    classes: list[str]
    history: list[EpochStats]
    best_epoch: int  # 0: the initial model (the head initialised from a linear probe)
    stopped: str  # "epochs" | "early stopping" | "target accuracy"
    n_train: int
    n_val: int
    n_test: int
    test_accuracy: float | None = None
    test_ids: list[str] = field(default_factory=list)
    initial_val_accuracy: float | None = None  # before the first epoch (head initialised)
    initial_val_loss: float | None = None
    init_head: dict | None = None
    trainable: dict = field(default_factory=dict)  # parameters trained / frozen, first trained module
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    resumed_from: int = 0  # epochs done by an earlier run (all of them: nothing left to do)
    seconds: float = 0.0  # wall time of this call
    precision: str = "float32"

    @property
    def best_val_accuracy(self) -> float | None:
        if self.best_epoch == 0:
            return self.initial_val_accuracy
        return self.history[self.best_epoch - 1].val_accuracy

    @property
    def best_val_loss(self) -> float | None:
        if self.best_epoch == 0:
            return self.initial_val_loss
        return self.history[self.best_epoch - 1].val_loss

    def summary(self) -> str:
        lines = []
        if self.history and self.resumed_from == len(self.history):
            lines.append(f"already trained ({self.path}): nothing to do; resume=False (--restart) trains again.")
        elif self.resumed_from:
            lines.append(f"resumed after epoch {self.resumed_from}.")
        if self.init_head:
            lines.append(f"head initialised from {self.init_head['source']} "
                         f"(logistic regression, C={self.init_head['C']:g}, {self.init_head['n_rows']} rows)"
                         + (f": validation accuracy {self.initial_val_accuracy:.4f} before fine-tuning."
                            if self.initial_val_accuracy is not None else "."))
        if self.trainable:
            lines.append(f"trained {self.trainable['trained']:,} of {self.trainable['total']:,} parameters "
                         f"(from {self.trainable['first']}), {self.precision}.")
        for e in self.history:
            val = "" if e.val_accuracy is None else f" | val loss {e.val_loss:.4f} acc {e.val_accuracy:.4f}"
            lines.append(f"epoch {e.epoch}: train loss {e.train_loss:.4f} acc {e.train_accuracy:.4f}{val}"
                         f" | {e.seconds:.0f} s")
        best = self.best_val_accuracy
        kept = "the initial model" if self.best_epoch == 0 else f"epoch {self.best_epoch}"
        lines.append(f"stopped: {self.stopped}; kept {kept}" + (
            "" if best is None else f" (validation loss {self.best_val_loss:.4f}, accuracy {best:.4f})") + ".")
        split = f"{self.n_train} train, {self.n_val} validation, {self.n_test} held-out test images"
        if self.test_accuracy is not None:
            lines.append(f"held-out accuracy {self.test_accuracy:.4f} on {self.n_test} images ({split}).")
        else:
            lines.append(f"{split}.")
        if self.failures:
            lines.append(f"{len(self.failures)} images could not be read and were left out:")
            lines += [f"  {rid}: {why}" for rid, why in self.failures[:20]]
        if self.skipped_files:
            lines.append(f"{len(self.skipped_files)} files skipped: "
                         + "; ".join(f"{i} ({why})" for i, why in self.skipped_files[:5]))
        lines.append(f"{self.path}: {len(self.classes)} classes, {self.seconds:.1f} s.")
        return "\n".join(lines)


# --------------------------------------------------------------------------- the network


def _classifier_path(net: nn.Module) -> str:
    """The module path of the backbone's ImageNet classifier: its last Linear layer."""
    last = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:  # pragma: no cover - every registered backbone ends in a Linear
        raise CnnCodesError(f"{type(net).__name__} has no Linear classifier to replace.")
    return last


def _replace_head(net: nn.Module, n_classes: int, dropout: float) -> str:
    """Swap the ImageNet classifier for ``Sequential(Dropout, Linear(n_classes))`` in place.

    The dropout torchvision applies right before its classifier (MobileNetV2, EfficientNet,
    VGG16, InceptionV3) becomes an identity, so that `dropout` is the only one. Returns the
    module path of the new head.
    """
    path = _classifier_path(net)
    parent_path, _, name = path.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    old = getattr(parent, name)
    setattr(parent, name, nn.Sequential(nn.Dropout(dropout), nn.Linear(old.in_features, n_classes)))
    if isinstance(parent, nn.Sequential) and name.isdigit() and int(name) > 0:
        if isinstance(parent[int(name) - 1], nn.Dropout):
            parent[int(name) - 1] = nn.Identity()
    elif isinstance(getattr(parent, "dropout", None), nn.Dropout):
        parent.dropout = nn.Identity()
    return path


class FineTuneNet(nn.Module):
    """A backbone with a new head whose frozen blocks stay in inference mode.

    ``train()`` puts the trained layers in training mode but keeps every BatchNorm listed
    in `eval_norms` in eval mode: those of the frozen blocks always (their running
    statistics stay those of ImageNet, which the frozen weights were made for, as Keras does
    for ``trainable = False``), and by default those of the trained blocks too.
    """

    def __init__(self, net: nn.Module, head: str, eval_norms: list[str]):
        super().__init__()
        self.net = net
        self.head = head
        self.eval_norms = list(eval_norms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train(self, mode: bool = True) -> "FineTuneNet":
        super().train(mode)
        for name in self.eval_norms:
            self.net.get_submodule(name).eval()
        return self

    def head_linear(self) -> nn.Linear:
        return self.net.get_submodule(self.head)[1]


def _boundary(spec, unfreeze) -> tuple[int, str]:
    """Index in the backbone's graph order after which layers are trained, and a label.

    ``unfreeze`` is a layer alias (that block and every deeper one are trained), a number of
    top blocks (0: the head only), or ``"all"``.
    """
    aliases = [i.alias for i in spec.layers]
    order = {name: k for k, name in enumerate(graph_nodes(spec.name))}
    hint = (f"Use a layer alias of {spec.name} ({', '.join(aliases)}): that block and every deeper "
            f"one are trained; or a number of top blocks, 0 (the head only) to {len(aliases)}; or 'all'.")
    if isinstance(unfreeze, bool):
        raise InvalidParameterError(f"unfreeze must be an alias, a number or 'all', got {unfreeze!r}. {hint}")
    if isinstance(unfreeze, str) and unfreeze.isdigit():
        unfreeze = int(unfreeze)
    if isinstance(unfreeze, (int, np.integer)):
        n = int(unfreeze)
        if not 0 <= n <= len(aliases):
            raise CnnCodesError(f"unfreeze={n} is out of range for {spec.name}, which has {len(aliases)} "
                                f"blocks. {hint}")
        if n == 0:
            return len(order), "the head only"
        if n == len(aliases):
            return -1, aliases[0]
        return order[spec.layers[len(aliases) - n - 1].node], aliases[len(aliases) - n]
    if unfreeze == "all":
        return -1, "all"
    if unfreeze not in aliases:
        raise CnnCodesError(f"unfreeze {unfreeze!r} is not a block of {spec.name}. {hint}")
    k = aliases.index(unfreeze)
    return (order[spec.layers[k - 1].node] if k > 0 else -1), unfreeze


def _owner_position(param_name: str, order: dict[str, int]) -> int:
    path = param_name.rpartition(".")[0]
    while path:
        if path in order:
            return order[path]
        path = path.rpartition(".")[0]
    return len(order)  # not in the graph (cannot happen for torchvision models): train it


def build_net(spec, weights, n_classes: int, *, dropout: float, unfreeze,
              train_bn: bool = False) -> tuple[FineTuneNet, dict]:
    """The pretrained backbone with a new head; parameters before `unfreeze` frozen.

    BatchNorm layers of frozen blocks stay in inference mode; those of trained blocks too
    unless `train_bn` (their affine parameters are trained either way).
    """
    boundary, first = _boundary(spec, unfreeze)
    net = load_model(spec, weights)
    order = {name: k for k, name in enumerate(graph_nodes(spec.name))}
    head = _replace_head(net, n_classes, dropout)
    trained = total = 0
    for name, p in net.named_parameters():
        train = name.startswith(head + ".") or _owner_position(name, order) > boundary
        p.requires_grad_(train)
        total += p.numel()
        trained += p.numel() if train else 0
    norms = [(name, any(p.requires_grad for p in m.parameters())) for name, m in net.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    eval_norms = [name for name, trained_norm in norms if not (train_bn and trained_norm)]
    model = FineTuneNet(net, head, eval_norms)
    return model, {"trained": trained, "total": total, "first": first,
                   "frozen_norms": sum(not t for _, t in norms), "eval_norms": len(eval_norms)}


def param_groups(model: FineTuneNet, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    """Optimizer groups: the trained pretrained layers at `lr`, the new head at `head_lr`."""
    head = [p for n, p in model.net.named_parameters() if n.startswith(model.head + ".")]
    ids = {id(p) for p in head}
    body = [p for p in model.net.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": head, "lr": head_lr, "weight_decay": weight_decay, "name": "head"}]
    if body:
        groups.insert(0, {"params": body, "lr": lr, "weight_decay": weight_decay, "name": "backbone"})
    return groups


# --------------------------------------------------------------------------- two-stage head


def head_from_logreg(estimator, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of a linear layer giving the logits of a fitted logistic regression.

    `estimator` is a ``LogisticRegression`` or a ``Pipeline`` of an optional
    ``StandardScaler`` and a ``LogisticRegression`` (as :func:`cnncodes.fit` makes). The
    scaler is folded into the weights, ``W' = W / s`` and ``b' = b - W (m / s)``, so the layer
    reads raw codes; a binary model's single row becomes the two rows ``(0, w)``. The rows
    follow `classes`; every class must be one of the estimator's.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    steps = list(estimator.named_steps.values()) if isinstance(estimator, Pipeline) else [estimator]
    *pre, last = steps
    if not isinstance(last, LogisticRegression) or not all(isinstance(s, StandardScaler) for s in pre) \
            or len(pre) > 1:
        names = " -> ".join(type(s).__name__ for s in steps)
        raise CnnCodesError(f"init_head needs a logistic regression (optionally after a StandardScaler), "
                            f"got {names}. Fit one with cnncodes.fit(..., classifier='logreg').")
    if not hasattr(last, "coef_"):
        raise CnnCodesError("init_head got an unfitted LogisticRegression; fit it first.")
    coef = np.asarray(last.coef_, dtype=np.float64)
    intercept = np.asarray(last.intercept_, dtype=np.float64)
    if coef.shape[0] == 1:  # binary: p(class 1) = sigmoid(w.x + b) = softmax([0, w.x + b])[1]
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    if pre:
        scaler = pre[0]
        mean = scaler.mean_ if scaler.with_mean else np.zeros(coef.shape[1])
        scale = scaler.scale_ if scaler.with_std else np.ones(coef.shape[1])
        intercept = intercept - coef @ (mean / scale)
        coef = coef / scale
    known = [str(c) for c in last.classes_]
    missing = [c for c in classes if c not in known]
    if missing:
        raise CnnCodesError(f"init_head was fitted on classes {known}; it lacks {missing}. Fit it on "
                            f"codes of the same classes.")
    rows = [known.index(c) for c in classes]
    return (torch.tensor(coef[rows], dtype=torch.float32), torch.tensor(intercept[rows], dtype=torch.float32))


def _head_input_is_pooled_default(spec) -> bool:
    # The avg-pooled pre-logits layer is exactly the classifier's input, except in ConvNeXt,
    # whose classifier normalises the pooled features (LayerNorm2d) before its Linear.
    return spec.name != "convnext_tiny"


def _init_head_estimator(init_head, spec, weights, prep, classes, shas, labels, train_rows, test_shas,
                         n_jobs):
    """The logistic regression for the head: fitted on a store's codes, or given; and a record."""
    from ._fit import fit
    from ._model import Model, load as load_model_file
    from ._store import CodeStore

    if not _head_input_is_pooled_default(spec):
        raise CnnCodesError(f"init_head is not available for {spec.name}: its classifier normalises the "
                            f"pooled codes first, so a linear probe on codes does not map onto it. "
                            f"Fine-tune with init_head=None.")
    layer = spec.layer(spec.default_layer)
    if isinstance(init_head, (str, os.PathLike)) and Path(init_head).suffix.lower() in (".h5", ".hdf5"):
        store = CodeStore(init_head)
        s = store.spec
        node = s.find_layer(layer.node)
        problems = []
        if s.backbone != spec.name:
            problems.append(f"backbone {s.backbone} (fine-tuning {spec.name})")
        if s.weights.sha256 != weights.sha256:
            problems.append(f"weights {s.weights.id} (fine-tuning from {weights.id})")
        if node is None:
            problems.append(f"no {layer.alias} ({layer.node}) codes, only {', '.join(s.layers)}")
        if s.pooling != "avg":
            problems.append(f"pooling {s.pooling} (the classifier reads avg-pooled codes)")
        p = s.preprocessing
        if (p.resize_size, p.crop_size, list(p.mean), list(p.std)) != (
                prep.resize_size, prep.crop_size, list(prep.mean), list(prep.std)):
            problems.append(f"preprocessing resize {p.resize_size}/crop {p.crop_size} (fine-tuning "
                            f"uses {prep.resize_size}/{prep.crop_size})")
        if problems:
            raise CnnCodesError(
                f"init_head store {store.path.name} does not match this fine-tuning: "
                + "; ".join(problems) + f". Extract it with `cnncodes extract DATA --backbone {spec.name} "
                f"--layer {layer.alias} -o codes.h5` (avg pooling, the weights' own image size).")
        wanted = {shas[r]: labels[r] for r in train_rows}
        rows = np.array([r for r, h in enumerate(store.sha256) if h in wanted], dtype=int)
        if len(rows) == 0:
            raise CnnCodesError(f"init_head store {store.path.name} holds none of the training images. "
                                f"Extract the same images into it first.")
        y = np.array([classes[wanted[h]] for h in store.sha256[rows]])
        present = set(y)
        if len(present) < len(classes):
            raise CnnCodesError(f"init_head store {store.path.name} has no training images of "
                                f"{sorted(set(classes) - present)}. Extract the same images into it.")
        model = fit(store.codes(node)[rows], y, classifier="logreg", n_jobs=n_jobs)
        info = model.cnncodes_["fit"]
        return model, {"source": store.path.name, "kind": "store", "C": info["C"], "n_rows": int(len(rows)),
                       "seconds": float(info["seconds"])}
    # A fitted estimator or a model file from `cnncodes fit`.
    if isinstance(init_head, (str, os.PathLike)):
        init_head = load_model_file(init_head)
    if isinstance(init_head, Model):
        estimator, extractor, seen, source = (init_head.estimator, init_head.extractor,
                                              init_head.train_sha256, Path(init_head.path).name)
    else:
        meta = getattr(init_head, "cnncodes_", {}) or {}
        estimator, extractor, seen, source = (init_head, meta.get("extractor"), meta.get("train_sha256"),
                                              type(init_head).__name__)
    if extractor:
        extractor = ExtractorSpec.from_json(extractor)  # a dict when the estimator carries it
        if extractor.backbone != spec.name or list(extractor.layers.values()) != [layer.node] \
                or extractor.pooling != "avg" or extractor.weights.sha256 != weights.sha256:
            raise CnnCodesError(
                f"init_head model {source} was fitted on {extractor.backbone} "
                f"{'/'.join(extractor.layers.values())} {extractor.pooling}-pooled codes of weights "
                f"{extractor.weights.id}; the head of {spec.name} reads avg-pooled {layer.alias} "
                f"({layer.node}) codes of {weights.id}. Fit it on such codes.")
    if seen and test_shas & set(seen):
        raise CnnCodesError(
            f"init_head model {source} was trained on {len(test_shas & set(seen))} of the held-out test "
            f"images, so the test accuracy would not be a held-out one. Fit it on the training split "
            f"(cnncodes fit --test-size with the same test_size and random_state), or pass test_size=None.")
    C = getattr(estimator[-1] if hasattr(estimator, "steps") else estimator, "C", float("nan"))
    rows = len(seen) if seen else 0
    return estimator, {"source": source, "kind": "model", "C": float(C), "n_rows": rows, "seconds": 0.0}


# --------------------------------------------------------------------------- data


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
        try:
            data = read_bytes(self.paths[i], self.storage_options)
        except OSError as exc:
            why = str(exc)
            if self.strict:
                raise SourceError(f"{_name(self.paths[i])}: {why}. It was readable when training began; restore "
                                  f"it and re-run (training resumes).") from None
            return i, None, label, "", why
        sha = hashlib.sha256(data).hexdigest()
        try:
            x = decode(data, self.prep, self.max_pixels)
        except ImageDecodeError as exc:
            if self.strict:
                raise SourceError(f"{_name(self.paths[i])}: {exc}. It decoded when training began; restore it "
                                  f"and re-run (training resumes).") from None
            return i, None, label, sha, str(exc)
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
    from ._extract import _default_workers

    return _default_workers(n, batch_size, most=4)


def _loader(dataset, batch_size, workers, *, shuffle=False, seed=0, device=None):
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=_collate,
        generator=generator, pin_memory=device is not None and device.type == "cuda",
        drop_last=False,
    )


def _to_input(batch, prep, dev, channels_last):
    x = prep.normalize(batch["x"].to(dev, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.inference_mode()
def _logits(model, loader, prep, dev, precision, channels_last, bar=None, tta="none"):
    """Run images through the model in eval mode: (indices, float32 logits, sha256s, failures).

    With ``tta="flip"`` the logits are the log of the mean of the probabilities of each image
    and its mirror image (log-probabilities: softmax and cross-entropy apply unchanged).
    """
    model.eval()
    idx, out, shas, failed = [], [], [], []
    for batch in loader:
        failed += batch["failed"]
        if batch["x"] is not None:
            x = _to_input(batch, prep, dev, channels_last)
            with autocast(dev, precision):
                logits = model(x).float()
                if tta == "flip":
                    mirror = x.flip(3)
                    mirror = mirror.contiguous(memory_format=torch.channels_last) if channels_last else mirror
                    logits = torch.logaddexp(logits.log_softmax(1), model(mirror).float().log_softmax(1)) - math.log(2)
            out.append(logits.cpu())
            idx += batch["index"]
            shas += batch["sha"]
        if bar is not None:
            bar.update(len(batch["index"]) + len(batch["failed"]))
    logits = torch.cat(out) if out else torch.empty(0, 0)
    return idx, logits, shas, failed


def _scan(items, prep, max_pixels, workers, progress):
    """Hash and decode every image once: content sha256 per item, and what cannot be read."""
    from tqdm.auto import tqdm

    loader = _loader(_Photos(items, None, prep, None, max_pixels), 64, workers)
    shas = [""] * len(items)
    ok = np.zeros(len(items), dtype=bool)
    failures = []
    with tqdm(total=len(items), unit="img", desc="check images", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        for batch in loader:
            for i, sha in zip(batch["index"], batch["sha"]):
                shas[i], ok[i] = sha, True
            for i, _, why in batch["failed"]:
                failures.append((items[i].id, why))
            bar.update(len(batch["index"]) + len(batch["failed"]))
    return shas, ok, failures


# --------------------------------------------------------------------------- checkpoints


def _save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file, fsync, then rename over `path` (never a torn file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def is_checkpoint_file(path) -> bool:
    """True when `path` is a PyTorch zip checkpoint (as torch.save writes), whatever it holds."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _torch_load(path, what: str, fix: str, mmap=False):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated or not a safe checkpoint
        why = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise WeightsError(f"cannot read {what} {str(path)!r} safely ({type(exc).__name__}: {why}). {fix}") \
            from None


def read_checkpoint(path, *, mmap: bool = False) -> dict:
    """Load a fine-tuned checkpoint with ``torch.load(weights_only=True)`` and check its format."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {str(path)!r} does not exist. Make one with `cnncodes finetune`.")
    obj = _torch_load(path, "checkpoint", "It is not a cnncodes fine-tuned checkpoint, or it is damaged: "
                      "fine-tune again.", mmap=mmap)
    if not is_finetuned(obj):
        raise WeightsError(f"{str(path)!r} is a PyTorch file but not a cnncodes fine-tuned checkpoint. "
                           f"Use a file written by `cnncodes finetune`.")
    if obj["format_version"] > CHECKPOINT_VERSION:
        raise WeightsError(f"{path.name} has checkpoint format {obj['format_version']}; this cnncodes reads "
                           f"up to {CHECKPOINT_VERSION}. Upgrade cnncodes.")
    return obj


def is_finetuned(obj) -> bool:
    """True for the loaded contents of a cnncodes fine-tuned checkpoint."""
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def finetuned_info(path, spec=None) -> dict | None:
    """Metadata of a fine-tuned checkpoint file, or None for any other file.

    With `spec`, a checkpoint fine-tuned from another backbone is refused with a message
    naming the right one.
    """
    if not is_checkpoint_file(path):
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not ours (or damaged): the state-dict loader reports it
        return None
    if not is_finetuned(obj):
        return None
    if spec is not None and obj["backbone"] != spec.name:
        raise WeightsError(
            f"{Path(path).name} was fine-tuned from {obj['backbone']}, not {spec.name}. Extract with "
            f"--backbone {obj['backbone']}.")
    return {k: v for k, v in obj.items() if k != "state_dict"}


def backbone_state(obj: dict) -> tuple[dict, str]:
    """The backbone part of a fine-tuned checkpoint's state dict, and the replaced head's path."""
    head = obj["head"]
    state = {k: v for k, v in obj["state_dict"].items() if not k.startswith(head + ".")}
    return state, head


# --------------------------------------------------------------------------- fine-tuning


def _fingerprint(items, shas, labels) -> str:
    digest = hashlib.sha256()
    for item, sha, lab in zip(items, shas, labels):
        digest.update(f"{item.id}\t{sha}\t{lab}\n".encode())
    return digest.hexdigest()


def _check_args(epochs, lr, head_lr, batch_size, dropout, val_fraction, test_size, early_stopping,
                target_accuracy, weight_decay):
    def bad(msg):
        raise CnnCodesError(msg)

    if not isinstance(epochs, (int, np.integer)) or isinstance(epochs, bool) or epochs < 1:
        bad(f"epochs must be an integer >= 1, got {epochs!r}.")
    for name, value in (("lr", lr), ("head_lr", head_lr)):
        if not isinstance(value, (int, float)) or not value > 0:
            bad(f"{name} must be a positive number, got {value!r}.")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 2:
        bad(f"batch_size must be an integer >= 2 (BatchNorm needs two images per batch), got {batch_size!r}.")
    if not 0 <= dropout < 1:
        bad(f"dropout must be in [0, 1), got {dropout!r}.")
    if not 0 <= val_fraction < 1:
        bad(f"val_fraction must be in [0, 1), got {val_fraction!r}; 0 turns the validation split off.")
    if test_size is not None and not 0 < test_size < 1:
        bad(f"test_size must be between 0 and 1, or None for no held-out split, got {test_size!r}.")
    if early_stopping is not None and (not isinstance(early_stopping, (int, np.integer)) or early_stopping < 1):
        bad(f"early_stopping is a patience in epochs (>= 1) or None, got {early_stopping!r}.")
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        bad(f"target_accuracy must be in (0, 1], got {target_accuracy!r}.")
    if val_fraction == 0 and (early_stopping is not None or target_accuracy is not None):
        bad("early_stopping and target_accuracy watch the validation split: give val_fraction > 0, "
            "or pass early_stopping=None and target_accuracy=None.")
    if weight_decay < 0:
        bad(f"weight_decay must be >= 0, got {weight_decay!r}.")


def _schedule(total_steps: int, warmup_steps: int):
    """Linear warm-up, then cosine decay to zero: the factor applied to each group's lr."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _describe_init(init_head):
    if init_head is None:
        return None
    if isinstance(init_head, (str, os.PathLike)):
        return str(Path(init_head).resolve())
    return type(init_head).__name__


def finetune(
    source,
    *,
    out,
    backbone: str = "mobilenet_v2",
    weights=IMAGENET,
    unfreeze="block3",
    epochs: int = 8,
    lr: float = 2e-4,
    head_lr: float = 1e-3,
    weight_decay: float = 1e-4,
    optimizer: str = "adamw",
    batch_size: int = 32,
    augment: bool = True,
    dropout: float = 0.2,
    train_bn: bool = False,
    label_smoothing: float = 0.1,
    tta: str = "flip",
    val_fraction: float = 0.1,
    early_stopping: int | None = 3,
    target_accuracy: float | None = None,
    test_size: float | None = 0.25,
    random_state: int = 0,
    init_head=None,
    image_size: int | None = None,
    labels=None,
    root=None,
    resume: bool = True,
    precision: str = "auto",
    device="auto",
    num_workers="auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    n_jobs: int | None = -1,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune the top blocks of a pretrained backbone with a new classification head.

    The images are split as :func:`cnncodes.split_store` splits a store of them (stratified,
    identical content on one side, `test_size` held out with the same `random_state`), so
    the held-out images are those of a linear probe fitted with ``--test-size``. The rest is
    split again into training and validation (`val_fraction`). Layers before `unfreeze`
    stay frozen, their BatchNorm in inference mode; the trained pretrained layers learn at
    `lr`, the new head (dropout, then a linear layer) at `head_lr`, with AdamW, a short
    warm-up and cosine decay. The training split is augmented (random resized crop, mirror,
    light colour jitter). After every epoch the best model so far (validation loss) is
    written to `out` and the training state to ``out + ".resume"``; an interrupted run
    continues where it stopped when called again.

    Parameters
    ----------
    source : path or list of paths
        A folder with one subfolder per class, a ``.csv`` of ``path,label``, or a list of
        image paths with `labels` (and optionally `root`, as in :func:`cnncodes.extract`).
    out : path
        The checkpoint to write (``.pt``): a state dict and plain metadata, loadable with
        ``torch.load(weights_only=True)``. Use it as ``weights=`` of :func:`cnncodes.extract`
        or as the model of :func:`cnncodes.predict` / :func:`cnncodes.evaluate`.
    backbone, weights
        The pretrained network, as in :func:`cnncodes.extract`.
    unfreeze : str or int
        Where training starts: a layer alias (``"block3"``: that block and every deeper one
        are trained; for MobileNetV2 features.4 on, all but the stem and the first two
        stages), a number of top blocks (0: the head only), or ``"all"``.
    epochs : int
        Training epochs at most (early stopping and `target_accuracy` may end sooner).
    lr, head_lr : float
        Peak learning rates of the pretrained layers and of the new head.
    weight_decay : float
        Weight decay (AdamW's decoupled one, or SGD's L2 term).
    optimizer : {"adamw", "sgd"}
        AdamW, or SGD with Nesterov momentum 0.9 (give it ~50x larger learning rates).
    batch_size : int
        Images per step.
    augment : bool
        Augment the training split (validation and test images never are).
    dropout : float
        Dropout before the head's linear layer.
    label_smoothing : float
        Label smoothing of the training loss (validation and test losses are plain).
    tta : {"flip", "none"}
        Test-time augmentation of validation, test and later predictions: ``"flip"``
        averages the probabilities of each image and its mirror image (twice the inference
        cost). Recorded in the checkpoint, so :func:`cnncodes.predict` does the same.
    train_bn : bool
        Let the BatchNorm layers of the trained blocks use batch statistics and update
        their running averages. By default every BatchNorm stays in inference mode (its
        scale and shift are still trained), as the Keras fine-tuning guide advises: batch
        statistics of small batches shift the pretrained features so much that a head
        initialised from a linear probe starts far below it (MobileNetV2 on flowers5: loss
        0.33 -> 2.4 on the same training images).
    val_fraction : float
        Fraction of the non-test images used for validation (at least one per class); 0
        trains on all of them, without early stopping (pass ``early_stopping=None``). With
        the default fixed schedule the last epoch is usually the one kept, and training on
        the validation images too scored 0.5-1.1 points higher on flowers5's held-out photos
        (three splits, ``benchmarks/RESULTS.md``); keep a validation split to watch a new
        recipe, to stop early, or to never fall below the linear probe.
    early_stopping : int or None
        Stop after this many epochs without a lower validation loss than the best trained
        epoch so far. The kept model is the best by validation loss (then accuracy), the
        initial one (`init_head`) included.
    target_accuracy : float, optional
        Stop as soon as the validation accuracy reaches it.
    test_size : float or None
        Held-out fraction, scored once with the kept model at the end; None holds out nothing.
    random_state : int
        Seeds the splits, the shuffling, the augmentation and dropout: a run is repeatable.
    init_head : path, fitted estimator or None
        The two-stage recipe: a code store (``.h5``) with the backbone's pre-logits codes
        (``block5`` for MobileNetV2, avg pooling) on which a logistic regression is fitted
        in seconds on the training split, or an already fitted logistic regression (a
        ``.skops`` file or estimator from :func:`cnncodes.fit`). Its weights, with the
        StandardScaler folded in, initialise the head: fine-tuning starts from the linear
        probe's accuracy instead of from chance. None starts from a random head.
    image_size : int, optional
        Crop size; the weights' own (224 for the ImageNet weights) when omitted.
    resume : bool
        Continue an interrupted run of the same settings (``out + ".resume"``) and return a
        finished one as it is; False trains from the start and overwrites `out`.
    precision : {"auto", "float32", "bfloat16", "float16"}
        Arithmetic of the forward and backward passes (autocast; the weights stay float32).
        ``"auto"``: bfloat16 where the hardware runs it natively, else float32.
    device, num_workers, max_pixels, progress
        As in :func:`cnncodes.extract`. Images are decoded and augmented in `num_workers`
        DataLoader processes.
    n_jobs : int, optional
        Parallel jobs of the logistic regression's cross-validation (`init_head` store).

    Returns
    -------
    FinetuneResult
        Per-epoch history, best epoch, held-out accuracy, checkpoint path; ``summary()``.

    Examples
    --------
    >>> from cnncodes import extract, finetune                                  # doctest: +SKIP
    >>> extract("flowers/", out="codes.h5", layers="block5")                     # doctest: +SKIP
    >>> r = finetune("flowers/", out="ft.pt", init_head="codes.h5", epochs=4)    # doctest: +SKIP
    >>> r.test_accuracy, r.best_epoch                                            # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    _check_args(epochs, lr, head_lr, batch_size, dropout, val_fraction, test_size, early_stopping,
                target_accuracy, weight_decay)
    if not 0 <= label_smoothing < 1:
        raise InvalidParameterError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
    if optimizer not in OPTIMIZERS:
        raise InvalidParameterError(f"unknown optimizer {optimizer!r}. Valid optimizers: {', '.join(OPTIMIZERS)}.")
    if tta not in TTAS:
        raise InvalidParameterError(f"unknown tta {tta!r}. Valid values: {', '.join(TTAS)}.")
    spec = get_backbone(backbone)
    if isinstance(unfreeze, str) and unfreeze.isdigit():
        unfreeze = int(unfreeze)
    _boundary(spec, unfreeze)  # an unknown alias fails before any image is read
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    w = resolve(spec, weights)
    prep = Preprocess.from_weights(weights_enum(spec)[w.preprocessing_from], image_size)
    out = Path(out)
    check_output(out, CHECKPOINT)  # before any image is read
    state_path = out.with_name(out.name + STATE_SUFFIX)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not resume:
        state_path.unlink(missing_ok=True)

    src = read_source(source, labels, root=root)
    if any(i.label is None for i in src.items):
        raise SourceError(f"fine-tuning needs labelled images, and {src.root} has none: give a folder with "
                          f"one subfolder per class, a CSV of path,label, or labels= for a list of paths.")
    workers = default_workers(len(src.items), batch_size) if num_workers in (None, "auto") else int(num_workers)
    all_shas, ok, failures = _scan(src.items, prep, max_pixels, workers, progress)
    items = [it for it, good in zip(src.items, ok) if good]
    shas = np.array([s for s, good in zip(all_shas, ok) if good], dtype=object)
    classes = sorted({it.label for it in items})
    class_index = {c: k for k, c in enumerate(classes)}
    y = np.array([class_index[it.label] for it in items], dtype=np.int64)
    _check_counts(classes, y, shas, test_size, val_fraction)
    train_rows, val_rows, test_rows = _split(y, shas, test_size, val_fraction, random_state, len(classes))

    config = {
        "backbone": spec.name, "weights": w.id, "weights_sha256": w.sha256, "unfreeze": unfreeze,
        "epochs": int(epochs), "lr": float(lr), "head_lr": float(head_lr), "weight_decay": float(weight_decay),
        "optimizer": optimizer,
        "batch_size": int(batch_size), "augment": bool(augment), "dropout": float(dropout),
        "train_bn": bool(train_bn), "label_smoothing": float(label_smoothing), "tta": tta,
        "val_fraction": float(val_fraction), "test_size": None if test_size is None else float(test_size),
        "random_state": int(random_state), "image_size": prep.crop_size,
        "init_head": _describe_init(init_head), "data": _fingerprint(items, shas, y),
    }
    counts = dict(n_train=len(train_rows), n_val=len(val_rows), n_test=len(test_rows))
    finished = _finished_run(out, state_path, config, resume)
    if finished is not None:
        result = _result_from(finished, out, failures, src.skipped, **counts)
        result.resumed_from = len(result.history)
        result.seconds = time.perf_counter() - t0
        return result

    with torch.random.fork_rng(devices=[]):  # the new head's random init is part of the run's seed
        torch.manual_seed(random_state)
        model, trainable = build_net(spec, w, len(classes), dropout=dropout, unfreeze=unfreeze, train_bn=train_bn)
    channels_last = dev.type == "cpu" and precision == "bfloat16"
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    groups = param_groups(model, lr, head_lr, weight_decay)
    opt = (torch.optim.AdamW(groups) if optimizer == "adamw"
           else torch.optim.SGD(groups, momentum=0.9, nesterov=True))
    steps_per_epoch = math.ceil(len(train_rows) / batch_size)
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, max(1, min(steps_per_epoch, total // 20))))
    # float16 gradients underflow without loss scaling; bfloat16 and float32 need none.
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "float16")

    paths = list(items)  # the images, wherever their bytes are

    def eval_loader(rows):
        dataset = _Photos([paths[r] for r in rows], y[rows], prep, None, max_pixels, strict=True)
        return _loader(dataset, batch_size, workers, device=dev)

    history: list[EpochStats] = []
    best = {"epoch": 0, "val_accuracy": -1.0, "val_loss": math.inf}
    best_state = None
    bad_epochs, start, init_record, initial_val = 0, 0, None, None
    saved = _load_state(state_path, config) if resume else None
    if saved is not None:
        model.net.load_state_dict(saved["state_dict"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["grad_scaler"])
        history = [EpochStats(**e) for e in saved["history"]]
        best, bad_epochs, start = saved["best"], saved["bad_epochs"], saved["epoch"]
        best_state, init_record, initial_val = saved["best_state_dict"], saved["init_head"], saved["initial_val"]
    else:
        if init_head is not None:
            test_shas = {shas[r] for r in test_rows}
            estimator, init_record = _init_head_estimator(init_head, spec, w, prep, classes, shas, y,
                                                          train_rows, test_shas, n_jobs)
            W, b = head_from_logreg(estimator, classes)
            with torch.no_grad():
                model.head_linear().weight.copy_(W)
                model.head_linear().bias.copy_(b)
        if len(val_rows) and init_head is not None:
            # The linear probe is a candidate too: fine-tuning never returns a model that is
            # worse than it on the validation split.
            loss, acc = _validate(model, eval_loader(val_rows), prep, dev, precision, channels_last, progress,
                                  tta=tta)
            initial_val = {"loss": loss, "accuracy": acc}
            best = {"epoch": 0, "val_accuracy": acc, "val_loss": loss}
            best_state = _cpu_state(model)
            if progress:
                tqdm.write(f"initial head: val loss {loss:.4f} acc {acc:.4f}")

    stopped = "epochs"
    train_set = _Photos([paths[r] for r in train_rows], y[train_rows],
                        _train_decode(prep) if augment else prep,
                        _augmentation(prep) if augment else None, max_pixels, strict=True)
    meta = dict(spec=spec, w=w, prep=prep, classes=classes, config=config, shas=shas, items=items,
                train_rows=train_rows, val_rows=val_rows, test_rows=test_rows, trainable=trainable,
                init_record=init_record, initial_val=initial_val, src=src, head=model.head,
                precision=precision)
    reason = _stop_reason(history, bad_epochs, early_stopping, target_accuracy, len(val_rows)) if start else None
    if reason:  # the interrupted run had decided to stop after its last saved epoch
        stopped, start = reason, epochs
    # reuse_freed_memory: the activations and gradients of every step reused, not faulted in anew
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), reuse_freed_memory():
        for epoch in range(start + 1, epochs + 1):
            torch.manual_seed(random_state * 100_003 + epoch)
            t_epoch = time.perf_counter()
            loader = _loader(train_set, batch_size, workers, shuffle=True, seed=random_state * 100_003 + epoch,
                             device=dev)
            train_loss, train_acc = _train_epoch(model, loader, opt, sched, prep, dev, precision, channels_last,
                                                 progress, f"epoch {epoch}/{epochs}", len(train_rows),
                                                 scaler=scaler, label_smoothing=label_smoothing)
            val_loss = val_acc = None
            if len(val_rows):
                val_loss, val_acc = _validate(model, eval_loader(val_rows), prep, dev, precision, channels_last,
                                              progress, tta=tta)
            lrs = {g["name"]: g["lr"] for g in opt.param_groups}
            stats = EpochStats(epoch, train_loss, train_acc, val_loss, val_acc, time.perf_counter() - t_epoch,
                               float(lrs.get("backbone", 0.0)), float(lrs["head"]))
            history.append(stats)
            # Validation loss decides (then accuracy): on a few hundred images it is far less
            # noisy than accuracy, whose ties and one-image steps picked worse epochs.
            improved = val_acc is None or (-val_loss, val_acc) > (-best["val_loss"], best["val_accuracy"])
            if improved:
                best = {"epoch": epoch, "val_accuracy": -1.0 if val_acc is None else val_acc,
                        "val_loss": math.inf if val_loss is None else val_loss}
                best_state = _cpu_state(model)
            bad_epochs = _epochs_since_best(history)
            if progress:
                val = "" if val_acc is None else f" | val loss {val_loss:.4f} acc {val_acc:.4f}"
                tqdm.write(f"epoch {epoch}/{epochs}: train loss {train_loss:.4f} acc {train_acc:.4f}{val}"
                           f" | {stats.seconds:.0f} s" + ("" if improved else f" (best: epoch {best['epoch']})"))
            reason = _stop_reason(history, bad_epochs, early_stopping, target_accuracy, len(val_rows))
            _write_state(state_path, model, opt, sched, scaler, config, epoch, history, best, bad_epochs, best_state,
                         init_record, initial_val)
            _write_checkpoint(out, best_state, best, history, False, stopped, None, meta)
            _end_of_epoch(epoch)
            if reason:
                stopped = reason
                break

    # The kept model: the best epoch by validation loss (the last one without validation).
    model.net.load_state_dict(best_state)
    test_acc = None
    if len(test_rows):
        with reuse_freed_memory():
            idx, logits, _, _ = _logits(model, eval_loader(test_rows), prep, dev, precision, channels_last,
                                        _bar(progress, len(test_rows), "test"), tta=tta)
        test_acc = float((logits.argmax(1).numpy() == y[test_rows][idx]).mean())
    _write_checkpoint(out, best_state, best, history, True, stopped, test_acc, meta)
    state_path.unlink(missing_ok=True)
    result = _result_from(read_checkpoint(out, mmap=True), out, failures, src.skipped, **counts)
    result.resumed_from = saved["epoch"] if saved is not None else 0
    result.seconds = time.perf_counter() - t0
    return result


def _end_of_epoch(epoch: int) -> None:
    """Called after each epoch's state is saved (a seam for tests that interrupt a run)."""


def _bar(progress, total, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=not progress, leave=False, dynamic_ncols=True)


def _cpu_state(model: FineTuneNet) -> dict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.net.state_dict().items()}


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
    from ._fit import split_groups

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


def _train_epoch(model, loader, opt, sched, prep, dev, precision, channels_last, progress, desc, n, *, scaler,
                 label_smoothing=0.0):
    bar = _bar(progress, n, desc)
    model.train()
    seen, loss_sum, correct = 0, 0.0, 0
    for batch in loader:
        x, target = _to_input(batch, prep, dev, channels_last), batch["y"].to(dev)
        with autocast(dev, precision):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        k = len(target)
        seen += k
        loss_sum += loss.item() * k
        correct += int((logits.argmax(1) == target).sum())
        bar.update(k)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}", refresh=False)
    bar.close()
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def _validate(model, loader, prep, dev, precision, channels_last, progress, tta="none"):
    n = len(loader.dataset)
    idx, logits, _, _ = _logits(model, loader, prep, dev, precision, channels_last, _bar(progress, n, "validate"),
                                tta=tta)
    target = torch.as_tensor(np.asarray(loader.dataset.labels)[idx])
    loss = float(nn.functional.cross_entropy(logits, target))
    return loss, float((logits.argmax(1) == target).float().mean())


def _epochs_since_best(history) -> int:
    """Epochs since the best trained epoch (validation loss, then accuracy).

    The initial model (a head from a linear probe) is a candidate for the model kept, but
    not the mark patience counts from: fine-tuning often dips below it for an epoch or two
    while the head adapts to augmented inputs and the warm-up raises the learning rate.
    """
    scored = [e for e in history if e.val_accuracy is not None]
    if not scored:
        return 0
    best = max(scored, key=lambda e: (-e.val_loss, e.val_accuracy))  # the first of equals
    return history[-1].epoch - best.epoch


def _stop_reason(history, bad_epochs, early_stopping, target_accuracy, n_val):
    if not history or not n_val:
        return None
    last = history[-1]
    if target_accuracy is not None and last.val_accuracy >= target_accuracy:
        return "target accuracy"
    if early_stopping is not None and bad_epochs >= early_stopping:
        return "early stopping"
    return None


def _write_state(path, model, opt, sched, scaler, config, epoch, history, best, bad_epochs, best_state, init_record,
                 initial_val):
    _save_atomic({
        "format": STATE_FORMAT, "format_version": CHECKPOINT_VERSION, "config": config, "epoch": epoch,
        "state_dict": _cpu_state(model), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "grad_scaler": scaler.state_dict(),
        "history": [asdict(e) for e in history], "best": best, "bad_epochs": bad_epochs,
        "best_state_dict": best_state, "init_head": init_record, "initial_val": initial_val,
    }, path)


def _write_checkpoint(out, state, best, history, complete, stopped, test_acc, m):
    from . import __version__

    items, shas = m["items"], m["shas"]
    fit_rows = np.concatenate([m["train_rows"], m["val_rows"]])
    _save_atomic({
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "backbone": m["spec"].name,
        "weights": m["w"].id,
        "weights_sha256": m["w"].sha256,
        "preprocessing_from": m["w"].preprocessing_from,
        "preprocessing": m["prep"].as_dict(),
        "head": m["head"],
        "precision": m["precision"],
        "tta": m["config"]["tta"],
        "classes": list(m["classes"]),
        "state_dict": state,
        "config": m["config"],
        "history": [asdict(e) for e in history],
        "best_epoch": int(best["epoch"]),
        "initial_val_accuracy": (m["initial_val"] or {}).get("accuracy"),
        "initial_val_loss": (m["initial_val"] or {}).get("loss"),
        "init_head": m["init_record"],
        "trainable": m["trainable"],
        "stopped": stopped,
        "complete": bool(complete),
        "test_accuracy": test_acc,
        "split": {"train": len(m["train_rows"]), "val": len(m["val_rows"]), "test": len(m["test_rows"])},
        "test_ids": [items[r].id for r in m["test_rows"]],
        "train_sha256": sorted({str(shas[r]) for r in fit_rows}),
        "data_root": os.path.abspath(m["src"].root),
        "cnncodes": __version__,
        "torch": str(torch.__version__),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }, out)


def _load_state(path: Path, config: dict) -> dict | None:
    if not path.exists():
        return None
    fix = (f"Delete {path.name} to start over (or pass resume=False / --restart).")
    obj = _torch_load(path, "training state", fix)
    if not isinstance(obj, dict) or obj.get("format") != STATE_FORMAT:
        raise CnnCodesError(f"{path.name} is not a cnncodes training state. {fix}")
    diff = _config_diff(obj["config"], config)
    if diff:
        raise CnnCodesError(f"{path.name} is an interrupted run with other settings ({diff}). Re-run with "
                            f"its settings to resume it, or pass resume=False (--restart) to start over.")
    return obj


def _config_diff(old: dict, new: dict) -> str:
    keys = [k for k in new if k not in _RUNTIME_KEYS and old.get(k) != new[k]]
    label = {"data": "the images"}
    return "; ".join(
        f"{label[k]} changed" if k in label else f"{k} {old.get(k)!r} then, {new[k]!r} now" for k in keys)


def _finished_run(out: Path, state_path: Path, config: dict, resume: bool):
    """The finished checkpoint at `out` if this very run is already done, else None."""
    if not resume or state_path.exists() or not out.exists():
        return None
    fix = "Pass resume=False (--restart) to overwrite it, or choose another output path."
    try:
        done = read_checkpoint(out, mmap=True)
    except WeightsError:
        raise CnnCodesError(f"{out} exists and is not a readable cnncodes fine-tuned checkpoint. {fix}") from None
    diff = _config_diff(done["config"], config)
    if diff or not done["complete"]:
        why = diff or "an unfinished run whose training state is gone"
        raise CnnCodesError(f"{out} exists and was trained with other settings ({why}). {fix}")
    return done


def _result_from(ckpt: dict, out, failures, skipped, *, n_train, n_val, n_test) -> FinetuneResult:
    history = [EpochStats(**e) for e in ckpt["history"]]
    return FinetuneResult(
        path=str(out), backbone=ckpt["backbone"], classes=list(ckpt["classes"]), history=history,
        best_epoch=int(ckpt["best_epoch"]), stopped=ckpt["stopped"], n_train=n_train, n_val=n_val, n_test=n_test,
        test_accuracy=ckpt["test_accuracy"], test_ids=list(ckpt["test_ids"]),
        initial_val_accuracy=ckpt["initial_val_accuracy"], initial_val_loss=ckpt["initial_val_loss"],
        init_head=ckpt["init_head"],
        trainable=dict(ckpt["trainable"]), failures=list(failures), skipped_files=list(skipped),
        precision=ckpt.get("precision", "float32"),
    )


# --------------------------------------------------------------------------- using a checkpoint


class FineTunedModel:
    """A loaded fine-tuned checkpoint: classify photos with the network itself.

    Made by :func:`cnncodes.load` for a ``.pt`` file from :func:`finetune`; accepted by
    :func:`cnncodes.predict` and :func:`cnncodes.evaluate`.
    """

    def __init__(self, path, ckpt: dict):
        self.path = str(path)
        self.backbone = ckpt["backbone"]
        self.classes = [str(c) for c in ckpt["classes"]]
        self.preprocessing = Preprocess(**{**ckpt["preprocessing"], "mean": tuple(ckpt["preprocessing"]["mean"]),
                                           "std": tuple(ckpt["preprocessing"]["std"])})
        self.train_sha256 = list(ckpt.get("train_sha256") or [])
        self.tta = ckpt.get("tta", "none")
        self.meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
        self._state = ckpt["state_dict"]
        self._net = None

    def __repr__(self) -> str:
        return f"FineTunedModel({self.path!r}, backbone={self.backbone!r}, classes={self.classes})"

    def network(self) -> FineTuneNet:
        """The fine-tuned torch module (eval mode, CPU), built once."""
        if self._net is None:
            spec = get_backbone(self.backbone)
            net = finish_model(spec, build_model(spec, pretrained=True))
            head = _replace_head(net, len(self.classes), 0.0)
            try:
                net.load_state_dict(self._state)
            except RuntimeError as exc:
                raise WeightsError(f"{self.path} does not fit {self.backbone} with a {len(self.classes)}-class "
                                   f"head: {exc}. The file is damaged or was edited; fine-tune again.") from None
            self._net = FineTuneNet(net, head, []).eval()
        return self._net

    def predict_images(self, images, *, batch_size: int = 32, device="auto", precision: str = "auto",
                       num_workers="auto", progress: bool = False, labels=None, root=None, tta=None):
        """Class probabilities of images.

        ``precision="auto"`` is float32 for a network trained in float32, else the fastest
        precision of this device (as for training); `tta` is the checkpoint's unless given.

        Returns
        -------
        items : list of Item
            The images that were read, in the order of `proba`.
        proba : ndarray of shape (n, n_classes)
        sha256 : list of str
        failures : list of (id, reason)
        """
        src = read_source(images, labels, root=root)
        dev = resolve_device(device)
        if precision == "auto" and self.meta.get("precision") == "float32":
            precision = "float32"  # as trained: the scores repeat those of the training run
        precision = resolve_precision(precision, dev)
        channels_last = dev.type == "cpu" and precision == "bfloat16"
        net = self.network().to(dev)
        if channels_last:
            net.to(memory_format=torch.channels_last)
        workers = default_workers(len(src.items), batch_size) if num_workers in (None, "auto") else int(num_workers)
        loader = _loader(_Photos(src.items, None, self.preprocessing, storage_options=src.storage_options), batch_size, workers,
                         device=dev)
        idx, logits, shas, failed = _logits(net, loader, self.preprocessing, dev, precision, channels_last,
                                            _bar(progress, len(src.items), "predict"), tta=tta or self.tta)
        failures = [(src.items[i].id, why) for i, _, why in failed]
        proba = torch.softmax(logits, dim=1).numpy() if len(idx) else np.zeros((0, len(self.classes)))
        return [src.items[i] for i in idx], proba, shas, failures


def load_finetuned(path) -> FineTunedModel:
    """Read a fine-tuned checkpoint for prediction (``torch.load(weights_only=True)``)."""
    return FineTunedModel(path, read_checkpoint(path))


def predict_finetuned(model: FineTunedModel, images, *, top_k: int = 1, progress: bool = False, **run):
    """Top-k labels of photos by a fine-tuned network (see :func:`cnncodes.predict`)."""
    from ._model import Prediction, Predictions, all_failed_error

    items, proba, _, failures = model.predict_images(images, progress=progress, **run)
    if failures and not items:
        raise all_failed_error(failures)
    if failures:
        warnings.warn(f"{len(failures)} images could not be read and are left out: "
                      + "; ".join(f"{i} ({why})" for i, why in failures[:5]), stacklevel=3)
    classes = np.asarray(model.classes)
    k = max(1, min(top_k, len(classes)))
    order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    return Predictions([Prediction(item.id, [str(c) for c in classes[o]], [float(p) for p in proba[i, o]])
                        for i, (item, o) in enumerate(zip(items, order))], failures)


def _file_sha256(item) -> str | None:
    try:
        return hashlib.sha256(read_bytes(item)).hexdigest()
    except OSError:
        return None


def evaluate_finetuned(model: FineTunedModel, data, *, progress: bool = False, n_resamples: int = N_RESAMPLES,
                       confidence: float = CONFIDENCE, random_state=0, **run):
    """Accuracy of a fine-tuned network on a labelled folder, leaving out its training content.

    `run`: batch_size, device, num_workers of :meth:`FineTunedModel.predict_images`;
    `n_resamples`, `confidence`, `random_state`: the intervals, as in :func:`cnncodes.evaluate`.
    """
    from ._model import evaluation

    path = Path(data)
    if path.is_file() and path.suffix.lower() in (".h5", ".hdf5"):
        raise CnnCodesError(f"{Path(model.path).name} is a fine-tuned network: it classifies images, not "
                            f"codes. Evaluate it on a labelled folder (one subfolder per class) or a CSV.")
    src = read_source(data)
    labelled = [it for it in src.items if it.label is not None]
    on = f"all labelled images of {path}"
    if model.train_sha256:
        # Hash first and run the network on the held-out images only: on the training folder
        # that is a quarter of the work. An unreadable file stays in and is reported below.
        from concurrent.futures import ThreadPoolExecutor

        seen = set(model.train_sha256)
        with ThreadPoolExecutor(max_workers=8) as pool:
            hashes = list(pool.map(_file_sha256, labelled))
        held = [it for it, h in zip(labelled, hashes) if h not in seen]
        if len(held) < len(labelled):
            on = f"{len(held)} held-out images of {path} (content not used in training)"
        labelled = held
    if not labelled:
        raise CnnCodesError(f"nothing to evaluate in {path}: no labelled images outside the training set.")
    subset = Source(src.root, labelled, src.kind, remote=src.remote, storage_options=src.storage_options)
    items, proba, _, failures = model.predict_images(subset, progress=progress, **run)
    if failures:
        warnings.warn(f"{len(failures)} images could not be read and are left out: "
                      + "; ".join(f"{i} ({why})" for i, why in failures[:5]), stacklevel=3)
    if not items:
        raise CnnCodesError(f"nothing to evaluate in {path}: none of its held-out images could be read.")
    y = np.array([it.label for it in items], dtype=str)
    pred = np.asarray(model.classes)[proba.argmax(1)]
    return evaluation(y, pred, model.classes, on, ids=[it.id for it in items], proba=proba,
                      proba_classes=list(model.classes), root=src.root,
                      provenance={"model": Path(model.path).name, "model file": str(model.path)},
                      n_resamples=n_resamples, confidence=confidence, random_state=random_state)

