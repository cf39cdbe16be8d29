"""GPU rows: MobileNetV2 and ResNet50, model-only and from a JPEG folder, float32 / bfloat16 / float16.

Run by `benchmarks/gpu_check.sh` on a machine with CUDA, which keeps the markdown it prints:

    python benchmarks/bench_gpu.py ../shared/datasets/flowers5 --n 2000
    python benchmarks/bench_gpu.py --n 2000     # the bundled sample, repeated

For each backbone, in one run: cnncodes' forward pass on already-decoded batches (model-only,
bench_extract's `model_only`) in each precision the GPU runs, then `extract` end to end from
the JPEG folder in each precision and with ``precision="auto"`` (what it measured and chose).
ResNet50 runs with random weights (the speed does not depend on them); MobileNetV2 with its
ImageNet weights when they are at hand (CNNCODES_WEIGHTS_PATH), else random ones too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs
from bench_extract import decode_only, model_only, subset

BACKBONES = (("mobilenet_v2", "imagenet"), ("resnet50", None))


def repeated_sample(dst: Path, n: int) -> None:
    """`n` JPEGs from the bundled 40 photos, each copy made distinct by a trailing byte.

    Decoders stop at the JPEG end marker, so the pixels are the photo's; the bytes (and so
    the sha256 extract keys content by) differ, and no copy is skipped as identical content.
    """
    import cnncodes

    photos = sorted(Path(str(cnncodes.sample_dir())).rglob("*.jpg"))
    for k in range(n):
        src = photos[k % len(photos)]
        target = dst / src.parent.name / f"{src.stem}-{k}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes() + k.to_bytes(4, "little"))


def _weights(backbone: str, weights):
    """The weights to use, and how the table names them (random when the real ones are missing)."""
    from cnncodes._backbones.registry import get_backbone
    from cnncodes._errors import CnnCodesError
    from cnncodes._backbones.weights import resolve

    if weights is None:
        return None, "random"
    try:
        resolve(get_backbone(backbone), weights)
        return weights, weights
    except CnnCodesError:
        return None, "random (no offline checkpoint here)"


def backbone_rows(data: Path, backbone: str, weights, precisions: list[str], batch_size: int, work: Path):
    """(run, precision, images/s, note) rows of one backbone: model-only, then end to end."""
    from cnncodes import extract
    from cnncodes._backbones.registry import get_backbone

    layer = get_backbone(backbone).default_layer
    t_dec, batches = decode_only(data, backbone, weights, batch_size)
    n = sum(len(b) for b in batches)
    rows = [("decode only (CPU workers)", "", n / t_dec, "")]
    model = {}
    for prec in precisions:
        secs, warm = model_only(batches, backbone, weights, layer, prec, False, batch_size)
        model[prec] = n / secs
        rows.append(("model only (decoded batches)", prec, model[prec], f"warm-up {warm:.2f} s"))
    del batches
    for prec in ["auto", *precisions]:
        out = work / f"{backbone}-{prec}.h5"
        t0 = time.perf_counter()
        result = extract(data, out=out, backbone=backbone, layers=[layer], weights=weights,
                         batch_size=batch_size, precision=prec, compile=False, progress=False)
        rate = n / (time.perf_counter() - t0)
        if prec == "auto":  # "precision bfloat16 (auto, measured on ...)"
            rows.append(("extract from the JPEG folder, end to end", f"auto: {result.precision_choice.split()[1]}",
                         rate, result.precision_choice))
        else:
            rows.append(("extract from the JPEG folder, end to end", prec, rate,
                         f"{rate / model[prec] * 100:.0f} % of model-only"))
        shutil.rmtree(out.with_name(out.name + ".d"), ignore_errors=True)
        out.unlink(missing_ok=True)
    return layer, rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", type=Path, help="a folder of class subfolders (default: the bundled "
                   "sample, repeated to --n images)")
    p.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device here (torch.cuda.is_available() is False).")
    work = Path(tempfile.mkdtemp(prefix="cnncodes-gpu-"))
    if args.data is not None and args.data.is_dir():
        subset(args.data, work / "data", args.n)
        source = f"{args.n} photos of {args.data}"
    else:
        repeated_sample(work / "data", args.n)
        source = f"the bundled 40-photo sample repeated to {args.n} files"
    precisions = ["float32", *(["bfloat16"] if torch.cuda.is_bf16_supported() else []), "float16"]
    print(f"## GPU check, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
          f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), CPU {cpu_name()} ({os.cpu_count()} "
          f"cores), torch {torch.__version__}; {source}, batch {args.batch_size}.\n"
          f"`python benchmarks/bench_gpu.py {args.data or ''} --n {args.n} --batch-size {args.batch_size}`\n",
          flush=True)
    for backbone, wanted in BACKBONES:
        weights, named = _weights(backbone, wanted)
        layer, rows = backbone_rows(work / "data", backbone, weights, precisions, args.batch_size, work)
        print(f"### {backbone} {layer}, weights {named}\n\n| run | precision | images/s | note |\n|---|---|---|---|")
        print("\n".join(f"| {run} | {prec} | {rate:.1f} | {note} |" for run, prec, rate, note in rows) + "\n",
              flush=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
