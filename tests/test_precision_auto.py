"""precision="auto" on a new store: each candidate timed on the run's first batch, the fastest that agrees kept."""

import json

import h5py
import numpy as np
import pytest
import torch

import cnncodes._extract.extract as ex
import cnncodes._extract.precision as pr
from cnncodes import CodeStore, extract
from cnncodes._extract.accel import resolve_precision
from cnncodes._cli.main import main
from cnncodes._store.store import Journal

# The 40 sample photos at 64 px in batches of 8; the probe (see `timed`) times 4 of them.
SETTINGS = dict(backbone="mobilenet_v2", image_size=64, batch_size=8, num_workers=0, progress=False)


def _choice(store) -> dict:
    with h5py.File(store, "r") as f:
        return json.loads(f.attrs["precision_choice"])


@pytest.fixture
def timed(monkeypatch):
    """Both CPU candidates on any CPU, the probe's seconds set by the test; the codes are real.

    The probe times the first 4 images and runs where it costs at most the run's images (2 x 3
    x 4 = 24 passes: 40 photos probe, 12 do not). Returns the list of precisions timed, in
    order, and a setter ``use(seconds, corrupt=())``: the seconds per precision, and the
    precisions whose codes are replaced by noise.
    """
    monkeypatch.setattr(pr, "candidates", lambda device: ["float32", "bfloat16"])
    monkeypatch.setattr(pr, "PROBE_IMAGES", 4)
    monkeypatch.setattr(pr, "PROBE_SHARE", 1.0)
    calls, settings = [], {}
    real = pr.time_forward

    def fake(forward, batch):
        _, codes = real(forward, batch)
        calls.append(forward.precision)
        if forward.precision in settings["corrupt"]:
            rng = np.random.default_rng(0)
            codes = {a: rng.random(c.shape, dtype=np.float32) for a, c in codes.items()}
        return settings["seconds"][forward.precision], codes

    monkeypatch.setattr(pr, "time_forward", fake)

    def use(seconds, corrupt=()):
        settings.update(seconds=seconds, corrupt=corrupt)

    return calls, use


def test_a_long_pass_is_timed_once(sample_dir, tmp_path, timed):
    """Check that a candidate whose timed pass took LONG_PASS or more is not timed again, while
    the other still gets its TIMED_BATCHES passes, and that the faster one still wins."""
    calls, use = timed
    use({"float32": pr.LONG_PASS * 2, "bfloat16": pr.LONG_PASS / 2})
    extract(sample_dir, out=tmp_path / "auto.h5", **SETTINGS)
    assert calls == ["float32", "bfloat16"] + ["bfloat16"] * (pr.TIMED_BATCHES - 1)
    assert _choice(tmp_path / "auto.h5")["precision"] == "bfloat16"


@pytest.mark.parametrize("seconds, winner", [
    ({"float32": 0.10, "bfloat16": 0.20}, "float32"),
    ({"float32": 0.20, "bfloat16": 0.10}, "bfloat16"),
], ids=["float32-faster", "bfloat16-faster"])
def test_auto_keeps_the_faster_precision_and_records_it(sample_dir, tmp_path, timed, seconds, winner):
    """Check that a new store gets the precision that timed faster, in its spec, its attrs and
    the summary, and that its codes are that precision's."""
    calls, use = timed
    use(seconds)
    out = tmp_path / "auto.h5"
    result = extract(sample_dir, out=out, **SETTINGS)
    assert calls == ["float32", "bfloat16"] * pr.TIMED_BATCHES  # taking turns
    assert CodeStore(out).spec["precision"] == winner
    choice = _choice(out)
    assert choice["precision"] == winner and choice["how"] == "measured" and choice["batch"] == 4
    assert choice["seconds_per_batch"] == seconds
    assert 0.999 <= choice["cosine_to_float32"]["bfloat16"] <= 1.0
    line = result.summary().splitlines()[2]
    assert line.startswith(f"precision {winner} (auto, measured on 4 images: float32 {4 / seconds['float32']:.1f} "
                           f"img/s; bfloat16 {4 / seconds['bfloat16']:.1f} img/s, cosine 0.99")
    explicit = tmp_path / "explicit.h5"
    extract(sample_dir, out=explicit, precision=winner, **SETTINGS)
    np.testing.assert_allclose(CodeStore(out).codes("block5"), CodeStore(explicit).codes("block5"), atol=1e-5)


def test_a_fast_candidate_whose_codes_disagree_is_refused(sample_dir, tmp_path, timed):
    """Check that bfloat16, fastest but with codes far from float32's, is not chosen and the
    summary says it was refused."""
    _, use = timed
    use({"float32": 0.20, "bfloat16": 0.05}, corrupt=("bfloat16",))
    out = tmp_path / "auto.h5"
    result = extract(sample_dir, out=out, **SETTINGS)
    assert CodeStore(out).spec["precision"] == "float32"
    assert _choice(out)["cosine_to_float32"]["bfloat16"] < 0.999
    assert "bfloat16 80.0 img/s, cosine " in result.summary() and " REFUSED)." in result.summary()


def test_the_probe_runs_before_anything_is_written(sample_dir, tmp_path, timed, monkeypatch):
    """Check that while the candidates are timed, neither the store nor its journal exists."""
    _, use = timed
    use({"float32": 0.1, "bfloat16": 0.2})
    out = tmp_path / "auto.h5"
    seen = []
    fake = pr.time_forward

    def watch(forward, batch):
        seen.append((out.exists(), Journal(out).exists()))
        return fake(forward, batch)

    monkeypatch.setattr(pr, "time_forward", watch)
    extract(sample_dir, out=out, **SETTINGS)
    assert seen and set(seen) == {(False, False)}


