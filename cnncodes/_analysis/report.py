"""The HTML report of an evaluation: evaluate a model, measure what was asked, write one self-contained file."""

from __future__ import annotations

from cnncodes._errors import CnnCodesError
from cnncodes._outputs import REPORT, check_output
from cnncodes._stats import CONFIDENCE, N_RESAMPLES


def report(model, data, out, *, curve=None, sweep=None, thumbnails: int = 12, n_resamples: int = N_RESAMPLES,
           confidence: float = CONFIDENCE, random_state: int | None = 0, progress: bool = False, **run):
    """Evaluate a model and write one self-contained HTML report of it.

    The file opens from disk with no network: headline accuracy with its interval, mean
    per-class accuracy, per-class precision / recall / F1, the confusion matrix, thumbnails
    of the most confident mistakes and the least confident correct predictions (ids and
    probabilities), the learning curve and the layer sweep when given, and the provenance.

    Parameters
    ----------
    model : path, Model or fitted estimator
    data : path or CodeStore
        As for :func:`cnncodes.evaluate`; thumbnails are read from the store's data root.
    out : path
        The ``.html`` file to write; a file of another kind there is refused before any work.
    curve : LearningCurve or bool, optional
        From :func:`cnncodes.learning_curve`; True measures it on `data` (a store), on the
        model's layer.
    sweep : SweepResult or bool, optional
        From :func:`cnncodes.sweep`; True sweeps the layers of `data` (a store), 5-fold.
    thumbnails : int
        Photos in each part of the gallery.
    n_resamples, confidence, random_state
        As in :func:`cnncodes.evaluate`.
    **run
        batch_size, device, num_workers of the extraction of a folder, as in :func:`cnncodes.evaluate`.

    Returns
    -------
    Evaluation
        The evaluation shown (``to_html`` writes it again).

    Examples
    --------
    >>> report("model.skops", "codes.h5", "report.html")             # doctest: +SKIP
    """
    from cnncodes._models.model import _as_model, evaluate
    from cnncodes._optional import require
    from cnncodes._analysis.sweep import is_store_path

    check_output(out, REPORT)  # before evaluating, not after
    require("jinja2", "the HTML report")
    if (curve is True or sweep is True) and not is_store_path(data):
        raise CnnCodesError(f"the learning curve and the sweep of a report are measured on a code store, "
                            f"and {data} is not one (.h5); extract it first, or leave them out.")
    model = _as_model(model)
    ev = evaluate(model, data, n_resamples=n_resamples, confidence=confidence, random_state=random_state,
                  progress=progress, **run)
    if curve is True:
        from cnncodes._analysis.curve import learning_curve

        layer = next(iter(model.extractor.layers)) if getattr(model, "extractor", None) else None
        curve = learning_curve(data, layer=layer, n_resamples=n_resamples, confidence=confidence,
                               random_state=random_state)
    if sweep is True:
        from cnncodes._analysis.sweep import sweep as run_sweep

        sweep = run_sweep(data, random_state=random_state, progress=progress)
    ev.to_html(out, curve=curve or None, sweep=sweep or None, thumbnails=thumbnails)
    return ev
