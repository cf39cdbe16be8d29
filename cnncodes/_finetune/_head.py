"""The head's initialisation from a linear probe on codes: the two-stage recipe of fine-tuning."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from cnncodes._errors import CnnCodesError
from cnncodes._spec import ExtractorSpec


def head_from_logreg(estimator, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of a linear layer giving the logits of a fitted logistic regression.

    `estimator` is a ``LogisticRegression`` or a ``Pipeline`` of an optional
    ``StandardScaler`` and a ``LogisticRegression`` (as :func:`cnncodes.fit` makes). The
    scaler is folded into the weights, ``W' = W / s`` and ``b' = b - W (m / s)``, so the layer
    reads raw codes; a binary model's single row becomes the two rows ``(0, w)``. The rows
    follow `classes`; every class must be one of the estimator's.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    steps = list(estimator.named_steps.values()) if isinstance(estimator, Pipeline) else [estimator]
    *pre, last = steps
    if not isinstance(last, LogisticRegression) or not all(isinstance(s, StandardScaler) for s in pre) \
            or len(pre) > 1:
        names = " -> ".join(type(s).__name__ for s in steps)
        raise CnnCodesError(f"init_head needs a logistic regression (optionally after a StandardScaler), "
                            f"got {names}. Fit one with cnncodes.fit(..., classifier='logreg').")
    if not hasattr(last, "coef_"):
        raise CnnCodesError("init_head got an unfitted LogisticRegression; fit it first.")
    coef = np.asarray(last.coef_, dtype=np.float64)
    intercept = np.asarray(last.intercept_, dtype=np.float64)
    if coef.shape[0] == 1:  # binary: p(class 1) = sigmoid(w.x + b) = softmax([0, w.x + b])[1]
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    if pre:
        scaler = pre[0]
        mean = scaler.mean_ if scaler.with_mean else np.zeros(coef.shape[1])
        scale = scaler.scale_ if scaler.with_std else np.ones(coef.shape[1])
        intercept = intercept - coef @ (mean / scale)
        coef = coef / scale
    known = [str(c) for c in last.classes_]
    missing = [c for c in classes if c not in known]
    if missing:
        raise CnnCodesError(f"init_head was fitted on classes {known}; it lacks {missing}. Fit it on "
                            f"codes of the same classes.")
    rows = [known.index(c) for c in classes]
    return (torch.tensor(coef[rows], dtype=torch.float32), torch.tensor(intercept[rows], dtype=torch.float32))


def _head_input_is_pooled_default(spec) -> bool:
    # The avg-pooled pre-logits layer is exactly the classifier's input, except in ConvNeXt,
    # whose classifier normalises the pooled features (LayerNorm2d) before its Linear.
    return spec.name != "convnext_tiny"


def describe_init(init_head) -> str | None:
    """How the run records `init_head` in its settings: a resolved path, a type name or None."""
    if init_head is None:
        return None
    if isinstance(init_head, (str, os.PathLike)):
        return str(Path(init_head).resolve())
    return type(init_head).__name__


def initialise_head(run, init_head, n_jobs) -> None:
    """Set the head of `run`'s network to the linear probe `init_head` gives, and record where it came from."""
    data = run.data
    test_shas = {data.shas[r] for r in data.test_rows}
    estimator, run.init_record = _probe(init_head, run.spec, run.weights, data, test_shas, n_jobs)
    W, b = head_from_logreg(estimator, data.classes)
    with torch.no_grad():
        run.model.head_linear().weight.copy_(W)
        run.model.head_linear().bias.copy_(b)


def _probe(init_head, spec, weights, data, test_shas, n_jobs):
    """The logistic regression for the head: fitted on a store's codes, or given; and a record."""
    if not _head_input_is_pooled_default(spec):
        raise CnnCodesError(f"init_head is not available for {spec.name}: its classifier normalises the "
                            f"pooled codes first, so a linear probe on codes does not map onto it. "
                            f"Fine-tune with init_head=None.")
    if isinstance(init_head, (str, os.PathLike)) and Path(init_head).suffix.lower() in (".h5", ".hdf5"):
        return _probe_on_store(init_head, spec, weights, data, n_jobs)
    return _given_probe(init_head, spec, weights, test_shas)


