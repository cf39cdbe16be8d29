"""Image sources, the one layer every command reads images through.

A source lists its images as `Item`s (a stable id, where the bytes are, a label, and the
change key the listing gave) and `read_bytes` reads one item's encoded image. Sources:

- a folder (one subfolder per class, or flat), a CSV of ``path[,label]`` (paths or URLs),
  a list of paths, one image file;
- any fsspec URL of a folder or an object (``s3://``, ``gs://``, ``az://``, ``memory://``,
  ``file://``...), credentials the fsspec way (environment, config files, `storage_options`);
- WebDataset tar shards (``shards/train-{000000..000009}.tar``, local or remote);
- Parquet files, Hugging Face ``datasets`` folders (``save_to_disk``) and ``Dataset``
  objects with an image column (see `tables`).

An unchanged re-run decides every item from its listing alone: local files by
(size, mtime_ns, inode), objects by (size, mtime, ETag / version), tar members and table
rows by their shard's or file's key and their position. No image byte is read for that.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from cnncodes._errors import ImageDecodeError, SourceError
from cnncodes._io import sha256_bytes
from cnncodes._input.items import (  # Item, ReadError, Source, is_url: imported from here by the commands too
    IMAGE_EXTENSIONS,
    Item,
    ReadError,
    Source,
    _local,
    _url_of,
    filesystem,
    is_url,
    path_key,
    read_file,
    remote_key,
)
from cnncodes._input.tables import SHARD_SUFFIXES, TABLE_SUFFIXES, from_dataset, from_shards, from_table, read_cell

def read_bytes(item, storage_options: dict | None = None) -> bytes:
    """The encoded image of `item` (a file, an object, a tar member or a table cell).

    `item` is an `Item`, or a path or URL. Raises `ReadError` (an OSError) with a one-line
    reason when the bytes cannot be read.
    """
    if not isinstance(item, Item):
        item = Item(str(item), _local(os.fspath(item)), None)
    if item.part.startswith(("parquet:", "arrow:")):
        return read_cell(item, storage_options)
    return read_file(item, storage_options)


def hash_item(item: Item | str, storage_options=None) -> tuple[str | None, str | None]:
    """``(sha256, None)`` of an item's bytes, or ``(None, why)`` when they cannot be read."""
    try:
        return sha256_bytes(read_bytes(item, storage_options)), None
    except OSError as exc:  # ReadError is an OSError with a readable message
        return None, str(exc)


def read_hash_decode(item: Item | str, prep, max_pixels: int, storage_options=None):
    """Read an item once, hash and decode it: ``(image, sha256, why)``.

    ``image`` is None when the bytes cannot be read (``sha256`` is then ``""``) or do not
    decode (``sha256`` is the content's); ``why`` says which, in words.
    """
    from cnncodes._input.images import decode  # PIL and torch load where images are decoded, not on import

    try:
        data = read_bytes(item, storage_options)
    except OSError as exc:
        return None, "", str(exc)
    sha = sha256_bytes(data)
    try:
        return decode(data, prep, max_pixels), sha, None
    except ImageDecodeError as exc:
        return None, sha, str(exc)


def change_key(item: Item, storage_options: dict | None = None) -> tuple[int, int, int]:
    """The item's change key: from its listing, else the local file's stat, else the object's info."""
    if item.key is not None:
        return item.key
    if not is_url(item.path):
        return path_key(item.path)  # OSError as it is: the plan records its strerror
    try:
        return path_key(item.path, storage_options)
    except FileNotFoundError:
        raise ReadError(f"no such object ({item.path})") from None
    except Exception as exc:  # botocore, aiohttp ...: one line
        raise ReadError(f"cannot list {item.path}: {type(exc).__name__}: {str(exc)[:200]}") from None


def data_root(source) -> str:
    """A source's root (or a stored root) as recorded in a store: a URL as it is, a path absolute."""
    root = source.root if isinstance(source, Source) else str(source)
    return root if is_url(root) else os.path.abspath(root)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk(folder: Path) -> list[tuple[str, str]]:
    """(path, id) of the files under folder, hidden ones left out, in a stable order.

    Plain strings, not pathlib: a re-run of 4,317 photos listed them in 0.1 s through Path
    objects, a quarter of its time.
    """
    out = []
    root = str(folder)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        out.extend((os.path.join(dirpath, f), prefix + f) for f in sorted(filenames) if not f.startswith("."))
    return out


