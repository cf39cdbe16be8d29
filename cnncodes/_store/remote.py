"""A code store in object storage (``s3://``, ``gs://``, ``az://``, ``memory://`` ...), kept in
step with a local working copy by listing, not by reading.

The objects are the local layout, one object per file: the root ``codes.h5``, its immutable
segments ``codes.h5.d/segment-<n>.h5`` and, while a Ray run is under way, the run's marker
``codes.h5.partial/spec.json``. HDF5 maps files, so readers and writers work on a working copy
under the cache folder (``$CNNCODES_CACHE_DIR/stores/<hash of the URL>/``):

- `pull` asks for the root's listing key (one request); when it changed, it downloads the
  root and the segments it maps that the copy lacks. Segments never change once written, so
  what moves is what is new: an unchanged store moves no byte.
- `push`, after a commit in the working copy, uploads the segments the object store lacks,
  then the root (one PUT: a reader sees the old store or the new one, whole), then deletes the
  segments no root maps any more.
- A Ray run's actors upload their segments straight into ``codes.h5.d/`` under names no
  commit uses (``segment-<N>-<n>.h5``, N: the root's next segment number); the commit maps
  them where they are. No code passes through the driver, none is copied.

One writer at a time: a lock object ``codes.h5.lock`` names its holder (host and process). A
lock left by a killed run on this host is taken over; one from another host is refused with
what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from cnncodes._errors import StoreError, StoreLockedError
from cnncodes._io import atomic_write
from cnncodes._input.items import cache_root, filesystem, remote_key

_BUCKETS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss", "r2")
# The name of a segment a Ray actor uploaded and no commit has mapped yet.
PENDING = re.compile(r"^segment-(\d{6})-(\d{6})\.h5$")


def mapped_segments(root) -> list[str]:
    """The segment names a root file maps (an open h5py file or a local path)."""
    import h5py

    if isinstance(root, (str, os.PathLike)):
        with h5py.File(root, "r") as f:
            return mapped_segments(f)
    return [s.decode() for s in root["segments/names"][:]] if "segments" in root else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class RemoteStore:
    """A store at an fsspec URL and its local working copy (`local`)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.inner = filesystem(self.url, self.storage_options)
        name = self.inner.rsplit("/", 1)[-1]
        bucket_only = "/" not in self.inner.strip("/") and url.split("://")[0].lower() in _BUCKETS
        if url.endswith("/") or not name or bucket_only:
            raise StoreError(f"{url!r} names a bucket or folder, not a store file; give e.g. {url.rstrip('/')}/codes.h5.")
        home = cache_root() / "stores" / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.local = home / name
        self._manifest_path = home / "copy.json"

    # ------------------------------------------------------------------ names

    @property
    def folder(self) -> str:
        return f"{self.inner}.d"

    def segment(self, name: str) -> str:
        """The URL of a segment of this store."""
        return self.fs.unstrip_protocol(f"{self.folder}/{name}")

    @property
    def _marker(self) -> str:
        return f"{self.inner}.partial/spec.json"

    # ------------------------------------------------------------------ listing

    def _info(self, path: str) -> dict | None:
        self.fs.invalidate_cache(path)
        try:
            return self.fs.info(path)
        except FileNotFoundError:
            return None

    def listing(self) -> dict[str, tuple]:
        """Segment name -> listing key, of the objects in ``codes.h5.d/`` now."""
        self.fs.invalidate_cache(self.folder)
        try:
            entries = self.fs.ls(self.folder, detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rsplit("/", 1)[-1]: list(remote_key(e)) for e in entries if e.get("type") != "directory"}

    def _manifest(self) -> dict:
        try:
            return json.loads(self._manifest_path.read_text())
        except (OSError, ValueError):
            return {}

    def _save_manifest(self, manifest: dict) -> None:
        with atomic_write(self._manifest_path) as fh:
            fh.write(json.dumps(manifest).encode())

    # ------------------------------------------------------------------ pull / push

    def _get(self, remote: str, local: Path) -> None:
        # A copy of what is in object storage: whole or absent, but no fsync (it can be fetched again).
        with self.fs.open(remote, "rb", block_size=8 << 20) as src, atomic_write(local, fsync=False) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)

    def pull(self) -> Path:
        """Bring the working copy up to the object store; return its root's path.

        Moves only the root and the segments the copy lacks; nothing when the root's listing
        key is the one last pulled or pushed. Where there is no store, the copy has none.
        """
        self.local.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(f"{self.local}.d")
        if self._manifest().get("unpushed") and self.local.is_file():
            self.push()  # a commit whose upload failed: it goes first, then the copy is in step
        try:
            info = self._info(self.inner)
            manifest = self._manifest()
            if info is None:
                with contextlib.suppress(FileNotFoundError):
                    self.local.unlink()
                self._drop_unmapped(folder, set())
                self._save_manifest({})
                return self.local
            if info.get("type") == "directory":
                raise StoreError(f"{self.url} is a folder; give the store's file in it, e.g. {self.url}/codes.h5.")
            key = list(remote_key(info))
            have = manifest.get("segments", {})
            if manifest.get("root") == key and self.local.is_file() \
                    and all((folder / s).is_file() for s in manifest.get("mapped", [])):
                return self.local
            tmp_root = self.local.with_name(f".{self.local.name}.{os.getpid()}.root")
            self._get(self.url, tmp_root)
            try:
                names = mapped_segments(tmp_root)
                listed = self.listing() if names else {}
                missing = [s for s in names if s not in listed]
                if missing:
                    raise StoreError(
                        f"{self.url} is incomplete: {len(missing)} segment object(s) it maps are missing "
                        f"from {self.segment('')} ({', '.join(missing[:3])}). A store is the root and its "
                        f"folder: copy them together, or re-extract into a new store.")
                folder.mkdir(exist_ok=True)
                for s in names:
                    if have.get(s) != listed[s] or not (folder / s).is_file():
                        self._get(self.segment(s), folder / s)
                        have[s] = listed[s]
                os.replace(tmp_root, self.local)
            finally:
                with contextlib.suppress(OSError):
                    tmp_root.unlink()
        except (OSError, ValueError) as exc:
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot read the store at {self.url}: {exc}. Check the URL, the endpoint and "
                             f"the credentials (the fsspec / AWS environment variables or --storage-option).") from None
        self._drop_unmapped(folder, set(names))
        self._save_manifest({"url": self.url, "root": key, "mapped": names,
                             "segments": {s: have[s] for s in names}})
        return self.local

    @staticmethod
    def _drop_unmapped(folder: Path, names: set) -> None:
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name not in names and not p.name.startswith("."):
                    with contextlib.suppress(OSError):
                        p.unlink()

    def push(self) -> dict:
        """Upload what the object store lacks of the working copy: segments, then the root.

        Returns {"segments": uploaded names, "bytes": bytes sent}. Then deletes the segment
        objects the new root does not map (compacted ones, those of abandoned runs).
        """
        folder = Path(f"{self.local}.d")
        names = mapped_segments(self.local)
        sent, nbytes = [], 0
        self._save_manifest({**self._manifest(), "unpushed": True})  # until the root is up
        try:
            listed = self.listing()
            for s in names:
                local = folder / s
                if s in listed and (not local.is_file() or listed[s][0] == local.stat().st_size):
                    continue  # there already (immutable): an earlier push, or a Ray actor's upload
                if not local.is_file():
                    raise StoreError(f"internal error: segment {s} is neither in the working copy nor at "
                                     f"{self.segment('')}; re-run.")
                self.fs.put_file(str(local), f"{self.folder}/{s}")
                sent.append(s)
                nbytes += local.stat().st_size
            self.fs.put_file(str(self.local), self.inner)  # the commit: one PUT
            nbytes += self.local.stat().st_size
            listed = self.listing()
            for s in set(listed) - set(names):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(f"{self.folder}/{s}")
            info = self._info(self.inner)
        except OSError as exc:
            raise StoreError(
                f"cannot write the store at {self.url}: {exc}. The store there is as it was (segments "
                f"first, the root last); the codes are kept in {self.local} and go up with the next run "
                f"or read of the store: fix access and re-run.") from None
        self._save_manifest({"url": self.url, "root": list(remote_key(info)) if info else None,
                             "mapped": names,  # an actor's segment, not here, is pulled when read
                             "segments": {s: listed[s] for s in names if s in listed and (folder / s).is_file()}})
        return {"segments": sent, "bytes": nbytes}

    # ------------------------------------------------------------------ a Ray run's segments

    def pending(self, next_segment: int) -> list[str]:
        """URLs of the actor segments of the run that will commit as `next_segment`."""
        marker = self._info(self._marker)
        if marker is None:
            return []
        out = []
        for s in sorted(self.listing()):
            m = PENDING.match(s)
            if m and int(m.group(1)) == next_segment:
                out.append(self.segment(s))
        return out

    def marker(self) -> dict | None:
        """The spec of the Ray run under way (``codes.h5.partial/spec.json``), or None."""
        try:
            with self.fs.open(self._marker, "rb") as fh:
                return json.loads(fh.read())
        except FileNotFoundError:
            return None

    def mark(self, spec_json: dict) -> None:
        with self.fs.open(self._marker, "wb") as fh:
            fh.write(json.dumps(spec_json, sort_keys=True).encode())

    def unmark(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._marker)

    def open_segment(self, url: str):
        """An actor's segment, opened for reading its row tables where it is (ranged reads)."""
        import h5py

        fs, inner = filesystem(url, self.storage_options)
        return h5py.File(fs.open(inner, "rb", block_size=1 << 20, cache_type="blockcache"), "r")

    # ------------------------------------------------------------------ lock

    @contextlib.contextmanager
    def lock(self):
        """The advisory writer lock ``codes.h5.lock`` beside the root (see the module docstring)."""
        path = f"{self.inner}.lock"
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            with self.fs.open(path, "rb") as fh:
                held = json.loads(fh.read() or b"{}")
        except (FileNotFoundError, ValueError):
            held = None
        if held and not (held.get("host") == me["host"] and not _alive(int(held.get("pid", 0)))):
            raise StoreLockedError(
                f"{self.url} is being written by another run (host {held.get('host')}, pid {held.get('pid')}, "
                f"since {held.get('since')}). Wait for it to finish; if that run is dead, delete "
                f"{self.fs.unstrip_protocol(path)} and re-run (what it stored is kept).")
        with self.fs.open(path, "wb") as fh:
            fh.write(json.dumps(me).encode())
        try:
            yield self
        finally:
            with contextlib.suppress(OSError):
                self.fs.rm(path)
