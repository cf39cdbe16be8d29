"""Tests of ExtractorSpec and WeightsRef: the JSON stores and model files hold, checks, narrowing."""

import dataclasses
import hashlib
import json
import shutil

import h5py
import numpy as np
import pytest

from cnncodes import CodeStore, StoreError, StoreMismatchError, UnknownLayerError, extract
from cnncodes._spec import ExtractorSpec, WeightsRef, check_spec, normalize_spec

from conftest import FAST


@pytest.fixture(scope="module")
def subset(tmp_path_factory, sample_dir):
    """3 classes x 3 photos of the bundled sample."""
    root = tmp_path_factory.mktemp("spec") / "photos"
    for cls in ("daisy", "rose", "tulip"):
        (root / cls).mkdir(parents=True)
        for f in sorted((sample_dir / cls).iterdir())[:3]:
            shutil.copy(f, root / cls / f.name)
    return root


@pytest.fixture(scope="module")
def store(subset):
    """A real two-layer store, and the spec JSON exactly as its file holds it."""
    out = subset.parent / "codes.h5"
    extract(subset, out=out, layers=["block4", "block5"], precision="float32", **FAST)
    with h5py.File(out, "r") as f:
        raw = f.attrs["spec"]
    return out, raw.decode() if isinstance(raw, bytes) else raw


def test_round_trip_gives_the_stored_json(store):
    """Check that from_json/to_json of a real store's spec gives its dict and its JSON text back."""
    out, text = store
    raw = json.loads(text)
    spec = ExtractorSpec.from_json(raw)
    assert spec.to_json() == raw
    assert json.dumps(spec.to_json(), sort_keys=True) == text
    assert list(spec.to_json()) == sorted(raw)
    assert CodeStore(out).spec == spec and normalize_spec(raw) == raw
    assert (spec.backbone, spec.pooling, spec.dtype, spec.tta) == ("mobilenet_v2", "avg", "float32", "none")
    assert spec.layers == {"block4": "features.13", "block5": "features.18"}
    assert list(spec.layers) == ["block4", "block5"]  # shallow to deep
    assert spec.weights == WeightsRef("torchvision", "IMAGENET1K_V1", raw["weights_sha256"])
    assert spec.preprocessing.crop_size == 64 and spec.preprocessing.description.startswith("resize shorter")
    assert spec.preprocessing.mean == (0.485, 0.456, 0.406)  # frozen; JSON lists come back as lists
    assert spec.to_json()["preprocessing"]["mean"] == [0.485, 0.456, 0.406]


def test_spec_is_frozen_and_hashable(store):
    """Check that a spec cannot be changed in place and can key a dict."""
    spec = CodeStore(store[0]).spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.pooling = "max"
    with pytest.raises(TypeError):
        spec.layers["block6"] = "features.19"
    assert {spec: 1}[ExtractorSpec.from_json(json.loads(store[1]))] == 1


def test_old_dicts_get_the_implicit_defaults(store):
    """Check that a spec written before tta, jpeg_draft and resize existed reads with their old values."""
    old = json.loads(store[1])
    del old["tta"], old["preprocessing"]["jpeg_draft"], old["preprocessing"]["resize"]
    spec = ExtractorSpec.from_json(old)
    assert spec.tta == "none"
    assert (spec.preprocessing.jpeg_draft, spec.preprocessing.resize) == (False, "workers")
    assert spec.to_json() == normalize_spec(old)
    assert "tta" not in old  # the caller's dict is left as it was


def test_a_dict_that_is_no_spec_is_refused():
    """Check that a dict without the settings every version records is refused, naming them."""
    with pytest.raises(StoreError, match="lacks backbone, layers"):
        ExtractorSpec.from_json({"weights": "random", "pooling": "avg"})


def _changed(spec, **json_changes):
    d = spec.to_json()
    for key, value in json_changes.items():
        d[key] = value(d[key]) if callable(value) else value
    return ExtractorSpec.from_json(d)


