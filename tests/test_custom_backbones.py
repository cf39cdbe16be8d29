"""Backbones beyond the built-in nine: your own nn.Module, timm ConvNets and ViTs, spp and token poolings."""

import re
import sys

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import cnncodes
from cnncodes import (
    CnnCodesError,
    CodeStore,
    StoreMismatchError,
    UnknownBackboneError,
    UnknownLayerError,
    WeightsError,
    extract,
    fit,
    layer_table,
    predict,
    register_backbone,
)
from cnncodes._backbones.registry import code_size, get_backbone
from cnncodes._cli.main import main
from cnncodes._backbones.codes_model import HookedCodesModel, pool, run_hooked
from cnncodes._backbones.custom import state_dict_sha256
from cnncodes._io import file_sha256
from cnncodes._backbones.weights import load_model, resolve

timm = pytest.importorskip("timm")  # the dev extra installs it; the structural tests need it


@pytest.fixture(scope="module", autouse=True)
def _registrations_stay_here():
    """The networks this module registers are forgotten after it: `list_backbones` elsewhere
    (`cnncodes backbones`) sees the built-ins only, whatever order the tests run in."""
    from cnncodes._backbones import custom

    before = dict(custom._MODULES)
    yield
    custom._MODULES.clear()
    custom._MODULES.update(before)

SIZE = 64
TIMM_MODELS = ["timm:resnet18", "timm:mobilenetv3_small_050", "timm:vit_tiny_patch16_224"]
RUN = dict(image_size=SIZE, batch_size=4, num_workers=0, progress=False)


