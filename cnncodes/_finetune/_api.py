"""`finetune`: the run as a sequence of named phases (settings, data, network, head, training, checkpoint)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cnncodes._extract.accel import resolve_device, resolve_precision
from cnncodes._backbones.registry import get_backbone, weights_enum
from cnncodes._choices import DEFAULT_BACKBONE
from cnncodes._choices import FINETUNE_TTAS as TTAS
from cnncodes._errors import InvalidParameterError
from cnncodes._input.images import DEFAULT_MAX_PIXELS, Preprocess
from cnncodes._outputs import CHECKPOINT, check_output
from cnncodes._backbones.weights import IMAGENET, resolve
from . import _loop
from ._checkpoint import STATE_SUFFIX, finished_run, read_checkpoint, write_checkpoint
from ._data import load_data
from ._head import describe_init, initialise_head
from ._network import boundary
from ._result import FinetuneResult, result_from

OPTIMIZERS = ("adamw", "sgd")


def finetune(
    source,
    *,
    out,
    backbone: str = DEFAULT_BACKBONE,
    weights=IMAGENET,
    unfreeze="block3",
    epochs: int = 8,
    lr: float = 2e-4,
    head_lr: float = 1e-3,
    weight_decay: float = 1e-4,
    optimizer: str = "adamw",
    batch_size: int = 32,
    augment: bool = True,
    dropout: float = 0.2,
    train_bn: bool = False,
    label_smoothing: float = 0.1,
    tta: str = "flip",
    val_fraction: float = 0.1,
    early_stopping: int | None = 3,
    target_accuracy: float | None = None,
    test_size: float | None = 0.25,
    random_state: int = 0,
    init_head=None,
    image_size: int | None = None,
    labels=None,
    root=None,
    resume: bool = True,
    precision: str = "auto",
    device="auto",
    num_workers="auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    n_jobs: int | None = -1,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune the top blocks of a pretrained backbone with a new classification head.

    The images are split as :func:`cnncodes.split_store` splits a store of them (stratified,
    identical content on one side, `test_size` held out with the same `random_state`), so
    the held-out images are those of a linear probe fitted with ``--test-size``. The rest is
    split again into training and validation (`val_fraction`). Layers before `unfreeze`
    stay frozen, their BatchNorm in inference mode; the trained pretrained layers learn at
    `lr`, the new head (dropout, then a linear layer) at `head_lr`, with AdamW, a short
    warm-up and cosine decay. The training split is augmented (random resized crop, mirror,
    light colour jitter). After every epoch the best model so far (validation loss) is
    written to `out` and the training state to ``out + ".resume"``; an interrupted run
    continues where it stopped when called again.

    Parameters
    ----------
    source : path or list of paths
        A folder with one subfolder per class, a ``.csv`` of ``path,label``, or a list of
        image paths with `labels` (and optionally `root`, as in :func:`cnncodes.extract`).
    out : path
        The checkpoint to write (``.pt``): a state dict and plain metadata, loadable with
        ``torch.load(weights_only=True)``. Use it as ``weights=`` of :func:`cnncodes.extract`
        or as the model of :func:`cnncodes.predict` / :func:`cnncodes.evaluate`.
    backbone, weights
        The pretrained network, as in :func:`cnncodes.extract`.
    unfreeze : str or int
        Where training starts: a layer alias (``"block3"``: that block and every deeper one
        are trained; for MobileNetV2 features.4 on, all but the stem and the first two
        stages), a number of top blocks (0: the head only), or ``"all"``.
    epochs : int
        Training epochs at most (early stopping and `target_accuracy` may end sooner).
    lr, head_lr : float
        Peak learning rates of the pretrained layers and of the new head.
    weight_decay : float
        Weight decay (AdamW's decoupled one, or SGD's L2 term).
    optimizer : {"adamw", "sgd"}
        AdamW, or SGD with Nesterov momentum 0.9 (give it ~50x larger learning rates).
    batch_size : int
        Images per step.
    augment : bool
        Augment the training split (validation and test images never are).
    dropout : float
        Dropout before the head's linear layer.
    label_smoothing : float
        Label smoothing of the training loss (validation and test losses are plain).
    tta : {"flip", "none"}
        Test-time augmentation of validation, test and later predictions: ``"flip"``
        averages the probabilities of each image and its mirror image (twice the inference
        cost). Recorded in the checkpoint, so :func:`cnncodes.predict` does the same.
    train_bn : bool
        Let the BatchNorm layers of the trained blocks use batch statistics and update
        their running averages. By default every BatchNorm stays in inference mode (its
        scale and shift are still trained), as the Keras fine-tuning guide advises: batch
        statistics of small batches shift the pretrained features so much that a head
        initialised from a linear probe starts far below it (MobileNetV2 on flowers5: loss
        0.33 -> 2.4 on the same training images).
    val_fraction : float
        Fraction of the non-test images used for validation (at least one per class); 0
        trains on all of them, without early stopping (pass ``early_stopping=None``). With
        the default fixed schedule the last epoch is usually the one kept, and training on
        the validation images too scored 0.5-1.1 points higher on flowers5's held-out photos
        (three splits, ``benchmarks/RESULTS.md``); keep a validation split to watch a new
        recipe, to stop early, or to never fall below the linear probe.
    early_stopping : int or None
        Stop after this many epochs without a lower validation loss than the best trained
        epoch so far. The kept model is the best by validation loss (then accuracy), the
        initial one (`init_head`) included.
    target_accuracy : float, optional
        Stop as soon as the validation accuracy reaches it.
    test_size : float or None
        Held-out fraction, scored once with the kept model at the end; None holds out nothing.
    random_state : int
        Seeds the splits, the shuffling, the augmentation and dropout: a run is repeatable.
    init_head : path, fitted estimator or None
        The two-stage recipe: a code store (``.h5``) with the backbone's pre-logits codes
        (``block5`` for MobileNetV2, avg pooling) on which a logistic regression is fitted
        in seconds on the training split, or an already fitted logistic regression (a
        ``.skops`` file or estimator from :func:`cnncodes.fit`). Its weights, with the
        StandardScaler folded in, initialise the head: fine-tuning starts from the linear
        probe's accuracy instead of from chance. None starts from a random head.
    image_size : int, optional
        Crop size; the weights' own (224 for the ImageNet weights) when omitted.
    resume : bool
        Continue an interrupted run of the same settings (``out + ".resume"``) and return a
        finished one as it is; False trains from the start and overwrites `out`.
    precision : {"auto", "float32", "bfloat16", "float16"}
        Arithmetic of the forward and backward passes (autocast; the weights stay float32).
        ``"auto"``: bfloat16 where the hardware runs it natively, else float32.
    device, num_workers, max_pixels, progress
        As in :func:`cnncodes.extract`. Images are decoded and augmented in `num_workers`
        DataLoader processes.
    n_jobs : int, optional
        Parallel jobs of the logistic regression's cross-validation (`init_head` store).

    Returns
    -------
    FinetuneResult
        Per-epoch history, best epoch, held-out accuracy, checkpoint path; ``summary()``.

    Examples
    --------
    >>> from cnncodes import extract, finetune                                  # doctest: +SKIP
    >>> extract("flowers/", out="codes.h5", layers="block5")                     # doctest: +SKIP
    >>> r = finetune("flowers/", out="ft.pt", init_head="codes.h5", epochs=4)    # doctest: +SKIP
    >>> r.test_accuracy, r.best_epoch                                            # doctest: +SKIP
    """
    t0 = time.perf_counter()
    _check_args(epochs, lr, head_lr, batch_size, dropout, val_fraction, test_size, early_stopping,
                target_accuracy, weight_decay, label_smoothing, optimizer, tta)
    spec = get_backbone(backbone)
    if isinstance(unfreeze, str) and unfreeze.isdigit():
        unfreeze = int(unfreeze)
    boundary(spec, unfreeze)  # an unknown alias fails before any image is read
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    w = resolve(spec, weights)
    prep = Preprocess.from_weights(weights_enum(spec)[w.preprocessing_from], image_size)
    out, state_path = _outputs(out, resume)

    data = load_data(source, labels=labels, root=root, prep=prep, max_pixels=max_pixels, batch_size=batch_size,
                     num_workers=num_workers, test_size=test_size, val_fraction=val_fraction,
                     random_state=random_state, progress=progress)
    config = {
        "backbone": spec.name, "weights": w.id, "weights_sha256": w.sha256, "unfreeze": unfreeze,
        "epochs": int(epochs), "lr": float(lr), "head_lr": float(head_lr), "weight_decay": float(weight_decay),
        "optimizer": optimizer,
        "batch_size": int(batch_size), "augment": bool(augment), "dropout": float(dropout),
        "train_bn": bool(train_bn), "label_smoothing": float(label_smoothing), "tta": tta,
        "val_fraction": float(val_fraction), "test_size": None if test_size is None else float(test_size),
        "random_state": int(random_state), "image_size": prep.crop_size,
        "init_head": describe_init(init_head), "data": data.fingerprint(),
    }
    finished = finished_run(out, state_path, config, resume)
    if finished is not None:  # this very run is done: return it as it is
        return _result(finished, out, data, t0, resumed_from=len(finished["history"]))

    run = _loop.Run(config, spec, w, prep, data, out, state_path, dev, precision, early_stopping,
                    target_accuracy, progress)
    _loop.build_training(run)
    if not (resume and _loop.resume(run)) and init_head is not None:
        initialise_head(run, init_head, n_jobs)
        _loop.validate_initial(run)
    _loop.train(run)
    write_checkpoint(run, complete=True, test_accuracy=_loop.score_test(run))
    state_path.unlink(missing_ok=True)
    return _result(read_checkpoint(out, mmap=True), out, data, t0, resumed_from=run.resumed_from)