def _from_folder(root: Path) -> Source:
    return _from_listing(str(root), _walk(root))


def _from_listing(root: str, rel: list[tuple[str, str]], keys: dict | None = None, remote=False,
                  storage_options=None) -> Source:
    """A folder's images from its (path, id) listing: labelled when they sit in subfolders."""
    skipped = []
    labelled = any(_is_image(r) and "/" in r for _, r in rel)
    items = []
    for path, rid in rel:
        if not _is_image(rid):
            skipped.append((rid, "not an image file extension"))
        elif labelled and "/" not in rid:
            skipped.append((rid, "outside the class folders"))
        else:
            label = rid.split("/", 1)[0] if labelled else None
            items.append(Item(rid, path, label, None if keys is None else keys[path]))
    if not items:
        raise SourceError(
            f"no images found in {root!r}. Expected image files ({', '.join(IMAGE_EXTENSIONS)}) "
            f"in one subfolder per class, or directly in the folder."
        )
    return Source(root, items, "class-folders" if labelled else "flat-folder", skipped, remote,
                  dict(storage_options or {}))


def _from_url_folder(url: str, storage_options: dict | None) -> Source:
    """A folder in object storage (or any fsspec file system), listed with its objects' keys."""
    fs, base = filesystem(url, storage_options)
    try:
        fs.invalidate_cache(base)  # a listing is of now, not of an earlier call in this process
        found = fs.find(base, detail=True)
    except Exception as exc:  # botocore / aiohttp errors: one line
        raise SourceError(f"cannot list {url!r}: {type(exc).__name__}: {str(exc)[:200]}. Check the URL "
                          f"and the credentials (the fsspec way: environment, config files, "
                          f"storage_options).") from None
    base = base.rstrip("/")
    rel, keys = [], {}
    for path in sorted(found):
        info = found[path]
        if info.get("type", "file") != "file":
            continue
        rid = path[len(base) + 1:] if path.startswith(base + "/") else os.path.basename(path)
        if any(part.startswith(".") for part in rid.split("/")):
            continue
        full = _url_of(fs, path)
        rel.append((full, rid))
        keys[full] = remote_key(info)
    if not rel:
        raise SourceError(f"{url!r} holds no objects (or does not exist). Give a folder URL whose "
                          f"objects are images, one prefix per class or flat.")
    return _from_listing(url.rstrip("/") + "/", rel, keys, remote=True, storage_options=storage_options)


_DELIMITERS = ",;\t"


def _delimiter(path: Path, text: str) -> str:
    """The CSV's delimiter among ``, ; tab``: the one every line of a sample has, else csv.Sniffer's.

    A file of bare paths has none of them and reads with ",". A delimiter outside these, or
    several that the sniffer cannot tell apart, is refused rather than guessed: a wrong guess
    reads whole lines as paths.
    """
    lines = [ln for ln in text.splitlines()[:20] if ln.strip()]
    everywhere = [d for d in _DELIMITERS if lines and all(d in ln for ln in lines)]
    if len(everywhere) == 1:
        return everywhere[0]
    if not everywhere:
        try:  # not ":", which Windows paths and URLs hold
            found = csv.Sniffer().sniff("\n".join(lines), delimiters="|").delimiter
        except csv.Error:
            return ","
        raise SourceError(
            f"CSV {str(path)!r} seems to be separated by {found!r}; cnncodes reads CSVs separated by "
            f"',', ';' or a tab. Save it with one of those (path[,label] on each line)."
        )
    try:
        return csv.Sniffer().sniff("\n".join(lines), delimiters="".join(everywhere)).delimiter
    except csv.Error:
        shown = " and ".join(repr(d) for d in everywhere)
        raise SourceError(
            f"CSV {str(path)!r} has both {shown} on every line, so its delimiter is unclear. "
            f"Save it with one delimiter (path[,label] on each line), or quote paths that hold it."
        ) from None


