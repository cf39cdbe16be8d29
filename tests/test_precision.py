"""The fast path: reduced precision, channels-last, torch.compile, test-time flips, JPEG drafts."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cnncodes import CodeStore, StoreMismatchError, extract
from cnncodes._extract.accel import cpu_has_fast_bf16, resolve_device, resolve_precision
from cnncodes._errors import CnnCodesError
from cnncodes._input.images import Preprocess, decode

needs_bf16 = pytest.mark.skipif(not cpu_has_fast_bf16(), reason="CPU without native bfloat16 (AVX-512 BF16 / AMX)")


def _cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def precision_pair(sample_dir, tmp_path_factory):
    """The 40 sample photos extracted at full preprocessing in bfloat16 and in float32."""
    folder = tmp_path_factory.mktemp("precision")
    stores = {}
    for precision in ("bfloat16", "float32"):
        out = folder / f"{precision}.h5"
        extract(sample_dir, out=out, layers=["block1", "block4", "block5"], precision=precision,
                num_workers=0, progress=False)
        stores[precision] = CodeStore(out)
    return stores


def test_auto_precision_is_bfloat16_exactly_where_the_cpu_has_it():
    """Check that 'auto' resolves to bfloat16 on a CPU with native bfloat16, else float32."""
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bfloat16" if cpu_has_fast_bf16() else "float32")
    assert resolve_precision("float32", cpu) == "float32"
    assert resolve_precision("bfloat16", cpu) == "bfloat16"


def test_bad_precision_and_device_are_refused_with_the_fix():
    """Check the words of the precision and device errors."""
    with pytest.raises(CnnCodesError, match="unknown precision 'half'. Valid precisions: auto, float32"):
        resolve_precision("half", torch.device("cpu"))
    with pytest.raises(CnnCodesError, match="'float16' needs a CUDA device; on a CPU use 'bfloat16'"):
        resolve_precision("float16", torch.device("cpu"))
    with pytest.raises(CnnCodesError, match="unknown device 'gpu0'; use 'auto', 'cpu', 'cuda'"):
        resolve_device("gpu0")


@needs_bf16
def test_bfloat16_codes_agree_with_float32_per_row(precision_pair):
    """Check that bfloat16 codes of real photos have cosine >= 0.999 with float32, every row."""
    lo, hi = precision_pair["bfloat16"], precision_pair["float32"]
    assert (lo.spec["precision"], hi.spec["precision"]) == ("bfloat16", "float32")
    assert list(lo.ids) == list(hi.ids)
    # The stem (block1) runs in float32 in both (float32 with BatchNorm folded into the
    # convolutions: rounding-level differences): bfloat16 there alone costs most of the
    # agreement. Deeper layers really are computed in another precision.
    np.testing.assert_allclose(lo.codes("block1"), hi.codes("block1"), rtol=1e-4, atol=1e-5)
    for layer in ("block4", "block5"):
        a, b = lo.codes(layer), hi.codes(layer)
        assert a.dtype == np.float32 and a.shape == b.shape
        assert not np.array_equal(a, b)
        assert _cosines(a, b).min() >= 0.999, layer


@needs_bf16
def test_bfloat16_keeps_the_imagenet_top1(precision_pair):
    """Check that the ImageNet head gives the same top-1 class on bfloat16 and float32 codes."""
    from cnncodes._backbones.registry import get_backbone
    from cnncodes._backbones.weights import load_model, resolve

    spec = get_backbone("mobilenet_v2")
    head = load_model(spec, resolve(spec)).classifier
    with torch.inference_mode():
        top = [head(torch.from_numpy(s.codes("block5"))).argmax(1) for s in precision_pair.values()]
    assert (top[0] == top[1]).float().mean() >= 0.95


def _hold_back(photos, tmp_path, n):
    """Move n photos out of the folder; return a function that puts them back."""
    aside = tmp_path / "aside"
    aside.mkdir()
    moved = [(f, aside / f"{k}.jpg") for k, f in enumerate(sorted(photos.rglob("*.jpg"))[:n])]
    for f, to in moved:
        f.rename(to)
    return lambda: [to.rename(f) for f, to in moved]


def test_auto_precision_follows_the_store_and_explicit_other_precision_is_refused(photos, tmp_path, fast):
    """Check that 'auto' extends a store in its own precision, and another one is refused."""
    out = tmp_path / "codes.h5"
    put_back = _hold_back(photos, tmp_path, 6)
    extract(photos, out=out, precision="float32", **fast)
    put_back()
    result = extract(photos, out=out, **fast)  # precision="auto"
    assert result.n_unchanged == 6 and result.n_extracted == 6
    assert CodeStore(out).spec["precision"] == "float32"
    if cpu_has_fast_bf16():
        with pytest.raises(StoreMismatchError, match="made with precision 'float32', but this run asks "
                           "for precision 'bfloat16'"):
            extract(photos, out=out, precision="bfloat16", **fast)
    assert len(CodeStore(out)) == 12


def test_flip_tta_is_the_mean_of_an_image_and_its_mirror(photos, tmp_path, fast):
    """Check that tta='flip' codes equal the mean of the codes of each photo and its mirror."""
    mirrored = tmp_path / "mirrored"
    mirrored.mkdir()
    files = sorted(photos.rglob("*.jpg"))[:4]
    for f in files:
        Image.open(f).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored / f.name.replace(".jpg", ".png"))
    # 56 px crops of a 64 px resize: a centred crop with equal margins, so mirroring the
    # file and mirroring the crop are the same pixels.
    settings = dict(fast, precision="float32", layers=["block5"], image_size=56)
    extract(files, out=tmp_path / "plain.h5", **settings)
    extract(sorted(mirrored.iterdir()), out=tmp_path / "mirror.h5", **settings)
    extract(files, out=tmp_path / "tta.h5", tta="flip", **settings)
    plain, mirror, tta = (CodeStore(tmp_path / f"{n}.h5") for n in ("plain", "mirror", "tta"))
    assert tta.spec["tta"] == "flip" and plain.spec["tta"] == "none"
    expected = (plain.codes("block5") + mirror.codes("block5")) / 2
    # The PNG mirror differs from the JPEG only by what re-encoding loses: none (lossless).
    np.testing.assert_allclose(tta.codes("block5"), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(StoreMismatchError, match="made with tta 'flip', but this run asks for tta 'none'"):
        extract(files, out=tmp_path / "tta.h5", tta="none", **settings)
    with pytest.raises(CnnCodesError, match="unknown tta 'crops'. Valid values: none, flip"):
        extract(files, out=tmp_path / "x.h5", tta="crops", **settings)


def _jpeg(size, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def test_jpeg_draft_decodes_large_photos_close_to_full_decoding(monkeypatch):
    """Check that a large JPEG is decoded through draft, close to full decoding, small ones not."""
    from torchvision.models import MobileNet_V2_Weights

    full = Preprocess.from_weights(MobileNet_V2_Weights.IMAGENET1K_V1)
    draft = Preprocess.from_weights(MobileNet_V2_Weights.IMAGENET1K_V1, jpeg_draft=True)
    calls = []

    def spy(self, mode, size):
        calls.append(size)
        return real_draft(self, mode, size)

    from PIL import JpegImagePlugin

    real_draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    large = _jpeg((2400, 1800))
    a, b = decode(large, full), decode(large, draft)
    assert calls == [(683, 512)]  # never below 2x the 256 px resize
    assert a.shape == b.shape == (3, 224, 224)
    assert np.abs(a.int().numpy() - b.int().numpy()).mean() < 2.0
    small = _jpeg((900, 700))  # under 4x the resize: decoded in full
    assert torch.equal(decode(small, full), decode(small, draft)) and len(calls) == 1
    assert "decoded at reduced scale" in draft.describe() and "reduced" not in full.describe()


def test_old_stores_without_the_new_settings_keep_extending(photos, tmp_path, fast):
    """Check that a store written before tta/jpeg_draft existed reads and extends unchanged."""
    import json

    import h5py

    out = tmp_path / "old.h5"
    put_back = _hold_back(photos, tmp_path, 9)
    extract(photos, out=out, precision="float32", jpeg_draft=False, **fast)
    put_back()
    with h5py.File(out, "r+") as f:  # as format v1 files of cnncodes 0.1 were written
        spec = json.loads(f.attrs["spec"])
        del spec["tta"], spec["preprocessing"]["jpeg_draft"]
        f.attrs["spec"] = json.dumps(spec)
    store = CodeStore(out)
    assert store.spec["tta"] == "none" and store.spec["preprocessing"]["jpeg_draft"] is False
    result = extract(photos, out=out, **fast)
    assert (result.n_unchanged, result.n_extracted) == (3, 9)


def test_compile_gives_the_eager_codes(photos, tmp_path, fast):
    """Check that compile=True (padded fixed-size batches) gives the eager codes, one row each."""
    pytest.importorskip("torch._inductor")
    files = sorted(photos.rglob("*.jpg"))[:5]  # batch_size 4: one full batch, one padded
    settings = dict(fast, precision="float32", layers=["block4"])
    extract(files, out=tmp_path / "eager.h5", compile=False, **settings)
    try:
        extract(files, out=tmp_path / "compiled.h5", compile=True, **settings)
    except CnnCodesError as exc:
        assert "torch.compile failed on this machine" in str(exc) and "compile=False" in str(exc)
        pytest.skip(f"no working torch.compile toolchain here: {exc}")
    eager, compiled = CodeStore(tmp_path / "eager.h5"), CodeStore(tmp_path / "compiled.h5")
    assert len(compiled) == 5 and list(compiled.ids) == list(eager.ids)
    np.testing.assert_allclose(compiled.codes("block4"), eager.codes("block4"), rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_cuda_codes_agree_with_cpu_float32(precision_pair, sample_dir, tmp_path):
    """Check that CUDA extraction (auto precision: bfloat16/float16) agrees with CPU float32.

    The images are resized as on the CPU (resize="workers"): the precision alone is compared.
    """
    out = tmp_path / "cuda.h5"
    extract(sample_dir, out=out, layers=["block1", "block4", "block5"], device="cuda", resize="workers",
            progress=False)
    gpu, cpu = CodeStore(out), precision_pair["float32"]
    assert gpu.spec["precision"] in ("bfloat16", "float16") and list(gpu.ids) == list(cpu.ids)
    for layer in ("block4", "block5"):
        assert _cosines(gpu.codes(layer), cpu.codes(layer)).min() >= 0.999, layer


@pytest.mark.parametrize("forward_seconds, workers", [(10.0, 0), (1e-6, 1)], ids=["model-bound", "decode-bound"])
def test_auto_workers_decode_in_process_when_decoding_is_cheap(sample_dir, monkeypatch, forward_seconds, workers):
    """Check the measured choice of num_workers="auto": the first batches are decoded in the
    calling process (a thread per core, one thread, a thread per core); the rest too when
    decoding costs under a quarter of the forward pass, in worker processes otherwise; every
    image comes once, in order, whichever was chosen."""
    import cnncodes._extract.forward as fw
    from cnncodes._input.sources import read_source

    monkeypatch.setattr(fw.os, "cpu_count", lambda: 2)
    loaders = []
    real = fw.loader

    def spy(items, prep, max_pixels, batch_size, workers, pin, start=0, storage_options=None, threads=None):
        loaders.append((len(items), workers, start, threads))
        return real(items, prep, max_pixels, batch_size, workers, pin, start, storage_options, threads)

    monkeypatch.setattr(fw, "loader", spy)
    items = read_source(sample_dir).items
    prep = Preprocess(64, 56, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    timed = [0.0]
    seen = []
    for idx, batch, shas, bad in fw.batches(items, prep, 10**8, 4, "auto", False, timed):
        assert batch.shape == (len(idx), 3, 56, 56) and not bad
        seen += idx
        timed.append(forward_seconds)
    assert seen == list(range(len(items)))
    assert loaders[:3] == [(4, 0, 0, None), (8, 0, 4, 1), (12, 0, 8, None)]
    assert loaders[3][:3] == (len(items), workers, 12)
    loaders.clear()
    # An explicit number of workers is used as it is, without probing.
    assert len(list(fw.batches(items, prep, 10**8, 4, 0, False, [0.0]))) == 10
    assert loaders == [(len(items), 0, 0, None)]


@pytest.mark.parametrize("slow, chosen", [(1, None), (None, 1)], ids=["threads-pay", "one-thread-pays"])
def test_auto_workers_keep_the_faster_thread_count(sample_dir, monkeypatch, slow, chosen):
    """Check that decoding in process goes on with the thread count that decoded its probe
    batch faster (one thread, or one per core), and that the batches are the same."""
    import time

    import cnncodes._extract.forward as fw
    from cnncodes._input.sources import read_source

    real_in_turn, used = fw._in_turn, []

    def timed_in_turn(dataset, batch_size, pin, threads=None):
        used.append(threads)
        for batch in real_in_turn(dataset, batch_size, pin, threads):
            if threads == slow:
                time.sleep(0.2)  # this thread count decodes slowly here
            yield batch

    monkeypatch.setattr(fw, "_in_turn", timed_in_turn)
    items = read_source(sample_dir).items
    prep = Preprocess(64, 56, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    timed = [0.0]
    got = []
    for idx, batch, shas, bad in fw.batches(items, prep, 10**8, 4, "auto", False, timed):
        got.append((idx, batch))
        timed.append(10.0)  # model-bound: the rest is decoded in this process
    assert used == [None, 1, None, chosen]
    reference = list(fw.loader(items, prep, 10**8, 4, 0, False))
    assert [i for i, _ in got] == [r[0] for r in reference]
    assert all(torch.equal(b, r[1]) for (_, b), r in zip(got, reference))


@pytest.mark.parametrize("compiles", [True, False], ids=["long-run", "short-run"])
def test_auto_compile_decides_from_the_first_batches(photos, tmp_path, fast, monkeypatch, compiles):
    """Check that compile='auto' times two eager batches, then compiles only when the rest is long."""
    import cnncodes._extract.extract as ex
    import cnncodes._extract.forward as fw

    calls, seen = [], []
    # 12 photos, batch 4: two timed eager batches, then one more. A tiny / huge threshold
    # makes the 4 photos left a long / short run; compiling is recorded, not done (~30 s).
    monkeypatch.setattr(ex, "COMPILE_MIN_SECONDS", 1e-9 if compiles else 1e9)
    monkeypatch.setattr(fw.CodesForward, "enable_compile", lambda self: calls.append(len(seen)))
    original = fw.CodesForward.__call__
    monkeypatch.setattr(fw.CodesForward, "__call__", lambda self, b: seen.append(len(b)) or original(self, b))
    result = extract(photos, out=tmp_path / "auto.h5", compile="auto", **fast)
    assert result.n_extracted == 12 and seen == [4, 4, 4]
    assert calls == ([2] if compiles else [])  # decided once, after the two timed batches
    calls.clear()
    extract(photos, out=tmp_path / "off.h5", compile=False, **fast)
    assert calls == []


def test_a_failing_compile_stops_only_when_it_was_asked_for(photos, tmp_path, fast, monkeypatch):
    """Check that compile='auto' falls back to eager with a warning; compile=True says what to do."""
    import torch

    def broken(model, **kwargs):
        def run(x):
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    import cnncodes._extract.extract as ex

    monkeypatch.setattr(ex, "COMPILE_MIN_SECONDS", 0.0)  # auto decides to compile after two batches
    with pytest.warns(UserWarning, match=r"torch.compile failed on this machine \(RuntimeError: no C\+\+ "
                                         r"compiler found\); extracting without it"):
        result = extract(photos, out=tmp_path / "auto.h5", compile="auto", **fast)
    assert result.n_extracted == 12 and len(CodeStore(tmp_path / "auto.h5")) == 12
    with pytest.raises(CnnCodesError, match=r"torch.compile failed on this machine.*compile=False"):
        extract(photos, out=tmp_path / "asked.h5", compile=True, **fast)


def _faults_of_large_allocations(n=10, mb=64):
    """Minor page faults of allocating, touching and freeing a 64 MB tensor n times."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.ones(mb << 18)  # 64 MB of float32, written (touched) once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _resident_bytes():
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(__import__("cnncodes._extract.accel", fromlist=["_glibc"])._glibc() is None, reason="glibc only")
def test_reuse_freed_memory_stops_refaulting_large_blocks(monkeypatch):
    """Check that inside reuse_freed_memory freed 64 MB blocks are soon reused without page
    faults (glibc's default unmaps them, and each allocation faults its 16,384 pages in
    again), also when nested; that the kept memory outlives the block by
    RELEASE_AFTER_SECONDS, a new block in that time keeping it longer; and that it then goes
    back to the system, glibc's default restored."""
    import time

    from cnncodes._extract import accel as _accel
    from cnncodes._extract.accel import release_freed_memory, reuse_freed_memory

    monkeypatch.setattr(_accel, "RELEASE_AFTER_SECONDS", 0.5)
    with reuse_freed_memory():
        # the heap grows over the first few allocations, then serves them from freed memory
        warm_up = [_faults_of_large_allocations(1) for _ in range(20)]
        assert min(warm_up) < 1_000, warm_up
        inside = _faults_of_large_allocations()
        with reuse_freed_memory():
            nested = _faults_of_large_allocations()
        after_nested = _faults_of_large_allocations()
        kept = _resident_bytes()
    assert max(inside, nested, after_nested) < 1_000  # not 163,840: 10 x 16,384 pages
    # Just after the block the memory is still kept (the first allocations may fault once,
    # where small ones made as the block ended took part of a freed block).
    [_faults_of_large_allocations(1) for _ in range(3)]
    assert _faults_of_large_allocations() < 1_000
    time.sleep(0.3)
    with reuse_freed_memory():  # a new block before the release: kept past the first deadline
        time.sleep(0.4)
    time.sleep(0.2)  # 0.9 s after the first block, 0.2 s after the second
    [_faults_of_large_allocations(1) for _ in range(3)]
    assert _faults_of_large_allocations() < 1_000
    time.sleep(0.6)
    assert kept - _resident_bytes() > 48 << 20  # malloc_trim returned the freed blocks
    assert _faults_of_large_allocations(1) > 10_000  # glibc's default again: mmap and unmap
    release_freed_memory()  # nothing kept: a no-op


@pytest.mark.skipif(__import__("cnncodes._extract.accel", fromlist=["_glibc"])._glibc() is None, reason="glibc only")
def test_release_freed_memory_at_once(monkeypatch):
    """Check that RELEASE_AFTER_SECONDS = 0 gives the memory back as the block ends, and that
    release_freed_memory() gives it back at once, except while a block runs."""
    from cnncodes._extract import accel as _accel
    from cnncodes._extract.accel import release_freed_memory, reuse_freed_memory

    monkeypatch.setattr(_accel, "RELEASE_AFTER_SECONDS", 0)
    with reuse_freed_memory():
        _faults_of_large_allocations()
        kept = _resident_bytes()
    assert kept - _resident_bytes() > 48 << 20
    monkeypatch.setattr(_accel, "RELEASE_AFTER_SECONDS", 60)
    with reuse_freed_memory():
        _faults_of_large_allocations()
        release_freed_memory()  # a block runs: nothing happens
        assert _faults_of_large_allocations() < 1_000
        kept = _resident_bytes()
    release_freed_memory()
    assert kept - _resident_bytes() > 48 << 20
