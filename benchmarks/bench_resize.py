"""Where to resize: on the model's device (torch, a batch at a time) or in the decoding processes (PIL).

`extract(resize="device")` (the default) has the decoding threads or processes only decode,
and resizes each batch with torch where the model runs: on a GPU the CPU is spared the work,
on a CPU torch's channels-last uint8 kernel does it several times faster than PIL. This
script measures, on the same images, side by side in one run:

- decoding with the resize in the decoding processes (``resize="workers"``);
- decoding with the resize left to the device (what the CPU still does with ``"device"``);
- the resize and crop of those batches on the model's device (the CPU here, a GPU if present);
- the resize alone on one core: PIL one image at a time against torch one batch at a time;
- how far apart the two paths' pixels are (enlarged photos: equal on a CPU; reduced ones
  differ in a few pixels by one or two grey levels; a GPU rounds within one grey level).

    python benchmarks/bench_resize.py ../shared/datasets/flowers5
    python benchmarks/bench_resize.py ../shared/datasets/flowers5 --n 500 --workers 0
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs


def _prep(resize: str):
    from cnncodes._backbones.registry import get_backbone, weights_enum
    from cnncodes._input.images import Preprocess

    spec = get_backbone("mobilenet_v2")
    return Preprocess.from_weights(weights_enum(spec)["IMAGENET1K_V1"], jpeg_draft=True, resize=resize)


def decode_all(items, prep, batch_size: int, workers: int):
    """extract's reading, hashing and decoding (DataLoader workers); seconds and the batches."""
    from cnncodes._extract.forward import Images, collate

    loader = torch.utils.data.DataLoader(Images(items, prep, 10**9), batch_size=batch_size,
                                         num_workers=workers, collate_fn=collate)
    t0 = time.perf_counter()
    batches = [batch for _, batch, _, _ in loader]
    return time.perf_counter() - t0, batches


def main(argv=None):
    from cnncodes._extract.accel import resolve_device
    from cnncodes._extract.forward import default_workers
    from cnncodes._input.images import resize_batch
    from cnncodes._input.sources import read_source

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", help="a folder of images, e.g. ../shared/datasets/flowers5")
    p.add_argument("--n", type=int, default=None, help="the first N images (default: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: extract's)")
    p.add_argument("--device", default="auto", help="where the device resize runs (default: CUDA if present)")
    args = p.parse_args(argv)

    items = read_source(args.data).items[: args.n]
    n = len(items)
    workers = default_workers(n, args.batch_size) if args.workers is None else args.workers
    dev = resolve_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"# {cpu_name()}, {os.cpu_count()} cores; device {dev} ({name}); torch {torch.__version__}; "
          f"{n} images, batch {args.batch_size}, {workers} decoding processes")

    pil = _prep("workers")
    device = _prep("device")
    rows = []
    t_pil, pil_batches = decode_all(items, pil, args.batch_size, workers)
    rows.append(("decode + resize by PIL in the decoding processes (resize='workers')", t_pil))
    t_dev, dev_batches = decode_all(items, device, args.batch_size, workers)
    rows.append(("decode only, resize left to the device (resize='device')", t_dev))
    resize_batch(dev_batches[0], device, dev)  # warm-up: kernels, allocator
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    resized = [resize_batch(b, device, dev) for b in dev_batches]
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t_resize = time.perf_counter() - t0
    rows.append((f"resize + crop of those batches on the device ({dev.type})", t_resize))

    diffs = [(a.to(torch.int16) - b.cpu().to(torch.int16)).abs() for a, b in zip(pil_batches, resized)]
    print(f"\n| step | seconds | images/s | vs decode + resize in the workers |")
    print("|---|---|---|---|")
    for label, sec in rows:
        print(f"| {label} | {sec:.2f} | {n / sec:.0f} | {t_pil / sec:.2f}x |")
    t_one_pil, t_one_torch = resize_one_core(items, pil, device, dev_batches)
    print(f"\nThe resize alone, one core: PIL, one image at a time, {t_one_pil:.2f} s "
          f"({n / t_one_pil:.0f} img/s); torch, channels-last uint8 batches, {t_one_torch:.2f} s "
          f"({n / t_one_torch:.0f} img/s): {t_one_pil / t_one_torch:.1f}x faster.")
    print(f"Pixels of the two paths: at most {max(int(d.max()) for d in diffs)} grey level(s) apart, "
          f"{sum(int((d > 0).sum()) for d in diffs) / sum(d.numel() for d in diffs) * 100:.3f} % of them differ.")


def resize_one_core(items, pil, device, dev_batches):
    """Seconds to resize and crop the images on one core: PIL per image, torch per batch."""
    import io

    from PIL import Image

    from cnncodes._input.images import preprocess, resize_batch, to_rgb

    images = []
    for item in items:  # decoded beforehand: only the resize is timed
        with open(item.path, "rb") as fh:
            img = Image.open(io.BytesIO(fh.read()))
            img.load()
        images.append(to_rgb(img))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        for img in images:
            preprocess(img, pil)
        t_pil = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in dev_batches:
            resize_batch(b, device, torch.device("cpu"))
        return t_pil, time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
