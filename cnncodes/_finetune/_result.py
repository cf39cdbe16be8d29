"""What a fine-tuning run reports: the statistics of each epoch and the result of the run."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EpochStats:
    """Loss and accuracy of one epoch on the training and validation splits."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float
    lr: float  # learning rate of the pretrained layers at the end of the epoch
    head_lr: float


@dataclass
class FinetuneResult:
    """What a :func:`finetune` run did; `summary()` gives the text the CLI prints."""

    path: str
    backbone: str
    classes: list[str]
    history: list[EpochStats]
    best_epoch: int  # 0: the initial model (the head initialised from a linear probe)
    stopped: str  # "epochs" | "early stopping" | "target accuracy"
    n_train: int
    n_val: int
    n_test: int
    test_accuracy: float | None = None
    test_ids: list[str] = field(default_factory=list)
    initial_val_accuracy: float | None = None  # before the first epoch (head initialised)
    initial_val_loss: float | None = None
    init_head: dict | None = None
    trainable: dict = field(default_factory=dict)  # parameters trained / frozen, first trained module
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    resumed_from: int = 0  # epochs done by an earlier run (all of them: nothing left to do)
    seconds: float = 0.0  # wall time of this call
    precision: str = "float32"

    @property
    def best_val_accuracy(self) -> float | None:
        if self.best_epoch == 0:
            return self.initial_val_accuracy
        return self.history[self.best_epoch - 1].val_accuracy

    @property
    def best_val_loss(self) -> float | None:
        if self.best_epoch == 0:
            return self.initial_val_loss
        return self.history[self.best_epoch - 1].val_loss

    def summary(self) -> str:
        lines = []
        if self.history and self.resumed_from == len(self.history):
            lines.append(f"already trained ({self.path}): nothing to do; resume=False (--restart) trains again.")
        elif self.resumed_from:
            lines.append(f"resumed after epoch {self.resumed_from}.")
        if self.init_head:
            lines.append(f"head initialised from {self.init_head['source']} "
                         f"(logistic regression, C={self.init_head['C']:g}, {self.init_head['n_rows']} rows)"
                         + (f": validation accuracy {self.initial_val_accuracy:.4f} before fine-tuning."
                            if self.initial_val_accuracy is not None else "."))
        if self.trainable:
            lines.append(f"trained {self.trainable['trained']:,} of {self.trainable['total']:,} parameters "
                         f"(from {self.trainable['first']}), {self.precision}.")
        for e in self.history:
            val = "" if e.val_accuracy is None else f" | val loss {e.val_loss:.4f} acc {e.val_accuracy:.4f}"
            lines.append(f"epoch {e.epoch}: train loss {e.train_loss:.4f} acc {e.train_accuracy:.4f}{val}"
                         f" | {e.seconds:.0f} s")
        best = self.best_val_accuracy
        kept = "the initial model" if self.best_epoch == 0 else f"epoch {self.best_epoch}"
        lines.append(f"stopped: {self.stopped}; kept {kept}" + (
            "" if best is None else f" (validation loss {self.best_val_loss:.4f}, accuracy {best:.4f})") + ".")
        split = f"{self.n_train} train, {self.n_val} validation, {self.n_test} held-out test images"
        if self.test_accuracy is not None:
            lines.append(f"held-out accuracy {self.test_accuracy:.4f} on {self.n_test} images ({split}).")
        else:
            lines.append(f"{split}.")
        if self.failures:
            lines.append(f"{len(self.failures)} images could not be read and were left out:")
            lines += [f"  {rid}: {why}" for rid, why in self.failures[:20]]
        if self.skipped_files:
            lines.append(f"{len(self.skipped_files)} files skipped: "
                         + "; ".join(f"{i} ({why})" for i, why in self.skipped_files[:5]))
        lines.append(f"{self.path}: {len(self.classes)} classes, {self.seconds:.1f} s.")
        return "\n".join(lines)


def result_from(ckpt: dict, out, failures, skipped, *, n_train, n_val, n_test) -> FinetuneResult:
    """The result a checkpoint describes, with what this call found (images left out, split sizes)."""
    history = [EpochStats(**e) for e in ckpt["history"]]
    return FinetuneResult(
        path=str(out), backbone=ckpt["backbone"], classes=list(ckpt["classes"]), history=history,
        best_epoch=int(ckpt["best_epoch"]), stopped=ckpt["stopped"], n_train=n_train, n_val=n_val, n_test=n_test,
        test_accuracy=ckpt["test_accuracy"], test_ids=list(ckpt["test_ids"]),
        initial_val_accuracy=ckpt["initial_val_accuracy"], initial_val_loss=ckpt["initial_val_loss"],
        init_head=ckpt["init_head"],
        trainable=dict(ckpt["trainable"]), failures=list(failures), skipped_files=list(skipped),
        precision=ckpt.get("precision", "float32"),
    )
