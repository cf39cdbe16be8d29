"""cnncodes: transfer learning by CNN codes — a frozen ImageNet backbone, cached HDF5 codes, sklearn.

>>> from cnncodes import extract, fit, save                       # doctest: +SKIP
>>> extract("photos/", out="codes.h5", layers=["block4", "block5"])  # doctest: +SKIP
>>> save(fit("codes.h5", layer="block5"), "model.skops")             # doctest: +SKIP
"""

__version__ = "0.1.0"

from ._advise import Advice, AdviceRun, Measurements, Recommendation, Scenario, advise
from ._backbones import layer_table, list_backbones
from ._errors import (
    CnnCodesError,
    FailedImagesError,
    SourceError,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
    UnknownBackboneError,
    UnknownLayerError,
    WeightsError,
)
from ._extract import ExtractResult, extract
from ._finetune import EpochStats, FinetuneResult, FineTunedModel, finetune
from ._fit import fit, split_store
from ._stream import fit_streaming
from ._knn import FaissKNNClassifier
from ._outputs import OutputExistsError
from ._model import Evaluation, Model, ModelFileError, Prediction, evaluate, load, predict, save
from ._spec import ExtractorSpec, WeightsRef
from ._store import CodeStore
from ._sweep import LayerScore, SweepResult, sweep
from ._transformer import CNNCodes

__all__ = [
    "Advice",
    "AdviceRun",
    "CNNCodes",
    "CnnCodesError",
    "CodeStore",
    "EpochStats",
    "Evaluation",
    "ExtractResult",
    "ExtractorSpec",
    "FailedImagesError",
    "FaissKNNClassifier",
    "FineTunedModel",
    "FinetuneResult",
    "LayerScore",
    "Measurements",
    "Model",
    "ModelFileError",
    "OutputExistsError",
    "Prediction",
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
    "evaluate",
    "extract",
    "finetune",
    "fit",
    "fit_streaming",
    "layer_table",
    "list_backbones",
    "load",
    "predict",
    "sample_dir",
    "save",
    "split_store",
    "sweep",
]


def sample_dir():
    """Return the folder of the small photo sample shipped with cnncodes (5 flower classes)."""
    from importlib.resources import files

    return files("cnncodes") / "_data" / "flowers_sample"
