"""`cnncodes serve` for real: uvicorn on a free localhost port, HTTP with httpx, the page in Chromium."""

import io
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="needs httpx (the dev extra)")

from cnncodes import OnnxModel, predict  # noqa: E402


def _jpeg() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.effect_noise((128, 96), 60).convert("RGB").save(out, "JPEG")
    return out.getvalue()


TRUNCATED = _jpeg()[:1500]  # a real JPEG cut short


def _bomb() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("1", (12_000, 9_000)).save(out, "PNG")  # 108 M pixels in a few kB
    return out.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _server(model, *options):
    """`cnncodes serve MODEL` in a subprocess on a free port; yields its URL once /health answers."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cnncodes", "serve", str(model), "--port", str(port), *options],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /health in 120 s"
            time.sleep(0.2)
        yield url
        assert proc.poll() is None, "the server died"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def onnx_server(deployable):
    with _server(deployable.onnx, "--max-upload-mb", "0.5") as url:
        yield url


@pytest.fixture(scope="module")
def photos(sample_dir):
    return sorted(sample_dir.glob("*/*.jpg"))


def test_predict_takes_a_multipart_upload_or_raw_bytes(onnx_server, deployable, photos):
    """Check that both ways of sending a photo get the ONNX model's own probabilities, top_k honoured."""
    model = OnnxModel(deployable.onnx)
    health = httpx.get(onnx_server + "/health").json()
    assert health["status"] == "ok" and health["classes"] == model.classes and health["runtime"] == "onnx"
    for photo in photos[::9]:
        expected = model.predict_proba(model.preprocess(photo)[None])[0]
        multipart = httpx.post(onnx_server + "/predict", files={"file": (photo.name, photo.read_bytes())},
                               params={"top_k": 2})
        raw = httpx.post(onnx_server + "/predict", content=photo.read_bytes(),
                         headers={"content-type": "image/jpeg"})
        assert multipart.status_code == raw.status_code == 200
        top2, top5 = multipart.json()["predictions"], raw.json()["predictions"]
        assert [p["label"] for p in top2] == [p["label"] for p in top5[:2]] and len(top5) == 5
        for p in top5:
            assert abs(p["probability"] - expected[model.classes.index(p["label"])]) < 1e-6
        assert top5[0]["label"] == model.classes[int(expected.argmax())]


@pytest.mark.parametrize("send, status, words", [
    (dict(content=b"not a photo at all"), 422, "not an image (PIL cannot identify the file format)"),
    (dict(content=b""), 422, "empty upload (0 bytes)"),
    (dict(content=TRUNCATED), 422, "cannot decode"),
    (dict(content=_bomb()), 422, "decompression bomb: 12000x9000 = 108,000,000 pixels exceeds max_pixels"),
    (dict(files={"note": (None, "a field, not a file")}), 422, "form holds no file"),
    (dict(content=b"\x00" * 600_000), 413, "larger than the limit of 524,288 bytes"),
    (dict(files={"file": ("big.jpg", b"\x00" * 600_000)}), 413, "larger than the limit"),
    (dict(content=b"x", params={"top_k": "0"}), 422, "top_k must be an integer >= 1, got 0"),
], ids=["garbage", "empty", "truncated-jpeg", "bomb", "no-file", "too-large", "too-large-multipart", "top-k-0"])
def test_a_bad_request_gets_its_status_and_reason_and_the_server_goes_on(onnx_server, photos, send, status, words):
    """Check that each bad request gets 413 / 422 with the reason, and a good one after it still works."""
    answer = httpx.post(onnx_server + "/predict", **send)
    assert answer.status_code == status and words in answer.json()["error"]
    assert httpx.post(onnx_server + "/predict", content=photos[0].read_bytes()).status_code == 200


def test_load_with_broken_uploads_no_request_fails_and_requests_share_batches(onnx_server, photos):
    """Check that 8 clients x 50 requests (every tenth broken) get 200 or 422, never an error or 5xx,
    and that the model ran fewer batches than images (requests were batched together)."""
    before = httpx.get(onnx_server + "/health").json()
    statuses, errors = [], []

    def client(c):
        with httpx.Client(base_url=onnx_server, timeout=60) as http:
            for i in range(50):
                broken = (c * 50 + i) % 10 == 0
                body = b"broken" if broken else photos[(c * 50 + i) % len(photos)].read_bytes()
                try:
                    statuses.append((broken, http.post("/predict", content=body).status_code))
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(statuses) == 400
    assert sorted(set(statuses)) == [(False, 200), (True, 422)]
    after = httpx.get(onnx_server + "/health").json()
    images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    assert images == 360 and batches < images


