"""Tests of fine-tuning: frozen BatchNorm, learning rates, the two-stage head, checkpoints, resume, use."""

import hashlib
import shutil

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs
from torch import nn

from cnncodes import (
    CnnCodesError,
    CodeStore,
    FineTunedModel,
    ModelFileError,
    SourceError,
    UnknownBackboneError,
    WeightsError,
    evaluate,
    extract,
    finetune,
    fit,
    load,
    predict,
    split_store,
)
from cnncodes._finetune import _data, _loop
from cnncodes._backbones.registry import get_backbone, weights_enum
from cnncodes._input.sources import read_bytes
from cnncodes._cli.main import main
from cnncodes._finetune._head import head_from_logreg
from cnncodes._finetune._network import build_net, param_groups
from cnncodes._input.images import Preprocess, decode
from cnncodes._backbones.weights import resolve

SPEC = get_backbone("mobilenet_v2")
# Small and exact: 64 px photos, float32 arithmetic, decoding in the main process.
FT = dict(image_size=64, batch_size=8, num_workers=0, precision="float32", progress=False,
          unfreeze="block5", epochs=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory, sample_dir):
    """The 40 bundled photos, one of them also filed under a second class (identical content)."""
    root = tmp_path_factory.mktemp("ft") / "photos"
    shutil.copytree(sample_dir, root)
    shutil.copy(sorted((root / "rose").iterdir())[0], root / "tulip" / "dup_of_rose.jpg")
    return root


