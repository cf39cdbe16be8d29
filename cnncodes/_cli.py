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


HANDLERS = {"extract": _extract, "backbones": _backbones, "layers": _layers, "info": _info, "demo": _demo}


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