def _read_text(path, storage_options) -> str:
    if is_url(str(path)):
        fs, inner = filesystem(str(path), storage_options)
        return fs.cat_file(inner).decode("utf-8-sig")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return fh.read()


def _from_csv(path, storage_options=None) -> Source:
    """Rows of path[,label]: local paths (relative to the CSV) or URLs (their own ids)."""
    remote_csv = is_url(str(path))
    root = str(path).rsplit("/", 1)[0] + "/" if remote_csv else Path(path).parent
    text = _read_text(path, storage_options)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(path, text))
    numbered = [(reader.line_num, r) for r in reader]
    numbered = [(n, r) for n, r in numbered if r and any(c.strip() for c in r)]
    if numbered and numbered[0][1][0].strip().lower() in ("path", "file", "filename", "image", "url"):
        numbered = numbered[1:]
    rows = [r for _, r in numbered]
    if not rows:
        raise SourceError(f"CSV {str(path)!r} has no rows. Expected lines of path[,label].")
    items, seen, remote = [], set(), remote_csv
    for lineno, row in enumerate(rows, start=1):
        if len(row) > 2:
            raise SourceError(
                f"CSV {str(path)!r} row {lineno} has {len(row)} columns; expected path[,label]."
            )
        entry = _local(row[0].strip())
        if is_url(entry):  # an object or web address: the URL is its id
            full, rid, remote = entry, entry, True
        elif remote_csv:
            full = rid = str(root) + entry.lstrip("/")
        else:
            file = Path(entry)
            full = str(file if file.is_absolute() else root / file)
            rid = os.path.relpath(full, root).replace(os.sep, "/")
        if rid in seen:
            continue
        seen.add(rid)
        label = row[1].strip() if len(row) == 2 and row[1].strip() else None
        items.append(Item(rid, full, label))
    if len({i.label is None for i in items}) > 1:
        raise SourceError(f"CSV {str(path)!r} gives a label for some rows only; label all or none.")
    return Source(str(root), items, "csv", remote=remote, storage_options=dict(storage_options or {}))


def _from_paths(paths, labels, root=None) -> Source:
    if not paths:
        raise SourceError("the list of image paths is empty.")
    if labels is not None and len(labels) != len(paths):
        raise SourceError(f"got {len(paths)} paths but {len(labels)} labels; give one label per path.")
    urls = [is_url(str(p)) for p in paths]
    if any(urls):  # objects (s3://..., https://...): each URL is its own id
        if not all(urls):
            raise SourceError("the list mixes URLs and local paths; give one kind (a URL per image, or "
                              "local paths), or copy the files to one place.")
        items, seen = [], set()
        for i, url in enumerate(map(str, paths)):
            if url not in seen:
                seen.add(url)
                items.append(Item(url, url, None if labels is None else str(labels[i])))
        prefix = os.path.commonprefix([u.rsplit("/", 1)[0] + "/" for u in seen])
        return Source(prefix, items, "paths", remote=True)
    paths = [Path(p) for p in paths]
    # abspath, not resolve: a symlinked image keeps its own name, as in a folder source.
    absolute = [Path(os.path.abspath(p.expanduser())) for p in paths]
    if root is None:
        root = Path(os.path.commonpath([p.parent for p in absolute]))
    else:
        # A fixed root keeps ids stable when the list varies (e.g. between CV folds).
        root = Path(os.path.abspath(Path(root).expanduser()))
        outside = [str(p) for p in absolute if not p.is_relative_to(root)]
        if outside:
            raise SourceError(
                f"{len(outside)} image(s) are outside root {str(root)!r}, e.g. {outside[0]!r}. "
                f"Ids are paths relative to root: give a root folder that holds every image, "
                f"or root=None for the common parent of the list."
            )
    items, seen = [], set()
    for i, p in enumerate(absolute):
        rid = p.relative_to(root).as_posix()
        if rid in seen:
            continue
        seen.add(rid)
        items.append(Item(rid, str(p), None if labels is None else str(labels[i])))
    return Source(str(root), items, "paths")




