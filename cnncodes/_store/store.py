"""The HDF5 code store: a root over immutable segments, a crash-safe journal, a writer lock, a reader."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from cnncodes._errors import StoreError, StoreLockedError, StoreWriteError
from cnncodes._io import atomic_write, fsync_dir, remove_quietly, umask
from cnncodes._input.items import _local, is_url
from cnncodes._spec import SPEC_KEYS, ExtractorSpec, check_spec, normalize_spec  # noqa: F401 - re-exported

FORMAT = "cnncodes.codes"
FORMAT_VERSION = 2  # 1: one self-contained file (read as it is; converted once when extended)
_STR = h5py.string_dtype("utf-8")


# --------------------------------------------------------------------------- lock


class StoreLock:
    """An exclusive lock beside the store (``codes.h5.lock``), released if the process dies.

    POSIX record locks (``lockf``) belong to the process: unlike ``flock`` they are not
    inherited by forked DataLoader workers, so an orphaned worker of a killed run cannot
    keep the store locked. They do not exclude the same process, hence ``_held``.
    """

    _held: set[str] = set()

    def __init__(self, path):
        self.path = Path(f"{path}").resolve().with_name(f"{Path(path).name}.lock")
        self._fh = None

    def _refuse(self, holder: str) -> StoreLockedError:
        return StoreLockedError(
            f"{self.path.name[:-5]} is being written by another process (pid {holder}). "
            f"Wait for it to finish, or write to another file; if no such process "
            f"runs, the lock is released already and a retry will succeed."
        )

    def acquire(self) -> "StoreLock":
        import fcntl

        if str(self.path) in self._held:
            raise self._refuse(f"{os.getpid()}, this process")
        while True:
            fh = open(self.path, "a+")
            try:
                fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.seek(0)
                holder = fh.read().strip() or "unknown"
                fh.close()
                raise self._refuse(holder) from None
            # The previous holder may have deleted the file between our open and our lock.
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fh.fileno()).st_ino:
                break
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        self._held.add(str(self.path))
        return self

    def release(self) -> None:
        if self._fh is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._fh.close()
            self._fh = None
            self._held.discard(str(self.path))

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# --------------------------------------------------------------------------- write failures


_ERRNO_IN_MESSAGE = re.compile(r"errno\s*=\s*(\d+)")


def _errno_of(exc: BaseException) -> int | None:
    """The errno of an OSError, or the one HDF5 writes into its message (``errno = 28``)."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    found = _ERRNO_IN_MESSAGE.search(str(exc))
    return int(found.group(1)) if found else None


def _write_error(exc: BaseException, path, kept: str) -> StoreWriteError:
    """One line naming the file and the errno, saying what is kept and what to do."""
    code = _errno_of(exc)
    if code == errno.ENOSPC:
        what, fix = "no space left on device", "free space and re-run"
    elif code == errno.EFBIG:
        what, fix = "file too large (a file-size limit, ulimit -f, or the file system's)", \
            "raise the limit or write elsewhere, and re-run"
    elif code == errno.EDQUOT:
        what, fix = "disk quota exceeded", "free space within the quota and re-run"
    elif code is not None:
        what, fix = f"{os.strerror(code).lower()} (errno {errno.errorcode.get(code, code)})", "fix it and re-run"
    else:
        what, fix = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", "fix it and re-run"
    err = StoreWriteError(f"{what} while writing {path}; {fix}: {kept}")
    err.errno = code
    return err


def _kept(path: Path, journal: "Journal | None") -> str:
    rows = journal.rows() if journal is not None else 0
    old = f"{path.name} is unchanged" if path.exists() else f"{path.name} was not created"
    return f"{old}, and the {rows} rows already journalled are kept." if rows else f"{old}."


class _GuardedFile(io.RawIOBase):
    """A new file for h5py's ``fileobj`` driver whose writes never fail under HDF5.

    An HDF5 file whose write failed (a full disk, a file-size limit) cannot be closed
    cleanly: h5py then prints tracebacks from its object destructors and can crash the
    interpreter at exit. So the first OSError is kept, HDF5 is told the write went
    through (later writes are dropped, reads of what was never written give zeros), and
    `_h5_create` raises the error once HDF5 has closed the file, which is then deleted.
    """

    def __init__(self, path: Path):
        super().__init__()
        self._fh = open(path, "w+b", buffering=0)
        self.error: OSError | None = None

    def readable(self):
        return True

    def writable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        return self._fh.seek(pos, whence)

    def tell(self):
        return self._fh.tell()

    def readinto(self, buffer):
        view = memoryview(buffer).cast("B")
        n = self._fh.readinto(view) or 0
        view[n:] = b"\0" * (len(view) - n)
        return len(view)

    def write(self, data):
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    done += self._fh.write(view[done:])
                return len(view)
            except OSError as exc:
                self.error = exc
        self._fh.seek(len(view), os.SEEK_CUR)
        return len(view)

    def truncate(self, size=None):
        if self.error is None:
            try:
                return self._fh.truncate(size)
            except OSError as exc:
                self.error = exc
        return size

    def flush(self):
        pass

    def sync(self) -> None:
        if self.error is None:
            try:
                os.fsync(self._fh.fileno())
            except OSError as exc:
                self.error = exc

    def close(self):
        if not self.closed:
            self._fh.close()
        super().close()


@contextlib.contextmanager
def _h5_create(path: Path):
    """Create an HDF5 file (h5py.File, "w"), synced to disk; a failed write raises OSError after
    HDF5 closed the file cleanly (see `_GuardedFile`)."""
    guard = _GuardedFile(path)
    try:
        with h5py.File(guard, "w", libver="latest") as f:
            yield f
        guard.sync()
    finally:
        guard.close()
    if guard.error is not None:
        raise guard.error


def _check_room(folder: Path, nbytes: int) -> None:
    """Refuse to start a file of `nbytes` where it cannot fit: free space, the size limit."""
    try:
        vfs = os.statvfs(folder)
        free = vfs.f_bavail * vfs.f_frsize
    except OSError:
        return
    if nbytes > free:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return
    if soft != resource.RLIM_INFINITY and nbytes > soft:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))


# --------------------------------------------------------------------------- journal


def _atomic_savez(path: Path, arrays: dict) -> None:
    """One journal batch, whole or absent."""
    with atomic_write(path) as fh:
        np.savez(fh, **arrays)


UNKNOWN_STAT = (-1, -1, -1)


def _journal_index(path) -> int:
    """The number of a journal file (batch-<n>.npz, segment-<n>.h5; an actor's segment of a
    store in object storage, segment-<N>-<n>.h5, by its URL)."""
    name = path.rsplit("/", 1)[-1] if isinstance(path, str) else path.name
    return int(name.split(".")[0].split("-")[-1])


def _stat_array(stat, n: int) -> np.ndarray:
    if stat is None:
        return np.full((n, 3), -1, dtype=np.int64)
    return np.asarray(stat, dtype=np.int64).reshape(n, 3)


