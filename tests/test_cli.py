"""Tests of the command line: every command's help, errors as one-line messages, exit codes."""

import re
import subprocess
import sys

import pytest

from cnncodes import CodeStore
from cnncodes._cli.main import EXAMPLES, HANDLERS, main

COMMANDS = sorted(HANDLERS)


def test_every_command_has_help_and_an_example():
    """Check that each command and example are documented (and that the lists agree)."""
    assert sorted(EXAMPLES) == COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=COMMANDS)
def test_command_help(command, capsys):
    """Check that `cnncodes COMMAND --help` prints a description and its example."""
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: cnncodes {command}" in text and "Example:" in text and EXAMPLES[command] in text


def test_python_dash_m_and_version():
    """Check that `python -m cnncodes` runs the CLI."""
    done = subprocess.run([sys.executable, "-m", "cnncodes", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("cnncodes ")
    done = subprocess.run([sys.executable, "-m", "cnncodes"], capture_output=True, text=True)
    assert done.returncode == 2 and "extract" in done.stdout


def test_extract_and_info(photos, tmp_path, capsys):
    """Check that extract prints a summary with images/s and info describes the store."""
    out = tmp_path / "c.h5"
    code = main(["extract", str(photos), "-o", str(out), "--layer", "block4", "--layer", "block5",
                 "--image-size", "64", "--workers", "0", "--quiet"])
    text = capsys.readouterr().out
    assert code == 0
    assert "12 images: 12 extracted (" in text and "img/s" in text and "0 failed" in text
    assert "12 rows; block4 (96), block5 (1280)" in text
    assert CodeStore(out).layers == ["block4", "block5"]
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "12 rows, format cnncodes.codes v2, 1 segment(s) in c.h5.d/" in text
    assert "block4 = features.13 (96)" in text and "classes: daisy 4, rose 4, tulip 4" in text
    assert "weights IMAGENET1K_V1 (sha256 b03531047ffa)" in text


@pytest.mark.slow
def test_demo(tmp_path, capsys, monkeypatch):
    """Check that the demo extracts the 200 bundled photos, fits, evaluates, predicts and reports."""
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "200 images: 200 extracted" in text and "classes: daisy 40, dandelion 40, rose 40" in text
    assert "150 photos to train on, 50 held out" in text
    assert re.search(r"evaluate on the 50 held-out photos: accuracy 0\.\d{4} \(95 % CI 0\.\d{4} to ", text)
    assert len(re.findall(r"^   \w+/\S+\.jpg: \w+ 0\.\d{3}, \w+ 0\.\d{3}$", text, re.M)) == 2
    assert f"report: open {tmp_path / 'demo-report.html'}" in text
    assert CodeStore(tmp_path / "cnncodes-demo.h5").codes("block5").shape == (200, 1280)
    assert (tmp_path / "cnncodes-demo.skops").is_file()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["extract", "{tmp}/nope", "-o", "{tmp}/x.h5"], "does not exist"),
        (["extract", "{photos}", "-o", "{tmp}/x.h5", "--backbone", "alexnet"], "unknown backbone 'alexnet'. Valid backbones: convnext_tiny"),
        (["extract", "{photos}", "-o", "{tmp}/x.h5", "--layer", "block9"], "layer 'block9' is not an alias.*Valid aliases: block1"),
        (["extract", "{photos}", "-o", "{tmp}/x.h5", "--backbone", "resnet50"], "no checkpoint 'resnet50-0676ba61.pth'"),
        (["extract", "{photos}", "-o", "{tmp}/x.h5", "--weights", "{tmp}/missing.pth"], "checkpoint file .* does not exist"),
        (["info", "{tmp}/nope.h5"], "does not exist. Create it with `cnncodes extract`"),
        (["layers", "vgg19"], "unknown backbone 'vgg19'"),
    ],
    ids=["missing-data", "backbone", "layer", "weights-offline", "weights-file", "info-missing", "layers"],
)
def test_errors_are_one_line_messages(argv, words, photos, tmp_path, capsys):
    """Check that library errors become `cnncodes CMD: error: ...` with exit code 2, no traceback."""
    argv = [a.format(tmp=tmp_path, photos=photos) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cnncodes {argv[0]}: error: ")
    assert "Traceback" not in err
    import re

    assert re.search(words, err.replace("\n", " ")), err


def test_debug_flag_shows_the_traceback(tmp_path):
    """Check that --debug lets the exception through for a traceback."""
    from cnncodes import StoreError

    with pytest.raises(StoreError):
        main(["--debug", "info", str(tmp_path / "nope.h5")])


def test_failures_give_exit_status_1(photos, tmp_path, capsys):
    """Check that a run with failed images finishes, says so, and exits with 1."""
    (photos / "daisy" / "broken.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "c.h5"
    code = main(["extract", str(photos), "-o", str(out), "--image-size", "64", "--workers", "0", "--quiet"])
    text = capsys.readouterr().out
    assert code == 1
    assert "1 failed" in text and "daisy/broken.jpg: not an image" in text
    assert len(CodeStore(out)) == 12
