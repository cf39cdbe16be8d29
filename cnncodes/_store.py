"""The HDF5 code store: a self-describing file, a crash-safe journal, a writer lock, a reader."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from ._errors import StoreError, StoreLockedError
from ._spec import SPEC_KEYS, ExtractorSpec, check_spec, normalize_spec  # noqa: F401 - re-exported

FORMAT = "cnncodes.codes"
FORMAT_VERSION = 1
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


# --------------------------------------------------------------------------- journal


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_savez(path: Path, arrays: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Journal:
    """Finished batches of a run, one atomically written .npz each, beside the store.

    HDF5 files are not crash-safe while open for writing, so a run never writes into the
    store directly: it journals each batch, then merges the journal into a copy of the store
    that atomically replaces it. A kill at any moment leaves the old store intact and the
    journal to resume from.
    """

    def __init__(self, store_path: Path):
        self.folder = Path(f"{store_path}.partial")

    def exists(self) -> bool:
        return self.folder.is_dir()

    def open(self, spec: ExtractorSpec) -> None:
        """Create the journal, or check that an existing one was made with the same spec."""
        meta = self.folder / "spec.json"
        if meta.is_file():
            ExtractorSpec.from_json(json.loads(meta.read_text())).check(
                spec, f"the interrupted run in {self.folder.name}")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(json.dumps(spec.to_json(), sort_keys=True))
        os.replace(tmp, meta)
        _fsync_dir(self.folder)

    def batches(self) -> list[Path]:
        # Numeric order: Ray shards are numbered by image position, past six digits.
        paths = self.folder.glob("batch-*.npz") if self.exists() else []
        return sorted(paths, key=lambda p: int(p.stem.split("-")[1]))

    def next_index(self) -> int:
        batches = self.batches()
        return int(batches[-1].stem.split("-")[1]) + 1 if batches else 0

    def write(self, index: int, *, ids, sha256, labels, codes=None, failures=()) -> None:
        """Write one batch. `codes` maps alias -> (n, d) array (None for reused content)."""
        arrays = {
            "ids": np.asarray(ids, dtype=str),
            "sha256": np.asarray(sha256, dtype="S64"),
            "labels": np.asarray(["" if lab is None else lab for lab in labels], dtype=str),
            "fail_ids": np.asarray([f[0] for f in failures], dtype=str),
            "fail_sha256": np.asarray([f[1] for f in failures], dtype="S64"),
            "fail_reasons": np.asarray([f[2] for f in failures], dtype=str),
        }
        for alias, array in (codes or {}).items():
            arrays[f"codes/{alias}"] = array
        _atomic_savez(self.folder / f"batch-{index:06d}.npz", arrays)

    def read(self, path: Path) -> dict:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}

    def done(self) -> tuple[dict, dict, dict]:
        """Return (id -> sha, sha -> has codes, id -> (sha, reason)) of what the journal holds."""
        ids, shas, fails = {}, {}, {}
        for path in self.batches():
            with np.load(path, allow_pickle=False) as npz:
                has_codes = any(k.startswith("codes/") for k in npz.files)
                for rid, sha in zip(npz["ids"], npz["sha256"]):
                    ids[str(rid)] = sha.decode()
                    if has_codes:
                        shas[sha.decode()] = True
                for rid, sha, why in zip(npz["fail_ids"], npz["fail_sha256"], npz["fail_reasons"]):
                    fails[str(rid)] = (sha.decode(), str(why))
        return ids, shas, fails

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# --------------------------------------------------------------------------- writing


def _new_store(path: Path, spec: ExtractorSpec, code_dims: dict[str, int], attrs: dict) -> None:
    with h5py.File(path, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["spec"] = json.dumps(spec.to_json(), sort_keys=True)
        for key, value in attrs.items():
            f.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        f.create_dataset("ids", (0,), dtype=_STR, maxshape=(None,), chunks=(4096,))
        f.create_dataset("sha256", (0,), dtype="S64", maxshape=(None,), chunks=(4096,))
        f.create_dataset("labels", (0,), dtype="int32", maxshape=(None,), chunks=(4096,))
        f.create_dataset("classes", (0,), dtype=_STR, maxshape=(None,), chunks=(256,))
        codes = f.create_group("codes")
        for alias, dim in code_dims.items():
            itemsize = np.dtype(spec.dtype).itemsize
            rows = int(max(1, min(4096, (1 << 20) // (dim * itemsize))))
            ds = codes.create_dataset(alias, (0, dim), dtype=spec.dtype,
                                      maxshape=(None, dim), chunks=(rows, dim))
            ds.attrs["node"] = spec.layers[alias]
            ds.attrs["pooling"] = spec.pooling
        fails = f.create_group("failures")
        fails.create_dataset("ids", (0,), dtype=_STR, maxshape=(None,), chunks=(256,))
        fails.create_dataset("sha256", (0,), dtype="S64", maxshape=(None,), chunks=(256,))
        fails.create_dataset("reasons", (0,), dtype=_STR, maxshape=(None,), chunks=(256,))


def _append(ds, values) -> None:
    n = ds.shape[0]
    ds.resize(n + len(values), axis=0)
    ds[n:] = values


def merge(path: Path, journal: Journal, spec: ExtractorSpec, code_dims: dict[str, int], attrs: dict) -> int:
    """Merge the journal into the store atomically; return the number of rows added/updated."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if path.exists():
            shutil.copyfile(path, tmp)
        else:
            _new_store(tmp, spec, code_dims, attrs)
        changed = _merge_into(tmp, journal)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    journal.remove()
    return changed


