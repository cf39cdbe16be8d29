"""The network fine-tuned: a backbone with a new head, its frozen blocks, its optimizer groups, its logits."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from cnncodes._extract.accel import autocast
from cnncodes._backbones.registry import graph_nodes
from cnncodes._errors import CnnCodesError, InvalidParameterError
from cnncodes._backbones.weights import load_model
from ._data import to_input


def _classifier_path(net: nn.Module) -> str:
    """The module path of the backbone's ImageNet classifier: its last Linear layer."""
    last = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:  # pragma: no cover - every registered backbone ends in a Linear
        raise CnnCodesError(f"{type(net).__name__} has no Linear classifier to replace.")
    return last


def replace_head(net: nn.Module, n_classes: int, dropout: float) -> str:
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


def boundary(spec, unfreeze) -> tuple[int, str]:
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
            raise InvalidParameterError(f"unfreeze={n} is out of range for {spec.name}, which has {len(aliases)} "
                                f"blocks. {hint}")
        if n == 0:
            return len(order), "the head only"
        if n == len(aliases):
            return -1, aliases[0]
        return order[spec.layers[len(aliases) - n - 1].node], aliases[len(aliases) - n]
    if unfreeze == "all":
        return -1, "all"
    if unfreeze not in aliases:
        raise InvalidParameterError(f"unfreeze {unfreeze!r} is not a block of {spec.name}. {hint}")
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
    last_frozen, first = boundary(spec, unfreeze)
    net = load_model(spec, weights)
    order = {name: k for k, name in enumerate(graph_nodes(spec.name))}
    head = replace_head(net, n_classes, dropout)
    trained = total = 0
    for name, p in net.named_parameters():
        train = name.startswith(head + ".") or _owner_position(name, order) > last_frozen
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


@torch.inference_mode()
def predict_logits(model, loader, prep, dev, precision, channels_last, bar=None, tta="none"):
    """Run images through the model in eval mode: (indices, float32 logits, sha256s, failures).

    With ``tta="flip"`` the logits are the log of the mean of the probabilities of each image
    and its mirror image (log-probabilities: softmax and cross-entropy apply unchanged).
    """
    model.eval()
    idx, out, shas, failed = [], [], [], []
    for batch in loader:
        failed += batch["failed"]
        if batch["x"] is not None:
            x = to_input(batch, prep, dev, channels_last)
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
