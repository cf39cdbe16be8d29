"""The backbone registry against the real torchvision models: channels, strides, pooling, errors, CLI."""

import math
import re

import pytest
import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import cnncodes
from cnncodes import CnnCodesError, UnknownBackboneError, UnknownLayerError, layer_table, list_backbones
from cnncodes._backbones.registry import (
    LayerInfo,
    check_pooling,
    code_sizes,
    default_image_size,
    get_backbone,
    graph_nodes,
    output_shapes,
    shallow_to_deep,
)
from cnncodes._cli.main import main
from cnncodes._backbones.codes_model import CodesModel
from cnncodes._backbones.weights import load_model, resolve

BACKBONES = list_backbones()
# Small inputs keep the real forward passes cheap on a CPU; both are multiples of 32 and
# above InceptionV3's 75-pixel minimum. SIZE_B - SIZE_A is a multiple of every stride.
SIZE_A, SIZE_B = 96, 128
# Backbones whose convolutions use "valid" (no) padding: their maps are a few pixels smaller
# than ceil(size / stride). Every other backbone pads "same" and gives exactly that size.
VALID_PADDING = {"inception_v3"}


def test_registry_lists_the_nine_backbones():
    """Check that the registry holds the nine documented backbones, sorted."""
    assert BACKBONES == [
        "convnext_tiny", "densenet121", "efficientnet_b0", "inception_v3", "mobilenet_v2",
        "resnet101", "resnet18", "resnet50", "vgg16",
    ]


@pytest.mark.parametrize("name", BACKBONES, ids=BACKBONES)
def test_registry_matches_a_real_forward_pass(name):
    """Check that every alias's channels and nominal stride match a real forward pass.

    The backbone is built with random weights (no checkpoint needed) and run on random
    images of two sizes. Channels: the pooled code length from CodesModel equals the
    registry's channels, and so does the unpooled map's channel axis.

    Stride rule: every layer up to a tap point is a convolution or pooling whose output
    side is floor((n + 2p - k) / s) + 1, and composing such floors gives
    floor((n - a) / S) + 1 with S the product of the strides, for some offset a that
    depends on padding and kernel sizes. So growing the input by a multiple of S grows the
    map by exactly that multiple over S, whatever the padding: this checks the nominal
    stride exactly, for InceptionV3's valid padding too. On top of that the map is never
    larger than ceil(n / S), and with "same" padding (every backbone but InceptionV3) it is
    exactly that size.
    """
    torch.manual_seed(0)
    spec = get_backbone(name)
    model = load_model(spec, resolve(spec, None))
    aliases = {info.node: info.alias for info in spec.layers}
    codes_model = CodesModel(model, aliases, "avg")
    raw_model = create_feature_extractor(model, return_nodes=aliases)
    images_a = torch.randn(2, 3, SIZE_A, SIZE_A)
    images_b = torch.randn(1, 3, SIZE_B, SIZE_B)
    with torch.inference_mode():
        codes = codes_model(images_a)
        raw_a = raw_model(images_a)
        raw_b = raw_model(images_b)

    assert set(codes) == {info.alias for info in spec.layers}
    # The meta-device shapes behind `cnncodes layers` agree with the real model.
    meta = {row["alias"]: row["output"] for row in layer_table(name, image_size=SIZE_A)}
    for info in spec.layers:
        code, map_a, map_b = codes[info.alias], raw_a[info.alias], raw_b[info.alias]
        assert code.shape == (2, info.channels), info.alias
        assert tuple(map_a.shape[1:]) == meta[info.alias], info.alias
        if info.stride is None:
            # A fully connected output: a vector, passed through unpooled.
            assert map_a.shape == (2, info.channels), info.alias
            assert torch.equal(code, map_a), info.alias
            continue
        assert map_a.shape[1] == info.channels, info.alias
        # CodesModel folds BatchNorm into the convolutions: the same function, other float32
        # rounding, which random weights amplify through 100 layers (exact check: test_fold_...).
        torch.testing.assert_close(code, map_a.mean(dim=(2, 3)), rtol=1e-3, atol=1e-4)
        (h_a, w_a), (h_b, w_b) = map_a.shape[2:], map_b.shape[2:]
        assert h_a == w_a and h_b == w_b, info.alias
        assert h_b - h_a == (SIZE_B - SIZE_A) // info.stride, (info.alias, h_a, h_b)
        assert h_a <= math.ceil(SIZE_A / info.stride), (info.alias, h_a)
        if name not in VALID_PADDING:
            assert h_a == math.ceil(SIZE_A / info.stride), (info.alias, h_a)


