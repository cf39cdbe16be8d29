"""Tests of the four-scenario advisor: placement, recommendations, the ImageNet head, --run."""

import importlib.util
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import cnncodes._advise as adv
from cnncodes import (
    Advice,
    CnnCodesError,
    CodeStore,
    Measurements,
    Recommendation,
    advise,
    extract,
    load,
    predict,
)
from cnncodes._advise import HeadStats, imagenet_head, place, recommend
from cnncodes._cli import main

ALIASES = ["block1", "block2", "block3", "block4", "block5"]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = dict(batch_size=16, num_workers=0, progress=False, n_jobs=1)

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


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    assert adv.LARGE_PER_CLASS == 500


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


# ------------------------------------------------------------------ the ImageNet head (real network)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """80 of sklearn's digits (8 per class) as 32 px PNGs in class folders."""
    return load_example("digits_folder").write_digits(tmp_path_factory.mktemp("d") / "digits", size=32,
                                                     per_class=8)


def test_imagenet_head_tells_photos_from_digits(sample_dir, digits):
    """Check that the ImageNet head is more confident on flower photos than on digits."""
    photos = sorted(str(p) for p in sample_dir.glob("*/*.jpg"))[::2]
    glyphs = sorted(str(p) for p in digits.glob("*/*.png"))[::4]
    flowers, digit = imagenet_head(photos, batch_size=8), imagenet_head(glyphs, batch_size=8)
    assert flowers.n_images == 20 and digit.n_images == 20
    assert flowers.imagenet_accuracy == pytest.approx(0.71878)
    for h in (flowers, digit):
        assert 0 < h.confidence < 1 and 0 < h.entropy < 1
        assert all(isinstance(n, str) and 0 < f <= 1 for n, f in h.top_labels)
        assert sum(f for _, f in h.top_labels) <= 1
    assert flowers.confidence > 1.5 * digit.confidence
    assert digit.ratio < adv.SIMILAR_CONFIDENCE_RATIO


def test_imagenet_head_needs_imagenet_weights(sample_dir):
    """Check that random weights are refused for the head, with what to use instead."""
    with pytest.raises(CnnCodesError, match="needs torchvision ImageNet weights, got 'random'; use weights='imagenet'"):
        imagenet_head([str(next(sample_dir.glob("*/*.jpg")))], weights=None)


# ------------------------------------------------------------------ advise end to end (real network)


@pytest.fixture(scope="module")
def digits_advice(digits, tmp_path_factory):
    store = tmp_path_factory.mktemp("a") / "digits.h5"
    return advise(digits, store=store, image_size=32, cv=4, head_images=20, **FAST)


def test_advise_digits(digits_advice, digits):
    """Check the advice on digits: small, different from ImageNet, a linear probe on an earlier layer."""
    a = digits_advice
    assert isinstance(a, Advice)
    m = a.measurements
    assert (m.n_images, m.n_classes, m.per_class_min, m.per_class_median) == (80, 10, 8, 8)
    assert m.head.n_images == 20 and [s[0] for s in m.layers] == ALIASES
    assert (a.scenario.size, a.scenario.similarity) == ("small", "different")
    r = a.recommendation
    assert r.strategy == "linear" and r.layer in ("block3", "block4")
    report = a.report()
    assert "size: 80 images, 10 classes; images per class: min 8" in report
    assert f"mean top-1 probability {m.head.confidence:.3f} ({m.head.ratio:.2f} ×" in report
    for alias, _, mean, std in m.layers:
        assert f"{alias} {mean:.3f} ± {std:.3f}" in report
    assert "Scenario: small × different from ImageNet" in report
    # would more labels help? a two-point learning curve at the best layer: 3 vs all 6 training images per class
    assert m.more_labels is not None and f"  learning curve: {m.more_labels[1]}" in report
    assert "from 3 to 6 images per class the held-out accuracy went" in m.more_labels[1]
    assert f"Recommendation: fit a linear classifier (logistic regression, C by cross-validation) on {r.layer}" in report
    assert f"cnncodes fit {a.store} --layer {r.layer} --classifier logreg -o model.skops" in report
    assert (f"or all in one: cnncodes advise {digits} --backbone mobilenet_v2 --image-size 32 --store {a.store} "
            f"--cv 4 --head-images 20 --run -o model.skops") in report


def test_advise_run_linear(digits_advice, digits, tmp_path):
    """Check that run() fits and saves the recommended model, which then classifies digits."""
    a = digits_advice
    done = a.run(tmp_path / "m.skops", progress=False, n_jobs=1)
    assert done.strategy == "linear" and done.path.is_file()
    assert f"on 80 images ({a.recommendation.layer}, " in done.summary and "Wrote" in done.summary
    model = load(done.path)
    assert model.classes == [str(d) for d in range(10)]
    assert list(model.extractor["layers"]) == [a.recommendation.layer]
    assert model.extractor["image_size"] == 32
    preds = predict(done.path, [str(p) for p in sorted(digits.glob("3/*.png"))[:3]])
    assert len(preds) == 3 and all(p.labels[0] in model.classes for p in preds)


