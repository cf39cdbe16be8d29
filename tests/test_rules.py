"""Tests of the four-scenario rules, `place` and `recommend`: plain numbers in, no I/O, no network."""

import subprocess
import sys

import numpy as np
import pytest

import cnncodes._analysis.rules as rules
from cnncodes import CnnCodesError, Measurements
from cnncodes._analysis.rules import HeadStats, place, recommend

ALIASES = ["block1", "block2", "block3", "block4", "block5"]

# Sweeps shaped like the measured ones: flowers5 (the last layer best) and digits at 64 px
# (block4 2.5 points above block5), as (alias, dims, mean, std).
TOP_BEST = [("block1", 16, 0.538, 0.010), ("block2", 24, 0.587, 0.019), ("block3", 32, 0.620, 0.009),
            ("block4", 96, 0.697, 0.014), ("block5", 1280, 0.745, 0.012)]
MIDDLE_BEST = [("block1", 16, 0.885, 0.006), ("block2", 24, 0.883, 0.024), ("block3", 32, 0.896, 0.010),
               ("block4", 96, 0.973, 0.006), ("block5", 1280, 0.948, 0.002)]


def head(ratio, accuracy=0.719):
    return HeadStats(n_images=256, confidence=ratio * accuracy, entropy=0.6, imagenet_accuracy=accuracy,
                     top_labels=[("daisy", 0.12), ("strawberry", 0.11), ("rock beauty", 0.10)])


def measured(per_class, ratio, layers, gain_std=0.008, n_classes=5):
    counts = {f"class{i}": per_class + (i % 2) for i in range(n_classes)}
    return Measurements(n_images=sum(counts.values()), class_counts=counts,
                        head=None if ratio is None else head(ratio), layers=layers, gain_std=gain_std)


# ------------------------------------------------------------------ placement (synthetic)


@pytest.mark.parametrize(
    "per_class, ratio, layers, cell",
    [
        (100, 0.40, TOP_BEST, ("small", "similar")),
        (180, 0.15, MIDDLE_BEST, ("small", "different")),
        (784, 0.36, TOP_BEST, ("large", "similar")),
        (784, 0.15, MIDDLE_BEST, ("large", "different")),
    ],
    ids=["small-similar", "small-different", "large-similar", "large-different"],
)
def test_the_four_cells(per_class, ratio, layers, cell):
    """Check that each cell of the table is reached, with the numbers behind each coordinate."""
    m = measured(per_class, ratio, layers)
    s = place(m)
    assert (s.size, s.similarity) == cell
    assert f"median class has {m.per_class_median:g} images" in s.size_reason
    text = " ".join(s.similarity_reasons)
    assert f"{ratio:.2f} × its ImageNet accuracy 0.72" in text
    assert f"{m.best[2]:.3f} ± {m.best[3]:.3f}" in text
    assert s.cell == f"{cell[0]} × {cell[1]} {'to' if cell[1] == 'similar' else 'from'} ImageNet"


def test_size_threshold():
    """Check that 500 images in the median class is large and 499 small."""
    assert place(measured(500, 0.4, TOP_BEST)).size == "large"
    assert place(measured(499, 0.4, TOP_BEST)).size == "small"
    assert rules.LARGE_PER_CLASS == 500


def test_either_measurement_makes_a_set_different():
    """Check that a low head confidence alone, or a better earlier layer alone, means 'different'."""
    by_head = place(measured(100, 0.20, TOP_BEST))
    assert by_head.similarity == "different"
    assert by_head.similarity_reasons[0].startswith("ImageNet head → different")
    assert by_head.similarity_reasons[1].startswith("layer sweep → similar: the last layer is the best")
    by_sweep = place(measured(100, 0.60, MIDDLE_BEST))
    assert by_sweep.similarity == "different"
    assert "block4 reaches 0.973 ± 0.006, 2.5 points above the last layer block5" in by_sweep.similarity_reasons[1]


def test_noisy_gain_is_not_evidence():
    """Check that an earlier layer ahead by 2.5 points but within the fold-to-fold spread is not enough."""
    s = place(measured(100, 0.60, MIDDLE_BEST, gain_std=0.03))
    assert s.similarity == "similar"
    assert "within the fold-to-fold spread 3.0" in s.similarity_reasons[1]
    small_gain = MIDDLE_BEST[:-1] + [("block5", 1280, 0.960, 0.004)]
    assert place(measured(100, 0.60, small_gain)).similarity == "similar"  # 1.3 points < 2


