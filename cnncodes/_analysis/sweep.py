"""Layer sweep: one extraction pass over every layer, then a cross-validated linear probe per layer."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnncodes._cache import session_cache
from cnncodes._choices import PROBES
from cnncodes._errors import CnnCodesError, InvalidParameterError, UnknownLayerError
from cnncodes._io import save_figure
from cnncodes._outputs import PNG, check_output

# C grids of the probe (inverse L2 strength on standardised codes). Low-dimensional early
# layers want weak regularisation (on digits block1, 16 dims, accuracy still rises at C=1) and
# the wide last layers strong (flowers5 block5, 1,280 dims, peaks near C=1e-3), so the grid
# spans six decades; the path stops once the inner score has fallen twice in a row.
SWEEP_CS = {
    "logreg": (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0),
    "linear_svm": (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
}
INNER_FOLDS = 3
MIN_PER_CLASS = 4  # per class kept by a max_images sample: a test fold + an inner 2-fold split
# C when no class has 2 distinct images in a training part to choose it by (the grid's middle).
FALLBACK_C = 1.0


@dataclass
class LayerScore:
    """The cross-validated linear probe of one layer."""

    layer: str  # alias, or the raw node name when it has none
    node: str
    dims: int
    scores: np.ndarray  # accuracy on each outer fold
    Cs: list[float]  # the C chosen inside each outer fold
    # 1/0 per probed row: its out-of-fold prediction right or wrong (SweepResult.rows order)
    correct: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores))

    @property
    def std(self) -> float:
        return float(np.std(self.scores))


@dataclass
class SweepResult:
    """What :func:`sweep` measured: one :class:`LayerScore` per layer, shallow to deep.

    ``best_layer`` is the layer with the highest mean accuracy over the folds (the shallower
    one on an exact tie). Every layer is scored on the same folds, so differences between
    layers are paired: ``gain_over_last`` and ``gain_std`` compare the best layer with the
    deepest one fold by fold.
    """

    layers: list[LayerScore]
    backbone: str
    weights: str
    store: str
    data: str
    n_images: int
    class_names: list[str]
    cv: int
    classifier: str
    random_state: int | None
    seconds: float = 0.0
    probe_seconds: float = 0.0
    extract: object = None  # the ExtractResult of this run's extraction; None for a store input
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int), repr=False)  # store rows probed
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int), repr=False)  # class per probed row
    fold_of: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int), repr=False)  # test fold per row
    cv_requested: int | None = None  # the cv asked for; ``cv`` is the folds used (fewer for a tiny class)
    left_out: list[str] = field(default_factory=list)  # classes of one distinct image, not scored
    notes: list[str] = field(default_factory=list)  # how the sweep adapted to small classes

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def best(self) -> LayerScore:
        return self.layers[int(np.argmax([s.mean for s in self.layers]))]

    @property
    def best_layer(self) -> str:
        """The alias of the layer with the highest mean cross-validated accuracy."""
        return self.best.layer

    @property
    def last(self) -> LayerScore:
        """The deepest layer swept (the pre-logits features when all aliases are swept)."""
        return self.layers[-1]

    @property
    def gain_over_last(self) -> float:
        """Mean accuracy of the best layer minus that of the deepest one (0 when it is the deepest)."""
        return self.best.mean - self.last.mean

    @property
    def gain_std(self) -> float:
        """Standard deviation over the folds of the paired per-fold difference best - deepest."""
        return float(np.std(self.best.scores - self.last.scores))

    def differences(self, *, n_resamples: int | None = None, confidence: float | None = None) -> dict:
        """Accuracy of each layer minus that of the best one, with its paired bootstrap interval.

        Every layer's out-of-fold predictions cover the same rows, so the rows are resampled
        together (stratified by class), as :func:`cnncodes.compare` does. Returns
        ``{layer: Interval}``, None for the best layer itself.
        """
        from cnncodes._stats import CONFIDENCE, N_RESAMPLES, accuracy_intervals

        best = self.best
        y = np.asarray(self.labels)
        out = {}
        for s in self.layers:
            if s is best or not len(s.correct) or len(s.correct) != len(best.correct):
                out[s.layer] = None
                continue
            out[s.layer], _ = accuracy_intervals(
                s.correct - best.correct, y, n_resamples=n_resamples or N_RESAMPLES,
                confidence=confidence or CONFIDENCE, random_state=self.random_state)
        return out

    def score(self, layer: str) -> LayerScore:
        """Return the :class:`LayerScore` of one layer (alias or node name)."""
        for s in self.layers:
            if layer in (s.layer, s.node):
                return s
        raise UnknownLayerError(f"layer {layer!r} was not swept; the sweep holds "
                                f"{', '.join(s.layer for s in self.layers)}.")

    def as_dicts(self) -> list[dict]:
        """One dict per layer (layer, node, dims, mean, std, scores, Cs), e.g. for pandas."""
        return [{"layer": s.layer, "node": s.node, "dims": s.dims, "mean": s.mean, "std": s.std,
                 "scores": [float(v) for v in s.scores], "Cs": list(s.Cs)} for s in self.layers]

    def table(self) -> str:
        """The per-layer table and the best layer, as plain text."""
        best = self.best
        diffs = self.differences()
        head = ("layer", "node", "dims", f"accuracy ({self.cv}-fold)", "C (per fold)", "vs best (95 % CI)")
        rows = [head] + [
            (s.layer, s.node, str(s.dims), f"{s.mean:.3f} ± {s.std:.3f}",
             ", ".join(f"{c:g}" for c in s.Cs), _diff_cell(diffs[s.layer]))
            for s in self.layers
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [
            f"layer sweep of {self.data}: {self.backbone} ({self.weights}), {self.n_images} "
            f"images, {self.n_classes} classes; {self.classifier} probe, stratified {self.cv}-fold CV "
            f"grouped by content, C chosen inside each fold",
        ]
        for r, s in zip(rows, [None, *self.layers]):
            mark = "  <- best" if s is best else ""
            lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) if i == 2 else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(r, widths))).rstrip() + mark)
        line = f"best layer: {best.layer} ({best.mean:.3f} ± {best.std:.3f})"
        if best is not self.last:
            line += (f", {100 * self.gain_over_last:+.1f} points over the last layer {self.last.layer} "
                     f"({self.last.mean:.3f}; paired difference ± {100 * self.gain_std:.1f} over the folds)")
        lines.append(line)
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def plot(self, path) -> Path:
        """Write accuracy per layer (mean ± std over the folds) as a PNG; needs matplotlib."""
        from cnncodes._optional import require_pyplot

        plt = require_pyplot("plotting the layer sweep")
        x = np.arange(len(self.layers))
        means = [s.mean for s in self.layers]
        stds = [s.std for s in self.layers]
        fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(x) + 1.5), 3.6))
        ax.errorbar(x, means, yerr=stds, marker="o", capsize=4, color="tab:blue")
        b = int(np.argmax(means))
        ax.plot([x[b]], [means[b]], marker="*", markersize=16, color="tab:orange", linestyle="none",
                label=f"best: {self.layers[b].layer} {means[b]:.3f}")
        ax.set_xticks(x, [f"{s.layer}\n{s.dims}" for s in self.layers])
        ax.set_ylabel(f"accuracy ({self.cv}-fold CV)")
        ax.set_xlabel("layer (code size)")
        ax.set_title(f"{self.backbone} layer sweep: {Path(self.data).name or self.data}, "
                     f"{self.n_images} images")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        path = Path(path)
        check_output(path, PNG)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_figure(fig, path, dpi=120)
        plt.close(fig)
        return path


def _diff_cell(d) -> str:
    if d is None:
        return "-"
    mark = "" if d.excludes(0.0) else " (noise)"
    return f"{d.estimate:+.3f} [{d.low:+.3f}, {d.high:+.3f}]{mark}"


# ---------------------------------------------------------------------------- inputs


def is_store_path(x) -> bool:
    """True for a CodeStore or an existing .h5/.hdf5 file (a code store, not images)."""
    from cnncodes._store.store import CodeStore

    if isinstance(x, CodeStore):
        return True
    return isinstance(x, (str, Path)) and Path(x).suffix.lower() in (".h5", ".hdf5")


def _default_store(source, backbone, weights, pooling, image_size, layers) -> Path:
    """A store in this process's temporary cache, one per (source, settings): deleted at exit."""
    key = json.dumps([str(Path(str(source)).resolve()) if not isinstance(source, (list, tuple))
                      else sorted(map(str, source)), backbone, str(weights), pooling, image_size,
                      layers], sort_keys=True)
    return session_cache() / f"sweep-{backbone}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.h5"


