"""Shared low-level pieces, written once: content hashes, atomic writes, the stratified
sampler and top-k. A leaf: it imports nothing of the package but its errors.

Everything that hashes bytes or a large file, writes a file that must never be seen half
written, samples per class or ranks class probabilities comes here. Reading an item's bytes
(and hashing and decoding them) is the data layer's: `_sources.hash_item`, `read_hash_decode`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np



def sha256_bytes(data: bytes) -> str:
    """The content key of an image: the hex sha256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


@lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a (large) local file, read in 1 MiB blocks, cached per (path, size, mtime)."""
    st = os.stat(path)
    return _file_sha256(os.fspath(path), st.st_size, st.st_mtime_ns)


def umask() -> int:
    """The process's umask (read without changing it for long)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_quietly(path: str | os.PathLike) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, fsync: bool = True):
    """Write a file so that readers see the old one or the whole new one, never a torn one.

    Yields a binary file object on a temporary file in the same folder; on a clean exit the
    temporary file is flushed, fsynced (unless ``fsync=False``: caches others can rebuild),
    given the permissions a plain ``open`` would give and renamed over `path`. On an error the
    temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600; files we write are shared as open() makes them
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


def stratified_sample(labels, n: int, random_state=None, *, at_least: int = 0,
                      balanced: bool = False) -> np.ndarray:
    """Sorted positions of at most about `n` rows, drawn per class.

    By default each class keeps rows in proportion to its size, ``round(n * size / total)``,
    but no fewer than ``at_least`` (nor more than it has). With ``balanced=True`` exactly
    ``min(n, len(labels))`` rows are spread as evenly over the classes as their sizes allow
    (round robin over the classes in sorted order: a class too small for its share gives all
    it has, and the first classes get one more when `n` does not divide evenly); ``at_least``
    does not apply. With ``n >= len(labels)`` every row is kept.
    """
    labels = np.asarray(labels)
    total = len(labels)
    if n >= total:
        return np.arange(total)
    rng = np.random.default_rng(random_state)
    # sorted: the draw does not depend on the order in which the classes first appear
    groups = [np.flatnonzero(labels == c) for c in sorted(set(labels.tolist()))]
    if balanced:
        orders = [g[rng.permutation(len(g))] for g in groups]  # every class shuffled, then dealt
        keep = [order[:k] for order, k in zip(orders, _even_shares(n, [len(g) for g in groups]))]
    else:
        keep = [rng.choice(g, min(len(g), max(at_least, int(round(n * len(g) / total)))), replace=False)
                for g in groups]
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)


def _even_shares(n: int, sizes: list[int]) -> list[int]:
    """How many of `n` rows each class gives when they are dealt one per class in turn."""
    shares, left, k = [0] * len(sizes), n, 0
    while left > 0 and any(k < s for s in sizes):
        for i, s in enumerate(sizes):
            if k < s and left > 0:
                shares[i] += 1
                left -= 1
        k += 1
    return shares


def top_k(proba, k: int) -> np.ndarray:
    """Column indices of the `k` largest values per row, largest first; ties keep column order."""
    proba = np.asarray(proba)
    k = max(1, min(int(k), proba.shape[-1]))
    return np.argsort(-proba, axis=-1, kind="stable")[..., :k]


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> None:
    """A matplotlib figure written through :func:`atomic_write`, in the format its suffix names (PNG without one)."""
    path = Path(path)
    with atomic_write(path) as fh:
        fig.savefig(fh, format=path.suffix[1:].lower() or "png", **savefig_kwargs)
