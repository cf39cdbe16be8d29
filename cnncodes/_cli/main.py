"""The `cnncodes` command line: parse, check, call one public function, map errors to exits."""

from __future__ import annotations

import argparse
import difflib
import sys
import textwrap

from cnncodes._choices import (
    CLASSIFIERS,
    DEFAULT_BACKBONE,
    DTYPES,
    ENGINES,
    FINETUNE_TTAS,
    FORMATS,
    IMAGENET,
    METRICS,
    NORMALIZE,
    POOLINGS,
    PRECISIONS,
    PROBES,
    RESIZES,
    TTAS,
)
from cnncodes._errors import InvalidParameterError

EXIT_OK, EXIT_FAILURES, EXIT_ERROR = 0, 1, 2
EXIT_SIGPIPE = 141  # 128 + SIGPIPE, as a shell reports a command whose reader closed the pipe

EXAMPLES = {
    "extract": "cnncodes extract photos/ --backbone mobilenet_v2 --layer block4 --layer block5 -o codes.h5",
    "backbones": "cnncodes backbones",
    "layers": "cnncodes layers resnet50 --pooling avg",
    "info": "cnncodes info codes.h5",
    "check": "cnncodes check codes.h5 --rehash",
    "demo": "cnncodes demo -o demo.h5 --report demo-report.html",
    "fit": "cnncodes fit codes.h5 --layer block5 --classifier logreg --test-size 0.25 -o model.skops",
    "predict": "cnncodes predict model.skops new_photos/ --top-k 3 --csv predictions.csv",
    "evaluate": "cnncodes evaluate model.skops codes.h5 --n-resamples 2000 --plot confusion.png",
    "compare": "cnncodes compare block4.skops block5.skops codes.h5",
    "curve": "cnncodes curve codes.h5 --layer block5 --sizes 1,2,5,10,20,50,all --repeats 5 --plot curve.png",
    "report": "cnncodes report model.skops codes.h5 --curve --sweep -o report.html",
    "finetune": "cnncodes finetune photos/ -o ft.pt --unfreeze block3 --epochs 8 --init-head codes.h5",
    "sweep": "cnncodes sweep photos/ --backbone mobilenet_v2 --store codes.h5 --cv 5 --plot sweep.png",
    "advise": "cnncodes advise photos/ --store codes.h5 --run -o model.skops",
    "export": "cnncodes export model.skops -o model.onnx",
    "serve": "cnncodes serve model.onnx --port 8000",
}


class _Layers(argparse.Action):
    """`--layer`, repeatable, each value a name or comma-separated names: kept in order, once each."""

    def __call__(self, parser, namespace, values, option_string=None):
        names = list(getattr(namespace, self.dest, None) or [])
        given = [v.strip() for v in values.split(",") if v.strip()]
        if not given:
            raise argparse.ArgumentError(self, f"expected a layer name, got {values!r}")
        names += [v for v in dict.fromkeys(given) if v not in names]
        setattr(namespace, self.dest, names)


def _parser() -> argparse.ArgumentParser:
    from cnncodes import __version__

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
    p.commands = sub.choices  # for the usage of the command an unknown option was given to

    def command(name, help_, description):
        return sub.add_parser(
            name, help=help_, description=description,
            epilog=f"Example:\n  {EXAMPLES[name]}", formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    for add in (_add_extract, _add_backbones, _add_layers, _add_info, _add_check, _add_fit, _add_predict,
                _add_evaluate, _add_compare, _add_curve, _add_report, _add_finetune, _add_demo, _add_sweep,
                _add_advise, _add_export, _add_serve):  # one function per command, in --help's order
        add(command)
    for name, command_parser in sub.choices.items():
        if "--quiet" not in command_parser._option_string_actions:
            # Every command takes --quiet, so a script can pass it throughout.
            command_parser.add_argument("--quiet", action="store_true",
                                        help="accepted by every command; this one shows no progress")
    return p


def _add_extract(command) -> None:
    e = command("extract", "extract CNN codes of images into an HDF5 store",
                "Extract CNN codes of a folder (one subfolder per class, or flat), a CSV of "
                "path[,label], image paths, an fsspec URL (s3://bucket/photos/), WebDataset tar "
                "shards ('train-{000000..000009}.tar') or a Parquet / datasets table into an HDF5 "
                "store. Re-running skips what the store holds; an interrupted run resumes.")
    e.add_argument("data", nargs="+", help="a folder, a .csv file, image files, a URL, .tar shards, "
                   "a .parquet file or a datasets folder")
    e.add_argument("-o", "--out", required=True, help="the .h5 store to create or extend")
    _extract_options(e)
    e.add_argument("--engine", default="local", choices=ENGINES,
                   help="ray: read and decode in Ray tasks and run the backbone in a pool of Ray actors, "
                   "each writing segments of the store (pip install 'cnncodes[ray]')")
    e.add_argument("--address", help="with --engine ray: the Ray cluster (auto, ray://head:10001; "
                   "default: a local cluster)")
    e.add_argument("--ray-workers", type=int, help="with --engine ray: backbone actors (default: one "
                   "per --gpus-per-worker GPUs, or half the CPUs); not --workers, the decoding processes "
                   "of the local engine")
    e.add_argument("--gpus-per-worker", type=float, default=0,
                   help="with --engine ray: GPUs per actor (default 0: CPU actors)")
    e.add_argument("--image-column", help="a table's image column (default: image)")
    e.add_argument("--label-column", help="a table's label column (default: label); for tar shards the "
                   "member extension with the label (default: cls, then txt, then json's label)")
    e.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an fsspec option for URLs, e.g. endpoint_url=http://localhost:9000 (repeat for "
                   "several; default: the usual AWS / fsspec environment variables)")
    e.add_argument("--replace-root", action="store_true",
                   help="the store was extracted from another data folder: let images of this one "
                   "replace the stored rows with the same ids (by default such a run is refused)")
    e.add_argument("--rehash", action="store_true",
                   help="read and hash every file again; by default a file whose size, mtime and "
                   "inode are those stored with its row is not read")


