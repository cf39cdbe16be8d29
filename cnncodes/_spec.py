"""The extractor spec: the settings that make CNN codes comparable, as a typed, frozen record.

A store records its spec as JSON (the ``spec`` attribute), a model file as its ``extractor``
dict. `ExtractorSpec` reads every dict earlier versions wrote (`ExtractorSpec.from_json`) and
writes exactly the same layout back (`ExtractorSpec.to_json`), so files stay readable by
older cnncodes and identical settings give identical JSON.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from operator import itemgetter
from typing import ClassVar

from cnncodes._errors import StoreError, StoreMismatchError, UnknownLayerError

# The settings that make codes comparable; a store refuses rows made with other values.
SPEC_KEYS = ("backbone", "weights", "weights_sha256", "layers", "pooling", "preprocessing",
             "precision", "tta", "dtype")
# What stores written before a setting existed used implicitly.
_DEFAULT_TTA = "none"
_DEFAULT_PREPROCESSING = {"jpeg_draft": False, "resize": "workers"}
_DEFAULT_PRECISION = "float32"  # every store before `precision` existed computed in float32
# Keys a model file's extractor dict holds besides SPEC_KEYS.
_MODEL_KEYS = ("image_size", "weights_path")


def _freeze(value):
    """JSON value -> hashable value: lists become tuples, dicts `FrozenMap`s."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping) and not isinstance(value, FrozenMap):
        return FrozenMap(value)
    return value


def _thaw(value):
    """The inverse of `_freeze`: the JSON value back, with lists and dicts."""
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    if isinstance(value, FrozenMap):
        return value.to_json()
    return value


class FrozenMap(Mapping):
    """An immutable, hashable mapping that keeps its order, held as a tuple of pairs.

    Equality is that of dicts (order aside), so two specs compare as their JSON does.
    """

    __slots__ = ("_pairs", "_index")

    def __init__(self, items=()):
        pairs = items.items() if isinstance(items, Mapping) else items
        self._pairs = tuple((k, _freeze(v)) for k, v in pairs)
        self._index = dict(self._pairs)

    def __getitem__(self, key):
        return self._index[key]

    def __iter__(self):
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._pairs)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return self._index == dict(FrozenMap(other)._index)

    def __hash__(self) -> int:
        return hash(frozenset(self._pairs))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_json()!r})"

    def to_json(self) -> dict:
        """The plain dict (lists, not tuples), in the order held."""
        return {k: _thaw(v) for k, v in self._pairs}


class Preprocessing(FrozenMap):
    """The preprocessing a store records: ``Preprocess.as_dict()`` plus its ``description``.

    A mapping, so that keys this version does not know (from a newer one) survive a round
    trip; the keys every version writes are properties.
    """

    __slots__ = ()

    @property
    def description(self) -> str:
        return self.get("description", json.dumps(self.to_json(), sort_keys=True))

    crop_size = property(itemgetter("crop_size"), doc="Side of the centre crop (px).")
    resize_size = property(itemgetter("resize_size"), doc="Shorter side after the resize (px).")
    mean = property(itemgetter("mean"), doc="Normalisation mean per channel (a tuple).")
    std = property(itemgetter("std"), doc="Normalisation std per channel (a tuple).")

    @property
    def jpeg_draft(self) -> bool:
        return self.get("jpeg_draft", _DEFAULT_PREPROCESSING["jpeg_draft"])

    @property
    def resize(self) -> str:
        return self.get("resize", _DEFAULT_PREPROCESSING["resize"])