def _probe_on_store(path, spec, weights, data, n_jobs):
    """A logistic regression fitted on the pre-logits codes of the training images in a store."""
    from cnncodes._classify.fit import fit
    from cnncodes._store.store import CodeStore

    layer, prep = spec.layer(spec.default_layer), data.prep
    store = CodeStore(path)
    s = store.spec
    node = s.find_layer(layer.node)
    problems = []
    if s.backbone != spec.name:
        problems.append(f"backbone {s.backbone} (fine-tuning {spec.name})")
    if s.weights.sha256 != weights.sha256:
        problems.append(f"weights {s.weights.id} (fine-tuning from {weights.id})")
    if node is None:
        problems.append(f"no {layer.alias} ({layer.node}) codes, only {', '.join(s.layers)}")
    if s.pooling != "avg":
        problems.append(f"pooling {s.pooling} (the classifier reads avg-pooled codes)")
    p = s.preprocessing
    if (p.resize_size, p.crop_size, list(p.mean), list(p.std)) != (
            prep.resize_size, prep.crop_size, list(prep.mean), list(prep.std)):
        problems.append(f"preprocessing resize {p.resize_size}/crop {p.crop_size} (fine-tuning "
                        f"uses {prep.resize_size}/{prep.crop_size})")
    if problems:
        raise CnnCodesError(
            f"init_head store {store.path.name} does not match this fine-tuning: "
            + "; ".join(problems) + f". Extract it with `cnncodes extract DATA --backbone {spec.name} "
            f"--layer {layer.alias} -o codes.h5` (avg pooling, the weights' own image size).")
    wanted = {data.shas[r]: data.y[r] for r in data.train_rows}
    rows = np.array([r for r, h in enumerate(store.sha256) if h in wanted], dtype=int)
    if len(rows) == 0:
        raise CnnCodesError(f"init_head store {store.path.name} holds none of the training images. "
                            f"Extract the same images into it first.")
    y = np.array([data.classes[wanted[h]] for h in store.sha256[rows]])
    present = set(y)
    if len(present) < len(data.classes):
        raise CnnCodesError(f"init_head store {store.path.name} has no training images of "
                            f"{sorted(set(data.classes) - present)}. Extract the same images into it.")
    model = fit(store.codes(node)[rows], y, classifier="logreg", n_jobs=n_jobs)
    info = model.cnncodes_["fit"]
    return model, {"source": store.path.name, "kind": "store", "C": info["C"], "n_rows": int(len(rows)),
                   "seconds": float(info["seconds"])}


def _given_probe(init_head, spec, weights, test_shas):
    """A fitted estimator or a model file from `cnncodes fit`, checked against this fine-tuning."""
    from cnncodes._models.model import Model, load as load_model_file

    layer = spec.layer(spec.default_layer)
    if isinstance(init_head, (str, os.PathLike)):
        init_head = load_model_file(init_head)
    if isinstance(init_head, Model):
        estimator, extractor, seen, source = (init_head.estimator, init_head.extractor,
                                              init_head.train_sha256, Path(init_head.path).name)
    else:
        meta = getattr(init_head, "cnncodes_", {}) or {}
        estimator, extractor, seen, source = (init_head, meta.get("extractor"), meta.get("train_sha256"),
                                              type(init_head).__name__)
    if extractor:
        extractor = ExtractorSpec.from_json(extractor)  # a dict when the estimator carries it
        if extractor.backbone != spec.name or list(extractor.layers.values()) != [layer.node] \
                or extractor.pooling != "avg" or extractor.weights.sha256 != weights.sha256:
            raise CnnCodesError(
                f"init_head model {source} was fitted on {extractor.backbone} "
                f"{'/'.join(extractor.layers.values())} {extractor.pooling}-pooled codes of weights "
                f"{extractor.weights.id}; the head of {spec.name} reads avg-pooled {layer.alias} "
                f"({layer.node}) codes of {weights.id}. Fit it on such codes.")
    if seen and test_shas & set(seen):
        raise CnnCodesError(
            f"init_head model {source} was trained on {len(test_shas & set(seen))} of the held-out test "
            f"images, so the test accuracy would not be a held-out one. Fit it on the training split "
            f"(cnncodes fit --test-size with the same test_size and random_state), or pass test_size=None.")
    C = getattr(estimator[-1] if hasattr(estimator, "steps") else estimator, "C", float("nan"))
    rows = len(seen) if seen else 0
    return estimator, {"source": source, "kind": "model", "C": float(C), "n_rows": rows, "seconds": 0.0}