def _add_backbones(command) -> None:
    command("backbones", "list the registered backbones", "List the registered backbones.")


def _add_layers(command) -> None:
    lay = command("layers", "show a backbone's layer aliases",
                  "Show a backbone's layer aliases: node, channels, stride and code size.")
    lay.add_argument("backbone")
    lay.add_argument("--pooling", default="avg", help="pooling used for the code size (default avg)")
    lay.add_argument("--image-size", type=int, help="input size (default: the weights' crop size)")
    lay.add_argument("--nodes", action="store_true", help="list every raw FX node name instead")


def _add_info(command) -> None:
    info = command("info", "describe a code store", "Describe a code store: rows, layers, classes, "
                   "failures, label conflicts and provenance.")
    info.add_argument("store")


def _add_check(command) -> None:
    chk = command("check", "verify a code store",
                  "Verify a code store: its segment files present and readable, row counts in "
                  "agreement, no non-finite codes; with --rehash, every image still matches its "
                  "sha256. Prints one verdict; exit 0 when sound, 1 when damaged.")
    chk.add_argument("store")
    chk.add_argument("--rehash", action="store_true", help="re-read every image and compare its sha256")
    chk.add_argument("--root", help="where the images are, for --rehash (default: the data root the "
                     "store recorded)")


def _add_fit(command) -> None:
    fit = command("fit", "fit a classifier on the codes of a store",
                  "Fit logistic regression, a linear SVM or faiss kNN on a store's codes and save "
                  "it with its extractor spec as a .skops file (loads without running code).")
    fit.add_argument("store", help="a .h5 store from `cnncodes extract`")
    fit.add_argument("-o", "--out", required=True, help="model file to write (.skops)")
    fit.add_argument("--layer", action=_Layers, help="stored layer to use (default: the deepest); repeat "
                     "(--layer block4 --layer block5) to concatenate several")
    fit.add_argument("--normalize", choices=("none", *NORMALIZE), default="none",
                     help="normalise each code first: l2 (unit length) or power (signed square root, "
                     "then l2); default none")
    fit.add_argument("--augment", metavar="STORE", help="a store of the same photos' mirror images "
                     "(`extract --tta mirror`): their codes are added as training rows")
    fit.add_argument("--classifier", default="logreg", choices=CLASSIFIERS,
                     help="sgd: logistic regression by SGD over chunks, for stores larger than memory")
    fit.add_argument("--C", default="auto", help="regularisation: 'auto' (cross-validated) or a number")
    fit.add_argument("--n-neighbors", type=int, default=10, help="for knn (default %(default)s)")
    fit.add_argument("--metric", default="cosine", choices=METRICS, help="for knn")
    fit.add_argument("--test-size", type=float, help="hold out this fraction (stratified, identical "
                     "content on one side) and report its accuracy; evaluate uses it too")
    fit.add_argument("--random-state", type=int, default=0)
    fit.add_argument("--cv", type=int, default=5, help="folds for C='auto' (default %(default)s)")
    fit.add_argument("--jobs", type=int, default=-1, help="parallel jobs for the cross-validation (default: all cores)")


