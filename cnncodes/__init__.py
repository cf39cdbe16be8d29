"""cnncodes: transfer learning by CNN codes — a frozen ImageNet backbone, cached HDF5 codes, sklearn.

>>> from cnncodes import extract, fit, save                       # doctest: +SKIP
>>> extract("photos/", out="codes.h5", layers=["block4", "block5"])  # doctest: +SKIP
>>> save(fit("codes.h5", layer="block5"), "model.skops")             # doctest: +SKIP
"""

__version__ = "0.1.0"

from cnncodes._errors import (  # dependency-free, so eager: `except cnncodes.StoreError` costs nothing
    CnnCodesError,
    ExportError,
    FailedImagesError,
    InvalidParameterError,
    MissingExtraError,
    ModelFileError,
    OutputExistsError,
    SourceError,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
    UnknownBackboneError,
    UnknownLayerError,
    WeightsError,
)

# The rest of the public API is imported on first use (PEP 562): `import cnncodes` and the
# command line start without torch, torchvision, faiss or scikit-learn (seconds each).
_LAZY_MODULES = {
    "_analysis.advise": ("Advice", "AdviceRun", "advise"),
    "_backbones.registry": ("layer_table", "list_backbones"),
    "_backbones.custom": ("register_backbone",),
    "_input.images": ("Preprocess",),
    "_models.export": ("export",),
    "_analysis.curve": ("CurvePoint", "LearningCurve", "learning_curve"),
    "_extract.extract": ("ExtractResult", "extract"),
    "_finetune": ("EpochStats", "FinetuneResult", "FineTunedModel", "finetune"),
    "_classify.fit": ("fit", "split_store"),
    "_classify.stream": ("fit_streaming",),
    "_classify.knn": ("FaissKNNClassifier",),
    "_models.model": ("Comparison", "Model", "compare", "evaluate", "load", "predict", "save"),
    "_models.onnx_run": ("OnnxModel",),
    "_analysis.report": ("report",),
    "_models.results": ("Evaluation", "Prediction", "Predictions"),
    "_analysis.rules": ("Measurements", "Recommendation", "Scenario"),
    "_models.serve": ("make_app", "serve"),
    "_spec": ("ExtractorSpec", "WeightsRef"),
    "_stats": ("Interval",),
    "_store.store": ("CodeStore",),
    "_analysis.sweep": ("LayerScore", "SweepResult", "sweep"),
    "_transform.transformer": ("CNNCodes",),
}
_LAZY = {name: module for module, names in _LAZY_MODULES.items() for name in names}

__all__ = [
    "Advice",
    "AdviceRun",
    "CNNCodes",
    "CnnCodesError",
    "CodeStore",
    "Comparison",
    "CurvePoint",
    "EpochStats",
    "Evaluation",
    "ExportError",
    "ExtractResult",
    "ExtractorSpec",
    "FailedImagesError",
    "FaissKNNClassifier",
    "FineTunedModel",
    "FinetuneResult",
    "Interval",
    "InvalidParameterError",
    "LayerScore",
    "LearningCurve",
    "Measurements",
    "MissingExtraError",
    "Model",
    "ModelFileError",
    "OnnxModel",
    "OutputExistsError",
    "Prediction",
    "Predictions",
    "Preprocess",
    "Recommendation",
    "Scenario",
    "SourceError",
    "StoreError",
    "StoreLockedError",
    "StoreMismatchError",
    "SweepResult",
    "UnknownBackboneError",
    "UnknownLayerError",
    "WeightsError",
    "WeightsRef",
    "__version__",
    "advise",
    "compare",
    "evaluate",
    "export",
    "extract",
    "finetune",
    "fit",
    "fit_streaming",
    "layer_table",
    "learning_curve",
    "list_backbones",
    "load",
    "make_app",
    "predict",
    "register_backbone",
    "report",
    "sample_dir",
    "save",
    "serve",
    "split_store",
    "sweep",
]


def sample_dir():
    """Return the folder of the small photo sample shipped with cnncodes (5 flower classes)."""
    from importlib.resources import files

    return files("cnncodes") / "_data" / "flowers_sample"


def __getattr__(name: str):
    """Import a public name, or a private submodule (``cnncodes._store.store``), on first access."""
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later accesses are plain attribute lookups
        return value
    if name.startswith("_") and not name.startswith("__"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise  # the submodule exists but one of its own imports is missing
    raise AttributeError(
        f"module {__name__!r} has no attribute {name!r}. Its public names are listed in "
        f"cnncodes.__all__ (dir(cnncodes) shows them too)."
    )


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
