"""Start-up: `import cnncodes` and the light commands load no torch, torchvision, sklearn or faiss."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cnncodes
from cnncodes import CodeStore

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "sklearn", "faiss")


def _python(*args: str) -> subprocess.CompletedProcess:
    """Run this tree's cnncodes in a fresh interpreter (PYTHONPATH first: not another install)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": path})
    assert done.returncode == 0, done.stderr
    return done


def _imported(importtime_log: str) -> set[str]:
    """The top-level packages named in a `python -X importtime` log."""
    lines = [line for line in importtime_log.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines[1:]}  # [0]: the header


def test_import_loads_no_heavy_package():
    """Check that `import cnncodes` imports none of torch, torchvision, sklearn and faiss."""
    code = ("import cnncodes, sys; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), cnncodes.__version__)")
    assert _python("-c", code).stdout.split() == ["[]", cnncodes.__version__]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A real store (a copy of the version 1 fixture: `info` reads it as it is)."""
    path = tmp_path_factory.mktemp("startup") / "codes.h5"
    shutil.copy(ROOT / "tests" / "data" / "v1" / "codes.h5", path)
    return path


@pytest.mark.parametrize(
    "args, needs",
    [
        (["--help"], set()),
        (["--version"], set()),
        (["check", "--help"], set()),
        (["info", "STORE"], {"h5py", "numpy"}),
        (["backbones"], set()),
    ],
    ids=["help", "version", "check-help", "info", "backbones"],
)
def test_light_commands_load_no_heavy_package(args, needs, store):
    """Check that the light commands import no heavy package, and that they import what they need."""
    args = [str(store) if a == "STORE" else a for a in args]
    done = _python("-X", "importtime", "-m", "cnncodes", *args)
    imported = _imported(done.stderr)
    assert "cnncodes" in imported  # the log was read
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert needs <= imported
    assert done.stdout  # each prints something: help, version, a description, a list


def test_every_public_name_resolves_lazily():
    """Check that each name of __all__ comes through the module's __getattr__ and dir() lists it."""
    fresh = {name: getattr(cnncodes, name) for name in cnncodes.__all__}
    assert fresh["CodeStore"] is CodeStore
    assert fresh["extract"].__module__ == "cnncodes._extract"
    assert fresh["CnnCodesError"].__module__ == "cnncodes._errors"
    assert set(cnncodes.__all__) <= set(dir(cnncodes))
    assert cnncodes.__all__ == sorted(cnncodes.__all__)
    assert {*cnncodes._LAZY} <= {*cnncodes.__all__}  # nothing lazy outside the public API
    from cnncodes import FaissKNNClassifier, extract, fit  # noqa: F401 - the import form works too


def test_private_submodules_stay_reachable():
    """Check that `cnncodes._store` and the like are attributes of the package, as before."""
    assert cnncodes._store.CodeStore is CodeStore
    assert cnncodes._backbones.list_backbones() == cnncodes.list_backbones()


@pytest.mark.parametrize("name", ["no_such_name", "_no_such_module"], ids=["public", "private"])
def test_unknown_attribute_raises(name):
    """Check that an unknown attribute raises AttributeError that names it and points to __all__."""
    with pytest.raises(AttributeError, match=rf"module 'cnncodes' has no attribute '{name}'.*__all__"):
        getattr(cnncodes, name)
    assert not hasattr(cnncodes, name)