def test_advise_run_finetune_calls_finetune(digits_advice, digits, tmp_path, monkeypatch):
    """Check that a fine-tuning recommendation calls cnncodes.finetune with its settings."""
    import cnncodes.finetuning

    calls = []

    class Done:
        def summary(self):
            return "fine-tuned (fake)"

    def fake(source, **kwargs):
        calls.append((source, kwargs))
        return Done()

    monkeypatch.setattr(cnncodes.finetuning, "finetune", fake)
    rec = Recommendation("finetune", "block4", "fine-tune", [], unfreeze="block4", blocks=2, lr=3e-4,
                         head_lr=1e-3, epochs=10)
    done = replace(digits_advice, recommendation=rec).run(tmp_path / "ft.pt", progress=False, n_jobs=1)
    assert done.strategy == "finetune" and done.summary == "fine-tuned (fake)"
    (source, kw), = calls
    assert source == digits
    assert kw["out"] == tmp_path / "ft.pt" and kw["backbone"] == "mobilenet_v2" and kw["weights"] == "imagenet"
    assert (kw["unfreeze"], kw["lr"], kw["head_lr"], kw["epochs"]) == ("block4", 3e-4, 1e-3, 10)
    assert kw["init_head"] == digits_advice.store and kw["image_size"] == 32


def test_advise_store_without_its_images(tmp_path, sample_dir):
    """Check that a store whose photos are gone is advised from the sweep alone, and says so."""
    folder = tmp_path / "photos"
    for cls in ("daisy", "rose"):
        (folder / cls).mkdir(parents=True)
        for f in sorted((sample_dir / cls).iterdir())[:5]:
            shutil.copy(f, folder / cls / f.name)
    store = tmp_path / "s.h5"
    extract(folder, out=store, layers=["block4", "block5"], image_size=64, batch_size=16, num_workers=0,
            progress=False)
    shutil.rmtree(folder)
    a = advise(store, cv=4, **FAST)
    assert a.measurements.head is None and a.images is None
    assert any("are not at hand" in n and "ImageNet head was not run" in n for n in a.measurements.notes)
    assert all(r.startswith("layer sweep →") for r in a.scenario.similarity_reasons)
    assert a.image_size == 64  # the store's crop size, for anything that must match its codes
    rec = Recommendation("finetune", "block5", "", [], unfreeze="block5", blocks=1, lr=1e-4, head_lr=1e-3, epochs=10)
    with pytest.raises(CnnCodesError, match="fine-tuning trains on the images, but .*s.h5 is a code store"):
        replace(a, recommendation=rec).run(tmp_path / "ft.pt")
    assert CodeStore(store).layers == ["block4", "block5"]


def test_advise_needs_labels(tmp_path, sample_dir):
    """Check that a folder without class subfolders is refused with what to do."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted((sample_dir / "daisy").iterdir())[:4]:
        shutil.copy(f, flat / f.name)
    with pytest.raises(CnnCodesError, match="has no labelled images. Check that the folder has one subfolder per class"):
        advise(flat, **FAST)


def test_cli_advise(sample_dir, tmp_path, capsys):
    """Check that `cnncodes advise` prints measurements, scenario and recommendation, and --run fits."""
    out = tmp_path / "m.skops"
    code = main(["advise", str(sample_dir), "--image-size", "64", "--cv", "4", "--head-images", "10",
                 "--workers", "0", "--jobs", "1", "--quiet", "--store", str(tmp_path / "s.h5"),
                 "--run", "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "size: 40 images, 5 classes; images per class: min 8" in text
    assert "ImageNet head on 10 images" in text and "Scenario: small ×" in text
    assert "Recommendation: fit a linear classifier" in text
    assert "Running the recommendation (linear):" in text and f"Wrote {out}." in text
    assert out.is_file() and sorted(load(out).classes) == sorted(p.name for p in sample_dir.iterdir())


def test_cli_advise_out_needs_run(sample_dir, capsys):
    """Check that -o without --run is refused before any work."""
    assert main(["advise", str(sample_dir), "-o", "m.skops", "--quiet"]) == 2
    assert "-o/--out names the model that --run writes; add --run, or drop -o." in capsys.readouterr().err


def test_measurements_properties():
    """Check the derived counts of Measurements."""
    m = Measurements(n_images=10, class_counts={"a": 2, "b": 3, "c": 5})
    assert (m.n_classes, m.per_class_min, m.per_class_median, m.smallest_class) == (3, 2, 3.0, "a")
    assert m.best is None and m.gain == 0.0
    assert np.isclose(measured(10, 0.3, MIDDLE_BEST).gain, 0.025)
