"""Unit tests of cnncodes._input.images: PIL modes to RGB, preprocessing, decode failures."""

import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image, features
from torchvision.models import MobileNet_V2_Weights

import oddimages as odd
from cnncodes._input.images import DEFAULT_MAX_PIXELS, ImageDecodeError, Preprocess, decode, preprocess, to_rgb

WEIGHTS = MobileNet_V2_Weights.IMAGENET1K_V1
PREP = Preprocess.from_weights(WEIGHTS)  # 256 -> 224, the weights' own
PREP64 = Preprocess.from_weights(WEIGHTS, 64)  # 73 -> 64, as the `fast` fixture
CYAN, GREY = (0, 255, 255), (127, 127, 127)


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def _rgb(data: bytes) -> np.ndarray:
    img = to_rgb(_open(data))
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


# --------------------------------------------------------------------------- to_rgb

MODES = [
    # factory, the mode PIL opens, the expected size, {(x, y): rgb}, tolerance
    pytest.param(odd.cmyk_jpeg, "CMYK", (64, 32), {(8, 16): odd.RED, (56, 16): CYAN}, 8, id="cmyk-jpeg"),
    pytest.param(odd.palette_transparent_png, "P", (64, 32), {(8, 16): odd.WHITE, (56, 16): odd.BLUE}, 0,
                 id="palette-transparent-on-white"),
    pytest.param(odd.rgba_png, "RGBA", (64, 32),
                 {(8, 16): odd.WHITE, (56, 16): odd.BLUE, (8, 1): GREY, (56, 1): GREY}, 1,
                 id="rgba-composited-on-white"),
    pytest.param(odd.la_png, "LA", (64, 32), {(8, 16): odd.WHITE, (56, 16): odd.BLACK}, 0,
                 id="la-composited-on-white"),
    pytest.param(odd.bilevel_png, "1", (64, 32), {(8, 16): odd.BLACK, (56, 16): odd.WHITE}, 0, id="mode-1"),
    pytest.param(odd.webp, "RGB", (64, 32), {(8, 16): odd.RED, (56, 16): odd.BLUE}, 0, id="webp",
                 marks=pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")),
]


@pytest.mark.parametrize("make, mode, size, pixels, tol", MODES)
def test_to_rgb_converts_mode(make, mode, size, pixels, tol):
    """Check that each PIL mode becomes RGB with the right colours, transparency on white."""
    data = make()
    assert _open(data).mode == mode
    rgb = _rgb(data)
    assert rgb.shape == (size[1], size[0], 3)
    for (x, y), want in pixels.items():
        assert np.abs(rgb[y, x] - want).max() <= tol, f"pixel ({x}, {y}) is {rgb[y, x]}, want {want}"


@pytest.mark.parametrize("make, mode", [
    pytest.param(odd.grey16_png, "I;16", id="png-I;16"),
    pytest.param(odd.grey16_pgm, "I", id="pgm-16bit-I"),
    pytest.param(odd.float_tiff, "F", id="tiff-float-0..1"),
])
def test_to_rgb_rescales_high_bit_depth(make, mode):
    """Check that 16-bit and float greyscale map onto 0..255 (65535 -> 255), not clipped."""
    data = make()
    assert _open(data).mode == mode
    rgb = _rgb(data)
    expected = np.broadcast_to(np.arange(256)[:, None], (256, 3))
    np.testing.assert_array_equal(rgb[4], expected)


def test_to_rgb_applies_exif_orientation():
    """Check that EXIF orientation 6 swaps width and height and rotates the pixels clockwise."""
    data = odd.exif_rotated_jpeg()
    stored = _open(data)
    assert stored.size == (64, 32) and stored.getexif()[odd.ORIENTATION] == 6
    rgb = _rgb(data)
    assert rgb.shape == (64, 32, 3)
    quadrants = {(8, 8): odd.BLUE, (24, 8): odd.RED, (8, 56): odd.WHITE, (24, 56): odd.GREEN}
    for (x, y), want in quadrants.items():
        assert np.abs(rgb[y, x] - want).max() <= 8, f"pixel ({x}, {y}) is {rgb[y, x]}, want {want}"


def test_decode_uses_first_frame_of_animation():
    """Check that an animated GIF decodes to its first frame (red), not a later one (blue)."""
    data = odd.animated_gif()
    img = _open(data)
    assert img.n_frames == 2
    img.seek(1)
    assert img.convert("RGB").getpixel((0, 0)) == odd.BLUE
    out = decode(data, PREP64)
    expected = torch.tensor(odd.RED, dtype=torch.uint8).view(3, 1, 1).expand(3, 64, 64)
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------- preprocess


@pytest.mark.parametrize("prep", [PREP, PREP64], ids=["crop224", "crop64"])
@pytest.mark.parametrize("make", [odd.one_pixel_png, odd.wide_png, odd.tall_png],
                         ids=["1x1", "4000x3", "3x4000"])
def test_preprocess_extreme_shapes(make, prep):
    """Check that 1x1, very wide and very tall images give uint8 (3, crop, crop) of their colours."""
    out = preprocess(to_rgb(_open(make())), prep)
    c = prep.crop_size
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, c, c)
    if make is odd.wide_png:  # red | blue, split at the centre
        left, right = out[:, :, 0].int(), out[:, :, -1].int()
        assert (left - torch.tensor(odd.RED)[:, None]).abs().max() <= 2
        assert (right - torch.tensor(odd.BLUE)[:, None]).abs().max() <= 2
    else:
        colour = odd.RED if make is odd.one_pixel_png else odd.GREEN
        assert torch.equal(out, torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, c, c))