def test_fold_batchnorm_keeps_the_codes_and_leaves_the_network_alone(sample_dir):
    """Check that folding BatchNorm into the convolutions (every one of MobileNetV2's 52)
    gives the unfolded network's float32 codes on real photos, and leaves the network it was
    traced from as it was; a network in training mode is not folded."""
    from cnncodes._backbones.codes_model import fold_batchnorm
    from cnncodes._input.images import Preprocess, decode
    from torchvision.models import MobileNet_V2_Weights

    spec = get_backbone("mobilenet_v2")
    model = load_model(spec, resolve(spec))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nodes = {"features.13": "block4", "features.18": "block5"}
    graph = create_feature_extractor(model, return_nodes=nodes)
    assert fold_batchnorm(graph) == 52 == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(n.op == "call_module" and isinstance(graph.get_submodule(n.target), nn.BatchNorm2d)
                   for n in graph.graph.nodes)
    prep = Preprocess.from_weights(MobileNet_V2_Weights.IMAGENET1K_V1)
    x = prep.normalize(torch.stack([decode(p.read_bytes(), prep) for p in sorted(sample_dir.rglob("*.jpg"))[:8]]))
    plain = create_feature_extractor(model, return_nodes=nodes)
    with torch.inference_mode():
        a, b = graph(x), plain(x)
    for alias in ("block4", "block5"):
        torch.testing.assert_close(a[alias], b[alias], rtol=1e-4, atol=1e-4)
        assert b[alias].abs().max() > 1  # real activations, not a vanishing signal
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 52
    model.train()
    assert fold_batchnorm(create_feature_extractor(model, return_nodes=nodes)) == 0
    # CodesModel folds in float32 only (in bfloat16 the folded bias would cost precision).
    model.eval()
    calls = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        CodesModel(model, nodes, "avg", precision="float32")(x[:1])
        assert len(calls) == 0
        CodesModel(model, nodes, "avg", precision="bfloat16", float32_until="features.1")(x[:1])
        assert len(calls) == 52


@pytest.mark.parametrize("name", BACKBONES, ids=BACKBONES)
def test_layer_table_is_ordered_and_sized(name):
    """Check that layer_table lists aliases shallow to deep with the right code sizes.

    Code sizes are those of the meta-device output shapes at the default image size:
    channels for "avg" and C*H*W for "flatten" (the vector length for fc layers).
    """
    spec = get_backbone(name)
    size = default_image_size(spec)
    shapes = output_shapes(name, tuple(info.node for info in spec.layers), size)
    avg, flat = layer_table(name), layer_table(name, pooling="flatten")

    assert [row["alias"] for row in avg] == [info.alias for info in spec.layers]
    for info, row_avg, row_flat in zip(spec.layers, avg, flat):
        shape = shapes[info.node]
        assert row_avg["output"] == row_flat["output"] == shape
        assert shape[0] == info.channels
        assert row_avg["code_size"] == info.channels
        assert row_flat["code_size"] == math.prod(shape)
        if info.stride is None:
            assert len(shape) == 1
        else:
            assert len(shape) == 3 and shape[1] == shape[2] <= math.ceil(size / info.stride)

    # extract's code lengths (read off the registry for pooled layers, untraced) are the table's.
    for pooling, rows in (("avg", avg), ("flatten", flat)):
        assert code_sizes(spec, spec.layers, pooling, size) == {r["alias"]: r["code_size"] for r in rows}

    # Shallow to deep: strides never decrease, fc layers come last, and the nodes follow
    # the order of the model's graph.
    strides = [info.stride for info in spec.layers]
    spatial = [s for s in strides if s is not None]
    assert strides[: len(spatial)] == spatial == sorted(spatial)
    order = graph_nodes(name)
    positions = [order.index(info.node) for info in spec.layers]
    assert positions == sorted(positions)
    assert shallow_to_deep(spec, spec.layers[::-1]) == list(spec.layers)

    # Exactly one default, the registered one, and "default" / None select it.
    assert [row["alias"] for row in avg if row["default"]] == [spec.default_layer]
    assert spec.layer("default").alias == spec.layer(None).alias == spec.default_layer