@pytest.mark.parametrize("changes, words", [
    (dict(pooling="max"), "codes.h5 was made with pooling 'avg', but this run asks for pooling 'max'"),
    (dict(weights="file:ft.pt"),
     "made with weights 'IMAGENET1K_V1', but this run asks for weights 'file:ft.pt'"),
    (dict(weights_sha256="00ff"),
     "made with weights_sha256 '.*', but this run asks for weights_sha256 '00ff'"),
    (dict(tta="flip"), "made with tta 'none', but this run asks for tta 'flip'"),
    (dict(precision="float16"),
     "made with precision 'float32', but this run asks for precision 'float16'"),
    (dict(layers={"block5": "features.18"}),
     "made with layers 'block4=features.13, block5=features.18', but this run asks for "
     "layers 'block5=features.18'"),
    (dict(preprocessing=lambda p: {**p, "crop_size": 96, "description": "crop 96"}),
     "made with preprocessing \"resize shorter side .*centre crop 64.*\", but this run asks for "
     "preprocessing 'crop 96'. Codes made with different settings are never mixed"),
], ids=["pooling", "weights", "weights-sha256", "tta", "precision", "layers", "preprocessing"])
def test_check_names_both_values(store, changes, words):
    """Check that a differing setting is refused with the store's value and the asked one."""
    spec = CodeStore(store[0]).spec
    wanted = _changed(spec, **changes)
    with pytest.raises(StoreMismatchError, match=words):
        spec.check(wanted, "codes.h5")
    with pytest.raises(StoreMismatchError, match=words):  # the dict form of earlier versions
        check_spec(spec.to_json(), wanted.to_json(), "codes.h5")


def test_check_passes_equal_specs_and_ignores_model_keys(store):
    """Check that equal settings pass, whatever a model file adds and wherever the weights were."""
    spec = CodeStore(store[0]).spec
    spec.check(spec.to_model_json() | {"weights_path": "/elsewhere/w.pth"}, "codes.h5")
    spec.check(ExtractorSpec.from_json(json.loads(store[1])), "codes.h5")


@pytest.mark.parametrize("layer", ["block5", "features.18"], ids=["alias", "node"])
def test_narrow_to_one_layer(store, layer):
    """Check that narrowing by alias or by graph node keeps the alias and every other setting."""
    spec = CodeStore(store[0]).spec
    one = spec.narrow(layer)
    assert one.layers == {"block5": "features.18"}
    assert dataclasses.replace(one, layers=spec.layers) == spec


def test_narrow_to_a_missing_layer_names_those_held(store):
    """Check that narrowing to a layer the spec does not hold says which it holds."""
    with pytest.raises(UnknownLayerError,
                       match=r"no layer 'block3'.*hold block4 \(features\.13\), block5 \(features\.18\)"):
        CodeStore(store[0]).spec.narrow("block3")


def test_one_rule_finds_a_layer_by_alias_or_node():
    """Check that an alias wins over a node of the same name, a node gives its alias, and a name
    that is neither gives None: in a layer table and in the layers a spec holds alike."""
    from cnncodes._backbones.registry import get_backbone
    from cnncodes._spec import find_alias

    layers = {"block4": "features.13", "features.13x": "block4", "block5": "features.18"}
    assert find_alias(layers, "block4") == "block4"  # an alias, though it is also a node
    assert find_alias(layers, "features.18") == "block5"
    assert find_alias(layers, "block9") is None
    mobilenet = get_backbone("mobilenet_v2")
    assert mobilenet.layer("features.13").alias == "block4" and mobilenet.layer("block4").node == "features.13"


def test_alias_of_a_held_layer(store):
    """Check that `alias` gives the deepest layer by default, an alias for a node, and refuses a
    layer not held with the caller's words and error, or by default naming the layers held."""
    spec = CodeStore(store[0]).spec
    assert (spec.alias(), spec.alias("features.13"), spec.alias("block5")) == ("block5", "block4", "block5")
    with pytest.raises(StoreError, match=r"^x\{1\}.h5 lacks 'block2'$"):
        spec.alias("block2", lambda name: StoreError(f"x{{1}}.h5 lacks {name!r}"))
    with pytest.raises(UnknownLayerError, match=r"no layer 'block2' in these codes; they hold block4 \(features"):
        spec.alias("block2")


def test_extract_kwargs_make_the_same_codes(store, subset, tmp_path):
    """Check that extract(**spec.extract_kwargs()) makes a store with the same spec and codes."""
    out, text = store
    spec = CodeStore(out).spec
    kwargs = spec.extract_kwargs()
    assert kwargs == dict(backbone="mobilenet_v2", layers=["features.13", "features.18"], pooling="avg",
                          weights="IMAGENET1K_V1", image_size=64, dtype="float32", precision="float32",
                          tta="none", jpeg_draft=spec.preprocessing.jpeg_draft,
                          resize=spec.preprocessing.resize)
    again = tmp_path / "again.h5"
    extract(subset, out=again, **kwargs, batch_size=4, num_workers=0, progress=False)
    with h5py.File(again, "r") as f:
        assert json.loads(f.attrs["spec"]) == json.loads(text)
    first, second = CodeStore(out), CodeStore(again)
    assert second.spec == spec and list(second.ids) == list(first.ids)
    np.testing.assert_allclose(second.codes("block5"), first.codes("block5"), rtol=1e-5, atol=1e-6)


