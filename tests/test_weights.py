"""Checkpoint resolution with the real MobileNetV2 weights: search path, hashes, files, errors."""

import hashlib
import os
import re
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2, resnet18

from cnncodes import WeightsError
from cnncodes._backbones.registry import build_model, get_backbone
from cnncodes._backbones.weights import Weights, load_model, resolve, search_dirs

SPEC = get_backbone("mobilenet_v2")
V1 = MobileNet_V2_Weights.IMAGENET1K_V1
# A fixed real photo of the bundled sample: the pretrained MobileNetV2 ranks "daisy" first
# (p ~ 0.95). Several of the 8 daisy photos are not recognised, so this one is hard-coded.
DAISY_PHOTO = "3758221664_b19116d61f.jpg"


class NotAStateDict:
    """An arbitrary Python object: torch.load(weights_only=True) refuses to unpickle it."""

    def __init__(self):
        self.payload = [1, 2, 3]


@pytest.fixture
def hub_dir(tmp_path):
    """An empty torch hub folder for one test, so downloads never touch the session's."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


@pytest.fixture
def no_local_weights(tmp_path, monkeypatch, hub_dir):
    """CNNCODES_WEIGHTS_PATH pointing at an empty folder, with an empty hub cache."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("CNNCODES_WEIGHTS_PATH", str(empty))
    return empty


@pytest.fixture(scope="module")
def pretrained(weights_file):
    """The real pretrained MobileNetV2, loaded through cnncodes."""
    return load_model(SPEC, resolve(SPEC, "imagenet"))


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- the real checkpoint --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["imagenet", "IMAGENET1K_V1", V1], ids=["imagenet", "member-name", "enum"])
def test_resolve_finds_the_real_checkpoint(weights_file, name):
    """Check that the ImageNet weights resolve to the real checkpoint on the search path."""
    w = resolve(SPEC, name)
    assert w.id == "IMAGENET1K_V1" and w.preprocessing_from == "IMAGENET1K_V1"
    assert w.sha256.startswith("b0353104") and len(w.sha256) == 64
    assert Path(w.path) == weights_file.resolve()
    assert weights_file.parent in search_dirs()


def test_default_weights_are_imagenet_v1(weights_file):
    """Check that resolve() without weights means the original ImageNet weights."""
    assert resolve(SPEC) == resolve(SPEC, "imagenet")


def test_pretrained_model_recognises_a_daisy(pretrained, sample_dir):
    """Check that the loaded real weights classify a sample daisy photo as a daisy."""
    assert not pretrained.training
    image = Image.open(sample_dir / "daisy" / DAISY_PHOTO).convert("RGB")
    with torch.inference_mode():
        probs = pretrained(V1.transforms()(image)[None]).softmax(dim=1)[0]
    top5 = [V1.meta["categories"][i] for i in probs.topk(5).indices]
    assert "daisy" in top5
    assert top5[0] == "daisy"


def test_corrupt_checkpoint_is_refused(tmp_path, monkeypatch, weights_file):
    """Check that a checkpoint whose sha256 does not match its name raises."""
    bad = tmp_path / "bad"
    bad.mkdir()
    data = bytearray(weights_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / weights_file.name).write_bytes(bytes(data))
    monkeypatch.setenv("CNNCODES_WEIGHTS_PATH", os.pathsep.join([str(bad), str(weights_file.parent)]))
    with pytest.raises(WeightsError, match="corrupt or not the file its name promises") as excinfo:
        resolve(SPEC, "imagenet")
    excinfo.match("the name says b0353104")
    excinfo.match(re.escape(str(bad / weights_file.name)))


def test_missing_checkpoint_says_where_it_looked(no_local_weights, hub_dir):
    """Check that a missing checkpoint (offline) names the file, the folders and the fixes."""
    with pytest.raises(WeightsError, match=r"no checkpoint 'mobilenet_v2-b0353104\.pth'") as excinfo:
        resolve(SPEC, "imagenet")
    excinfo.match("CNNCODES_OFFLINE is set")
    excinfo.match(re.escape(f"  - {no_local_weights}\n"))
    excinfo.match(re.escape(f"  - {hub_dir / 'checkpoints'}"))
    excinfo.match("CNNCODES_WEIGHTS_PATH")
    excinfo.match(re.escape("--weights PATH/TO/mobilenet_v2-b0353104.pth"))
    excinfo.match(re.escape(V1.url))


