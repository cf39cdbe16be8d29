"""Extraction benchmark: `cnncodes extract` vs the plain tutorial loop, model-only, decode-only.

For the same images, model and layer, in one run (these machines are noisy: compare the
ratios, not the absolute rates):

- the plain loop every tutorial writes (ImageFolder + DataLoader, eager float32, forward hook);
- decode-only: cnncodes' readers and decoders (DataLoader workers), no model;
- model-only: cnncodes' forward pass on already-decoded tensors, at the same settings (and
  once with glibc's default malloc, which faults the activations in anew at every batch);
- `cnncodes extract`, first run, end to end in a fresh process (model build and weight
  loading, precision probe, hashing, decoding, model, journal, merge), alternating with
  model-only in `--rounds` rounds (medians, and the median of the rounds' ratios: on a shared
  machine the rate drifts by 10 % within minutes); the whole call, and the images' rate
  (extract's img/s, from the first image read to the last batch journalled);
- an unchanged re-run, and a re-run after adding 1 % new images: soon after a run (its freed
  memory still kept, see `cnncodes._extract.accel.reuse_freed_memory`) and with that memory given
  back first, as a new process starts.

    python benchmarks/bench_extract.py ../shared/datasets/flowers5 --n 1000
    python benchmarks/bench_extract.py ../shared/datasets/flowers5 --n all --compile
    python benchmarks/bench_extract.py ../shared/datasets/flowers5 --backbone resnet50 --weights random
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs


def _model(backbone: str, weights):
    from cnncodes._backbones.registry import get_backbone
    from cnncodes._backbones.weights import resolve

    spec = get_backbone(backbone)
    return spec, resolve(spec, weights)


def plain_loop(folder: Path, backbone: str, weights, node: str, batch_size: int) -> float:
    """What the tutorials write: ImageFolder + DataLoader + eager float32 model + forward hook."""
    from torchvision import datasets
    from torchvision.models import get_model_weights

    from cnncodes._backbones.weights import load_model

    spec, w = _model(backbone, weights)
    model = load_model(spec, w)  # the same network; torchvision's builder would download
    transform = get_model_weights(backbone)["IMAGENET1K_V1"].transforms()
    data = datasets.ImageFolder(str(folder), transform=transform)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
    feats = []
    hook = model.get_submodule(node).register_forward_hook(lambda m, i, o: feats.append(o.mean(dim=(2, 3))))
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    hook.remove()
    return time.perf_counter() - t0


def _prep(backbone: str, weights):
    """extract's preprocessing for these weights (JPEG draft on, as for a new store)."""
    from cnncodes._backbones.registry import weights_enum
    from cnncodes._input.images import Preprocess

    spec, w = _model(backbone, weights)
    return Preprocess.from_weights(weights_enum(spec)[w.preprocessing_from], jpeg_draft=True)


def decode_only(folder: Path, backbone: str, weights, batch_size: int):
    """cnncodes' reading, hashing and decoding in DataLoader workers; returns seconds and the batches."""
    from cnncodes._extract.forward import Images, collate, default_workers

    from cnncodes._input.sources import read_source

    items, prep = read_source(folder).items, _prep(backbone, weights)
    loader = torch.utils.data.DataLoader(
        Images(items, prep, 10**9), batch_size=batch_size, num_workers=default_workers(len(items), batch_size),
        collate_fn=collate,
    )
    t0 = time.perf_counter()
    batches = [batch for _, batch, _, _ in loader]
    return time.perf_counter() - t0, batches


def model_only(batches, backbone: str, weights, layer: str, precision: str, compile_: bool, batch_size: int,
               reuse: bool = True):
    """cnncodes' forward pass on decoded uint8 batches; returns (seconds, warm-up seconds)."""
    from cnncodes._extract.accel import resolve_device, resolve_precision, reuse_freed_memory
    from cnncodes._extract.forward import CodesForward

    spec, w = _model(backbone, weights)
    prep = _prep(backbone, weights)
    dev = resolve_device("auto")
    forward = CodesForward(spec, w, [spec.layer(layer)], "avg", prep, dev, resolve_precision(precision, dev),
                           compile=compile_, batch_size=batch_size)
    with reuse_freed_memory() if reuse else contextlib.nullcontext():  # as extract runs it
        t0 = time.perf_counter()
        forward(batches[0])  # warm-up (and the compilation, when compiling)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for batch in batches:
            forward(batch)
        return time.perf_counter() - t0, warm


