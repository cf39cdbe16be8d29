"""Image sources: a folder per class, a flat folder, a CSV of path[,label], a list of paths."""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import SourceError
from ._images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Item:
    """One image to extract: its id (path relative to the root), file path and label name."""

    id: str
    path: str
    label: str | None


@dataclass
class Source:
    """The listed images of a source, in a stable order, and what was left out."""

    root: str
    items: list[Item]
    kind: str  # "class-folders" | "flat-folder" | "csv" | "paths"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)

    @property
    def class_names(self) -> list[str]:
        return sorted({i.label for i in self.items if i.label is not None})


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
    skipped = []
    rel = _walk(root)
    labelled = any(_is_image(r) and "/" in r for _, r in rel)
    items = []
    for path, rid in rel:
        if not _is_image(rid):
            skipped.append((rid, "not an image file extension"))
        elif labelled and "/" not in rid:
            skipped.append((rid, "outside the class folders"))
        else:
            label = rid.split("/", 1)[0] if labelled else None
            items.append(Item(rid, path, label))
    if not items:
        raise SourceError(
            f"no images found in {str(root)!r}. Expected image files ({', '.join(IMAGE_EXTENSIONS)}) "
            f"in one subfolder per class, or directly in the folder."
        )
    return Source(str(root), items, "class-folders" if labelled else "flat-folder", skipped)


_DELIMITERS = ",;\t"
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


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


def _from_csv(path: Path) -> Source:
    root = path.parent
    with open(path, newline="", encoding="utf-8-sig") as fh:
        text = fh.read()
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(path, text))
    numbered = [(reader.line_num, r) for r in reader]
    numbered = [(n, r) for n, r in numbered if r and any(c.strip() for c in r)]
    if numbered and numbered[0][1][0].strip().lower() in ("path", "file", "filename", "image"):
        numbered = numbered[1:]
    rows = [r for _, r in numbered]
    if not rows:
        raise SourceError(f"CSV {str(path)!r} has no rows. Expected lines of path[,label].")
    items, seen = [], set()
    for lineno, row in enumerate(rows, start=1):
        if len(row) > 2:
            raise SourceError(
                f"CSV {str(path)!r} row {lineno} has {len(row)} columns; expected path[,label]."
            )
        if _URL.match(row[0].strip()):
            raise SourceError(
                f"CSV {str(path)!r} row {lineno} (line {numbered[lineno - 1][0]}) is a URL, "
                f"{row[0].strip()[:80]!r}: URLs are not read yet, only local image files. Download the "
                f"images and list their local paths in the CSV, or wait for the data-source support."
            )
        file = Path(row[0].strip())
        full = file if file.is_absolute() else root / file
        rid = os.path.relpath(full, root).replace(os.sep, "/")
        if rid in seen:
            continue
        seen.add(rid)
        label = row[1].strip() if len(row) == 2 and row[1].strip() else None
        items.append(Item(rid, str(full), label))
    if len({i.label is None for i in items}) > 1:
        raise SourceError(f"CSV {str(path)!r} gives a label for some rows only; label all or none.")
    return Source(str(root), items, "csv")


def _from_paths(paths, labels, root=None) -> Source:
    paths = [Path(p) for p in paths]
    if not paths:
        raise SourceError("the list of image paths is empty.")
    if labels is not None and len(labels) != len(paths):
        raise SourceError(f"got {len(paths)} paths but {len(labels)} labels; give one label per path.")
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


def read_source(source, labels=None, root=None) -> Source:
    """List the images of a source.

    `source` is a folder (one subfolder per class gives labels; a flat folder gives none),
    a ``.csv`` file of ``path[,label]`` rows (paths relative to the CSV), or a list of paths
    (with optional `labels`, one per path, and an optional `root`: ids are then paths
    relative to `root` instead of to the common parent of the list). One image file is a
    list of one path.
    """
    if isinstance(source, (list, tuple)):
        return _from_paths(source, labels, root)
    if isinstance(source, (str, os.PathLike)) and _is_image(str(source)) and Path(source).expanduser().is_file():
        return _from_paths([source], labels, root)  # one photo: a list of one path
    if labels is not None:
        raise SourceError("labels= is only for a list of paths; folders and CSVs carry their labels.")
    if root is not None:
        raise SourceError("root= is only for a list of paths; ids of a folder or CSV are relative to it.")
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_folder(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _from_csv(path)
    if path.is_file():
        raise SourceError(
            f"{str(path)!r} is a file, not a folder or a .csv, and its extension is not an image's "
            f"({', '.join(IMAGE_EXTENSIONS)}). Give an image file, a folder of images (one subfolder "
            f"per class), a CSV of path[,label], or a list of paths."
        )
    raise SourceError(f"{str(path)!r} does not exist. Give a folder of images or a CSV file.")
