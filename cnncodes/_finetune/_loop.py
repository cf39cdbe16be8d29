"""The training loop: optimizer and schedule, epochs, validation, early stopping, resuming, the held-out score."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from cnncodes._extract.accel import autocast, reuse_freed_memory
from cnncodes._input.images import Preprocess
from ._checkpoint import cpu_state, load_state, write_checkpoint, write_state
from ._data import Data, progress_bar, to_input
from ._network import FineTuneNet, build_net, param_groups, predict_logits
from ._result import EpochStats

if TYPE_CHECKING:
    from cnncodes._backbones.registry import BackboneSpec
    from cnncodes._backbones.weights import Weights


@dataclass
class Best:
    """The model kept so far: its epoch (0: the initial one) and validation scores."""

    epoch: int = 0
    val_accuracy: float = -1.0
    val_loss: float = math.inf


@dataclass
class Run:
    """One fine-tuning run: its settings and images, its network and optimizer, and how far it got.

    ``config`` holds the settings a checkpoint records and a resumed run must repeat
    (``epochs``, ``lr``, ``batch_size``, ``tta``, ...); the rest is filled in phase by phase.
    """

    config: dict
    spec: BackboneSpec
    weights: Weights  # resolved: id, sha256, file
    prep: Preprocess
    data: Data
    out: Path
    state_path: Path
    device: torch.device
    precision: str
    early_stopping: int | None
    target_accuracy: float | None
    progress: bool
    model: FineTuneNet | None = None
    trainable: dict = field(default_factory=dict)  # parameters trained / frozen, first trained module
    opt: torch.optim.Optimizer | None = None
    sched: object = None
    scaler: object = None
    history: list[EpochStats] = field(default_factory=list)
    best: Best = field(default_factory=Best)
    best_state: dict | None = None  # the weights of the kept model, on the CPU
    bad_epochs: int = 0
    resumed_from: int = 0  # epochs an earlier call trained
    init_record: dict | None = None  # where the initial head came from
    initial_val: dict | None = None  # validation loss and accuracy before the first epoch
    stopped: str = "epochs"  # "epochs" | "early stopping" | "target accuracy"

    @property
    def channels_last(self) -> bool:
        return self.device.type == "cpu" and self.precision == "bfloat16"


def build_training(run: Run) -> None:
    """The network (new head, frozen blocks) on the device, its optimizer, schedule and loss scaler."""
    c = run.config
    with torch.random.fork_rng(devices=[]):  # the new head's random init is part of the run's seed
        torch.manual_seed(c["random_state"])
        run.model, run.trainable = build_net(run.spec, run.weights, len(run.data.classes), dropout=c["dropout"],
                                             unfreeze=c["unfreeze"], train_bn=c["train_bn"])
    run.model.to(run.device)
    if run.channels_last:
        run.model.to(memory_format=torch.channels_last)
    groups = param_groups(run.model, c["lr"], c["head_lr"], c["weight_decay"])
    run.opt = (torch.optim.AdamW(groups) if c["optimizer"] == "adamw"
               else torch.optim.SGD(groups, momentum=0.9, nesterov=True))
    steps_per_epoch = math.ceil(len(run.data.train_rows) / c["batch_size"])
    total = steps_per_epoch * c["epochs"]
    run.sched = torch.optim.lr_scheduler.LambdaLR(run.opt, _schedule(total, max(1, min(steps_per_epoch, total // 20))))
    # float16 gradients underflow without loss scaling; bfloat16 and float32 need none.
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.precision == "float16")


def resume(run: Run) -> bool:
    """Continue from the training state an interrupted run of the same settings left; False if none."""
    saved = load_state(run.state_path, run.config)
    if saved is None:
        return False
    run.model.net.load_state_dict(saved["state_dict"])
    run.opt.load_state_dict(saved["optimizer"])
    run.sched.load_state_dict(saved["scheduler"])
    run.scaler.load_state_dict(saved["grad_scaler"])
    run.history = [EpochStats(**e) for e in saved["history"]]
    run.best, run.bad_epochs, run.resumed_from = Best(**saved["best"]), saved["bad_epochs"], saved["epoch"]
    run.best_state, run.init_record, run.initial_val = (saved["best_state_dict"], saved["init_head"],
                                                        saved["initial_val"])
    return True


def validate_initial(run: Run) -> None:
    """Score the initial model (the head from a linear probe): a candidate for the model kept.

    Fine-tuning then never returns a model that is worse than the probe on the validation split.
    """
    if not len(run.data.val_rows):
        return
    loss, acc = _validate(run, run.data.eval_loader(run.data.val_rows, run.device))
    run.initial_val = {"loss": loss, "accuracy": acc}
    run.best = Best(0, acc, loss)
    run.best_state = cpu_state(run.model.net)
    if run.progress:
        from tqdm.auto import tqdm

        tqdm.write(f"initial head: val loss {loss:.4f} acc {acc:.4f}")


def train(run: Run) -> None:
    """Train the epochs left, saving the best model and the state after each; stop early when told to."""
    epochs, seed = run.config["epochs"], run.config["random_state"] * 100_003
    start = run.resumed_from
    reason = _stop_reason(run) if start else None
    if reason:  # the interrupted run had decided to stop after its last saved epoch
        run.stopped, start = reason, epochs
    train_set = run.data.train_set(run.config["augment"])
    dev = run.device
    # reuse_freed_memory: the activations and gradients of every step reused, not faulted in anew
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), reuse_freed_memory():
        for epoch in range(start + 1, epochs + 1):
            torch.manual_seed(seed + epoch)
            t_epoch = time.perf_counter()
            loader = run.data.train_loader(train_set, seed + epoch, dev)
            train_loss, train_acc = _train_epoch(run, loader, f"epoch {epoch}/{epochs}", len(run.data.train_rows))
            val_loss = val_acc = None
            if len(run.data.val_rows):
                val_loss, val_acc = _validate(run, run.data.eval_loader(run.data.val_rows, dev))
            lrs = {g["name"]: g["lr"] for g in run.opt.param_groups}
            stats = EpochStats(epoch, train_loss, train_acc, val_loss, val_acc, time.perf_counter() - t_epoch,
                               float(lrs.get("backbone", 0.0)), float(lrs["head"]))
            improved = _record(run, stats)
            if run.progress:
                from tqdm.auto import tqdm

                val = "" if val_acc is None else f" | val loss {val_loss:.4f} acc {val_acc:.4f}"
                tqdm.write(f"epoch {epoch}/{epochs}: train loss {train_loss:.4f} acc {train_acc:.4f}{val}"
                           f" | {stats.seconds:.0f} s" + ("" if improved else f" (best: epoch {run.best.epoch})"))
            reason = _stop_reason(run)
            save_epoch(run)
            if reason:
                run.stopped = reason
                break


def _record(run: Run, stats: EpochStats) -> bool:
    """Add an epoch to the history; keep its weights when it is the best so far (True)."""
    run.history.append(stats)
    # Validation loss decides (then accuracy): on a few hundred images it is far less
    # noisy than accuracy, whose ties and one-image steps picked worse epochs.
    improved = stats.val_accuracy is None or (
        (-stats.val_loss, stats.val_accuracy) > (-run.best.val_loss, run.best.val_accuracy))
    if improved:
        run.best = Best(stats.epoch, -1.0 if stats.val_accuracy is None else stats.val_accuracy,
                        math.inf if stats.val_loss is None else stats.val_loss)
        run.best_state = cpu_state(run.model.net)
    run.bad_epochs = _epochs_since_best(run.history)
    return improved


def save_epoch(run: Run) -> None:
    """After an epoch: the training state (to resume) and the best model so far (usable at once).

    Tests interrupt a run here, by wrapping this function.
    """
    write_state(run)
    write_checkpoint(run, complete=False)


def score_test(run: Run) -> float | None:
    """Load the kept model (the best epoch by validation loss) and score it on the held-out images."""
    run.model.net.load_state_dict(run.best_state)
    rows = run.data.test_rows
    if not len(rows):
        return None
    with reuse_freed_memory():
        bar = progress_bar(run.progress, len(rows), "test")
        idx, logits, _, _ = predict_logits(run.model, run.data.eval_loader(rows, run.device), run.prep, run.device,
                                           run.precision, run.channels_last, bar, tta=run.config["tta"])
    return float((logits.argmax(1).numpy() == run.data.y[rows][idx]).mean())


def _schedule(total_steps: int, warmup_steps: int):
    """Linear warm-up, then cosine decay to zero: the factor applied to each group's lr."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _train_epoch(run: Run, loader, desc: str, n: int):
    """One pass over the training images: the mean loss and accuracy."""
    model, opt, dev = run.model, run.opt, run.device
    bar = progress_bar(run.progress, n, desc)
    model.train()
    seen, loss_sum, correct = 0, 0.0, 0
    for batch in loader:
        x, target = to_input(batch, run.prep, dev, run.channels_last), batch["y"].to(dev)
        with autocast(dev, run.precision):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), target, label_smoothing=run.config["label_smoothing"])
        opt.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(opt)
        run.scaler.update()
        run.sched.step()
        k = len(target)
        seen += k
        loss_sum += loss.item() * k
        correct += int((logits.argmax(1) == target).sum())
        bar.update(k)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}", refresh=False)
    bar.close()
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def _validate(run: Run, loader):
    """Loss and accuracy on a labelled split (with the run's test-time augmentation)."""
    n = len(loader.dataset)
    idx, logits, _, _ = predict_logits(run.model, loader, run.prep, run.device, run.precision, run.channels_last,
                                       progress_bar(run.progress, n, "validate"), tta=run.config["tta"])
    target = torch.as_tensor(np.asarray(loader.dataset.labels)[idx])
    loss = float(nn.functional.cross_entropy(logits, target))
    return loss, float((logits.argmax(1) == target).float().mean())


def _epochs_since_best(history) -> int:
    """Epochs since the best trained epoch (validation loss, then accuracy).

    The initial model (a head from a linear probe) is a candidate for the model kept, but
    not the mark patience counts from: fine-tuning often dips below it for an epoch or two
    while the head adapts to augmented inputs and the warm-up raises the learning rate.
    """
    scored = [e for e in history if e.val_accuracy is not None]
    if not scored:
        return 0
    best = max(scored, key=lambda e: (-e.val_loss, e.val_accuracy))  # the first of equals
    return history[-1].epoch - best.epoch


def _stop_reason(run: Run) -> str | None:
    if not run.history or not len(run.data.val_rows):
        return None
    last = run.history[-1]
    if run.target_accuracy is not None and last.val_accuracy >= run.target_accuracy:
        return "target accuracy"
    if run.early_stopping is not None and run.bad_epochs >= run.early_stopping:
        return "early stopping"
    return None