def _merge_into(tmp: Path, journal: Journal) -> int:
    with h5py.File(tmp, "a") as f:
        classes = [c.decode() if isinstance(c, bytes) else c for c in f["classes"][:]]
        class_index = {c: i for i, c in enumerate(classes)}
        row_of = {rid.decode(): i for i, rid in enumerate(f["ids"][:])}
        shas = f["sha256"][:]
        labels = f["labels"][:]
        row_of_sha = {}
        for i, sha in enumerate(shas):
            row_of_sha.setdefault(bytes(sha), i)
        aliases = list(f["codes"])
        changed = 0

        def label_index(name: str) -> int:
            if not name:
                return -1
            if name not in class_index:
                class_index[name] = len(class_index)
                _append(f["classes"], [name])
            return class_index[name]

        failures = {r.decode(): (s, w.decode()) for r, s, w in zip(
            f["failures/ids"][:], f["failures/sha256"][:], f["failures/reasons"][:])}
        fail_count = len(failures)
        reused = []  # rows whose codes are copied from identical content, after all batches
        for bpath in journal.batches():
            batch = journal.read(bpath)
            for rid, sha, why in zip(batch["fail_ids"], batch["fail_sha256"], batch["fail_reasons"]):
                failures[str(rid)] = (bytes(sha), str(why))
            has_codes = f"codes/{aliases[0]}" in batch
            new_rows, new_sel = [], []
            for k, (rid, sha, lab) in enumerate(zip(batch["ids"], batch["sha256"], batch["labels"])):
                rid, sha, lab = str(rid), bytes(sha), label_index(str(lab))
                failures.pop(rid, None)
                row = row_of.get(rid)
                if row is not None and bytes(shas[row]) == sha and labels[row] == lab:
                    continue  # merged already (a kill after the replace, before cleanup)
                if not has_codes:
                    reused.append((rid, sha, lab))
                    continue
                changed += 1
                if row is not None:  # the file changed under the same id: overwrite
                    f["sha256"][row], f["labels"][row] = sha, lab
                    for alias in aliases:
                        f["codes"][alias][row] = batch[f"codes/{alias}"][k]
                    row_of_sha.setdefault(sha, row)
                    continue
                new_rows.append((rid, sha, lab))
                new_sel.append(k)
            if new_rows:
                start = f["ids"].shape[0]
                _append(f["ids"], [r[0] for r in new_rows])
                _append(f["sha256"], [r[1] for r in new_rows])
                _append(f["labels"], [r[2] for r in new_rows])
                for alias in aliases:
                    _append(f["codes"][alias], batch[f"codes/{alias}"][new_sel])
                for j, (rid, sha, _) in enumerate(new_rows):
                    row_of[rid] = start + j
                    row_of_sha.setdefault(sha, start + j)
        for rid, sha, lab in reused:
            src = row_of_sha.get(sha)
            if src is None:
                raise StoreError(f"internal error: no codes for the content of {rid!r}; re-run.")
            changed += 1
            row = row_of.get(rid)
            if row is None:
                row = f["ids"].shape[0]
                _append(f["ids"], [rid])
                _append(f["sha256"], [sha])
                _append(f["labels"], [lab])
                for alias in aliases:
                    _append(f["codes"][alias], f["codes"][alias][src : src + 1])
                row_of[rid] = row
            else:
                f["sha256"][row], f["labels"][row] = sha, lab
                for alias in aliases:
                    f["codes"][alias][row] = f["codes"][alias][src]
        if failures or fail_count:
            grp = f["failures"]
            items = sorted(failures.items())
            for name, values in (("ids", [k for k, _ in items]),
                                 ("sha256", [v[0] for _, v in items]),
                                 ("reasons", [v[1] for _, v in items])):
                grp[name].resize(len(items), axis=0)
                if items:
                    grp[name][:] = values
    return changed


