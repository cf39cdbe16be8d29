"""Tests that the example scripts run end to end on the bundled photos."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script, *args, cwd):
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_flowers_tutorial_example(sample_dir, tmp_path):
    """Check that the flowers example fits, saves, reloads and predicts on the sample."""
    out = _run("flowers_mobilenet.py", sample_dir, "--store", tmp_path / "s.h5",
               "--model", tmp_path / "m.skops", cwd=tmp_path)
    assert (tmp_path / "m.skops").is_file() and "block5" in out


def test_knn_retrieval_example(sample_dir, tmp_path):
    """Check that retrieval lists k neighbours, none of them the query, and writes a PNG."""
    query = sorted((sample_dir / "sunflower").iterdir())[0]
    out = _run("knn_retrieval.py", sample_dir, "--query", query, "--k", "4",
               "--store", tmp_path / "s.h5", "-o", tmp_path / "n.png", cwd=tmp_path)
    assert (tmp_path / "n.png").read_bytes()[:4] == b"\x89PNG"
    assert query.name not in out.split("nearest", 1)[-1]
