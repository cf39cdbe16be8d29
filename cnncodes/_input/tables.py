"""Images inside containers: WebDataset tar shards and tables (Parquet, Arrow, ``datasets``).

Listing reads what names and labels the images, never the images: a tar shard's member
headers (and its small label members), a table's id and label columns. Each image becomes
an `Item` whose `part` says where its bytes are, and whose change key comes from its
container's key and its position, so an unchanged container is decided without reading it.

A remote shard's member index is kept in the user's cache folder under its change key
(``$CNNCODES_CACHE_DIR``, else ``~/.cache/cnncodes``), so listing it again reads nothing.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from pathlib import Path

from cnncodes._errors import SourceError
from cnncodes._io import atomic_write
from cnncodes._input.items import (IMAGE_EXTENSIONS, Item, ReadError, Source, as_read_error, cache_root, filesystem, is_url,
                     path_key, read_file, token)

# --------------------------------------------------------------------------- tar shards

_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")
_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
TABLE_SUFFIXES = (".parquet", ".pq", ".arrow")
SHARD_SUFFIXES = (".tar",)
LABEL_EXTENSIONS = ("cls", "txt", "json")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` → three names (zero-padded as written); ``{x,y}`` → two.

    Braces expand left to right, as a shell does.
    """
    ranged, listed = _BRACE_RANGE.search(pattern), _BRACE_LIST.search(pattern)
    m = ranged if ranged and (not listed or ranged.start() < listed.start()) else None
    if m:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        out = []
        for n in range(int(lo), int(hi) + 1):
            out += expand_braces(pattern[:m.start()] + str(n).zfill(width) + pattern[m.end():])
        return out
    m = _BRACE_LIST.search(pattern)
    if m:
        return [x for alt in m.group(1).split(",")
                for x in expand_braces(pattern[:m.start()] + alt + pattern[m.end():])]
    return [pattern]


def _shard_urls(patterns: list[str], storage_options) -> list[str]:
    """Shard paths or URLs of brace patterns and globs, in the order given."""
    out = []
    for pattern in patterns:
        for name in expand_braces(pattern):
            if any(c in name for c in "*?["):
                if is_url(name):
                    fs, inner = filesystem(name, storage_options)
                    found = [fs.unstrip_protocol(p) for p in sorted(fs.glob(inner))]
                else:
                    found = sorted(glob.glob(os.path.expanduser(name)))
                if not found:
                    raise SourceError(f"no shards match {name!r}. Check the pattern (braces "
                                      f"train-{{000000..000009}}.tar or a glob).")
                out += found
            else:
                out.append(name if is_url(name) else os.path.expanduser(name))
    return out


def _cache_dir() -> Path:
    return cache_root() / "tar-index"


def _webdataset_key(name: str) -> tuple[str, str]:
    """(sample key, extension) the WebDataset way: the name up to the first dot of its base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (folder + "/" + stem if folder else stem), (ext.lower() if dot else "")


def _label_of(ext: str, data: bytes, label_column: str | None) -> str | None:
    text = data.decode("utf-8", "replace").strip()
    if ext == "json" or ext.endswith(".json"):
        try:
            value = json.loads(text)
        except ValueError:
            return None
        value = value.get(label_column or "label") if isinstance(value, dict) else value
        return None if value is None else str(value)
    return text or None


def _index_shard(fh, label_column: str | None) -> tuple[list, list]:
    """(samples, skipped) of an open shard: its member headers (and small label members) only.

    A sample is [key, image member name, offset, size, label]. The image is the member with
    an image extension (the first, when there are several); the label its ``cls``, ``txt``
    or ``json`` member, or the `label_column` extension.
    """
    samples, skipped, groups, order = [], [], {}, []
    label_exts = (label_column,) if label_column else LABEL_EXTENSIONS
    tar = tarfile.open(fileobj=fh, mode="r:")
    error = None
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, OSError, EOFError) as exc:
            error = f"the shard is damaged after {len(order)} samples ({exc}); the rest is left out"
            break
        if member is None:
            break
        if not member.isfile():
            continue
        key, ext = _webdataset_key(member.name)
        if key not in groups:
            groups[key] = {}
            order.append(key)
        groups[key][ext] = (member.offset_data, member.size)
    for key in order:
        group = groups[key]
        image = next((e for e in group if e.rsplit(".", 1)[-1] in _IMAGE_EXTS), None)
        if image is None:
            skipped.append((key, f"no image member (has {', '.join(sorted(group)) or 'nothing'})"))
            continue
        label = None
        for ext in label_exts:
            for have in group:
                if have == ext or (label_column and have.endswith("." + ext)):
                    off, size = group[have]
                    if size <= 65536:
                        fh.seek(off)
                        label = _label_of(have, fh.read(size), label_column)
                    break
            if label is not None:
                break
        offset, size = group[image]
        samples.append([key, f"{key}.{image}", offset, size, label])
    if error:
        skipped.append(("", error))
    return samples, skipped


def _shard_listing(url: str, storage_options, label_column) -> tuple[list, list, tuple]:
    """(samples, skipped, shard key) of one shard, the remote ones' index cached by key."""
    if is_url(url):
        fs, inner = filesystem(url, storage_options)
        try:
            key = path_key(url, storage_options)
        except FileNotFoundError:
            raise SourceError(f"shard {url!r} does not exist. Check the URL or pattern.") from None
        cache = _cache_dir() / f"{token(url, key, label_column) & 0xFFFFFFFFFFFF:012x}.json"
        if key[1] >= 0 and cache.is_file():
            try:
                cached = json.loads(cache.read_text())
                return cached["samples"], [tuple(s) for s in cached["skipped"]], key
            except (OSError, ValueError, KeyError):
                pass
        # Headers only: ranged reads of 512 bytes, no read-ahead into the images.
        with fs.open(inner, "rb", cache_type="none") as fh:
            samples, skipped = _index_shard(fh, label_column)
        if key[1] >= 0:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(cache, fsync=False) as fh:  # a cache: rebuilt if lost
                    fh.write(json.dumps({"url": url, "samples": samples, "skipped": skipped}).encode())
            except OSError:
                pass  # no cache: the next listing reads the headers again
        return samples, skipped, key
    try:
        key = path_key(url)
        with open(url, "rb") as fh:
            samples, skipped = _index_shard(fh, label_column)
    except FileNotFoundError:
        raise SourceError(f"shard {url!r} does not exist. Check the path or pattern.") from None
    except OSError as exc:
        raise SourceError(f"cannot read shard {url!r}: {exc.strerror or exc}.") from None
    return samples, skipped, key


