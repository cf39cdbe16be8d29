"""Exceptions raised by cnncodes; every message says what was wrong and what to do."""


class CnnCodesError(Exception):
    """Base class of every error cnncodes raises on purpose."""


class UnknownBackboneError(CnnCodesError, ValueError):
    """The backbone name is not in the registry."""


class UnknownLayerError(CnnCodesError, ValueError):
    """The layer is neither an alias nor a graph node of the backbone."""


class WeightsError(CnnCodesError):
    """A checkpoint could not be found, verified or loaded."""


class SourceError(CnnCodesError, ValueError):
    """The image source (folder, CSV, list) cannot be read as given."""


class FailedImagesError(SourceError):
    """Some inputs of `CNNCodes.transform` could not be read or decoded.

    ``failures`` lists them as ``(input, reason)`` pairs, ``input`` being the path given
    (or ``"X[i]"`` for a row of an image array).
    """

    def __init__(self, message: str, failures: list[tuple[str, str]]):
        super().__init__(message)
        self.failures = failures


class StoreError(CnnCodesError):
    """A code store cannot be opened, read or written."""


class StoreMismatchError(StoreError):
    """The store was made with other settings than those of this run."""


class StoreLockedError(StoreError):
    """Another process is writing the same store."""


class StoreWriteError(StoreError, OSError):
    """Writing the store failed (no space left, file too large, I/O error); nothing stored is lost."""


class MissingExtraError(CnnCodesError, ImportError):
    """An optional dependency is missing; the message names the ``pip install 'cnncodes[extra]'``."""


class ExportError(CnnCodesError):
    """A model cannot be exported as one network (a kNN index, an unknown head ...)."""


class ModelFileError(CnnCodesError):
    """A model file cannot be read, or is not trusted."""


class ImageDecodeError(Exception):
    """An image could not be decoded; the message is the recorded failure reason.

    Internal: a decoding failure is recorded with the image, never raised to the user.
    """


class InvalidParameterError(CnnCodesError, ValueError):
    """An argument has a value cnncodes cannot use (an unknown name, a number out of range);
    the message names the valid values. A ValueError too, as scikit-learn's estimators raise."""


class OutputExistsError(CnnCodesError):
    """The output path holds a file (or folder) of another kind, which writing would destroy."""


class ReadError(OSError):
    """An image's bytes could not be read; its message is the failure recorded (not raised to
    the user: a run records it and goes on)."""


class BadUpload(Exception):
    """A request the service refuses; ``status`` is its HTTP status, the message its reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


class LayersReached(Exception):
    """Raised by a forward hook once every requested layer has run: the rest is not computed."""
