"""Tests of CLI consistency (issue 21 item 12): run options, --quiet, unknown options, --top-k, --layer lists."""

from types import SimpleNamespace

import pytest

import cnncodes._extract.extract
import cnncodes._models.model
from cnncodes._cli.main import HANDLERS, _parser, main


class _Called(Exception):
    """Raised by a stand-in to stop a command once its keywords are recorded."""


def _record(monkeypatch, module, name, seen):
    def stand_in(*args, **kwargs):
        seen.update(kwargs)
        raise _Called
    monkeypatch.setattr(module, name, stand_in)


@pytest.mark.parametrize("command", ["predict", "evaluate"], ids=["predict", "evaluate"])
def test_predict_and_evaluate_take_run_options(command, monkeypatch):
    """Check that --device, --batch-size and --workers reach predict/evaluate and from there extract."""
    seen = {}
    _record(monkeypatch, cnncodes._models.model, command, seen)
    with pytest.raises(_Called):
        main([command, "m.skops", "photos/", "--device", "cpu", "--batch-size", "8", "--workers", "2", "--quiet"])
    assert seen["device"] == "cpu" and seen["batch_size"] == 8 and seen["num_workers"] == 2

    # The library passes them to extract, leaving the defaults to extract itself.
    extracted = {}
    _record(monkeypatch, cnncodes._extract.extract, "extract", extracted)
    spec = SimpleNamespace(layers={"block5": "features.18"}, extract_kwargs=lambda: {"backbone": "mobilenet_v2"})
    model = SimpleNamespace(extractor=spec)
    with pytest.raises(_Called):
        with cnncodes._models.model._codes_for(model, "photos/", None, False, {"device": "cpu", "batch_size": 8}):
            pass
    assert extracted["device"] == "cpu" and extracted["batch_size"] == 8 and extracted["backbone"] == "mobilenet_v2"
    assert cnncodes._models.model._run_options(None, "auto", "auto") == {}


@pytest.mark.parametrize("command", sorted(HANDLERS), ids=sorted(HANDLERS))
def test_every_command_accepts_quiet(command):
    """Check that every command parses --quiet (a no-op where nothing is shown)."""
    parser = _parser()
    known = parser.commands[command]._option_string_actions
    assert "--quiet" in known and known["--quiet"].help


