"""The `cnncodes` command line: parse, check, call one public function, map errors to exits."""

from __future__ import annotations

import argparse
import sys
import textwrap

EXIT_OK, EXIT_FAILURES, EXIT_ERROR = 0, 1, 2

EXAMPLES = {
    "extract": "cnncodes extract photos/ --backbone mobilenet_v2 --layer block4 --layer block5 -o codes.h5",
    "backbones": "cnncodes backbones",
    "layers": "cnncodes layers resnet50 --pooling avg",
    "info": "cnncodes info codes.h5",
    "demo": "cnncodes demo -o demo.h5",
    "fit": "cnncodes fit codes.h5 --layer block5 --classifier logreg --test-size 0.25 -o model.skops",
    "predict": "cnncodes predict model.skops new_photos/ --top-k 3 --csv predictions.csv",
    "evaluate": "cnncodes evaluate model.skops codes.h5 --plot confusion.png",
}


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="cnncodes",
        description="Transfer learning by CNN codes: extract codes from a frozen ImageNet "
        "backbone into an HDF5 store.",
        epilog="Examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"cnncodes {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, help_, description):
        return sub.add_parser(
            name, help=help_, description=description,
            epilog=f"Example:\n  {EXAMPLES[name]}", formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    e = command("extract", "extract CNN codes of images into an HDF5 store",
                "Extract CNN codes of a folder (one subfolder per class, or flat), a CSV of "
                "path[,label] or image paths into an HDF5 store. Re-running skips what the "
                "store holds; an interrupted run resumes.")
    e.add_argument("data", nargs="+", help="a folder, a .csv file, or image files")
    e.add_argument("-o", "--out", required=True, help="the .h5 store to create or extend")
    _extract_options(e)

    command("backbones", "list the registered backbones", "List the registered backbones.")

    lay = command("layers", "show a backbone's layer aliases",
                  "Show a backbone's layer aliases: node, channels, stride and code size.")
    lay.add_argument("backbone")
    lay.add_argument("--pooling", default="avg", help="pooling used for the code size (default avg)")
    lay.add_argument("--image-size", type=int, help="input size (default: the weights' crop size)")
    lay.add_argument("--nodes", action="store_true", help="list every raw FX node name instead")

    info = command("info", "describe a code store", "Describe a code store: rows, layers, classes, "
                   "failures, label conflicts and provenance.")
    info.add_argument("store")

    fit = command("fit", "fit a classifier on the codes of a store",
                  "Fit logistic regression, a linear SVM or faiss kNN on a store's codes and save "
                  "it with its extractor spec as a .skops file (loads without running code).")
    fit.add_argument("store", help="a .h5 store from `cnncodes extract`")
    fit.add_argument("-o", "--out", required=True, help="model file to write (.skops)")
    fit.add_argument("--layer", help="stored layer to use (default: the deepest)")
    fit.add_argument("--classifier", default="logreg", choices=["logreg", "linear_svm", "knn"])
    fit.add_argument("--C", default="auto", help="regularisation: 'auto' (cross-validated) or a number")
    fit.add_argument("--n-neighbors", type=int, default=10, help="for knn (default %(default)s)")
    fit.add_argument("--metric", default="cosine", choices=["cosine", "l2", "ip"], help="for knn")
    fit.add_argument("--test-size", type=float, help="hold out this fraction (stratified, identical "
                     "content on one side) and report its accuracy; evaluate uses it too")
    fit.add_argument("--random-state", type=int, default=0)
    fit.add_argument("--cv", type=int, default=5, help="folds for C='auto' (default %(default)s)")
    fit.add_argument("--jobs", type=int, default=-1, help="parallel jobs for the cross-validation (default: all cores)")

    pred = command("predict", "classify photos with a saved model",
                   "Extract photos with the model's own extractor spec and print the top-k labels "
                   "with probabilities.")
    pred.add_argument("model", help="a .skops file from `cnncodes fit`")
    pred.add_argument("images", nargs="+", help="a folder, a .csv, or image files")
    pred.add_argument("--top-k", type=int, default=1)
    pred.add_argument("--csv", help="also write id,label,probability,... to this CSV")
    pred.add_argument("--store", help="store to extract into and reuse (default: a temporary one)")
    pred.add_argument("--quiet", action="store_true", help="no progress bar")

    ev = command("evaluate", "accuracy, per-class report and confusion matrix of a model",
                 "Evaluate a saved model on a store (its held-out rows when the model was fit with "
                 "--test-size on it) or on a labelled folder.")
    ev.add_argument("model")
    ev.add_argument("data", help="a .h5 store or a folder with one subfolder per class")
    ev.add_argument("--plot", help="write the confusion matrix as a PNG (needs matplotlib)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = command("demo", "extract the bundled photo sample and describe the result",
                   "Extract the small flower sample shipped with cnncodes (MobileNetV2, "
                   "block4 + block5) and describe the store.")
    demo.add_argument("-o", "--out", default="cnncodes-demo.h5", help="store to write (default %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _extract_options(e) -> None:
    e.add_argument("--backbone", default="mobilenet_v2", help="registered backbone (default %(default)s)")
    e.add_argument("--layer", action="append", dest="layers", metavar="LAYER",
                   help="alias (block4) or FX node name; repeat for several (default: pre-logits)")
    e.add_argument("--pooling", default="avg", choices=["avg", "max", "gem", "flatten"])
    e.add_argument("--weights", default="imagenet",
                   help="imagenet (IMAGENET1K_V1, default), DEFAULT (torchvision's), a weights "
                   "name such as IMAGENET1K_V2, a checkpoint path, or 'random'")
    e.add_argument("--image-size", type=int, help="crop size (default: the weights' own)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    e.add_argument("--workers", default="auto", help="decoding processes (default auto)")
    e.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    e.add_argument("--max-pixels", type=int, help="larger images are recorded as failures")
    e.add_argument("--quiet", action="store_true", help="no progress bar")


def _extract(args) -> int:
    from ._extract import extract
    from ._images import DEFAULT_MAX_PIXELS

    source = args.data[0] if len(args.data) == 1 else args.data
    weights = None if args.weights.lower() in ("random", "none") else args.weights
    workers = args.workers if args.workers == "auto" else int(args.workers)
    result = extract(
        source, out=args.out, backbone=args.backbone, layers=args.layers, pooling=args.pooling,
        weights=weights, image_size=args.image_size, batch_size=args.batch_size,
        device=args.device, num_workers=workers, dtype=args.dtype,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, progress=not args.quiet,
    )
    print(result.summary())
    return EXIT_FAILURES if result.failures or result.known_failures else EXIT_OK


def _backbones(args) -> int:
    from ._backbones import get_backbone, list_backbones

    for name in list_backbones():
        spec = get_backbone(name)
        print(f"{name:<16} aliases {', '.join(i.alias for i in spec.layers)}; default {spec.default_layer}")
    return EXIT_OK


def _layers(args) -> int:
    from ._backbones import get_backbone, graph_nodes, layer_table

    if args.nodes:
        get_backbone(args.backbone)
        print("\n".join(graph_nodes(args.backbone)))
        return EXIT_OK
    rows = layer_table(args.backbone, pooling=args.pooling, image_size=args.image_size)
    header = ("alias", "node", "channels", "stride", "output", f"code size ({args.pooling})")
    table = [header] + [
        (r["alias"] + (" *" if r["default"] else ""), r["node"], str(r["channels"]),
         "-" if r["stride"] is None else str(r["stride"]), "x".join(map(str, r["output"])),
         str(r["code_size"]))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("* default layer (pre-logits features)")
    return EXIT_OK


def _info(args) -> int:
    from ._store import CodeStore

    print(describe_store(CodeStore(args.store)))
    return EXIT_OK


def describe_store(store) -> str:
    """A plain-text description of a store, for `cnncodes info` and the demo."""
    import json

    import numpy as np

    spec, attrs = store.spec, store.attrs
    labels, names = store.labels, store.class_names
    counts = np.bincount(labels[labels >= 0], minlength=len(names)) if names else []
    lines = [
        f"{store.path}: {len(store)} rows, format {attrs['format']} v{attrs['format_version']}",
        f"backbone {spec['backbone']}, weights {spec['weights']} (sha256 {spec['weights_sha256'][:12] or '-'}), "
        f"pooling {spec['pooling']}, {spec['dtype']}",
        "layers: " + ", ".join(f"{a} = {n} ({store.codes_shape(a)[1]})" for a, n in spec["layers"].items()),
        "preprocessing: " + spec["preprocessing"]["description"],
    ]
    if names:
        lines.append("classes: " + ", ".join(f"{n} {c}" for n, c in zip(names, counts)))
    if (labels < 0).any():
        lines.append(f"unlabelled rows: {int((labels < 0).sum())}")
    lines.append(f"failures: {len(store.failures)}")
    lines += [f"  {rid}: {why}" for rid, why in store.failures[:10]]
    conflicts = store.conflicts()
    lines.append(f"identical content under different labels: {len(conflicts)}")
    lines += ["  " + " = ".join(f"{i} [{lab}]" for i, lab in g) for g in conflicts[:10]]
    versions = json.loads(attrs.get("versions", "{}"))
    lines.append(f"created {attrs.get('created', '?')} from {attrs.get('data_root', '?')} with "
                 + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines)


def _demo(args) -> int:
    from . import sample_dir
    from ._extract import extract
    from ._store import CodeStore

    folder = sample_dir()
    print(f"cnncodes demo: MobileNetV2 (ImageNet weights) codes of the bundled sample {folder}")
    result = extract(str(folder), out=args.out, backbone="mobilenet_v2", layers=["block4", "block5"],
                     progress=not args.quiet)
    print(result.summary())
    print()
    print(describe_store(CodeStore(args.out)))
    print(f"\nRead it back: CodeStore({args.out!r}).codes('block5'), or h5py: f['codes/block5'][:]")
    return EXIT_FAILURES if result.failures else EXIT_OK


def _fit(args) -> int:
    from ._errors import CnnCodesError
    from ._fit import fit, split_store
    from ._model import evaluate, save
    from ._store import CodeStore

    store = CodeStore(args.store)
    try:
        C = args.C if args.C == "auto" else float(args.C)
    except ValueError:
        raise CnnCodesError(f"--C must be 'auto' or a number, got {args.C!r}.") from None
    rows = None
    if args.test_size is not None:
        rows, test = split_store(store, test_size=args.test_size, random_state=args.random_state)
    model = fit(store, classifier=args.classifier, layer=args.layer, C=C, n_neighbors=args.n_neighbors,
                metric=args.metric, cv=args.cv, rows=rows, n_jobs=args.jobs, random_state=args.random_state)
    info, layer = model.cnncodes_["fit"], model.cnncodes_["layer"]
    dims = store.codes_shape(layer)[1]
    line = f"fit {args.classifier} on {info['n_train']} rows of {store.path.name} ({layer}, {dims} dims)"
    if "C" in info:
        line += f", C={info['C']:g}"
        if "cv_scores" in info:
            cv_accuracy = info["cv_scores"][f"{info['C']:g}"]
            line += f" ({args.cv}-fold CV accuracy {cv_accuracy:.4f})"
    print(line + f"; {info['seconds']:.1f} s.")
    save(model, args.out)
    if args.test_size is not None:
        ev = evaluate(model, args.store)
        print(f"held-out accuracy {ev.accuracy:.4f} on {ev.n} rows (test size {args.test_size}, "
              f"random_state {args.random_state}).")
    print(f"wrote {args.out}")
    return EXIT_OK


def _predict(args) -> int:
    import csv

    from ._model import predict

    images = args.images[0] if len(args.images) == 1 else args.images
    preds = predict(args.model, images, top_k=args.top_k, store=args.store, progress=not args.quiet)
    for p in preds:
        print(p.id + "\t" + "\t".join(f"{lab} {prob:.3f}" for lab, prob in zip(p.labels, p.probabilities)))
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id"] + [f"{c}{k + 1}" for k in range(args.top_k) for c in ("label", "probability")])
            for p in preds:
                w.writerow([p.id] + [v for pair in zip(p.labels, p.probabilities) for v in pair])
        print(f"wrote {args.csv}")
    return EXIT_OK


def _evaluate(args) -> int:
    from ._model import evaluate

    ev = evaluate(args.model, args.data, progress=not args.quiet)
    print(ev.summary())
    if args.plot:
        print(f"wrote {ev.plot(args.plot)}")
    return EXIT_OK


HANDLERS = {"extract": _extract, "backbones": _backbones, "layers": _layers, "info": _info,
            "demo": _demo, "fit": _fit, "predict": _predict, "evaluate": _evaluate}


def main(argv=None) -> int:
    from ._errors import CnnCodesError

    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_ERROR
    try:
        return HANDLERS[args.command](args)
    except CnnCodesError as exc:
        if args.debug:
            raise
        msg = textwrap.indent(str(exc), "  ").lstrip()
        print(f"cnncodes {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"cnncodes {args.command}: interrupted; re-run the same command to resume.", file=sys.stderr)
        return 130