# --- the download path ----------------------------------------------------------------------


def test_download_is_used_when_online(no_local_weights, hub_dir, monkeypatch, weights_file):
    """Check that without CNNCODES_OFFLINE a missing checkpoint is downloaded and verified."""
    monkeypatch.delenv("CNNCODES_OFFLINE")
    calls = []

    def fake_download(url, *args, **kwargs):
        # What torch.hub does: save the file under <hub>/checkpoints, return its state dict.
        calls.append((url, kwargs.get("check_hash")))
        target = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights_file, target)
        return torch.load(target, map_location="cpu", weights_only=True)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    w = resolve(SPEC, "imagenet")
    assert calls == [(V1.url, True)]
    assert w.id == "IMAGENET1K_V1" and w.sha256.startswith("b0353104")
    assert Path(w.path) == (hub_dir / "checkpoints" / weights_file.name).resolve()
    # Once downloaded, the hub cache is searched and nothing is fetched again.
    assert resolve(SPEC, "imagenet") == w
    assert len(calls) == 1


def test_failed_download_is_reported(no_local_weights, monkeypatch):
    """Check that a failing download raises with the reason and where it looked."""
    monkeypatch.delenv("CNNCODES_OFFLINE")

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(WeightsError, match="download failed: <urlopen error no network>") as excinfo:
        resolve(SPEC, "imagenet")
    excinfo.match(r"no checkpoint 'mobilenet_v2-b0353104\.pth'")
    excinfo.match("CNNCODES_WEIGHTS_PATH")


@pytest.mark.parametrize("offline", ["0", ""], ids=["zero", "empty"])
def test_offline_zero_or_empty_means_online(no_local_weights, monkeypatch, offline):
    """Check that CNNCODES_OFFLINE=0 or empty allows the download."""
    monkeypatch.setenv("CNNCODES_OFFLINE", offline)

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(WeightsError, match="download failed"):
        resolve(SPEC, "imagenet")


# --- weights names --------------------------------------------------------------------------


def test_random_weights(pretrained):
    """Check that weights=None gives random parameters, recorded as "random"."""
    w = resolve(SPEC, None)
    assert w == Weights("random", "", "", "IMAGENET1K_V1")
    torch.manual_seed(0)
    model = load_model(SPEC, w)
    assert not model.training
    random_params, real_params = dict(model.named_parameters()), dict(pretrained.named_parameters())
    assert random_params.keys() == real_params.keys()
    for key, value in random_params.items():
        assert not torch.equal(value, real_params[key]), key


@pytest.mark.parametrize("name", ["DEFAULT", "default", "IMAGENET1K_V2"], ids=["DEFAULT", "lowercase", "V2"])
def test_default_means_torchvisions_default(name, no_local_weights):
    """Check that "DEFAULT" is torchvision's default (IMAGENET1K_V2), missing offline."""
    with pytest.raises(WeightsError, match=r"no checkpoint 'mobilenet_v2-7ebf99e0\.pth' for mobilenet_v2 IMAGENET1K_V2"):
        resolve(SPEC, name)


@pytest.mark.parametrize("name", ["IMAGENET9K", "random"], ids=["unknown", "random-string"])
def test_unknown_weights_name_lists_the_valid_ones(name):
    """Check that an unknown weights name raises with the valid names."""
    pattern = f"mobilenet_v2 has no weights '{name}'. Use one of imagenet, DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2"
    with pytest.raises(WeightsError, match=re.escape(pattern)) as excinfo:
        resolve(SPEC, name)
    excinfo.match("weights=None for random weights")


# --- local checkpoint files -----------------------------------------------------------------