def from_shards(patterns: list[str], *, label_column=None, storage_options=None) -> Source:
    """The images of WebDataset tar shards (paths, URLs, brace patterns or globs).

    Ids are ``<shard name>/<sample key>``, the shard named relative to the shards' common
    folder; a member's change key is (its size, the shard's mtime, a token of the shard's
    own key and the member's offset).
    """
    urls = _shard_urls(patterns, storage_options)
    if not urls:
        raise SourceError("no tar shards given.")
    remote = any(is_url(u) for u in urls)
    common = os.path.commonpath([u.split("://", 1)[-1].rsplit("/", 1)[0] or "/" for u in urls]) \
        if len(urls) > 1 else urls[0].split("://", 1)[-1].rsplit("/", 1)[0]
    items, skipped = [], []
    for url in urls:
        inner = url.split("://", 1)[-1]
        name = inner[len(common):].lstrip("/") if inner.startswith(common) else os.path.basename(inner)
        samples, bad, key = _shard_listing(url, storage_options, label_column)
        shard_token = token(*key)
        for skey, _member, offset, size, label in samples:
            items.append(Item(f"{name}/{skey}", url, label, (size, key[1], token(shard_token, offset)),
                              f"tar:{offset}:{size}"))
        skipped += [(f"{name}/{k}" if k else name, why) for k, why in bad]
    if not items:
        raise SourceError(f"the shards ({urls[0]!r} ...) hold no images. Expected WebDataset tar files: "
                          f"members <key>.jpg (or .png ...) with <key>.cls / .txt / .json labels.")
    labelled = [i for i in items if i.label is not None]
    if labelled and len(labelled) < len(items):
        unl = [i.id for i in items if i.label is None]
        skipped += [(rid, "no label member while other samples have one") for rid in unl]
        items = labelled
    root = (urls[0].split("://", 1)[0] + "://" if remote else "") + common + "/"
    return Source(root, items, "shards", skipped, remote, dict(storage_options or {}))


# --------------------------------------------------------------------------- tables

_TABLE_CACHE: dict = {}  # (path, group, column) -> list of cells: the last row group read, per process


def _pyarrow():
    from cnncodes._optional import require

    return require("pyarrow", "reading Parquet / Arrow tables")


def _features_of(schema_metadata: dict | None, folder: str | None) -> dict:
    """The ``datasets`` features recorded with a table (Parquet metadata or dataset_info.json)."""
    if schema_metadata and b"huggingface" in schema_metadata:
        try:
            return json.loads(schema_metadata[b"huggingface"]).get("info", {}).get("features", {}) or {}
        except ValueError:
            pass
    if folder and os.path.isfile(os.path.join(folder, "dataset_info.json")):
        with open(os.path.join(folder, "dataset_info.json")) as fh:
            return json.load(fh).get("features", {}) or {}
    return {}


