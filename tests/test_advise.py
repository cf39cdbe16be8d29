"""Tests of the four-scenario advisor on real images: the ImageNet head, advise, --run (the rules: test_rules.py)."""

import importlib.util
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from cnncodes import (
    Advice,
    CnnCodesError,
    CodeStore,
    Recommendation,
    advise,
    extract,
    load,
    predict,
)
from cnncodes._analysis.measure import imagenet_head
from cnncodes._analysis.rules import SIMILAR_CONFIDENCE_RATIO
from cnncodes._cli.main import main

ALIASES = ["block1", "block2", "block3", "block4", "block5"]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = dict(batch_size=16, num_workers=0, progress=False, n_jobs=1)


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    assert digit.ratio < SIMILAR_CONFIDENCE_RATIO


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
    import cnncodes._finetune

    calls = []

    class Done:
        def summary(self):
            return "fine-tuned (fake)"

    def fake(source, **kwargs):
        calls.append((source, kwargs))
        return Done()

    monkeypatch.setattr(cnncodes._finetune, "finetune", fake)
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
