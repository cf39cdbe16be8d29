"""An exported model run by ONNX Runtime, with the reference preprocessing in PIL and numpy only (no torch)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

from cnncodes._errors import CnnCodesError

METADATA_KEY = "cnncodes"


MAX_PIXELS = 100_000_000  # as cnncodes' own decoding: larger images are refused, not decoded


def preprocess(image, preprocessing: dict, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode and resize a photo as cnncodes does, to the uint8 ``(3, crop, crop)`` an export takes.

    The reference for feeding an exported network without cnncodes: PIL and numpy only.
    EXIF orientation applied, transparency composited on white, the shorter side resized to
    ``resize_size`` (bilinear, antialiased), a centre crop of ``crop_size``.

    Parameters
    ----------
    image : path, bytes, file object or PIL image
    preprocessing : dict
        The ``"preprocessing"`` of the export's metadata.
    max_pixels : int
        Larger images raise ValueError ("decompression bomb: ...") before they are decoded.

    Returns
    -------
    ndarray of shape (3, crop_size, crop_size), uint8
    """
    from PIL import Image, ImageOps

    p = preprocessing
    if isinstance(image, (bytes, bytearray)):
        image = io.BytesIO(image)
    img = image if isinstance(image, Image.Image) else Image.open(image)
    w, h = img.size
    if w * h > max_pixels:
        raise ValueError(f"decompression bomb: {w}x{h} = {w * h:,} pixels exceeds max_pixels={max_pixels:,}")
    if p.get("jpeg_draft") and img.format == "JPEG" and min(w, h) >= 4 * p["resize_size"]:
        floor = 2 * p["resize_size"] / min(w, h)  # decode at 1/2, 1/4 or 1/8 scale, as cnncodes does
        img.draft("RGB", (math.ceil(w * floor), math.ceil(h * floor)))
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA", "P") or "transparency" in img.info:
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    img = img.convert("RGB")
    if p.get("resize") == "device":  # cnncodes first reduces large images by an integer box filter
        factor = min(img.size) // (2 * p["resize_size"])
        if factor >= 2:
            img = img.reduce(factor)
    w, h, s, c = *img.size, p["resize_size"], p["crop_size"]
    size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
    img = img.resize(size, Image.Resampling[p.get("interpolation", "bilinear").upper()])
    left, top = int(round((size[0] - c) / 2.0)), int(round((size[1] - c) / 2.0))
    return np.asarray(img.crop((left, top, left + c, top + c))).transpose(2, 0, 1)


class OnnxModel:
    """An exported ``.onnx`` model with ONNX Runtime: photos or pixels in, probabilities out.

    Needs ``onnxruntime`` and PIL, not torch: ``pip install 'cnncodes[export]'``.

    Attributes
    ----------
    classes : list of str
    metadata : dict
        The export's metadata (classes, input, preprocessing, provenance).
    """

    def __init__(self, path, *, threads: int | None = None):
        from cnncodes._optional import require

        ort = require("onnxruntime", "running an exported model")
        self.path = str(path)
        if not Path(path).is_file():
            raise CnnCodesError(f"model file {self.path!r} does not exist. Make one with `cnncodes export`.")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
            self.metadata = json.loads(self.session.get_modelmeta().custom_metadata_map[METADATA_KEY])
        except Exception as exc:  # noqa: BLE001 - not ONNX, or an ONNX file cnncodes did not write
            raise CnnCodesError(f"{Path(path).name} is not an ONNX model exported by cnncodes "
                                f"({type(exc).__name__}: {str(exc)[:120]}). Make one with `cnncodes export`.") from None
        self.classes = list(self.metadata["classes"])
        self.input = self.metadata["input"]["name"]

    def preprocess(self, image) -> np.ndarray:
        """The uint8 ``(3, crop, crop)`` pixels of one photo (see :func:`preprocess`)."""
        return preprocess(image, self.metadata["preprocessing"])

    def predict_proba(self, pixels) -> np.ndarray:
        """Class probabilities of a uint8 ``(n, 3, crop, crop)`` batch, float32 ``(n, n_classes)``."""
        return self.session.run(None, {self.input: np.ascontiguousarray(pixels, dtype=np.uint8)})[0]
