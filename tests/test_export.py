"""Export of a fitted model as one network: agreement with predict, metadata, refusals, no torch to run it."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnncodes import ExportError, OnnxModel, export, fit, load, predict, save
from cnncodes._cli.main import main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"


def _predicted(model, sample_dir, classes):
    """`cnncodes.predict`'s probabilities of every bundled photo, columns in `classes` order, and the ids."""
    preds = predict(model, sample_dir, top_k=len(classes), num_workers=0)
    table = np.array([[dict(zip(p.labels, p.probabilities))[c] for c in classes] for p in preds])
    return table, [p.id for p in preds]


@pytest.fixture(scope="module")
def svm(deployable):
    """A calibrated linear SVM on the same codes, its .skops and .onnx files."""
    skops = save(fit(deployable.store, layer="block5", classifier="linear_svm", C=1.0),
                 deployable.root / "svm.skops")
    return skops, export(skops, deployable.root / "svm.onnx")


def test_onnx_probabilities_equal_predicts(deployable, svm, sample_dir):
    """Check that ONNX Runtime gives predict's probabilities on the bundled photos (logreg and SVM)."""
    for skops, onnx in [(deployable.skops, deployable.onnx), svm]:
        model = OnnxModel(onnx)
        expected, ids = _predicted(skops, sample_dir, model.classes)
        got = model.predict_proba(np.stack([model.preprocess(sample_dir / i) for i in ids]))
        assert got.shape == (40, 5) and got.dtype == np.float32
        assert np.abs(got - expected).max() <= 1e-4, onnx.name
        assert np.allclose(got.sum(axis=1), 1, atol=1e-5)


