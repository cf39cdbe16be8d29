"""Decoding any image file to a fixed-size uint8 RGB tensor with the weights' preprocessing."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from cnncodes._errors import ImageDecodeError

DEFAULT_MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class Preprocess:
    """The weights' preprocessing: resize shorter side, centre crop, normalise."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    antialias: bool = True
    # Decode large JPEGs at a reduced DCT scale (PIL's draft), never below twice the resize
    # target, so the antialiased resize still sees >= 2x oversampling.
    jpeg_draft: bool = False
    # Where the resize and crop run: "workers" (PIL, where the image is decoded: torchvision's
    # transform of the weights) or "device" (torch's antialiased resize on the model's device,
    # after the uint8 transfer; on a GPU this takes most of the decoding work off the CPU).
    resize: str = "workers"

    @classmethod
    def from_weights(cls, member, image_size: int | None = None, jpeg_draft: bool = False,
                     resize: str = "workers") -> "Preprocess":
        """Read the preprocessing of torchvision weights; optionally rescale it to image_size."""
        t = member.transforms()
        resize_size, crop = int(t.resize_size[0]), int(t.crop_size[0])
        if image_size is not None:
            resize_size, crop = int(round(image_size * resize_size / crop)), int(image_size)
        return cls(resize_size, crop, tuple(t.mean), tuple(t.std), t.interpolation.value,
                   bool(t.antialias), bool(jpeg_draft), resize)

    def describe(self) -> str:
        # Unchanged for resize="workers": stores compare their preprocessing with this text.
        where = "" if self.resize == "workers" else (
            f"; on the model's device (torch), larger images first reduced to no less than "
            f"{2 * self.resize_size} px by an integer box filter")
        return (
            f"resize shorter side to {self.resize_size} ({self.interpolation}, "
            f"antialias={self.antialias}{where}), centre crop {self.crop_size}, rescale to [0, 1], "
            f"normalise mean={list(self.mean)} std={list(self.std)}"
            + (f"; JPEGs larger than {2 * self.resize_size} px decoded at reduced scale"
               if self.jpeg_draft else "")
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    def normalize(self, batch: torch.Tensor, memory_format=torch.preserve_format) -> torch.Tensor:
        """uint8 NCHW -> float NCHW, normalised; done per batch, on the model's device.

        One float32 tensor, written once and then scaled in place (in `memory_format`; the
        batch's own by default): a 64-image batch at 224 px takes 16 ms on 2 cores, not the
        40 ms of a new tensor per operation and a copy to channels-last after. The values are
        bit for bit those of ``(batch / 255 - mean) / std``.
        """
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        out = torch.empty_like(batch, dtype=torch.float32, memory_format=memory_format)
        return out.copy_(batch).div_(255.0).sub_(mean).div_(std)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: EXIF orientation applied, alpha composited on white."""
    try:
        # exif_transpose copies even an image it leaves as it is: most photos need no turn.
        if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block: the pixels are fine, keep them
        pass  # as browsers do when the orientation cannot be read
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        else:
            scale = 1.0 / 257.0 if (img.mode.startswith("I;16") or arr.max(initial=0) > 255) else 1.0
        img = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image


def preprocess(img: Image.Image, prep: Preprocess) -> torch.Tensor:
    """Resize the shorter side, centre crop; return uint8 CHW (as torchvision's transform).

    With ``prep.resize == "device"`` the resize and crop are left to :func:`resize_batch`:
    the image comes back at its own size, only bounded (see :meth:`Preprocess.describe`).
    """
    import torchvision.transforms.functional as F

    w, h = img.size
    short, long_ = min(w, h), max(w, h)
    # A very elongated image would be resized to an enormous strip and then mostly cropped
    # away: crop the source to what survives (plus a margin for the filter) first. The crop
    # is never narrower than the short side, which must stay the short side for the resize.
    keep = max(short, math.ceil(short * prep.crop_size / prep.resize_size) + 8)
    if long_ > 4 * short and long_ > keep:
        if w > h:
            left = (w - keep) // 2
            img = img.crop((left, 0, left + keep, h))
        else:
            top = (h - keep) // 2
            img = img.crop((0, top, w, top + keep))
    if prep.resize == "device":
        # What crosses to the device stays small: an integer box reduction down to no less
        # than twice the resize target, the oversampling the JPEG draft keeps too.
        factor = min(img.size) // (2 * prep.resize_size)
        if factor >= 2:
            img = img.reduce(factor)
        return F.pil_to_tensor(img)
    interp = F.InterpolationMode(prep.interpolation)
    img = F.resize(img, [prep.resize_size], interpolation=interp, antialias=prep.antialias)
    img = F.center_crop(img, [prep.crop_size])
    return F.pil_to_tensor(img)


def decode(data: bytes, prep: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode file bytes to a uint8 CHW tensor, or raise ImageDecodeError with the reason."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(
                    f"decompression bomb: {w}x{h} = {w * h:,} pixels exceeds max_pixels={max_pixels:,}"
                )
            img.seek(0)  # first frame of animations
            if prep.jpeg_draft and img.format == "JPEG" and min(w, h) >= 4 * prep.resize_size:
                # DCT-domain downscaling: 1/2, 1/4 or 1/8 of the pixels to decode and resize.
                floor = 2 * prep.resize_size / min(w, h)
                img.draft("RGB", (math.ceil(w * floor), math.ceil(h * floor)))
            img.load()
            rgb = to_rgb(img)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image (PIL cannot identify the file format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"cannot decode: {exc}") from None
    except Exception as exc:  # PIL raises struct.error, TypeError ... on malformed files
        raise ImageDecodeError(f"cannot decode: {type(exc).__name__}: {exc}") from None
    return preprocess(rgb, prep)


def resize_batch(batch, prep: Preprocess, device: torch.device) -> torch.Tensor:
    """Finish on the device what ``decode`` left for it: resize and centre crop, uint8 NCHW.

    ``batch`` is a uint8 NCHW tensor of equal-sized images, or a list of uint8 CHW tensors
    of any sizes (on the CPU, pinned for a GPU); the result is channels-last. On a CPU
    torchvision resizes uint8 images in fixed point as PIL does: enlarged, the pixels equal
    the ``"workers"`` path's; reduced, its rounding differs from PIL's in a few pixels by one
    or two grey levels (0.2 % of them on real photos). On a GPU it resizes in float and
    rounds: within one grey level of PIL.
    """
    import torchvision.transforms.v2.functional as F

    interp = F.InterpolationMode(prep.interpolation)

    def resized(x):  # channels-last: torch's uint8 resize runs 3.6x faster on it (2 cores)
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        x = F.resize(x, [prep.resize_size], interpolation=interp, antialias=prep.antialias)
        return F.center_crop(x, [prep.crop_size])

    if isinstance(batch, torch.Tensor):
        return resized(batch)
    c = prep.crop_size
    out = torch.empty((len(batch), 3, c, c), dtype=torch.uint8, device=device,
                      memory_format=torch.channels_last)
    for k, x in enumerate(batch):
        out[k] = resized(x[None])[0]
    return out