def _choose_columns(names: list[str], features: dict, types: dict, image_column, label_column, id_column,
                    where: str) -> tuple[str, str | None, str | None]:
    def need(col, what):
        if col is not None and col not in names:
            raise SourceError(f"{where} has no column {col!r} ({what}); its columns: {', '.join(names)}.")
        return col

    need(image_column, "image_column")
    need(label_column, "label_column")
    need(id_column, "id_column")
    if image_column is None:
        typed = [n for n in names if isinstance(features.get(n), dict) and features[n].get("_type") == "Image"]
        binary = [n for n in names if types.get(n) in ("binary", "large_binary")]
        image_column = next((c for c in ("image", "img", "jpg", "png") if c in names), None) \
            or (typed or binary or [None])[0]
        if image_column is None:
            raise SourceError(f"{where} has no image column (looked for image, img, an Image feature or "
                              f"a binary column; its columns: {', '.join(names)}). Name it with "
                              f"image_column= (--image-column).")
    if label_column is None:
        label_column = next((c for c in ("label", "labels", "class", "cls") if c in names), None)
    if id_column is None:
        id_column = next((c for c in ("id", "key", "__key__") if c in names), None)
    return image_column, label_column, id_column


def _label_names(features: dict, column: str | None) -> list[str] | None:
    feat = features.get(column) if column else None
    if isinstance(feat, dict) and feat.get("_type") == "ClassLabel":
        return list(feat.get("names") or []) or None
    return None


def _table_files(path: str, storage_options) -> tuple[list[str], str, str | None]:
    """(files, format, folder of a ``datasets`` save) of a table path."""
    if is_url(path):
        return [path], ("arrow" if path.lower().endswith(".arrow") else "parquet"), None
    if os.path.isdir(path):
        state = os.path.join(path, "state.json")
        if os.path.isfile(state):
            with open(state) as fh:
                files = [os.path.join(path, f["filename"]) for f in json.load(fh).get("_data_files", [])]
            return files, "arrow", path
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                       if f.lower().endswith((".parquet", ".pq")) and not f.startswith("."))
        return files, "parquet", path
    if not os.path.exists(path):
        raise SourceError(f"{path!r} does not exist. Give a Parquet file, a folder of them, or a "
                          f"datasets save_to_disk folder.")
    return [path], ("arrow" if path.lower().endswith(".arrow") else "parquet"), os.path.dirname(path)


def _open(path: str, storage_options):
    """A file object of a remote table; a local one's path (pyarrow opens and closes it)."""
    if is_url(path):
        fs, inner = filesystem(path, storage_options)
        return fs.open(inner, "rb")
    return path


def _arrow_table(path: str, storage_options):
    """A ``datasets`` Arrow file (IPC stream, or file format), memory-mapped when local."""
    pa = _pyarrow()
    if is_url(path):
        with _open(path, storage_options) as fh:
            source = pa.BufferReader(fh.read())
    else:
        source = pa.memory_map(path)
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source).read_all()


def from_table(path: str, *, image_column=None, label_column=None, id_column=None, storage_options=None,
               _features=None) -> Source:
    """The images of a Parquet file or folder, or a ``datasets`` save (Arrow files).

    Only the id and label columns are read to list; a row's image is read when it is
    extracted. Ids are the id column's values, else ``<file>#<row>``.
    """
    _pyarrow()
    import pyarrow.parquet as pq

    files, fmt, folder = _table_files(path, storage_options)
    if not files:
        raise SourceError(f"{path!r} holds no Parquet or Arrow files.")
    remote = is_url(path)
    root = (path.rsplit("/", 1)[0] + "/") if (remote or os.path.isfile(path)) else path.rstrip("/") + "/"
    items, skipped, seen = [], [], set()
    names_of_labels = None
    for file in files:
        where = file if len(files) == 1 else f"{path} ({os.path.basename(file)})"
        try:
            key = path_key(file, storage_options)
            if fmt == "parquet":
                pf = pq.ParquetFile(_open(file, storage_options))
                schema = pf.schema_arrow
                groups = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            else:
                table = _arrow_table(file, storage_options)
                schema, groups = table.schema, [table.num_rows]
        except SourceError:
            raise
        except Exception as exc:  # pyarrow / fsspec errors: one line
            raise SourceError(f"cannot read table {where!r}: {type(exc).__name__}: {str(exc)[:200]}.") from None
        features = _features if _features is not None else _features_of(schema.metadata, folder)
        types = {f.name: str(f.type) for f in schema}
        img, lab, rid = _choose_columns(schema.names, features, types, image_column, label_column, id_column,
                                        where)
        names_of_labels = _label_names(features, lab) or names_of_labels
        cols = [c for c in (lab, rid) if c]
        if fmt == "parquet":
            meta = pf.read(columns=cols).to_pydict() if cols else {}
        else:
            meta = table.select(cols).to_pydict() if cols else {}
        rel = os.path.relpath(file, folder) if folder and not remote else os.path.basename(file)
        ftoken = token(*key)
        row = 0
        for g, n in enumerate(groups):
            for r in range(n):
                label = meta[lab][row] if lab else None
                if label is not None and names_of_labels is not None and isinstance(label, int):
                    label = names_of_labels[label] if 0 <= label < len(names_of_labels) else None
                ident = str(meta[rid][row]) if rid else f"{rel}#{row}"
                if ident in seen:
                    skipped.append((ident, "repeats an id of an earlier row"))
                else:
                    seen.add(ident)
                    items.append(Item(ident, file, None if label is None else str(label),
                                      (-1, key[1], token(ftoken, row)), f"{fmt}:{g}:{r}:{img}"))
                row += 1
    if not items:
        raise SourceError(f"the table {path!r} has no rows.")
    if lab is not None and any(i.label is None for i in items):
        skipped += [(i.id, "no label (null) while other rows have one") for i in items if i.label is None]
        items = [i for i in items if i.label is not None]
    return Source(root, items, "table", skipped, remote, dict(storage_options or {}))


