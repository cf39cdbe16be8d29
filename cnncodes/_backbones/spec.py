"""What a backbone is: its tap points (`LayerInfo`), its spec (`BackboneSpec`), the built-in
torchvision backbones as data, and how a torchvision network is built and traced. Plain data
until a network is needed: torch and torchvision are imported by the functions that build or
trace one. Timm models and registered modules subclass the spec in `custom`."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from cnncodes._errors import UnknownLayerError
from cnncodes._spec import find_alias

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class LayerInfo:
    """One tap point of a backbone: alias -> FX node, channels and nominal stride."""

    alias: str
    node: str
    channels: int
    stride: int | None  # None for vector (fully connected) outputs


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: its torchvision builder, weights and tap points."""

    name: str
    weights_enum: str  # name of the torchvision weights enum, e.g. "ResNet50_Weights"
    layers: tuple[LayerInfo, ...]
    default_layer: str  # alias of the pre-logits features
    builder_kwargs: tuple[tuple[str, object], ...] = ()
    # "torchvision" (traced with FX), "timm" or "module" (a registered nn.Module): the last two
    # are read with forward hooks on module paths (see custom.py).
    source: str = "torchvision"
    prefix_tokens: int = 0  # leading class / register tokens of token outputs (ViTs)

    @property
    def traced(self) -> bool:
        """Whether tap points are FX graph nodes (torchvision) rather than module paths."""
        return self.source == "torchvision"

    # What a backbone does with its network; a timm model or a registered nn.Module
    # (`custom.CustomSpec`) does it with forward hooks on module paths instead.

    def build(self, *, pretrained: bool) -> "nn.Module":
        """The architecture without weights, shaped like the pretrained one (`build_torchvision`)."""
        return build_torchvision(self, pretrained=pretrained)

    def nodes(self) -> tuple[str, ...]:
        """The layer names the backbone accepts, shallow to deep (FX nodes and module paths)."""
        return _graph_nodes(self.name)

    def image_size(self) -> int:
        """The crop side of the default ImageNet weights."""
        return int(weights_names(self).DEFAULT.transforms().crop_size[0])

    def shapes(self, nodes: tuple[str, ...], image_size: int, traced: bool = False) -> dict[str, tuple]:
        """Per-image output shape of each node for a square input: registered nodes at the
        default crop from the torchvision snapshot, else traced on the meta device."""
        return _output_shapes(self.name, tuple(nodes), image_size, traced)

    def layer(self, name: str) -> LayerInfo:
        """Return the tap point for an alias or raw FX node name."""
        if name in ("default", None):
            name = self.default_layer
        alias = find_alias({info.alias: info.node for info in self.layers}, name)
        if alias is not None:
            return next(info for info in self.layers if info.alias == alias)
        if name in self.nodes():
            return LayerInfo(alias=name, node=name, channels=-1, stride=None)
        aliases = ", ".join(i.alias for i in self.layers)
        raise UnknownLayerError(
            f"layer {name!r} is not an alias or a graph node of {self.name}. "
            f"Valid aliases: {aliases}. Raw node names are accepted too: "
            f"run `cnncodes layers {self.name} --nodes` to list them."
        )


def _stages(*rows):
    return tuple(LayerInfo(*row) for row in rows)


def _resnet(name, enum, widths):
    chans = (64, *widths)
    nodes = ("relu", "layer1", "layer2", "layer3", "layer4")
    rows = [(f"block{i + 1}", n, c, 2 ** (i + 1)) for i, (n, c) in enumerate(zip(nodes, chans))]
    return BackboneSpec(name, enum, _stages(*rows), "block5")


_REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "mobilenet_v2",
            "MobileNet_V2_Weights",
            _stages(
                ("block1", "features.1", 16, 2),
                ("block2", "features.3", 24, 4),
                ("block3", "features.6", 32, 8),
                ("block4", "features.13", 96, 16),
                ("block5", "features.18", 1280, 32),
            ),
            "block5",
        ),
        _resnet("resnet18", "ResNet18_Weights", (64, 128, 256, 512)),
        _resnet("resnet50", "ResNet50_Weights", (256, 512, 1024, 2048)),
        _resnet("resnet101", "ResNet101_Weights", (256, 512, 1024, 2048)),
        BackboneSpec(
            "vgg16",
            "VGG16_Weights",
            _stages(
                ("block1", "features.4", 64, 2),
                ("block2", "features.9", 128, 4),
                ("block3", "features.16", 256, 8),
                ("block4", "features.23", 512, 16),
                ("block5", "features.30", 512, 32),
                ("fc1", "classifier.1", 4096, None),
                ("fc2", "classifier.4", 4096, None),
            ),
            "fc2",
        ),
        BackboneSpec(
            "inception_v3",
            "Inception_V3_Weights",
            _stages(
                ("block1", "Conv2d_2b_3x3", 64, 2),
                ("block2", "Conv2d_4a_3x3", 192, 4),
                ("block3", "Mixed_5d", 288, 8),
                ("block4", "Mixed_6e", 768, 16),
                ("block5", "Mixed_7c", 2048, 32),
            ),
            "block5",
        ),
        BackboneSpec(
            "efficientnet_b0",
            "EfficientNet_B0_Weights",
            _stages(
                ("block1", "features.1", 16, 2),
                ("block2", "features.2", 24, 4),
                ("block3", "features.3", 40, 8),
                ("block4", "features.5", 112, 16),
                ("block5", "features.8", 1280, 32),
            ),
            "block5",
        ),
        BackboneSpec(
            "convnext_tiny",
            "ConvNeXt_Tiny_Weights",
            _stages(
                ("block1", "features.1", 96, 4),
                ("block2", "features.3", 192, 8),
                ("block3", "features.5", 384, 16),
                ("block4", "features.7", 768, 32),
            ),
            "block4",
        ),
        BackboneSpec(
            "densenet121",
            "DenseNet121_Weights",
            _stages(
                ("block1", "features.relu0", 64, 2),
                ("block2", "features.denseblock1", 256, 4),
                ("block3", "features.denseblock2", 512, 8),
                ("block4", "features.denseblock3", 1024, 16),
                ("block5", "relu", 1024, 32),
            ),
            "block5",
        ),
    )
}


def weights_enum(spec: BackboneSpec):
    """Return torchvision's weights enum class for a backbone."""
    import torchvision.models as tvm

    return getattr(tvm, spec.weights_enum)


def weights_names(spec: BackboneSpec):
    """Return the backbone's weights enum for names, files and preprocessing only.

    While torchvision is not imported this is a snapshot of it (see tv_weights.py): resolving a
    weights name and building the preprocessing then cost no torchvision import (1-2 s).
    """
    from cnncodes._backbones.tv_weights import weights_table

    return weights_table(spec.weights_enum)


def build_torchvision(spec: BackboneSpec, *, pretrained: bool) -> nn.Module:
    """Build the torchvision architecture without weights, shaped like the pretrained one.

    torchvision changes some constructor arguments when it loads weights (InceptionV3
    re-normalises its input and carries the auxiliary head); we mirror that so that a
    checkpoint loaded afterwards fits and behaves as `get_model(name, weights=...)` would.
    """
    from torchvision.models import get_model

    kwargs: dict = dict(spec.builder_kwargs)
    if spec.name == "inception_v3":
        kwargs.update(aux_logits=True, init_weights=False, transform_input=pretrained)
    return get_model(spec.name, weights=None, **kwargs)


def finish_model(spec: BackboneSpec, model: nn.Module) -> nn.Module:
    """Drop training-only parts after the weights are loaded; return the model in eval mode."""
    if spec.name == "inception_v3":
        model.aux_logits = False
        model.AuxLogits = None
    return model.eval()


@lru_cache(maxsize=None)
def _graph_nodes(name: str) -> tuple[str, ...]:
    """Return the layer names a backbone accepts (eval mode), shallow to deep, without weights.

    These are the FX graph node names plus the module paths that hold them ("features.14",
    "layer3"), each placed after its last node: create_feature_extractor accepts a module
    path and returns the output of its last node, and the registry's aliases use them.
    """
    import torch
    from torchvision.models.feature_extraction import get_graph_node_names

    spec = _REGISTRY[name]
    with torch.device("meta"):
        model = finish_model(spec, build_torchvision(spec, pretrained=False))
    nodes = get_graph_node_names(model)[1]
    last = {}  # module path -> index of its last node
    for i, node in enumerate(nodes):
        parts = node.split(".")
        for k in range(1, len(parts)):
            last[".".join(parts[:k])] = i
    names = list(nodes)
    # Insert from the end so earlier indices stay valid; inner modules before outer ones.
    for path, i in sorted(last.items(), key=lambda item: (item[1], -item[0].count(".")), reverse=True):
        names.insert(i + 1, path)
    return tuple(dict.fromkeys(names))


@lru_cache(maxsize=64)
def _output_shapes(name: str, nodes: tuple[str, ...], image_size: int, traced: bool) -> dict[str, tuple]:
    spec = _REGISTRY[name]
    if not traced:
        from cnncodes._backbones.tv_weights import known_shapes

        known = known_shapes(name, nodes, image_size)
        if known is not None:
            return known
    import torch
    from torchvision.models.feature_extraction import create_feature_extractor

    with torch.device("meta"):
        model = finish_model(spec, build_torchvision(spec, pretrained=False))
        fx = create_feature_extractor(model, {n: n for n in nodes})
        out = fx(torch.empty(1, 3, image_size, image_size))
    return {n: tuple(out[n].shape[1:]) for n in nodes}