# --------------------------------------------------------------------------- reading


class CodeStore:
    """Read a code store: codes, labels, ids and class names as numpy arrays.

    Parameters
    ----------
    path : str or Path
        An HDF5 file written by :func:`cnncodes.extract`.

    Examples
    --------
    >>> store = CodeStore("codes.h5")                      # doctest: +SKIP
    >>> X, y = store.codes("block5"), store.labels          # doctest: +SKIP
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"code store {str(self.path)!r} does not exist. Create it with `cnncodes extract`.")
        try:
            with h5py.File(self.path, "r") as f:
                fmt = f.attrs.get("format")
                version = int(f.attrs.get("format_version", -1))
                attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
                self._ids = np.array([s.decode() for s in f["ids"][:]], dtype=object) if fmt == FORMAT else None
        except OSError as exc:
            raise StoreError(f"{str(self.path)!r} is not a readable HDF5 file ({exc}).") from None
        if fmt != FORMAT:
            raise StoreError(f"{str(self.path)!r} is not a cnncodes store (format attribute {fmt!r}).")
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{str(self.path)!r} has store format version {version}; this cnncodes reads up to "
                f"{FORMAT_VERSION}. Upgrade cnncodes (pip install -U cnncodes)."
            )
        self.attrs = attrs
        self.spec = ExtractorSpec.from_json(json.loads(attrs["spec"]),
                                            weights_path=attrs.get("weights_path", ""))

    def _read(self, key):
        with h5py.File(self.path, "r") as f:
            if key not in f:
                raise StoreError(f"{str(self.path)!r} has no dataset {key!r}.")
            return f[key][:]

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return (f"CodeStore({str(self.path)!r}, rows={len(self)}, backbone={self.backbone!r}, "
                f"layers={self.layers}, pooling={self.spec.pooling!r})")

    @property
    def backbone(self) -> str:
        return self.spec.backbone

    @property
    def layers(self) -> list[str]:
        """The layer aliases stored, shallow to deep."""
        return list(self.spec.layers)

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
    def _sha256(self) -> np.ndarray:
        return np.array([s.decode() for s in self._read("sha256")], dtype=object)

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

    def codes(self, layer: str | None = None) -> np.ndarray:
        """Return the (n_rows, dim) codes of one layer (the only or deepest one by default)."""
        layer = layer or self.layers[-1]
        alias = self.spec.find_layer(layer)
        if alias is None:
            raise StoreError(
                f"{self.path.name} has no layer {layer!r}; it holds {', '.join(self.layers)}. "
                f"Extract that layer into another store."
            )
        return self._read(f"codes/{alias}")

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

    @property
    def failures(self) -> list[tuple[str, str]]:
        """(id, reason) of every image that could not be extracted."""
        return [(rid, why) for rid, _, why in self.failure_records()]

    def conflicts(self) -> list[list[tuple[str, str]]]:
        """Groups of rows with identical content but different labels, as (id, label) lists."""
        names = self.class_names
        groups = defaultdict(list)
        for rid, sha, lab in zip(self._ids, self.sha256, self.labels):
            groups[sha].append((rid, names[lab] if lab >= 0 else None))
        return [g for g in groups.values() if len({lab for _, lab in g}) > 1]