def test_nothing_measured():
    """Check that without a head and a sweep the set is assumed similar, and says so."""
    s = place(measured(100, None, TOP_BEST[-1:]))
    assert s.similarity == "similar" and "not measured" in s.similarity_reasons[0]


# ------------------------------------------------------------------ recommendations (synthetic)


def test_small_similar_recommends_the_top_layer():
    """Check the small x similar advice: a linear classifier on the last layer, with its accuracy."""
    m = measured(100, 0.40, TOP_BEST)
    r = recommend(m, place(m), ALIASES)
    assert (r.strategy, r.layer, r.classifier, r.unfreeze) == ("linear", "block5", "logreg", None)
    assert "expected accuracy 0.745 ± 0.012" in r.summary
    assert "codes from the top of the network" in " ".join(r.reasons)


def test_small_different_recommends_an_earlier_layer():
    """Check the small x different advice: a linear classifier on the better earlier layer."""
    m = measured(180, 0.15, MIDDLE_BEST)
    r = recommend(m, place(m), ALIASES)
    assert (r.strategy, r.layer) == ("linear", "block4")
    assert "on block4 codes; expected accuracy 0.973 ± 0.006" in r.summary
    assert "codes from an earlier layer" in " ".join(r.reasons)


def test_different_by_head_keeps_the_measured_best_layer():
    """Check that when only the head says 'different', the sweep's best (last) layer is kept."""
    m = measured(180, 0.15, TOP_BEST)
    r = recommend(m, place(m), ALIASES)
    assert r.layer == "block5"
    assert "finds no earlier layer better than block5" in " ".join(r.reasons)


def test_large_similar_finetunes_the_top_blocks():
    """Check the large x similar advice: unfreeze the top 3 blocks, lr 2e-4, head 1e-3, two-stage."""
    m = measured(784, 0.36, TOP_BEST)
    r = recommend(m, place(m), ALIASES)
    assert (r.strategy, r.unfreeze, r.blocks, r.lr, r.head_lr, r.epochs) == ("finetune", "block3", 3, 2e-4, 1e-3, 8)
    text = r.summary + " ".join(r.reasons)
    assert "unfreeze the top 3 blocks of the network (from block3): 784 images per class" in text
    assert "beat the linear probe's 0.745" in text and "learning rate 2e-4" in text and "5× slower" in text
    assert r.summary.startswith("fine-tune the top 3 blocks of the network (from block3), lr 2e-4 (head 1e-3)")


def test_large_different_finetunes_deeper_and_faster():
    """Check the large x different advice: one block more and a 2.5x larger learning rate."""
    m = measured(784, 0.15, MIDDLE_BEST)
    r = recommend(m, place(m), ALIASES)
    assert (r.strategy, r.unfreeze, r.blocks, r.lr) == ("finetune", "block2", 4, 5e-4)
    assert "the top 4 blocks of the network (from block2), lr 5e-4" in r.summary
    assert "2.5× faster than for a similar set" in " ".join(r.reasons)
    assert "one more because the set is different from ImageNet" in " ".join(r.reasons)


@pytest.mark.parametrize(
    "per_class, ratio, unfreeze, blocks",
    [(3000, 0.4, "block2", 4), (3000, 0.1, "all", 5), (20000, 0.4, "all", 5), (20000, 0.1, "all", 5)],
    ids=["3k-similar", "3k-different", "20k-similar", "20k-different"],
)
def test_unfreeze_grows_with_the_data(per_class, ratio, unfreeze, blocks):
    """Check that more images per class unfreeze more of the network, up to all of it."""
    m = measured(per_class, ratio, TOP_BEST)
    r = recommend(m, place(m), ALIASES)
    assert (r.unfreeze, r.blocks) == (unfreeze, blocks)
    if unfreeze == "all":
        assert r.summary.startswith("fine-tune the whole network, lr")


def test_large_but_linear_is_enough():
    """Check that a large set whose linear probe reaches 0.98 gets the linear advice and why."""
    m = measured(5000, 0.5, TOP_BEST[:-1] + [("block5", 1280, 0.985, 0.003)])
    r = recommend(m, place(m), ALIASES)
    assert r.strategy == "linear" and r.layer == "block5"
    assert "already reaches 0.985 (≥ 0.98): fine-tuning has at most 1.5 points to win" in r.reasons[0]