def _distinct_per_class(labels, groups) -> dict[int, int]:
    """Distinct images (content groups) of each class."""
    return {int(c): len(set(groups[labels == c])) for c in np.unique(labels)}


def _names(names, classes, limit=5) -> str:
    shown = ", ".join(repr(names[c]) for c in classes[:limit])
    return shown + (f" and {len(classes) - limit} more" if len(classes) > limit else "")


def _check_classes(labels, groups, names, cv, where):
    """Plan the folds for the classes at hand, or refuse when nothing can be cross-validated.

    A class of a single distinct image cannot be both trained on and tested, so it is left
    out of the scoring; the folds are lowered to what the smallest remaining class allows
    (each fold tests every class). Returns ``(kept classes, left-out classes, folds, notes)``.
    """
    classes = np.unique(labels)
    if len(classes) < 2:
        found = f"1 class ({names[classes[0]]!r})" if len(classes) else "no labelled images"
        raise CnnCodesError(
            f"a layer sweep compares how well each layer separates classes, so it needs labelled "
            f"images of at least 2 classes; {where} has {found}. Check that the folder has one "
            f"subfolder per class (or that the CSV has a label column)."
        )
    distinct = _distinct_per_class(labels, groups)
    single = [c for c in classes if distinct[c] < 2]
    kept = [c for c in classes if distinct[c] >= 2]
    if len(kept) < 2:
        raise CnnCodesError(
            f"a layer sweep needs at least 2 classes of 2 or more distinct images (one to train on, "
            f"one to test); {where} has {len(kept)} such class(es), and {len(single)} class(es) of a "
            f"single image ({_names(names, single)}). Add images to those classes.")
    notes = []
    if single:
        notes.append(
            f"{len(single)} class(es) with a single distinct image cannot be cross-validated and were "
            f"left out of the scoring: {_names(names, single, limit=20)}")
    smallest = min(kept, key=lambda c: (distinct[c], names[c]))
    folds = min(cv, distinct[smallest])
    if folds < cv:
        notes.append(
            f"{folds} folds instead of the {cv} asked for: class {names[smallest]!r} has "
            f"{distinct[smallest]} distinct images, and every fold tests every class")
    return kept, single, folds, notes