def _random_state_dict(seed=1):
    torch.manual_seed(seed)
    return build_model(SPEC, pretrained=False).state_dict()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {"model_state_dict": sd, "epoch": 3},
    ],
    ids=["plain", "state_dict-module-prefix", "model_state_dict"],
)
@pytest.mark.parametrize("as_path", [False, True], ids=["str", "Path"])
def test_local_checkpoint_is_loaded(tmp_path, wrap, as_path):
    """Check that --weights PATH loads a saved state dict, plain or wrapped, and records it."""
    state = _random_state_dict()
    path = tmp_path / "ft.pt"
    torch.save(wrap(state), path)
    w = resolve(SPEC, path if as_path else str(path))
    assert w.id == "file:ft.pt"
    assert w.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert w.path == str(path.resolve()) and w.preprocessing_from == "IMAGENET1K_V1"
    loaded = load_model(SPEC, w).state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_unsafe_checkpoint_is_refused(tmp_path):
    """Check that a checkpoint that needs arbitrary unpickling is refused, not loaded."""
    path = tmp_path / "pickle.pt"
    torch.save(NotAStateDict(), path)
    with pytest.raises(WeightsError, match="cannot load checkpoint .* safely"):
        load_model(SPEC, resolve(SPEC, str(path)))


def test_checkpoint_that_is_not_a_dict_is_refused(tmp_path):
    """Check that a checkpoint holding something other than a state dict is refused."""
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(WeightsError, match="holds a list, not a state dict"):
        load_model(SPEC, resolve(SPEC, str(path)))


def test_checkpoint_of_another_architecture_does_not_fit(tmp_path):
    """Check that a resnet18 state dict loaded as mobilenet_v2 raises "does not fit"."""
    path = tmp_path / "resnet18.pt"
    torch.save(resnet18().state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit mobilenet_v2: .* missing keys .* unexpected") as excinfo:
        load_model(SPEC, resolve(SPEC, str(path)))
    excinfo.match("Pick the backbone the checkpoint was trained as")


def test_checkpoint_with_other_shapes_does_not_fit(tmp_path):
    """Check that a same-architecture checkpoint with other tensor shapes raises "does not fit".

    A MobileNetV2 fine-tuned on 5 classes has a 5-row classifier: its keys all match, its
    shapes do not.
    """
    path = tmp_path / "five_classes.pt"
    torch.save(mobilenet_v2(num_classes=5).state_dict(), path)
    with pytest.raises(WeightsError, match=r"(?s)does not fit mobilenet_v2: .*size mismatch for classifier\.1\.weight") as excinfo:
        load_model(SPEC, resolve(SPEC, str(path)))
    excinfo.match("1000-class ImageNet head")


def test_missing_local_checkpoint(tmp_path):
    """Check that a checkpoint path that does not exist raises "does not exist"."""
    path = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match=re.escape(f"checkpoint file '{path}' does not exist")):
        resolve(SPEC, str(path))


def test_random_weights_are_the_same_network_every_time(sample_dir, tmp_path):
    """Check that weights=None draws one fixed network, so a random-weights store never mixes two."""
    import torch

    from cnncodes import CodeStore, extract

    state = torch.random.get_rng_state()
    a = load_model(get_backbone("resnet18"), resolve(get_backbone("resnet18"), None))
    b = load_model(get_backbone("resnet18"), resolve(get_backbone("resnet18"), None))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is untouched
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    photos = sorted(sample_dir.rglob("*.jpg"))
    out = tmp_path / "random.h5"
    kw = dict(out=out, backbone="resnet18", weights=None, layers=["block2"], image_size=32,
              num_workers=0, progress=False)
    extract([str(p) for p in photos[:4]], **kw)
    extract([str(p) for p in photos[:6]], **kw)  # a second run appends two rows
    once = tmp_path / "once.h5"
    extract([str(p) for p in photos[:6]], **{**kw, "out": once})
    np.testing.assert_allclose(CodeStore(out).codes(), CodeStore(once).codes(), rtol=1e-5, atol=1e-6)