# --- pooling --------------------------------------------------------------------------------


class _Tiny(nn.Module):
    """A backbone with one 4-D tap point ("body") and one 2-D output ("flatten")."""

    def __init__(self):
        super().__init__()
        self.body = nn.Identity()

    def forward(self, x):
        return self.body(x).flatten(1)


# Per image: channel 0 is [[1, 2], [3, 4]], channel 1 is [[-1, 0], [0, 8]]; the second
# image is twice the first. GeM (p=3) clamps the negatives and zeros to 1e-6.
_IMAGE = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [0.0, 8.0]]])
_EXPECTED = {
    "avg": [2.5, 1.75],
    "max": [4.0, 8.0],
    "gem": [25.0 ** (1 / 3), 128.0 ** (1 / 3)],  # ((1+8+27+64)/4)^(1/3), (512/4)^(1/3)
    "flatten": [1.0, 2.0, 3.0, 4.0, -1.0, 0.0, 0.0, 8.0],
}


@pytest.mark.parametrize("pooling", list(_EXPECTED), ids=list(_EXPECTED))
def test_pooling_values_on_a_known_tensor(pooling):
    """Check that each pooling turns a hand-made map into the expected codes, per image."""
    images = torch.stack([_IMAGE, 2 * _IMAGE])
    codes = CodesModel(_Tiny(), {"body": "map", "flatten": "vec"}, pooling)(images)
    expected = torch.tensor(_EXPECTED[pooling])
    torch.testing.assert_close(codes["map"], torch.stack([expected, 2 * expected]))
    # A 2-D (fully connected) output passes through whatever the pooling.
    assert torch.equal(codes["vec"], images.flatten(1))


def test_gem_uses_its_exponent():
    """Check that GeM with p=1 is the mean of the clamped map and grows towards max with p."""
    images = _IMAGE[None]
    gem1 = CodesModel(_Tiny(), {"body": "map"}, "gem", gem_p=1.0)(images)["map"]
    gem10 = CodesModel(_Tiny(), {"body": "map"}, "gem", gem_p=10.0)(images)["map"]
    torch.testing.assert_close(gem1, torch.tensor([[2.5, 2.0]]), atol=1e-5, rtol=0)
    expected10 = torch.tensor([[((1 + 2**10 + 3**10 + 4**10) / 4) ** 0.1, (8**10 / 4) ** 0.1]])
    torch.testing.assert_close(gem10, expected10)
    assert (gem1 < gem10).all() and (gem10 < torch.tensor([[4.0, 8.0]])).all()


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [lambda: get_backbone("resnet5"), lambda: layer_table("resnet5"), lambda: graph_nodes("resnet5")],
    ids=["get_backbone", "layer_table", "graph_nodes"],
)
def test_unknown_backbone_lists_the_valid_ones(call):
    """Check that an unknown backbone name raises with the list of valid backbones."""
    with pytest.raises(UnknownBackboneError, match="unknown backbone 'resnet5'. Valid backbones: .*resnet50"):
        call()


def test_unknown_backbone_is_a_value_error():
    """Check that UnknownBackboneError is a CnnCodesError and a ValueError."""
    with pytest.raises(CnnCodesError) as excinfo:
        get_backbone("nope")
    assert isinstance(excinfo.value, ValueError)


