"""Tests of the one stratified sampler, `cnncodes._io.stratified_sample` (sweep and advise draw with it)."""

from collections import Counter

import numpy as np
import pytest

from cnncodes._io import stratified_sample

# 60 rows of class "a", 30 of "b", 10 of "c", interleaved
LABELS = np.array((["a"] * 6 + ["b"] * 3 + ["c"]) * 10)


def per_class(positions, labels=LABELS):
    return dict(sorted(Counter(labels[positions].tolist()).items()))


def test_proportional_keeps_each_class_share():
    """Check that the default draw keeps round(n * share) rows per class, as sorted distinct positions."""
    keep = stratified_sample(LABELS, 20, random_state=0)
    assert per_class(keep) == {"a": 12, "b": 6, "c": 2}
    assert np.all(np.diff(keep) > 0)


def test_proportional_at_least():
    """Check that at_least raises a small class's share, never above what the class has."""
    assert per_class(stratified_sample(LABELS, 20, 0, at_least=5)) == {"a": 12, "b": 6, "c": 5}
    assert per_class(stratified_sample(LABELS, 20, 0, at_least=15)) == {"a": 15, "b": 15, "c": 10}


@pytest.mark.parametrize("n, shares", [(7, {"a": 3, "b": 2, "c": 2}), (30, {"a": 10, "b": 10, "c": 10}),
                                       (45, {"a": 18, "b": 17, "c": 10}), (2, {"a": 1, "b": 1})],
                         ids=["7-one-more-to-the-first", "30-even", "45-small-class-gives-all", "2-fewer-than-classes"])
def test_balanced_deals_evenly(n, shares):
    """Check that balanced=True takes exactly n rows, dealt one per class in turn, in sorted class order."""
    keep = stratified_sample(LABELS, n, 0, balanced=True)
    assert len(keep) == n and per_class(keep) == shares


@pytest.mark.parametrize("balanced", [False, True], ids=["proportional", "balanced"])
def test_seeded_and_complete(balanced):
    """Check that a seed gives the same draw, another seed another, and n >= rows keeps every row."""
    one = stratified_sample(LABELS, 20, 1, balanced=balanced)
    assert np.array_equal(one, stratified_sample(LABELS, 20, 1, balanced=balanced))
    assert not np.array_equal(one, stratified_sample(LABELS, 20, 2, balanced=balanced))
    assert np.array_equal(stratified_sample(LABELS, 100, 1, balanced=balanced), np.arange(100))


def test_class_order_does_not_change_the_draw():
    """Check that the rows drawn for each class do not depend on where the classes first appear."""
    flipped = LABELS[::-1]
    a = stratified_sample(LABELS, 20, 3, balanced=True)
    b = stratified_sample(flipped, 20, 3, balanced=True)
    # the same per-class ranks are drawn: class c's k-th row in one is its k-th row in the other
    for c in "abc":
        rank_a = np.searchsorted(np.flatnonzero(LABELS == c), a[LABELS[a] == c])
        rank_b = np.searchsorted(np.flatnonzero(flipped == c), b[flipped[b] == c])
        assert sorted(rank_a.tolist()) == sorted(rank_b.tolist())