def from_dataset(ds, *, image_column=None, label_column=None, id_column=None) -> Source:
    """The images of a Hugging Face ``datasets.Dataset`` backed by Arrow files on disk."""
    if getattr(ds, "_indices", None) is not None:
        raise SourceError("this Dataset is a selection (select/shuffle/filter/train_test_split) of its "
                          "Arrow files; call ds = ds.flatten_indices() first, or ds.save_to_disk(folder) "
                          "and pass the folder.")
    files = [f["filename"] for f in ds.cache_files]
    if not files:
        raise SourceError("this Dataset lives in memory only; save it with ds.save_to_disk(folder) and "
                          "pass the folder (cnncodes reads the rows from disk, in any worker).")
    features = ds.features.to_dict() if hasattr(ds.features, "to_dict") else {}
    for name, feat in ds.features.items():  # to_dict gives "_type"; older versions may not
        kind = type(feat).__name__
        if kind in ("Image", "ClassLabel"):
            features.setdefault(name, {})["_type"] = kind
            if kind == "ClassLabel":
                features[name]["names"] = list(feat.names)
    if len(files) == 1:
        return from_table(files[0], image_column=image_column, label_column=label_column,
                          id_column=id_column, _features=features)
    sources = [from_table(f, image_column=image_column, label_column=label_column, id_column=id_column,
                          _features=features) for f in files]
    folder = os.path.commonpath([os.path.dirname(f) for f in files])
    return Source(folder + "/", [i for s in sources for i in s.items], "table",
                  [x for s in sources for x in s.skipped])


def read_cell(item: Item, storage_options=None) -> bytes:
    """The encoded image in a table cell: bytes, an HF ``{bytes, path}`` struct, or a path.

    `ReadError` with a one-line reason when it cannot be read.
    """
    try:
        return _read_cell(item, storage_options)
    except Exception as exc:  # noqa: BLE001 - pyarrow, fsspec ...: the recorded reason
        raise as_read_error(exc, item.path) from None


def _read_cell(item: Item, storage_options) -> bytes:
    fmt, group, row, column = item.part.split(":", 3)
    group, row = int(group), int(row)
    cache_key = (item.path, fmt, group, column)
    cells = _TABLE_CACHE.get(cache_key)
    if cells is None:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            _pyarrow()
            cells = pq.ParquetFile(_open(item.path, storage_options)).read_row_group(
                group, columns=[column]).column(0).to_pylist()
        else:
            cells = _arrow_table(item.path, storage_options).column(column).to_pylist()
        _TABLE_CACHE.clear()  # one row group in memory per process
        _TABLE_CACHE[cache_key] = cells
    cell = cells[row]
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
        if data is None and path:
            return _cell_path(item, path, storage_options)
        cell = data
    if isinstance(cell, str):
        return _cell_path(item, cell, storage_options)
    if not cell:
        raise ReadError(f"the {column!r} cell is empty (null)")
    if not isinstance(cell, (bytes, bytearray)):
        raise ReadError(f"the {column!r} cell holds {type(cell).__name__}, not encoded image bytes")
    return bytes(cell)


def _cell_path(item: Item, path: str, storage_options) -> bytes:
    """Bytes of an image a table cell names by path (relative to the table's folder)."""
    if not is_url(path) and not os.path.isabs(path):
        base = item.path.rsplit("/", 1)[0]
        path = f"{base}/{path}" if is_url(item.path) else os.path.join(base, path)
    return read_file(Item(item.id, path, item.label), storage_options)
