"""Checkpoint resolution: torchvision's weights API, an offline search path, local files."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from cnncodes._backbones.registry import BackboneSpec, build_model, finish_model, weights_names
from cnncodes._choices import IMAGENET
from cnncodes._backbones.custom import TIMM_PREFIX, _create_timm, _entry, state_dict_sha256
from cnncodes._errors import WeightsError
from cnncodes._io import file_sha256
from cnncodes._spec import WeightsRef

WEIGHTS_PATH_ENV = "CNNCODES_WEIGHTS_PATH"
OFFLINE_ENV = "CNNCODES_OFFLINE"
# torchvision (and torch.hub) put the first hex digits of the file's sha256 in its name.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")


@dataclass(frozen=True)
class Weights:
    """Where a backbone's parameters come from; recorded in every store."""

    id: str  # WeightsRef.id: "IMAGENET1K_V1", "file:ft.pt" or "random"
    sha256: str  # of the checkpoint file; "" for random weights
    path: str  # the file used; "" for random weights
    preprocessing_from: str  # id of the torchvision weights whose preprocessing applies
    image_size: int | None = None  # the crop a fine-tuned checkpoint was trained at; None: the weights' own

    @property
    def ref(self) -> WeightsRef:
        """What a store records of these weights (kind, name, sha256; the path as a hint)."""
        return WeightsRef.from_id(self.id, self.sha256, self.path)


def search_dirs() -> list[Path]:
    """Return the folders searched for checkpoints, in order."""
    dirs = [Path(p).expanduser() for p in os.environ.get(WEIGHTS_PATH_ENV, "").split(os.pathsep) if p]
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return dirs


# cnncodes' default: the original ImageNet weights of each architecture (what the Keras
# tutorials use). torchvision's newer "V2" recipes (label smoothing, mixup, cutmix, long
# schedules) raise ImageNet accuracy but make penultimate features transfer worse
# (Kornblith et al., 2021), and codes are what we are after. "DEFAULT" is torchvision's pick.
# IMAGENET (from _choices) names them.
_IMAGENET_MEMBER = "IMAGENET1K_V1"


def _enum_member(spec: BackboneSpec, weights):
    enum = weights_names(spec)
    if isinstance(weights, enum):
        return weights
    key = str(weights)
    if key.lower() == IMAGENET:
        return enum[_IMAGENET_MEMBER]
    if key.upper() == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[key]
    except KeyError:
        names = ", ".join([IMAGENET, "DEFAULT", *enum.__members__])
        raise WeightsError(
            f"{spec.name} has no weights {key!r}. Use one of {names}, a checkpoint file "
            f"path, or weights=None for random weights."
        ) from None


def _looks_like_path(spec: BackboneSpec, weights) -> bool:
    if isinstance(weights, os.PathLike):
        return True
    if not isinstance(weights, str):
        return False
    # A weights name wins over a same-named file in the working directory.
    names = {IMAGENET, "default", *(m.lower() for m in weights_names(spec).__members__)}
    if weights.lower() in names:
        return False
    return os.sep in weights or "." in weights or os.path.exists(weights)


def resolve(spec: BackboneSpec, weights=IMAGENET) -> Weights:
    """Find the checkpoint for `weights` without loading it.

    `weights` is ``"imagenet"`` (IMAGENET1K_V1), ``"DEFAULT"`` (torchvision's default), a
    torchvision weights name (``"IMAGENET1K_V2"``) or enum member, a path to a local
    checkpoint, or ``None`` for random weights (only on request).
    """
    if not spec.traced:  # a timm model or a registered nn.Module
        return _resolve_custom(spec, weights)
    default_id = _IMAGENET_MEMBER
    if weights is None:
        return Weights(WeightsRef("random").id, "", "", default_id)
    if _looks_like_path(spec, weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"checkpoint file {str(path)!r} does not exist. Give the path of a "
                f"state-dict file (.pth/.pt), or a weights name such as DEFAULT."
            )
        from cnncodes._finetune._checkpoint import finetuned_info

        # A checkpoint from `cnncodes finetune` names its backbone and its preprocessing.
        info = finetuned_info(path, spec)
        preprocessing_from = info["preprocessing_from"] if info else default_id
        size = info["config"].get("image_size") if info else None
        return Weights(WeightsRef("file", path.name).id, file_sha256(path), str(path.resolve()),
                       preprocessing_from, int(size) if size else None)
    member = _enum_member(spec, weights)
    filename = member.url.rsplit("/", 1)[-1]
    looked = search_dirs()
    for folder in looked:
        candidate = folder / filename
        if candidate.is_file():
            return Weights(member.name, _verify(candidate), str(candidate.resolve()), member.name)
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise _missing(spec, member, filename, looked, reason=f"{OFFLINE_ENV} is set")
    try:
        # The normal path on a machine with network: torchvision's own download + hash check.
        torch.hub.load_state_dict_from_url(member.url, progress=True, check_hash=True)
    except Exception as exc:  # noqa: BLE001 - any download failure means "not available"
        raise _missing(spec, member, filename, looked, reason=f"download failed: {exc}") from None
    candidate = Path(torch.hub.get_dir()) / "checkpoints" / filename
    return Weights(member.name, _verify(candidate), str(candidate.resolve()), member.name)