def test_a_skops_model_serves_predicts_probabilities(deployable, photos):
    """Check that `cnncodes serve model.skops` answers with cnncodes predict's probabilities."""
    chosen = photos[::8]
    expected = predict(deployable.skops, [str(p) for p in chosen], top_k=5, num_workers=0)
    with _server(deployable.skops) as url:
        assert httpx.get(url + "/health").json()["runtime"] == "torch"
        for photo, want in zip(chosen, expected):
            got = httpx.post(url + "/predict", files={"file": (photo.name, photo.read_bytes())}).json()
            assert [p["label"] for p in got["predictions"]] == want.labels
            assert np.abs(np.array([p["probability"] for p in got["predictions"]]) - want.probabilities).max() <= 1e-4


def test_without_the_serve_extra_the_cli_names_the_install(deployable, cli_without):
    """Check that, uvicorn not installed, `cnncodes serve` says `pip install 'cnncodes[serve]'`, exit 2."""
    run = cli_without("uvicorn", "serve", deployable.onnx)
    assert run.returncode == 2
    assert run.stderr.strip() == ("cnncodes serve: error: serving needs uvicorn, which is not installed: "
                                  "pip install 'cnncodes[serve]'.")


@pytest.mark.browser
def test_the_page_classifies_a_chosen_photo(browser, onnx_server, deployable, photos):
    """Check that on the page, a photo chosen in the file input shows its top classes, the first the
    model's prediction."""
    model = OnnxModel(deployable.onnx)
    photo = photos[20]
    expected = model.classes[int(model.predict_proba(model.preprocess(photo)[None])[0].argmax())]
    page = browser.new_page()
    try:
        page.goto(onnx_server + "/")
        assert deployable.onnx.name in page.content()
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("#results li", timeout=30_000)
        items = page.locator("#results li").all_inner_texts()
        assert len(items) == 5 and items[0].startswith(expected + " ") and items[0].strip().endswith("%")
        assert page.locator("#status").inner_text() == photo.name
        page.set_input_files("#file", {"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"no photo"})
        page.wait_for_selector("#status.error", timeout=30_000)
        assert "not an image" in page.locator("#status").inner_text()
    finally:
        page.close()


def test_a_knn_model_serves_through_its_estimator(deployable, photos):
    """Check that a kNN .skops (no export possible) is served: the codes network, then the faiss
    index's predict_proba, equal to predict's."""
    from cnncodes import fit, save
    from cnncodes._models.serve import Classifier

    knn = save(fit(deployable.store, layer="block5", classifier="knn", n_neighbors=3), deployable.root / "knn-serve.skops")
    clf = Classifier(knn)
    chosen = photos[::5]
    got = clf.predict_proba(np.stack([clf.pixels(p.read_bytes()) for p in chosen]))
    for row, want in zip(got, predict(knn, [str(p) for p in chosen], top_k=5, num_workers=0)):
        assert np.abs(np.array([row[clf.classes.index(label)] for label in want.labels]) - want.probabilities).max() <= 1e-4


def test_the_model_thread_outlives_a_failing_batch():
    """Check that when the model raises, that batch's requests get the error and later ones are served."""
    from cnncodes._models.serve import Batcher

    def model(batch):
        if (batch < 0).any():
            raise ValueError("negative pixels")
        return batch.sum(axis=1, keepdims=True)

    batcher = Batcher(model, window_s=0.0)
    try:
        with pytest.raises(ValueError, match="negative pixels"):
            batcher.submit(np.array([-1, 2])).result(timeout=10)
        assert batcher.submit(np.array([1, 2])).result(timeout=10).tolist() == [3]
        assert (batcher.batches, batcher.images) == (1, 1)
    finally:
        batcher.close()


def test_cli_serve_binds_localhost_by_default_and_refuses_a_missing_model(tmp_path, capsys):
    """Check that serve's default host is 127.0.0.1, and a missing model file is one line, exit 2."""
    from cnncodes._cli.main import _parser, main

    assert _parser().parse_args(["serve", "m.onnx"]).host == "127.0.0.1"
    for name, words in [("gone.onnx", "does not exist. Make one with `cnncodes export`"),
                        ("gone.skops", "does not exist. Make one with `cnncodes fit`")]:
        assert main(["serve", str(tmp_path / name), "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cnncodes serve: error: ") and words in err and len(err.strip().splitlines()) == 1
