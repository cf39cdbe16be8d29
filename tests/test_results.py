"""Tests of the results people look at: intervals, compare, the learning curve, the HTML report."""

import re
import sys

import numpy as np
import pytest

import cnncodes
from cnncodes import compare, evaluate, extract, fit, learning_curve, save, split_store
from cnncodes._cli.main import main
from cnncodes._errors import CnnCodesError, MissingExtraError
from cnncodes._optional import require
from cnncodes._errors import OutputExistsError
from cnncodes._stats import accuracy_intervals, stratum_means


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The 40 bundled photos at 64 px (block4 + block5) and a logreg model per layer on a 75 % split."""
    from tests.conftest import FAST

    root = tmp_path_factory.mktemp("results")
    store = root / "s.h5"
    extract(str(cnncodes.sample_dir()), out=store, layers=["block4", "block5"], **FAST)
    train, test = split_store(store, test_size=0.25, random_state=0)
    models = {}
    for layer in ("block4", "block5"):
        models[layer] = save(fit(store, layer=layer, rows=train, C=1.0, n_jobs=1), root / f"{layer}.skops")
    return {"root": root, "store": store, "test": test, **models}


# ---------------------------------------------------------------------------- statistics


def test_interval_of_a_perfect_and_a_hopeless_classifier():
    """Check that all-right rows give the interval [1, 1] and all-wrong rows [0, 0]."""
    y = np.repeat(["a", "b"], 10)
    for value in (0.0, 1.0):
        overall, balanced = accuracy_intervals(np.full(20, value), y, n_resamples=200)
        assert (overall.estimate, overall.low, overall.high) == (value, value, value)
        assert (balanced.low, balanced.high) == (value, value)


def test_interval_is_seeded_and_brackets_the_estimate():
    """Check that a seed repeats the interval, and that it brackets the accuracy with a binomial width."""
    rng = np.random.default_rng(1)
    y = np.repeat(["a", "b", "c", "d"], 250)
    right = (rng.random(1000) < 0.8).astype(float)
    a, _ = accuracy_intervals(right, y, n_resamples=1000, random_state=3)
    b, _ = accuracy_intervals(right, y, n_resamples=1000, random_state=3)
    assert a == b
    assert a.low < a.estimate < a.high
    se = np.sqrt(a.estimate * (1 - a.estimate) / len(right))  # the normal approximation: ±1.96 se
    assert a.high - a.low == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_multinomial_and_index_resampling_agree(monkeypatch):
    """Check that resampling the counts of distinct values gives the interval that drawing rows gives."""
    import cnncodes._stats as stats

    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 3000)
    diff = rng.choice([-1.0, 0.0, 1.0], 3000, p=[0.1, 0.8, 0.1])  # a paired difference column
    by_counts, _ = accuracy_intervals(diff, y, n_resamples=2000, random_state=0)
    monkeypatch.setattr(stats, "_MAX_LEVELS", 0)  # force the row-index draws
    by_rows, _ = accuracy_intervals(diff, y, n_resamples=2000, random_state=0)
    assert by_counts.estimate == by_rows.estimate
    assert by_counts.low == pytest.approx(by_rows.low, abs=0.003)
    assert by_counts.high == pytest.approx(by_rows.high, abs=0.003)


def test_resamples_keep_the_class_counts():
    """Check that stratified resampling draws within each class: a class of constant value stays constant."""
    values = np.r_[np.ones(5), np.zeros(50)]
    means, counts = stratum_means(values, np.r_[["x"] * 5, ["y"] * 50], n_resamples=300)
    assert counts.tolist() == [5, 50] and means.shape == (300, 2)
    assert (means[:, 0] == 1).all() and (means[:, 1] == 0).all()


@pytest.mark.parametrize("kwargs, words", [
    (dict(n_resamples=10), "n_resamples must be an integer >= 100"),
    (dict(confidence=1.5), "confidence must be between 0 and 1"),
], ids=["resamples", "confidence"])
def test_bad_resampling_is_refused(kwargs, words):
    """Check that too few resamples or a confidence outside (0, 1) are refused with one line."""
    with pytest.raises(CnnCodesError, match=words):
        accuracy_intervals(np.ones(4), ["a", "a", "b", "b"], **kwargs)


# ---------------------------------------------------------------------------- evaluate, compare


def test_evaluate_reports_intervals_and_per_class_scores(fitted):
    """Check that evaluate gives the accuracy with its interval, mean per-class accuracy and P/R/F1."""
    from sklearn.metrics import balanced_accuracy_score, precision_recall_fscore_support

    ev = evaluate(fitted["block5"], fitted["store"], n_resamples=500)
    assert ev.n == len(fitted["test"]) == len(ev.ids) == 10
    assert ev.interval.estimate == ev.accuracy and ev.interval.low <= ev.accuracy <= ev.interval.high
    assert ev.interval.n_resamples == 500
    assert ev.mean_per_class.estimate == pytest.approx(balanced_accuracy_score(ev.y_true, ev.y_pred))
    p, r, f, n = precision_recall_fscore_support(ev.y_true, ev.y_pred, labels=ev.classes, zero_division=0)
    assert [row["f1"] for row in ev.per_class] == pytest.approx(f)
    assert [row["support"] for row in ev.per_class] == n.tolist()
    assert "95 % confidence interval" in ev.summary() and "mean per-class accuracy" in ev.summary()
    assert evaluate(fitted["block5"], fitted["store"], n_resamples=500).interval == ev.interval  # seeded


def test_gallery_orders_mistakes_and_unsure_hits(fitted):
    """Check that the gallery lists wrong rows by falling confidence and right rows by rising confidence."""
    ev = evaluate(fitted["block4"], fitted["store"])
    g = ev.gallery(50)
    assert len(g["mistakes"]) + len(g["unsure"]) == ev.n
    assert all(r["true"] != r["predicted"] for r in g["mistakes"])
    assert all(r["true"] == r["predicted"] for r in g["unsure"])
    probs = [r["probability"] for r in g["mistakes"]]
    assert probs == sorted(probs, reverse=True)
    assert [r["probability"] for r in g["unsure"]] == sorted(r["probability"] for r in g["unsure"])


def test_compare_gives_the_paired_interval(fitted):
    """Check that compare's difference is the accuracy difference, and a model against itself is noise."""
    c = compare(fitted["block4"], fitted["block5"], fitted["store"], n_resamples=500)
    assert c.n == 10
    assert c.difference.estimate == pytest.approx(c.a.accuracy - c.b.accuracy)
    assert c.difference.low <= c.difference.estimate <= c.difference.high
    assert "difference (a - b) on the same 10 images" in c.summary()
    same = compare(fitted["block5"], fitted["block5"], fitted["store"], n_resamples=200)
    assert (same.difference.low, same.difference.high) == (0.0, 0.0) and not same.significant
    assert "cannot be told apart" in same.verdict()