def _small_net():
    """A 3-stage ConvNet: 3 -> 8 -> 16 -> 32 channels, strides 2, 4, 8, then global pooling."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


@pytest.mark.parametrize("name", TIMM_MODELS, ids=[n.split(":")[1] for n in TIMM_MODELS])
def test_timm_layer_table_matches_a_real_forward_pass(name):
    """Check that a timm model's aliases, shapes and code sizes are those of a real forward pass.

    Random weights (no download); the table is inferred on the meta device, the truth comes
    from the module outputs of the real network on a real image batch.
    """
    spec = get_backbone(name)
    model = load_model(spec, resolve(spec, None))
    rows = layer_table(name, image_size=SIZE)
    feature_info = model.feature_info
    assert [r["alias"] for r in rows] == [f"block{k + 1}" for k in range(len(feature_info))]
    assert [r["node"] for r in rows] == [f["module"] for f in feature_info]
    with torch.no_grad():
        out = run_hooked(model, [r["node"] for r in rows], torch.rand(2, 3, SIZE, SIZE))
        codes = HookedCodesModel(model, {r["node"]: r["alias"] for r in rows}, "avg",
                                 prefix_tokens=spec.prefix_tokens)(torch.rand(2, 3, SIZE, SIZE))
    for r in rows:
        assert r["output"] == tuple(out[r["node"]].shape[1:]), r["alias"]
        assert r["code_size"] == codes[r["alias"]].shape[1] == r["channels"], r["alias"]
    assert rows[-1]["default"]


def test_cli_layers_of_a_timm_model_prints_the_real_shapes(capsys):
    """Check that `cnncodes layers timm:resnet18` prints each stage end with its real output shape."""
    assert main(["layers", "timm:resnet18", "--image-size", str(SIZE)]) == 0
    printed = capsys.readouterr().out
    model = timm.create_model("resnet18", pretrained=False).eval()
    with torch.no_grad():
        out = run_hooked(model, ["act1", "layer1", "layer2", "layer3", "layer4"], torch.rand(1, 3, SIZE, SIZE))
    for k, (node, t) in enumerate(out.items()):
        shape = "x".join(map(str, t.shape[1:]))
        assert re.search(rf"block{k + 1}\b.*\b{re.escape(node)}\s+{t.shape[1]}\s+\d+\s+{shape}\s+{t.shape[1]}",
                         printed), printed


def test_vit_token_poolings_read_the_right_tokens():
    """Check cls, avg and cls+avg on tokens with one class and two register tokens (dropped)."""
    x = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)  # 2 images, 6 tokens, 3 channels
    patches = x[:, 3:]
    assert torch.equal(pool(x, "cls", prefix_tokens=3), x[:, 0])
    assert torch.allclose(pool(x, "avg", prefix_tokens=3), patches.mean(1))
    assert torch.allclose(pool(x, "cls+avg", prefix_tokens=3), torch.cat([x[:, 0], patches.mean(1)], 1))
    assert torch.allclose(pool(x, "max", prefix_tokens=3), patches.amax(1))
    assert torch.equal(pool(x, "flatten", prefix_tokens=3), patches.flatten(1))
    assert code_size((6, 3), "cls+avg", 3) == 6 and code_size((6, 3), "flatten", 3) == 9


def test_spp_pooling_concatenates_1_2_and_4_grids():
    """Check that spp is the 1x1, 2x2 and 4x4 average pools, concatenated, and its code size."""
    x = torch.rand(2, 5, 8, 8)
    expected = torch.cat([x.mean((2, 3)),
                          x.reshape(2, 5, 2, 4, 2, 4).mean((3, 5)).flatten(1),
                          x.reshape(2, 5, 4, 2, 4, 2).mean((3, 5)).flatten(1)], 1)
    assert torch.allclose(pool(x, "spp"), expected, atol=1e-6)
    assert code_size((5, 8, 8), "spp") == 5 * 21 == expected.shape[1]
    rows = layer_table("resnet18", pooling="spp", image_size=SIZE)
    assert [r["code_size"] for r in rows] == [r["channels"] * 21 for r in rows]


@pytest.mark.parametrize(("pooling", "shape", "match"), [
    ("cls", (8, 4, 4), "pooling 'cls' needs the token outputs of a ViT block"),
    ("spp", (17, 192), "pooling 'spp' needs a feature map"),
], ids=["cls-on-a-map", "spp-on-tokens"])
def test_pooling_that_does_not_fit_the_output_is_refused(pooling, shape, match):
    """Check that a token pooling on a feature map (and spp on tokens) names the poolings that fit."""
    with pytest.raises(CnnCodesError, match=match):
        code_size(shape, pooling, where="net block5")


@pytest.mark.parametrize(("backbone", "layer", "pooling"), [
    ("timm:resnet18", "block5", "avg"),
    ("timm:vit_tiny_patch16_224", "block12", "cls+avg"),
], ids=["timm-convnet", "timm-vit"])
def test_timm_extract_fit_predict_end_to_end(photos, tmp_path, backbone, layer, pooling):
    """Check extract -> fit -> predict with a timm ConvNet and a timm ViT (random weights, 64 px)."""
    out = tmp_path / "codes.h5"
    result = extract(photos, out=out, backbone=backbone, weights=None, layers=layer, pooling=pooling, **RUN)
    rows = layer_table(backbone, pooling=pooling, image_size=SIZE)
    size = next(r["code_size"] for r in rows if r["alias"] == layer)
    store = CodeStore(out)
    assert store.codes(layer).shape == (12, size) and result.layers == {layer: size}
    assert np.isfinite(store.codes(layer)).all() and store.codes(layer).std(0).max() > 0
    assert store.spec.backbone == backbone and store.spec.weights.id == "random"
    model = fit(out, layer=layer, C=1.0)
    preds = predict(model, photos, batch_size=4, num_workers=0)
    assert len(preds) == 12 and {p.labels[0] for p in preds} <= {"daisy", "rose", "tulip"}
    # The codes predict re-extracts are those of the store: the same network and seed.
    assert [p.labels[0] for p in preds] == list(model.predict(store.codes(layer)))


def test_own_module_extract_fit_predict_and_provenance(photos, tmp_path):
    """Check extract(model=...) end to end; the store records the name and the state dict's sha256.

    A store made from one module refuses rows of a module with other parameters.
    """
    net = _small_net()
    out = tmp_path / "codes.h5"
    layers = {"block2": "2", "block3": "4", "head": "7"}
    extract(photos, out=out, model=net, name="tiny-net", layers=layers, **RUN)
    store = CodeStore(out)
    assert store.spec.backbone == "tiny-net" and dict(store.spec.layers) == layers
    assert store.spec.weights.id == "module" and store.spec.weights.sha256 == state_dict_sha256(net)
    assert {a: store.codes(a).shape[1] for a in layers} == {"block2": 16, "block3": 32, "head": 32}
    table = {r["alias"]: r for r in layer_table("tiny-net", image_size=SIZE)}
    assert table["block2"]["output"] == (16, SIZE // 4, SIZE // 4) and table["block2"]["stride"] == 4
    model = fit(out, layer="head", C=1.0)
    preds = predict(model, photos, batch_size=4, num_workers=0)
    assert [p.labels[0] for p in preds] == list(model.predict(store.codes("head")))
    other = _small_net()
    with torch.no_grad():
        other[0].bias.add_(1.0)
    with pytest.raises(StoreMismatchError, match=r"made with weights_sha256 '[0-9a-f]{64}', but this run asks"):
        extract(photos, out=out, model=other, name="tiny-net", layers=layers, **RUN)


def test_register_backbone_by_name_and_a_torchvision_transform():
    """Check register_backbone: listed, a torchvision preset's preprocessing, raw module paths accepted."""
    net = torchvision.models.resnet18()
    preset = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    assert register_backbone("rn18-mine", net, layers={"block4": "layer3"}, preprocessing=preset) == "rn18-mine"
    assert "rn18-mine" in cnncodes.list_backbones()
    spec = get_backbone("rn18-mine")
    assert spec.layer("layer2").node == "layer2" and spec.default_layer == "block4"
    assert layer_table("rn18-mine")[0]["output"] == (256, 14, 14)  # 224 px, the preset's crop


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda: register_backbone("resnet50", _small_net(), layers=["2"]), UnknownBackboneError,
     "cannot register a backbone as 'resnet50': give a new name"),
    (lambda: register_backbone("x-net", _small_net(), layers={"b": "body.9"}), UnknownLayerError,
     r"'body.9' \(layer 'b'\) is not a module of this network"),
    (lambda: register_backbone("x-net", "not a module", layers=["2"]), CnnCodesError,
     "register_backbone needs a torch.nn.Module, got a str"),
    (lambda: extract(".", out="/nonexistent/x.h5", model=_small_net(), layers=["2"]), CnnCodesError,
     r"extract\(model=...\) needs name='my-net'"),
    (lambda: get_backbone("timm:no_such_net_xyz"), UnknownBackboneError, "timm has no model 'no_such_net_xyz'"),
    (lambda: resolve(get_backbone("timm:resnet18"), "imagenet"), WeightsError,
     "pretrained weights come from the network, and CNNCODES_OFFLINE is set.*--weights PATH"),
    (lambda: resolve(get_backbone("timm:resnet18"), "/nonexistent/w.pth"), WeightsError,
     "checkpoint file '/nonexistent/w.pth' does not exist"),
    (lambda: extract(".", out="/nonexistent/x.h5", model=_small_net(), name="x-net", layers=["2"], engine="ray"),
     CnnCodesError, "x-net is an nn.Module registered in this process; Ray's actors cannot build it"),
], ids=["builtin-name", "bad-module-path", "not-a-module", "no-name", "unknown-timm", "offline", "no-file", "ray"])
def test_custom_backbone_errors_say_what_to_do(monkeypatch, call, error, match):
    """Check the one-line errors of register_backbone, extract(model=...) and timm names."""
    monkeypatch.setenv("CNNCODES_OFFLINE", "1")
    with pytest.raises(error, match=match):
        call()


