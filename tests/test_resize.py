"""Resizing on the model's device (extract(resize="device")): pixels, bounds, provenance."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import MobileNet_V2_Weights

from cnncodes import CodeStore, StoreMismatchError, extract
from cnncodes._cli.main import main as cli
from cnncodes._errors import CnnCodesError
from cnncodes._extract.forward import collate
from cnncodes._input.images import Preprocess, decode, resize_batch

WEIGHTS = MobileNet_V2_Weights.IMAGENET1K_V1
WORKERS = Preprocess.from_weights(WEIGHTS)  # 256 -> 224, resized by PIL where decoded
DEVICE = Preprocess.from_weights(WEIGHTS, resize="device")
CPU = torch.device("cpu")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _photo(sample_dir, size) -> bytes:
    """A sample photo stretched to `size`, as PNG (no JPEG draft: the full size is decoded)."""
    photo = Image.open(sorted((sample_dir / "tulip").iterdir())[0]).convert("RGB")
    return _png(photo.resize(size, Image.BICUBIC))


def test_device_resize_on_a_cpu_enlarges_to_the_workers_pixels(sample_dir):
    """Check that decode + resize_batch on a CPU, enlarging, equals PIL's resize in the
    decoding processes, for a stacked batch of equal-sized photos and for a list of mixed
    sizes, and that both come out channels-last (what the resize and the model read fastest)."""
    photos = [p.read_bytes() for p in sorted(sample_dir.rglob("*.jpg"))[:6]]
    photos += [_photo(sample_dir, (300, 200)), _photo(sample_dir, (97, 333))]
    want = torch.stack([decode(b, WORKERS) for b in photos])
    raw = [decode(b, DEVICE) for b in photos]
    assert tuple(raw[0].shape) == (3, 128, 128)  # left at the photo's own size
    assert tuple(raw[6].shape) == (3, 200, 300) and tuple(raw[7].shape) == (3, 333, 97)
    stacked = collate([(i, x, "", None) for i, x in enumerate(raw[:6])])[1]
    assert isinstance(stacked, torch.Tensor) and tuple(stacked.shape) == (6, 3, 128, 128)
    assert stacked.is_contiguous(memory_format=torch.channels_last)
    mixed = collate([(i, x, "", None) for i, x in enumerate(raw)])[1]
    assert isinstance(mixed, list) and len(mixed) == 8
    assert torch.equal(resize_batch(stacked, DEVICE, CPU), want[:6])
    out = resize_batch(mixed, DEVICE, CPU)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (8, 3, 224, 224)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, want)


def test_device_resize_on_a_cpu_reduces_within_two_grey_levels():
    """Check that reducing real photos (crops of scikit-learn's two sample photos, 260 to 640
    px) on a CPU differs from PIL's rounding in few pixels by at most two grey levels, and
    that the codes agree to cosine 0.99999 (measured: 0.2 % of the pixels, 0.999996)."""
    from sklearn.datasets import load_sample_images

    from cnncodes._backbones.registry import get_backbone
    from cnncodes._extract.forward import CodesForward
    from cnncodes._backbones.weights import resolve

    rng = np.random.default_rng(1)
    photos = []
    for k in range(16):
        img = load_sample_images().images[k % 2]  # 427 x 640
        h, w = rng.integers(260, 428), rng.integers(260, 641)
        y, x = rng.integers(0, 428 - h), rng.integers(0, 641 - w)
        photos.append(_png(Image.fromarray(img[y:y + h, x:x + w])))
    want = torch.stack([decode(b, WORKERS) for b in photos])
    got = resize_batch([decode(b, DEVICE) for b in photos], DEVICE, CPU)
    diff = (got.int() - want.int()).abs()
    assert diff.max().item() <= 2 and 0 < (diff > 0).float().mean().item() < 0.01
    spec = get_backbone("mobilenet_v2")
    forward = CodesForward(spec, resolve(spec, "imagenet"), [spec.layer("block5")], "avg", WORKERS, CPU,
                           "float32")
    a, b = forward(want)["block5"], forward(got)["block5"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.99999, cos.min()


@pytest.mark.parametrize("size, bound", [((2000, 1500), (750, 1000)), ((1100, 1100), (550, 550)),
                                         ((4000, 300), (300, None)), ((700, 600), (600, 700))],
                         ids=["2000x1500", "1100x1100", "4000x300", "700x600"])
def test_what_goes_to_the_device_stays_small(sample_dir, size, bound):
    """Check that large images cross reduced by an integer box filter to >= 2x the resize
    target, elongated ones cropped to what survives, and that the result stays close to PIL's."""
    data = _photo(sample_dir, size)
    raw = decode(data, DEVICE)
    h, w = raw.shape[1:]
    if bound[1] is None:  # 4000x300: cropped to the part the centre crop keeps, not reduced
        assert h == 300 and w < 300 * 1.5
    else:
        assert (h, w) == bound
    assert min(h, w) >= 2 * DEVICE.resize_size or min(size) < 4 * DEVICE.resize_size
    diff = (resize_batch(raw[None], DEVICE, CPU)[0].int() - decode(data, WORKERS).int()).abs()
    assert diff.float().mean().item() < 1.0 and diff.max().item() <= 12, (
        f"mean abs diff {diff.float().mean().item():.2f}, max {diff.max().item()}")


