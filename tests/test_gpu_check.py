"""benchmarks/gpu_check.sh: valid bash, and a clean skip where there is no CUDA device."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


def test_gpu_check_parses():
    """Check that `bash -n` accepts the script."""
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_gpu_check_skips_cleanly_without_cuda(tmp_path):
    """Check that without CUDA the script prints one line saying it skipped, exits 0 and
    writes nothing."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}  # no GPU, even on a GPU machine
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "results")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"gpu_check: skipped: no CUDA device here (torch.cuda.is_available() is False with {sys.executable})."]
    assert not (tmp_path / "results").exists()