class Journal:
    """Finished batches of a run, one atomically written .npz each, beside the store.

    HDF5 files are not crash-safe while open for writing, so a run never writes into the
    store directly: it journals each batch, then commits the journal as one new immutable
    segment and a new root that atomically replaces the old one. A kill at any moment leaves
    the old store intact and the journal to resume from.
    """

    def __init__(self, store_path: Path, remote=None, next_segment: int = 0):
        self.store_path = Path(store_path)
        self.folder = Path(f"{store_path}.partial")
        # A store in object storage (a `RemoteStore`): its Ray actors' segments are in its
        # folder there, named for the commit that maps them (the root's `next_segment`).
        self.remote, self.next_segment = remote, next_segment

    def exists(self) -> bool:
        return self.folder.is_dir()

    def open(self, spec: ExtractorSpec) -> None:
        """Create the journal, or check that an existing one was made with the same spec."""
        marker = self.remote.marker() if self.remote is not None else None
        if marker is not None:
            ExtractorSpec.from_json(marker).check(spec, f"the interrupted run at {self.remote.url}.partial")
        meta = self.folder / "spec.json"
        if meta.is_file():
            ExtractorSpec.from_json(json.loads(meta.read_text())).check(
                spec, f"the interrupted run in {self.folder.name}")
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = meta.with_suffix(".tmp")
            tmp.write_text(json.dumps(spec.to_json(), sort_keys=True))
            os.replace(tmp, meta)
        except OSError as exc:
            self.remove()
            raise _write_error(exc, meta, _kept(self.store_path, None)) from None
        fsync_dir(self.folder)

    def clean(self) -> None:
        """Remove the temporaries of writes a killed run left half done."""
        if self.exists():
            for stray in [*self.folder.glob(".tmp-*.npz"), *self.folder.glob("*.tmp")]:
                remove_quietly(stray)

    def batches(self) -> list[Path]:
        # Numeric order: Ray shards are numbered by image position, past six digits.
        paths = self.folder.glob("batch-*.npz") if self.exists() else []
        return sorted(paths, key=_journal_index)

    def segments(self) -> list[Path]:
        """Segment files the Ray actors wrote (store format, adopted by the commit as they are)."""
        paths = self.folder.glob("segment-*.h5") if self.exists() else []
        return sorted(paths, key=_journal_index)

    def remote_segments(self) -> list[str]:
        """URLs of the segments Ray actors uploaded to a store in object storage, not yet mapped."""
        return self.remote.pending(self.next_segment) if self.remote is not None else []

    def files(self) -> list:
        """Batches and segments (Paths; URLs for a remote store's actor segments), in the order
        they were numbered (a later one wins an id)."""
        return sorted([*self.batches(), *self.segments(), *self.remote_segments()], key=_journal_index)

    def next_index(self) -> int:
        files = self.files()
        return _journal_index(files[-1]) + 1 if files else 0

    def write(self, index: int, *, ids, sha256, labels, codes=None, failures=(), stat=None,
              fail_stat=None) -> None:
        """Write one batch. `codes` maps alias -> (n, d) array (None for reused content).

        `stat` gives each row's (size, mtime_ns, inode) when its file was listed, `fail_stat`
        each failure's; unknown (-1) when not given, so the next run reads such files again.
        """
        arrays = {
            "ids": np.asarray(ids, dtype=str),
            "sha256": np.asarray(sha256, dtype="S64"),
            "labels": np.asarray(["" if lab is None else lab for lab in labels], dtype=str),
            "stat": _stat_array(stat, len(ids)),
            "fail_ids": np.asarray([f[0] for f in failures], dtype=str),
            "fail_sha256": np.asarray([f[1] for f in failures], dtype="S64"),
            "fail_reasons": np.asarray([f[2] for f in failures], dtype=str),
            "fail_stat": _stat_array(fail_stat, len(failures)),
        }
        for alias, array in (codes or {}).items():
            arrays[f"codes/{alias}"] = array
        target = self.folder / f"batch-{index:06d}.npz"
        try:
            _atomic_savez(target, arrays)
        except OSError as exc:
            raise _write_error(exc, target, _kept(self.store_path, self)) from None

    def write_segment(self, index: int, *, ids, sha256, labels, classes, codes: dict, stat, failures=(),
                      fail_stat=None) -> Path:
        """Write rows with their codes as a segment file of the store's format (a Ray actor).

        `labels` index `classes`, the class table the run planned; the commit maps the file
        into the store as it is when the store's classes are that table's beginning. Its
        failures go in a ``failures`` group. Written to a temporary name, then renamed.
        """
        target = self.folder / f"segment-{index:06d}.h5"
        tmp = self.folder / f"segment-{index:06d}.h5.tmp"
        try:
            with _h5_create(tmp) as f:
                _segment_rows(f, ids=ids, sha=sha256, labels=labels, stat=stat)
                f.attrs["classes"] = json.dumps(list(classes))
                for alias, array in codes.items():
                    n, dim = array.shape
                    f.create_dataset(f"codes/{alias}", data=array,
                                     chunks=_code_chunks(dim, array.dtype.name, n) if n else None)
                g = f.create_group("failures")
                g.create_dataset("ids", data=np.asarray([x[0] for x in failures], dtype=object), dtype=_STR)
                g.create_dataset("sha256", data=np.asarray([x[1] for x in failures], dtype="S64"))
                g.create_dataset("reasons", data=np.asarray([x[2] for x in failures], dtype=object), dtype=_STR)
                g.create_dataset("stat", data=_stat_array(fail_stat, len(failures)))
            os.replace(tmp, target)
        except (OSError, RuntimeError) as exc:
            remove_quietly(tmp)
            raise _write_error(exc, target, _kept(self.store_path, self)) from None
        return target

    def _open_segment(self, path):
        return self.remote.open_segment(path) if isinstance(path, str) else h5py.File(path, "r")

    def codes(self, path, alias: str) -> np.ndarray:
        """The codes of one layer in a journal batch (.npz) or an actor's segment (.h5)."""
        if isinstance(path, str) or path.suffix == ".h5":
            with self._open_segment(path) as f:
                return f[f"codes/{alias}"][:]
        with np.load(path, allow_pickle=False) as npz:
            return npz[f"codes/{alias}"]

    def read(self, path) -> dict:
        """A journal file's row tables: ids, sha256, labels (names), stat, failures; its
        ``codes/<alias>`` keys name the layers it holds (None: read by `codes`). An actor's
        segment in object storage is read where it is: its row tables, not its codes."""
        if isinstance(path, str) or path.suffix == ".h5":
            with self._open_segment(path) as f:
                table = json.loads(f.attrs["classes"])
                g = f["failures"]
                out = {"ids": f["ids"].asstr()[:].astype(str), "sha256": f["sha256"][:],
                       "labels": np.asarray([table[i] if i >= 0 else "" for i in f["labels"][:]], dtype=str),
                       "label_index": f["labels"][:], "classes": table, "stat": f["stat"][:],
                       "fail_ids": g["ids"].asstr()[:].astype(str), "fail_sha256": g["sha256"][:],
                       "fail_reasons": g["reasons"].asstr()[:].astype(str), "fail_stat": g["stat"][:]}
                out.update({f"codes/{a}": None for a in f["codes"]} if "codes" in f else {})
                return out
        with np.load(path, allow_pickle=False) as npz:  # codes named, not read (_journal_codes)
            out = {k: None if k.startswith("codes/") else npz[k] for k in npz.files}
        for key, n in (("stat", len(out["ids"])), ("fail_stat", len(out["fail_ids"]))):
            out.setdefault(key, _stat_array(None, n))  # a journal of a version without stat keys
        return out

    def done(self) -> tuple[dict, dict, dict]:
        """Return (id -> (sha, stat), sha -> has codes, id -> (sha, reason, stat)) of the journal."""
        ids, shas, fails = {}, {}, {}
        for path in self.files():
            npz = self.read(path)
            has_codes = any(k.startswith("codes/") for k in npz)
            for rid, sha, st in zip(npz["ids"], npz["sha256"], npz["stat"].tolist()):
                ids[str(rid)] = (sha.decode(), tuple(st))
                if has_codes:
                    shas[sha.decode()] = True
            for rid, sha, why, st in zip(npz["fail_ids"], npz["fail_sha256"], npz["fail_reasons"],
                                         npz["fail_stat"].tolist()):
                fails[str(rid)] = (sha.decode(), str(why), tuple(st))
        return ids, shas, fails

    def rows(self) -> int:
        """Rows (codes or reused content) the journal holds."""
        total = 0
        for path in self.files():
            try:
                total += len(self.read(path)["ids"])
            except (OSError, ValueError, KeyError):
                pass
        return total

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.remote is not None:
            self.remote.unmark()


