"""One deployable network from a fitted model: uint8 pixels in, class probabilities out (ONNX, TorchScript)."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnncodes._choices import FORMATS
from cnncodes._errors import ExportError, InvalidParameterError
from cnncodes._io import atomic_write, file_sha256
from cnncodes._outputs import EXPORT, check_output

EXPORT_FORMAT = "cnncodes.exported"
EXPORT_VERSION = 1
METADATA_KEY = "cnncodes"  # the ONNX metadata_props key / TorchScript extra file holding the JSON
INPUT_NAME, OUTPUT_NAME = "pixels", "probabilities"


# --------------------------------------------------------------------------- the head


def _linear(scaler, coef, intercept) -> tuple[np.ndarray, np.ndarray]:
    """``coef @ scaler.transform(x) + intercept`` as one affine map of `x` (float64)."""
    coef, intercept = np.atleast_2d(np.asarray(coef, dtype=np.float64)), np.asarray(intercept, dtype=np.float64)
    if scaler is None:
        return coef, intercept.reshape(-1)
    scale = np.ones(coef.shape[1]) if scaler.scale_ is None else np.asarray(scaler.scale_, dtype=np.float64)
    mean = np.zeros(coef.shape[1]) if scaler.mean_ is None else np.asarray(scaler.mean_, dtype=np.float64)
    weight = coef / scale
    return weight, intercept.reshape(-1) - weight @ mean


class ProbaHead(nn.Module):
    """A linear classifier's ``predict_proba`` as torch operations, scaler folded in.

    ``kind`` is how scikit-learn turns the decision values ``z = W x + b`` of ``members``
    stacked linear maps into probabilities: ``"softmax"`` (multinomial logistic regression),
    ``"ovr"`` (one sigmoid per class, normalised: SGD's log loss), ``"sigmoid"`` (Platt
    calibration ``1 / (1 + exp(a z + c))`` per class, normalised, averaged over the
    calibrated members). With one decision column (two classes) the column is the second
    class's and the first gets one minus its probability.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray, kind: str, n_classes: int,
                 a: np.ndarray | None = None, c: np.ndarray | None = None):
        super().__init__()
        self.kind, self.n_classes, self.columns = kind, n_classes, int(np.shape(bias)[1])
        # weight (members, columns, features); bias, a, c (members, columns)
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float32))
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32))
        ones = np.ones_like(bias)
        self.register_buffer("a", torch.as_tensor(ones if a is None else a, dtype=torch.float32))
        self.register_buffer("c", torch.as_tensor(0 * ones if c is None else c, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("nf,mkf->nmk", x, self.weight) + self.bias  # (n, members, columns)
        if self.kind == "softmax" and self.columns > 1:
            return torch.softmax(z, dim=2).mean(dim=1)
        if self.kind == "sigmoid":
            p = torch.sigmoid(-(self.a * z + self.c))
        else:  # "ovr", and binary logistic regression
            p = torch.sigmoid(z)
        if self.columns == 1:
            p = torch.cat([1 - p, p], dim=2)
        else:
            total = p.sum(dim=2, keepdim=True)
            uniform = torch.full_like(p, 1.0 / self.n_classes)
            # scikit-learn's calibration falls back to uniform where every class got 0
            p = torch.where(total > 0, p / total.clamp_min(1e-38), uniform) if self.kind == "sigmoid" else p / total
        return p.mean(dim=1)


def head_of(estimator) -> ProbaHead:
    """The `ProbaHead` of a fitted scikit-learn pipeline or classifier, or ExportError saying why not."""
    from sklearn.pipeline import Pipeline

    steps = list(estimator.named_steps.values()) if isinstance(estimator, Pipeline) else [estimator]
    scaler = None
    if len(steps) == 2 and type(steps[0]).__name__ == "StandardScaler":
        scaler = steps[0]
    elif len(steps) != 1:
        raise ExportError(f"cannot export a pipeline of {', '.join(type(s).__name__ for s in steps)}: "
                          f"only a StandardScaler then a linear classifier folds into one network.")
    clf, name = steps[-1], type(steps[-1]).__name__
    n_classes = len(clf.classes_)
    if name == "LogisticRegression":
        w, b = _linear(scaler, clf.coef_, clf.intercept_)
        return ProbaHead(w[None], b[None], "softmax", n_classes)
    if name == "SGDClassifier" and clf.loss == "log_loss":
        w, b = _linear(scaler, clf.coef_, clf.intercept_)
        return ProbaHead(w[None], b[None], "ovr", n_classes)
    if name == "CalibratedClassifierCV":
        return _calibrated_head(clf, scaler, n_classes)
    if name == "FaissKNNClassifier":
        raise ExportError("cannot export a kNN model as one network: its prediction searches the training "
                          "codes (a faiss index), which no ONNX operator does. Fit a linear model "
                          "(--classifier logreg or linear_svm) to export, or serve the .skops file.")
    raise ExportError(f"cannot export a {name} head: cnncodes exports logistic regression, SGD with log loss "
                      f"and the calibrated linear SVM. Refit with one of them (--classifier logreg).")


def _calibrated_head(clf, scaler, n_classes: int) -> ProbaHead:
    ws, bs, as_, cs = [], [], [], []
    for member in clf.calibrated_classifiers_:
        inner = member.estimator
        if member.method != "sigmoid" or not hasattr(inner, "coef_"):
            raise ExportError(f"cannot export a calibrated {type(inner).__name__} with method "
                              f"{member.method!r}: only sigmoid (Platt) calibration of a linear model "
                              f"exports. Refit with --classifier logreg or linear_svm.")
        if len(inner.classes_) != n_classes:
            raise ExportError("cannot export this calibrated SVM: one of its cross-validation members saw "
                              "fewer classes than the model. Refit it with more images per class.")
        w, b = _linear(scaler, inner.coef_, inner.intercept_)
        ws.append(w), bs.append(b)
        as_.append([cal.a_ for cal in member.calibrators]), cs.append([cal.b_ for cal in member.calibrators])
    return ProbaHead(np.stack(ws), np.stack(bs), "sigmoid", n_classes, np.array(as_), np.array(cs))


# --------------------------------------------------------------------------- the network


class Normalize(nn.Module):
    """uint8 NCHW -> float NCHW, as ``Preprocess.normalize`` computes it (x / 255 - mean) / std."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.float() / 255.0 - self.mean) / self.std


class CodesNet(nn.Module):
    """Pixels -> normalised -> codes of one layer (pooled, mirror-averaged for flip TTA) -> head."""

    def __init__(self, normalize: Normalize, codes: nn.Module, alias: str, head: nn.Module, *,
                 tta: str = "none", dtype: str = "float32"):
        super().__init__()
        self.normalize, self.codes, self.head = normalize, codes, head
        self.alias, self.flip, self.float16 = alias, tta == "flip", dtype == "float16"

    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        return self.codes(x)[self.alias]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.normalize(pixels)
        codes = self._codes(x)
        if self.flip:
            codes = (codes + self._codes(x.flip(3))) / 2
        if self.float16:  # the model was fitted on codes stored in float16: round them the same way
            codes = codes.half().float()
        return self.head(codes)


class NetworkNet(nn.Module):
    """Pixels -> normalised -> a fine-tuned classifier network -> softmax (mirror-averaged for flip TTA)."""

    def __init__(self, normalize: Normalize, net: nn.Module, tta: str = "none"):
        super().__init__()
        self.normalize, self.net, self.flip = normalize, net, tta == "flip"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.normalize(pixels)
        p = torch.softmax(self.net(x).float(), dim=1)
        if self.flip:  # the mean of the two probabilities, as predict's log-mean-exp of log-softmaxes
            p = (p + torch.softmax(self.net(x.flip(3)).float(), dim=1)) / 2
        return p


def _prep_dict(prep) -> dict:
    keys = ("resize_size", "crop_size", "interpolation", "antialias", "mean", "std", "jpeg_draft", "resize")
    d = dict(prep)
    return {k: (list(d[k]) if k in ("mean", "std") else d[k]) for k in keys if k in d}


def build(model, *, codes_only: bool = False) -> tuple[nn.Module, dict]:
    """The exportable torch network of a fitted model (eval, CPU, float32) and its metadata dict.

    `model`: a model file path (``.skops`` or ``.pt``), a loaded `Model` / `FineTunedModel`,
    or a pipeline from :func:`cnncodes.fit`. With `codes_only` a model on codes gives the
    network up to its codes (the head left to its estimator: any classifier, kNN too).
    """
    from cnncodes import __version__
    from cnncodes._models.model import _as_model

    model = _as_model(model)
    if not model.reads_codes:  # a fine-tuned network: it gives the class scores itself
        from dataclasses import asdict

        prep = asdict(model.preprocessing)
        net = NetworkNet(Normalize(prep["mean"], prep["std"]), model.network().net, model.tta)
        sha = file_sha256(model.path) if model.path else ""
        info = {"backbone": model.backbone, "weights": "fine-tuned", "weights_sha256": sha, "layer": "logits",
                "classifier": "fine-tuned network", "tta": model.tta, "pooling": None}
    else:
        net, info, prep = _codes_network(model, codes_only)
    meta = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "classes": [str(c) for c in model.classes],
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW", "channels": "RGB",
                  "shape": ["batch", 3, prep["crop_size"], prep["crop_size"]],
                  "expects": "decoded RGB pixels already resized (shorter side to resize_size) and centre "
                             "cropped to crop_size; the network rescales to [0, 1] and normalises "
                             "with mean and std itself"},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", len(model.classes)],
                   "meaning": "class probabilities, columns in the order of classes"},
        "preprocessing": _prep_dict(prep),
        "provenance": {**info, "cnncodes_version": __version__, "torch_version": torch.__version__,
                       "source": Path(getattr(model, "path", "") or "").name},
    }
    return net.eval().requires_grad_(False), meta


def _codes_network(model, codes_only: bool = False) -> tuple[nn.Module, dict, dict]:
    from cnncodes._backbones.registry import get_backbone
    from cnncodes._backbones.codes_model import CodesModel
    from cnncodes._backbones.weights import load_model, resolve

    spec = model.extractor
    if spec is None:
        raise ExportError("this model was fitted on arrays, not on a code store, so it has no backbone to "
                          "export; fit it from a store made by `cnncodes extract`.")
    head = nn.Identity() if codes_only else head_of(model.estimator)  # refuse a kNN before loading a backbone
    if len(spec.layers) != 1:
        raise ExportError(f"cannot export a model on several layers ({', '.join(spec.layers)}) yet: export "
                          f"reads one layer. Fit on one layer (--layer block5) to export, or serve the .skops file.")
    (alias, node), = spec.layers.items()
    spec_b = get_backbone(spec.backbone)
    w = resolve(spec_b, spec.weights.extract_arg())
    if spec.weights.sha256 and w.sha256 != spec.weights.sha256:
        raise ExportError(f"the weights found for {spec.backbone} ({w.path}, sha256 {w.sha256[:12]}) are not "
                          f"those the model was fitted with (sha256 {spec.weights.sha256[:12]}). Put the "
                          f"model's checkpoint where cnncodes finds it (CNNCODES_WEIGHTS_PATH).")
    # The export computes in float32; the codes network alone (for serve) in the arithmetic the
    # model's codes were extracted with, as predict extracts them.
    precision = spec.precision if codes_only and spec.precision in ("bfloat16", "float16") else "float32"
    codes = CodesModel(load_model(spec_b, w), {node: alias}, spec.pooling, precision=precision,
                       float32_until=spec_b.layers[0].node)
    prep = spec.preprocessing
    net = CodesNet(Normalize(prep.mean, prep.std), codes, alias, head, tta=spec.tta, dtype=spec.dtype)
    fit = getattr(model, "fit", None) or {}
    info = {"backbone": spec.backbone, "weights": spec.weights.id, "weights_sha256": spec.weights.sha256,
            "layer": alias, "node": node, "pooling": spec.pooling, "tta": spec.tta,
            "codes_dtype": spec.dtype, "codes_precision": spec.precision,
            "classifier": fit.get("classifier") or type(model.estimator).__name__}
    return net, info, prep


# --------------------------------------------------------------------------- files


def _need(module: str):
    from cnncodes._optional import require

    return require(module, "exporting to ONNX")


def export(model, path, *, format: str | None = None, opset: int = 17) -> Path:
    """Write a fitted model as one network: uint8 RGB pixels in, class probabilities out.

    The network holds the backbone cut at the model's layer (BatchNorm folded), its pooling
    (and the mirror-image average of ``tta="flip"``), the normalisation by the weights'
    mean and std, the ``StandardScaler`` folded into the linear layer, and the classifier's
    own probability function (softmax, or the Platt calibration of a linear SVM). Its
    metadata (JSON under the key ``"cnncodes"``) holds the class names, the preprocessing
    to apply before it (decode, resize the shorter side, centre crop) and the provenance.

    Parameters
    ----------
    model : path, Model, FineTunedModel or fitted pipeline
        A ``.skops`` model (logistic regression, SGD, calibrated linear SVM) or a ``.pt``
        network from :func:`cnncodes.finetune`. kNN models are refused (the index search is
        not a network).
    path : path
        The file to write (``.onnx`` or ``.pt`` / ``.ts``).
    format : {"onnx", "torchscript"}, optional
        By default from the suffix of `path` (``.onnx`` is ONNX, anything else TorchScript).
    opset : int
        ONNX opset.

    Returns
    -------
    Path
        The file written. Its input ``pixels`` is uint8 ``(batch, 3, crop, crop)``, the batch
        size dynamic; its output ``probabilities`` float32 ``(batch, n_classes)``.

    Examples
    --------
    >>> export("model.skops", "model.onnx")                       # doctest: +SKIP
    >>> import onnxruntime as ort                                 # doctest: +SKIP
    >>> ort.InferenceSession("model.onnx").run(None, {"pixels": x})  # doctest: +SKIP
    """
    path = Path(path)
    format = format or ("onnx" if path.suffix.lower() == ".onnx" else "torchscript")
    if format not in FORMATS:
        raise InvalidParameterError(f"unknown export format {format!r}. Valid formats: {', '.join(FORMATS)}.")
    check_output(path, EXPORT)
    if format == "onnx":
        onnx = _need("onnx")
    net, meta = build(model)
    precision = meta["provenance"].get("codes_precision")
    if precision in ("bfloat16", "float16"):
        warnings.warn(
            f"the model's codes were extracted in {precision}; the export computes in float32, so its "
            f"probabilities differ from predict's by that rounding (up to ~4e-2 on flowers5). For an exact "
            f"export, fit on a store extracted with --precision float32.", UserWarning, stacklevel=2)
    size = meta["input"]["shape"][2]
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(meta, sort_keys=True)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # torch.jit says it is deprecated in favour of torch.export, whose files no runtime
        # without torch loads: TorchScript stays the format a C++ or mobile runtime reads.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        # The TorchScript-based ONNX exporter, chosen (dynamo=False): it needs no onnxscript and
        # exports this plain feed-forward graph exactly; torch warns that it is the legacy one.
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="The feature will be removed")  # inside that exporter
        if format == "torchscript":
            traced = torch.jit.trace(net, example, check_trace=False)
            with atomic_write(path) as fh:
                torch.jit.save(traced, fh, _extra_files={METADATA_KEY + ".json": text})
            return path
        graph = io.BytesIO()
        torch.onnx.export(net, (example,), graph, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=opset, dynamo=False)
    proto = onnx.load_model_from_string(graph.getvalue())
    proto.metadata_props.add(key=METADATA_KEY, value=text)
    proto.producer_name, proto.doc_string = "cnncodes", f"{meta['provenance']['backbone']} -> class probabilities"
    with atomic_write(path) as fh:
        fh.write(proto.SerializeToString())  # what onnx.save writes (no external data: the network is small)
    return path