_TIMED_EXTRACT = """
import json, sys, time
from cnncodes import extract
data, out, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
t0 = time.perf_counter()
r = extract(data, out=out, **settings)
seconds = time.perf_counter() - t0
from cnncodes import CodeStore
print(json.dumps({"seconds": seconds, "rate": r.images_per_second, "choice": r.precision_choice,
                  "precision": CodeStore(out).spec["precision"]}))
"""


def fresh_extract(data: Path, out: Path, settings: dict, cache: Path | None = None) -> dict:
    """`extract(data, out=out, **settings)` in a fresh process, timed around the call.

    As a user's run: the model built and its weights loaded, precision="auto"'s probe, hashing,
    decoding, journal and merge, none of it warmed by an earlier run in the same process (nor
    slowed by this benchmark's own memory); the interpreter's start-up and imports are left out
    (bench_whole_process.py has them). torch.compile keeps compiled kernels on disk (and in
    memory), so a second compilation with the same `cache` takes seconds: an empty `cache`
    measures a user's first compiled run, a filled one their later runs.
    """
    env = dict(os.environ)
    if cache is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    done = subprocess.run([sys.executable, "-c", _TIMED_EXTRACT, str(data), str(out), json.dumps(settings)],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"extract failed in a fresh process:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compiled_extract(data: Path, out: Path, settings: dict, cache: Path, compile_=True) -> dict:
    """`extract(compile=compile_)` in a fresh process whose compile cache is `cache`."""
    return fresh_extract(data, out, {**settings, "compile": compile_}, cache)


def subset(src: Path, dst: Path, n: int | None, seed: int = 0) -> list[Path]:
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    random.Random(seed).shuffle(files)
    # 'all' keeps 1 % back, for the row that adds 1 % new images
    n = len(files) - max(1, len(files) // 100) if n is None else n
    chosen = sorted(files[:n])
    for f in chosen:
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    return files[n:]


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def _spread(xs, fmt="{:.2f}"):
    return f"rounds {', '.join(fmt.format(x) for x in xs)}" if len(xs) > 1 else ""


def main():
    from cnncodes._extract.accel import cpu_has_fast_bf16, release_freed_memory

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="a folder of class subfolders, e.g. ../shared/datasets/flowers5")
    p.add_argument("--n", default="1000", help="number of images, or 'all' (all but 1 %%, kept for the "
                   "+1 %% row; default 1000)")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", default="imagenet", help="'random' for backbones without offline weights "
                   "(the speed does not depend on the weights)")
    p.add_argument("--layer", help="layer alias (default: the backbone's pre-logits layer)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="auto")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of model-only, end to end and "
                   "the re-runs (medians reported; default 3)")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd path")
    p.add_argument("--no-reruns", action="store_true", help="skip the re-run rows")
    args = p.parse_args()

    from cnncodes._extract.accel import resolve_device, resolve_precision
    from cnncodes._backbones.registry import get_backbone

    weights = None if args.weights == "random" else args.weights
    spec = get_backbone(args.backbone)
    layer = args.layer or spec.default_layer
    node = spec.layer(layer).node
    dev = resolve_device("auto")
    # With "auto" a new store's precision is measured by extract: the model-only rows follow
    # what the first end-to-end run chose (the rule's answer until then).
    precision = resolve_precision(args.precision, dev)
    work = Path(tempfile.mkdtemp(prefix="cnncodes-bench-"))
    # Every compilation here starts cold (see compiled_extract), as a user's first one does.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-model-only")
    rest = subset(args.data, work / "data", None if args.n == "all" else int(args.n))
    n = sum(1 for _ in (work / "data").rglob("*.*"))
    print(f"# {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.backbone} {layer} "
          f"({node}), weights {args.weights}, {n} images, batch {args.batch_size}, precision {args.precision}, "
          f"{args.rounds} interleaved rounds (medians)")
    print(f"# command: python benchmarks/bench_extract.py {args.data} --n {args.n} --backbone {args.backbone} "
          f"--weights {args.weights} --precision {args.precision}" + (" --compile" if args.compile else ""))
    settings = dict(backbone=args.backbone, layers=[layer], weights=weights, batch_size=args.batch_size,
                    progress=False, precision=args.precision)
    rows = []
    t_plain = plain_loop(work / "data", args.backbone, weights, node, args.batch_size)
    rows.append(("plain loop (ImageFolder, eager fp32, hook)", t_plain, n, ""))
    t_dec, batches = decode_only(work / "data", args.backbone, weights, args.batch_size)
    rows.append(("decode only (cnncodes workers)", t_dec, n, ""))
    t_fp32, _ = model_only(batches, args.backbone, weights, layer, "float32", False, args.batch_size)
    rows.append(("model only, float32 channels-last (BatchNorm folded)", t_fp32, n, ""))

    # Model-only and the first run end to end alternate (extract in its own fresh process,
    # model-only here with the memory given back first): on a shared machine the rate drifts
    # by 10 % within minutes, and each round's ratio compares runs a few seconds apart.
    out = work / "codes.h5"
    models, firsts, flows = [], [], []
    for r in range(args.rounds):
        target = out if r == 0 else work / f"first-{r}.h5"
        run = fresh_extract(work / "data", target, {**settings, "compile": False})
        firsts.append(run["seconds"])
        flows.append(n / run["rate"])  # the images' part: the call less its start-up
        precision = run["precision"]
        if run["choice"]:
            print(f"# round {r + 1}: {run['choice']}")
        if target != out:
            target.unlink()
        release_freed_memory()
        models.append(model_only(batches, args.backbone, weights, layer, precision, False, args.batch_size)[0])
    t_model, t_first, t_flow = _median(models), _median(firsts), _median(flows)
    ratios = [m / f * 100 for m, f in zip(models, firsts)]
    flow_ratios = [m / f * 100 for m, f in zip(models, flows)]
    rows.append((f"model only, {precision} (extract's {'choice' if args.precision == 'auto' else 'setting'})",
                 t_model, n, _spread(models)))
    release_freed_memory()
    t_faults, _ = model_only(batches, args.backbone, weights, layer, precision, False, args.batch_size,
                             reuse=False)
    rows.append((f"model only, {precision}, glibc's default malloc (activations faulted in every batch)",
                 t_faults, n, f"{t_faults / t_model:.2f}x the time of extract's"))
    if args.compile:
        t_cmodel, warm = model_only(batches, args.backbone, weights, layer, precision, True, args.batch_size)
        rows.append((f"model only, {precision} + torch.compile", t_cmodel, n, f"cold compile {warm:.0f} s"))
    others = ["float32", "bfloat16"] if dev.type == "cuda" or cpu_has_fast_bf16() else ["float32"]
    t_others = {"float32": t_fp32}
    for other in [p for p in others if p not in (precision, "float32")]:
        release_freed_memory()
        t_others[other] = model_only(batches, args.backbone, weights, layer, other, False, args.batch_size)[0]
        rows.append((f"model only, {other}", t_others[other], n, ""))
    del batches
    rows.append(("cnncodes extract --no-compile (first run, the whole call in a fresh process)", t_first, n,
                 f"**{_median(ratios):.0f} %** of model-only's rate (median of the rounds' ratios; "
                 f"{_spread(ratios, '{:.0f} %')}); {_spread(firsts)}; start-up included"))
    rows.append(("  the same runs, images' rate (extract's img/s: read, hash, decode, model, journal)", t_flow, n,
                 f"**{_median(flow_ratios):.0f} %** of model-only's rate ({_spread(flow_ratios, '{:.0f} %')}); "
                 f"start-up {t_first - t_flow:.1f} s (imports, model build and weights, precision probe, "
                 f"listing, plan, merge)"))
    for other in [p for p in others if p != precision]:  # what auto did not choose, end to end
        t_other = fresh_extract(work / "data", work / f"{other}.h5",
                                {**settings, "precision": other, "compile": False})["seconds"]
        rows.append((f"cnncodes extract --precision {other} (end to end)", t_other, n,
                     f"{t_others[other] / t_other * 100:.0f} % of {other} model-only's rate"))
    if args.compile:
        # The defaults: compile="auto" times two eager batches, then compiles when the rest
        # would take five minutes or more. A user's first run: fresh process, empty cache.
        c = compiled_extract(work / "data", work / "auto.h5", settings, work / "inductor-auto", "auto")
        rows.append(("cnncodes extract, defaults (compile='auto'; first run, empty cache)", c["seconds"], n,
                     f"{c['rate']:.1f} img/s"))
        cache = work / "inductor-extract"
        for run, label in (("cold", "first compilation, empty cache"), ("warm", "compiled kernels cached")):
            c = compiled_extract(work / "data", work / f"compiled-{run}.h5", settings, cache)
            rows.append((f"cnncodes extract --compile, end to end ({label})", c["seconds"], n,
                         f"{c['rate']:.1f} img/s after compiling"))
    if not args.no_reruns:
        rows += reruns(work, out, args.data, rest, settings, t_first, args.rounds)
    print("| run | seconds | images/s | speed vs plain loop | note |")
    print("|---|---|---|---|---|")
    plain_rate = n / t_plain
    for name, secs, count, note in rows:
        rate = count / secs if secs else float("inf")
        print(f"| {name} | {secs:.2f} | {rate:.1f} | {rate / plain_rate:.2f}x | {note} |")
    shutil.rmtree(work)