def test_extract_records_the_resize_and_never_mixes_it(photos, tmp_path):
    """Check that resize="device" is the default on a CPU, gives the workers' codes for
    these (enlarged) photos, is recorded in the store, is followed when omitted, and that
    asking for the other one names the setting."""
    extract(photos, out=tmp_path / "workers.h5", resize="workers", num_workers=0, progress=False)
    out = tmp_path / "device.h5"
    first = extract(photos, out=out, num_workers=0, progress=False)
    store = CodeStore(out)
    assert first.n_extracted == 12 and store.spec["preprocessing"]["resize"] == "device"
    assert "on the model's device (torch)" in store.spec["preprocessing"]["description"]
    np.testing.assert_array_equal(store.codes("block5"), CodeStore(tmp_path / "workers.h5").codes("block5"))
    assert CodeStore(tmp_path / "workers.h5").spec["preprocessing"]["resize"] == "workers"
    again = extract(photos, out=out, num_workers=0, progress=False)  # resize omitted: the store's
    assert again.n_unchanged == 12 and again.n_extracted == 0
    with pytest.raises(StoreMismatchError, match=r"device\.h5 was made with preprocessing .*on the model's "
                       r"device \(torch\).* but this run asks for preprocessing 'resize shorter side to 256 "
                       r"\(bilinear, antialias=True\), centre crop 224"):
        extract(photos, out=out, resize="workers", progress=False)


def test_a_store_from_before_the_setting_reads_as_workers(photos, tmp_path):
    """Check that a store whose spec has no resize entry is extended as resize="workers"."""
    import h5py
    import json

    out = tmp_path / "old.h5"
    extract(photos, out=out, resize="workers", num_workers=0, progress=False)  # as all were then
    with h5py.File(out, "r+") as f:
        spec = json.loads(f.attrs["spec"])
        del spec["preprocessing"]["resize"]
        f.attrs["spec"] = json.dumps(spec)
    (photos / "rose" / "copy.jpg").write_bytes((photos / "daisy").iterdir().__next__().read_bytes())
    result = extract(photos, out=out, num_workers=0, progress=False)
    assert result.n_unchanged == 12 and result.n_reused == 1


def test_a_bad_resize_value_says_what_to_do(photos, tmp_path):
    """Check the words of the error for an unknown resize value, and that nothing is written."""
    with pytest.raises(CnnCodesError, match=r"unknown resize 'gpu'\. Valid values: workers, device "
                                            r"\(where images are resized"):
        extract(photos, out=tmp_path / "x.h5", resize="gpu", progress=False)
    assert not (tmp_path / "x.h5").exists()


def test_cli_resize_flag(photos, tmp_path, capsys):
    """Check that `cnncodes extract --resize device` reaches the store."""
    out = tmp_path / "cli.h5"
    assert cli(["extract", str(photos), "-o", str(out), "--resize", "device", "--quiet"]) == 0
    assert CodeStore(out).spec["preprocessing"]["resize"] == "device"


@pytest.mark.gpu
def test_cuda_device_resize_agrees_with_the_workers(sample_dir, tmp_path):
    """Check, on a GPU, that the default there is resize="device", within one grey level of
    PIL's pixels and within cosine 0.997 of the workers' codes (measured on a CPU by resizing
    in float as CUDA does: block5 0.9976 at worst over the 40 photos, mean 0.9992)."""
    photos = [p.read_bytes() for p in sorted(sample_dir.rglob("*.jpg"))]
    cuda = torch.device("cuda")
    pixels = resize_batch([decode(b, DEVICE).pin_memory() for b in photos], DEVICE, cuda).cpu()
    want = torch.stack([decode(b, WORKERS) for b in photos])
    assert (pixels.int() - want.int()).abs().max().item() <= 1
    settings = dict(layers=["block5"], device="cuda", precision="float32", progress=False)
    extract(sample_dir, out=tmp_path / "auto.h5", **settings)
    extract(sample_dir, out=tmp_path / "workers.h5", resize="workers", **settings)
    gpu, ref = CodeStore(tmp_path / "auto.h5"), CodeStore(tmp_path / "workers.h5")
    assert gpu.spec["preprocessing"]["resize"] == "device"
    a, b = gpu.codes("block5"), ref.codes("block5")
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.997
