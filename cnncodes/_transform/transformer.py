"""CNNCodes: a scikit-learn transformer from images (paths or uint8 arrays) to cached CNN codes."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from cnncodes._backbones.registry import check_pooling, code_sizes, get_backbone
from cnncodes._cache import session_cache as _session_cache
from cnncodes._errors import CnnCodesError, FailedImagesError, InvalidParameterError, SourceError, StoreLockedError
from cnncodes._extract.accel import resolve_device, resolve_precision
from cnncodes._choices import DEFAULT_BACKBONE, DTYPES, IMAGENET, TTAS
from cnncodes._extract.extract import DEFAULT_RESIZE, extract
from cnncodes._io import sha256_bytes
from cnncodes._spec import ExtractorSpec
from cnncodes._input.sources import Item, ReadError, change_key, hash_item, is_url
from cnncodes._store.store import CodeStore
from cnncodes._backbones.weights import preprocess_for, resolve

# How long transform waits for another writer (a parallel CV fold, another process) of the
# same cache store before giving up. The lock is released when its holder dies, so a held
# lock means a live extraction whose rows we are about to reuse.
_LOCK_TIMEOUT_S = 3600.0


class CNNCodes(TransformerMixin, BaseEstimator):
    """Turn images into CNN codes of a frozen backbone, cached on disk by content.

    A scikit-learn transformer: ``make_pipeline(CNNCodes(layer="block4"), LogisticRegression())``
    fits and predicts on image paths, and works in ``GridSearchCV`` and ``cross_val_score``.
    Codes are computed by :func:`cnncodes.extract` into one code store per extractor
    setting in the `cache` folder and looked up by the sha256 of the image content, so
    each (image, setting) is computed once: a grid over the classifier's parameters, or
    another CV fold holding the same images, computes nothing more.

    Parameters
    ----------
    backbone : str, default="mobilenet_v2"
        A registered backbone (``cnncodes.list_backbones()``).
    layer : str, optional
        A layer alias (``"block4"``) or raw FX node name; the backbone's pre-logits layer
        when omitted.
    pooling : {"avg", "max", "gem", "flatten"}, default="avg"
        How a feature map becomes a vector.
    weights : str, path or None, default="imagenet"
        As in :func:`cnncodes.extract`; ``None`` gives random weights (seeded, so that every
        transform uses the same random network).
    image_size : int, optional
        Crop size; the weights' own preprocessing when omitted.
    cache : str or Path, optional
        Folder of the code stores, one per extractor setting, named
        ``{backbone}-{layer}-{pooling}-{hash of the other settings}.h5``. Share it between
        runs and processes to never compute a code twice. When omitted, a temporary folder
        shared by all CNNCodes of this process is used and deleted when the process exits.
    batch_size, device, num_workers, progress
        Streaming settings passed to :func:`cnncodes.extract`; they do not change the codes.
    dtype : {"float32", "float16"}, default="float32"
        Storage type of the cached codes; `transform` always returns float32.
    precision : {"auto", "float32", "bfloat16", "float16"}, default="auto"
        Arithmetic of the forward pass, as in :func:`cnncodes.extract` (``"auto"``: bfloat16
        where the device runs it natively, else float32). Part of the cache store's name.
    tta : {"none", "flip"}, default="none"
        ``"flip"`` averages the codes of each image and its mirror image.

    Attributes
    ----------
    layer_ : str
        The layer alias the codes are read at.
    n_features_out_ : int
        Length of a code vector.
    cache_path_ : Path
        The code store this transformer reads and extends.

    Notes
    -----
    `X` is a 1-D sequence of image paths (list, array, pandas Series) or a uint8 array of
    RGB images ``(N, H, W, 3)`` or greyscale images ``(N, H, W)``. Array images are stored
    as lossless PNG files for the extraction, so identical arrays share their codes.
    An image that cannot be read or decoded makes `transform` raise
    :class:`FailedImagesError` naming it: a pipeline needs one row per input, and a
    zero vector in its place would silently corrupt the model.

    Examples
    --------
    >>> from sklearn.linear_model import LogisticRegression             # doctest: +SKIP
    >>> from sklearn.pipeline import make_pipeline                      # doctest: +SKIP
    >>> model = make_pipeline(CNNCodes(layer="block4", cache="codes/"),  # doctest: +SKIP
    ...                       LogisticRegression(max_iter=1000))
    >>> model.fit(train_paths, train_labels).predict(test_paths)         # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        backbone=DEFAULT_BACKBONE,
        layer=None,
        pooling="avg",
        weights=IMAGENET,
        image_size=None,
        cache=None,
        batch_size=64,
        device="auto",
        num_workers="auto",
        dtype="float32",
        precision="auto",
        tta="none",
        progress=False,
    ):
        self.backbone = backbone
        self.layer = layer
        self.pooling = pooling
        self.weights = weights
        self.image_size = image_size
        self.cache = cache
        self.batch_size = batch_size
        self.device = device
        self.num_workers = num_workers
        self.dtype = dtype
        self.precision = precision
        self.tta = tta
        self.progress = progress

    # ------------------------------------------------------------------ sklearn API

    def fit(self, X, y=None):
        """Check `X` and the settings, and fix the layer, code size and cache store.

        Nothing is extracted here (`transform` does it, `fit_transform` does both).

        Parameters
        ----------
        X : sequence of paths, or uint8 array (N, H, W, 3) or (N, H, W)
            The images.
        y : ignored

        Returns
        -------
        self
        """
        _as_images(X)
        spec = get_backbone(self.backbone)
        info = spec.layer(self.layer)
        check_pooling(self.pooling)
        if self.dtype not in DTYPES:
            raise InvalidParameterError(f"unknown dtype {self.dtype!r}. Valid dtypes: {', '.join(DTYPES)}.")
        if self.image_size is not None and (
            isinstance(self.image_size, bool) or not isinstance(self.image_size, (int, np.integer))
            or self.image_size < 1
        ):
            raise CnnCodesError(
                f"image_size must be a positive int or None, got {self.image_size!r}."
            )
        if self.tta not in TTAS:
            raise InvalidParameterError(f"unknown tta {self.tta!r}. Valid values: {', '.join(TTAS)}.")
        device = resolve_device(self.device)
        self.precision_ = resolve_precision(self.precision, device)
        w = resolve(spec, self.weights)
        self._resize = DEFAULT_RESIZE  # extract's own choice for a new store
        prep = preprocess_for(spec, w, self.image_size, jpeg_draft=True, resize=self._resize)
        self.layer_ = info.alias
        self.n_features_out_ = int(code_sizes(spec, [info], self.pooling, prep.crop_size)[info.alias])
        # The store file is named by everything that makes codes comparable (what the
        # store's own spec checks), so settings never collide and never split needlessly.
        digest = ExtractorSpec(
            backbone=spec.name, weights=w.ref, layers={info.alias: info.node}, pooling=self.pooling,
            preprocessing={**prep.as_dict(), "description": prep.describe()},
            precision=self.precision_, tta=self.tta, dtype=self.dtype,
        ).digest()
        safe_layer = info.alias.replace(os.sep, "_")
        self._store_name = f"{spec.name}-{safe_layer}-{self.pooling}-{digest}.h5"
        self.cache_path_ = self._cache_dir() / self._store_name
        return self

    def transform(self, X):
        """Return the codes of the images, one float32 row per input, in the order of `X`.

        Codes missing from the cache store are extracted into it first.

        Parameters
        ----------
        X : sequence of paths, or uint8 array (N, H, W, 3) or (N, H, W)

        Returns
        -------
        ndarray of shape (n_images, n_features_out_), float32

        Raises
        ------
        FailedImagesError
            If some images cannot be read or decoded; they are named, with the reason.
        """
        check_is_fitted(self)
        kind, images = _as_images(X)
        rows = self._rows()
        if kind == "paths":
            shas, failures, new = _hash_paths(images)
        else:
            shas, failures, new = _hash_arrays(images, keep=lambda sha: sha not in rows)
        missing = {}
        for i, sha in enumerate(shas):
            if sha is not None and sha not in rows:
                missing.setdefault(sha, i)
        if missing:
            failed = self._extract(kind, images, missing, new)
            for i, sha in enumerate(shas):
                if sha in failed:
                    failures.append((i, failed[sha]))
        if failures:
            raise _failed_images_error(kind, images, failures)
        codes, lost = self._read_codes(shas)
        if lost:  # the file changed between our hash and the extraction's
            raise CnnCodesError(
                f"{len(lost)} images changed while they were being read "
                f"(e.g. {_name(kind, images, lost[0])}); run transform again."
            )
        return codes

    def get_feature_names_out(self, input_features=None):
        """Return the names of the code columns, ``"{layer}_{i}"``.

        `input_features` is ignored: the inputs are images, not named columns.
        """
        check_is_fitted(self)
        return np.asarray([f"{self.layer_}_{i}" for i in range(self.n_features_out_)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.transformer_tags.preserves_dtype = []  # always float32 codes
        tags.target_tags.required = False
        return tags

    def __setstate__(self, state):
        super().__setstate__(state)
        # A transformer unpickled in another process must not point at (and re-create) the
        # private cache of the process that pickled it.
        if self.cache is None and "_store_name" in state:
            self.cache_path_ = _session_cache() / self._store_name

    # ------------------------------------------------------------------ machinery

    def _cache_dir(self) -> Path:
        return _session_cache() if self.cache is None else Path(self.cache).expanduser()

    def _rows(self) -> dict[str, int]:
        """sha256 -> row of the cache store (empty when there is no store yet)."""
        if not self.cache_path_.exists():
            return {}
        rows = {}
        for k, sha in enumerate(CodeStore(self.cache_path_).sha256):
            rows.setdefault(sha, k)
        return rows

    def _read_codes(self, shas: list[str]) -> tuple[np.ndarray, list[int]]:
        """Return the codes of `shas` in order, and the positions of shas not in the store."""
        import h5py

        # One open file for the index and the codes: a writer replaces the store atomically,
        # so they come from the same version of it.
        with h5py.File(self.cache_path_, "r") as f:
            rows = {}
            for k, sha in enumerate(f["sha256"][:]):
                rows.setdefault(sha.decode(), k)
            lost = [i for i, sha in enumerate(shas) if sha not in rows]
            if lost:
                return None, lost
            unique, inverse = np.unique(np.asarray([rows[s] for s in shas], dtype=np.int64),
                                        return_inverse=True)
            lo, hi = int(unique[0]), int(unique[-1]) + 1
            ds = f[f"codes/{self.layer_}"]
            # h5py's point selection is slow for many rows: read the span when it is dense.
            if len(unique) * 8 >= hi - lo:
                block = ds[lo:hi][unique - lo]
            else:
                block = ds[unique]
        return np.ascontiguousarray(block[inverse.ravel()], dtype=np.float32), []

    def _extract(self, kind, images, missing: dict[str, int], new) -> dict[str, str]:
        """Extract one input per missing sha256; return sha -> reason of those that failed."""
        tmp = None
        try:
            if kind == "paths":
                paths = {sha: images[i] for sha, i in missing.items()}
            else:
                tmp = Path(tempfile.mkdtemp(prefix="cnncodes-arrays-"))
                paths = {}
                for sha, i in missing.items():
                    paths[sha] = str(tmp / f"{sha}.png")
                    Path(paths[sha]).write_bytes(new[i])
            sha_of = {_id(p): sha for sha, p in paths.items()}
            failed = {}
            by_anchor = {}
            for p in paths.values():
                by_anchor.setdefault(_anchor(p), []).append(p)
            for anchor, group in by_anchor.items():
                result = self._extract_locked(group, anchor)
                for rid, why in [*result.failures, *result.known_failures]:
                    if rid in sha_of:
                        failed[sha_of[rid]] = why
            return failed
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def _extract_locked(self, paths, root):
        """Run `extract`, waiting while another transformer writes the same store."""
        deadline = time.monotonic() + _LOCK_TIMEOUT_S
        pause = 0.05
        while True:
            try:
                return extract(
                    paths, out=self.cache_path_, backbone=self.backbone, layers=[self.layer_],
                    pooling=self.pooling, weights=self.weights, image_size=self.image_size,
                    batch_size=self.batch_size, device=self.device,
                    num_workers=self.num_workers, dtype=self.dtype, precision=self.precision_,
                    tta=self.tta, jpeg_draft=True, resize=self._resize, progress=self.progress,
                    root=root,
                )
            except StoreLockedError as exc:
                if time.monotonic() > deadline:
                    exc.add_note(f"CNNCodes waited {_LOCK_TIMEOUT_S:.0f} s for the other writer.")
                    raise
                time.sleep(pause)
                pause = min(1.0, pause * 2)


CNNCodes.__module__ = 'cnncodes'  # the public name goes into pickles: they load after any internal move


# ---------------------------------------------------------------------- inputs


def _as_images(X) -> tuple[str, object]:
    """Return ("paths", list of absolute path strings) or ("arrays", uint8 ndarray)."""
    if isinstance(X, (str, bytes, os.PathLike)):
        raise SourceError(
            f"CNNCodes expects a sequence of image paths or a uint8 image array; got a single "
            f"{type(X).__name__} {X!r}. Wrap it in a list: [{X!r}]."
        )
    if hasattr(X, "to_numpy") and not isinstance(X, np.ndarray):  # pandas Series/DataFrame
        X = X.to_numpy()
    if isinstance(X, np.ndarray):
        arr = X
    else:
        try:
            items = list(X)
        except TypeError:
            raise SourceError(
                f"CNNCodes expects image paths or a uint8 image array of shape (N, H, W, 3); "
                f"got {type(X).__name__}."
            ) from None
        is_path = [isinstance(x, (str, os.PathLike)) for x in items]
        if items and all(is_path):
            return "paths", [_absolute(x) for x in items]
        if any(is_path):
            bad = items[is_path.index(False)]
            raise SourceError(
                f"CNNCodes expects image paths (str or Path); got {type(bad).__name__} "
                f"{bad!r} among them."
            )
        try:
            arr = np.asarray(items) if items else np.empty((0,), dtype=object)
        except ValueError:  # ragged: images of different sizes, or mixed types
            raise SourceError(
                "CNNCodes expects image paths or a uint8 image array of shape (N, H, W, 3); "
                "got a list it cannot stack into one array (images of different sizes, or "
                "mixed types). Give a list of paths, or images of one size."
            ) from None
    if arr.ndim == 2 and arr.shape[1] == 1 and arr.dtype.kind in "OUS":
        arr = arr[:, 0]  # one column of paths (a ColumnTransformer passes it as 2-D)
    if len(arr) == 0:
        raise SourceError("CNNCodes got no images (an empty input); give at least one.")
    if arr.ndim == 1 and arr.dtype.kind in "OU":
        bad = [x for x in arr if not isinstance(x, (str, os.PathLike))]
        if not bad:
            return "paths", [_absolute(x) for x in arr]
        raise SourceError(
            f"CNNCodes expects image paths (str or Path); got {type(bad[0]).__name__} "
            f"{bad[0]!r} among them."
        )
    if arr.dtype == np.uint8 and (arr.ndim == 3 or (arr.ndim == 4 and arr.shape[-1] in (1, 3))):
        if arr.ndim == 4 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if min(arr.shape[1:3]) < 1:
            raise SourceError(f"CNNCodes got images of shape {arr.shape[1:]}; they are empty.")
        return "arrays", arr
    hint = ""
    if arr.ndim in (3, 4) and arr.dtype.kind == "f":
        hint = (" Convert images in [0, 1] with (X * 255).round().astype(np.uint8), "
                "or in [0, 255] with X.round().astype(np.uint8).")
    elif arr.ndim == 4:
        hint = " The last axis must hold the 3 RGB channels (channels last)."
    raise SourceError(
        f"CNNCodes expects image paths or a uint8 image array of shape (N, H, W, 3); "
        f"got {'an' if str(arr.dtype)[0] in 'aeiou' else 'a'} {arr.dtype} array of shape "
        f"{arr.shape}.{hint}"
    )


def _absolute(x) -> str:
    """An image's absolute path, or its URL (``s3://...``) as it is."""
    text = os.fspath(x)
    return text if is_url(text) else os.path.abspath(text)


def _anchor(path: str) -> str | None:
    """The root `extract` is given for a path (its file system's root); None for a URL."""
    return None if is_url(path) else Path(path).anchor


def _id(path: str) -> str:
    """The store id `extract(..., root=anchor)` gives a path; a URL is its own id."""
    if is_url(path):
        return path
    p = Path(path).resolve()
    return p.relative_to(p.anchor).as_posix()


# (path, size, mtime_ns, inode) -> sha256: hashing is the one cost of a fully cached
# transform, and GridSearchCV calls transform on the same files many times.
_SHA_MEMO: dict[tuple, str] = {}
_SHA_MEMO_MAX = 1_000_000


def _sha_of_file(path: str) -> tuple[str | None, str | None]:
    try:
        key = (path, *change_key(Item(path, path, None)))  # a file's stat, an object's listing
    except ReadError as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"cannot read file: {exc.strerror or exc}"
    if key in _SHA_MEMO:
        return _SHA_MEMO[key], None
    sha, why = hash_item(path)
    if sha is None:
        return None, why
    if len(_SHA_MEMO) >= _SHA_MEMO_MAX:
        _SHA_MEMO.clear()
    _SHA_MEMO[key] = sha
    return sha, None


def _hash_paths(paths):
    with ThreadPoolExecutor(max_workers=8) as pool:
        hashed = list(pool.map(_sha_of_file, paths))
    failures = [(i, err) for i, (_, err) in enumerate(hashed) if err is not None]
    return [sha for sha, _ in hashed], failures, None


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    # Deterministic, lossless; level 1 because the files live only until extracted.
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _hash_arrays(images: np.ndarray, keep):
    """sha256 of each image's PNG; the PNG bytes are kept only where `keep(sha)`."""
    shas, data = [], {}
    for i, image in enumerate(images):
        png = _png(image)
        sha = sha256_bytes(png)
        shas.append(sha)
        if keep(sha):
            data[i] = png
    return shas, [], data


def _name(kind, images, i) -> str:
    return images[i] if kind == "paths" else f"X[{i}]"


def _failed_images_error(kind, images, failures) -> FailedImagesError:
    failures = sorted(failures)
    named = [(_name(kind, images, i), why) for i, why in failures]
    lines = [f"  {name}: {why}" for name, why in named[:20]]
    if len(named) > 20:
        lines.append(f"  ... and {len(named) - 20} more (FailedImagesError.failures).")
    what = "files" if kind == "paths" else "images"
    return FailedImagesError(
        f"{len(named)} of {len(images)} {what} could not be read or decoded:\n"
        + "\n".join(lines)
        + "\nRemove them from X (and their labels from y): a pipeline needs one row of "
        "codes per input, and cnncodes never fills in zero vectors.",
        named,
    )
