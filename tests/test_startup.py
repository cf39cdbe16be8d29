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
    """Run this tree's cnncodes in a fresh interpreter (from its root: not another install)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
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
        (["check", "STORE"], {"h5py", "numpy"}),
        (["backbones"], set()),
        (["layers", "mobilenet_v2"], set()),
        (["layers", "inception_v3", "--pooling", "flatten"], set()),
    ],
    ids=["help", "version", "check-help", "info", "check", "backbones", "layers", "layers-flatten"],
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
    assert fresh["extract"].__module__ == "cnncodes._extract.extract"
    assert fresh["CnnCodesError"].__module__ == "cnncodes._errors"
    assert set(cnncodes.__all__) <= set(dir(cnncodes))
    assert cnncodes.__all__ == sorted(cnncodes.__all__)
    assert {*cnncodes._LAZY} <= {*cnncodes.__all__}  # nothing lazy outside the public API
    from cnncodes import FaissKNNClassifier, extract, fit  # noqa: F401 - the import form works too


def test_private_submodules_stay_reachable():
    """Check that `cnncodes._store.store` and the like are attributes of the package, as before."""
    assert cnncodes._store.store.CodeStore is CodeStore
    assert cnncodes._backbones.registry.list_backbones() == cnncodes.list_backbones()


@pytest.mark.parametrize("name", ["no_such_name", "_no_such_module"], ids=["public", "private"])
def test_unknown_attribute_raises(name):
    """Check that an unknown attribute raises AttributeError that names it and points to __all__."""
    with pytest.raises(AttributeError, match=rf"module 'cnncodes' has no attribute '{name}'.*__all__"):
        getattr(cnncodes, name)
    assert not hasattr(cnncodes, name)


def test_weights_snapshot_is_torchvision():
    """Check that the weights snapshot holds the installed torchvision's values, aliases in order."""
    from importlib.metadata import version

    from cnncodes._backbones.registry import _REGISTRY
    from cnncodes._backbones.tv_weights import SNAPSHOT, SNAPSHOT_OF, take_snapshot

    if version("torchvision") != SNAPSHOT_OF:
        pytest.skip(f"the snapshot is of torchvision {SNAPSHOT_OF} (unused with {version('torchvision')}): "
                    f"print a new one with `python -m cnncodes._backbones.tv_weights`")
    assert take_snapshot(spec.weights_enum for spec in _REGISTRY.values()) == SNAPSHOT



def test_shapes_snapshot_is_what_tracing_gives():
    """Check that the layer output shapes `cnncodes layers` shows without torchvision are the
    traced ones, for every registered node of the nine backbones at their default crop; and
    that another crop is traced."""
    from importlib.metadata import version

    from cnncodes._backbones.registry import _REGISTRY, default_image_size, output_shapes
    from cnncodes._backbones.tv_weights import SHAPES, SNAPSHOT_OF

    if version("torchvision") != SNAPSHOT_OF:
        pytest.skip(f"the snapshot is of torchvision {SNAPSHOT_OF} (unused with {version('torchvision')})")
    traced = {}
    for spec in _REGISTRY.values():
        size = default_image_size(spec)
        traced[spec.name] = (size, output_shapes(spec.name, tuple(i.node for i in spec.layers), size, traced=True))
    assert traced == SHAPES
    assert output_shapes("resnet50", ("layer4",), 256) == {"layer4": (2048, 8, 8)}


@pytest.mark.parametrize("backbone", cnncodes.list_backbones())
def test_weights_snapshot_gives_the_same_preprocessing_and_names(backbone, monkeypatch):
    """Check that each weights name resolves and preprocesses the same through the snapshot."""
    from cnncodes._backbones.registry import get_backbone, weights_enum, weights_names
    from cnncodes._input.images import Preprocess
    from cnncodes._backbones.weights import _enum_member

    spec = get_backbone(backbone)
    real = weights_enum(spec)
    names = [*real.__members__, "imagenet", "default"]

    def seen() -> list:
        """What resolving each name gives: member, file, preprocessing; and the error of a bad one."""
        members = [_enum_member(spec, name) for name in names]
        preps = [Preprocess.from_weights(m, size, True, resize) for m in members
                 for size, resize in [(None, "workers"), (160, "device")]]
        with pytest.raises(cnncodes.WeightsError) as bad:
            _enum_member(spec, "V9")
        return [[(m.name, m.url) for m in members], [(p.as_dict(), p.describe()) for p in preps], str(bad.value)]

    expected = seen()
    monkeypatch.setattr("cnncodes._backbones.tv_weights._snapshot_usable", lambda: True)
    assert weights_names(spec) is not real
    assert list(weights_names(spec).__members__) == list(real.__members__)
    assert seen() == expected


def test_unchanged_rerun_imports_no_torchvision(photos, tmp_path):
    """Check that re-running an extraction resolves its weights without torchvision, same stored spec."""
    import h5py

    for f in (f for f in photos.rglob("*") if f.is_file()):  # past the racy window: stat keys trusted
        os.utime(f, (f.stat().st_atime - 3600, f.stat().st_mtime - 3600))
    out = tmp_path / "codes.h5"
    cnncodes.extract(photos, out=out, image_size=64, progress=False)  # torchvision imported here: the real enum
    with h5py.File(out, "r") as f:
        before = f.attrs["spec"]
    done = _python("-X", "importtime", "-m", "cnncodes", "extract", str(photos), "-o", str(out), "--image-size",
                   "64", "--quiet")
    assert "12 already in the store" in done.stdout
    assert "torchvision" not in _imported(done.stderr)
    fresh = tmp_path / "fresh.h5"  # a new store, its spec built from the snapshot
    _python("-m", "cnncodes", "extract", str(photos), "-o", str(fresh), "--image-size", "64", "--quiet")
    with h5py.File(out, "r") as f, h5py.File(fresh, "r") as g:
        assert f.attrs["spec"] == before == g.attrs["spec"]
