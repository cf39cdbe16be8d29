"""cnncodes: transfer learning by CNN codes — a frozen ImageNet backbone, cached HDF5 codes, sklearn.

>>> from cnncodes import extract, CodeStore                     # doctest: +SKIP
>>> extract("photos/", out="codes.h5", layers=["block4", "block5"])  # doctest: +SKIP
"""

__version__ = "0.1.0"

from ._backbones import layer_table, list_backbones
from ._errors import (
    CnnCodesError,
    SourceError,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
    UnknownBackboneError,
    UnknownLayerError,
    WeightsError,
)
from ._extract import ExtractResult, extract
from ._store import CodeStore

__all__ = [
    "CnnCodesError",
    "CodeStore",
    "ExtractResult",
    "SourceError",
    "StoreError",
    "StoreLockedError",
    "StoreMismatchError",
    "UnknownBackboneError",
    "UnknownLayerError",
    "WeightsError",
    "__version__",
    "extract",
    "layer_table",
    "list_backbones",
    "sample_dir",
]


def sample_dir():
    """Return the folder of the small photo sample shipped with cnncodes (5 flower classes)."""
    from importlib.resources import files

    return files("cnncodes") / "_data" / "flowers_sample"
