"""Where to resize: in the decoding processes (PIL) or on the model's device (torch).

On a GPU the forward pass is fast and the CPU's decoding sets the pace; `extract(resize=
"device")` (the default on CUDA) sends each decoded uint8 image to the device and resizes it
there. This script measures, on the same images, side by side in one run:

- decoding with the resize in the decoding processes (``resize="workers"``, the CPU default);
- decoding with the resize left to the device (what the CPU still does with ``"device"``);
- the resize and crop of those batches on the model's device (the CPU here, a GPU if present);
- that the two paths give the same pixels (CPU: equal; GPU: within one grey level).

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
    from cnncodes._backbones import get_backbone, weights_enum
    from cnncodes._images import Preprocess

    spec = get_backbone("mobilenet_v2")
    return Preprocess.from_weights(weights_enum(spec)["IMAGENET1K_V1"], jpeg_draft=True, resize=resize)


def decode_all(items, prep, batch_size: int, workers: int):
    """extract's reading, hashing and decoding (DataLoader workers); seconds and the batches."""
    from cnncodes._extract import _collate, _Images

    loader = torch.utils.data.DataLoader(_Images(items, prep, 10**9), batch_size=batch_size,
                                         num_workers=workers, collate_fn=_collate)
    t0 = time.perf_counter()
    batches = [batch for _, batch, _, _ in loader]
    return time.perf_counter() - t0, batches


def main(argv=None):
    from cnncodes._accel import resolve_device
    from cnncodes._extract import _default_workers
    from cnncodes._images import resize_batch
    from cnncodes._sources import read_source

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", help="a folder of images, e.g. ../shared/datasets/flowers5")
    p.add_argument("--n", type=int, default=None, help="the first N images (default: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: extract's)")
    p.add_argument("--device", default="auto", help="where the device resize runs (default: CUDA if present)")
    args = p.parse_args(argv)

    items = read_source(args.data).items[: args.n]
    n = len(items)
    workers = _default_workers(n, args.batch_size) if args.workers is None else args.workers
    dev = resolve_device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"# {cpu_name()}, {os.cpu_count()} cores; device {dev} ({name}); torch {torch.__version__}; "
          f"{n} images, batch {args.batch_size}, {workers} decoding processes")

    pil = _prep("workers")
    device = _prep("device")
    rows = []
    t_pil, pil_batches = decode_all(items, pil, args.batch_size, workers)
    rows.append(("decode + resize in the decoding processes (resize='workers')", t_pil))
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

    diff = max(int((a.to(torch.int16) - b.cpu().to(torch.int16)).abs().max())
               for a, b in zip(pil_batches, resized))
    print(f"\n| step | seconds | images/s | vs decode + resize in the workers |")
    print("|---|---|---|---|")
    for label, sec in rows:
        print(f"| {label} | {sec:.2f} | {n / sec:.0f} | {t_pil / sec:.2f}x |")
    print(f"\nlargest pixel difference between the two paths: {diff} grey level(s) "
          f"({'equal' if diff == 0 else 'torch resizes in float on this device'})")


if __name__ == "__main__":
    main()
