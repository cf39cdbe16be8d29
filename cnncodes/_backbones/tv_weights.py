"""torchvision's weights of the registered backbones as data: names, files, preprocessing.

Resolving a weights name and building the preprocessing need only these values, and
importing torchvision to read them costs 1-2 s, the most of an unchanged re-run of
`extract`. The snapshot serves only while torchvision is not imported and is the version it
was taken from; `python -m cnncodes._backbones.tv_weights` prints a new one (tests/test_startup.py
compares the two).
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from functools import lru_cache

SNAPSHOT_OF = "0.29.1"  # torchvision's distribution version
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_P = "https://download.pytorch.org/models/"


def _w(file, resize=256, crop=224, mean=_MEAN, std=_STD, interpolation="bilinear", antialias=True) -> tuple:
    return file, resize, crop, mean, std, interpolation, antialias


# enum class -> member -> (file under _P, resize, crop, mean, std, interpolation, antialias);
# "DEFAULT" names the member it is an alias of.
SNAPSHOT = {
    "MobileNet_V2_Weights": {"IMAGENET1K_V1": _w("mobilenet_v2-b0353104.pth"),
                             "IMAGENET1K_V2": _w("mobilenet_v2-7ebf99e0.pth", 232), "DEFAULT": "IMAGENET1K_V2"},
    "ResNet18_Weights": {"IMAGENET1K_V1": _w("resnet18-f37072fd.pth"), "DEFAULT": "IMAGENET1K_V1"},
    "ResNet50_Weights": {"IMAGENET1K_V1": _w("resnet50-0676ba61.pth"),
                         "IMAGENET1K_V2": _w("resnet50-11ad3fa6.pth", 232), "DEFAULT": "IMAGENET1K_V2"},
    "ResNet101_Weights": {"IMAGENET1K_V1": _w("resnet101-63fe2227.pth"),
                          "IMAGENET1K_V2": _w("resnet101-cd907fc2.pth", 232), "DEFAULT": "IMAGENET1K_V2"},
    "VGG16_Weights": {"IMAGENET1K_V1": _w("vgg16-397923af.pth"),
                      "IMAGENET1K_FEATURES": _w("vgg16_features-amdegroot-88682ab5.pth",
                                                mean=(0.48235, 0.45882, 0.40784), std=(1 / 255, 1 / 255, 1 / 255)),
                      "DEFAULT": "IMAGENET1K_V1"},
    "Inception_V3_Weights": {"IMAGENET1K_V1": _w("inception_v3_google-0cc3c7bd.pth", 342, 299),
                             "DEFAULT": "IMAGENET1K_V1"},
    "EfficientNet_B0_Weights": {"IMAGENET1K_V1": _w("efficientnet_b0_rwightman-7f5810bc.pth", interpolation="bicubic"),
                                "DEFAULT": "IMAGENET1K_V1"},
    "ConvNeXt_Tiny_Weights": {"IMAGENET1K_V1": _w("convnext_tiny-983f1562.pth", 236), "DEFAULT": "IMAGENET1K_V1"},
    "DenseNet121_Weights": {"IMAGENET1K_V1": _w("densenet121-a639ec97.pth"), "DEFAULT": "IMAGENET1K_V1"},
}


@dataclass(frozen=True)
class _Interpolation:
    value: str


@dataclass(frozen=True)
class _Transforms:
    """The attributes of torchvision's ImageClassification that Preprocess.from_weights reads."""

    resize_size: list[int]
    crop_size: list[int]
    mean: list[float]
    std: list[float]
    interpolation: _Interpolation
    antialias: bool


class _Weights(enum.Enum):
    """A stand-in for a torchvision weights enum: members, aliases, name, url and transforms()."""

    @property
    def url(self) -> str:
        return _P + self.value[0]

    def transforms(self) -> _Transforms:
        _, resize, crop, mean, std, interpolation, antialias = self.value
        return _Transforms([resize], [crop], list(mean), list(std), _Interpolation(interpolation), antialias)


def _snapshot_usable() -> bool:
    # Once torchvision is imported, the real enums cost nothing more.
    return "torchvision" not in sys.modules and _installed_is_snapshot()


@lru_cache(maxsize=1)
def _installed_is_snapshot() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchvision") == SNAPSHOT_OF
    except PackageNotFoundError:
        return False


