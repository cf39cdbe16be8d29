"""Backbones beyond torchvision's nine: your own nn.Module (by name) and timm models ("timm:<name>").

Neither is traced with FX: each tap point is a module path whose output a forward hook reads
(`codes_model.HookedCodesModel`). A registered module runs with the parameters it holds, and a
store records the sha256 of its state dict; a timm model gets its tap points (``block1`` …
``blockN``, the stage ends of timm's ``feature_info``) and its preprocessing
(``resolve_data_config``) from timm itself.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, replace
from functools import lru_cache

from cnncodes._backbones.spec import _REGISTRY, BackboneSpec, LayerInfo
from cnncodes._errors import CnnCodesError, UnknownBackboneError, UnknownLayerError
from cnncodes._input.images import Preprocess

TIMM_PREFIX = "timm:"
# torchvision's ImageNet preprocessing: what a module given without one gets.
IMAGENET_PREPROCESS = Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class CustomSpec(BackboneSpec):
    """A timm model or a registered nn.Module: tap points are module paths, read with forward
    hooks; its network, crop and shapes come from its entry here, not from torchvision."""

    def build(self, *, pretrained: bool = False):
        return build_custom(self)

    def nodes(self) -> tuple[str, ...]:
        return module_paths(self)

    def image_size(self) -> int:
        return custom_image_size(self)

    def shapes(self, nodes: tuple[str, ...], image_size: int, traced: bool = False) -> dict[str, tuple]:
        return hooked_shapes(self, tuple(nodes), image_size)


@dataclass(frozen=True)
class _Entry:
    spec: BackboneSpec
    prep: Preprocess  # at the network's own input size
    module: object = None  # the registered nn.Module; None for timm (built on demand)


_MODULES: dict[str, _Entry] = {}


def registered_names() -> list[str]:
    """Names given to `register_backbone` in this process."""
    return list(_MODULES)


def find_backbone(name: str) -> BackboneSpec | None:
    """The spec of a registered module or of ``"timm:<model>"``; None if neither."""
    if name in _MODULES:
        return _MODULES[name].spec
    if name.startswith(TIMM_PREFIX):
        return _timm_entry(name).spec
    return None


def _entry(spec: BackboneSpec) -> _Entry:
    return _MODULES[spec.name] if spec.source == "module" else _timm_entry(spec.name)


# ----------------------------------------------------------------------------- your module


def _as_preprocess(preprocessing, image_size: int | None) -> Preprocess:
    """A `Preprocess` from one, from a torchvision transform preset, or ImageNet's (None)."""
    if preprocessing is None:
        prep = IMAGENET_PREPROCESS
    elif isinstance(preprocessing, Preprocess):
        prep = preprocessing
    elif all(hasattr(preprocessing, a) for a in ("crop_size", "resize_size", "mean", "std")):
        t = preprocessing  # torchvision's ImageClassification (weights.transforms())
        interp = getattr(t, "interpolation", "bilinear")
        prep = Preprocess(int(t.resize_size[0]), int(t.crop_size[0]), tuple(t.mean), tuple(t.std),
                          getattr(interp, "value", str(interp)), bool(getattr(t, "antialias", True)))
    else:
        raise CnnCodesError(
            f"preprocessing must be a cnncodes Preprocess, a torchvision transform preset "
            f"(weights.transforms(): resize_size, crop_size, mean, std) or None (ImageNet's), "
            f"got a {type(preprocessing).__name__}.")
    return scaled(prep, image_size) if image_size else prep


def scaled(prep: Preprocess, image_size: int | None, jpeg_draft: bool | None = None,
           resize: str | None = None) -> Preprocess:
    """`prep` at another crop size (resize/crop ratio kept), and the decoding options."""
    changes = {}
    if image_size is not None:
        changes.update(resize_size=int(round(image_size * prep.resize_size / prep.crop_size)),
                       crop_size=int(image_size))
    if jpeg_draft is not None:
        changes["jpeg_draft"] = bool(jpeg_draft)
    if resize is not None:
        changes["resize"] = resize
    return replace(prep, **changes)