@pytest.fixture(scope="module")
def store(data, tmp_path_factory):
    """ImageNet block4 + block5 codes of `data` at 64 px, float32, resized by PIL as
    fine-tuning's decoding resizes (the same pixels: a head on these codes reads the network's)."""
    out = tmp_path_factory.mktemp("codes") / "codes.h5"
    extract(data, out=out, layers=["block4", "block5"], image_size=64, precision="float32",
            resize="workers", num_workers=0, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One finished two-epoch fine-tuning of `data` (block5 and deeper trained)."""
    out = tmp_path_factory.mktemp("run") / "ft.pt"
    return finetune(data, out=out, **FT), out


@pytest.fixture(scope="module")
def imagenet():
    return resolve(SPEC, "imagenet")


def _norms(model):
    return {n: m for n, m in model.net.named_modules() if isinstance(m, nn.BatchNorm2d)}


def _step(model, lr=0.1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    torch.manual_seed(0)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()


@pytest.mark.parametrize("train_bn", [False, True], ids=["bn-inference", "train-bn"])
def test_frozen_blocks_keep_batchnorm_in_eval_mode_and_their_statistics(imagenet, train_bn):
    """Check that train() leaves frozen BatchNorm in eval mode, so a step changes neither its
    running statistics nor any frozen weight; trained BatchNorm follows `train_bn`."""
    model, info = build_net(SPEC, imagenet, 3, dropout=0.2, unfreeze="block5", train_bn=train_bn)
    model.train()
    norms = _norms(model)
    frozen = {n for n, m in norms.items() if not m.weight.requires_grad}
    trained = set(norms) - frozen
    assert frozen and trained and info["frozen_norms"] == len(frozen)
    assert all(int(n.split(".")[1]) >= 14 for n in trained) and all(int(n.split(".")[1]) < 14 for n in frozen)
    assert not any(norms[n].training for n in frozen)
    assert all(norms[n].training is train_bn for n in trained)
    assert model.head_linear().training and model.net.get_submodule(model.head)[0].training  # dropout on
    stats = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in norms.items()}
    params = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    _step(model)
    for n in frozen:
        assert torch.equal(norms[n].running_mean, stats[n][0]) and torch.equal(norms[n].running_var, stats[n][1])
    moved = [not torch.equal(norms[n].running_mean, stats[n][0]) for n in trained]
    assert all(moved) if train_bn else not any(moved)
    for n, p in model.net.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, params[n]), n
    changed = [not torch.equal(p, params[n]) for n, p in model.net.named_parameters() if p.requires_grad]
    assert np.mean(changed) > 0.9  # BatchNorm scale/shift of trained blocks included
    model.eval()
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize(
    "unfreeze, first",
    [(0, None), (1, 14), ("block5", 14), (2, 7), ("block4", 7), ("2", 7), ("all", 0), ("block1", 0)],
    ids=["0", "1", "block5", "2", "block4", "str-2", "all", "block1"],
)
def test_unfreeze_trains_that_block_and_every_deeper_one(imagenet, unfreeze, first):
    """Check that unfreeze (alias, count of top blocks, or 'all') trains exactly the layers from
    the start of that block (MobileNetV2 block4 = features.7-13, block5 = features.14-18)."""
    model, info = build_net(SPEC, imagenet, 3, dropout=0.0, unfreeze=unfreeze)
    for name, p in model.net.named_parameters():
        if name.startswith(model.head + "."):
            assert p.requires_grad
        else:
            index = int(name.split(".")[1])
            assert p.requires_grad == (first is not None and index >= first), name
    assert info["trained"] < info["total"] or first == 0


def test_pretrained_layers_learn_slower_than_the_new_head(imagenet, trained):
    """Check the two optimizer groups (trained pretrained layers at lr, the head at head_lr) and
    that the run kept their ratio through warm-up and cosine decay."""
    model, _ = build_net(SPEC, imagenet, 3, dropout=0.2, unfreeze="block5")
    groups = {g["name"]: g for g in param_groups(model, 1e-4, 1e-3, 0.0)}
    assert groups["backbone"]["lr"] == 1e-4 and groups["head"]["lr"] == 1e-3
    head = {id(p) for p in model.net.get_submodule(model.head).parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in groups["head"]["params"]} == head
    assert {id(p) for p in groups["backbone"]["params"]} == trainable - head
    head_only, _ = build_net(SPEC, imagenet, 3, dropout=0.2, unfreeze=0)
    assert [g["name"] for g in param_groups(head_only, 1e-4, 1e-3, 0.0)] == ["head"]
    result, _ = trained
    assert 0 < result.history[0].lr < result.history[0].head_lr
    for e in result.history:  # one schedule for both groups (it ends at 0 after the last step)
        assert e.head_lr == pytest.approx(5 * e.lr, abs=1e-12)  # the defaults, 1e-3 and 2e-4


@pytest.mark.parametrize("n_classes", [2, 4], ids=["binary", "multiclass"])
def test_head_from_logreg_reproduces_its_probabilities(n_classes):
    """Check that the linear layer made from StandardScaler + LogisticRegression gives the same
    probabilities as the pipeline, for raw (unscaled) codes, with rows in the asked class order."""
    X, y = make_blobs(n_samples=200, centers=n_classes, n_features=12, cluster_std=3.0, random_state=0)
    X = (X * np.linspace(0.5, 20, 12) + 7).astype(np.float32)  # unequal scales and offsets
    labels = np.array(["ant", "bee", "cat", "dog"])[y]
    model = fit(X, labels, classifier="logreg", C=0.5)
    classes = sorted(set(labels), reverse=True)
    W, b = head_from_logreg(model, classes)
    proba = torch.softmax(torch.from_numpy(X).double() @ W.double().T + b.double(), dim=1).numpy()
    expected = model.predict_proba(X)[:, [list(model.classes_).index(c) for c in classes]]
    np.testing.assert_allclose(proba, expected, atol=1e-5)


def test_head_from_logreg_refuses_other_models():
    """Check that a classifier that is not a logistic regression is refused with what to do."""
    from sklearn.svm import LinearSVC

    X, y = make_blobs(n_samples=60, centers=3, random_state=0)
    with pytest.raises(CnnCodesError, match="init_head needs a logistic regression .* got LinearSVC"):
        head_from_logreg(LinearSVC().fit(X, y), ["0", "1", "2"])
    model = fit(X, np.array(list("abc"))[y], classifier="logreg", C=1.0)
    with pytest.raises(CnnCodesError, match=r"it lacks \['zebra'\]"):
        head_from_logreg(model, ["a", "zebra"])


def test_two_stage_network_classifies_photos_as_the_probe_classifies_their_codes(imagenet, store, data):
    """Check that with the head initialised from a logreg on the store's block5 codes, the whole
    network on the photos gives that logreg's probabilities on their codes (the head reads
    exactly the avg-pooled block5 codes)."""
    st = CodeStore(store)
    probe = fit(store, layer="block5", C=0.1)
    model, _ = build_net(SPEC, imagenet, len(st.class_names), dropout=0.2, unfreeze="block5")
    W, b = head_from_logreg(probe, st.class_names)
    with torch.no_grad():
        model.head_linear().weight.copy_(W)
        model.head_linear().bias.copy_(b)
    prep = Preprocess.from_weights(weights_enum(SPEC).IMAGENET1K_V1, 64)
    rows = np.arange(0, len(st), 5)
    x = torch.stack([decode((data / st.ids[r]).read_bytes(), prep) for r in rows])
    with torch.no_grad():
        proba = torch.softmax(model.eval()(prep.normalize(x)), dim=1).numpy()
    np.testing.assert_allclose(proba, probe.predict_proba(st.codes("block5")[rows]), atol=2e-4)


def test_finetune_two_stage_fits_the_probe_on_the_training_split_only(data, store, tmp_path):
    """Check that init_head=store fits the logreg on the training rows (no validation or test
    image) and scores the initial head on the validation split before the first epoch."""
    r = finetune(data, out=tmp_path / "two.pt", init_head=store, n_jobs=1, **{**FT, "epochs": 1})
    assert r.init_head["source"] == "codes.h5" and r.init_head["kind"] == "store"
    assert r.init_head["n_rows"] == r.n_train
    assert r.initial_val_accuracy is not None and 0 <= r.initial_val_accuracy <= 1
    assert "head initialised from codes.h5 (logistic regression" in r.summary()
    assert r.best_epoch in (0, 1)


def test_init_head_that_saw_test_images_or_another_setting_is_refused(data, store, tmp_path):
    """Check that a probe trained on held-out images, or codes of another preprocessing, are
    refused with the reason and the fix."""
    leaky = fit(store, layer="block5", C=0.1)  # all rows: the held-out ones too
    with pytest.raises(CnnCodesError, match="was trained on .* of the held-out test images"):
        finetune(data, out=tmp_path / "a.pt", init_head=leaky, **FT)
    with pytest.raises(CnnCodesError, match=r"does not match this fine-tuning: preprocessing resize 73/crop 64 "
                       r"\(fine-tuning uses 110/96\)"):
        finetune(data, out=tmp_path / "b.pt", init_head=store, **{**FT, "image_size": 96})


def test_held_out_images_are_those_of_split_store(trained, store):
    """Check that fine-tuning holds out exactly the images `split_store` holds out of a store of
    the same folder, identical content on one side."""
    result, _ = trained
    st = CodeStore(store)
    _, test = split_store(st, test_size=0.25, random_state=0)
    assert sorted(result.test_ids) == sorted(st.ids[test])
    dup = [i for i in st.ids if i.startswith("rose/")][0]
    assert (dup in result.test_ids) == ("tulip/dup_of_rose.jpg" in result.test_ids)
    assert result.n_train + result.n_val + result.n_test == 41


def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool, torch.Tensor))


def test_checkpoint_is_plain_data_loaded_with_weights_only(trained):
    """Check that the checkpoint is a state dict plus plain metadata that torch.load reads with
    weights_only=True, and that it records the run (history, split, test accuracy)."""
    result, out = trained
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert _plain(ckpt)
    assert ckpt["format"] == "cnncodes.finetuned" and ckpt["complete"] is True
    assert ckpt["backbone"] == "mobilenet_v2" and ckpt["head"] == "classifier.1"
    assert ckpt["classes"] == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    assert ckpt["state_dict"]["classifier.1.1.weight"].shape == (5, 1280)
    assert sorted(ckpt["test_ids"]) == sorted(result.test_ids) and ckpt["test_accuracy"] == result.test_accuracy
    assert len(ckpt["history"]) == 2 and ckpt["config"]["epochs"] == 2
    assert not out.with_name("ft.pt.resume").exists()  # removed once finished
    assert result.test_accuracy is not None and result.n_test == len(result.test_ids)


def test_interrupted_run_resumes_from_its_last_epoch(data, tmp_path, monkeypatch, trained):
    """Check that a run killed after epoch 1 continues at epoch 2 when called again, and ends
    with the very weights of an uninterrupted run."""
    full, full_out = trained
    out = tmp_path / "ft.pt"
    state = tmp_path / "ft.pt.resume"

    save_epoch = _loop.save_epoch

    def interrupt(run):
        save_epoch(run)
        raise KeyboardInterrupt

    monkeypatch.setattr(_loop, "save_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        finetune(data, out=out, **FT)
    assert torch.load(state, weights_only=True)["epoch"] == 1
    assert torch.load(out, weights_only=True)["complete"] is False  # usable: the best so far
    monkeypatch.undo()
    trained_epochs = []
    real = _loop._train_epoch
    monkeypatch.setattr(_loop, "_train_epoch", lambda *a, **k: trained_epochs.append(a[-2]) or real(*a, **k))
    resumed = finetune(data, out=out, **FT)
    assert trained_epochs == ["epoch 2/2"] and resumed.resumed_from == 1 and "resumed after epoch 1" in resumed.summary()
    assert not state.exists()
    assert [e.train_loss for e in resumed.history] == pytest.approx([e.train_loss for e in full.history], rel=1e-5)
    a = torch.load(full_out, weights_only=True)["state_dict"]
    b = torch.load(out, weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert resumed.test_accuracy == full.test_accuracy


def test_finished_run_is_returned_and_other_settings_are_refused(trained, data, monkeypatch, tmp_path):
    """Check that re-running a finished run trains nothing, and that other settings neither
    overwrite a finished model nor resume an interrupted one."""
    result, out = trained
    monkeypatch.setattr(_loop, "_train_epoch", lambda *a, **k: pytest.fail("trained again"))
    again = finetune(data, out=out, **FT)
    assert again.resumed_from == 2 and again.test_accuracy == result.test_accuracy
    assert "already trained" in again.summary()
    with pytest.raises(CnnCodesError, match=r"ft.pt exists and was trained with other settings "
                       r"\(lr 0.0002 then, 0.0003 now\). Pass resume=False"):
        finetune(data, out=out, **{**FT, "lr": 3e-4})
    state = tmp_path / "x.pt.resume"
    shutil.copy(out, tmp_path / "x.pt")
    torch.save({"format": "cnncodes.finetune-state", "format_version": 1,
                "config": {**torch.load(out, weights_only=True)["config"], "dropout": 0.5}}, state)
    with pytest.raises(CnnCodesError, match=r"x.pt.resume is an interrupted run with other settings "
                       r"\(dropout 0.5 then, 0.2 now\)"):
        finetune(data, out=tmp_path / "x.pt", **FT)


def test_early_stopping_keeps_the_best_epoch(data, tmp_path, monkeypatch):
    """Check that after `early_stopping` epochs without a better validation accuracy the run
    stops and the checkpoint holds the weights of the best epoch, not the last."""
    scores = iter([(0.9, 0.6), (1.0, 0.5), (1.1, 0.5), (0.1, 1.0)])
    monkeypatch.setattr(_loop, "_validate", lambda *a, **k: next(scores))
    saved = {}
    out = tmp_path / "es.pt"
    save_epoch = _loop.save_epoch

    def record(run):
        save_epoch(run)
        saved.setdefault(run.history[-1].epoch,
                         torch.load(tmp_path / "es.pt.resume", weights_only=True)["state_dict"])

    monkeypatch.setattr(_loop, "save_epoch", record)
    r = finetune(data, out=out, **{**FT, "epochs": 6, "early_stopping": 2})
    assert r.stopped == "early stopping" and len(r.history) == 3 and r.best_epoch == 1
    final = torch.load(out, weights_only=True)["state_dict"]
    assert all(torch.equal(final[k], saved[1][k]) for k in final)
    assert not all(torch.equal(final[k], saved[3][k]) for k in final)


def test_patience_counts_from_the_best_trained_epoch_and_the_probe_can_win(data, store, tmp_path, monkeypatch,
                                                                          weights_file):
    """Check that a first dip below the initial (two-stage) model does not stop the run, and that
    the initial model is kept when no epoch beats it on validation."""
    scores = iter([(0.3, 0.9), (0.7, 0.6), (0.6, 0.7), (0.5, 0.8), (0.6, 0.7), (0.6, 0.75), (0.1, 1.0)])
    monkeypatch.setattr(_loop, "_validate", lambda *a, **k: next(scores))
    out = tmp_path / "p.pt"
    r = finetune(data, out=out, init_head=store, n_jobs=1, **{**FT, "epochs": 7, "early_stopping": 2})
    assert r.initial_val_accuracy == 0.9 and len(r.history) == 5 and r.stopped == "early stopping"
    assert r.best_epoch == 0 and "kept the initial model (validation loss 0.3000, accuracy 0.9000)" in r.summary()
    kept = torch.load(out, weights_only=True)["state_dict"]
    imagenet = torch.load(weights_file, weights_only=True)
    assert torch.equal(kept["features.18.0.weight"], imagenet["features.18.0.weight"])  # never trained


def test_target_accuracy_stops_the_run(data, tmp_path, monkeypatch):
    """Check that reaching target_accuracy on the validation split ends training at once."""
    scores = iter([(0.5, 0.7), (0.4, 0.95), (0.3, 0.99)])
    monkeypatch.setattr(_loop, "_validate", lambda *a, **k: next(scores))
    r = finetune(data, out=tmp_path / "t.pt", target_accuracy=0.9, **{**FT, "epochs": 3})
    assert r.stopped == "target accuracy" and len(r.history) == 2 and r.best_epoch == 2


def test_only_the_training_split_is_augmented(data, tmp_path, monkeypatch):
    """Check that the training images alone are augmented (a new random crop each time, at the
    crop size) while validation and test images are decoded as extract decodes them."""
    made = []

    class Spy(_data._Photos):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(_data, "_Photos", Spy)
    r = finetune(data, out=tmp_path / "aug.pt", **{**FT, "epochs": 1})
    augmented = [d for d in made if d.augment is not None]
    assert {len(d) for d in augmented} == {r.n_train}
    plain = [d for d in made if d.augment is None]
    assert {len(d) for d in plain} == {41, r.n_val, r.n_test}  # the check of every image, val, test
    a, b = augmented[0][0][1], augmented[0][0][1]
    assert a.shape == (3, 64, 64) and a.dtype == torch.uint8 and not torch.equal(a, b)
    val = next(d for d in plain if len(d) == r.n_val)
    assert torch.equal(val[0][1], decode(read_bytes(val.paths[0]), val.prep))


def test_checkpoint_is_a_backbone_for_extract(trained, data, store, tmp_path):
    """Check that `extract --weights ft.pt` loads the fine-tuned backbone: the weights id and
    hash are recorded, the crop is the one it was trained at (64, not the weights' 224), block5
    codes are the network's pre-logits features (changed by training) and block4 codes (a
    frozen block) are the ImageNet ones."""
    result, out = trained
    codes = tmp_path / "ft.h5"
    assert main(["extract", str(data), "-o", str(codes), "--weights", str(out), "--layer", "block4",
                 "--layer", "block5", "--precision", "float32", "--resize", "workers", "--workers", "0",
                 "--quiet"]) == 0  # resized as `store` and as the network's decoding below
    st, base = CodeStore(codes), CodeStore(store)
    assert st.spec["preprocessing"]["crop_size"] == 64 == base.spec["preprocessing"]["crop_size"]
    assert st.spec["weights"] == "file:ft.pt"
    assert st.spec["weights_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert list(st.ids) == list(base.ids)
    np.testing.assert_allclose(st.codes("block4"), base.codes("block4"), atol=1e-5)
    assert not np.allclose(st.codes("block5"), base.codes("block5"), atol=1e-3)
    net = load(out).network()
    seen = []
    net.head_linear().register_forward_hook(lambda m, args, output: seen.append(args[0]))
    prep = Preprocess.from_weights(weights_enum(SPEC).IMAGENET1K_V1, 64)
    x = torch.stack([decode((data / i).read_bytes(), prep) for i in st.ids[:6]])
    with torch.no_grad():
        net(prep.normalize(x))
    np.testing.assert_allclose(seen[0].numpy(), st.codes("block5")[:6], atol=1e-4)


def test_checkpoint_of_another_backbone_or_damaged_is_refused_for_extract(trained, data, tmp_path):
    """Check the messages for a checkpoint used with the wrong backbone, and for a damaged one."""
    _, out = trained
    with pytest.raises(WeightsError, match="ft.pt was fine-tuned from mobilenet_v2, not resnet18. "
                       "Extract with --backbone mobilenet_v2"):
        extract(data, out=tmp_path / "r.h5", backbone="resnet18", weights=out, progress=False)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    with pytest.raises(WeightsError, match="cannot load checkpoint .*bad.pt.* safely"):
        extract(data, out=tmp_path / "b.h5", weights=bad, image_size=64, progress=False, num_workers=0)


def test_checkpoint_predicts_and_evaluates_photos(trained, data, capsys):
    """Check that predict and evaluate run the fine-tuned network on photos: top-k labels with
    probabilities, and on the training folder the held-out images only, scored as training did."""
    result, out = trained
    model = load(out)
    assert isinstance(model, FineTunedModel) and model.classes == result.classes
    preds = predict(out, data, top_k=3)
    assert len(preds) == 41
    for p in preds:
        assert len(p.labels) == 3 and set(p.labels) <= set(result.classes)
        assert all(isinstance(lab, str) for lab in p.labels)
        assert p.probabilities == sorted(p.probabilities, reverse=True) and sum(p.probabilities) <= 1 + 1e-6
    ev = evaluate(model, data)
    assert ev.n == result.n_test and ev.accuracy == pytest.approx(result.test_accuracy)
    assert "held-out images" in ev.on
    assert main(["predict", str(out), str(data / "rose"), "--top-k", "2", "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8 and all(line.count("\t") == 2 for line in lines)
    assert main(["evaluate", str(out), str(data), "--quiet"]) == 0
    assert f"accuracy {ev.accuracy:.4f} on {ev.n} images" in capsys.readouterr().out
    with pytest.raises(CnnCodesError, match="it classifies images, not codes. Evaluate it on a labelled folder"):
        evaluate(model, _h5(out))


def _h5(out):
    path = out.with_name("codes-of-ft.h5")
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"unfreeze": "block9"}, CnnCodesError, r"unfreeze 'block9' is not a block of mobilenet_v2. Use a layer "
                                                r"alias of mobilenet_v2 \(block1, .*block5\)"),
        ({"unfreeze": 7}, CnnCodesError, "unfreeze=7 is out of range for mobilenet_v2, which has 5 blocks"),
        ({"epochs": 0}, CnnCodesError, "epochs must be an integer >= 1, got 0"),
        ({"lr": -1.0}, CnnCodesError, "lr must be a positive number, got -1.0"),
        ({"batch_size": 1}, CnnCodesError, "batch_size must be an integer >= 2"),
        ({"dropout": 1.0}, CnnCodesError, r"dropout must be in \[0, 1\)"),
        ({"test_size": 1.5}, CnnCodesError, "test_size must be between 0 and 1, or None"),
        ({"val_fraction": 0.0}, CnnCodesError, "early_stopping and target_accuracy watch the validation split"),
        ({"backbone": "alexnet"}, UnknownBackboneError, "unknown backbone 'alexnet'"),
        ({"optimizer": "adam"}, CnnCodesError, "unknown optimizer 'adam'. Valid optimizers: adamw, sgd"),
        ({"tta": "crops"}, CnnCodesError, "unknown tta 'crops'. Valid values: none, flip"),
        ({"label_smoothing": 1.0}, CnnCodesError, r"label_smoothing must be in \[0, 1\)"),
    ],
    ids=["alias", "count", "epochs", "lr", "batch", "dropout", "test-size", "no-val", "backbone", "optimizer",
         "tta", "smoothing"],
)
def test_bad_arguments_are_refused_with_what_to_do(sample_dir, tmp_path, kwargs, error, words):
    """Check each bad argument's message (before any image is read or file written)."""
    with pytest.raises(error, match=words):
        finetune(sample_dir, out=tmp_path / "x.pt", **{**FT, **kwargs})
    assert not (tmp_path / "x.pt").exists()