def _missing(spec, member, filename, looked, reason) -> WeightsError:
    where = "\n".join(f"  - {d}" for d in looked)
    return WeightsError(
        f"no checkpoint {filename!r} for {spec.name} {member.name} ({reason}).\n"
        f"Looked in:\n{where}\n"
        f"Fix: download {member.url} on a machine with network and put it in one of "
        f"those folders (or point {WEIGHTS_PATH_ENV} at its folder), or pass "
        f"--weights PATH/TO/{filename}."
    )


def _verify(path: Path) -> str:
    digest = file_sha256(path)
    match = _HASH_IN_NAME.search(path.name)
    if match and not digest.startswith(match.group(1)):
        raise WeightsError(
            f"checkpoint {str(path)!r} is corrupt or not the file its name promises: its "
            f"sha256 starts with {digest[:len(match.group(1))]}, the name says "
            f"{match.group(1)}. Delete it and fetch the file again."
        )
    return digest


def _state_dict(path: str) -> tuple[dict, str]:
    """The state dict of a checkpoint file, and the module path of a head it replaced ("" if none)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(
            f"cannot load checkpoint {path!r} safely ({type(exc).__name__}: {exc}). "
            f"cnncodes loads plain state dicts only (torch.save(model.state_dict(), path))."
        ) from None
    from cnncodes._finetune._checkpoint import backbone_state, is_finetuned

    if is_finetuned(obj):  # from `cnncodes finetune`: its backbone, without its new head
        return backbone_state(obj)
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise WeightsError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state dict.")
    return {k.removeprefix("module."): v for k, v in obj.items()}, ""


RANDOM_SEED = 0


def preprocess_for(spec: BackboneSpec, weights: Weights, image_size: int | None, jpeg_draft: bool,
                   resize: str):
    """The preprocessing the resolved weights expect, at `image_size` (None: their own crop)."""
    from cnncodes._input.images import Preprocess

    if not spec.traced:
        from cnncodes._backbones.custom import preprocess

        return preprocess(spec, image_size, jpeg_draft, resize)
    return Preprocess.from_weights(weights_names(spec)[weights.preprocessing_from], image_size,
                                   jpeg_draft, resize)


def load_model(spec: BackboneSpec, weights: Weights) -> torch.nn.Module:
    """Build the backbone and load the resolved checkpoint into it (eval mode).

    Random weights are drawn from a fixed seed (without touching the caller's generator), so
    every run of a store made with ``weights=None`` uses the same network.
    """
    if not spec.traced:
        return _load_custom(spec, weights)
    if weights.ref.is_random:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(RANDOM_SEED)  # built on the CPU
            return finish_model(spec, build_model(spec, pretrained=False))
    model = build_model(spec, pretrained=True)
    if weights.path:
        state, replaced = _state_dict(weights.path)
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # size mismatches raise even with strict=False
            raise WeightsError(
                f"checkpoint {weights.path!r} does not fit {spec.name}: {exc}\n"
                f"Pick the backbone the checkpoint was trained as; cnncodes builds the "
                f"standard torchvision model, 1000-class ImageNet head included."
            ) from None
        missing = [k for k in result.missing_keys if not (replaced and k.startswith(replaced + "."))]
        if missing or result.unexpected_keys:
            raise WeightsError(
                f"checkpoint {weights.path!r} does not fit {spec.name}: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]}). "
                f"Pick the backbone the checkpoint was trained as."
            )
        if replaced:
            # A fine-tuned checkpoint's own head has other classes; the ImageNet head it
            # replaced is not in the file and is zeroed (it is never a code layer).
            with torch.no_grad():
                for p in model.get_submodule(replaced).parameters():
                    p.zero_()
    return finish_model(spec, model)


# --------------------------------------------------------------------------- timm models and registered modules
# Their weights: a registered module's own parameters; a timm model's file, timm's download or
# random ones. The network side of these backbones (entries, building, hooks) is `custom`'s.


def _resolve_custom(spec: BackboneSpec, weights):
    """The `Weights` of a registered module (its own) or a timm model (file, timm's, random)."""
    entry = _entry(spec)
    if entry.module is not None:
        if weights not in (IMAGENET, "module", "DEFAULT", "default"):
            raise WeightsError(
                f"{spec.name} is a registered nn.Module and runs with the parameters it holds: load "
                f"your checkpoint into it (model.load_state_dict) before register_backbone, and "
                f"leave weights unset.")
        return Weights(WeightsRef("module").id, state_dict_sha256(entry.module), "", "")
    model_name = spec.name[len(TIMM_PREFIX):]
    if weights is None:
        return Weights(WeightsRef("random").id, "", "", "")
    if isinstance(weights, os.PathLike) or (isinstance(weights, str) and (
            os.sep in weights or weights.endswith((".pth", ".pt", ".bin", ".safetensors")) or os.path.exists(weights))):
        path = os.path.abspath(os.path.expanduser(os.fspath(weights)))
        if not os.path.isfile(path):
            raise WeightsError(f"checkpoint file {path!r} does not exist. Give the path of a state-dict "
                               f"file of {model_name} (.pth/.pt/.safetensors), or weights=None for random weights.")
        return Weights(WeightsRef("file", os.path.basename(path)).id, file_sha256(path), path, "")
    tag = "" if str(weights).lower() in (IMAGENET, "default") else str(weights)
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise WeightsError(
            f"{spec.name}'s pretrained weights come from the network, and {OFFLINE_ENV} is set. On a "
            f"machine with network save them (torch.save(timm.create_model({model_name!r}, pretrained=True)"
            f".state_dict(), 'w.pth')) and pass --weights PATH/w.pth, or --weights random.")
    full = f"{model_name}.{tag}" if tag else model_name
    try:
        model = _create_timm(full, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - any download failure means "not available"
        raise WeightsError(f"cannot load timm's pretrained weights of {full!r} ({type(exc).__name__}: "
                           f"{str(exc)[:200]}). Pass --weights PATH to a local state-dict file.") from None
    tag = tag or model.pretrained_cfg.get("tag") or ""
    return Weights(WeightsRef("timm", tag).id, state_dict_sha256(model), "", "")


def _load_custom(spec: BackboneSpec, weights):
    """The network with the resolved parameters, in eval mode."""
    entry = _entry(spec)
    if entry.module is not None:
        return entry.module.eval()
    model_name = spec.name[len(TIMM_PREFIX):]
    ref = weights.ref
    if ref.is_random:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(RANDOM_SEED)
            return _create_timm(model_name).eval()
    if ref.kind == "timm":
        return _create_timm(f"{model_name}.{ref.name}" if ref.name else model_name, pretrained=True).eval()
    model = _create_timm(model_name)
    if weights.path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(weights.path)
    else:
        state = _state_dict(weights.path)[0]
    try:
        result = model.load_state_dict(state, strict=False)
        bad = (result.missing_keys or result.unexpected_keys) and (
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:2]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]})")
    except RuntimeError:  # size mismatches raise even with strict=False
        bad = "parameters of other shapes"
    if bad:
        raise WeightsError(f"checkpoint {weights.path!r} does not fit {spec.name}: {bad}. "
                           f"Pick the timm model the checkpoint was saved from.")
    return model.eval()