def test_missing_timm_names_the_extra(monkeypatch, capsys):
    """Check that without timm a timm backbone names `pip install 'cnncodes[timm]'` (CLI: one line)."""
    from cnncodes._backbones.custom import _timm_entry

    _timm_entry.cache_clear()
    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without timm imports
    try:
        with pytest.raises(CnnCodesError, match=re.escape("pip install 'cnncodes[timm]'")):
            get_backbone("timm:resnet18")
        assert main(["layers", "timm:resnet18"]) != 0
        err = capsys.readouterr().err.strip()
        assert "pip install 'cnncodes[timm]'" in err and "Traceback" not in err
    finally:
        _timm_entry.cache_clear()


def test_timm_weights_from_a_local_file_record_its_hash(tmp_path):
    """Check --weights PATH for a timm model: loaded, its sha256 recorded, a wrong file refused."""
    spec = get_backbone("timm:resnet18")
    torch.manual_seed(1)
    net = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "rn18.pth"
    torch.save(net.state_dict(), path)
    w = resolve(spec, str(path))
    assert w.ref.id == "file:rn18.pth" and w.sha256 == file_sha256(path)
    loaded = load_model(spec, w)
    assert state_dict_sha256(loaded) == state_dict_sha256(net)
    wrong = tmp_path / "other.pth"
    torch.save(_small_net().state_dict(), wrong)
    with pytest.raises(WeightsError, match="does not fit timm:resnet18.*Pick the timm model"):
        load_model(spec, resolve(spec, str(wrong)))