def test_too_few_images_or_no_labels_are_refused(sample_dir, tmp_path):
    """Check that a class with fewer images than the splits need, and unlabelled photos, are
    refused with the counts and the way out."""
    small = tmp_path / "small"
    for cls in ("daisy", "rose"):
        (small / cls).mkdir(parents=True)
        for f in sorted((sample_dir / cls).iterdir())[: 2 if cls == "rose" else 5]:
            shutil.copy(f, small / cls / f.name)
    with pytest.raises(SourceError, match=r"too few images per class: 'rose' has 2 distinct image\(s\), and a "
                       r"training, a held-out test, a validation split need at least 3 per class. Add images, "
                       r"or pass test_size=None / val_fraction=0"):
        finetune(small, out=tmp_path / "x.pt", **FT)
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(sorted((sample_dir / "rose").iterdir())[0], flat / "a.jpg")
    with pytest.raises(SourceError, match="fine-tuning needs labelled images"):
        finetune(flat, out=tmp_path / "y.pt", **FT)


def test_damaged_files_give_clear_errors(trained, data, tmp_path, weights_file):
    """Check the messages for a truncated checkpoint, a plain torchvision state dict given as a
    model, a damaged training state, and an output path holding something else (never overwritten)."""
    _, out = trained
    bad = tmp_path / "bad.pt"
    bad.write_bytes(out.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="cannot read checkpoint .*bad.pt.* safely .* damaged: fine-tune again"):
        load(bad)
    with pytest.raises(ModelFileError, match="is a PyTorch file but not a cnncodes fine-tuned checkpoint"):
        load(weights_file)
    (tmp_path / "run.pt.resume").write_bytes(b"not a checkpoint")
    with pytest.raises(CnnCodesError, match=r"cannot read training state .*run.pt.resume.* safely .*Delete "
                       r"run.pt.resume to start over \(or pass resume=False / --restart\)"):
        finetune(data, out=tmp_path / "run.pt", **FT)
    (tmp_path / "other.pt").write_text("my notes")
    with pytest.raises(CnnCodesError, match=r"refusing to overwrite '.*other.pt': it is a text file, and this "
                       r"would replace it with a fine-tuned checkpoint \(.pt\). Choose another output path"):
        finetune(data, out=tmp_path / "other.pt", **FT)
    assert (tmp_path / "other.pt").read_text() == "my notes"


def test_cli_finetune(data, tmp_path, capsys):
    """Check that `cnncodes finetune` trains, prints the epochs and the held-out accuracy, writes
    the checkpoint, and reports a bad flag as a one-line error."""
    out = tmp_path / "cli.pt"
    code = main(["finetune", str(data), "-o", str(out), "--epochs", "1", "--image-size", "64",
                 "--batch-size", "8", "--workers", "0", "--precision", "float32", "--unfreeze", "1",
                 "--patience", "0", "--quiet"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "epoch 1: train loss" in text and "held-out accuracy" in text and "stopped: epochs" in text
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["config"]["unfreeze"] == 1 and ckpt["config"]["lr"] == 2e-4 and ckpt["complete"]
    assert main(["finetune", str(data), "-o", str(tmp_path / "x.pt"), "--unfreeze", "block9"]) == 2
    assert "cnncodes finetune: error: unfreeze 'block9' is not a block" in capsys.readouterr().err