@lru_cache(maxsize=None)
def _snapshot_enum(name: str) -> type[enum.Enum]:
    table = SNAPSHOT[name]
    # An equal value makes an alias, as DEFAULT is in torchvision's own enums.
    return _Weights(name, [(k, table[v] if isinstance(v, str) else v) for k, v in table.items()])


def weights_table(enum_name: str):
    """torchvision's weights enum `enum_name`, or its snapshot while torchvision is not imported.

    For names, files and preprocessing only (``[name]``, ``DEFAULT``, ``__members__``, ``.name``,
    ``.url``, ``.transforms()``); `meta` and the state dict need the real enum.
    """
    if enum_name in SNAPSHOT and _snapshot_usable():
        return _snapshot_enum(enum_name)
    import torchvision.models as tvm

    return getattr(tvm, enum_name)


# backbone -> (default crop, {registered node: per-image output shape}): what `cnncodes layers`
# shows without building and tracing the network (3-4 s of torchvision imports).
SHAPES = {
    "convnext_tiny": (224, {"features.1": (96, 56, 56), "features.3": (192, 28, 28), "features.5": (384, 14, 14),
                            "features.7": (768, 7, 7)}),
    "densenet121": (224, {"features.relu0": (64, 112, 112), "features.denseblock1": (256, 56, 56),
                          "features.denseblock2": (512, 28, 28), "features.denseblock3": (1024, 14, 14),
                          "relu": (1024, 7, 7)}),
    "efficientnet_b0": (224, {"features.1": (16, 112, 112), "features.2": (24, 56, 56), "features.3": (40, 28, 28),
                              "features.5": (112, 14, 14), "features.8": (1280, 7, 7)}),
    "inception_v3": (299, {"Conv2d_2b_3x3": (64, 147, 147), "Conv2d_4a_3x3": (192, 71, 71),
                           "Mixed_5d": (288, 35, 35), "Mixed_6e": (768, 17, 17), "Mixed_7c": (2048, 8, 8)}),
    "mobilenet_v2": (224, {"features.1": (16, 112, 112), "features.3": (24, 56, 56), "features.6": (32, 28, 28),
                           "features.13": (96, 14, 14), "features.18": (1280, 7, 7)}),
    "resnet18": (224, {"relu": (64, 112, 112), "layer1": (64, 56, 56), "layer2": (128, 28, 28),
                       "layer3": (256, 14, 14), "layer4": (512, 7, 7)}),
    "resnet50": (224, {"relu": (64, 112, 112), "layer1": (256, 56, 56), "layer2": (512, 28, 28),
                       "layer3": (1024, 14, 14), "layer4": (2048, 7, 7)}),
    "resnet101": (224, {"relu": (64, 112, 112), "layer1": (256, 56, 56), "layer2": (512, 28, 28),
                        "layer3": (1024, 14, 14), "layer4": (2048, 7, 7)}),
    "vgg16": (224, {"features.4": (64, 112, 112), "features.9": (128, 56, 56), "features.16": (256, 28, 28),
                    "features.23": (512, 14, 14), "features.30": (512, 7, 7), "classifier.1": (4096,),
                    "classifier.4": (4096,)}),
}


def known_shapes(name: str, nodes, image_size: int) -> dict | None:
    """The snapshot's output shapes of `nodes` at `image_size`, or None where it has none."""
    size, shapes = SHAPES.get(name, (None, {}))
    if size != image_size or not _installed_is_snapshot() or not all(n in shapes for n in nodes):
        return None
    return {n: shapes[n] for n in nodes}


def take_snapshot(enum_names) -> dict:
    """The table above, read from the installed torchvision (as values, not as source text)."""
    import torchvision.models as tvm

    def row(member) -> tuple:
        t = member.transforms()
        return (member.url.removeprefix(_P), int(t.resize_size[0]), int(t.crop_size[0]), tuple(t.mean),
                tuple(t.std), t.interpolation.value, bool(t.antialias))

    return {
        name: {key: row(member) if key == member.name else member.name
               for key, member in getattr(tvm, name).__members__.items()}
        for name in enum_names
    }


if __name__ == "__main__":
    import pprint
    from importlib.metadata import version

    print(f'SNAPSHOT_OF = "{version("torchvision")}"')
    pprint.pprint(take_snapshot(SNAPSHOT), width=110, sort_dicts=False)  # a new backbone: add its enum
