"""Fine-tuning the top blocks of a backbone: `finetune` and the fine-tuned model it writes.

The run, phase by phase: ``_api`` (`finetune`: settings, then the phases below), ``_data``
(read, hash and split the photos), ``_network`` (new head, frozen blocks), ``_head`` (the
head from a linear probe), ``_loop`` (epochs, early stopping, resuming), ``_checkpoint`` (the
checkpoint and training-state files; all that weight loading reads), ``_result`` (what a run
reports) and ``_predict`` (a checkpoint as a model for predict and evaluate).

Names are imported on first use (PEP 562), so that reading a checkpoint's format imports
neither the training loop nor the model files.
"""

_LAZY = {
    "finetune": "_api",
    "EpochStats": "_result",
    "FinetuneResult": "_result",
    "FineTunedModel": "_predict",
    "load_finetuned": "_predict",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