# ---------------------------------------------------------------------------- the probe


def _make(classifier, C):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if classifier == "logreg":
        head = LogisticRegression(C=C, max_iter=2000, warm_start=True)
    else:
        head = LinearSVC(C=C, dual="auto", max_iter=5000)
    return make_pipeline(StandardScaler(), head)


def _inner_classes(y, groups) -> np.ndarray:
    """The classes of a training part that an inner CV can use: 2 or more distinct images."""
    return np.array([c for c in np.unique(y) if len(set(groups[y == c])) >= 2], dtype=int)


def _choose_c(X, y, groups, classifier, Cs, random_state):
    """C by grouped, stratified inner CV; the path goes up the grid, warm-started, and stops
    once the mean inner accuracy has fallen twice in a row (it is unimodal in practice).

    Classes with a single distinct image in this training part cannot be split, so they are
    left out of the choice of C (not of the model); with fewer than 2 classes left, C is
    ``FALLBACK_C``.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    inner = _inner_classes(y, groups)
    if len(inner) < 2:
        return FALLBACK_C
    keep = np.isin(y, inner)
    X, y, groups = X[keep], y[keep], groups[keep]
    per_class = min(len(set(groups[y == c])) for c in inner)
    k = min(INNER_FOLDS, per_class)
    splits = list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=random_state)
                  .split(X, y, groups))
    models = [_make(classifier, Cs[0]) for _ in splits]
    best_c, best, falls, last = Cs[0], -1.0, 0, -1.0
    for C in Cs:
        accs = []
        for model, (tr, te) in zip(models, splits):
            model[-1].set_params(C=C)
            model.fit(X[tr], y[tr])  # the scaler refits identically; the head warm-starts
            accs.append(float(np.mean(model.predict(X[te]) == y[te])))
        acc = float(np.mean(accs))
        if acc > best:
            best_c, best = C, acc
        falls = falls + 1 if acc < last else 0
        last = acc
        if falls >= 2:
            break
    return best_c


def _probe_fold(X, y, groups, train, test, classifier, Cs, random_state):
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    # One BLAS thread per task: tasks run in parallel, and a multithreaded BLAS on cores
    # that are busy spins instead of computing (50x slower for these small problems).
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        C = _choose_c(X[train], y[train], groups[train], classifier, Cs, random_state)
        model = _make(classifier, C).fit(X[train], y[train])
        right = model.predict(X[test]) == y[test]
        return float(np.mean(right)), C, right


# ---------------------------------------------------------------------------- sweep


def sweep(
    data,
    *,
    backbone: str = "mobilenet_v2",
    layers=None,
    store=None,
    cv: int = 5,
    classifier: str = "logreg",
    random_state: int | None = 0,
    max_images: int | None = None,
    weights="imagenet",
    pooling: str = "avg",
    image_size: int | None = None,
    batch_size: int = 64,
    device="auto",
    num_workers="auto",
    n_jobs: int | None = -1,
    plot=None,
    progress: bool = True,
) -> SweepResult:
    """Cross-validated linear probe of every layer of a backbone: where are the useful features?

    All layers are extracted in one forward pass into a code store; then each layer gets the
    same stratified `cv`-fold split, grouped by content sha256 (an image stored twice, e.g.
    under two class folders, never sits on both sides), and on each fold a standardised linear
    classifier is trained on the training part and scored on the held-out part. Its C is
    chosen inside the training part by a grouped 3-fold CV over the grid ``SWEEP_CS``
    (decades 1e-4 ... 100 for logreg), so the reported accuracy is an honest, nested estimate.

    Parameters
    ----------
    data : folder, CSV, list of image paths, or a code store (path ending .h5 or CodeStore)
        Labelled images, or a store made by :func:`cnncodes.extract` (its stored layers and
        labelled rows are used; nothing is extracted).
    backbone : str
        A registered backbone (``cnncodes.list_backbones()``); ignored for a store.
    layers : list of str, optional
        Aliases or node names to sweep. By default every alias of the backbone, or, when
        `store` already exists (or `data` is a store), the layers it holds.
    store : path, optional
        Where to extract the images. An existing store is extended with the images it lacks.
        By default a temporary store, deleted when the process exits (``result.store``).
    cv : int
        Outer folds asked for. Fewer are used when the smallest class has fewer than `cv`
        distinct images (every fold tests every class); ``result.cv`` is the number used.
        A class of a single distinct image is left out of the scoring (``result.left_out``),
        and classes with one image in a training part are left out of that part's choice of
        C; ``result.notes`` says what was done. At least 2 classes of 2 or more distinct
        images are needed.
    classifier : {"logreg", "linear_svm"}
        The probe: logistic regression or a linear SVM, after a StandardScaler.
    random_state : int or None
        Seed of the folds (and of the `max_images` sample).
    max_images : int, optional
        Probe a stratified sample of at most this many images (only those are extracted from
        a folder), to rank layers of a large data set quickly.
    weights, pooling, image_size, batch_size, device, num_workers
        Passed to :func:`cnncodes.extract`.
    n_jobs : int, optional
        Parallel probe fits (joblib, over layers x folds); all cores by default.
    plot : path, optional
        Also write the accuracy-per-layer plot there (PNG; needs matplotlib).
    progress : bool
        Progress bars for the extraction and the probes.

    Returns
    -------
    SweepResult
        ``.layers`` (:class:`LayerScore`: mean, std, per-fold scores and C), ``.best_layer``,
        ``.table()``, ``.plot(path)``, ``.extract`` (the extraction's ExtractResult or None).

    Examples
    --------
    >>> from cnncodes import sweep                                   # doctest: +SKIP
    >>> result = sweep("flowers/", store="flowers.h5", plot="sweep.png")  # doctest: +SKIP
    >>> print(result.table()); result.best_layer                     # doctest: +SKIP
    'block5'
    """
    from cnncodes._io import stratified_sample
    from cnncodes._store.store import CodeStore

    t0 = time.perf_counter()
    if classifier not in PROBES:
        raise InvalidParameterError(f"unknown probe classifier {classifier!r}. Valid: {', '.join(PROBES)}.")
    if not isinstance(cv, (int, np.integer)) or cv < 2:
        raise InvalidParameterError(f"cv must be an integer >= 2 (the number of folds), got {cv!r}.")
    if max_images is not None and max_images < 2 * MIN_PER_CLASS:
        raise InvalidParameterError(f"max_images must be at least {2 * MIN_PER_CLASS}, got {max_images}.")
    if plot is not None:  # before the extraction and the probes, not after
        from cnncodes._optional import require_pyplot

        check_output(plot, PNG)
        require_pyplot("sweep(plot=...)")
    if isinstance(layers, str):
        layers = [layers]
    need = max(cv, MIN_PER_CLASS)
    extracted = None
    if is_store_path(data):
        if store is not None:
            raise CnnCodesError("store= is where images are extracted to, but data is already a "
                                "code store; pass the store as data only.")
        codes = data if isinstance(data, CodeStore) else CodeStore(data)
        chosen = _stored_layers(codes, layers)
        rows = np.flatnonzero(codes.labels >= 0)
        where = codes.path.name
        if max_images is not None and len(rows) > max_images:
            rows = rows[stratified_sample(codes.labels[rows], max_images, random_state, at_least=need)]
    else:
        where = str(data) if not isinstance(data, (list, tuple)) else f"the list of {len(data)} paths"
        codes, rows, chosen, extracted = _extract_for_sweep(
            data, where, backbone=backbone, layers=layers, store=store, cv=cv, need=need,
            max_images=max_images, random_state=random_state,
            extract_kwargs=dict(pooling=pooling, weights=weights, image_size=image_size,
                                batch_size=batch_size, device=device, num_workers=num_workers,
                                progress=progress))
    kept, single, folds_used, notes = _check_classes(codes.labels[rows], codes.sha256[rows],
                                                     codes.class_names, cv, where)
    rows = rows[np.isin(codes.labels[rows], kept)]
    y = codes.labels[rows]
    groups = codes.sha256[rows]
    folds = _folds(y, groups, folds_used, random_state)
    inner = _inner_note(y, groups, folds, codes.class_names)
    notes += [inner] if inner else []
    fold_of = np.empty(len(rows), dtype=int)
    for k, (_, test) in enumerate(folds):
        fold_of[test] = k
    t1 = time.perf_counter()
    scores = _probe_layers(codes, rows, chosen, y, groups, folds, classifier, random_state, n_jobs,
                           progress)
    result = SweepResult(
        layers=scores, backbone=codes.backbone, weights=codes.spec.weights.id, store=str(codes.path),
        data=where if isinstance(data, (list, tuple)) else str(getattr(data, "path", data)),
        n_images=int(len(rows)), class_names=[codes.class_names[c] for c in sorted(set(y))],
        cv=folds_used, classifier=classifier, random_state=random_state,
        probe_seconds=time.perf_counter() - t1, extract=extracted, rows=rows, labels=y, fold_of=fold_of,
        cv_requested=cv, left_out=[codes.class_names[c] for c in single], notes=notes,
    )
    result.seconds = time.perf_counter() - t0
    if plot is not None:
        result.plot(plot)
    return result


def _extract_for_sweep(data, where, *, backbone, layers, store, cv, need, max_images, random_state,
                       extract_kwargs):
    """Extract the labelled images of `data` for the sweep; return (store, rows, layers, result)."""
    from cnncodes._backbones.registry import get_backbone
    from cnncodes._extract.extract import extract
    from cnncodes._io import stratified_sample
    from cnncodes._input.sources import Source, read_source
    from cnncodes._store.store import CodeStore

    spec_b = get_backbone(backbone)
    src = read_source(data)
    labelled = [it for it in src.items if it.label is not None]
    names = sorted({it.label for it in labelled})
    # Checked on the listing before minutes of extraction; identical content is only known
    # after hashing, so the store's rows are checked again.
    _check_classes(np.array([names.index(it.label) for it in labelled], dtype=int),
                   np.arange(len(labelled)), names, cv, where)
    items = labelled
    if max_images is not None and len(items) > max_images:
        labels = [it.label for it in items]
        keep = stratified_sample(labels, max_images, random_state, at_least=need)
        # class by class, as the store's rows (and so the folds) always came
        items = [items[k] for k in sorted(keep, key=lambda k: labels[k])]
    held = CodeStore(store).spec.layers if store is not None and Path(store).exists() else None
    if held is not None and layers is None:
        layers = list(held)  # extend the store with the layers it holds
    infos = [spec_b.layer(name) for name in (layers or [i.alias for i in spec_b.layers])]
    into = [i.alias for i in infos]
    if held is not None and all(i.node in held.values() for i in infos):
        into = list(held)  # a store is extended with all of its layers, whichever are swept
    out = Path(store) if store is not None else _default_store(
        data, backbone, extract_kwargs["weights"], extract_kwargs["pooling"],
        extract_kwargs["image_size"], [i.node for i in infos])
    if len(items) == len(src.items):
        target, subset = data, {}
    else:  # a subset, with the ids it has in the whole source, so the store can grow into it
        target = Source(src.root, items, src.kind, remote=src.remote, storage_options=src.storage_options)
        subset = {}
    extracted = extract(target, out=out, backbone=backbone, layers=into, **extract_kwargs, **subset)
    codes = CodeStore(out)
    wanted = {it.id for it in items}
    ids = codes.ids
    rows = np.array([r for r in np.flatnonzero(codes.labels >= 0) if ids[r] in wanted], dtype=int)
    return codes, rows, _stored_layers(codes, [i.node for i in infos]), extracted


def _folds(y, groups, cv, random_state):
    """Stratified outer folds grouped by content."""
    from sklearn.model_selection import StratifiedGroupKFold

    return list(StratifiedGroupKFold(n_splits=cv, shuffle=True, random_state=random_state)
                .split(y, y, groups))


def _inner_note(y, groups, folds, names) -> str | None:
    """Which classes the choice of C had to do without, in how many of the folds."""
    missing: dict[int, int] = {}
    for train, _ in folds:
        usable = set(_inner_classes(y[train], groups[train]).tolist())
        for c in np.unique(y[train]):
            if int(c) not in usable:
                missing[int(c)] = missing.get(int(c), 0) + 1
    if not missing:
        return None
    classes = sorted(missing, key=lambda c: names[c])
    return (f"C was chosen without the class(es) {_names(names, classes, limit=20)} in "
            f"{max(missing.values())} of {len(folds)} folds (a single distinct image in the training "
            f"part cannot be split for the inner CV); they are still in every model and every score")


def _probe_layers(codes, rows, chosen, y, groups, folds, classifier, random_state, n_jobs, progress):
    """One LayerScore per (alias, node) in `chosen`: the probe on every fold, in parallel."""
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    matrices = {alias: codes.codes(alias)[rows].astype(np.float32, copy=False) for alias, _ in chosen}
    jobs = [(alias, k) for alias, _ in chosen for k in range(len(folds))]
    Cs = SWEEP_CS[classifier]
    outputs = Parallel(n_jobs=n_jobs, return_as="generator")(
        delayed(_probe_fold)(matrices[alias], y, groups, folds[k][0], folds[k][1], classifier, Cs,
                             random_state)
        for alias, k in jobs)
    found = {}
    with tqdm(total=len(jobs), desc="probe", unit="fit", disable=not progress, dynamic_ncols=True) as bar:
        for job, res in zip(jobs, outputs):
            found[job] = res
            bar.update(1)
    out = []
    for alias, node in chosen:
        correct = np.zeros(len(rows))
        for k, (_, test) in enumerate(folds):
            correct[test] = found[alias, k][2]
        out.append(LayerScore(alias, node, int(matrices[alias].shape[1]),
                              np.array([found[alias, k][0] for k in range(len(folds))]),
                              [found[alias, k][1] for k in range(len(folds))], correct))
    return out


def _stored_layers(codes, layers) -> list[tuple[str, str]]:
    """(alias, node) of the requested layers of a store, shallow to deep; all stored by default."""
    stored = codes.spec.layers
    if layers is None:
        return list(stored.items())
    out = []
    for name in layers:
        alias = codes.spec.alias(name, lambda asked: UnknownLayerError(
            f"{codes.path.name} holds layers {', '.join(stored)}, not {asked!r}. Sweep one of those, or sweep "
            f"the image folder to extract every layer (a store holds the layers it was made with; others go "
            f"to another store)."))
        if alias not in [a for a, _ in out]:
            out.append((alias, stored[alias]))
    order = list(stored)
    return sorted(out, key=lambda an: order.index(an[0]))