def test_unknown_option_shows_the_command_usage_and_a_suggestion(capsys):
    """Check that an unknown option of a command prints that command's usage and a did-you-mean, exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "codes.h5", "-o", "m.skops", "--layr", "block5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: cnncodes fit ")
    assert "cnncodes fit: error: unrecognized arguments: --layr block5 (did you mean --layer?)" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "codes.h5", "--zzzz"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage: cnncodes info" in err and "did you mean" not in err


@pytest.mark.parametrize("k", ["0", "-1"], ids=["zero", "negative"])
def test_top_k_below_one_is_refused(k, capsys):
    """Check that --top-k has help and that values below 1 are refused in one line, exit 2."""
    assert "most probable labels" in _parser().commands["predict"]._option_string_actions["--top-k"].help
    assert main(["predict", "m.skops", "photos/", "--top-k", k]) == 2
    err = capsys.readouterr().err
    assert err == f"cnncodes predict: error: --top-k must be 1 or more, got {k}.\n"
    with pytest.raises(cnncodes._models.model.CnnCodesError, match="top_k must be an integer >= 1, got 0"):
        cnncodes._models.model.predict("m.skops", "photos/", top_k=0)


def test_layer_takes_comma_separated_names(capsys):
    """Check that every --layer splits commas, keeps order and drops duplicates (fit concatenates several)."""
    parser = _parser()
    args = parser.parse_args(["extract", "p/", "-o", "c.h5", "--layer", "block5,block4", "--layer", "block4, block3"])
    assert args.layers == ["block5", "block4", "block3"]
    args = parser.parse_args(["sweep", "p/", "--layer", "block2,block2,block1"])
    assert args.layers == ["block2", "block1"]
    assert parser.parse_args(["fit", "c.h5", "-o", "m.skops", "--layer", "block5,block5"]).layer == ["block5"]
    assert parser.parse_args(["fit", "c.h5", "-o", "m.skops", "--layer", "block5", "--layer", "block4"]).layer == [
        "block5", "block4"]
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["extract", "p/", "-o", "c.h5", "--layer", ","])
    assert exit_info.value.code == 2 and "argument --layer: expected a layer name, got ','" in capsys.readouterr().err



# ----------------------------------------------------------- choices come from the library

def _library_choices() -> dict:
    """(command, option) -> the tuple of values the library checks that setting against."""
    import cnncodes._extract.accel
    import cnncodes._backbones.registry
    import cnncodes._models.export
    import cnncodes._classify.fit
    import cnncodes._classify.knn
    import cnncodes._analysis.sweep
    import cnncodes._finetune._api

    return {
        ("extract", "--pooling"): cnncodes._backbones.registry.POOLINGS,
        ("extract", "--dtype"): cnncodes._extract.extract.DTYPES,
        ("extract", "--precision"): cnncodes._extract.accel.PRECISIONS,
        ("extract", "--tta"): cnncodes._extract.extract.TTAS,
        ("extract", "--resize"): cnncodes._extract.extract.RESIZES,
        ("extract", "--engine"): cnncodes._extract.extract.ENGINES,
        ("fit", "--classifier"): cnncodes._classify.fit.CLASSIFIERS,
        ("fit", "--metric"): cnncodes._classify.knn.METRICS,
        ("finetune", "--tta"): cnncodes._finetune._api.TTAS,
        ("finetune", "--precision"): cnncodes._extract.accel.PRECISIONS,
        ("sweep", "--classifier"): cnncodes._analysis.sweep.PROBES,
        ("export", "--format"): cnncodes._models.export.FORMATS,
    }


def test_every_choices_list_is_the_librarys_constant():
    """Check that every option with choices offers the very tuple the library checks the setting
    against (not a literal copy of it), so that the two cannot drift apart."""
    import cnncodes._classify.fit
    import cnncodes._classify.knn

    library = _library_choices()
    offered = {}
    for command, sub in _parser().commands.items():
        for action in sub._actions:
            if action.choices is not None and action.option_strings:
                offered[command, action.option_strings[-1]] = action.choices
    assert offered.pop(("fit", "--normalize")) == ("none", *cnncodes._classify.fit.NORMALIZE)  # "none": no normalisation
    assert set(offered) == set(library), "map each option with choices to the library constant it offers"
    literal = [f"{c} {o}" for (c, o), choices in offered.items() if choices is not library[c, o]]
    assert literal == [], f"choices written out instead of taken from the library: {literal}"
    assert set(cnncodes._classify.knn.METRICS) <= set(cnncodes._classify.knn._METRICS)  # every metric offered is one the knn knows


def test_backbone_and_weights_defaults_are_the_librarys(monkeypatch):
    """Check that --backbone and --weights default to the library's default backbone and weights
    name: the parser follows the constants (strings compare equal whoever wrote them, so the
    constants are changed here and the defaults must change with them)."""
    import inspect

    import cnncodes._cli.main
    from cnncodes import _choices, extract

    params = inspect.signature(extract).parameters
    assert (params["backbone"].default, params["weights"].default) == (_choices.DEFAULT_BACKBONE, _choices.IMAGENET)
    monkeypatch.setattr(cnncodes._cli.main, "DEFAULT_BACKBONE", "resnet50")
    monkeypatch.setattr(cnncodes._cli.main, "IMAGENET", "DEFAULT")
    parser = _parser()
    for command in ("extract", "finetune", "sweep", "advise"):
        actions = {a.dest: a for a in parser.commands[command]._actions}
        assert (actions["backbone"].default, actions["weights"].default) == ("resnet50", "DEFAULT"), command