def register_backbone(name: str, model, *, layers, preprocessing=None, image_size: int | None = None,
                      default_layer: str | None = None, prefix_tokens: int = 0) -> str:
    """Make an ``nn.Module`` a backbone: ``extract(..., backbone=name)`` then reads its codes.

    Parameters
    ----------
    name : str
        The name stores record (``"my-net"``); not one of the built-in backbones.
    model : torch.nn.Module
        The network, with the parameters it should run with (load your checkpoint first).
        It is put in eval mode; a store records the sha256 of its state dict and refuses
        rows of a network with other parameters.
    layers : mapping of str to str, or sequence of str
        Tap points, shallow to deep: alias -> module path (``{"block4": "layer3"}``), or
        module paths (each its own alias). Any module path of `model` is accepted later too.
    preprocessing : Preprocess or torchvision transform preset, optional
        Resize, crop, mean and std the network expects; ImageNet's (256 / 224) by default.
    image_size : int, optional
        Crop side in pixels, if not the preprocessing's own.
    default_layer : str, optional
        The alias read when no layer is asked for; the deepest by default.
    prefix_tokens : int
        For a transformer whose blocks output tokens: how many leading tokens (class,
        register) are not patch tokens.

    Returns
    -------
    str
        `name`.

    Examples
    --------
    >>> import torchvision                                                     # doctest: +SKIP
    >>> net = torchvision.models.resnet18(num_classes=4)                       # doctest: +SKIP
    >>> net.load_state_dict(torch.load("mine.pt"))                             # doctest: +SKIP
    >>> register_backbone("my-net", net, layers={"block4": "layer3", "block5": "avgpool"})  # doctest: +SKIP
    >>> extract("photos/", out="codes.h5", backbone="my-net", layers="block5")  # doctest: +SKIP
    """
    from torch import nn

    if not isinstance(name, str) or not name or name in _REGISTRY or name.startswith(TIMM_PREFIX):
        raise UnknownBackboneError(
            f"cannot register a backbone as {name!r}: give a new name, not empty, not a built-in "
            f"backbone and not starting with {TIMM_PREFIX!r} (e.g. name='my-net').")
    if not isinstance(model, nn.Module):
        raise CnnCodesError(f"register_backbone needs a torch.nn.Module, got a {type(model).__name__}.")
    pairs = list(layers.items()) if hasattr(layers, "items") else [(p, p) for p in (layers or ())]
    if not pairs:
        raise UnknownLayerError(f"register_backbone({name!r}) needs layers: alias -> module path, "
                                f"e.g. layers={{'block4': 'layer3'}}.")
    paths = {n for n, _ in model.named_modules() if n}
    for alias, path in pairs:
        if path not in paths:
            raise UnknownLayerError(
                f"{name}: {path!r} (layer {alias!r}) is not a module of this network. Module paths "
                f"it has: {', '.join(sorted(paths)[:12])}{' ...' if len(paths) > 12 else ''}.")
    prep = _as_preprocess(preprocessing, image_size)
    model.eval()
    spec = CustomSpec(name, "", tuple(LayerInfo(a, p, -1, None) for a, p in pairs),
                        default_layer or pairs[-1][0], source="module", prefix_tokens=int(prefix_tokens))
    _MODULES[name] = _Entry(spec, prep, model)
    shapes = hooked_shapes(spec, tuple(p for _, p in pairs), prep.crop_size)
    infos = tuple(LayerInfo(a, p, *_channels_stride(shapes[p], prep.crop_size)) for a, p in pairs)
    _MODULES[name] = _Entry(replace(spec, layers=infos), prep, model)
    return name


def _channels_stride(shape: tuple, image_size: int) -> tuple[int, int | None]:
    if len(shape) == 3 and shape[1:] != (1, 1):  # a (C, H, W) feature map
        return shape[0], max(1, round(image_size / shape[1]))
    return (shape[0] if len(shape) == 3 else shape[-1]), None  # a vector, a 1x1 map, or (N, C) tokens


def state_dict_sha256(model) -> str:
    """The sha256 of a module's state dict: names, dtypes, shapes and bytes, in key order."""
    import torch

    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- timm