@dataclass(frozen=True)
class WeightsRef:
    """Which parameters a backbone ran with, as a store records them.

    Parameters
    ----------
    kind : {"torchvision", "file", "random", "timm", "module"}
        A torchvision weights enum member, a local checkpoint file, random weights
        drawn from cnncodes' fixed seed, timm's pretrained weights (a tag such as
        ``"a1_in1k"``), or the parameters a registered nn.Module holds.
    name : str
        The member name (``"IMAGENET1K_V1"``), the checkpoint's file name (``"ft.pt"``) or
        the timm tag; ``""`` for random weights and modules.
    sha256 : str
        Of the checkpoint file, or of a module's state dict; ``""`` for random weights.
    path : str
        Where the checkpoint was found on the machine that recorded it: a hint for
        extracting new photos, not part of the identity (never compared).

    Examples
    --------
    >>> WeightsRef.from_id("file:ft.pt", "ab12").name
    'ft.pt'
    >>> WeightsRef.from_id("IMAGENET1K_V1").id
    'IMAGENET1K_V1'
    """

    kind: str
    name: str = ""
    sha256: str = ""
    path: str = field(default="", compare=False, repr=False)

    KINDS: ClassVar[tuple[str, ...]] = ("torchvision", "file", "random", "timm", "module")
    _FILE_PREFIX: ClassVar[str] = "file:"
    _TIMM_PREFIX: ClassVar[str] = "timm:"
    _RANDOM_ID: ClassVar[str] = "random"
    _MODULE_ID: ClassVar[str] = "module"

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"unknown weights kind {self.kind!r}. Valid kinds: {', '.join(self.KINDS)}.")

    @classmethod
    def from_id(cls, weights_id: str, sha256: str = "", path: str = "") -> "WeightsRef":
        """Parse the id a store records: ``"IMAGENET1K_V1"``, ``"file:ft.pt"`` or ``"random"``."""
        if weights_id == cls._RANDOM_ID:
            return cls("random", "", sha256, path)
        if weights_id == cls._MODULE_ID:
            return cls("module", "", sha256, path)
        if weights_id.startswith(cls._TIMM_PREFIX):
            return cls("timm", weights_id[len(cls._TIMM_PREFIX):], sha256, path)
        if weights_id.startswith(cls._FILE_PREFIX):
            return cls("file", weights_id[len(cls._FILE_PREFIX):], sha256, path)
        return cls("torchvision", weights_id, sha256, path)

    @property
    def id(self) -> str:
        """The id stores record, as earlier versions wrote it."""
        if self.kind in ("random", "module"):
            return self._RANDOM_ID if self.kind == "random" else self._MODULE_ID
        if self.kind == "timm":
            return f"{self._TIMM_PREFIX}{self.name}"
        return f"{self._FILE_PREFIX}{self.name}" if self.kind == "file" else self.name

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    @property
    def is_torchvision(self) -> bool:
        return self.kind == "torchvision"

    def extract_arg(self) -> str | None:
        """The ``weights=`` of :func:`cnncodes.extract` that finds these weights again.

        The torchvision name, the checkpoint's path (its file name, relative to the working
        directory, when the path is not known), or None for random weights. A registered
        module runs with the parameters it holds (its sha256 is checked against the store's).
        """
        if self.is_random:
            return None
        if self.kind == "module":
            return self._MODULE_ID
        return (self.path or self.name) if self.is_file else self.name


def normalize_spec(spec: Mapping) -> dict:
    """Fill the settings that stores written before they existed used implicitly."""
    spec = dict(spec)
    spec.setdefault("tta", _DEFAULT_TTA)
    spec["preprocessing"] = {**_DEFAULT_PREPROCESSING, **spec.get("preprocessing", {})}
    return spec


def _describe(key, value) -> str:
    if key == "layers":
        return ", ".join(f"{a}={n}" for a, n in value.items())
    if key == "preprocessing" and isinstance(value, Mapping):
        return Preprocessing(value).description
    return str(value)


def find_alias(layers: Mapping[str, str], name: str) -> str | None:
    """The alias `name` asks for among `layers` (alias -> graph node): `name` itself if it is
    an alias, else the alias of the node it names; None if it is neither.

    The one rule by which a layer is found, in a backbone's layer table
    (:meth:`BackboneSpec.layer <cnncodes._backbones.registry.BackboneSpec.layer>`) and among the
    layers some codes hold (:meth:`ExtractorSpec.alias`).
    """
    if name in layers:
        return name
    return next((alias for alias, node in layers.items() if node == name), None)