def _add_predict(command) -> None:
    pred = command("predict", "classify photos with a saved model",
                   "Extract photos with the model's own extractor spec and print the top-k labels "
                   "with probabilities.")
    pred.add_argument("model", help="a .skops file from `cnncodes fit`, or a .pt from `cnncodes finetune`")
    pred.add_argument("images", nargs="+", help="a folder, a .csv, or image files")
    pred.add_argument("--top-k", type=int, default=1, metavar="K",
                      help="print the K most probable labels of each photo (default %(default)s)")
    pred.add_argument("--csv", help="also write id,label1,probability1,...,status to this CSV (status: "
                      "ok, or why the photo failed)")
    pred.add_argument("--store", help="store to extract into and reuse (default: a temporary one)")
    _run_options(pred)
    pred.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_evaluate(command) -> None:
    ev = command("evaluate", "accuracy, per-class report and confusion matrix of a model",
                 "Evaluate a saved model on a store (its held-out rows when the model was fit with "
                 "--test-size on it) or on a labelled folder.")
    ev.add_argument("model", help="a .skops file from `cnncodes fit`, or a .pt from `cnncodes finetune` "
                    "(evaluated on a folder)")
    ev.add_argument("data", help="a .h5 store or a folder with one subfolder per class")
    ev.add_argument("--plot", help="write the confusion matrix as a PNG (needs matplotlib)")
    _interval_options(ev)
    _run_options(ev, " (of a folder)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_compare(command) -> None:
    cmp = command("compare", "two models on the same test images: is the difference more than noise?",
                  "Evaluate two models on the same data and print the paired, stratified bootstrap "
                  "confidence interval of their accuracy difference (a - b), and whether it excludes 0.")
    cmp.add_argument("model_a", help="a .skops file from `cnncodes fit`")
    cmp.add_argument("model_b", help="a .skops file from `cnncodes fit`, fitted on the same split")
    cmp.add_argument("data", help="a .h5 store holding both models' layers, or a labelled folder")
    _interval_options(cmp)
    _run_options(cmp, " (of a folder)")


def _add_curve(command) -> None:
    cur = command("curve", "learning curve: held-out accuracy against training images per class",
                  "Split a store as `fit --test-size` does, fit logistic regression on repeated "
                  "training subsets of N images per class, and print held-out accuracy with its "
                  "interval per size, and whether more labels are likely to help.")
    cur.add_argument("store", help="a .h5 store with labels")
    cur.add_argument("--layer", action=_Layers, help="stored layer to use (default: the deepest)")
    cur.add_argument("--sizes", default="1,2,5,10,20,50,all",
                     help="training images per class, comma-separated, 'all' for every one (default %(default)s)")
    cur.add_argument("--repeats", type=int, default=5, help="training draws per size (default %(default)s)")
    cur.add_argument("--test-size", type=float, default=0.25, help="held-out fraction (default %(default)s)")
    cur.add_argument("--random-state", type=int, default=0)
    cur.add_argument("--plot", help="write the curve as a PNG (needs matplotlib)")
    cur.add_argument("--jobs", type=int, default=-1, help="parallel jobs of choosing C (default: all cores)")
    _interval_options(cur)


def _add_report(command) -> None:
    rep = command("report", "one self-contained HTML report of a model: accuracy, mistakes, provenance",
                  "Evaluate a model and write one HTML file (images inline, no network, readable "
                  "on a phone): accuracy with its interval, per-class table, confusion matrix, "
                  "thumbnails of the most confident mistakes and least confident correct "
                  "predictions, optionally the learning curve and the layer sweep, and provenance.")
    rep.add_argument("model", help="a .skops file from `cnncodes fit`")
    rep.add_argument("data", help="a .h5 store (thumbnails from its data root) or a labelled folder")
    rep.add_argument("-o", "--out", required=True, help="the .html file to write")
    rep.add_argument("--curve", action="store_true", help="add the learning curve of the store (its "
                     "layer of the model; a store only)")
    rep.add_argument("--sweep", action="store_true", help="add a 5-fold layer sweep of the store's layers "
                     "(a store only)")
    rep.add_argument("--thumbnails", type=int, default=12, help="photos in each gallery (default %(default)s)")
    _interval_options(rep)
    _run_options(rep, " (of a folder)")


def _add_finetune(command) -> None:
    ft = command("finetune", "fine-tune the top blocks of a pretrained backbone on labelled photos",
                 "Fine-tune a pretrained backbone with a new head: the layers from --unfreeze on are "
                 "trained (lower learning rate than the head), the rest stay frozen (BatchNorm in "
                 "inference mode); augmented training split, early stopping on a validation split, "
                 "and --test-size held out exactly as `cnncodes fit --test-size` holds it out. With "
                 "--init-head codes.h5 (the backbone's pre-logits codes) the head starts from a "
                 "logistic regression fitted on them. Writes a checkpoint usable by predict, evaluate "
                 "and `extract --weights`; an interrupted run resumes when re-run.")
    ft.add_argument("data", help="a folder with one subfolder per class, or a .csv of path,label")
    ft.add_argument("-o", "--out", required=True, help="the checkpoint to write (.pt)")
    ft.add_argument("--backbone", default=DEFAULT_BACKBONE, help="registered backbone (default %(default)s)")
    ft.add_argument("--weights", default=IMAGENET, help="pretrained weights, as for extract (default imagenet)")
    ft.add_argument("--unfreeze", default="block3", help="train this block and every deeper one (an alias), "
                    "a number of top blocks (0: the head only), or 'all' (default %(default)s)")
    ft.add_argument("--epochs", type=int, default=8, help="at most (default %(default)s)")
    ft.add_argument("--lr", type=float, default=2e-4, help="learning rate of the pretrained layers (default %(default)s)")
    ft.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the head (default %(default)s)")
    ft.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default %(default)s)")
    ft.add_argument("--batch-size", type=int, default=32)
    ft.add_argument("--no-augment", dest="augment", action="store_false",
                    help="no random crop / flip / colour jitter of the training images")
    ft.add_argument("--dropout", type=float, default=0.2, help="before the head (default %(default)s)")
    ft.add_argument("--label-smoothing", type=float, default=0.1, help="of the training loss (default %(default)s)")
    ft.add_argument("--tta", choices=FINETUNE_TTAS, default="flip",
                    help="test-time augmentation of validation, test and predictions (default %(default)s)")
    ft.add_argument("--train-bn", action="store_true", help="BatchNorm of the trained blocks uses batch "
                    "statistics (default: every BatchNorm in inference mode, its scale and shift trained)")
    ft.add_argument("--val-fraction", type=float, default=0.1,
                    help="validation share of the non-test images (default %(default)s; 0: none)")
    ft.add_argument("--patience", type=int, default=3,
                    help="early stopping after N epochs without a lower validation loss (default "
                    "%(default)s; 0: off)")
    ft.add_argument("--target-accuracy", type=float, help="stop once the validation accuracy reaches it")
    ft.add_argument("--test-size", type=float, default=0.25,
                    help="held-out fraction scored at the end (default %(default)s; 0: none)")
    ft.add_argument("--random-state", type=int, default=0)
    ft.add_argument("--init-head", metavar="CODES.h5|MODEL.skops",
                    help="two-stage: initialise the head from a logistic regression on these pre-logits "
                    "codes (or this fitted logreg model)")
    ft.add_argument("--image-size", type=int, help="crop size (default: the weights' own)")
    ft.add_argument("--restart", action="store_true", help="train from the start, overwriting -o")
    ft.add_argument("--precision", default="auto", choices=PRECISIONS,
                    help="autocast precision (default auto: bfloat16 where the hardware runs it natively)")
    ft.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    ft.add_argument("--workers", default="auto", help="decoding processes (default auto)")
    ft.add_argument("--jobs", type=int, default=-1, help="parallel jobs of the --init-head fit (default: all cores)")
    ft.add_argument("--quiet", action="store_true", help="no progress output")