def test_a_short_run_and_an_extended_store_are_not_probed(sample_dir, photos, tmp_path, timed):
    """Check that a run too short to repay the probe takes the rule, and that extending a store keeps its
    precision without timing anything."""
    calls, use = timed
    use({"float32": 0.2, "bfloat16": 0.1})
    out = tmp_path / "short.h5"
    result = extract(photos, out=out, **SETTINGS)  # 12 photos, fewer than the probe's 24 passes
    assert calls == []
    rule = resolve_precision("auto", torch.device("cpu"))
    assert CodeStore(out).spec["precision"] == rule
    assert f"precision {rule} (auto, by rule: 12 images, too few to repay timing 2 precisions on 4 of them)." in result.summary()
    assert _choice(out)["how"] == "rule"
    grown = tmp_path / "grown.h5"
    extract(sample_dir, out=grown, precision="float32", **SETTINGS)
    use({"float32": 0.2, "bfloat16": 0.1})  # bfloat16 would win a new store
    extract(photos, out=grown, **SETTINGS)  # the store's precision, nothing timed
    assert calls == [] and CodeStore(grown).spec["precision"] == "float32"


def test_a_resumed_first_run_keeps_the_interrupted_runs_choice(sample_dir, tmp_path, timed, monkeypatch):
    """Check that a first run interrupted before its commit is resumed in the precision it
    measured, even when a new probe would pick another, and that the store records that choice."""
    _, use = timed
    use({"float32": 0.2, "bfloat16": 0.1})
    out = tmp_path / "auto.h5"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "merge", killed)
    with pytest.raises(KeyboardInterrupt):
        extract(sample_dir, out=out, **SETTINGS)
    assert not out.exists() and Journal(out).exists()
    monkeypatch.undo()
    monkeypatch.setattr(pr, "candidates", lambda device: ["float32", "bfloat16"])
    monkeypatch.setattr(pr, "PROBE_IMAGES", 4)
    monkeypatch.setattr(pr, "PROBE_SHARE", 1.0)
    monkeypatch.setattr(pr, "time_forward", lambda forward, batch: pytest.fail("timed again"))
    result = extract(sample_dir, out=out, **SETTINGS)
    assert result.n_resumed == 40 and CodeStore(out).spec["precision"] == "bfloat16"
    choice = _choice(out)
    assert choice["how"] == "resumed" and choice["seconds_per_batch"] == {"float32": 0.2, "bfloat16": 0.1}
    assert "(auto, measured by the interrupted run on 4 images: float32 20.0 img/s;" in result.summary()


def test_the_cli_prints_the_choice(sample_dir, tmp_path, timed, capsys):
    """Check that `cnncodes extract` prints the chosen precision and the timings."""
    _, use = timed
    use({"float32": 0.25, "bfloat16": 0.5})
    out = tmp_path / "cli.h5"
    assert main(["extract", str(sample_dir), "-o", str(out), "--image-size", "64", "--batch-size", "8",
                 "--workers", "0", "--quiet"]) == 0
    assert "precision float32 (auto, measured on 4 images: float32 16.0 img/s; bfloat16 8.0 img/s" \
        in capsys.readouterr().out


def test_candidates_and_agreement():
    """Check the candidates per device and that non-finite codes agree with nothing."""
    cpu = torch.device("cpu")
    assert pr.candidates(cpu) == (["float32", "bfloat16"] if resolve_precision("auto", cpu) == "bfloat16"
                                  else ["float32"])
    ref = {"x": np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)}
    assert pr.min_cosine({"x": ref["x"] * 3}, ref) == pytest.approx(1.0)
    assert pr.min_cosine({"x": np.array([[1.0, 1.0], [0.0, 2.0]])}, ref) == pytest.approx(2 ** -0.5)
    assert np.isnan(pr.min_cosine({"x": np.array([[np.nan, 0.0], [0.0, 2.0]])}, ref))


def test_a_choice_with_non_finite_codes_is_standard_json_and_refused():
    """Check that a candidate whose codes were not finite is stored as null and shown refused."""
    choice = pr.PrecisionChoice("float32", "measured", 8, {"float32": 0.1, "bfloat16": 0.05},
                                {"bfloat16": float("nan")})
    text = json.dumps(choice.to_json(), allow_nan=False)
    again = pr.PrecisionChoice.from_json(json.loads(text))
    assert json.loads(text)["cosine_to_float32"] == {"bfloat16": None}
    assert again.describe() == ("precision float32 (auto, measured on 8 images: float32 80.0 img/s; "
                                "bfloat16 160.0 img/s, cosine nan REFUSED).")


def test_the_probe_runs_only_where_it_costs_at_most_a_tenth_of_the_run(monkeypatch):
    """Check the threshold with the real settings: two candidates x 3 passes x 16 images = 96
    image passes, so 960 images are probed and 959 are not."""
    monkeypatch.setattr(pr, "candidates", lambda device: ["float32", "bfloat16"])
    asked = []

    def first_images(n):
        asked.append(n)  # returns None: none decodes, so the rule decides, after asking

    cpu = torch.device("cpu")
    short = pr.measure_precision(first_images, None, cpu, 959)
    assert asked == [] and short.how == "rule" and "959 images, too few" in short.reason
    probed = pr.measure_precision(first_images, None, cpu, 960)
    assert asked == [16] and probed.reason == "none of the first 16 images decodes"
