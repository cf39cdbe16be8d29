"""Extraction benchmark: `cnncodes extract` vs the plain tutorial loop, and the cost of re-runs.

Prints images/s for each, measured in the same run on the same images, and the ratios.

    python benchmarks/bench_extract.py ../shared/datasets/flowers5 --n 1000
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs


def plain_loop(folder: Path, backbone: str, node: str, batch_size: int) -> tuple[float, int]:
    """What the tutorials write: ImageFolder + DataLoader + eager float32 model + forward hook."""
    from torchvision import datasets
    from torchvision.models import get_model_weights

    from cnncodes._backbones import get_backbone
    from cnncodes._weights import load_model, resolve

    spec = get_backbone(backbone)
    model = load_model(spec, resolve(spec, "imagenet"))  # same weights; torchvision would download
    transform = get_model_weights(backbone)["IMAGENET1K_V1"].transforms()
    data = datasets.ImageFolder(str(folder), transform=transform)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    feats = []
    module = model.get_submodule(node)
    hook = module.register_forward_hook(lambda m, i, o: feats.append(o.mean(dim=(2, 3))))
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    hook.remove()
    return time.perf_counter() - t0, len(data)



def subset(src: Path, dst: Path, n: int, seed: int = 0) -> list[Path]:
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    random.Random(seed).shuffle(files)
    chosen = sorted(files[:n])
    for f in chosen:
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    return files[n:]


def main():
    from cnncodes import extract

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="a folder of class subfolders, e.g. ../shared/datasets/flowers5")
    p.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--layer", default="block5")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()

    from cnncodes._backbones import get_backbone

    node = get_backbone(args.backbone).layer(args.layer).node
    work = Path(tempfile.mkdtemp(prefix="cnncodes-bench-"))
    rest = subset(args.data, work / "data", args.n)
    n = sum(1 for _ in (work / "data").rglob("*.*"))
    print(f"# {cpu_name()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {args.backbone} {args.layer} ({node}), {n} images, batch {args.batch_size}")
    rows = []
    t_plain, _ = plain_loop(work / "data", args.backbone, node, args.batch_size)
    rows.append(("plain loop (ImageFolder, eager fp32, hook)", t_plain, n))
    out = work / "codes.h5"
    t0 = time.perf_counter()
    extract(work / "data", out=out, backbone=args.backbone, layers=[args.layer],
            batch_size=args.batch_size, progress=False)
    t_first = time.perf_counter() - t0
    rows.append(("cnncodes extract (first run)", t_first, n))
    t0 = time.perf_counter()
    r = extract(work / "data", out=out, backbone=args.backbone, layers=[args.layer], progress=False)
    t_rerun = time.perf_counter() - t0
    assert r.n_extracted == 0
    rows.append(("cnncodes extract (unchanged re-run)", t_rerun, n))
    extra = max(1, n // 100)
    for f in rest[:extra]:
        target = work / "data" / f.relative_to(args.data)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    t0 = time.perf_counter()
    r = extract(work / "data", out=out, backbone=args.backbone, layers=[args.layer], progress=False)
    t_add = time.perf_counter() - t0
    rows.append((f"cnncodes extract (+{r.n_extracted} new images)", t_add, r.n_extracted))
    print("| run | seconds | images/s | time vs first run | speed vs plain loop |")
    print("|---|---|---|---|---|")
    for name, secs, count in rows:
        rate = count / secs if secs else float("inf")
        print(f"| {name} | {secs:.2f} | {rate:.1f} | {secs / t_first:.3f} | "
              f"{(count / secs) / (n / t_plain):.2f}x |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