def test_one_standard_error_rule():
    """Check that a much smaller code within one standard error of the best is preferred."""
    layers = TOP_BEST[:3] + [("block4", 96, 0.972, 0.009), ("block5", 1280, 0.973, 0.005)]
    m = measured(180, 0.15, layers)
    r = recommend(m, place(m), ALIASES)
    assert r.layer == "block4"
    assert "block5 has the highest mean (0.973 ± 0.005) but block4 is within one standard error" in " ".join(r.reasons)
    assert "13× smaller codes (96 vs 1280 dims)" in " ".join(r.reasons)


def test_measurements_properties():
    """Check the derived counts of Measurements."""
    m = Measurements(n_images=10, class_counts={"a": 2, "b": 3, "c": 5})
    assert (m.n_classes, m.per_class_min, m.per_class_median, m.smallest_class) == (3, 2, 3.0, "a")
    assert m.best is None and m.gain == 0.0
    assert np.isclose(measured(10, 0.3, MIDDLE_BEST).gain, 0.025)


# ------------------------------------------------------------------ boundaries and the whole table


def test_rules_import_nothing_heavy():
    """Check that importing the rules loads no torch, scikit-learn, h5py or PIL, and no other cnncodes module."""
    code = ("import sys, cnncodes._analysis.rules; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'torchvision', 'sklearn', 'h5py', 'PIL', 'faiss') or m.startswith('cnncodes')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "['cnncodes', 'cnncodes._analysis', 'cnncodes._analysis.rules', 'cnncodes._errors']"


def with_head(per_class, confidence, accuracy, layers=TOP_BEST, gain_std=0.008):
    m = measured(per_class, None, layers, gain_std=gain_std)
    m.head = HeadStats(n_images=64, confidence=confidence, entropy=0.5, imagenet_accuracy=accuracy,
                       top_labels=[("daisy", 0.5)])
    return m


@pytest.mark.parametrize("confidence, similarity", [(0.25, "similar"), (0.2499, "different")],
                         ids=["ratio-0.25-similar", "ratio-0.2499-different"])
def test_head_ratio_threshold(confidence, similarity):
    """Check that a head ratio of exactly SIMILAR_CONFIDENCE_RATIO is similar and just below it different."""
    assert rules.SIMILAR_CONFIDENCE_RATIO == 0.25
    s = place(with_head(100, confidence, 1.0))
    assert s.similarity == similarity
    assert s.similarity_reasons[0].startswith(f"ImageNet head → {similarity}")
    assert f"{confidence:.2f} × its ImageNet accuracy 1.00" in s.similarity_reasons[0]


def test_size_is_the_median_class_not_the_smallest():
    """Check that one small class does not make a large set small: the median class decides."""
    m = Measurements(n_images=1210, class_counts={"rare": 10, "b": 600, "c": 600}, layers=TOP_BEST)
    s = place(m)
    assert s.size == "large" and "the median class has 600 images (≥ 500)" in s.size_reason
    assert m.per_class_min == 10 and m.smallest_class == "rare"


@pytest.mark.parametrize("last, different", [(0.73, True), (0.7305, False)],
                         ids=["gain-2.0-different", "gain-1.95-similar"])
def test_layer_gain_threshold(last, different):
    """Check that an earlier layer 2 points above the last is 'different', 1.95 points is not."""
    layers = [("block4", 96, 0.75, 0.001), ("block5", 1280, last, 0.001)]
    s = place(measured(100, None, layers, gain_std=0.001))
    assert s.similarity == ("different" if different else "similar")
    if different:
        assert "2.0 points above the last layer block5" in s.similarity_reasons[0]
    else:
        assert "less than 2.0 points" in s.similarity_reasons[0]
        assert "within the fold-to-fold spread" not in s.similarity_reasons[0]


def test_gain_equal_to_its_spread_is_not_evidence():
    """Check that a gain no larger than its fold-to-fold spread is not counted, and only that is said."""
    layers = [("block4", 96, 0.30, 0.01), ("block5", 1280, 0.25, 0.01)]
    m = measured(100, None, layers)
    m.gain_std = m.gain
    s = place(m)
    assert s.similarity == "similar"
    assert "within the fold-to-fold spread 5.0" in s.similarity_reasons[0]
    assert "less than" not in s.similarity_reasons[0]


def test_both_measurements_different_say_one_is_enough():
    """Check that when head and sweep both say 'different' the placement says one would have done."""
    s = place(measured(100, 0.1, MIDDLE_BEST))
    assert s.similarity == "different"
    assert [r.split(" → ")[0] for r in s.similarity_reasons[:2]] == ["ImageNet head", "layer sweep"]
    assert s.similarity_reasons[2].startswith("one measurement saying 'different' is enough")


@pytest.mark.parametrize(
    "per_class, ratio, layers, cell, strategy, layer, unfreeze",
    [
        (499, 0.40, TOP_BEST, ("small", "similar"), "linear", "block5", None),
        (499, 0.40, MIDDLE_BEST, ("small", "different"), "linear", "block4", None),
        (499, 0.10, TOP_BEST, ("small", "different"), "linear", "block5", None),
        (500, 0.40, TOP_BEST, ("large", "similar"), "finetune", "block5", "block3"),
        (500, 0.40, MIDDLE_BEST, ("large", "different"), "finetune", "block4", "block2"),
        (500, 0.10, TOP_BEST, ("large", "different"), "finetune", "block5", "block2"),
    ],
    ids=["small-similar", "small-different-by-sweep", "small-different-by-head", "large-similar",
         "large-different-by-sweep", "large-different-by-head"],
)
def test_every_cell_and_its_recommendation(per_class, ratio, layers, cell, strategy, layer, unfreeze):
    """Check each cell of the table at the size boundary, and the strategy, layer and blocks it recommends."""
    m = measured(per_class, ratio, layers)
    s = place(m)
    r = recommend(m, s, ALIASES)
    assert (s.size, s.similarity) == cell
    assert (r.strategy, r.layer, r.unfreeze) == (strategy, layer, unfreeze)
    if strategy == "finetune":
        assert (r.lr, r.head_lr, r.epochs) == (rules.LR[cell[1]], rules.HEAD_LR, rules.EPOCHS)
    else:
        assert r.lr is None and r.blocks == 0 and r.classifier == "logreg"


@pytest.mark.parametrize(
    "per_class, ratio, unfreeze, blocks",
    [(1999, 0.4, "block3", 3), (2000, 0.4, "block2", 4), (9999, 0.4, "block2", 4), (10000, 0.4, "all", 5),
     (1999, 0.1, "block2", 4), (2000, 0.1, "all", 5)],
    ids=["1999-similar", "2000-similar", "9999-similar", "10000-similar", "1999-different", "2000-different"],
)
def test_unfreeze_boundaries(per_class, ratio, unfreeze, blocks):
    """Check the blocks unfrozen on each side of 2,000 and 10,000 images per class, one more when different."""
    assert rules.UNFREEZE_PER_CLASS == (2_000, 10_000)
    m = measured(per_class, ratio, TOP_BEST)
    r = recommend(m, place(m), ALIASES)
    assert (r.strategy, r.unfreeze, r.blocks) == ("finetune", unfreeze, blocks)


def test_unfreeze_never_exceeds_the_network():
    """Check that a backbone with fewer blocks than the rule asks for is unfrozen whole."""
    layers = [("block4", 96, 0.697, 0.014), ("block5", 1280, 0.745, 0.012)]
    m = measured(784, 0.4, layers)
    r = recommend(m, place(m), ["block4", "block5"])
    assert (r.unfreeze, r.blocks) == ("all", 2)
    assert r.summary.startswith("fine-tune the whole network, lr 2e-4")


@pytest.mark.parametrize("best, strategy", [(0.98, "linear"), (0.979, "finetune")],
                         ids=["0.98-linear", "0.979-finetune"])
def test_linear_is_enough_threshold(best, strategy):
    """Check that a large set whose probe reaches exactly LINEAR_IS_ENOUGH stays linear, just below fine-tunes."""
    m = measured(5000, 0.5, TOP_BEST[:-1] + [("block5", 1280, best, 0.003)])
    assert recommend(m, place(m), ALIASES).strategy == strategy


def test_recommend_needs_a_sweep():
    """Check that recommending without a layer sweep is refused with what to do."""
    m = Measurements(n_images=10, class_counts={"a": 5, "b": 5})
    with pytest.raises(CnnCodesError, match="no layer sweep to recommend a layer from; sweep at least one layer."):
        recommend(m, place(m), ALIASES)
