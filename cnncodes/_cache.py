"""The process's temporary cache folder, shared by the transformer's and the sweep's stores; deleted at exit."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

_SESSION: dict[str, object] = {}


def session_cache() -> Path:
    """A temporary cache folder shared by this process's transformers and sweeps, deleted at exit."""
    if _SESSION.get("pid") != os.getpid():  # a forked child makes its own
        folder = Path(tempfile.mkdtemp(prefix="cnncodes-cache-"))
        _SESSION.update(pid=os.getpid(), folder=folder)
        atexit.register(_remove_session_cache, os.getpid(), folder)
    return _SESSION["folder"]


def in_session_cache(path) -> bool:
    """True for a file directly in this process's cache folder (gone when the process ends)."""
    return Path(path).resolve().parent == session_cache().resolve()


def _remove_session_cache(pid: int, folder: Path) -> None:
    if os.getpid() == pid:
        shutil.rmtree(folder, ignore_errors=True)