def read_source(source, labels=None, root=None, *, image_column=None, label_column=None, id_column=None,
                storage_options=None) -> Source:
    """List the images of a source.

    `source` is a folder (one subfolder per class gives labels; a flat folder gives none),
    a ``.csv`` file of ``path[,label]`` rows (paths relative to the CSV, or URLs), a list of
    paths (with optional `labels`, one per path, and an optional `root`: ids are then paths
    relative to `root` instead of to the common parent of the list), one image file, an
    fsspec URL of a folder (``s3://bucket/photos/``), WebDataset tar shards (a ``.tar``
    path, URL or brace pattern ``train-{000000..000009}.tar``, or a list of them), a
    Parquet file, a folder of Parquet files or a Hugging Face ``datasets`` folder or
    ``Dataset``. A `Source` is returned as it is.

    `image_column`, `label_column` and `id_column` name a table's columns (defaults
    ``image``, ``label`` when present, ``id`` or ``key`` when present); for tar shards
    `label_column` is the member extension holding the label (default ``cls``, ``txt``,
    then ``json``'s ``label``). `storage_options` go to fsspec.
    """
    if isinstance(source, Source):
        return source
    table_opts = dict(image_column=image_column, label_column=label_column, id_column=id_column)
    if hasattr(source, "cache_files") and hasattr(source, "features"):  # a datasets.Dataset
        return from_dataset(source, **table_opts)
    if not isinstance(source, (list, tuple)):
        source = _local(source if isinstance(source, str) else os.fspath(source)
                        if isinstance(source, os.PathLike) else source)
    if isinstance(source, (list, tuple)) and source and all(
            str(s).lower().endswith(SHARD_SUFFIXES) for s in source):
        return from_shards([str(s) for s in source], label_column=label_column, storage_options=storage_options)
    if isinstance(source, (list, tuple)):
        return _from_paths([_local(str(s)) if isinstance(s, str) else s for s in source], labels, root)
    if labels is not None and not _is_image(str(source)):
        raise SourceError("labels= is only for a list of paths; folders and CSVs carry their labels.")
    if root is not None and not _is_image(str(source)):
        raise SourceError("root= is only for a list of paths; ids of a folder or CSV are relative to it.")
    text = str(source)
    lowered = text.lower().rstrip("/")
    if lowered.endswith(SHARD_SUFFIXES):
        return from_shards([text], label_column=label_column, storage_options=storage_options)
    if lowered.endswith(TABLE_SUFFIXES) or _is_dataset_folder(text, storage_options):
        return from_table(text, storage_options=storage_options, **table_opts)
    if is_url(text):
        if lowered.endswith(".csv"):
            return _from_csv(text, storage_options)
        if _is_image(lowered):  # one object: its URL is its id
            label = None if labels is None else str(labels[0])
            return Source(text.rsplit("/", 1)[0] + "/", [Item(text, text, label)], "paths", remote=True,
                          storage_options=dict(storage_options or {}))
        return _from_url_folder(text, storage_options)
    if _is_image(text) and Path(text).expanduser().is_file():
        return _from_paths([text], labels, root)  # one photo: a list of one path
    path = Path(text).expanduser()
    if path.is_dir():
        return _from_folder(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _from_csv(path)
    if path.is_file():
        raise SourceError(
            f"{str(path)!r} is a file, not a folder, a .csv, a .tar shard or a Parquet file, and its "
            f"extension is not an image's ({', '.join(IMAGE_EXTENSIONS)}). Give an image file, a folder "
            f"of images (one subfolder per class), a CSV of path[,label], shards or a table."
        )
    raise SourceError(f"{str(path)!r} does not exist. Give a folder of images, a CSV file, tar shards, "
                      f"a Parquet file or a URL.")


def _is_dataset_folder(text: str, storage_options) -> bool:
    """A local folder of Parquet files, or a Hugging Face ``save_to_disk`` folder."""
    if is_url(text):
        return False
    path = Path(text).expanduser()
    if not path.is_dir():
        return False
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return True
    images = parquet = False
    for _, p in _walk(path):
        images = images or _is_image(p)
        parquet = parquet or p.lower().endswith(".parquet")
    return parquet and not images