def _outputs(out, resume: bool) -> tuple[Path, Path]:
    """The checkpoint path, checked before any image is read, and that of its training state."""
    out = Path(out)
    check_output(out, CHECKPOINT)
    state_path = out.with_name(out.name + STATE_SUFFIX)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not resume:
        state_path.unlink(missing_ok=True)
    return out, state_path


def _result(ckpt: dict, out: Path, data, t0: float, *, resumed_from: int) -> FinetuneResult:
    result = result_from(ckpt, out, data.failures, data.src.skipped, **data.counts)
    result.resumed_from = resumed_from
    result.seconds = time.perf_counter() - t0
    return result


def _check_args(epochs, lr, head_lr, batch_size, dropout, val_fraction, test_size, early_stopping,
                target_accuracy, weight_decay, label_smoothing, optimizer, tta):
    """Refuse a bad setting before any image is read, saying which values are valid."""
    def bad(msg):
        raise InvalidParameterError(msg)

    if not isinstance(epochs, (int, np.integer)) or isinstance(epochs, bool) or epochs < 1:
        bad(f"epochs must be an integer >= 1, got {epochs!r}.")
    for name, value in (("lr", lr), ("head_lr", head_lr)):
        if not isinstance(value, (int, float)) or not value > 0:
            bad(f"{name} must be a positive number, got {value!r}.")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 2:
        bad(f"batch_size must be an integer >= 2 (BatchNorm needs two images per batch), got {batch_size!r}.")
    if not 0 <= dropout < 1:
        bad(f"dropout must be in [0, 1), got {dropout!r}.")
    if not 0 <= val_fraction < 1:
        bad(f"val_fraction must be in [0, 1), got {val_fraction!r}; 0 turns the validation split off.")
    if test_size is not None and not 0 < test_size < 1:
        bad(f"test_size must be between 0 and 1, or None for no held-out split, got {test_size!r}.")
    if early_stopping is not None and (not isinstance(early_stopping, (int, np.integer)) or early_stopping < 1):
        bad(f"early_stopping is a patience in epochs (>= 1) or None, got {early_stopping!r}.")
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        bad(f"target_accuracy must be in (0, 1], got {target_accuracy!r}.")
    if val_fraction == 0 and (early_stopping is not None or target_accuracy is not None):
        bad("early_stopping and target_accuracy watch the validation split: give val_fraction > 0, "
            "or pass early_stopping=None and target_accuracy=None.")
    if weight_decay < 0:
        bad(f"weight_decay must be >= 0, got {weight_decay!r}.")
    if not 0 <= label_smoothing < 1:
        bad(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
    if optimizer not in OPTIMIZERS:
        bad(f"unknown optimizer {optimizer!r}. Valid optimizers: {', '.join(OPTIMIZERS)}.")
    if tta not in TTAS:
        bad(f"unknown tta {tta!r}. Valid values: {', '.join(TTAS)}.")
