"""Optional dependencies: import one, or raise one line that names the extra to install."""

from __future__ import annotations

import importlib

from cnncodes._errors import MissingExtraError

# Top-level package -> the cnncodes extra that installs it. Another extra adds one line here.
EXTRAS = {
    "matplotlib": "plot",
    "ray": "ray",
    "fsspec": "sources",
    "s3fs": "sources",
    "pyarrow": "sources",
    "onnx": "export",
    "onnxruntime": "export",
    "starlette": "serve",
    "uvicorn": "serve",
    "multipart": "serve",
    "timm": "timm",
}


def require(module: str, purpose: str, *, extra: str | None = None):
    """Import `module` (``"ray.data"``, ``"matplotlib.pyplot"``), or raise MissingExtraError.

    Call it before any long computation whose result needs the module, so that a missing
    package costs nothing computed.

    Parameters
    ----------
    module : str
        The module to import.
    purpose : str
        What needs it, for the message ("--plot", "engine='ray'").
    extra : str, optional
        The cnncodes extra that installs it; by default looked up in ``EXTRAS`` by the
        top-level package name. A package of the core dependencies (no extra) is reported
        as a broken installation.

    Returns
    -------
    module
    """
    top = module.split(".")[0]
    extra = extra or EXTRAS.get(top)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = (getattr(exc, "name", None) or top).split(".")[0]
        # A package of its own that is missing (matplotlib without kiwisolver) is named too.
        what = "is not installed" if missing == top else f"cannot be imported (it needs {missing})"
        how = (f"pip install 'cnncodes[{extra}]'" if extra else
               "it is a dependency of cnncodes, so reinstall cnncodes: pip install --force-reinstall cnncodes")
        raise MissingExtraError(f"{purpose} needs {top}, which {what}: {how}.") from None


def require_pyplot(purpose: str):
    """matplotlib.pyplot on the Agg backend (no display needed), or the one-line error."""
    matplotlib = require("matplotlib", purpose)
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", purpose)