def test_model_file_dict_round_trip(store):
    """Check that a model file's extractor dict (with image_size, weights_path) reads and writes alike."""
    spec = CodeStore(store[0]).spec
    old = {**json.loads(store[1]), "layers": {"block5": "features.18"}, "image_size": 64,
           "weights_path": "/models/mobilenet_v2-b0353104.pth"}  # as earlier versions wrote it
    read = ExtractorSpec.from_json(old)
    assert read == spec.narrow("block5") and read.weights.path == old["weights_path"]
    assert read.to_model_json() == old
    assert read["image_size"] == 64 and read["pooling"] == "avg"  # the dict access of earlier versions
    assert read.get("nope") is None and "tta" in read


def test_describe_lines(store):
    """Check that describe() gives the lines `cnncodes info` prints."""
    spec = CodeStore(store[0]).spec
    header, layers, prep = spec.describe({"block4": 96, "block5": 1280})
    assert header.startswith(
        "backbone mobilenet_v2, weights IMAGENET1K_V1 (sha256 b03531047ffa), pooling avg")
    assert "computed in float32, tta none" in header
    assert layers == "layers: block4 = features.13 (96), block5 = features.18 (1280)"
    assert prep == "preprocessing: " + spec.preprocessing.description
    assert spec.describe()[1] == "layers: block4 = features.13, block5 = features.18"


def test_digest_names_caches_as_before(store):
    """Check that the digest is the one CNNCodes named its cache stores by before the spec existed."""
    d = json.loads(store[1])
    settings = {"pooling": d["pooling"], "weights": d["weights"], "weights_sha256": d["weights_sha256"],
                "preprocessing": {k: v for k, v in d["preprocessing"].items() if k != "description"},
                "dtype": d["dtype"], "precision": d["precision"], "tta": d["tta"]}
    expected = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    assert ExtractorSpec.from_json(d).digest() == expected


@pytest.mark.parametrize("weights_id, kind, name, flags", [
    ("IMAGENET1K_V1", "torchvision", "IMAGENET1K_V1", (False, False, True)),
    ("file:ft.pt", "file", "ft.pt", (True, False, False)),
    ("random", "random", "", (False, True, False)),
], ids=["torchvision", "file", "random"])
def test_weights_ref_parses_and_formats_ids(weights_id, kind, name, flags):
    """Check that every kind of weights id parses into its parts and formats back unchanged."""
    ref = WeightsRef.from_id(weights_id, "ab" if kind != "random" else "")
    assert (ref.kind, ref.name, ref.id) == (kind, name, weights_id)
    assert (ref.is_file, ref.is_random, ref.is_torchvision) == flags
    assert WeightsRef(kind, name, ref.sha256).id == weights_id


def test_weights_ref_extract_arg():
    """Check that each kind gives the weights= of extract that finds it again."""
    assert WeightsRef.from_id("IMAGENET1K_V1", "ab", "/hub/m.pth").extract_arg() == "IMAGENET1K_V1"
    assert WeightsRef.from_id("file:ft.pt", "ab", "/models/ft.pt").extract_arg() == "/models/ft.pt"
    assert WeightsRef.from_id("file:ft.pt", "ab").extract_arg() == "ft.pt"
    assert WeightsRef.from_id("random").extract_arg() is None
    assert WeightsRef.from_id("file:ft.pt", "ab", "/a") == WeightsRef.from_id("file:ft.pt", "ab", "/b")


def test_weights_ref_refuses_an_unknown_kind():
    """Check that a kind other than torchvision, file or random is refused, naming the valid ones."""
    with pytest.raises(ValueError, match="unknown weights kind 'url'. Valid kinds: torchvision, file, "
                                         "random"):
        WeightsRef("url", "x")


def test_model_files_keep_the_extractor_dict(store, tmp_path):
    """Check that a model file holds the extractor dict of earlier versions and loads it as a spec."""
    import skops.io as sio

    from cnncodes import fit, load, save

    out, text = store
    path = save(fit(out, layer="features.18", C=1.0), tmp_path / "m.skops")
    bundle = sio.load(path, trusted=sio.get_untrusted_types(file=path))
    stored = json.loads(text)
    # What `_extractor_spec` wrote before the spec was typed: the store's dict, one layer,
    # the crop as image_size and the checkpoint's path, keys in that order.
    before = {**stored, "layers": {"block5": "features.18"},
              "image_size": stored["preprocessing"]["crop_size"],
              "weights_path": CodeStore(out).attrs["weights_path"]}
    assert type(bundle["extractor"]) is dict and bundle["extractor"] == before
    assert list(bundle["extractor"]) == list(before)
    spec = load(path).extractor
    assert spec == CodeStore(out).spec.narrow("block5") and spec.weights.path == before["weights_path"]