def import_timm():
    """Import timm, or raise one line saying how to install it."""
    from cnncodes._optional import require

    timm = require("timm", "a timm backbone ('timm:<model name>')")
    require("timm.data", "a timm backbone ('timm:<model name>')")
    return timm


def _timm_kwargs(model_name: str) -> dict:
    # ViTs accept other input sizes than their pretraining's (position embeddings resampled);
    # at the pretraining size the network is the same.
    arch = model_name.split(".")[0]
    return {"dynamic_img_size": True} if any(k in arch for k in ("vit", "deit", "eva", "beit")) else {}


def _create_timm(model_name: str, *, pretrained: bool = False, meta: bool = False):
    import torch

    timm = import_timm()
    kwargs = _timm_kwargs(model_name)
    try:
        if meta:
            with torch.device("meta"):
                return timm.create_model(model_name, pretrained=False, **kwargs)
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except TypeError:  # a model without dynamic_img_size
        if meta:
            with torch.device("meta"):
                return timm.create_model(model_name, pretrained=False)
        return timm.create_model(model_name, pretrained=pretrained)


@lru_cache(maxsize=32)
def _timm_entry(name: str) -> _Entry:
    timm = import_timm()
    model_name = name[len(TIMM_PREFIX):]
    if not timm.is_model(model_name.split(".")[0]):
        close = timm.list_models(f"*{model_name.split('.')[0][:6]}*")[:8]
        raise UnknownBackboneError(
            f"timm has no model {model_name!r}. Similar names: {', '.join(close) or 'none'}; "
            f"timm.list_models('*pattern*') lists them all.")
    model = _create_timm(model_name, meta=True)
    infos = tuple(LayerInfo(f"block{k + 1}", f["module"], int(f["num_chs"]), int(f["reduction"]))
                  for k, f in enumerate(model.feature_info))
    cfg = timm.data.resolve_data_config({}, model=model)
    side = int(cfg["input_size"][-1])
    prep = Preprocess(int(side / cfg["crop_pct"]), side, tuple(cfg["mean"]), tuple(cfg["std"]),
                      str(cfg["interpolation"]), True)
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    return _Entry(CustomSpec(name, "", infos, infos[-1].alias, source="timm", prefix_tokens=prefix), prep)


# ----------------------------------------------------------------------------- shared


def custom_image_size(spec: BackboneSpec) -> int:
    """The crop side the network expects."""
    return _entry(spec).prep.crop_size


def preprocess(spec: BackboneSpec, image_size, jpeg_draft, resize) -> Preprocess:
    """The network's preprocessing at `image_size` (None: its own), with the decoding options."""
    return scaled(_entry(spec).prep, image_size, jpeg_draft, resize)


def build_custom(spec: BackboneSpec):
    """The network with random (timm) or its own (module) parameters, for shapes and loading."""
    entry = _entry(spec)
    return entry.module if entry.module is not None else _create_timm(spec.name[len(TIMM_PREFIX):])


def _meta_copy(model):
    """A copy of `model` whose parameters and buffers are on the meta device (no data copied)."""
    import torch

    memo = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def module_paths(spec: BackboneSpec) -> tuple[str, ...]:
    """The module paths of the network, in definition order (the layer names it accepts)."""
    entry = _entry(spec)
    model = entry.module if entry.module is not None else _create_timm(spec.name[len(TIMM_PREFIX):], meta=True)
    return tuple(n for n, _ in model.named_modules() if n)


def hooked_shapes(spec: BackboneSpec, nodes: tuple[str, ...], image_size: int) -> dict[str, tuple]:
    """Per-image output shape of each module path for a square input, on the meta device."""
    import torch

    from cnncodes._backbones.codes_model import run_hooked

    entry = _entry(spec)
    if entry.module is not None:
        model = _meta_copy(entry.module)
    else:
        model = _create_timm(spec.name[len(TIMM_PREFIX):], meta=True)
    with torch.no_grad():
        out = run_hooked(model.eval(), list(nodes), torch.empty(1, 3, image_size, image_size, device="meta"))
    return {n: tuple(out[n].shape[1:]) for n in nodes}
