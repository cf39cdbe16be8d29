"""cnncodes: transfer learning by CNN codes — a frozen ImageNet backbone, cached HDF5 codes, sklearn.

>>> from cnncodes import extract, fit, save                       # doctest: +SKIP
>>> extract("photos/", out="codes.h5", layers=["block4", "block5"])  # doctest: +SKIP
>>> save(fit("codes.h5", layer="block5"), "model.skops")             # doctest: +SKIP
"""

__version__ = "0.1.0"

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
from ._fit import fit, split_store
from ._knn import FaissKNNClassifier
from ._model import Evaluation, Model, ModelFileError, Prediction, evaluate, load, predict, save
from ._store import CodeStore
from ._transformer import CNNCodes

__all__ = [
    "CNNCodes",
    "CnnCodesError",
    "CodeStore",
    "Evaluation",
    "ExtractResult",
    "FailedImagesError",
    "FaissKNNClassifier",
    "Model",
    "ModelFileError",
    "Prediction",
    "SourceError",
    "StoreError",
    "StoreLockedError",
    "StoreMismatchError",
    "UnknownBackboneError",
    "UnknownLayerError",
    "WeightsError",
    "__version__",
    "evaluate",
    "extract",
    "fit",
    "layer_table",
    "list_backbones",
    "load",
    "predict",
    "sample_dir",
    "save",
    "split_store",
]


def sample_dir():
    """Return the folder of the small photo sample shipped with cnncodes (5 flower classes)."""
    from importlib.resources import files

    return files("cnncodes") / "_data" / "flowers_sample"
