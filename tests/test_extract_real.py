"""Tests with the real ImageNet MobileNetV2 on the bundled photos, at the weights' own preprocessing."""

import numpy as np
import pytest

from cnncodes import CodeStore, extract


@pytest.fixture(scope="module")
def ten_photos(sample_dir):
    return sorted(p for p in sample_dir.rglob("*.jpg"))[::4]


def _codes(paths, tmp_path, name, **kw):
    out = tmp_path / f"{name}.h5"
    extract([str(p) for p in paths], out=out, layers=["block4", "block5"], num_workers=0,
            progress=False, **kw)
    store = CodeStore(out)
    return store, {layer: store.codes(layer) for layer in store.layers}


def test_codes_are_stable_across_runs_and_batch_sizes(ten_photos, tmp_path):
    """Check that codes are identical across runs and agree across batch sizes."""
    _, a = _codes(ten_photos, tmp_path, "a", batch_size=4)
    _, b = _codes(ten_photos, tmp_path, "b", batch_size=4)
    _, c = _codes(ten_photos, tmp_path, "c", batch_size=1)
    _, d = _codes(ten_photos, tmp_path, "d", batch_size=10, **{"device": "cpu"})
    for layer in ("block4", "block5"):
        np.testing.assert_array_equal(a[layer], b[layer])
        np.testing.assert_allclose(a[layer], c[layer], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a[layer], d[layer], rtol=1e-4, atol=1e-5)
    assert a["block5"].shape == (10, 1280) and a["block4"].shape == (10, 96)


def test_several_layers_in_one_pass_equal_single_layer_runs(ten_photos, tmp_path):
    """Check that reading two layers in one pass gives the codes of two separate passes."""
    _, both = _codes(ten_photos, tmp_path, "both")
    out = tmp_path / "only4.h5"
    extract([str(p) for p in ten_photos], out=out, layers=["features.13"], num_workers=0, progress=False)
    store = CodeStore(out)
    assert store.layers == ["block4"]  # a raw node name is stored under its alias
    np.testing.assert_allclose(store.codes("block4"), both["block4"], rtol=1e-5, atol=1e-6)


def test_default_codes_are_the_pre_logits_features(ten_photos, tmp_path):
    """Check that the pretrained head applied to the default codes gives the full network's logits."""
    import torch
    from PIL import Image
    from torchvision.models import MobileNet_V2_Weights

    from cnncodes._backbones.registry import get_backbone
    from cnncodes._backbones.weights import load_model, resolve

    store, codes = _codes(ten_photos, tmp_path, "pre", precision="float32")
    spec = get_backbone("mobilenet_v2")
    model = load_model(spec, resolve(spec, "imagenet"))
    transform = MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    rows = {rid: k for k, rid in enumerate(store.ids)}
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in ten_photos])
    with torch.inference_mode():
        full = model(images)
        from_codes = model.classifier(torch.from_numpy(codes["block5"]))
    order = [rows[p.relative_to(store.attrs["data_root"]).as_posix()] for p in ten_photos]
    torch.testing.assert_close(from_codes[order], full, rtol=1e-4, atol=1e-4)


def test_decoding_threads_keep_warnings_quiet_and_the_filters_intact(photos, tmp_path, fast, monkeypatch):
    """Check that images decoded in turn by a thread per core (num_workers=0) neither leak
    their decoding warnings nor leave the process's warning filters changed (concurrent
    catch_warnings blocks in the threads would scramble them)."""
    import time
    import warnings

    import cnncodes._input.images as images

    real = images.to_rgb

    def noisy(img):
        warnings.warn("an odd image", UserWarning)
        time.sleep(0.02)  # the threads' decodings overlap
        return real(img)

    extract(photos, out=tmp_path / "warm.h5", **fast)  # modules imported on first use add their filters
    monkeypatch.setattr(images, "to_rgb", noisy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        result = extract(photos, out=tmp_path / "quiet.h5", **fast)
        assert list(warnings.filters) == filters
    assert result.n_extracted == 12
    assert not [w for w in caught if "an odd image" in str(w.message)]
