"""Linear probe vs fine-tuning vs a small CNN from scratch, on one held-out split.

All three are scored on the same held-out images: `split_store`'s stratified split, grouped by
content sha256 (test_size 0.25, random_state 0), which `finetune` reproduces from the folder.
The fine-tuning uses the two-stage recipe: a logistic regression on the store's block5 codes
initialises the head, then the top blocks are trained. The from-scratch baseline is the small
CNN of the Keras "cats vs dogs" tutorial (three conv/pool blocks, a dense layer, dropout),
trained on the same training and validation images with the same augmentation.

    python benchmarks/bench_transfer.py ../shared/datasets/flowers5 --store codes.h5 --json out.json

Without --store the codes are extracted first (into --work), and that time is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name  # noqa: E402


def linear_probes(store_path, test_size, random_state):
    """Logistic regression and linear SVM on block5 codes: held-out accuracy and fit seconds."""
    from cnncodes import evaluate, fit, split_store

    train, test = split_store(store_path, test_size=test_size, random_state=random_state)
    rows = {}
    for classifier in ("logreg", "linear_svm"):
        t = time.perf_counter()
        model = fit(store_path, layer="block5", classifier=classifier, rows=train)
        seconds = time.perf_counter() - t
        rows[classifier] = {"accuracy": evaluate(model, store_path).accuracy, "fit_seconds": seconds,
                            "C": model.cnncodes_["fit"]["C"]}
    return rows, train, test


class SmallCNN(nn.Module):
    """The Keras tutorial's convnet: 3 x (conv 3x3, ReLU, max-pool), dense 64, dropout 0.5."""

    def __init__(self, n_classes: int, size: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = ((size - 2) // 2 - 2) // 2
        side = (side - 2) // 2
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, 64), nn.ReLU(),
                                        nn.Dropout(0.5), nn.Linear(64, n_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def from_scratch(data, *, size, epochs, patience, batch_size, lr, test_size, val_fraction, random_state,
                 workers, progress):
    """Train SmallCNN on finetune's exact split; return held-out accuracy, best epoch, seconds."""
    from cnncodes._finetune._data import (
        _augmentation,
        _loader,
        _Photos,
        _scan,
        _split,
        _train_decode,
        default_workers,
    )
    from cnncodes._input.images import Preprocess
    from cnncodes._input.sources import read_source

    t0 = time.perf_counter()
    torch.manual_seed(random_state)
    # ImageNet's mean/std are only a normalisation here; the photos are used at `size`.
    prep = Preprocess(size, size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    src = read_source(data)
    workers = default_workers(len(src.items), batch_size) if workers is None else workers
    shas, ok, _ = _scan(src.items, prep, 100_000_000, workers, progress)
    items = [it for it, good in zip(src.items, ok) if good]
    shas = np.array([s for s, good in zip(shas, ok) if good], dtype=object)
    classes = sorted({it.label for it in items})
    y = np.array([classes.index(it.label) for it in items])
    train, val, test = _split(y, shas, test_size, val_fraction, random_state, len(classes))
    paths = [it.path for it in items]

    def loader(rows, augment=False, seed=0):
        ds = _Photos([paths[r] for r in rows], y[rows], _train_decode(prep) if augment else prep,
                     _augmentation(prep) if augment else None, strict=True)
        return _loader(ds, batch_size, workers, shuffle=augment, seed=seed)

    def accuracy(model, rows):
        model.eval()
        right = n = 0
        with torch.inference_mode():
            for b in loader(rows):
                right += int((model(prep.normalize(b["x"])).argmax(1) == b["y"]).sum())
                n += len(b["y"])
        return right / n

    model = SmallCNN(len(classes), size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_state, bad, history = -1.0, None, 0, []
    for epoch in range(1, epochs + 1):
        t = time.perf_counter()
        model.train()
        for b in loader(train, augment=True, seed=random_state * 1000 + epoch):
            loss = nn.functional.cross_entropy(model(prep.normalize(b["x"])), b["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        val_acc = accuracy(model, val)
        history.append({"epoch": epoch, "val_accuracy": val_acc, "seconds": time.perf_counter() - t})
        if progress:
            print(f"  scratch epoch {epoch}: val acc {val_acc:.4f} ({history[-1]['seconds']:.0f} s)", flush=True)
        if val_acc > best:
            best, best_state, bad = val_acc, {k: v.clone() for k, v in model.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= patience:
                break
    model.load_state_dict(best_state)
    best_epoch = max(history, key=lambda h: h["val_accuracy"])["epoch"]
    return {"accuracy": accuracy(model, test), "best_epoch": best_epoch, "epochs_run": len(history),
            "seconds": time.perf_counter() - t0, "n_train": len(train), "n_val": len(val), "n_test": len(test),
            "test_ids": sorted(items[r].id for r in test), "history": history,
            "parameters": sum(p.numel() for p in model.parameters())}


def precision_rates(unfreeze, batch_size, rounds, image_size=224):
    """Training-step and inference rates of fp32, bf16 autocast, and bf16 + channels_last.

    The variants run interleaved (round-robin, 3 steps each per round), so that load from
    other processes falls on all of them alike; the median step time of each is reported.
    """
    from cnncodes._extract.accel import autocast
    from cnncodes._backbones.registry import get_backbone
    from cnncodes._finetune._network import build_net, param_groups
    from cnncodes._backbones.weights import resolve

    spec = get_backbone("mobilenet_v2")
    w = resolve(spec, "imagenet")
    dev = torch.device("cpu")
    variants = {"float32": ("float32", False), "bfloat16": ("bfloat16", False),
                "bfloat16 + channels_last": ("bfloat16", True)}
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.randint(0, 5, (batch_size,))
    nets = {}
    for name, (_, cl) in variants.items():
        net, _ = build_net(spec, w, 5, dropout=0.2, unfreeze=unfreeze)
        if cl:
            net.to(memory_format=torch.channels_last)
        nets[name] = (net, torch.optim.AdamW(param_groups(net, 1e-4, 1e-3, 1e-4)))
    train = {k: [] for k in variants}
    infer = {k: [] for k in variants}
    for r in range(rounds + 1):
        for name, (prec, cl) in variants.items():
            net, opt = nets[name]
            xi = x.contiguous(memory_format=torch.channels_last) if cl else x
            net.train()
            for _ in range(3):
                t = time.perf_counter()
                with autocast(dev, prec):
                    out = net(xi)
                loss = nn.functional.cross_entropy(out.float(), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if r:  # round 0 warms up
                    train[name].append(time.perf_counter() - t)
            net.eval()
            with torch.inference_mode():
                for _ in range(2):
                    t = time.perf_counter()
                    with autocast(dev, prec):
                        net(xi)
                    if r:
                        infer[name].append(time.perf_counter() - t)
    rows = {}
    for name in variants:
        tr, inf = float(np.median(train[name])), float(np.median(infer[name]))
        rows[name] = {"train_images_per_second": batch_size / tr, "inference_images_per_second": batch_size / inf}
    base = rows["float32"]
    for row in rows.values():
        row["train_speedup"] = row["train_images_per_second"] / base["train_images_per_second"]
        row["inference_speedup"] = row["inference_images_per_second"] / base["inference_images_per_second"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a folder with one subfolder per class")
    p.add_argument("--store", help="an existing store of DATA with block5 codes (else extracted into --work)")
    p.add_argument("--work", default="bench-transfer", help="folder for the store and the checkpoint")
    p.add_argument("--unfreeze", default="block3")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--train-bn", action="store_true")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--tta", default="flip")
    p.add_argument("--precision", default="auto")
    p.add_argument("--image-size", type=int, help="fine-tune at this input size (the store must match it)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training images held out for validation (0: train on all, no early stopping)")
    p.add_argument("--scratch-epochs", type=int, default=30)
    p.add_argument("--scratch-size", type=int, default=128, help="input side of the from-scratch CNN")
    p.add_argument("--skip", action="append", default=[], choices=["probe", "finetune", "scratch", "precision"])
    p.add_argument("--precision-rounds", type=int, default=5, help="rounds of the interleaved precision timing")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.add_argument("--probe-store", action="append", default=[],
                   help="another store of DATA (e.g. extracted with --tta flip) to probe as well; repeatable")
    p.add_argument("--random-state", type=int, default=0,
                   help="seed of the held-out split (0 is the issue's split; others give fresh held-out sets)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    from cnncodes import CodeStore, extract, finetune, split_store

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.val_fraction <= 0 and "scratch" not in args.skip:
        p.error("the from-scratch CNN stops early on its validation split: give --val-fraction > 0 "
                "or --skip scratch")
    test_size, random_state, val_fraction = 0.25, args.random_state, args.val_fraction
    report = {"machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads", "data": str(args.data),
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "random_state": random_state}
    store = args.store
    if store is None:
        store = work / "codes.h5"
        r = extract(args.data, out=store, layers=["block5"], progress=not args.quiet)
        report["extract_seconds"] = r.seconds
    print(f"store {store}: {len(CodeStore(store))} rows", flush=True)

    if "precision" not in args.skip:
        rates = precision_rates(args.unfreeze, args.batch_size, args.precision_rounds)
        report["precision_rates"] = rates
        print(f"training / inference rates, MobileNetV2 from {args.unfreeze}, batch {args.batch_size}, 224 px "
              f"(interleaved, medians):")
        for name, row in rates.items():
            print(f"  {name:<26} train {row['train_images_per_second']:6.1f} img/s ({row['train_speedup']:.2f}x)"
                  f"   inference {row['inference_images_per_second']:6.1f} img/s ({row['inference_speedup']:.2f}x)",
                  flush=True)

    if "probe" not in args.skip:
        probes, _, _ = linear_probes(store, test_size, random_state)
        for extra in args.probe_store:
            more, _, _ = linear_probes(extra, test_size, random_state)
            probes.update({f"{name} on {Path(extra).name}": row for name, row in more.items()})
        report["linear_probe"] = probes
        for name, row in probes.items():
            print(f"linear probe {name} block5: held-out accuracy {row['accuracy']:.4f} "
                  f"(C={row['C']:g}, fit {row['fit_seconds']:.1f} s)", flush=True)

    if "finetune" not in args.skip:
        out = work / "ft.pt"
        r = finetune(args.data, out=out, unfreeze=args.unfreeze, epochs=args.epochs, lr=args.lr,
                     head_lr=args.head_lr, batch_size=args.batch_size,
                     early_stopping=args.patience if val_fraction > 0 else None,
                     test_size=test_size, val_fraction=val_fraction, random_state=random_state,
                     init_head=store, precision=args.precision, label_smoothing=args.label_smoothing,
                     tta=args.tta, train_bn=args.train_bn, dropout=args.dropout, weight_decay=args.weight_decay,
                     optimizer=args.optimizer, image_size=args.image_size,
                     progress=not args.quiet)
        print(r.summary(), flush=True)
        st = CodeStore(store)
        _, test = split_store(st, test_size=test_size, random_state=random_state)
        same = sorted(r.test_ids) == sorted(st.ids[test])
        print(f"held-out ids identical to split_store's: {same} ({len(r.test_ids)} images)", flush=True)
        report["finetune"] = {
            "accuracy": r.test_accuracy, "seconds": r.seconds, "best_epoch": r.best_epoch,
            "epochs_run": len(r.history), "stopped": r.stopped, "initial_val_accuracy": r.initial_val_accuracy,
            "init_head": r.init_head, "trainable": r.trainable, "precision": r.precision,
            "unfreeze": args.unfreeze, "lr": args.lr, "head_lr": args.head_lr, "batch_size": args.batch_size,
            "label_smoothing": args.label_smoothing, "tta": args.tta, "epochs": args.epochs,
            "train_bn": args.train_bn, "dropout": args.dropout, "weight_decay": args.weight_decay,
            "optimizer": args.optimizer, "image_size": args.image_size,
            "history": [vars(e) for e in r.history], "resumed_from": r.resumed_from,
            "held_out_ids_match_split_store": same, "n_train": r.n_train, "n_val": r.n_val, "n_test": r.n_test,
        }

    if "scratch" not in args.skip:
        s = from_scratch(args.data, size=args.scratch_size, epochs=args.scratch_epochs, patience=5,
                         batch_size=32, lr=1e-3, test_size=test_size, val_fraction=val_fraction,
                         random_state=random_state, workers=None, progress=not args.quiet)
        st = CodeStore(store)
        _, test = split_store(st, test_size=test_size, random_state=random_state)
        s["held_out_ids_match_split_store"] = s.pop("test_ids") == sorted(st.ids[test])
        report["scratch"] = s
        print(f"from scratch (small CNN, {s['parameters']:,} parameters, {args.scratch_size} px): held-out "
              f"accuracy {s['accuracy']:.4f}, best epoch {s['best_epoch']} of {s['epochs_run']}, "
              f"{s['seconds']:.0f} s", flush=True)

    rows = []
    if "linear_probe" in report:
        best = max(report["linear_probe"].items(), key=lambda kv: kv[1]["accuracy"])
        cached = "extract_seconds" not in report
        rows.append((f"linear probe ({best[0]}, block5 codes{', fit only: codes cached' if cached else ''})",
                     best[1]["accuracy"], report.get("extract_seconds", 0.0) + best[1]["fit_seconds"]))
    if "finetune" in report:
        rows.append((f"fine-tuned MobileNetV2 (from {args.unfreeze}, head from logreg)",
                     report["finetune"]["accuracy"], report["finetune"]["seconds"]))
    if "scratch" in report:
        rows.append(("small CNN from scratch", report["scratch"]["accuracy"], report["scratch"]["seconds"]))
    print(f"\nheld-out 25 % of {args.data} (split random_state {random_state}; {report['machine']}):")
    for name, acc, sec in rows:
        print(f"  {name:<58} accuracy {acc:.4f}   {sec / 60:6.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