@dataclass(frozen=True, kw_only=True)
class ExtractorSpec:
    """The settings that made a store's codes: equal specs give comparable codes.

    Parameters
    ----------
    backbone : str
        The registered backbone name.
    weights : WeightsRef
        The parameters it ran with.
    layers : mapping of str to str
        Layer alias -> graph node, shallow to deep (held as a `FrozenMap`).
    pooling : str
        ``"avg"``, ``"max"``, ``"gem"``, ``"flatten"``, ``"spp"``, ``"cls"`` or ``"cls+avg"``.
    preprocessing : mapping
        ``Preprocess.as_dict()`` and its ``description`` (held as a `Preprocessing`).
    precision : str
        Arithmetic of the forward pass (``"float32"``, ``"bfloat16"``, ``"float16"``).
    tta : str
        Test-time augmentation, ``"none"`` or ``"flip"``.
    dtype : str
        The stored codes' dtype.

    Examples
    --------
    >>> spec = ExtractorSpec.from_json({
    ...     "backbone": "mobilenet_v2", "weights": "IMAGENET1K_V1", "weights_sha256": "b035",
    ...     "layers": {"block4": "features.13", "block5": "features.18"}, "pooling": "avg",
    ...     "preprocessing": {"crop_size": 64, "description": "crop 64"},
    ...     "precision": "float32", "dtype": "float32"})
    >>> spec.narrow("features.18").layers
    FrozenMap({'block5': 'features.18'})
    >>> spec.tta, spec.preprocessing.jpeg_draft
    ('none', False)
    """

    backbone: str
    weights: WeightsRef
    layers: FrozenMap
    pooling: str
    preprocessing: Preprocessing
    precision: str = _DEFAULT_PRECISION
    tta: str = _DEFAULT_TTA
    dtype: str = "float32"

    def __post_init__(self):
        # Plain dicts given to the constructor are frozen, so a spec is hashable and immutable.
        object.__setattr__(self, "layers", FrozenMap(self.layers))
        object.__setattr__(self, "preprocessing", Preprocessing(self.preprocessing))

    # ----------------------------------------------------------------- JSON

    @classmethod
    def from_json(cls, spec, *, weights_path: str | None = None) -> "ExtractorSpec":
        """Read a spec dict written by any version: a store's, a journal's or a model file's.

        Settings that did not exist when the dict was written get the values those versions
        used implicitly (`normalize_spec`). A model file's ``weights_path`` (or the given
        `weights_path`, a store's provenance) becomes ``weights.path``. An `ExtractorSpec`
        is returned as it is.

        Raises
        ------
        StoreError
            If the dict lacks a setting every version records.
        """
        if isinstance(spec, ExtractorSpec):
            return spec
        d = normalize_spec(spec)
        missing = [k for k in ("backbone", "weights", "layers", "pooling") if k not in d]
        if missing:
            raise StoreError(f"the extractor spec {json.dumps(d, sort_keys=True)[:200]} lacks "
                             f"{', '.join(missing)}: it was not written by cnncodes.")
        path = d.get("weights_path", "") if weights_path is None else weights_path
        return cls(
            backbone=d["backbone"],
            weights=WeightsRef.from_id(d["weights"], d.get("weights_sha256", ""), path or ""),
            layers=d["layers"],
            pooling=d["pooling"],
            preprocessing=d["preprocessing"],
            precision=d.get("precision", _DEFAULT_PRECISION),
            tta=d["tta"],
            dtype=d.get("dtype", "float32"),
        )

    def to_json(self) -> dict:
        """The dict stores record (keys `SPEC_KEYS`), exactly as earlier versions wrote it.

        Keys sorted, as a store's JSON has them (and so the dict a model file holds).
        """
        return dict(sorted({
            "backbone": self.backbone,
            "weights": self.weights.id,
            "weights_sha256": self.weights.sha256,
            "layers": self.layers.to_json(),
            "pooling": self.pooling,
            "preprocessing": self.preprocessing.to_json(),
            "precision": self.precision,
            "tta": self.tta,
            "dtype": self.dtype,
        }.items()))

    def to_model_json(self) -> dict:
        """The ``extractor`` dict of a model file: `to_json` plus image_size and weights_path."""
        return {**self.to_json(), "image_size": self.preprocessing.crop_size,
                "weights_path": self.weights.path}

    def __getitem__(self, key: str):
        """Dict access as in earlier versions (``store.spec["pooling"]``); prefer the attributes."""
        d = self.to_json()
        if key in _MODEL_KEYS:
            d = self.to_model_json()
        return d[key]

    def __contains__(self, key) -> bool:
        return key in SPEC_KEYS or key in _MODEL_KEYS

    def get(self, key: str, default=None):
        """Dict access as in earlier versions; prefer the attributes."""
        try:
            return self[key]
        except KeyError:
            return default

    def digest(self, length: int = 8) -> str:
        """A short hash of the settings besides backbone and layers (a cache file's name)."""
        d = self.to_json()
        settings = {k: d[k] for k in ("pooling", "weights", "weights_sha256", "dtype", "precision", "tta")}
        settings["preprocessing"] = {k: v for k, v in d["preprocessing"].items() if k != "description"}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:length]

    # ----------------------------------------------------------------- checks

    def check(self, wanted, where: str, *, advice: str | None = None) -> None:
        """Raise StoreMismatchError naming both values of the first setting that differs.

        `self` is what `where` was made with; `wanted` (a spec or a spec dict) what this run
        asks for. Only `SPEC_KEYS` are compared: a model file's extra keys are not settings.
        `advice` ends the message: what the command at hand can do about it (by default,
        extract's: write to another file or use the store's settings).
        """
        if advice is None:
            advice = "write to another file (-o other.h5), or re-run with the store's settings."
        stored, asked = self.to_json(), ExtractorSpec.from_json(wanted).to_json()
        for key in SPEC_KEYS:
            if stored[key] != asked[key]:
                raise StoreMismatchError(
                    f"{where} was made with {key} {_describe(key, stored[key])!r}, but this run "
                    f"asks for {key} {_describe(key, asked[key])!r}. Codes made with different "
                    f"settings are never mixed: {advice}"
                )

    # ----------------------------------------------------------------- layers

    def find_layer(self, layer: str) -> str | None:
        """The alias of `layer` (an alias or a graph node held), or None if it is not held."""
        return find_alias(self.layers, layer)

    def alias(self, layer: str | None = None, refuse=None) -> str:
        """The alias of `layer`, an alias or a graph node held; the deepest held when None.

        Where it is not held, raises ``refuse(layer)`` (the caller's error, in its words), or
        by default an `UnknownLayerError` naming the aliases and nodes held.
        """
        layer = layer or list(self.layers)[-1]
        alias = self.find_layer(layer)
        if alias is not None:
            return alias
        if refuse is not None:
            raise refuse(layer)
        held = ", ".join(f"{a} ({n})" for a, n in self.layers.items())
        raise UnknownLayerError(f"no layer {layer!r} in these codes; they hold {held}. "
                                f"Use one of those, or extract that layer.")

    def narrow(self, layer) -> "ExtractorSpec":
        """This spec with one layer (an alias or a graph node held), or several (a list).

        Raises
        ------
        UnknownLayerError
            If a layer is not held; the message names those that are.
        """
        aliases = [self.alias(name) for name in ([layer] if isinstance(layer, str) else layer)]
        return replace(self, layers={alias: self.layers[alias] for alias in aliases})

    # ----------------------------------------------------------------- use

    def extract_kwargs(self) -> dict:
        """The keyword arguments of :func:`cnncodes.extract` that make these codes again."""
        p = self.preprocessing
        return dict(backbone=self.backbone, layers=list(self.layers.values()), pooling=self.pooling,
                    weights=self.weights.extract_arg(), image_size=p.crop_size, dtype=self.dtype,
                    precision=self.precision, tta=self.tta, jpeg_draft=p.jpeg_draft, resize=p.resize)

    def describe(self, dims: Mapping[str, int] | None = None) -> list[str]:
        """Lines that describe the spec (for `cnncodes info`); `dims`: code length per alias."""
        w = self.weights
        return [
            f"backbone {self.backbone}, weights {w.id} (sha256 {w.sha256[:12] or '-'}), "
            f"pooling {self.pooling}, {self.dtype} (computed in {self.precision}, tta {self.tta})",
            "layers: " + ", ".join(f"{a} = {n}" + (f" ({dims[a]})" if dims and a in dims else "")
                                   for a, n in self.layers.items()),
            "preprocessing: " + self.preprocessing.description,
        ]


def check_spec(stored, wanted, where: str) -> None:
    """Raise StoreMismatchError naming both values of the first setting that differs."""
    ExtractorSpec.from_json(stored).check(wanted, where)
