"""The backbone registry by name: the built-in torchvision backbones (`spec`), timm models
and registered modules (`custom`); their layer tables, code sizes and shapes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cnncodes._backbones.spec import (  # noqa: F401 - re-exported: the registry's types and torchvision helpers
    _REGISTRY,
    BackboneSpec,
    LayerInfo,
    finish_model,
    weights_enum,
    weights_names,
)
from cnncodes._choices import POOLINGS, SPP_LEVELS, TOKEN_POOLINGS, check_pooling  # noqa: F401 - re-exported
from cnncodes._errors import CnnCodesError, UnknownBackboneError

if TYPE_CHECKING:
    from torch import nn

# The registry is plain data, without torch: `cnncodes backbones` lists it in a blink. torch
# and torchvision are imported by the functions that build or trace a network; the network
# wrappers that subclass torch's modules live in codes_model.py.



def list_backbones() -> list[str]:
    """Return the names of the built-in backbones and those given to `register_backbone`, sorted."""
    import sys

    custom = sys.modules.get(f"{__package__}.custom")  # not imported: nothing registered (and no torch)
    return sorted([*_REGISTRY, *(custom.registered_names() if custom else ())])


def get_backbone(name: str) -> BackboneSpec:
    """Return the registry entry of a backbone, or raise with the valid names.

    Besides the built-ins: networks given to :func:`cnncodes.register_backbone`, and timm
    models as ``"timm:<model name>"``.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    from cnncodes._backbones.custom import find_backbone

    spec = find_backbone(name)
    if spec is None:
        raise UnknownBackboneError(
            f"unknown backbone {name!r}. Valid backbones: {', '.join(list_backbones())}; or a timm "
            f"model as 'timm:<model name>', or your own nn.Module (cnncodes.register_backbone)."
        )
    return spec


def build_model(spec: BackboneSpec, *, pretrained: bool) -> "nn.Module":
    """Build the backbone's architecture without weights, shaped like the pretrained one."""
    return spec.build(pretrained=pretrained)


def graph_nodes(name: str) -> tuple[str, ...]:
    """Return the layer names a backbone accepts (eval mode), shallow to deep, without weights.

    For a torchvision backbone, the FX graph node names plus the module paths that hold them
    ("features.14", "layer3"), each placed after its last node; for a timm model or a
    registered module, its module paths.
    """
    return get_backbone(name).nodes()


def default_image_size(spec: BackboneSpec) -> int:
    """Return the crop size of the backbone's default weights (a registered module's own)."""
    return spec.image_size()


def shallow_to_deep(spec: "BackboneSpec", infos) -> list:
    """`infos` (LayerInfo) in graph order; registered aliases need no trace of the model."""
    index = {info.node: k for k, info in enumerate(spec.layers)}  # registered shallow to deep
    if not all(info.node in index for info in infos):
        index = {node: k for k, node in enumerate(graph_nodes(spec.name))}
    return sorted(infos, key=lambda info: index[info.node])


def output_shapes(name: str, nodes: tuple[str, ...], image_size: int, *, traced: bool = False) -> dict[str, tuple]:
    """Return the per-image output shape of each node for a square input, on the meta device.

    A torchvision backbone's registered nodes at its default crop come from the snapshot in
    `tv_weights` (no torchvision import); `traced=True` always traces.
    """
    return get_backbone(name).shapes(tuple(nodes), image_size, traced)


def code_sizes(spec: "BackboneSpec", infos, pooling: str, image_size: int) -> dict[str, int]:
    """The code length of each layer (LayerInfo) by alias.

    A pooled registered layer's code is as long as its channels: no trace of the model (0.1 s
    of each fresh process's start for MobileNetV2). Raw nodes and "flatten" need the shapes.
    """
    if pooling in ("avg", "max", "gem") and spec.traced and all(info.channels > 0 for info in infos):
        return {info.alias: info.channels for info in infos}
    shapes = output_shapes(spec.name, tuple(info.node for info in infos), image_size)
    return {info.alias: code_size(shapes[info.node], pooling, spec.prefix_tokens, where=f"{spec.name} {info.alias}")
            for info in infos}


def code_size(shape: tuple, pooling: str, prefix_tokens: int = 0, where: str = "this layer") -> int:
    """Return the length of a code vector for a node output shape and a pooling.

    `shape` is one image's output: (C,) a vector, (C, H, W) a feature map, (N, C) the N
    tokens of a ViT block, of which the first `prefix_tokens` are class / register tokens.
    """
    if len(shape) == 1:
        return shape[0]
    tokens = len(shape) == 2
    if pooling in TOKEN_POOLINGS and not tokens:
        raise CnnCodesError(f"pooling {pooling!r} needs the token outputs of a ViT block, but {where} gives "
                            f"a {'x'.join(map(str, shape))} feature map: use avg, max, gem, flatten or spp.")
    if pooling == "spp" and tokens:
        raise CnnCodesError(f"pooling 'spp' needs a feature map, but {where} gives {shape[0]} tokens of "
                            f"{shape[1]}: use cls, avg or cls+avg (patch tokens averaged).")
    channels = shape[-1] if tokens else shape[0]
    if pooling == "flatten":
        n = channels
        for s in (shape[:1] if tokens else shape[1:]):
            n *= s - prefix_tokens if tokens else s
        return n
    if pooling == "spp":
        return channels * sum(k * k for k in SPP_LEVELS)
    return 2 * channels if pooling == "cls+avg" else channels


def layer_table(name: str, *, pooling: str = "avg", image_size: int | None = None) -> list[dict]:
    """Return the alias table of a backbone: alias, node, channels, stride, output, code size.

    Parameters
    ----------
    name : str
        A registered backbone, e.g. ``"resnet50"``, a timm model (``"timm:resnet18"``) or a
        network given to :func:`register_backbone`.
    pooling : {"avg", "max", "gem", "flatten", "spp", "cls", "cls+avg"}
        The pooling whose code size is reported (``cls`` and ``cls+avg``: token outputs only,
        ``spp``: feature maps only).
    image_size : int, optional
        Input side in pixels; the default weights' crop size when omitted.

    Examples
    --------
    >>> [row["alias"] for row in layer_table("resnet50")]
    ['block1', 'block2', 'block3', 'block4', 'block5']
    """
    check_pooling(pooling)
    spec = get_backbone(name)
    size = image_size or default_image_size(spec)
    shapes = output_shapes(name, tuple(i.node for i in spec.layers), size)
    return [
        {
            "alias": info.alias,
            "node": info.node,
            "channels": info.channels,
            "stride": info.stride,
            "output": shapes[info.node],
            "code_size": code_size(shapes[info.node], pooling, spec.prefix_tokens, f"{name} {info.alias}"),
            "default": info.alias == spec.default_layer,
        }
        for info in spec.layers
    ]

