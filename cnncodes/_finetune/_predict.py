"""A fine-tuned checkpoint as a model: it classifies photos with the network itself (predict, evaluate)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from cnncodes._extract.accel import resolve_device, resolve_precision
from cnncodes._backbones.registry import build_model, finish_model, get_backbone
from cnncodes._errors import CnnCodesError, WeightsError
from cnncodes._input.images import Preprocess
from cnncodes._io import top_k as top_k_columns
from cnncodes._models.results import Evaluation, PhotoModel, Prediction, Predictions, all_failed_error, evaluation
from cnncodes._input.sources import Source, hash_item, read_source
from cnncodes._stats import CONFIDENCE, N_RESAMPLES
from ._checkpoint import read_checkpoint
from ._data import image_loader, progress_bar, workers_for
from ._network import FineTuneNet, predict_logits, replace_head


class FineTunedModel(PhotoModel):
    """A loaded fine-tuned checkpoint: classify photos with the network itself.

    Made by :func:`cnncodes.load` for a ``.pt`` file from :func:`finetune`; accepted by
    :func:`cnncodes.predict` and :func:`cnncodes.evaluate`.
    """

    reads_codes = False  # the network gives the class scores itself

    def __init__(self, path, ckpt: dict):
        self.path = str(path)
        self.backbone = ckpt["backbone"]
        self.classes = [str(c) for c in ckpt["classes"]]
        self.preprocessing = Preprocess(**{**ckpt["preprocessing"], "mean": tuple(ckpt["preprocessing"]["mean"]),
                                           "std": tuple(ckpt["preprocessing"]["std"])})
        self.train_sha256 = list(ckpt.get("train_sha256") or [])
        self.tta = ckpt.get("tta", "none")
        self.meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
        self._state = ckpt["state_dict"]
        self._net = None

    def __repr__(self) -> str:
        return f"FineTunedModel({self.path!r}, backbone={self.backbone!r}, classes={self.classes})"

    def network(self) -> FineTuneNet:
        """The fine-tuned torch module (eval mode, CPU), built once."""
        if self._net is None:
            spec = get_backbone(self.backbone)
            net = finish_model(spec, build_model(spec, pretrained=True))
            head = replace_head(net, len(self.classes), 0.0)
            try:
                net.load_state_dict(self._state)
            except RuntimeError as exc:
                raise WeightsError(f"{self.path} does not fit {self.backbone} with a {len(self.classes)}-class "
                                   f"head: {exc}. The file is damaged or was edited; fine-tune again.") from None
            self._net = FineTuneNet(net, head, []).eval()
        return self._net

    def predict_images(self, images, *, batch_size: int = 32, device="auto", precision: str = "auto",
                       num_workers="auto", progress: bool = False, labels=None, root=None, tta=None):
        """Class probabilities of images.

        ``precision="auto"`` is float32 for a network trained in float32, else the fastest
        precision of this device (as for training); `tta` is the checkpoint's unless given.

        Returns
        -------
        items : list of Item
            The images that were read, in the order of `proba`.
        proba : ndarray of shape (n, n_classes)
        sha256 : list of str
        failures : list of (id, reason)
        """
        src = read_source(images, labels, root=root)
        dev = resolve_device(device)
        if precision == "auto" and self.meta.get("precision") == "float32":
            precision = "float32"  # as trained: the scores repeat those of the training run
        precision = resolve_precision(precision, dev)
        channels_last = dev.type == "cpu" and precision == "bfloat16"
        net = self.network().to(dev)
        if channels_last:
            net.to(memory_format=torch.channels_last)
        workers = workers_for(num_workers, len(src.items), batch_size)
        loader = image_loader(src.items, self.preprocessing, batch_size, workers, device=dev,
                              storage_options=src.storage_options)
        bar = progress_bar(progress, len(src.items), "predict")
        idx, logits, shas, failed = predict_logits(net, loader, self.preprocessing, dev, precision, channels_last,
                                                   bar, tta=tta or self.tta)
        failures = [(src.items[i].id, why) for i, _, why in failed]
        proba = torch.softmax(logits, dim=1).numpy() if len(idx) else np.zeros((0, len(self.classes)))
        return [src.items[i] for i in idx], proba, shas, failures

    def predict_photos(self, images, *, top_k: int = 1, store=None, progress: bool = False,
                       **run) -> Predictions:
        """Top-k labels of photos by the network (see :func:`cnncodes.predict`); it needs no store."""
        if store is not None:
            raise CnnCodesError("store= is for models on codes; a fine-tuned network classifies the photos "
                                "directly. Leave store out.")
        items, proba, _, failures = self.predict_images(images, progress=progress, **run)
        if failures and not items:
            raise all_failed_error(failures)
        _warn_left_out(failures)
        classes = np.asarray(self.classes)
        order = top_k_columns(proba, top_k)
        return Predictions([Prediction(item.id, [str(c) for c in classes[o]], [float(p) for p in proba[i, o]])
                            for i, (item, o) in enumerate(zip(items, order))], failures)

    def evaluate(self, data, *, progress: bool = False, n_resamples: int = N_RESAMPLES,
                 confidence: float = CONFIDENCE, random_state=0, **run) -> Evaluation:
        """Accuracy of the network on a labelled folder, leaving out its training content.

        `run`: batch_size, device, num_workers of :meth:`predict_images`; `n_resamples`,
        `confidence`, `random_state`: the intervals, as in :func:`cnncodes.evaluate`.
        """
        path = Path(data)
        if path.is_file() and path.suffix.lower() in (".h5", ".hdf5"):
            raise CnnCodesError(f"{Path(self.path).name} is a fine-tuned network: it classifies images, not "
                                f"codes. Evaluate it on a labelled folder (one subfolder per class) or a CSV.")
        src = read_source(data)
        labelled = [it for it in src.items if it.label is not None]
        on = f"all labelled images of {path}"
        if self.train_sha256:
            # Hash first and run the network on the held-out images only: on the training folder
            # that is a quarter of the work. An unreadable file stays in and is reported below.
            from concurrent.futures import ThreadPoolExecutor

            seen = set(self.train_sha256)
            with ThreadPoolExecutor(max_workers=8) as pool:
                hashes = [sha for sha, _ in pool.map(hash_item, labelled)]
            held = [it for it, h in zip(labelled, hashes) if h not in seen]
            if len(held) < len(labelled):
                on = f"{len(held)} held-out images of {path} (content not used in training)"
            labelled = held
        if not labelled:
            raise CnnCodesError(f"nothing to evaluate in {path}: no labelled images outside the training set.")
        subset = Source(src.root, labelled, src.kind, remote=src.remote, storage_options=src.storage_options)
        items, proba, _, failures = self.predict_images(subset, progress=progress, **run)
        _warn_left_out(failures)
        if not items:
            raise CnnCodesError(f"nothing to evaluate in {path}: none of its held-out images could be read.")
        y = np.array([it.label for it in items], dtype=str)
        pred = np.asarray(self.classes)[proba.argmax(1)]
        return evaluation(y, pred, self.classes, on, ids=[it.id for it in items], proba=proba,
                          proba_classes=list(self.classes), root=src.root,
                          provenance={"model": Path(self.path).name, "model file": str(self.path)},
                          n_resamples=n_resamples, confidence=confidence, random_state=random_state)


def _warn_left_out(failures) -> None:
    if failures:
        # stacklevel 4: the caller of cnncodes.predict / evaluate (through it and this method)
        warnings.warn(f"{len(failures)} images could not be read and are left out: "
                      + "; ".join(f"{i} ({why})" for i, why in failures[:5]), stacklevel=4)


def load_finetuned(path) -> FineTunedModel:
    """Read a fine-tuned checkpoint for prediction (``torch.load(weights_only=True)``)."""
    return FineTunedModel(path, read_checkpoint(path))