def test_metadata_records_classes_input_preprocessing_and_provenance(deployable):
    """Check that the export says what it takes, what it gives and what it was made from."""
    meta = OnnxModel(deployable.onnx).metadata
    model = load(deployable.skops)
    assert meta["classes"] == ["daisy", "dandelion", "rose", "sunflower", "tulip"] == model.classes
    assert meta["input"]["dtype"] == "uint8" and meta["input"]["shape"] == ["batch", 3, 96, 96]
    assert "already resized" in meta["input"]["expects"]
    assert meta["preprocessing"]["crop_size"] == 96 and meta["preprocessing"]["resize"] == "workers"
    assert meta["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    prov = meta["provenance"]
    assert prov["weights_sha256"] == model.extractor.weights.sha256 and len(prov["weights_sha256"]) == 64
    assert (prov["layer"], prov["node"], prov["pooling"]) == ("block5", "features.18", "avg")
    assert prov["cnncodes_version"] and prov["classifier"] == "logreg"


def test_batch_size_is_dynamic(deployable, sample_dir):
    """Check that one photo alone and the same photo in a batch of 7 get the same probabilities."""
    model = OnnxModel(deployable.onnx)
    photos = sorted(sample_dir.glob("*/*.jpg"))[:7]
    batch = np.stack([model.preprocess(p) for p in photos])
    assert np.abs(model.predict_proba(batch[:1]) - model.predict_proba(batch)[:1]).max() < 1e-6


def test_the_docs_reference_runs_without_torch_and_agrees_with_predict(deployable, sample_dir, tmp_path):
    """Check that the docs' ONNX Runtime example, run as written where torch is not imported, gives
    predict's probabilities, and that cnncodes.OnnxModel runs there too."""
    block = re.search(r"## Run it with ONNX Runtime.*?```python\n(.*?)```", DOCS.read_text(), re.S).group(1)
    shutil.copy(deployable.onnx, tmp_path / "model.onnx")
    shutil.copy(sorted(sample_dir.glob("rose/*.jpg"))[0], tmp_path / "photo.jpg")
    ids = sorted(str(p.relative_to(sample_dir)) for p in sample_dir.glob("*/*.jpg"))
    script = block + f"""
import sys
batch = np.stack([preprocess({str(sample_dir)!r} + "/" + i) for i in {ids!r}])
np.save("docs.npy", session.run(None, {{"pixels": batch}})[0])
from cnncodes import OnnxModel
model = OnnxModel("model.onnx")
np.save("onnxmodel.npy", model.predict_proba(np.stack([model.preprocess({str(sample_dir)!r} + "/" + i) for i in {ids!r}])))
assert "torch" not in sys.modules, "torch was imported"
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == "rose"  # the example's print: the class of photo.jpg
    expected, pred_ids = _predicted(deployable.skops, sample_dir, OnnxModel(deployable.onnx).classes)
    expected = expected[np.argsort(pred_ids)]
    assert sorted(pred_ids) == ids
    for name in ("docs.npy", "onnxmodel.npy"):
        assert np.abs(np.load(tmp_path / name) - expected).max() <= 1e-4, name


def test_torchscript_export_equals_predict(deployable, sample_dir):
    """Check that the TorchScript file holds the same network and the metadata as an extra file."""
    path = export(deployable.skops, deployable.root / "logreg.pt", format="torchscript")
    extra = {"cnncodes.json": ""}
    net = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["cnncodes.json"])["classes"] == load(deployable.skops).classes
    onnx = OnnxModel(deployable.onnx)
    expected, ids = _predicted(deployable.skops, sample_dir, onnx.classes)
    pixels = torch.from_numpy(np.stack([onnx.preprocess(sample_dir / i) for i in ids]))
    with torch.no_grad():
        assert np.abs(net(pixels).numpy() - expected).max() <= 1e-4


def test_a_finetuned_network_exports_with_its_flip_tta(tmp_path, photos):
    """Check that a fine-tuned .pt (flip TTA) exports to ONNX with predict's probabilities."""
    from cnncodes import finetune

    ckpt = tmp_path / "ft.pt"
    finetune(photos, out=ckpt, image_size=64, batch_size=8, num_workers=0, precision="float32",
             progress=False, unfreeze="block5", epochs=1, tta="flip", test_size=None, val_fraction=0,
             early_stopping=None)
    model = OnnxModel(export(ckpt, tmp_path / "ft.onnx"))
    assert model.metadata["provenance"]["tta"] == "flip"
    expected, ids = _predicted(ckpt, photos, model.classes)
    got = model.predict_proba(np.stack([model.preprocess(photos / i) for i in ids]))
    assert got.shape == (12, 3) and np.abs(got - expected).max() <= 1e-4


def test_knn_is_refused_with_the_reason(deployable, capsys):
    """Check that a kNN model is refused in one line saying why and what to do, exit 2 in the CLI."""
    knn = save(fit(deployable.store, layer="block5", classifier="knn", n_neighbors=3), deployable.root / "knn.skops")
    with pytest.raises(ExportError, match="cannot export a kNN model as one network: its prediction searches"):
        export(knn, deployable.root / "knn.onnx")
    assert main(["export", str(knn), "-o", str(deployable.root / "knn.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnncodes export: error: cannot export a kNN") and "serve the .skops" in err
    assert len(err.strip().splitlines()) == 1 and not (deployable.root / "knn.onnx").exists()


def test_a_model_on_arrays_is_refused(tmp_path):
    """Check that a model fitted on arrays (no backbone) is refused with what to do."""
    rng = np.random.default_rng(0)
    model = fit(rng.normal(size=(40, 8)), np.repeat(["a", "b"], 20), C=1.0)
    with pytest.raises(ExportError, match="fitted on arrays.*fit it from a store"):
        export(model, tmp_path / "m.onnx")


def test_cli_export_writes_the_file(deployable, capsys, tmp_path):
    """Check that `cnncodes export` writes an ONNX file equal in output to the library's."""
    out = tmp_path / "cli.onnx"
    assert main(["export", str(deployable.skops), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    x = np.zeros((2, 3, 96, 96), np.uint8) + np.arange(96, dtype=np.uint8)
    assert np.abs(OnnxModel(out).predict_proba(x) - OnnxModel(deployable.onnx).predict_proba(x)).max() < 1e-6


def test_without_the_export_extra_the_cli_names_the_install(deployable, tmp_path, cli_without):
    """Check that, onnx not installed, `cnncodes export` says `pip install 'cnncodes[export]'`, exit 2."""
    run = cli_without("onnx", "export", deployable.skops, "-o", tmp_path / "m.onnx")
    assert run.returncode == 2
    assert run.stderr.strip() == ("cnncodes export: error: exporting to ONNX needs onnx, which is not installed: "
                                  "pip install 'cnncodes[export]'.")


def test_export_overwrites_an_export_and_nothing_else(deployable, tmp_path):
    """Check that an earlier export (ONNX or TorchScript) is replaced, while a model file, a store or
    a photo at the output path is refused with what it is."""
    from cnncodes import OutputExistsError

    assert export(deployable.skops, deployable.onnx) == deployable.onnx  # the fixture's own export, again
    ts = export(deployable.skops, tmp_path / "net.ts", format="torchscript")
    assert export(deployable.skops, ts, format="torchscript") == ts
    for victim, what in [(deployable.skops, "a skops model file"), (deployable.store, "a cnncodes code store")]:
        with pytest.raises(OutputExistsError, match=f"refusing to overwrite .*: it is {what}.*, and this would "
                                                    "replace it with an exported network"):
            export(deployable.skops, victim, format="onnx")


@pytest.mark.parametrize("classifier", ["logreg", "linear_svm", "sgd"])
def test_two_class_and_sgd_heads_equal_predict(deployable, sample_dir, classifier):
    """Check the one-column decision of a two-class model (sigmoid, not softmax) and SGD's
    one-vs-rest log loss: the export gives predict's probabilities."""
    from cnncodes import CodeStore

    store = CodeStore(deployable.store)
    two = classifier != "sgd"
    rows = np.flatnonzero(np.isin(np.array(store.class_names)[store.labels], ["daisy", "rose"])) if two else None
    skops = save(fit(store, layer="block5", classifier=classifier, C=1.0, rows=rows),
                 deployable.root / f"{classifier}-{two}.skops")
    model = OnnxModel(export(skops, deployable.root / f"{classifier}-{two}.onnx"))
    assert len(model.classes) == (2 if two else 5)
    expected, ids = _predicted(skops, sample_dir, model.classes)
    got = model.predict_proba(np.stack([model.preprocess(sample_dir / i) for i in ids]))
    assert np.abs(got - expected).max() <= 1e-4


def test_codes_extracted_in_bfloat16_give_a_warning_naming_the_exact_way(sample_dir, tmp_path, capsys):
    """Check that exporting a model on bfloat16 codes warns, in one CLI line, that the float32 network
    differs by their rounding and how to export exactly."""
    from cnncodes import extract

    store = tmp_path / "bf16.h5"
    extract(sample_dir, out=store, layers=["block5"], image_size=64, precision="bfloat16", num_workers=0,
            progress=False)
    skops = save(fit(store, layer="block5", C=1.0), tmp_path / "bf16.skops")
    with pytest.warns(UserWarning, match="extracted in bfloat16; the export computes in float32"):
        export(skops, tmp_path / "lib.onnx")
    assert main(["export", str(skops), "-o", str(tmp_path / "cli.onnx")]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("cnncodes export: warning: the model's codes were extracted in bfloat16")
    assert err.endswith("fit on a store extracted with --precision float32.") and len(err.splitlines()) == 1
    assert (tmp_path / "cli.onnx").is_file()


@pytest.mark.parametrize("suffix, writer", [(".pt", "jit.save"), (".onnx", "onnx.export")], ids=["torchscript", "onnx"])
def test_a_failed_export_leaves_the_earlier_file_whole(deployable, tmp_path, monkeypatch, suffix, writer):
    """Check that an export that fails while writing leaves the file it would replace as it was,
    and no partial file beside it."""
    out = tmp_path / f"model{suffix}"
    export(deployable.skops, out)
    before = out.read_bytes()

    def torn(*args, **kwargs):
        target = args[1] if writer == "jit.save" else args[2]
        if isinstance(target, (str, Path)):
            target = open(target, "wb")  # noqa: SIM115 - left open, as a crashed writer leaves it
        target.write(b"half a network")
        target.flush()
        raise RuntimeError("no space left on device")

    module, name = writer.split(".")
    monkeypatch.setattr(getattr(torch, module), name, torn)
    with pytest.raises(RuntimeError, match="no space left"):
        export(deployable.skops, out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