# --------------------------------------------------------------------------- segments
#
# Format version 2: `codes.h5` is a small root file; the rows live in immutable segment
# files `codes.h5.d/segment-<n>.h5`, written once by the run that made them. The root's
# `ids`, `sha256`, `labels`, `stat` and `codes/<alias>` are HDF5 virtual datasets that map
# runs of segment rows, in order, so plain h5py reads `f["codes/block5"][:]` as before; the
# source paths are relative, so the store can be moved with its folder. A run writes its new
# rows as one segment and then atomically replaces the root: adding rows never rewrites the
# rows already stored. A file that changed under the same id supersedes its old row: the
# root simply stops mapping it. Small segments are merged, tiered as in an LSM tree: when a
# run's segment and the TIER_FANOUT - 1 segments before it are all of its size tier
# (rows < TIER_FANOUT ** (t + 1)) or smaller, they are rewritten as one (each row is copied
# about log_TIER_FANOUT(rows) times in its life; at most TIER_FANOUT - 1 segments per tier).

SEGMENT_FORMAT = "cnncodes.segment"
TIER_FANOUT = 8
ROW_DATASETS = ("ids", "id_hash", "sha256", "sha_key", "labels", "stat")
BLOCK_BYTES = 64 << 20  # codes copied into a segment a block of about this many bytes at a time


def id_hashes(ids) -> np.ndarray:
    """A 64-bit key per row id (blake2b of its utf-8 bytes): the store's index for lookups.

    One sorted array of these finds a run's ids among millions of stored rows without
    decoding every stored id; a match is then checked against the id itself.
    """
    digest = b"".join(hashlib.blake2b(r if isinstance(r, bytes) else r.encode(), digest_size=8).digest()
                      for r in ids)
    return np.frombuffer(digest, dtype="<i8").astype(np.int64)


def sha_keys(shas) -> np.ndarray:
    """The first 8 bytes of each sha256 (hex str or bytes) as an int64: the content index."""
    hexes = b"".join((h if isinstance(h, bytes) else h.encode())[:16] for h in shas)
    return np.frombuffer(bytes.fromhex(hexes.decode("ascii")), dtype=">i8").astype(np.int64)


def remote_store(path, storage_options=None):
    """A `RemoteStore` for a store at an object-storage URL (``s3://``, ``memory://`` ...),
    else None (a path, or a ``file://`` URL)."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    if is_url(text) and not text.lower().startswith("file://"):
        from cnncodes._store.remote import RemoteStore

        return RemoteStore(text, storage_options)
    return None


def store_path(path) -> Path:
    """A local store's path; a ``file://`` URL as its path."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    return Path(_local(text))


def segment_folder(path: Path) -> Path:
    return Path(f"{path}.d")


def _tier(rows: int) -> int:
    t = 0
    while rows >= TIER_FANOUT ** (t + 1):
        t += 1
    return t