def test_compare_on_the_cli(fitted, capsys):
    """Check that `cnncodes compare` prints both accuracies, the difference and the verdict."""
    assert main(["compare", str(fitted["block4"]), str(fitted["block5"]), str(fitted["store"]),
                 "--n-resamples", "200", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "block4.skops  accuracy" in out and "95 % CI" in out and "the 95 % interval of the difference" in out


# ---------------------------------------------------------------------------- learning curve


def test_learning_curve(fitted):
    """Check the curve's sizes, training counts, per-repeat scores and its verdict on more labels."""
    curve = learning_curve(fitted["store"], sizes=(1, 2, 100, "all"), repeats=3, C=1.0, n_jobs=1)
    assert [p.size for p in curve.points] == [1, 2, "all"]  # 100 >= the largest class: it is "all"
    assert [p.n_train for p in curve.points] == [5, 10, 30]
    assert [len(p.scores) for p in curve.points] == [3, 3, 1]
    assert curve.n_test == 10
    full = evaluate(fitted["block5"], fitted["store"])
    assert curve.points[-1].accuracy == pytest.approx(full.accuracy)  # "all" is the model fit() makes
    helps, sentence = curve.more_labels_help()
    assert isinstance(helps, bool) and "images per class" in sentence and "per doubling" in sentence
    assert "per class  train  accuracy" in curve.table()


@pytest.mark.parametrize("kwargs, words", [
    (dict(sizes=(0, 5)), "sizes are images per class"),
    (dict(repeats=0), "repeats must be an integer >= 1"),
    (dict(layer="block9"), "holds layers block4, block5, not 'block9'"),
], ids=["size", "repeats", "layer"])
def test_learning_curve_refuses_bad_arguments(fitted, kwargs, words):
    """Check the one-line messages of the learning curve's arguments."""
    with pytest.raises(CnnCodesError, match=words):
        learning_curve(fitted["store"], **kwargs)


def test_curve_on_the_cli(fitted, capsys):
    """Check that `cnncodes curve` prints the table and refuses a bad --sizes."""
    png = fitted["root"] / "curve-cli.png"
    assert main(["curve", str(fitted["store"]), "--sizes", "1,2,all", "--repeats", "2", "--jobs", "1",
                 "--n-resamples", "200", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "learning curve of s.h5 (block5" in out and "more labels" in out and f"wrote {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["curve", str(fitted["store"]), "--sizes", "1,two"]) == 2
    assert "--sizes: 'two' is not a number of images per class" in capsys.readouterr().err


# ---------------------------------------------------------------------------- optional dependencies


@pytest.mark.parametrize("blocked, argv, words", [
    ("matplotlib", ["evaluate", "{block5}", "{store}", "--plot", "{root}/cm.png"],
     "--plot needs matplotlib, which is not installed: pip install 'cnncodes[plot]'."),
    ("matplotlib", ["curve", "{store}", "--plot", "{root}/curve.png"],
     "--plot needs matplotlib, which is not installed: pip install 'cnncodes[plot]'."),
    ("matplotlib", ["sweep", "{store}", "--plot", "{root}/sweep.png"],
     "needs matplotlib, which is not installed: pip install 'cnncodes[plot]'."),
    ("ray", ["extract", "{photos}", "-o", "{root}/ray.h5", "--engine", "ray"],
     "needs ray, which is not installed: pip install 'cnncodes[ray]'."),
    ("skops", ["fit", "{store}", "-o", "{root}/m.skops"],
     "writing the model file (-o) needs skops, which is not installed: it is a dependency of cnncodes"),
    ("fsspec", ["extract", "memory://bucket/photos/", "-o", "{root}/url.h5"],
     "needs fsspec, which is not installed: pip install 'cnncodes[sources]'."),
    ("pyarrow", ["extract", "{root}/table.parquet", "-o", "{root}/table.h5"],
     "reading Parquet / Arrow tables needs pyarrow, which is not installed: pip install 'cnncodes[sources]'."),
    ("jinja2", ["report", "{block5}", "{store}", "-o", "{root}/r.html"],
     "the HTML report needs jinja2, which is not installed: it is a dependency of cnncodes"),
], ids=["evaluate-plot", "curve-plot", "sweep-plot", "ray", "fit-skops", "fsspec", "pyarrow",
                                "report-jinja2"])
def test_a_missing_optional_dependency_is_one_line(blocked, argv, words, fitted, sample_dir, monkeypatch, capsys):
    """Check that a missing package gives one line naming the extra, exit 2, before any work or file."""
    for name in list(sys.modules):
        if name == blocked or name.startswith(blocked + "."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, blocked, None)
    (fitted["root"] / "table.parquet").write_bytes(b"PAR1 not read: pyarrow is missing PAR1")
    argv = [a.format(root=fitted["root"], store=fitted["store"], block5=fitted["block5"], photos=sample_dir)
            for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err
    assert captured.out == ""  # nothing computed first
    assert not any(p.name in ("cm.png", "curve.png", "sweep.png", "ray.h5", "m.skops", "r.html",
                                                 "url.h5", "table.h5")
                   for p in fitted["root"].iterdir())


def test_require_names_the_extra_given_or_known(monkeypatch):
    """Check that `require` names an extra given by the caller, and the one EXTRAS knows."""
    with pytest.raises(MissingExtraError, match=r"^reading Parquet needs cnncodes_no_such_package, which is "
                                                     r"not installed: pip install 'cnncodes\[parquet\]'\.$"):
        require("cnncodes_no_such_package.sub", "reading Parquet", extra="parquet")
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'cnncodes\[ray\]'"):
        require("ray", "engine='ray'")


# ---------------------------------------------------------------------------- the report


def test_report_is_self_contained(fitted, tmp_path):
    """Check that the report holds the numbers, inline thumbnails of real test ids, and no network link."""
    out = tmp_path / "r.html"
    ev = cnncodes.report(fitted["block5"], fitted["store"], out, n_resamples=200)
    html = out.read_text()
    assert '<meta name="viewport"' in html and f'{ev.accuracy:.4f}' in html
    assert f"{ev.interval.low:.4f}" in html and f"{ev.interval.high:.4f}" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing to fetch
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert srcs and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    ids = set(re.findall(r'data-id="([^"]+)"', html))
    assert ids and ids <= set(ev.ids)
    assert "mobilenet_v2" in html and "b0353104" in html  # provenance: backbone, weights sha256


def test_report_refuses_to_overwrite_another_kind_of_file(fitted, tmp_path, capsys):
    """Check that the report overwrites its own kind, and refuses a file of another kind before evaluating."""
    out = tmp_path / "r.html"
    out.write_text("<html>my notes</html>")
    with pytest.raises(OutputExistsError, match="r.html"):
        cnncodes.report(fitted["block5"], fitted["store"], out)
    assert out.read_text() == "<html>my notes</html>"
    out.unlink()
    assert main(["report", str(fitted["block5"]), str(fitted["store"]), "-o", str(out), "--n-resamples",
                 "200", "--quiet"]) == 0
    assert main(["report", str(fitted["block5"]), str(fitted["store"]), "-o", str(out), "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out


def test_report_measures_curve_and_sweep_on_a_store_only(fitted, sample_dir, tmp_path, capsys):
    """Check that `report --curve` on a folder is refused in one line before any work."""
    out = tmp_path / "r.html"
    assert main(["report", str(fitted["block5"]), str(sample_dir), "-o", str(out), "--curve", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the learning curve and the sweep of a report are measured on a code store" in err
    assert not out.exists()


@pytest.mark.browser
def test_report_in_chromium(fitted, tmp_path, browser):
    """Check in headless Chromium that every image decodes and the tables hold evaluate's numbers."""
    out = tmp_path / "r.html"
    curve = learning_curve(fitted["store"], sizes=(1, "all"), repeats=2, C=1.0, n_jobs=1)
    sweep = cnncodes.sweep(fitted["store"], cv=3, n_jobs=1)
    cnncodes.report(fitted["block4"], fitted["store"], out, curve=curve, sweep=sweep)
    ev = evaluate(fitted["block4"], fitted["store"])
    page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
    page.goto(out.as_uri())
    widths = page.eval_on_selector_all("img", "els => els.map(e => e.complete && e.naturalWidth)")
    assert widths and all(w > 0 for w in widths)
    assert page.inner_text("#accuracy") == f"{ev.accuracy:.4f}"
    assert page.inner_text("#ci-low") == f"{ev.interval.low:.4f}"
    rows = page.eval_on_selector_all("#per-class-table tbody tr",
                                     "rs => rs.map(r => [...r.cells].map(c => c.innerText))")
    assert rows == [[r["class"], f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}",
                     str(r["support"])] for r in ev.per_class]
    cells = page.eval_on_selector_all("#confusion-table tbody tr",
                                      "rs => rs.map(r => [...r.cells].slice(1).map(c => +c.innerText))")
    assert cells == ev.confusion.tolist()
    shown = page.eval_on_selector_all("figure", "fs => fs.map(f => f.dataset.id)")
    assert shown and set(shown) <= set(ev.ids)
    assert page.locator("#learning-curve svg circle").count() == 2
    assert page.locator("#sweep-table tbody tr").count() == 2
    # readable on a phone: nothing wider than the window but the scrolling tables
    assert page.evaluate("document.documentElement.scrollWidth") <= 390


def test_predict_and_evaluate_hand_any_model_kind_to_its_own_methods():
    """Check that predict and evaluate call the model's `predict_photos` / `evaluate` (the one
    interface every kind of model has) with the caller's settings, whatever the kind."""
    from cnncodes._models.results import PhotoModel, Predictions

    calls = []

    class AnotherKind(PhotoModel):
        reads_codes, classes, path, train_sha256 = False, ["a", "b"], "", None

        def predict_photos(self, images, **kwargs):
            calls.append(("predict_photos", images, kwargs))
            return Predictions([], [("x.jpg", "unreadable")])

        def evaluate(self, data, **kwargs):
            calls.append(("evaluate", data, kwargs))
            return "its evaluation"

    preds = cnncodes.predict(AnotherKind(), "photos/", top_k=2, batch_size=4)
    assert preds.failures == [("x.jpg", "unreadable")]
    assert evaluate(AnotherKind(), "folder/", n_resamples=200, device="cpu") == "its evaluation"
    assert calls == [
        ("predict_photos", "photos/", {"top_k": 2, "store": None, "progress": False, "batch_size": 4}),
        ("evaluate", "folder/", {"progress": False, "n_resamples": 200, "confidence": 0.95, "random_state": 0,
                                 "device": "cpu"}),
    ]