def _torchvision_crop(img: Image.Image, prep: Preprocess) -> torch.Tensor:
    """The torchvision geometry on the whole image: resize shorter side, centre crop."""
    img = F.resize(img, [prep.resize_size], interpolation=F.InterpolationMode(prep.interpolation),
                   antialias=prep.antialias)
    return F.pil_to_tensor(F.center_crop(img, [prep.crop_size]))


@pytest.mark.parametrize("size", [(4000, 300), (300, 4000), (2000, 499), (1234, 101)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_preprocess_elongated_matches_torchvision(sample_dir, size):
    """Check that the shortcut for elongated images keeps torchvision's scale and centre crop."""
    photo = Image.open(sorted((sample_dir / "rose").iterdir())[0]).convert("RGB")
    img = photo.resize(size, Image.BICUBIC)
    ours = preprocess(img, PREP).int()
    ref = _torchvision_crop(img, PREP).int()
    diff = (ours - ref).abs()
    # Sub-pixel rounding of the crop position is all that may differ (not a zoom or a shift).
    assert diff.float().mean().item() < 1.0 and diff.max().item() <= 8, (
        f"mean abs diff {diff.float().mean().item():.2f}, max {diff.max().item()}")


@pytest.mark.parametrize("cls", ["daisy", "dandelion", "rose", "sunflower", "tulip"])
def test_decode_matches_torchvision_transform(sample_dir, cls):
    """Check that decode + Preprocess.normalize equals the weights' own torchvision transform."""
    path = sorted((sample_dir / cls).iterdir())[0]
    ours = PREP.normalize(decode(path.read_bytes(), PREP)[None])[0]
    ref = WEIGHTS.transforms()(Image.open(path))
    assert ours.shape == ref.shape == (3, 224, 224)
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", sorted(odd.VALID))
def test_decode_valid_odd_images(name):
    """Check that every odd but valid file decodes to uint8 (3, 64, 64)."""
    out = decode(odd.VALID[name](), PREP64)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 64, 64)


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("make, reason", [
    pytest.param(odd.truncated_jpeg, r"^cannot decode: image file is truncated", id="truncated-jpeg"),
    pytest.param(lambda: b"", r"^empty file \(0 bytes\)$", id="empty"),
    pytest.param(odd.BROKEN["notes.jpg"], r"^not an image \(PIL cannot identify", id="text-file"),
    pytest.param(odd.bomb_png, r"^decompression bomb: Image size \(400000000 pixels\)", id="bomb-20000x20000"),
    pytest.param(odd.bad_tiff, r"^cannot decode: ", id="tiff-strip-offsets-mistyped"),
])
def test_decode_broken_raises_reason(make, reason):
    """Check that each kind of broken file raises ImageDecodeError with a readable reason."""
    with pytest.raises(ImageDecodeError, match=reason):
        decode(make(), PREP64)


def test_corrupt_exif_keeps_the_pixels():
    """Check that a JPEG whose EXIF block is corrupt decodes, unrotated, to its own pixels."""
    from PIL import ImageOps

    data = odd.bad_exif_jpeg()
    with pytest.raises(Exception):  # Pillow itself fails on this EXIF block
        ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    rgb = to_rgb(Image.open(io.BytesIO(data)))
    assert rgb.size == (64, 32)  # orientation 6 not applied: it could not be read
    r, g, b = rgb.getpixel((10, 10))
    assert r > 200 and g < 60 and b < 60  # the red content


def test_bomb_png_is_small_but_huge():
    """Check that the bomb file is a few tens of KB on disk but claims 20000x20000 pixels."""
    data = odd.bomb_png()
    assert len(data) < 64_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))


def test_decode_max_pixels_guard():
    """Check that an image above max_pixels (but under PIL's own limit) is refused by size."""
    data = odd.bomb_png(12000, 12000)  # 144 M pixels: PIL only warns
    with pytest.raises(ImageDecodeError, match=r"^decompression bomb: 12000x12000 = 144,000,000 "
                       r"pixels exceeds max_pixels=100,000,000$"):
        decode(data, PREP64, DEFAULT_MAX_PIXELS)
    small = odd.photo_like_png()  # 80x60 = 4800 pixels
    with pytest.raises(ImageDecodeError, match=r"80x60 = 4,800 pixels exceeds max_pixels=4,799"):
        decode(small, PREP64, max_pixels=4799)
    assert tuple(decode(small, PREP64, max_pixels=4800).shape) == (3, 64, 64)
