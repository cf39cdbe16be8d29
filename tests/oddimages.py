"""Odd but valid image files, and broken ones, generated with PIL for the decoding tests.

Each generator returns the file's bytes; its pixel content is known (solid regions, exact
ramps) so that tests can check decoded values. `make_odd_folder` writes them all into one
flat folder.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, features

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
ORIENTATION = 0x0112
UNICODE_NAME = "fleur_été_花.png"


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _halves(left, right, size=(64, 32), mode="RGB") -> Image.Image:
    """A `size` (w, h) image: left half `left`, right half `right`."""
    w, h = size
    img = Image.new(mode, size, left)
    img.paste(right, (w // 2, 0, w, h))
    return img


# --------------------------------------------------------------------------- valid


def cmyk_jpeg() -> bytes:
    """CMYK JPEG: left half pure red (C=0 M=Y=255), right half pure cyan (C=255)."""
    return _save(_halves((0, 255, 255, 0), (255, 0, 0, 0), mode="CMYK"), "JPEG", quality=95)


def grey16_png() -> bytes:
    """16-bit greyscale (I;16) PNG, 256x8: column x holds x * 257, a ramp over 0..65535."""
    ramp = np.tile((np.arange(256, dtype=np.uint16) * 257), (8, 1))
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    return _save(img, "PNG")


def grey16_pgm() -> bytes:
    """16-bit PGM (opens as mode I), 256x8: column x holds x * 257."""
    ramp = np.tile((np.arange(256, dtype=np.uint16) * 257), (8, 1))
    return _save(Image.fromarray(ramp), "PPM")


def float_tiff() -> bytes:
    """Mode F TIFF, 256x8: column x holds x / 255 (floats in 0..1)."""
    ramp = np.tile(np.arange(256, dtype=np.float32) / 255.0, (8, 1))
    return _save(Image.fromarray(ramp, mode="F"), "TIFF")


def palette_transparent_png() -> bytes:
    """P PNG, index 0 (red) transparent on the left half, index 1 (blue) opaque on the right."""
    img = _halves(0, 1, mode="P")
    img.putpalette([*RED, *BLUE] + [0] * 3 * 254)
    return _save(img, "PNG", transparency=0)


def rgba_png() -> bytes:
    """RGBA PNG: left half transparent red, right half opaque blue, a half-alpha black band."""
    img = _halves((255, 0, 0, 0), (0, 0, 255, 255), mode="RGBA")
    img.paste((0, 0, 0, 128), (0, 0, 64, 4))
    return _save(img, "PNG")


def la_png() -> bytes:
    """LA PNG: left half transparent black, right half opaque black."""
    return _save(_halves((0, 0), (0, 255), mode="LA"), "PNG")


def bilevel_png() -> bytes:
    """Mode "1" PNG: left half black, right half white."""
    return _save(_halves(0, 1, mode="1"), "PNG")


def exif_rotated_jpeg() -> bytes:
    """64x32 JPEG with EXIF orientation 6, quadrants red | green over blue | white (as stored).

    Displayed (rotated 90 degrees clockwise) it is 32x64: blue | red over white | green.
    """
    img = Image.new("RGB", (64, 32), RED)
    img.paste(GREEN, (32, 0, 64, 16))
    img.paste(BLUE, (0, 16, 32, 32))
    img.paste(WHITE, (32, 16, 64, 32))
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    return _save(img, "JPEG", quality=95, exif=exif.tobytes())


def one_pixel_png() -> bytes:
    return _save(Image.new("RGB", (1, 1), RED), "PNG")


def wide_png() -> bytes:
    """4000x3: a blue strip with a red left half."""
    return _save(_halves(RED, BLUE, size=(4000, 3)), "PNG")


def tall_png() -> bytes:
    """3x4000, one colour (green)."""
    return _save(Image.new("RGB", (3, 4000), GREEN), "PNG")


def animated_gif() -> bytes:
    """Two frames: red, then blue."""
    frames = [Image.new("RGB", (32, 24), RED), Image.new("RGB", (32, 24), BLUE)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def photo_like_png(seed: int = 0) -> bytes:
    """An ordinary RGB image with smooth random content."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return _save(small.resize((80, 60), Image.BICUBIC), "PNG")


def webp() -> bytes:
    return _save(_halves(RED, BLUE), "WEBP", lossless=True)


# --------------------------------------------------------------------------- broken


def truncated_jpeg() -> bytes:
    """A valid noisy JPEG with its second half cut off."""
    rng = np.random.default_rng(1)
    data = _save(Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)), "JPEG")
    return data[: len(data) // 2]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A real, all-black 1-bit PNG of width x height pixels, compressed to a few tens of KB."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then zero bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def bad_exif_jpeg() -> bytes:
    """A sound JPEG whose EXIF says orientation 6 and mistypes Compression as text.

    Pillow's exif_transpose fails (struct.error) re-writing that EXIF block.
    """
    entries = [(0x0103, 2, 6, 38), (ORIENTATION, 3, 1, 6)]  # (tag, type, count, value/offset)
    tiff = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    tiff += b"".join(struct.pack("<HHII", *e) for e in entries) + struct.pack("<I", 0)
    assert len(tiff) == 38  # where the Compression "text" lives
    tiff += b"model\x00"
    return _save(Image.new("RGB", (64, 32), RED), "JPEG", exif=b"Exif\x00\x00" + tiff)


def bad_tiff() -> bytes:
    """An uncompressed TIFF whose StripOffsets tag is typed RATIONAL (Pillow: TypeError)."""
    data = bytearray(_save(Image.new("RGB", (16, 8), RED), "TIFF"))
    assert data[:4] == b"II*\x00"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        at = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, at)[0] == 273:  # StripOffsets
            struct.pack_into("<H", data, at + 2, 5)
            return bytes(data)
    raise AssertionError("no StripOffsets tag in Pillow's TIFF")


VALID = {
    "cmyk.jpg": cmyk_jpeg,
    "grey16.png": grey16_png,
    "grey16.pgm": grey16_pgm,
    "float.tif": float_tiff,
    "palette_transparent.png": palette_transparent_png,
    "rgba.png": rgba_png,
    "la.png": la_png,
    "bilevel.png": bilevel_png,
    "exif_rotated.jpg": exif_rotated_jpeg,
    "one_pixel.png": one_pixel_png,
    "wide.png": wide_png,
    "tall.png": tall_png,
    "animated.gif": animated_gif,
    UNICODE_NAME: photo_like_png,
    "bad_exif.jpg": bad_exif_jpeg,  # pixels fine, EXIF corrupt: decoded without reorienting
}
if features.check("webp"):
    VALID["lossless.webp"] = webp

BROKEN = {
    "truncated.jpg": truncated_jpeg,
    "empty.jpg": lambda: b"",
    "notes.jpg": lambda: "shopping list: flour, eggs\n".encode(),
    "bomb.png": bomb_png,
    "bad_strips.tif": bad_tiff,
}


def make_odd_folder(root: Path) -> tuple[list[str], list[str]]:
    """Write every valid and broken file into the flat folder `root`; return their names."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, make in {**VALID, **BROKEN}.items():
        (root / name).write_bytes(make())
    return sorted(VALID), sorted(BROKEN)
