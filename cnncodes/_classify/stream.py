"""Linear models on stores larger than memory: a scaler and an SGD classifier fed chunk by chunk."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from cnncodes._errors import CnnCodesError, InvalidParameterError
from cnncodes._classify.fit_meta import fit_meta
from cnncodes._store.store import CodeStore

LOSSES = ("log_loss", "hinge", "modified_huber")


def _read_rows(ds, start: int, stop: int) -> np.ndarray:
    """Read rows [start, stop) of an HDF5 dataset or array as float32 (one read per chunk)."""
    return np.asarray(ds[start:stop], dtype=np.float32)


def _pieces(n_rows: int, piece_rows: int, rows: np.ndarray):
    """Return (start, stop, selected offsets) of the contiguous pieces holding some of `rows`."""
    out = []
    for start in range(0, n_rows, piece_rows):
        stop = min(start + piece_rows, n_rows)
        lo, hi = np.searchsorted(rows, [start, stop])
        if hi > lo:
            out.append((start, stop, rows[lo:hi] - start))
    return out


def _groups(pieces, chunk_rows: int, order):
    """Group pieces (in `order`) into chunks of at most `chunk_rows` selected rows."""
    group, size = [], 0
    for p in order:
        n = len(pieces[p][2])
        if group and size + n > chunk_rows:
            yield group
            group, size = [], 0
        group.append(pieces[p])
        size += n
    if group:
        yield group


def fit_streaming(
    codes,
    labels=None,
    *,
    layer: str | None = None,
    rows=None,
    chunk_rows: int = 65_536,
    epochs: int = 5,
    alpha: float = 1e-4,
    loss: str = "log_loss",
    random_state: int | None = 0,
) -> Pipeline:
    """Fit a standardised linear classifier by SGD, reading the codes chunk by chunk.

    For stores too large to load: one pass fits a :class:`~sklearn.preprocessing.StandardScaler`
    with ``partial_fit``, then `epochs` passes feed :class:`~sklearn.linear_model.SGDClassifier`
    (averaged SGD) with ``partial_fit``. Stores list images class by class, so a chunk is
    never a contiguous block: the rows are cut into contiguous pieces of ``chunk_rows // 16``
    rows (cheap HDF5 reads), and each chunk gathers pieces from all over the file, in a new
    random order each epoch, shuffled inside. At most `chunk_rows` codes are in memory. On stores that fit in memory,
    :func:`cnncodes.fit` with ``classifier="logreg"`` (exact, cross-validated C) is better;
    ``fit(..., classifier="sgd")`` calls this function.

    Parameters
    ----------
    codes : path, CodeStore or array of shape (n, d)
        A code store (its labelled rows are used) or a feature matrix (an ``h5py.Dataset``
        works too: it is read by slices).
    labels : array of shape (n,), optional
        Labels when `codes` is not a store.
    layer : str, optional
        Which stored layer to use (the deepest one by default).
    rows : array of int, optional
        Rows to train on (e.g. the train side of :func:`cnncodes.split_store`).
    chunk_rows : int
        Rows read per block; bounds the memory used (``chunk_rows * dim * 4`` bytes).
    epochs : int
        Passes of SGD over the data (after the one pass of the scaler).
    alpha : float
        L2 regularisation of the SGD classifier.
    loss : {"log_loss", "hinge", "modified_huber"}
        ``"log_loss"``: logistic regression (probabilities); ``"hinge"``: a linear SVM
        (no probabilities); ``"modified_huber"``: a smooth hinge with probabilities.
    random_state : int, optional
        Seed of the block order, the shuffles and SGD.

    Returns
    -------
    sklearn.pipeline.Pipeline
        ``StandardScaler`` then ``SGDClassifier``, fitted; it carries ``cnncodes_`` like the
        models of :func:`cnncodes.fit`, whose ``["fit"]`` records ``chunks`` (chunks fed,
        scaler pass included), ``reads`` (slices read) and ``max_rows_in_memory``.

    Examples
    --------
    >>> from cnncodes import fit_streaming, split_store                     # doctest: +SKIP
    >>> train, test = split_store("big.h5")                                 # doctest: +SKIP
    >>> model = fit_streaming("big.h5", rows=train, chunk_rows=100_000)     # doctest: +SKIP
    """
    if loss not in LOSSES:
        raise InvalidParameterError(f"unknown loss {loss!r} for the streaming fit. Valid losses: {', '.join(LOSSES)}.")
    for name, value in (("chunk_rows", chunk_rows), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InvalidParameterError(f"{name} must be an integer >= 1, got {value!r}.")
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise InvalidParameterError(f"alpha must be a positive number, got {alpha!r}.")
    t0 = time.perf_counter()
    store = None
    if isinstance(codes, (str, Path, CodeStore)):
        store = codes if isinstance(codes, CodeStore) else CodeStore(codes)
        layer = store.spec.alias(layer, lambda name: CnnCodesError(
            f"{store.path.name} has no layer {name!r}; it holds {', '.join(store.layers)}."))
        idx = store.labels
        y_all = np.array(store.class_names, dtype=object)[np.maximum(idx, 0)].astype(str)
        labelled = idx >= 0
    else:
        if labels is None:
            raise CnnCodesError("fit_streaming(X) on arrays needs labels: fit_streaming(X, y).")
        y_all = np.asarray(labels)
        labelled = np.ones(len(y_all), dtype=bool)
    rows = np.flatnonzero(labelled) if rows is None else np.asarray(rows, dtype=np.int64)
    rows = np.unique(rows)  # sorted: blocks are read in file order
    if len(rows) == 0:
        raise CnnCodesError("no labelled rows to fit on; extract a folder with one subfolder per "
                            "class, or pass rows of labelled images.")
    if not labelled[rows].all():
        raise CnnCodesError(f"{int((~labelled[rows]).sum())} of the rows given are unlabelled; "
                            f"pass labelled rows only (store.labels >= 0).")
    classes = np.unique(y_all[rows])
    if len(classes) < 2:
        raise CnnCodesError(f"fit needs at least 2 classes, got {len(classes)} ({classes[:3]}).")

    rng = np.random.default_rng(random_state)
    scaler = StandardScaler()
    head = SGDClassifier(loss=loss, alpha=alpha, average=True,
                         random_state=None if random_state is None else int(random_state))
    stats = {"chunks": 0, "reads": 0, "max_rows_in_memory": 0}

    def run(ds):
        piece_rows = max(1, chunk_rows // 16)
        pieces = _pieces(ds.shape[0], piece_rows, rows)

        def read(group):
            parts, at = [], []
            for start, stop, sel in group:
                parts.append(_read_rows(ds, start, stop)[sel])
                at.append(sel + start)
                stats["reads"] += 1
            X = np.concatenate(parts)
            stats["chunks"] += 1
            stats["max_rows_in_memory"] = max(stats["max_rows_in_memory"], len(X))
            return X, np.concatenate(at)

        for group in _groups(pieces, chunk_rows, range(len(pieces))):
            scaler.partial_fit(read(group)[0])
        for _ in range(epochs):
            for group in _groups(pieces, chunk_rows, rng.permutation(len(pieces))):
                X, at = read(group)
                order = rng.permutation(len(at))
                head.partial_fit(scaler.transform(X[order]), y_all[at[order]], classes=classes)

    if store is not None:
        with h5py.File(store.path, "r") as f:
            run(f[f"codes/{layer}"])
    else:
        run(codes)
    model = Pipeline([("scale", scaler), ("sgd", head)])
    info = {"classifier": "sgd", "n_train": int(len(rows)), "loss": loss, "alpha": float(alpha),
            "epochs": int(epochs), "chunk_rows": int(chunk_rows), **stats,
            "seconds": time.perf_counter() - t0}
    model.cnncodes_ = fit_meta(info, layer, store, rows)
    return model
