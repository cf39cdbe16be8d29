"""Whole processes, start-up included: `cnncodes extract` against the plain tutorial loop.

Each run is a fresh Python process timed from outside (imports, model build, weight load,
reading every photo, the forward passes, writing the codes), as a user runs it:

- the plain loop every tutorial writes, as a script: torchvision's model with the checkpoint
  loaded into it, ImageFolder + DataLoader with the weights' transforms, eager float32, a
  forward hook on the layer, the codes saved with numpy;
- ``python -m cnncodes extract DATA -o NEW.h5 --quiet`` with its defaults (a new store).

Rounds alternate the two (the machines are shared: compare ratios within a round).
With ``--weights random`` (backbones without offline ImageNet weights, for speed only) the
backbone's seeded random weights are saved once as a checkpoint, and both load that file
(cnncodes as ``--weights FILE``): the same start-up work as with real weights.

    python benchmarks/bench_whole_process.py /work/shared/datasets/flowers5 --rounds 2
    python benchmarks/bench_whole_process.py /work/shared/datasets/flowers5 --backbone resnet50 --weights random
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name  # noqa: E402

PLAIN = """
import sys, numpy as np, torch
from torchvision import datasets
from torchvision.models import get_model, get_model_weights
folder, backbone, node, checkpoint, out = sys.argv[1:6]
weights = get_model_weights(backbone)["IMAGENET1K_V1"]
model = get_model(backbone, weights=None)
model.load_state_dict(torch.load(checkpoint, map_location="cpu"))
model.eval()
data = datasets.ImageFolder(folder, transform=weights.transforms())
loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=False, num_workers=0)
feats = []
model.get_submodule(node).register_forward_hook(lambda m, i, o: feats.append(o.mean(dim=(2, 3)).numpy()))
with torch.no_grad():
    for x, _ in loader:
        model(x)
np.save(out, np.concatenate(feats))
"""


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode not in (0, 1):  # 1: cnncodes finished with some failed images
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{run.stderr[-2000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="a folder of class subfolders")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--weights", default="imagenet", help="'imagenet' (offline weights) or 'random'")
    args = ap.parse_args()
    import torch

    from cnncodes._backbones.registry import get_backbone
    from cnncodes._backbones.weights import load_model, resolve

    spec = get_backbone(args.backbone)
    node = spec.layer(spec.default_layer).node
    work_dir = tempfile.TemporaryDirectory()
    if args.weights == "random":
        checkpoint = os.path.join(work_dir.name, f"{args.backbone}-random.pth")
        torch.save(load_model(spec, resolve(spec, None)).state_dict(), checkpoint)
        weights_flag = ["--weights", checkpoint]
    else:
        checkpoint = resolve(spec, args.weights).path
        weights_flag = []
    n = sum(1 for p in args.data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    print(f"# {cpu_name()}, {os.cpu_count()} cores; {n} photos in {args.data}; {args.backbone} "
          f"{spec.default_layer} ({node}), {args.weights} weights {Path(checkpoint).name}; "
          f"load average {os.getloadavg()[0]:.1f}")
    plain, ours = [], []
    with work_dir as work:
        for r in range(args.rounds):
            plain.append(timed([sys.executable, "-c", PLAIN, str(args.data), args.backbone, node,
                                checkpoint, os.path.join(work, f"plain-{r}.npy")]))
            ours.append(timed([sys.executable, "-m", "cnncodes", "extract", str(args.data), "--backbone",
                               args.backbone, *weights_flag, "-o", os.path.join(work, f"codes-{r}.h5"),
                               "--quiet"]))
            print(f"# round {r + 1}: plain loop {plain[-1]:.1f} s, cnncodes extract {ours[-1]:.1f} s, "
                  f"{plain[-1] / ours[-1]:.2f}x; load average {os.getloadavg()[0]:.1f}", flush=True)
    p, o = statistics.median(plain), statistics.median(ours)
    print("| whole process | seconds (median) | images/s | vs plain loop |")
    print("|---|---|---|---|")
    print(f"| plain loop (torchvision model + checkpoint, ImageFolder, eager fp32, hook) | {p:.1f} | {n / p:.1f} | 1.00x |")
    print(f"| `python -m cnncodes extract DATA -o codes.h5` (defaults, new store) | {o:.1f} | {n / o:.1f} | "
          f"**{p / o:.2f}x** |")


if __name__ == "__main__":
    main()
