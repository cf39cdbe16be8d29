"""Tests of few-shot data in the sweep and the advisor: fewer folds, single-image classes, notes."""

import shutil
from dataclasses import replace

import numpy as np
import pytest

from cnncodes import advise, extract, sweep
from cnncodes._analysis.rules import Measurements, place

FAST = dict(batch_size=16, num_workers=0, progress=False, n_jobs=1)

def _folder(root, sample_dir, counts):
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for f in sorted((sample_dir / cls).iterdir())[:n]:
            shutil.copy(f, root / cls / f.name)
    return root

@pytest.fixture(scope="module")
def fewshot_store(tmp_path_factory, sample_dir):
    """daisy 8, rose 8, tulip 3 and sunflower 1 photos, block4 and block5 at 64 px."""
    root = tmp_path_factory.mktemp("few")
    folder = _folder(root / "photos", sample_dir, {"daisy": 8, "rose": 8, "tulip": 3, "sunflower": 1})
    store = root / "few.h5"
    extract(folder, out=store, layers=["block4", "block5"], image_size=64, batch_size=16, num_workers=0,
            progress=False)
    return store

def test_smallest_class_lowers_the_folds(fewshot_store):
    """Check that a class of 3 images turns a 5-fold sweep into a 3-fold one, and says so."""
    r = sweep(fewshot_store, cv=5, n_jobs=1, progress=False)
    assert (r.cv, r.cv_requested) == (3, 5)
    assert all(s.scores.shape == (3,) and len(s.Cs) == 3 for s in r.layers)
    assert set(np.unique(r.fold_of)) == {0, 1, 2}
    note = "3 folds instead of the 5 asked for: class 'tulip' has 3 distinct images, and every fold tests every class"
    assert note in r.notes
    text = r.table()
    assert "stratified 3-fold CV" in text and f"note: {note}" in text

def test_single_image_class_is_left_out(fewshot_store):
    """Check that a class of a single image is left out of the scoring, with a note naming it."""
    r = sweep(fewshot_store, cv=5, n_jobs=1, progress=False)
    assert r.left_out == ["sunflower"]
    assert r.class_names == ["daisy", "rose", "tulip"] and r.n_images == 19
    assert ("1 class(es) with a single distinct image cannot be cross-validated and were left out of the "
            "scoring: 'sunflower'") in r.notes
    assert "note: 1 class(es) with a single distinct image" in r.table()

def test_two_image_class_is_left_out_of_the_choice_of_c(tmp_path, sample_dir):
    """Check that a class of 2 images gives 2 folds, and C is chosen without it, with a note."""
    folder = _folder(tmp_path / "photos", sample_dir, {"daisy": 6, "rose": 6, "tulip": 2})
    r = sweep(folder, cv=5, layers=["block4"], image_size=64, **FAST)
    assert r.cv == 2 and r.layers[0].scores.shape == (2,)
    assert ("C was chosen without the class(es) 'tulip' in 2 of 2 folds (a single distinct image in the "
            "training part cannot be split for the inner CV); they are still in every model and every "
            "score") in r.notes

def _gain(best, last, spread):
    layers = [("block4", 96, best, 0.03), ("block5", 1280, last, 0.02)]
    return place(Measurements(n_images=100, class_counts={"a": 50, "b": 50}, layers=layers, gain_std=spread))

@pytest.mark.parametrize(
    "best, last, spread, words, not_words",
    [
        (0.611, 0.583, 0.039, "2.8 points above the last layer block5 (0.583), within the fold-to-fold "
                              "spread 3.9, so not counted as different", "less than"),
        (0.596, 0.583, 0.008, "1.3 points above the last layer block5 (0.583), less than 2.0 points, so "
                              "not counted as different", "spread"),
        (0.596, 0.583, 0.039, "1.3 points above the last layer block5 (0.583), less than 2.0 points and "
                              "within the fold-to-fold spread 3.9, so not counted as different", " or "),
    ],
    ids=["within-spread", "below-threshold", "both"],
)
def test_advise_sentence_names_the_condition_that_held(best, last, spread, words, not_words):
    """Check that the 'not clearly better' sentence states only the conditions that held."""
    s = _gain(best, last, spread)
    assert s.similarity == "similar"
    assert words in s.similarity_reasons[0]
    assert not_words not in s.similarity_reasons[0]

def test_advise_few_shot_notes_and_command_carry_cv(fewshot_store):
    """Check that advise on a few-shot store reports the folds used and the class left out, and
    that its all-in-one command repeats the user's --cv and other options."""
    a = advise(fewshot_store, cv=4, head_images=10, **FAST)
    m = a.measurements
    assert m.cv == 3 and m.n_images == 20 and m.per_class_min == 1
    report = a.report()
    assert "layer sweep (3-fold CV, linear probe)" in report
    assert ("note: sweep: 3 folds instead of the 4 asked for: class 'tulip' has 3 distinct images" in report)
    assert "note: sweep: 1 class(es) with a single distinct image cannot be cross-validated" in report
    assert "probed a stratified sample" not in report
    assert f"or all in one: cnncodes advise {fewshot_store} --cv 4 --head-images 10 --run -o model.skops" in report

def test_command_carries_only_the_options_given(fewshot_store, sample_dir):
    """Check that default options are left out of the printed command and the given ones are kept."""
    a = advise(fewshot_store, cv=5, head_images=10, **FAST)
    assert "--cv" not in a.report()

    b = replace(a, options={"--cv": 3, "--max-images": 0, "--random-state": 7}, store=None,
                images=str(sample_dir), data=str(sample_dir), image_size=None)
    line = [c for c in b.commands() if c.startswith("or all in one")][0]
    assert line.endswith("--backbone mobilenet_v2 --cv 3 --max-images 0 --random-state 7 --run -o model.skops")
