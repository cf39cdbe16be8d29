"""Stratified bootstrap confidence intervals of accuracies and of paired differences (vectorised numpy)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnncodes._errors import CnnCodesError, InvalidParameterError

N_RESAMPLES = 1000
CONFIDENCE = 0.95
# Index draws per block: resamples are drawn in blocks of at most this many cells, so a test
# set of 100,000 rows needs 32 MiB at a time, not n_resamples x n.
_BLOCK_CELLS = 1 << 22
# Distinct values per stratum up to which a resample is one multinomial draw over the values.
_MAX_LEVELS = 256


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap confidence interval.

    ``estimate`` is the statistic on the rows as they are; ``low`` and ``high`` bound the
    central ``confidence`` share of its ``n_resamples`` stratified bootstrap values.
    """

    estimate: float
    low: float
    high: float
    confidence: float = CONFIDENCE
    n_resamples: int = N_RESAMPLES

    def excludes(self, value: float = 0.0) -> bool:
        """True when `value` lies outside the interval (a difference whose interval excludes 0)."""
        return bool(value < self.low or value > self.high)

    def format(self, digits: int = 4, signed: bool = False) -> str:
        """``0.9123 (95 % CI 0.8950 to 0.9290)``; `signed` puts a sign on every number."""
        f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
        return (f"{f.format(self.estimate)} ({100 * self.confidence:g} % CI {f.format(self.low)} to "
                f"{f.format(self.high)})")

    def __str__(self) -> str:
        return self.format()

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high,
                "confidence": self.confidence, "n_resamples": self.n_resamples}


def check_resampling(n_resamples, confidence) -> None:
    """Refuse a number of resamples or a confidence level that cannot make an interval."""
    if not isinstance(n_resamples, (int, np.integer)) or isinstance(n_resamples, bool) or n_resamples < 100:
        raise InvalidParameterError(f"n_resamples must be an integer >= 100 (the bootstrap resamples of the "
                            f"confidence interval; 1000 is usual), got {n_resamples!r}.")
    if not 0 < confidence < 1:
        raise InvalidParameterError(f"confidence must be between 0 and 1 (0.95 for a 95 % interval), got {confidence!r}.")


def stratum_means(values, strata, *, n_resamples: int = N_RESAMPLES, random_state=0):
    """Mean of `values` within each stratum, over stratified bootstrap resamples of the rows.

    Each resample draws, within every stratum, as many rows as it has, with replacement,
    so the stratum sizes (the class counts of a test set) stay those observed.

    A resample's mean depends only on how many draws land on each distinct value, and those
    counts are multinomial with the values' frequencies as probabilities. Per-row values
    with few distinct levels (1/0 for right/wrong; -1/0/1 for a paired difference; a mean
    over a few repeats) are therefore resampled exactly by one multinomial draw of shape
    (n_resamples, levels) per stratum, whatever the number of rows; other values by
    drawing row indices (in blocks of at most ``_BLOCK_CELLS``).

    Parameters
    ----------
    values : array of shape (n,) or (n, k)
        Per-row values. Columns of a 2-D array are resampled with the same rows: paired.
    strata : array of shape (n,)
        The stratum of each row (its true class).
    n_resamples : int
    random_state : int, Generator or None
        Seed: the same seed, strata and values give the same resamples.

    Returns
    -------
    means : ndarray of shape (n_resamples, n_strata) or (n_resamples, n_strata, k)
    counts : ndarray of shape (n_strata,)
        Rows per stratum, in the order of ``np.unique(strata)``.
    """
    values = np.asarray(values, dtype=np.float64)
    _, inverse, counts = np.unique(np.asarray(strata), return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    rng = np.random.default_rng(random_state)
    means = np.empty((n_resamples, len(counts)) + values.shape[1:])
    for s, m in enumerate(counts):  # a loop over classes; the resamples are one array operation
        vals = values[inverse == s]
        levels, which = np.unique(vals, axis=0, return_inverse=True)
        if len(levels) <= _MAX_LEVELS:
            hits = rng.multinomial(m, np.bincount(which.reshape(-1), minlength=len(levels)) / m,
                                   size=n_resamples)
            means[:, s] = hits @ levels / m
            continue
        block = max(1, _BLOCK_CELLS // int(m))
        for start in range(0, n_resamples, block):
            stop = min(n_resamples, start + block)
            draw = rng.integers(0, m, size=(stop - start, m))
            means[start:stop, s] = vals[draw].mean(axis=1)
    return means, counts


def _percentile(estimate, boot, confidence, n_resamples) -> Interval:
    lo, hi = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(float(estimate), float(lo), float(hi), confidence, n_resamples)


def accuracy_intervals(values, strata, *, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                       random_state=0) -> tuple[Interval, Interval]:
    """Intervals of the overall mean and of the mean of the per-stratum means of `values`.

    With `values` 1 for a right prediction and 0 for a wrong one and the true classes as
    `strata`, these are the accuracy and the mean per-class accuracy (balanced accuracy);
    with the difference of two models' such columns on the same rows, the intervals of the
    paired differences of both.

    Returns
    -------
    overall, per_class_mean : Interval
    """
    check_resampling(n_resamples, confidence)
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise CnnCodesError(f"an interval needs a non-empty 1-D array of per-row values, got shape {values.shape}.")
    means, counts = stratum_means(values, strata, n_resamples=n_resamples, random_state=random_state)
    _, inverse = np.unique(np.asarray(strata), return_inverse=True)
    point = np.bincount(inverse.reshape(-1), weights=values) / counts
    overall = _percentile(values.mean(), means @ counts / counts.sum(), confidence, n_resamples)
    balanced = _percentile(point.mean(), means.mean(axis=1), confidence, n_resamples)
    return overall, balanced