def _code_chunks(dim: int, dtype: str, rows: int) -> tuple[int, int]:
    per = int(max(1, min(4096, (1 << 20) // (dim * np.dtype(dtype).itemsize))))
    return (max(1, min(per, rows)), dim)


class _Old:
    """The store being extended: its tables, and its rows looked up through a `CodeStore`."""

    def __init__(self, path: Path, store: "CodeStore | None" = None):
        self.path = path
        if store is None or store.path != path or store._stat_key() != store._key:
            store = CodeStore(path)  # not a snapshot of this file: open it
        self.store = store
        self.n = len(store)
        with h5py.File(path, "r") as f:
            self.version = int(f.attrs.get("format_version", 1))
            self.attrs = dict(f.attrs)
            self.classes = [c.decode() if isinstance(c, bytes) else c for c in f["classes"][:]]
            g = f["failures"]
            fstat = g["stat"][:] if "stat" in g else np.full((len(g["ids"]), 3), -1, dtype=np.int64)
            self.failures = {
                r.decode(): (bytes(s), w.decode(), tuple(st))
                for r, s, w, st in zip(g["ids"][:], g["sha256"][:], g["reasons"][:], fstat.tolist())
            }
            self.aliases = list(f["codes"])
            if self.version >= 2:
                seg = f["segments"]
                self.segments = [s.decode() for s in seg["names"][:]]
                self.segment_rows = [int(r) for r in seg["rows"][:]]
                self.runs = [tuple(int(v) for v in r) for r in seg["runs"][:]]
            else:  # the whole v1 file is one segment, rewritten (converted) by this run
                n = self.n
                self.segments, self.segment_rows, self.runs = [None], [n], [(0, 0, n)] if n else []
            self.next_segment = int(f.attrs.get("next_segment", 0))

    def live_rows_per_segment(self) -> list[int]:
        rows = [0] * len(self.segments)
        for s, a, b in self.runs:
            rows[s] += b - a
        return rows


def _compaction_start(rows: list[int], pending: int, v1: bool) -> int:
    """Index of the first old segment rewritten with this run's rows (len(rows): none)."""
    if v1:
        return 0
    start = len(rows)
    while True:
        t = _tier(pending)
        k = start
        while k > 0 and _tier(rows[k - 1]) <= t:
            k -= 1
        if start - k >= TIER_FANOUT - 1:
            pending += sum(rows[k:start])
            start = k
            continue
        return start


class _Sources:
    """Where each row of a new segment takes its codes: an old row, or a journal batch row."""

    def __init__(self):
        self.kind, self.a, self.b = [], [], []  # kind 0: old virtual row a; 1: batch a, row b

    def old(self, row: int) -> None:
        self.kind.append(0), self.a.append(row), self.b.append(0)

    def batch(self, index: int, k: int) -> None:
        self.kind.append(1), self.a.append(index), self.b.append(k)

    def arrays(self):
        return (np.asarray(self.kind, dtype=np.int8), np.asarray(self.a, dtype=np.int64),
                np.asarray(self.b, dtype=np.int64))


def _read_rows(ds, rows: np.ndarray) -> np.ndarray:
    """ds[rows] for sorted rows, read as a few contiguous slices (h5py's point reads are slow)."""
    out = np.empty((len(rows), *ds.shape[1:]), dtype=ds.dtype)
    if not len(rows):
        return out
    breaks = np.flatnonzero(np.diff(rows) > 64) + 1
    for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
        first, last = int(rows[lo]), int(rows[hi - 1])
        out[lo:hi] = ds[first:last + 1][rows[lo:hi] - first]
    return out


def _segment_rows(f, *, ids, sha, labels, stat) -> None:
    """A segment file's attributes and row tables (everything but its codes)."""
    n = len(ids)
    f.attrs["format"] = SEGMENT_FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=_STR)
    f.create_dataset("id_hash", data=id_hashes(ids))
    f.create_dataset("sha256", data=np.asarray(sha, dtype="S64"))
    f.create_dataset("sha_key", data=sha_keys(sha) if n else np.zeros(0, dtype=np.int64))
    f.create_dataset("labels", data=np.asarray(labels, dtype=np.int32))
    f.create_dataset("stat", data=np.asarray(stat, dtype=np.int64).reshape(n, 3))
    f["stat"].attrs["columns"] = "size, mtime_ns, inode (-1: unknown; for objects, shard members and " \
                                 "table rows their listing's key)"


def _write_segment(tmp: Path, *, ids, sha, labels, stat, sources: _Sources, journal: Journal, batch_paths,
                   old_path, aliases, code_dims, dtype) -> None:
    n = len(ids)
    kind, a, b = sources.arrays()
    with _h5_create(tmp) as f:
        _segment_rows(f, ids=ids, sha=sha, labels=labels, stat=stat)
        old = h5py.File(old_path, "r") if old_path is not None and (kind == 0).any() else None
        try:
            for alias in aliases:
                dim = code_dims[alias]
                ds = f.create_dataset(f"codes/{alias}", (n, dim), dtype=dtype,
                                      chunks=_code_chunks(dim, dtype, n) if n else None)
                block = max(1, BLOCK_BYTES // (dim * np.dtype(dtype).itemsize))
                cached = {}
                for lo in range(0, n, block):
                    hi = min(n, lo + block)
                    out = np.empty((hi - lo, dim), dtype=dtype)
                    k, ra, rb = kind[lo:hi], a[lo:hi], b[lo:hi]
                    sel = np.flatnonzero(k == 0)
                    if len(sel):
                        order = np.argsort(ra[sel], kind="stable")
                        rows = ra[sel][order]
                        uniq, inverse = np.unique(rows, return_inverse=True)
                        got = _read_rows(old[f"codes/{alias}"], uniq)[inverse]
                        out[sel[order]] = got
                    for index in np.unique(ra[k == 1]):
                        if index not in cached:
                            cached.clear()
                            cached[index] = journal.codes(batch_paths[index], alias)
                        pick = np.flatnonzero((k == 1) & (ra == index))
                        out[pick] = cached[index][rb[pick]]
                    ds[lo:hi] = out
        finally:
            if old is not None:
                old.close()


def _map_adopted(segments: list, runs: list, name: str, n_rows: int, rows) -> None:
    """Map an actor's segment where it is: its rows this commit keeps, as runs."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    segments.append((name, n_rows))
    edges = np.flatnonzero(np.diff(rows) != 1) + 1
    for lo, hi in zip(np.r_[0, edges], np.r_[edges, len(rows)]):
        runs.append((len(segments) - 1, int(rows[lo]), int(rows[hi - 1]) + 1))


def _layout(f, name: str, dtype, tail: tuple, folder: str, segments, runs, total: int) -> None:
    if total == 0:
        f.create_dataset(name, (0, *tail), dtype=dtype, maxshape=(None, *tail))
        return
    layout = h5py.VirtualLayout((total, *tail), dtype=dtype)
    sources = {}
    pos = 0
    for s, lo, hi in runs:
        src = sources.get(s)
        if src is None:
            name_s, rows = segments[s]
            src = sources[s] = h5py.VirtualSource(f"{folder}/{name_s}", name, shape=(rows, *tail), dtype=dtype)
        layout[pos:pos + hi - lo] = src[lo:hi]
        pos += hi - lo
    f.create_virtual_dataset(name, layout, fillvalue=None)


def _write_root(tmp: Path, *, folder_name: str, attrs: dict, spec: ExtractorSpec, classes, failures: dict,
                segments: list[tuple[str, int]], runs: list[tuple[int, int, int]], code_dims: dict,
                next_segment: int) -> None:
    total = sum(hi - lo for _, lo, hi in runs)
    dtype = spec.dtype
    with _h5_create(tmp) as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["spec"] = json.dumps(spec.to_json(), sort_keys=True)
        f.attrs["next_segment"] = next_segment
        f.attrs["segment_folder"] = folder_name
        _layout(f, "ids", _STR, (), folder_name, segments, runs, total)
        _layout(f, "id_hash", "int64", (), folder_name, segments, runs, total)
        _layout(f, "sha256", "S64", (), folder_name, segments, runs, total)
        _layout(f, "sha_key", "int64", (), folder_name, segments, runs, total)
        _layout(f, "labels", "int32", (), folder_name, segments, runs, total)
        _layout(f, "stat", "int64", (3,), folder_name, segments, runs, total)
        f.create_group("codes")
        for alias, dim in code_dims.items():
            _layout(f, f"codes/{alias}", dtype, (dim,), folder_name, segments, runs, total)
            f[f"codes/{alias}"].attrs["node"] = spec.layers[alias]
            f[f"codes/{alias}"].attrs["pooling"] = spec.pooling
        f.create_dataset("classes", data=np.asarray(classes, dtype=object), dtype=_STR, maxshape=(None,))
        g = f.create_group("failures")
        items = sorted(failures.items())
        g.create_dataset("ids", data=np.asarray([k for k, _ in items], dtype=object), dtype=_STR, maxshape=(None,))
        g.create_dataset("sha256", data=np.asarray([v[0] for _, v in items], dtype="S64"), maxshape=(None,))
        g.create_dataset("reasons", data=np.asarray([v[1] for _, v in items], dtype=object), dtype=_STR,
                         maxshape=(None,))
        g.create_dataset("stat", data=np.asarray([v[2] for _, v in items], dtype=np.int64).reshape(-1, 3))
        seg = f.create_group("segments")
        seg.create_dataset("names", data=np.asarray([s for s, _ in segments], dtype=object), dtype=_STR)
        seg.create_dataset("rows", data=np.asarray([r for _, r in segments], dtype=np.int64))
        seg.create_dataset("runs", data=np.asarray(runs, dtype=np.int64).reshape(-1, 3))
        seg["runs"].attrs["columns"] = "segment (index into names), first row, end row"


def _store_attrs(old: _Old | None, attrs: dict, new_root: bool = False) -> dict:
    """The root's provenance: kept from the store's creation, as version 1 files kept it.

    With `new_root` (a run from another data root, allowed by ``on_other_root="replace"``),
    ``data_root`` becomes this run's, and the earlier ones go to ``earlier_data_roots``.
    """
    if old is not None:
        keep = {k: v for k, v in old.attrs.items()
                if k not in ("format", "format_version", "spec", "next_segment", "segment_folder")}
        if keep and new_root:
            earlier = json.loads(keep.get("earlier_data_roots", "[]"))
            if "data_root" in keep:
                earlier.append(keep["data_root"])
            keep["earlier_data_roots"] = json.dumps(earlier)
            keep["data_root"] = attrs["data_root"]
            keep["source_kind"] = attrs["source_kind"]
        if keep:
            return keep
    return {k: (v if isinstance(v, (str, int, float)) else json.dumps(v)) for k, v in attrs.items()}


def merge(path: Path, journal: Journal, spec: ExtractorSpec, code_dims: dict[str, int], attrs: dict,
          store: "CodeStore | None" = None, new_root: bool = False) -> "Commit":
    """Commit the journal: its rows as one new segment, then a new root.

    The caller holds the store's lock. Only this run's rows are written, plus the segments a
    tiered compaction merges (a version 1 store is converted: its rows become one segment);
    the actors' segments are mapped where they are. Write failures raise `StoreWriteError`;
    the old store and the journal are then intact. `store`, the reader the run planned with,
    saves reading the rows' ids and hashes again.
    """
    path = Path(path)
    old = _Old(path, store) if path.exists() else None
    batch_paths = journal.files()
    files = [journal.read(p) for p in batch_paths]
    classes, failures, rows_in = _journal_rows(old, files)
    new, dead = _this_run(old, rows_in)
    plan = _plan_segments(old, new, dead)
    conflicts = _conflicts(new, old, dead, classes)  # read from the old root, before it is replaced
    runs = _write_commit(path, journal, batch_paths, files, old, plan, spec=spec, code_dims=code_dims,
                         attrs=_store_attrs(old, attrs, new_root), classes=classes, failures=failures)
    # The new root is in place: what it no longer maps goes (compacted segments, orphans).
    remove_unmapped(path)
    journal.remove()
    return Commit(rows=sum(hi - lo for _, lo, hi in runs), written={bytes(v[0]) for v in new.values()},
                  conflicts=conflicts)


def _journal_rows(old: "_Old | None", files: list[dict]) -> tuple[list, dict, list]:
    """(class table, failures, rows) after the journal: the store's classes and failures
    updated by the run's, and its rows as (id, sha, label index, stat, source) in journal
    order. source ("b", file, k): codes in a journal file; ("a", file, k): the row of an
    actor's segment, mapped where it is; ("s", None, None): identical content, codes elsewhere.
    """
    classes = list(old.classes) if old else []
    class_index = {c: i for i, c in enumerate(classes)}
    failures = dict(old.failures) if old else {}
    # The actors' segments index the class table the run planned: the store's classes, then
    # the new ones. Where the store's classes begin that table, their labels are the root's.
    for table in sorted((f["classes"] for f in files if "classes" in f), key=len):
        if table[:len(classes)] == classes:
            for lab in table[len(classes):]:
                class_index[lab] = len(classes)
                classes.append(lab)
    rows_in = []
    for bi, npz in enumerate(files):
        has_codes = any(k.startswith("codes/") for k in npz)
        adopt = "classes" in npz and npz["classes"] == classes[:len(npz["classes"])]
        stat = npz["stat"].tolist()
        for rid, sha, why, st in zip(npz["fail_ids"], npz["fail_sha256"], npz["fail_reasons"],
                                     npz["fail_stat"].tolist()):
            failures[str(rid)] = (bytes(sha), str(why), tuple(st))
        for k, (rid, sha, lab) in enumerate(zip(npz["ids"].tolist(), npz["sha256"].tolist(),
                                                npz["labels"].tolist())):
            failures.pop(rid, None)
            if lab and lab not in class_index:
                class_index[lab] = len(classes)
                classes.append(lab)
            src = ("a" if adopt else "b", bi, k) if has_codes else ("s", None, None)
            rows_in.append((rid, sha, class_index[lab] if lab else -1, tuple(stat[k]), src))
    return classes, failures, rows_in


def _this_run(old: "_Old | None", rows_in: list) -> tuple[dict, np.ndarray]:
    """(id -> [sha, label, stat, source] of the rows this commit adds, old rows superseded)."""
    dead = np.zeros(old.n if old else 0, dtype=bool)
    found = old.store.rows_of([r[0] for r in rows_in]) if old and rows_in else np.full(len(rows_in), -1)
    hit = np.unique(found[found >= 0])
    stored = dict(zip(hit.tolist(), zip(old.store._sha_at(hit).tolist(), old.store._labels_at(hit).tolist(),
                                        map(tuple, old.store._stat_at(hit).tolist())))) if len(hit) else {}
    new: dict[bytes, list] = {}
    for (rid, sha, label, st, src), row in zip(rows_in, found.tolist()):
        if row >= 0 and not dead[row] and stored[row] == (sha, label, st):
            continue  # committed already (a kill after the root was replaced, before cleanup)
        if row >= 0:
            dead[row] = True  # superseded: the file changed, or its stat key did
        key = rid.encode()
        new.pop(key, None)  # a later batch wins
        new[key] = [sha, label, list(st), src]
    return new, dead


@dataclass
class _SegmentPlan:
    """What a commit writes and maps: the new segment's rows and where their codes come from,
    the old segments kept (those before `start`) and their runs, the actors' rows mapped."""

    start: int = 0
    kept_runs: list = field(default_factory=list)
    ids: list = field(default_factory=list)
    sha: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    stat: list = field(default_factory=list)
    sources: _Sources = field(default_factory=_Sources)
    adopted: dict = field(default_factory=lambda: defaultdict(list))  # journal file -> its rows

    def add(self, rid: str, sha, label, st) -> None:
        self.ids.append(rid)
        self.sha.append(sha)
        self.labels.append(label)
        self.stat.append(st)


def _plan_segments(old: "_Old | None", new: dict, dead: np.ndarray) -> _SegmentPlan:
    """Which trailing old segments this commit rewrites (tiered compaction; v1: all of it),
    the rows of its new segment, and the actors' rows it maps in place."""
    plan = _SegmentPlan()
    # Codes of reused content: from a row of this run with that content, else an old row.
    first_new = {}
    for key, (sha, _, _, src) in new.items():
        if src[0] in "ab":
            first_new.setdefault(sha, src)
    wanted = {v[0] for v in new.values() if v[3][0] == "s" and v[0] not in first_new}
    first_old = {}
    if wanted:
        rows = old.store.rows_with_sha(sorted(wanted)) if old else np.zeros(0, dtype=np.int64)
        for row, sha in zip(rows.tolist(), old.store._sha_at(rows).tolist() if len(rows) else []):
            first_old.setdefault(sha, row)
    for sha, label, st, src in new.values():
        if src[0] == "a":
            plan.adopted[src[1]].append(src[2])
    pending = len(new) - sum(map(len, plan.adopted.values()))
    live = old.live_rows_per_segment() if old else []
    plan.start = _compaction_start(live, pending, v1=old is not None and old.version < 2) if old else 0
    pos = 0
    for s, lo, hi in (old.runs if old else []):
        rows = np.arange(pos, pos + hi - lo)
        alive = ~dead[pos:pos + hi - lo]
        if s >= plan.start:  # rewritten into the new segment
            keep = rows[alive]
            for rid, sha, label, st in zip(old.store._ids_at_rows(keep).tolist(), old.store._sha_at(keep).tolist(),
                                           old.store._labels_at(keep).tolist(), old.store._stat_at(keep).tolist()):
                plan.add(rid.decode(), sha, label, st)
            for v in keep.tolist():
                plan.sources.old(v)
        else:  # still mapped where it is, split around superseded rows
            edges = np.flatnonzero(np.diff(np.r_[0, alive.astype(np.int8), 0]))
            for a, b in zip(edges[::2], edges[1::2]):
                plan.kept_runs.append((s, lo + int(a), lo + int(b)))
        pos += hi - lo
    for key, (sha, label, st, src) in new.items():
        if src[0] == "a":
            continue  # mapped where the actor wrote it
        if src[0] == "s":
            src = first_new.get(sha) or (("o", first_old[sha], None) if sha in first_old else None)
            if src is None:
                raise StoreError(f"internal error: no codes for the content of {key.decode()!r}; re-run.")
        plan.add(key.decode(), sha, label, st)
        if src[0] == "o":
            plan.sources.old(src[1])
        else:
            plan.sources.batch(src[1], src[2])
    return plan


def _write_commit(path: Path, journal: Journal, batch_paths: list, files: list, old: "_Old | None",
                  plan: _SegmentPlan, *, spec: ExtractorSpec, code_dims: dict, attrs: dict, classes: list,
                  failures: dict) -> list:
    """Write the new segment (if any row), map the actors' segments, then replace the root;
    each file written under a temporary name and renamed. Return the new root's runs."""
    folder = segment_folder(path)
    segments = [(name, rows) for name, rows in zip(old.segments, old.segment_rows)][:plan.start] if old else []
    next_segment = old.next_segment if old else 0
    runs = [r for r in plan.kept_runs if r[0] < plan.start]
    written = []
    moved = []  # (segment in the store's folder, journal file it was moved from)
    tmp_seg = tmp_root = None
    target = path
    try:
        if plan.ids:
            folder.mkdir(exist_ok=True)
            name = f"segment-{next_segment:06d}.h5"
            next_segment += 1
            nbytes = len(plan.ids) * (sum(code_dims.values()) * np.dtype(spec.dtype).itemsize + 200)
            target = folder / name
            _check_room(folder, nbytes)
            tmp_seg = folder / f".{name}.tmp"
            _write_segment(tmp_seg, ids=plan.ids, sha=plan.sha, labels=plan.labels, stat=plan.stat,
                           sources=plan.sources, journal=journal, batch_paths=batch_paths,
                           old_path=path if old else None,
                           aliases=list(code_dims), code_dims=code_dims, dtype=spec.dtype)
            os.replace(tmp_seg, folder / name)
            tmp_seg = None
            written.append(folder / name)
            fsync_dir(folder)
            segments.append((name, len(plan.ids)))
            runs.append((len(segments) - 1, 0, len(plan.ids)))
        for bi in sorted(plan.adopted):  # the actors' segments join the store as they are: no copy
            if isinstance(batch_paths[bi], str):  # in object storage, under the name it keeps
                name = batch_paths[bi].rsplit("/", 1)[-1]
                next_segment = max(next_segment, journal.next_segment + 1)
                _map_adopted(segments, runs, name, len(files[bi]["ids"]), plan.adopted[bi])
                continue
            folder.mkdir(exist_ok=True)
            name = f"segment-{next_segment:06d}.h5"
            next_segment += 1
            target = folder / name
            try:
                os.link(batch_paths[bi], target)  # the journal keeps its name until the root is in
                written.append(target)
            except OSError:  # no hard links here (some network file systems): moved, and back on failure
                os.replace(batch_paths[bi], target)
                moved.append((target, batch_paths[bi]))
            _map_adopted(segments, runs, name, len(files[bi]["ids"]), plan.adopted[bi])
        if plan.adopted and folder.is_dir():
            fsync_dir(folder)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp_root, target = Path(tmp_name), path
        os.chmod(tmp_root, 0o666 & ~umask())
        _write_root(tmp_root, folder_name=folder.name, attrs=attrs, spec=spec,
                    classes=classes, failures=failures, segments=segments, runs=runs,
                    code_dims=code_dims, next_segment=next_segment)
        os.replace(tmp_root, path)
        tmp_root = None
        fsync_dir(path.parent)
    except (OSError, RuntimeError, ValueError) as exc:
        for stray in [tmp_seg, tmp_root, *written]:
            if stray is not None:
                remove_quietly(stray)
        for there, back in moved:
            with contextlib.suppress(OSError):
                os.replace(there, back)
        if isinstance(exc, ValueError) and _errno_of(exc) is None:
            raise
        raise _write_error(exc, target, _kept(path, journal)) from exc
    return runs


@dataclass
class Commit:
    """What a commit wrote: the store's rows now, the contents of this run's rows, and the
    groups of rows with one of those contents under different labels ((id, label) lists)."""

    rows: int
    written: set
    conflicts: list


def _conflicts(new: dict, old: "_Old | None", dead: np.ndarray, classes: list) -> list:
    """Conflict groups among the contents a commit wrote: its rows and the old rows it kept
    (read from the rows' tables, not from the new root: an actor's segment in object storage
    stays there)."""
    rows = [(sha, key.decode(), classes[label] if label >= 0 else None) for key, (sha, label, _, _) in new.items()]
    if old is not None and rows:
        kept = old.store.rows_with_sha(sorted({bytes(r[0]) for r in rows}))
        rows += old.store._sha_id_label(kept[~dead[kept]] if len(kept) else kept, classes)
    return sorted(_label_conflicts(rows))


def _label_conflicts(rows) -> list:
    """(sha256, id, label name) rows -> groups of (id, label) that share a content under
    different labels, each sorted, in the order their contents first come."""
    groups = defaultdict(list)
    for sha, rid, label in rows:
        groups[bytes(sha)].append((rid, label))
    return [sorted(g) for g in groups.values() if len({lab for _, lab in g}) > 1]


def remove_unmapped(path: Path) -> list[Path]:
    """Delete segment files the root does not map and temporaries of killed runs (lock held)."""
    path = Path(path)
    removed = [Path(p) for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp")]
    folder = segment_folder(path)
    if folder.is_dir():
        mapped = set()
        if path.exists():
            try:
                with h5py.File(path, "r") as f:
                    if "segments" in f:
                        mapped = {s.decode() for s in f["segments/names"][:]}
            except OSError:
                return []  # an unreadable root: touch nothing
        removed += [p for p in folder.iterdir() if p.name not in mapped]
    for p in removed:
        remove_quietly(p)
    return removed


def append_rows(path, *, ids, sha256, labels, codes: dict, stat=None) -> None:
    """Append rows to an existing store as one segment (benchmarks; synthetic growth)."""
    path = Path(path)
    store = CodeStore(path)
    with StoreLock(path):
        journal = Journal(Path(f"{path}.append"))  # its own journal: codes.h5.append.partial/
        journal.folder.mkdir(exist_ok=True)
        try:
            journal.write(0, ids=ids, sha256=sha256, labels=labels, codes=codes, stat=stat)
            dims = {a: int(c.shape[1]) for a, c in codes.items()}
            merge(path, journal, store.spec, dims, {})
        finally:
            journal.remove()


# --------------------------------------------------------------------------- reading


def _missing_segments(path: Path, f) -> list[str]:
    if "segments" not in f:
        return []
    folder = path.parent / f.attrs.get("segment_folder", segment_folder(path).name)
    return [name for name in (s.decode() for s in f["segments/names"][:])
            if not (folder / name).is_file()]


class CodeStore:
    """Read a code store: codes, labels, ids and class names as numpy arrays.

    Reads format version 2 (a root file over segment files in ``codes.h5.d/``) and version 1
    (one self-contained file) alike. The reader is a snapshot of the store as opened: when a
    run replaces the store while it is read, reading raises `StoreError` (open it again).

    Parameters
    ----------
    path : str or Path
        An HDF5 file written by :func:`cnncodes.extract`, or the URL of one in object
        storage (``s3://bucket/codes.h5``): read from a local working copy that is brought
        up to date first, moving only the segments it lacks.
    storage_options : dict, optional
        fsspec options for a store URL (endpoint, credentials); the usual environment
        variables otherwise.

    Examples
    --------
    >>> store = CodeStore("codes.h5")                      # doctest: +SKIP
    >>> X, y = store.codes("block5"), store.labels          # doctest: +SKIP
    """

    def __init__(self, path, storage_options=None):
        remote = remote_store(path, storage_options)
        self.url = remote.url if remote is not None else None
        self.path = remote.pull() if remote is not None else store_path(path)
        if self.path.is_dir():
            raise StoreError(_folder_not_store(self.path))
        if not self.path.is_file():
            raise StoreError(f"code store {self.url or str(self.path)!r} does not exist. Create it with "
                             f"`cnncodes extract`.")
        self._key = self._stat_key()
        try:
            with h5py.File(self.path, "r") as f:
                fmt = f.attrs.get("format")
                version = int(f.attrs.get("format_version", -1))
                attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
                missing = _missing_segments(self.path, f) if fmt == FORMAT and version <= FORMAT_VERSION else []
                self._len = int(f["ids"].shape[0]) if fmt == FORMAT and "ids" in f else 0
        except OSError as exc:
            raise StoreError(f"{str(self.path)!r} is not a readable HDF5 file ({exc}).") from None
        if fmt != FORMAT:
            raise StoreError(f"{str(self.path)!r} is not a cnncodes store (format attribute {fmt!r}).")
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{str(self.path)!r} has store format version {version}; this cnncodes reads up to "
                f"{FORMAT_VERSION}. Upgrade cnncodes (pip install -U cnncodes)."
            )
        if missing:
            raise StoreError(
                f"{self.path.name} is incomplete: {len(missing)} segment file(s) are missing from "
                f"{segment_folder(self.path).name}/ ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}). A store is the file and its folder: move "
                f"or copy them together; `cnncodes check {self.path.name}` lists what is damaged."
            )
        self.format_version = version
        self.attrs = attrs
        self.spec = ExtractorSpec.from_json(json.loads(attrs["spec"]),
                                            weights_path=attrs.get("weights_path", ""))

    def _stat_key(self):
        st = os.stat(self.path)
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _read(self, key, rows=slice(None)):
        with self._reading(key), h5py.File(self.path, "r") as f:
            if key not in f:
                raise StoreError(f"{str(self.path)!r} has no dataset {key!r}.")
            data = f[key][rows]
        self._check_unchanged()
        return data

    @contextlib.contextmanager
    def _reading(self, key: str):
        """Name the store and what to do when HDF5 cannot read (a damaged segment file)."""
        try:
            yield
        except OSError as exc:
            raise StoreError(
                f"{self.path.name}: cannot read {key} ({str(exc).splitlines()[0][:200]}). A file "
                f"of the store may be damaged: `cnncodes check {self.path}` names it."
            ) from None

    def _check_unchanged(self) -> None:
        if self._stat_key() != self._key:
            raise StoreError(
                f"{self.path.name} was replaced by another run while it was read. Open it again "
                f"(CodeStore(path)) to read the new rows."
            )

    def __len__(self) -> int:
        return self._len

    @cached_property
    def _raw_ids(self) -> np.ndarray:
        return self._read("ids")

    @cached_property
    def _row_of(self) -> dict:
        """Row of each id (utf-8 bytes): the slow path of `rows_of`, for ids sharing a hash."""
        return dict(zip(self._raw_ids.tolist(), range(len(self))))

    @cached_property
    def _id_index(self) -> tuple[np.ndarray, np.ndarray]:
        with h5py.File(self.path, "r") as f:
            indexed = "id_hash" in f  # written since format 2; computed for version 1 stores
        keys = self._read("id_hash") if indexed else id_hashes(self._raw_ids.tolist())
        order = np.argsort(keys, kind="stable")
        return keys[order], order

    def rows_of(self, ids) -> np.ndarray:
        """The row of each id (-1: not in the store), without reading every stored id.

        The ids' 64-bit hashes are looked up in the store's sorted `id_hash`; the ids of the
        rows found are then read and compared, so two ids sharing a hash are never confused.
        """
        rows = np.full(len(ids), -1, dtype=np.int64)
        if not len(self) or not len(ids):
            return rows
        keys, order = self._id_index
        q = id_hashes(ids)
        pos = np.searchsorted(keys, q).clip(0, len(keys) - 1)
        hit = np.flatnonzero(keys[pos] == q)
        rows[hit] = order[pos[hit]]
        if len(hit):
            srt = np.argsort(rows[hit], kind="stable")
            stored = self._ids_at_rows(rows[hit][srt])
            for k, sid in zip(hit[srt].tolist(), stored.tolist()):
                want = ids[k].encode() if isinstance(ids[k], str) else ids[k]
                if sid != want:  # a hash shared by two ids: ask the full table
                    rows[k] = self._row_of.get(want, -1)
        return rows

    def _rows_read(self, key: str, rows: np.ndarray, cached: str) -> np.ndarray:
        """`key` at sorted `rows`: from the array read already, else a few slices of the file."""
        rows = np.asarray(rows, dtype=np.int64)
        if cached in self.__dict__:
            return self.__dict__[cached][rows]
        with self._reading(key), h5py.File(self.path, "r") as f:
            data = _read_rows(f[key], rows)
        self._check_unchanged()
        return data

    def _ids_at_rows(self, rows) -> np.ndarray:
        return self._rows_read("ids", rows, "_raw_ids")

    def _sha_id_label(self, rows, names) -> list:
        """(sha256, id, label name) of these rows, names from `names` (a class table)."""
        if not len(rows):
            return []
        return [(sha, rid.decode(), names[lab] if lab >= 0 else None) for sha, rid, lab in
                zip(self._sha_at(rows).tolist(), self._ids_at_rows(rows).tolist(), self._labels_at(rows).tolist())]

    def _sha_at(self, rows) -> np.ndarray:
        return self._rows_read("sha256", rows, "_raw_sha256")

    def _labels_at(self, rows) -> np.ndarray:
        return self._rows_read("labels", rows, "_labels").astype(np.int64)

    def _stat_at(self, rows) -> np.ndarray:
        if self.format_version < 2:
            return np.full((len(rows), 3), -1, dtype=np.int64)
        return self._rows_read("stat", rows, "_stat")

    @cached_property
    def _sha_keys(self) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            indexed = "sha_key" in f  # written since format 2; computed for version 1 stores
        return self._read("sha_key") if indexed else sha_keys(self._raw_sha256.tolist())

    def rows_with_sha(self, shas) -> np.ndarray:
        """The rows (sorted) holding any of these sha256s (hex str or bytes), found through the
        stored 8-byte content keys and checked against the sha256s themselves."""
        if not len(self) or not len(shas):
            return np.zeros(0, dtype=np.int64)
        rows = np.flatnonzero(np.isin(self._sha_keys, sha_keys(shas)))
        if len(rows):
            wanted = {s if isinstance(s, bytes) else s.encode() for s in shas}
            rows = rows[[s in wanted for s in self._sha_at(rows).tolist()]]
        return rows

    def __repr__(self) -> str:
        return (f"CodeStore({self.url or str(self.path)!r}, rows={len(self)}, backbone={self.backbone!r}, "
                f"layers={self.layers}, pooling={self.spec.pooling!r})")

    @property
    def backbone(self) -> str:
        return self.spec.backbone

    @property
    def layers(self) -> list[str]:
        """The layer aliases stored, shallow to deep."""
        return list(self.spec.layers)

    @cached_property
    def _ids(self) -> np.ndarray:
        return np.array([s.decode() for s in self._raw_ids], dtype=object)

    def _ids_at(self, row: int) -> str:
        return self._raw_ids[row].decode()

    @property
    def ids(self) -> np.ndarray:
        """Row ids: paths relative to the data root."""
        return self._ids.copy()

    # The reader is a snapshot of the file as opened: small per-row arrays are read once.
    @cached_property
    def _labels(self) -> np.ndarray:
        return self._read("labels").astype(np.int64)

    @cached_property
    def _class_names(self) -> list[str]:
        return [c.decode() for c in self._read("classes")]

    @cached_property
    def _raw_sha256(self) -> np.ndarray:
        return self._read("sha256")

    @cached_property
    def _sha256(self) -> np.ndarray:
        return np.array([s.decode() for s in self._raw_sha256], dtype=object)

    @cached_property
    def _stat(self) -> np.ndarray:
        if self.format_version < 2:
            return np.full((len(self), 3), -1, dtype=np.int64)
        return self._read("stat")

    @property
    def labels(self) -> np.ndarray:
        """Label index per row (-1 when unlabelled); names in `class_names`."""
        return self._labels.copy()

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    @property
    def sha256(self) -> np.ndarray:
        """Content sha256 (hex) of each row's file."""
        return self._sha256.copy()

    @property
    def stat(self) -> np.ndarray:
        """(n_rows, 3) int64: each row's file size, mtime_ns and inode when it was read (-1: unknown).

        A later run whose file has the same three values keeps the row without reading the file.
        """
        return self._stat.copy()

    @property
    def segments(self) -> list[str]:
        """The segment files (in ``<store>.d/``) the rows live in; empty for a version 1 store."""
        if self.format_version < 2:
            return []
        return [s.decode() for s in self._read("segments/names")]

    def _alias(self, layer: str | None) -> str:
        return self.spec.alias(layer, lambda name: StoreError(
            f"{self.path.name} has no layer {name!r}; it holds {', '.join(self.layers)}. "
            f"Extract that layer into another store."))

    def codes(self, layer: str | None = None) -> np.ndarray:
        """Return the (n_rows, dim) codes of one layer (the only or deepest one by default)."""
        return self._read(f"codes/{self._alias(layer)}")

    def codes_shape(self, layer: str) -> tuple[int, int]:
        """Return the (rows, dim) shape of a layer's codes without reading them."""
        with h5py.File(self.path, "r") as f:
            return tuple(f[f"codes/{layer}"].shape)

    def failure_records(self) -> list[tuple[str, str, str]]:
        """(id, content sha256 or "", reason) of every image that could not be extracted."""
        with h5py.File(self.path, "r") as f:
            g = f["failures"]
            return [(i.decode(), s.decode(), r.decode())
                    for i, s, r in zip(g["ids"][:], g["sha256"][:], g["reasons"][:])]

    def failure_stats(self) -> dict[str, tuple[int, int, int]]:
        """id -> the (size, mtime_ns, inode) of each failed file when it failed (-1: unknown)."""
        with h5py.File(self.path, "r") as f:
            g = f["failures"]
            if "stat" not in g:
                return {}
            return {i.decode(): tuple(st) for i, st in zip(g["ids"][:], g["stat"][:].tolist())}

    @property
    def failures(self) -> list[tuple[str, str]]:
        """(id, reason) of every image that could not be extracted."""
        return [(rid, why) for rid, _, why in self.failure_records()]

    def conflicts(self, among=None) -> list[list[tuple[str, str]]]:
        """Groups of rows with identical content but different labels, as (id, label) lists by id.

        `among`: only the groups of these sha256s (hex str or bytes), e.g. a run's new rows.
        """
        if among is not None:
            return _label_conflicts(self._sha_id_label(self.rows_with_sha(list(among)), self.class_names))
        sha, labels = self._raw_sha256, self._labels
        if len(sha) < 2:
            return []
        order = np.argsort(sha, kind="stable")
        s = sha[order]
        same = s[1:] == s[:-1]
        if not same.any():
            return []
        names = self.class_names
        groups = defaultdict(list)
        dup = np.zeros(len(s), dtype=bool)
        dup[1:] |= same
        dup[:-1] |= same
        for row in np.sort(order[dup]):
            groups[bytes(sha[row])].append((self._ids_at(row), names[labels[row]] if labels[row] >= 0 else None))
        return [sorted(g) for g in groups.values() if len({lab for _, lab in g}) > 1]


# --------------------------------------------------------------------------- checking


@dataclass
class CheckResult:
    """What `check` found: ``ok`` and a list of problems, each naming the file or row."""

    path: str
    rows: int = 0
    segments: int = 0
    problems: list[str] = field(default_factory=list)
    rehashed: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        what = f"{self.rows} rows in {self.segments} segment(s)" if self.segments else f"{self.rows} rows"
        extra = f", {self.rehashed} files re-read" if self.rehashed else ""
        if self.ok:
            return f"{self.path}: OK ({what}{extra})."
        lines = [f"{self.path}: {len(self.problems)} problem(s) ({what}{extra}):"]
        lines += [f"  {p}" for p in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"  ... and {len(self.problems) - 50} more.")
        return "\n".join(lines)


def check(path, *, rehash: bool = False, root=None, progress: bool = False) -> CheckResult:
    """Verify a store: segment files present and readable, row counts agree, codes finite.

    Parameters
    ----------
    path : str or Path
        The store (``codes.h5``), or its URL in object storage (a missing segment object is
        then a problem found).
    rehash : bool
        Also re-read every row's image and compare its sha256 with the stored one.
    root : path, optional
        Where the images are, for `rehash`; by default the data root the store recorded.

    Returns
    -------
    CheckResult
        ``ok``, ``problems`` (one line each, naming the segment or the row) and ``summary()``.
    """
    remote = remote_store(path)
    if remote is not None:  # the working copy, brought up to date, is what is checked
        try:
            path = remote.pull()
        except StoreError as exc:
            return CheckResult(remote.url, problems=[str(exc)])
    path = Path(path)
    result = CheckResult(remote.url if remote is not None else str(path))
    if path.is_dir():
        raise StoreError(_folder_not_store(path))
    if not path.is_file():
        raise StoreError(f"code store {str(path)!r} does not exist. Create it with `cnncodes extract`.")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        result.problems.append(f"{path.name}: not a readable HDF5 file ({str(exc)[:200]})")
        return result
    with f:
        if f.attrs.get("format") != FORMAT:
            result.problems.append(f"{path.name}: not a cnncodes store (format {f.attrs.get('format')!r})")
            return result
        version = int(f.attrs.get("format_version", -1))
        aliases = list(f["codes"]) if "codes" in f else []
        if version >= 2:
            folder = path.parent / f.attrs.get("segment_folder", segment_folder(path).name)
            names = [s.decode() for s in f["segments/names"][:]]
            rows = [int(r) for r in f["segments/rows"][:]]
            runs = [tuple(int(v) for v in r) for r in f["segments/runs"][:]]
            result.segments = len(names)
            mapped = sum(hi - lo for _, lo, hi in runs)
            result.rows = int(f["ids"].shape[0])
            if mapped != result.rows:
                result.problems.append(f"{path.name}: the root maps {mapped} rows but its datasets hold {result.rows}")
            for s, lo, hi in runs:
                if not (0 <= s < len(names) and 0 <= lo <= hi <= rows[s]):
                    result.problems.append(f"{path.name}: a run ({s}, {lo}, {hi}) points outside its segment")
            for name, n in zip(names, rows):
                result.problems += _check_segment(folder / name, n, aliases)
        else:
            result.rows = int(f["ids"].shape[0])
            for key in ("sha256", "labels", *(f"codes/{a}" for a in aliases)):
                if f[key].shape[0] != result.rows:
                    result.problems.append(f"{path.name}: {key} has {f[key].shape[0]} rows, ids {result.rows}")
            for alias in aliases:
                result.problems += _finite(f[f"codes/{alias}"], f"{path.name}: codes/{alias}")
    if rehash and result.ok:
        store = CodeStore(path)
        base = Path(root) if root is not None else Path(store.attrs.get("data_root", "."))
        for rid, sha in zip(store.ids, store.sha256):
            try:
                with open(base / rid, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
            except OSError as exc:
                result.problems.append(f"{rid}: cannot read {base / rid} ({exc.strerror or exc})")
                continue
            result.rehashed += 1
            if digest != sha:
                result.problems.append(f"{rid}: the file changed since it was extracted (sha256 differs)")
    return result


def _finite(ds, where: str) -> list[str]:
    bad = 0
    step = max(1, BLOCK_BYTES // max(1, ds.shape[1] * ds.dtype.itemsize))
    for lo in range(0, ds.shape[0], step):
        bad += int((~np.isfinite(ds[lo:lo + step])).any(axis=1).sum())
    return [f"{where}: {bad} rows hold non-finite codes (NaN/inf)"] if bad else []


def _check_segment(seg: Path, rows: int, aliases) -> list[str]:
    name = f"{seg.parent.name}/{seg.name}"
    if not seg.is_file():
        return [f"{name}: missing"]
    try:
        with h5py.File(seg, "r") as g:
            problems = []
            if g.attrs.get("format") != SEGMENT_FORMAT:
                problems.append(f"{name}: not a cnncodes segment")
            for key in (*ROW_DATASETS, *(f"codes/{a}" for a in aliases)):
                if key not in g:
                    problems.append(f"{name}: no dataset {key}")
                elif g[key].shape[0] != rows:
                    problems.append(f"{name}: {key} has {g[key].shape[0]} rows, the root says {rows}")
            for alias in aliases:
                if f"codes/{alias}" in g:
                    problems += _finite(g[f"codes/{alias}"], f"{name}: codes/{alias}")
            return problems
    except (OSError, RuntimeError, KeyError) as exc:
        return [f"{name}: unreadable ({str(exc).splitlines()[0][:200]})"]


def _folder_not_store(path: Path) -> str:
    """The message for a folder given where a code store (one .h5 file) is expected."""
    return (f"{str(path)!r} is a folder, not a code store. A code store is one .h5 file written by "
            f"`cnncodes extract`: give the path of that file, or make one from the photos in this "
            f"folder with `cnncodes extract {path} -o codes.h5`.")
