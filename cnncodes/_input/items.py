"""What a source is made of: an `Item` (an image's id, where its bytes are, its label, its
change key), a `Source` (a listing of items), URLs and their file systems, and reading the
bytes of a file, an object or a byte range of one. `tables` and `sources` build on it."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cnncodes._errors import ReadError, SourceError

UNKNOWN_KEY = (-1, -1, -1)
# The files a folder or a shard lists as images (here, not in images.py: listing needs no torch).
IMAGE_EXTENSIONS = (
    # .jfif and .jpe are JPEG files under other names; PIL reads them as JPEG.
    ".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
)


def cache_root() -> Path:
    """cnncodes' cache folder: ``$CNNCODES_CACHE_DIR``, else ``$XDG_CACHE_HOME/cnncodes``
    (``~/.cache/cnncodes``): tar-shard indexes, working copies of remote stores."""
    base = os.environ.get("CNNCODES_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cnncodes")
    return Path(base)


@dataclass(frozen=True)
class Item:
    """One image: its id, where its bytes are, its label name, and its change key.

    `path` is a local path or an fsspec URL: the image file itself, or the tar shard or
    table that holds it, `part` then saying where (``"tar:<offset>:<size>"``,
    ``"parquet:<row group>:<row>:<column>"``, ``"arrow:<batch>:<row>:<column>"``).
    `key` is the change key the listing gave, (size, mtime_ns, token); None for a local
    file, whose key is its stat when the run plans.
    """

    id: str
    path: str
    label: str | None
    key: tuple | None = None
    part: str = ""


@dataclass
class Source:
    """The listed images of a source, in a stable order, and what was left out.

    `remote` is true when the bytes come through fsspec (object storage, HTTP, memory):
    a run then does not read them to plan, and `storage_options` go to every reader.
    """

    root: str
    items: list[Item]
    kind: str  # "class-folders" | "flat-folder" | "csv" | "paths" | "shards" | "table"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    remote: bool = False
    storage_options: dict = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return sorted({i.label for i in self.items if i.label is not None})


# --------------------------------------------------------------------------- URLs and keys

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def is_url(source) -> bool:
    """True for ``scheme://...`` strings other than ``file://`` (which are local paths)."""
    return isinstance(source, str) and bool(_URL.match(source)) and not source.lower().startswith("file://")


def _local(source):
    """A ``file://`` URL as a local path; anything else unchanged."""
    if isinstance(source, str) and source.lower().startswith("file://"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(source).path)
    return source


def token(*parts) -> int:
    """A 64-bit int of some strings: the third column of a change key for non-local data."""
    text = "\x00".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True)


def _ns(value) -> int:
    """A listing's modification time (datetime, seconds, ISO string) as ns; -1 unknown."""
    import datetime as dt

    if value is None:
        return -1
    if isinstance(value, dt.datetime):
        return int(value.timestamp() * 1e9)
    if isinstance(value, (int, float)):
        return int(value * 1e9) if value < 1e12 else int(value)
    try:
        return int(dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp() * 1e9)
    except ValueError:
        return -1


def remote_key(info: dict) -> tuple[int, int, int]:
    """(size, mtime_ns, token of ETag / version / checksum) of an fsspec listing entry.

    Unknown when the listing gives neither a time nor a tag: such an object is read again
    by every run.
    """
    size = int(info.get("size") or 0)
    mtime = _ns(next((info[k] for k in ("LastModified", "last_modified", "mtime", "updated", "created")
                      if info.get(k) is not None), None))
    tag = next((info[k] for k in ("ETag", "etag", "VersionId", "version_id", "md5Hash", "md5", "crc32c",
                                  "content_md5") if info.get(k)), None)
    if tag is None and mtime < 0:
        return UNKNOWN_KEY
    return size, mtime, token(tag) if tag is not None else -1


_FS_CACHE: dict = {}


def filesystem(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path inside it) of a URL, the filesystem cached per process."""
    from cnncodes._optional import require

    fsspec = require("fsspec", f"reading {url[:60]!r}")
    protocol = url.split("://", 1)[0].lower()
    # Per process: an async file system (s3fs) is bound to its event loop, which a forked
    # decoding process does not share.
    key = (os.getpid(), protocol, repr(sorted((storage_options or {}).items())))
    fs = _FS_CACHE.get(key)
    if fs is None:
        try:
            fs, _ = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise SourceError(
                f"cannot open {url[:80]!r}: {exc}. Install the fsspec implementation of "
                f"{protocol}:// (s3fs, gcsfs, adlfs ...; pip install 'cnncodes[sources]' has s3fs)."
            ) from None
        _FS_CACHE[key] = fs
    return fs, fs._strip_protocol(url)


def _url_of(fs, path: str) -> str:
    return fs.unstrip_protocol(path)


# --------------------------------------------------------------------------- reading bytes

def path_key(path: str, storage_options: dict | None = None) -> tuple[int, int, int]:
    """The change key of a file (size, mtime_ns, inode) or an object (`remote_key` of its info,
    listed now, not from an earlier listing this process cached). Raises FileNotFoundError."""
    if is_url(path):
        fs, inner = filesystem(path, storage_options)
        fs.invalidate_cache(inner)
        return remote_key(fs.info(inner))
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def as_read_error(exc: BaseException, where: str) -> ReadError:
    """Any failure to read bytes as a one-line `ReadError` (the reason a failure records)."""
    if isinstance(exc, ReadError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return ReadError(f"cannot read file: {exc.strerror or 'no such object'} ({where})")
    if isinstance(exc, OSError):
        return ReadError(f"cannot read file: {exc.strerror or exc}")
    # botocore, aiohttp, pyarrow ...: one line, and the run goes on
    return ReadError(f"cannot read {where}: {type(exc).__name__}: {str(exc)[:200]}")


def read_file(item: Item, storage_options: dict | None = None) -> bytes:
    """The bytes of a local file or an object, or of the byte range ``part`` names (a tar
    member, ``"tar:<offset>:<size>"``); `ReadError` with a one-line reason otherwise."""
    try:
        start = size = None
        if item.part.startswith("tar:"):
            _, start, size = item.part.split(":")
            start, size = int(start), int(size)
        if is_url(item.path):
            fs, path = filesystem(item.path, storage_options)
            if start is None:
                return fs.cat_file(path)
            data = fs.cat_file(path, start=start, end=start + size)
        else:
            with open(item.path, "rb") as fh:
                if start is None:
                    return fh.read()
                fh.seek(start)
                data = fh.read(size)
        if len(data) != size:
            raise ReadError(f"the shard {item.path.rsplit('/', 1)[-1]} ends inside this member "
                            f"(truncated: {len(data)} of {size} bytes)")
        return data
    except Exception as exc:  # noqa: BLE001 - every failure becomes the recorded reason
        raise as_read_error(exc, item.path) from None