def _add_demo(command) -> None:
    demo = command("demo", "the whole job on the bundled photos: extract, fit, evaluate, predict, report",
                   "Extract the 200 flower photos shipped with cnncodes (MobileNetV2, block4 + "
                   "block5), describe the store, hold out a stratified quarter, fit logistic "
                   "regression on block5, evaluate it with its confidence interval, predict two "
                   "held-out photos and write an HTML report.")
    demo.add_argument("-o", "--out", default="cnncodes-demo.h5", help="store to write (default %(default)s)")
    demo.add_argument("--report", default="demo-report.html",
                      help="HTML report to write (default %(default)s)")
    demo.add_argument("--model", default="cnncodes-demo.skops", help="model to write (default %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_sweep(command) -> None:
    sw = command("sweep", "cross-validated linear probe of every layer: where are the useful features?",
                 "Extract every layer alias of a backbone in one pass (or read a store's layers), "
                 "then score a linear probe per layer by stratified k-fold cross-validation grouped "
                 "by image content (C chosen inside each fold). Prints accuracy ± std per layer and "
                 "the best layer.")
    sw.add_argument("data", help="a folder with one subfolder per class, a .csv of path,label, or a .h5 store")
    sw.add_argument("--store", help="store to extract into and reuse (default: a temporary one)")
    sw.add_argument("--layer", action=_Layers, dest="layers", metavar="LAYER",
                    help="sweep only these layers; repeat, or separate with commas (default: every alias, "
                    "or the store's layers)")
    sw.add_argument("--cv", type=int, default=5, help="folds (default %(default)s)")
    sw.add_argument("--classifier", default="logreg", choices=PROBES, help="the probe")
    sw.add_argument("--plot", help="write accuracy per layer as a PNG (needs matplotlib)")
    sw.add_argument("--max-images", type=int, help="probe a stratified sample of at most N images")
    _probe_options(sw)


def _add_advise(command) -> None:
    adv = command("advise", "place a data set in the four-scenario guide and recommend what to do",
                  "Measure the data set (images per class), how the pretrained ImageNet head reacts "
                  "to it, and where its useful features are (a layer sweep); place it in the "
                  "small/large x similar/different table; recommend a layer and a linear classifier, "
                  "or fine-tuning (blocks to unfreeze, learning rates), with the numbers behind it. "
                  "--run carries the recommendation out.")
    adv.add_argument("data", help="a folder with one subfolder per class, a .csv of path,label, or a .h5 store")
    adv.add_argument("--store", help="store the sweep extracts into (default: a temporary one)")
    adv.add_argument("--cv", type=int, default=5, help="folds of the sweep (default %(default)s)")
    adv.add_argument("--max-images", type=int, default=5000,
                     help="the sweep probes a stratified sample of at most N images (default %(default)s; 0: all)")
    adv.add_argument("--head-images", type=int, default=256,
                     help="images shown to the ImageNet head (default %(default)s)")
    adv.add_argument("--run", action="store_true",
                     help="carry the recommendation out: fit and save a model, or fine-tune")
    adv.add_argument("-o", "--out", help="with --run: the model file (default model.skops, or "
                     "finetuned.pt when fine-tuning)")
    _probe_options(adv)


def _add_export(command) -> None:
    exp = command("export", "write a fitted model as one network (ONNX or TorchScript)",
                  "Write a fitted model as one network from uint8 RGB pixels (already resized and "
                  "centre-cropped; the network normalises them) to class probabilities: the backbone "
                  "cut at the model's layer, its pooling, the scaler folded into the linear layer, "
                  "softmax or calibration. Class names, preprocessing and provenance go in its metadata. "
                  "Logistic regression, SGD, the calibrated linear SVM and fine-tuned .pt networks "
                  "export; kNN does not.")
    exp.add_argument("model", help="a .skops file from `cnncodes fit`, or a .pt from `cnncodes finetune`")
    exp.add_argument("-o", "--out", required=True, help="the file to write (.onnx, or .pt for TorchScript)")
    exp.add_argument("--format", choices=FORMATS,
                     help="default: onnx for an .onnx file, else torchscript")
    exp.add_argument("--opset", type=int, default=17, help="ONNX opset (default %(default)s)")


def _add_serve(command) -> None:
    srv = command("serve", "serve a model over HTTP: POST /predict, GET /health, GET / (a page)",
                  "Serve a model over HTTP until Ctrl-C: POST /predict takes a photo (multipart field "
                  "'file', or the raw body; ?top_k=K) and answers the top classes with probabilities "
                  "as JSON; GET / is a page to drop a photo on; GET /health. Requests that arrive "
                  "together are classified as one batch. Binds to localhost unless --host says otherwise.")
    srv.add_argument("model", help="an .onnx file from `cnncodes export` (runs on ONNX Runtime), a .skops "
                     "from `cnncodes fit` or a .pt from `cnncodes finetune`")
    srv.add_argument("--host", default="127.0.0.1", help="interface to bind (default %(default)s: this "
                     "machine only; 0.0.0.0 exposes it)")
    srv.add_argument("--port", type=int, default=8000, help="(default %(default)s)")
    srv.add_argument("--max-batch", type=int, default=32, help="most images per model call (default %(default)s)")
    srv.add_argument("--window-ms", type=float, default=2.0,
                     help="how long a request waits for others to share its batch (default %(default)s)")
    srv.add_argument("--max-upload-mb", type=float, default=20.0,
                     help="larger uploads are refused with 413 (default %(default)s)")
    srv.add_argument("--threads", type=int, help="threads of the model (default: the runtime's own)")


def _interval_options(e) -> None:
    e.add_argument("--n-resamples", type=int, default=1000,
                   help="bootstrap resamples of the 95 %% confidence intervals (default %(default)s)")
    e.add_argument("--seed", type=int, default=0, help="seed of the resampling (default %(default)s)")


def _run_options(e, what="") -> None:
    e.add_argument("--batch-size", type=int, help=f"images per batch of the extraction{what} (default: "
                   "extract's, or the fine-tuned network's)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    e.add_argument("--workers", default="auto", help="decoding processes (default auto)")


def _probe_options(e) -> None:
    e.add_argument("--backbone", default=DEFAULT_BACKBONE, help="registered backbone (default %(default)s), "
                   "or a timm model as timm:NAME (pip install 'cnncodes[timm]')")
    e.add_argument("--weights", default=IMAGENET, help="as for extract (default imagenet)")
    e.add_argument("--image-size", type=int, help="crop size of the extraction (default: a fine-tuned checkpoint's training crop, else the weights' own)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    e.add_argument("--workers", default="auto", help="decoding processes; auto (default) decodes in the main process when that is cheaper, measured on the first batches")
    e.add_argument("--random-state", type=int, default=0, help="seed of the folds and samples")
    e.add_argument("--jobs", type=int, default=-1, help="parallel probe fits (default: all cores)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")


def _extract_options(e) -> None:
    e.add_argument("--backbone", default=DEFAULT_BACKBONE, help="registered backbone (default %(default)s), "
                   "or a timm model as timm:NAME (pip install 'cnncodes[timm]')")
    e.add_argument("--layer", action=_Layers, dest="layers", metavar="LAYER",
                   help="alias (block4) or FX node name; repeat, or separate with commas, for several "
                   "(default: pre-logits)")
    e.add_argument("--pooling", default="avg", choices=POOLINGS,
                   help="avg (default), max, gem, flatten, spp (1x1+2x2+4x4 average pools); ViT tokens: avg (patch tokens), cls, cls+avg")
    e.add_argument("--weights", default=IMAGENET,
                   help="imagenet (IMAGENET1K_V1, default), DEFAULT (torchvision's), a weights "
                   "name such as IMAGENET1K_V2, a checkpoint path, or 'random'; timm models: imagenet "
                   "(timm's pretrained, online), a timm tag, a checkpoint path, or 'random'")
    e.add_argument("--image-size", type=int, help="crop size (default: the weights' own)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    e.add_argument("--workers", default="auto", help="decoding processes (default auto)")
    e.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="storage type of the codes (default float32)")
    e.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="arithmetic of the forward pass; auto: the store's, else the fastest candidate "
                   "(float32, bfloat16, on CUDA float16) timed on the first batch whose codes agree "
                   "with float32's (cosine >= 0.999)")
    e.add_argument("--compile", dest="compile", action="store_const", const=True, default="auto",
                   help="torch.compile the model (20-35 s, then 1.05-1.2x faster; auto: on a CPU when the eager "
                        "pass would take five minutes or more, judged from the first two batches)")
    e.add_argument("--no-compile", dest="compile", action="store_const", const=False)
    e.add_argument("--tta", choices=TTAS,
                   help="flip: average the codes of each image and its mirror image; mirror: the mirror "
                   "image's codes alone, as augmentation rows for `fit --augment` (default: the store's, else none)")
    e.add_argument("--no-jpeg-draft", dest="jpeg_draft", action="store_const", const=False, default=None,
                   help="decode large JPEGs at full size (default: reduced DCT scale, never below 2x the resize)")
    e.add_argument("--resize", choices=RESIZES,
                   help="where images are resized: by torch where the model runs, a batch at a time "
                        "(device), or by PIL where each image is decoded (workers: torchvision's "
                        "transform to the pixel). Default: the store's, else device")
    e.add_argument("--max-pixels", type=int, help="larger images are recorded as failures")
    e.add_argument("--quiet", action="store_true", help="no progress bar")


def _extract(args) -> int:
    from cnncodes._extract.extract import extract
    from cnncodes._input.images import DEFAULT_MAX_PIXELS
    from cnncodes._errors import CnnCodesError

    if args.engine != "ray" and (args.address or args.ray_workers or args.gpus_per_worker):
        raise CnnCodesError("--address, --ray-workers and --gpus-per-worker need --engine ray.")

    source = args.data[0] if len(args.data) == 1 else args.data
    weights, workers = _weights(args), _workers(args)
    result = extract(
        source, out=args.out, backbone=args.backbone, layers=args.layers, pooling=args.pooling,
        weights=weights, image_size=args.image_size, batch_size=args.batch_size,
        device=args.device, num_workers=workers, dtype=args.dtype, precision=args.precision,
        compile=args.compile, tta=args.tta, jpeg_draft=args.jpeg_draft, resize=args.resize,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, progress=not args.quiet,
        engine=args.engine, ray_address=args.address, ray_workers=args.ray_workers,
        gpus_per_worker=args.gpus_per_worker, rehash=args.rehash,
        on_other_root="replace" if args.replace_root else "refuse",
        image_column=args.image_column, label_column=args.label_column,
        storage_options=_storage_options(args.storage_option),
    )
    print(result.summary())
    return EXIT_FAILURES if result.failures or result.known_failures else EXIT_OK


def _storage_options(pairs: list[str]) -> dict:
    """--storage-option KEY=VALUE pairs as fsspec options (values as JSON when they parse)."""
    import json

    from cnncodes._errors import CnnCodesError

    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise CnnCodesError(f"--storage-option {pair!r} is not KEY=VALUE; e.g. --storage-option "
                                f"endpoint_url=http://localhost:9000.")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _backbones(args) -> int:
    from cnncodes._backbones.registry import get_backbone, list_backbones

    for name in list_backbones():
        spec = get_backbone(name)
        print(f"{name:<16} aliases {', '.join(i.alias for i in spec.layers)}; default {spec.default_layer}")
    return EXIT_OK


def _layers(args) -> int:
    from cnncodes._backbones.registry import get_backbone, graph_nodes, layer_table

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
    from cnncodes._store.store import CodeStore

    print(describe_store(CodeStore(args.store)))
    return EXIT_OK


def _check(args) -> int:
    from cnncodes._store.store import check

    result = check(args.store, rehash=args.rehash, root=args.root)
    print(result.summary())
    return EXIT_OK if result.ok else EXIT_FAILURES


def describe_store(store) -> str:
    """A plain-text description of a store, for `cnncodes info` and the demo."""
    import json

    import numpy as np

    attrs = store.attrs
    labels, names = store.labels, store.class_names
    counts = np.bincount(labels[labels >= 0], minlength=len(names)) if names else []
    lines = [
        f"{store.path}: {len(store)} rows, format {attrs['format']} v{attrs['format_version']}"
        + (f", {len(store.segments)} segment(s) in {store.path.name}.d/" if store.segments else ""),
        *store.spec.describe({a: store.codes_shape(a)[1] for a in store.layers}),
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
    """The whole job on the bundled photos: extract, split, fit, evaluate, predict, report."""
    from pathlib import Path

    from importlib.resources import files

    from cnncodes._extract.extract import extract
    from cnncodes._classify.fit import fit, split_store
    from cnncodes._models.model import evaluate, predict, save
    from cnncodes._outputs import MODEL, REPORT, check_output
    from cnncodes._store.store import CodeStore

    check_output(args.model, MODEL, option="--model")  # before any work, not after
    check_output(args.report, REPORT, option="--report")
    folder = files("cnncodes") / "_data" / "flowers_demo"  # 40 photos per class (see ATTRIBUTION.md)
    print(f"cnncodes demo: MobileNetV2 (ImageNet weights) codes of the bundled photos {folder}")
    result = extract(str(folder), out=args.out, backbone="mobilenet_v2", layers=["block4", "block5"],
                     progress=not args.quiet)
    print(result.summary())
    print()
    store = CodeStore(args.out)
    print(describe_store(store))
    print(f"\nRead it back: CodeStore({args.out!r}).codes('block5'), or h5py: f['codes/block5'][:]")
    train, test = split_store(store, test_size=0.25, random_state=0)
    print(f"\n1. split: {len(train)} photos to train on, {len(test)} held out (stratified by class, random_state 0)")
    model = fit(store, layer="block5", rows=train, random_state=0)
    save(model, args.model)
    print(f"2. fit: logistic regression on block5 codes, C={model.cnncodes_['fit']['C']:g}; wrote {args.model}")
    ev = evaluate(args.model, store)
    print(f"3. evaluate on the {ev.n} held-out photos: accuracy {ev.interval.format()}")
    print(f"   mean per-class accuracy {ev.mean_per_class.format()}")
    held_out = [str(Path(str(folder)) / rid) for rid in store.ids[test][:: max(1, len(test) // 2)][:2]]
    print("4. predict two held-out photos (as new photos: extracted with the model's own settings):")
    for p in predict(args.model, held_out, top_k=2, progress=False):
        print(f"   {p.id}: " + ", ".join(f"{lab} {prob:.3f}" for lab, prob in zip(p.labels, p.probabilities)))
    ev.to_html(args.report, title="cnncodes demo: the bundled flower photos")
    print(f"5. report: open {Path(args.report).resolve()} in a browser")
    return EXIT_FAILURES if result.failures else EXIT_OK


def _fit(args) -> int:
    from cnncodes._classify.fit import fit, split_store
    from cnncodes._models.model import evaluate, save
    from cnncodes._optional import require
    from cnncodes._outputs import MODEL, check_output
    from cnncodes._store.store import CodeStore

    layer = (args.layer[0] if len(args.layer) == 1 else list(args.layer)) if args.layer else None
    check_output(args.out, MODEL, option="-o")  # before fitting, not after
    require("skops.io", "writing the model file (-o)")
    store = CodeStore(args.store)
    try:
        C = args.C if args.C == "auto" else float(args.C)
    except ValueError:
        raise InvalidParameterError(f"--C must be 'auto' or a number, got {args.C!r}.") from None
    rows = None
    if args.test_size is not None:
        rows, test = split_store(store, test_size=args.test_size, random_state=args.random_state)
    model = fit(store, classifier=args.classifier, layer=layer, C=C, n_neighbors=args.n_neighbors,
                metric=args.metric, cv=args.cv, rows=rows, n_jobs=args.jobs, random_state=args.random_state,
                normalize=None if args.normalize == "none" else args.normalize, augment=args.augment)
    info, layer = model.cnncodes_["fit"], model.cnncodes_["layer"]
    layers = [layer] if isinstance(layer, str) else layer
    dims = sum(store.codes_shape(name)[1] for name in layers)
    line = f"fit {args.classifier} on {info['n_train']} rows of {store.path.name} ({'+'.join(layers)}, {dims} dims)"
    if info.get("n_augment"):
        line += f" and {info['n_augment']} mirror rows"
    if "C" in info:
        line += f", C={info['C']:g}"
        if "cv_scores" in info:
            cv_accuracy = info["cv_scores"][f"{info['C']:g}"]
            line += f" ({args.cv}-fold CV accuracy {cv_accuracy:.4f})"
    print(line + f"; {info['seconds']:.1f} s.")
    save(model, args.out)
    if args.test_size is not None:
        ev = evaluate(model, args.store)
        print(f"held-out accuracy {ev.interval.format()} on {ev.n} rows (test size {args.test_size}, "
              f"random_state {args.random_state}).")
    print(f"wrote {args.out}")
    return EXIT_OK


def _workers(args):
    """--workers as the library's num_workers: "auto" or a number."""
    try:
        return args.workers if args.workers == "auto" else int(args.workers)
    except ValueError:
        raise InvalidParameterError(f"--workers must be 'auto' or a number, got {args.workers!r}.") from None


def _weights(args):
    """--weights as the library's weights: None for random weights ("random", "none")."""
    return None if args.weights.lower() in ("random", "none") else args.weights


def _run_kwargs(args) -> dict:
    """The --batch-size, --device and --workers of predict and evaluate, as library keywords."""
    return dict(batch_size=args.batch_size, device=args.device, num_workers=_workers(args))


def _predict(args) -> int:
    import csv
    import io
    import warnings
    from pathlib import Path

    from cnncodes._errors import CnnCodesError
    from cnncodes._io import atomic_write
    from cnncodes._models.model import predict
    from cnncodes._outputs import PREDICTIONS, check_output

    if args.top_k < 1:
        raise InvalidParameterError(f"--top-k must be 1 or more, got {args.top_k}.")
    if args.csv:
        check_output(args.csv, PREDICTIONS, option="--csv")
        folder = Path(args.csv).parent
        if not folder.is_dir():  # before extracting, not after
            raise CnnCodesError(f"cannot write --csv {args.csv}: folder {str(folder)!r} does not exist. "
                                f"Create it first, or give a path in an existing folder.")
    images = args.images[0] if len(args.images) == 1 else args.images
    with warnings.catch_warnings():
        # A fine-tuned network also warns about unreadable photos; they are listed below.
        warnings.filterwarnings("ignore", message=r"\d+ images could not be read and are left out")
        preds = predict(args.model, images, top_k=args.top_k, store=args.store, progress=not args.quiet,
                        **_run_kwargs(args))
    for p in preds:
        print(p.id + "\t" + "\t".join(f"{lab} {prob:.3f}" for lab, prob in zip(p.labels, p.probabilities)))
    if preds.failures:
        print(f"cnncodes predict: {len(preds.failures)} of {len(preds) + len(preds.failures)} photos failed "
              f"and have no prediction:", file=sys.stderr)
        for rid, why in preds.failures:
            print(f"  {rid}: {why}", file=sys.stderr)
    if args.csv:
        width = 2 * args.top_k
        text = io.StringIO(newline="")
        w = csv.writer(text)
        w.writerow(["id"] + [f"{c}{k + 1}" for k in range(args.top_k) for c in ("label", "probability")]
                   + ["status"])
        for p in preds:
            row = [v for pair in zip(p.labels, p.probabilities) for v in pair]
            w.writerow([p.id] + row + [""] * (width - len(row)) + ["ok"])
        for rid, why in preds.failures:
            w.writerow([rid] + [""] * width + [why])
        with atomic_write(args.csv) as fh:  # a reader sees the old file or the whole new one
            fh.write(text.getvalue().encode())
        print(f"wrote {args.csv}")
    return EXIT_FAILURES if preds.failures else EXIT_OK


def _evaluate(args) -> int:
    from cnncodes._models.model import evaluate

    if args.plot:
        _check_plot(args.plot)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        ev = evaluate(args.model, args.data, progress=not args.quiet, **_interval_kwargs(args),
                      **_run_kwargs(args))
    for w in caught:  # e.g. rows of classes the model never saw, left out
        print(f"cnncodes evaluate: warning: {w.message}", file=sys.stderr)
    print(ev.summary())
    if args.plot:
        print(f"wrote {ev.plot(args.plot)}")
    return EXIT_OK


def _interval_kwargs(args) -> dict:
    return dict(n_resamples=args.n_resamples, random_state=args.seed)


def _check_plot(path) -> None:
    """Refuse --plot before any work: a file of another kind there, or matplotlib missing."""
    from cnncodes._optional import require_pyplot
    from cnncodes._outputs import PNG, check_output

    check_output(path, PNG, option="--plot")
    require_pyplot("--plot")


def _compare(args) -> int:
    from cnncodes._models.model import compare

    result = compare(args.model_a, args.model_b, args.data, progress=not args.quiet, **_interval_kwargs(args),
                     **_run_kwargs(args))
    print(result.summary())
    return EXIT_OK


def _curve(args) -> int:
    from cnncodes._analysis.curve import learning_curve, parse_sizes

    if args.plot:
        _check_plot(args.plot)
    if args.layer and len(args.layer) > 1:
        from cnncodes._errors import CnnCodesError

        raise CnnCodesError(f"--layer: a learning curve uses one layer, got {', '.join(args.layer)}.")
    curve = learning_curve(args.store, parse_sizes(args.sizes), repeats=args.repeats,
                           layer=args.layer[0] if args.layer else None, test_size=args.test_size,
                           random_state=args.random_state, n_resamples=args.n_resamples, n_jobs=args.jobs)
    print(curve.table())
    print(f"{curve.seconds:.1f} s.")
    if args.plot:
        print(f"wrote {curve.plot(args.plot)}")
    return EXIT_OK


def _report(args) -> int:
    from cnncodes._analysis.report import report

    ev = report(args.model, args.data, args.out, curve=args.curve, sweep=args.sweep, thumbnails=args.thumbnails,
                progress=not args.quiet, **_interval_kwargs(args), **_run_kwargs(args))
    print(f"accuracy {ev.interval.format()} on {ev.n} images ({ev.on})")
    print(f"wrote {args.out}")
    return EXIT_OK


def _finetune(args) -> int:
    from cnncodes._finetune import finetune

    result = finetune(
        args.data, out=args.out, backbone=args.backbone,
        weights=_weights(args),
        unfreeze=args.unfreeze, epochs=args.epochs, lr=args.lr, head_lr=args.head_lr,
        weight_decay=args.weight_decay, batch_size=args.batch_size, augment=args.augment,
        dropout=args.dropout, train_bn=args.train_bn, label_smoothing=args.label_smoothing, tta=args.tta,
        val_fraction=args.val_fraction,
        early_stopping=args.patience if args.patience and args.val_fraction else None,
        target_accuracy=args.target_accuracy, test_size=args.test_size or None,
        random_state=args.random_state, init_head=args.init_head, image_size=args.image_size,
        resume=not args.restart, precision=args.precision, device=args.device,
        num_workers=_workers(args), n_jobs=args.jobs,
        progress=not args.quiet,
    )
    print(result.summary())
    return EXIT_FAILURES if result.failures else EXIT_OK


def _sweep(args) -> int:
    from cnncodes._analysis.sweep import sweep

    result = sweep(
        args.data, backbone=args.backbone, layers=args.layers, store=args.store, cv=args.cv,
        classifier=args.classifier, random_state=args.random_state, max_images=args.max_images,
        weights=_weights(args),
        image_size=args.image_size, batch_size=args.batch_size, device=args.device,
        num_workers=_workers(args),
        n_jobs=args.jobs, plot=args.plot, progress=not args.quiet,
    )
    if result.extract is not None:
        print(result.extract.summary().splitlines()[0])
    print(result.table())
    print(f"{result.seconds:.1f} s in all ({result.probe_seconds:.1f} s probing).")
    if args.store is None and result.extract is not None:
        print("The codes were in a temporary store; pass --store codes.h5 to keep them for `cnncodes fit`.")
    if args.plot:
        print(f"wrote {args.plot}")
    return EXIT_OK


def _advise(args) -> int:
    from cnncodes._analysis.advise import advise
    from cnncodes._errors import CnnCodesError

    if args.out and not args.run:
        raise CnnCodesError("-o/--out names the model that --run writes; add --run, or drop -o.")
    if args.out:
        from pathlib import Path

        from cnncodes._outputs import CHECKPOINT, MODEL, check_output

        check_output(args.out, CHECKPOINT if Path(args.out).suffix.lower() in (".pt", ".pth") else MODEL,
                     option="-o")
    advice = advise(
        args.data, backbone=args.backbone, store=args.store, cv=args.cv,
        max_images=args.max_images or None, head_images=args.head_images,
        weights=_weights(args),
        image_size=args.image_size, batch_size=args.batch_size, device=args.device,
        num_workers=_workers(args),
        random_state=args.random_state, n_jobs=args.jobs, progress=not args.quiet,
    )
    print(advice.report())
    if args.run:
        print(f"\nRunning the recommendation ({advice.recommendation.strategy}):")
        done = advice.run(args.out, progress=not args.quiet, n_jobs=args.jobs)
        print(done.summary)
    return EXIT_OK


def _export(args) -> int:
    import warnings

    from cnncodes._models.export import export

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        path = export(args.model, args.out, format=args.format, opset=args.opset)
    for w in (w for w in caught if issubclass(w.category, UserWarning)):
        # e.g. codes extracted in bfloat16: the float32 export differs by their rounding
        print(f"cnncodes export: warning: {w.message}", file=sys.stderr)
    print(f"wrote {path}")
    return EXIT_OK


def _serve(args) -> int:
    from cnncodes._models.serve import serve

    if args.max_batch < 1 or args.window_ms < 0 or args.max_upload_mb <= 0:
        raise InvalidParameterError("--max-batch must be >= 1, --window-ms >= 0 and --max-upload-mb > 0.")

    def ready(url):
        print(f"cnncodes serve: {args.model} on {url} (POST /predict, GET /health); Ctrl-C to stop.", flush=True)

    serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch, window_ms=args.window_ms,
          max_upload_mb=args.max_upload_mb, threads=args.threads, log_level="warning", ready=ready)
    return EXIT_OK


def _unrecognized(parser, args, extras) -> None:
    """Refuse arguments a command does not know, with its usage and a near option (exits 2)."""
    command_parser = parser.commands.get(args.command, parser)
    known = list(command_parser._option_string_actions)
    hints = []
    for arg in extras:
        if arg.startswith("-"):
            close = difflib.get_close_matches(arg.split("=", 1)[0], known, n=1)
            hints += [f"did you mean {close[0]}?"] if close else []
    command_parser.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else ""))


HANDLERS = {"extract": _extract, "backbones": _backbones, "layers": _layers, "info": _info, "check": _check,
            "demo": _demo, "fit": _fit, "predict": _predict, "evaluate": _evaluate, "compare": _compare,
            "curve": _curve, "report": _report,
            "sweep": _sweep, "advise": _advise, "finetune": _finetune,
            "export": _export, "serve": _serve}


def main(argv=None) -> int:
    from cnncodes._errors import CnnCodesError

    parser = _parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        _unrecognized(parser, args, extras)
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
    except BrokenPipeError:
        # The reader of our output went away (`cnncodes info s.h5 | head -2`): what was to be
        # done is done; say nothing more, and keep the interpreter's final flush quiet too.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_SIGPIPE