def test_unknown_layer_lists_aliases_and_the_nodes_command():
    """Check that an unknown layer raises with the aliases and the command listing raw nodes."""
    spec = get_backbone("mobilenet_v2")
    with pytest.raises(UnknownLayerError, match="Valid aliases: block1, block2, block3, block4, block5") as excinfo:
        spec.layer("block9")
    excinfo.match(re.escape("`cnncodes layers mobilenet_v2 --nodes`"))
    excinfo.match("'block9' is not an alias or a graph node of mobilenet_v2")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("features.14", LayerInfo("features.14", "features.14", -1, None)),
        ("features.13", LayerInfo("block4", "features.13", 96, 16)),
        ("block4", LayerInfo("block4", "features.13", 96, 16)),
    ],
    ids=["raw-node", "node-of-an-alias", "alias"],
)
def test_layer_accepts_aliases_and_raw_nodes(name, expected):
    """Check that a layer is found by alias, by its node, or as any raw FX node name."""
    assert get_backbone("mobilenet_v2").layer(name) == expected


def test_raw_node_has_a_shape():
    """Check that a raw FX node (mobilenet_v2 features.14) gives a real output shape."""
    assert output_shapes("mobilenet_v2", ("features.14",), SIZE_A) == {"features.14": (160, 3, 3)}


@pytest.mark.parametrize(
    "call",
    [lambda: check_pooling("mean"), lambda: layer_table("resnet50", pooling="mean")],
    ids=["check_pooling", "layer_table"],
)
def test_unknown_pooling_lists_the_valid_ones(call):
    """Check that an unknown pooling raises with the valid poolings."""
    with pytest.raises(CnnCodesError, match=re.escape("unknown pooling 'mean'. Valid poolings: avg, max, gem, flatten, spp, cls, cls+avg.")):
        call()


# --- CLI ------------------------------------------------------------------------------------


def test_cli_backbones_lists_all(capsys):
    """Check that `cnncodes backbones` prints every backbone with its aliases and default."""
    assert main(["backbones"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == BACKBONES
    assert "default fc2" in lines[BACKBONES.index("vgg16")]


def test_cli_layers_prints_the_table(capsys):
    """Check that `cnncodes layers resnet50` prints alias, node, channels, stride and size."""
    assert main(["layers", "resnet50"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:-1]}
    assert rows["block4"] == ["block4", "layer3", "1024", "16", "1024x14x14", "1024"]
    assert rows["block5"] == ["block5", "*", "layer4", "2048", "32", "2048x7x7", "2048"]
    assert out.splitlines()[0].split()[:4] == ["alias", "node", "channels", "stride"]
    assert out.splitlines()[-1].startswith("* default layer")


def test_cli_layers_flatten_at_an_image_size(capsys):
    """Check that --pooling flatten and --image-size change the code sizes shown."""
    assert main(["layers", "vgg16", "--pooling", "flatten", "--image-size", "64"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:-1]}
    assert rows["block5"][-2:] == ["512x2x2", "2048"]
    assert rows["fc2"][-3:] == ["-", "4096", "4096"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["layers", "nope"], "unknown backbone 'nope'. Valid backbones: .*resnet50"),
        (["layers", "nope", "--nodes"], "unknown backbone 'nope'. Valid backbones: .*resnet50"),
        (["layers", "resnet50", "--pooling", "mean"], "unknown pooling 'mean'. Valid poolings: avg"),
    ],
    ids=["unknown-backbone", "unknown-backbone-nodes", "unknown-pooling"],
)
def test_cli_layers_errors(capsys, argv, message):
    """Check that `cnncodes layers` with a bad argument exits 2 with the message on stderr."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("cnncodes layers: error: ")
    assert re.search(message, captured.err)


def test_cli_layers_nodes(capsys):
    """Check that `cnncodes layers mobilenet_v2 --nodes` lists the raw FX node names."""
    assert main(["layers", "mobilenet_v2", "--nodes"]) == 0
    nodes = capsys.readouterr().out.splitlines()
    assert "features.14" in nodes and "features.13" in nodes
    assert nodes == list(graph_nodes("mobilenet_v2"))


def test_package_exports_the_registry():
    """Check that the public names point at the registry functions."""
    assert cnncodes.list_backbones is list_backbones
    assert cnncodes.layer_table is layer_table
