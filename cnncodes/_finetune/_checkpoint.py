"""The fine-tuned checkpoint and training-state files: their format, safe reading and atomic writing."""

from __future__ import annotations

import os
import zipfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from cnncodes._errors import CnnCodesError, WeightsError
from cnncodes._io import atomic_write

CHECKPOINT_FORMAT = "cnncodes.finetuned"
CHECKPOINT_VERSION = 1
STATE_FORMAT = "cnncodes.finetune-state"
STATE_SUFFIX = ".resume"
# Settings left out when a run is resumed or returned: the initial head is already in the
# saved weights (and the path of the store it came from may move).
_RUNTIME_KEYS = ("init_head",)


def save(obj, path: Path) -> None:
    """torch.save to a temporary file, fsync, then rename over `path` (never a torn file)."""
    with atomic_write(path) as fh:
        torch.save(obj, fh)


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


def write_state(run) -> None:
    """Save what resuming `run` (a :class:`~cnncodes._finetune._loop.Run`) after its last epoch needs."""
    save({
        "format": STATE_FORMAT, "format_version": CHECKPOINT_VERSION, "config": run.config,
        "epoch": run.history[-1].epoch if run.history else 0,
        "state_dict": cpu_state(run.model.net), "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(), "grad_scaler": run.scaler.state_dict(),
        "history": [asdict(e) for e in run.history], "best": asdict(run.best), "bad_epochs": run.bad_epochs,
        "best_state_dict": run.best_state, "init_head": run.init_record, "initial_val": run.initial_val,
    }, run.state_path)


def write_checkpoint(run, *, complete: bool, test_accuracy: float | None = None) -> None:
    """Save the kept model of `run` and everything needed to use, describe and reproduce it."""
    from cnncodes import __version__

    data = run.data
    fit_rows = np.concatenate([data.train_rows, data.val_rows])
    initial = run.initial_val or {}
    save({
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "backbone": run.spec.name,
        "weights": run.weights.id,
        "weights_sha256": run.weights.sha256,
        "preprocessing_from": run.weights.preprocessing_from,
        "preprocessing": run.prep.as_dict(),
        "head": run.model.head,
        "precision": run.precision,
        "tta": run.config["tta"],
        "classes": list(data.classes),
        "state_dict": run.best_state,
        "config": run.config,
        "history": [asdict(e) for e in run.history],
        "best_epoch": int(run.best.epoch),
        "initial_val_accuracy": initial.get("accuracy"),
        "initial_val_loss": initial.get("loss"),
        "init_head": run.init_record,
        "trainable": run.trainable,
        "stopped": run.stopped,
        "complete": bool(complete),
        "test_accuracy": test_accuracy,
        "split": {"train": len(data.train_rows), "val": len(data.val_rows), "test": len(data.test_rows)},
        "test_ids": [data.items[r].id for r in data.test_rows],
        "train_sha256": sorted({str(data.shas[r]) for r in fit_rows}),
        "data_root": os.path.abspath(data.src.root),
        "cnncodes": __version__,
        "torch": str(torch.__version__),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }, run.out)


def cpu_state(net: torch.nn.Module) -> dict:
    """A copy of a module's state dict on the CPU (what the files hold)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}


def load_state(path: Path, config: dict) -> dict | None:
    """The training state of an interrupted run of the same settings, or None when there is none."""
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


def finished_run(out: Path, state_path: Path, config: dict, resume: bool) -> dict | None:
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
