"""What kind of file is at a path, and the one check every writer runs before overwriting it."""

from __future__ import annotations

import zipfile
from pathlib import Path

from cnncodes._errors import OutputExistsError

# The kinds of file cnncodes writes, as `file_kind` names them.
STORE, SEGMENT, MODEL, CHECKPOINT, PNG, PREDICTIONS, EXPORT, REPORT = (
    "store", "segment", "model", "checkpoint", "png", "predictions", "export", "report")

_WRITES = {  # writer kind -> what it writes, for the message
    STORE: "a code store",
    MODEL: "a model file (.skops)",
    CHECKPOINT: "a fine-tuned checkpoint (.pt)",
    PNG: "a PNG plot",
    PREDICTIONS: "a CSV of predictions",
    EXPORT: "an exported network (ONNX or TorchScript)",
    REPORT: "an HTML report",
}
# An ONNX file is a protobuf whose field 2 (producer_name) follows the varint ir_version: one
# `cnncodes export` wrote starts with it.
_ONNX_PRODUCER = b"\x12\x08cnncodes"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_IMAGE_MAGICS = (b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")
PREDICTIONS_HEADER = "id,label1,probability1"
# In the head of every report cnncodes writes (cnncodes/_data/report.html.j2).
REPORT_MARK = '<meta name="generator" content="cnncodes report">'


def file_kind(path) -> tuple[str | None, str]:
    """``(kind, description)`` of what is at `path`; kind is None when nothing is there.

    Kinds are those cnncodes writes (``"store"``, ``"segment"``, ``"model"``,
    ``"checkpoint"``, ``"png"``, ``"predictions"``, ``"export"``, ``"report"``), ``"empty"`` for a 0-byte file, or
    ``"other"`` for anything else (folders, photos, foreign HDF5 or zip files ...); the
    description says which, for a message.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None, "nothing"
    if path.is_dir():
        return "other", "a folder"
    if not path.is_file():
        return "other", "not a regular file"
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        return "other", f"a file that cannot be read ({exc.strerror or exc})"
    if not head:
        return "empty", "an empty file"
    if head.startswith(_HDF5_MAGIC):
        return _hdf5_kind(path)
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    if head.startswith(_PNG_MAGIC):
        return PNG, "a PNG image"
    if head.startswith(_IMAGE_MAGICS):
        return "other", "an image"
    if _ONNX_PRODUCER in head[:16]:
        return EXPORT, "an ONNX network exported by cnncodes"
    if b"\0" not in head:
        text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
        if text.startswith(PREDICTIONS_HEADER):
            return PREDICTIONS, "a CSV of predictions"
        if REPORT_MARK in text:
            return REPORT, "a cnncodes HTML report"
        return "other", "a text file" + (" (a CSV)" if path.suffix.lower() == ".csv" else "")
    return "other", "a file cnncodes did not write"


def _hdf5_kind(path: Path) -> tuple[str, str]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
            n = int(f["ids"].shape[0]) if "ids" in f else None
    except (OSError, KeyError, ValueError):
        return "other", "an HDF5 file"
    fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
    if fmt == "cnncodes.codes":
        return STORE, "a cnncodes code store" + (f" ({n} rows)" if n is not None else "")
    if fmt == "cnncodes.segment":
        return SEGMENT, "a segment file of a cnncodes code store"
    return "other", "an HDF5 file (not a cnncodes code store)"


def _zip_kind(path: Path) -> tuple[str, str]:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return "other", "a damaged zip file"
    if "schema.json" in names:
        return MODEL, "a skops model file"
    if any(n.endswith("/extra/cnncodes.json") for n in names):
        return EXPORT, "a TorchScript network exported by cnncodes"
    if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return _torch_kind(path)
    return "other", "a zip file"


def _torch_kind(path: Path) -> tuple[str, str]:
    import torch

    try:  # mmap: the tensors are not read, only the dict around them
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - damaged, or not loadable without running code
        return "other", "a PyTorch file"
    if isinstance(obj, dict) and obj.get("format") == "cnncodes.finetuned":
        return CHECKPOINT, "a cnncodes fine-tuned checkpoint"
    return "other", "a PyTorch file (not a cnncodes fine-tuned checkpoint)"


def check_output(path, kind: str, *, option: str | None = None) -> None:
    """Refuse to write `kind` to `path` when a file of another kind is there.

    A file of the same kind (refitting into ``model.skops``, extending a store) and an
    empty file are overwritten as before. `option` names the flag or argument that gave
    the path (``"-o"``), for the message.
    """
    found, what = file_kind(path)
    if found is None or found in (kind, "empty"):
        return
    given = f" ({option})" if option else ""
    raise OutputExistsError(
        f"refusing to overwrite {str(path)!r}{given}: it is {what}, and this would replace it with "
        f"{_WRITES[kind]}. Choose another output path, or delete {Path(path).name} first if you "
        f"no longer need it."
    )