def reruns(work: Path, out: Path, src: Path, rest: list[Path], settings: dict, t_first: float, rounds: int):
    """Rows for an unchanged re-run and a re-run with 1 % new images, each round on a copy of
    the first run's store: soon after a run (its freed memory still kept, as for a re-run or
    a grid search in one process), and after that memory went back to the system."""
    from cnncodes import extract
    from cnncodes._extract.accel import release_freed_memory

    n = sum(1 for _ in (work / "data").rglob("*.*"))
    added = []
    for f in rest[:max(1, n // 100)]:
        target = work / "data" / f.relative_to(src)
        added.append((f, target))
    times = {"unchanged": [], "soon": [], "cold": []}
    count = 0
    for r in range(rounds):
        for kind in ("cold", "soon"):  # "soon": seconds after the "cold" run's model pass
            store = work / f"rerun-{r}-{kind}.h5"
            shutil.copy(out, store)
            t0 = time.perf_counter()
            result = extract(work / "data", out=store, **settings)
            assert result.n_extracted == 0
            if kind == "cold":
                times["unchanged"].append(time.perf_counter() - t0)
            for f, target in added:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, target)
            if kind == "cold":
                release_freed_memory()
            t0 = time.perf_counter()
            result = extract(work / "data", out=store, **settings)
            times[kind].append(time.perf_counter() - t0)
            count = result.n_extracted
            for _, target in added:
                target.unlink()
            store.unlink()
    t_un, t_soon, t_cold = (_median(times[k]) for k in ("unchanged", "soon", "cold"))
    return [
        ("cnncodes extract (unchanged re-run)", t_un, n,
         f"**{t_un / t_first * 100:.1f} %** of first run; {_spread(times['unchanged'])}"),
        (f"cnncodes extract (+{count} new images, soon after a run)", t_soon, count,
         f"**{t_soon / t_first * 100:.1f} %** of first run; {_spread(times['soon'])}"),
        (f"cnncodes extract (+{count} new images, memory given back first)", t_cold, count,
         f"{t_cold / t_first * 100:.1f} % of first run; {_spread(times['cold'])}"),
    ]


if __name__ == "__main__":
    main()
