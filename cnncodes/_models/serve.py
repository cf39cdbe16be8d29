"""`cnncodes serve`: an HTTP service that classifies uploaded photos, requests micro-batched onto one model thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
import time
from pathlib import Path

import numpy as np

from cnncodes._errors import BadUpload, InvalidParameterError
from cnncodes._io import top_k

DEFAULT_MAX_UPLOAD_MB = 20.0
MULTIPART_SLACK = 64 * 1024  # form boundaries and headers around the photo itself


# --------------------------------------------------------------------------- the model


class Classifier:
    """A model file as two functions: photo bytes -> uint8 ``(3, crop, crop)`` pixels, and a
    pixel batch -> class probabilities.

    An ``.onnx`` export runs on ONNX Runtime with the torch-free reference preprocessing; a
    ``.skops`` or ``.pt`` model runs cnncodes' own decoding and network (the codes network
    and the estimator's ``predict_proba`` for a model on codes, kNN included).
    """

    def __init__(self, path, *, threads: int | None = None):
        self.path = Path(path)
        self.name = self.path.name
        if self.path.suffix.lower() == ".onnx":
            from cnncodes._models.onnx_run import OnnxModel

            onnx = OnnxModel(self.path, threads=threads)
            self.kind, self.classes, self.metadata = "onnx", onnx.classes, onnx.metadata
            self._pixels, self._proba = self._onnx_pixels(onnx), onnx.predict_proba
        else:
            self.kind = "torch"
            self._torch(threads)

    def _onnx_pixels(self, onnx):
        from PIL import Image

        def pixels(data: bytes) -> np.ndarray:
            try:
                return onnx.preprocess(data)
            except Image.UnidentifiedImageError:
                raise BadUpload(422, "not an image (PIL cannot identify the file format)") from None
            except Image.DecompressionBombError as exc:
                raise BadUpload(422, f"decompression bomb: {exc}") from None
            except ValueError as exc:
                if str(exc).startswith("decompression bomb"):
                    raise BadUpload(422, str(exc)) from None
                raise BadUpload(422, f"cannot decode: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - truncated or malformed files raise many types
                raise BadUpload(422, f"cannot decode: {type(exc).__name__}: {exc}") from None

        return pixels

    def _torch(self, threads):
        import dataclasses

        import torch

        from cnncodes._models.export import build
        from cnncodes._input.images import ImageDecodeError, Preprocess, decode, resize_batch
        from cnncodes._models.model import _as_model

        if threads:
            torch.set_num_threads(threads)
        model = _as_model(str(self.path))
        on_codes = model.reads_codes
        net, self.metadata = build(model, codes_only=on_codes)
        self.classes = list(self.metadata["classes"])
        p = self.metadata["preprocessing"]
        prep = Preprocess(**{f.name: tuple(p[f.name]) if f.name in ("mean", "std") else p[f.name]
                             for f in dataclasses.fields(Preprocess) if f.name in p})
        cpu = torch.device("cpu")

        def pixels(data: bytes) -> np.ndarray:
            try:
                x = decode(data, prep)
            except ImageDecodeError as exc:
                raise BadUpload(422, str(exc)) from None
            if prep.resize == "device":  # as extract does it: torch's resize of the decoded image
                x = resize_batch(x[None], prep, cpu)[0]
            return x.contiguous().numpy()

        def proba(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                out = net(torch.from_numpy(batch)).numpy()
            return model.predict_proba(out) if on_codes else out

        self._pixels, self._proba = pixels, proba

    def pixels(self, data: bytes) -> np.ndarray:
        """The uint8 ``(3, crop, crop)`` pixels of one photo's file bytes, or `BadUpload` (422)."""
        if not data:
            raise BadUpload(422, "empty upload (0 bytes): send the photo's file bytes")
        return self._pixels(data)

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        """float ``(n, n_classes)`` probabilities of a uint8 ``(n, 3, crop, crop)`` batch."""
        return np.asarray(self._proba(batch), dtype=np.float32)


class Batcher:
    """One thread runs the model; requests that arrive within `window_s` of each other share a batch.

    Under load a batch is whatever queued while the previous one ran (up to `max_batch`), so
    throughput grows with the number of concurrent clients; alone, a request waits at most
    `window_s` for company.
    """

    def __init__(self, predict_proba, *, max_batch: int = 32, window_s: float = 0.002):
        self.predict_proba, self.max_batch, self.window_s = predict_proba, max_batch, window_s
        self.batches = self.images = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="cnncodes-model", daemon=True)
        self._thread.start()

    def submit(self, pixels: np.ndarray) -> concurrent.futures.Future:
        """Queue one image's pixels; the future gets its probabilities."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((pixels, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _collect(self, first) -> list:
        items, deadline = [first], time.monotonic() + self.window_s
        while len(items) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # stop after this batch
                break
            items.append(item)
        return items

    def _loop(self) -> None:
        while (first := self._queue.get()) is not None:
            items = self._collect(first)
            try:
                proba = self.predict_proba(np.stack([pixels for pixels, _ in items]))
            except Exception as exc:  # noqa: BLE001 - the requests fail, the service goes on
                for _, future in items:
                    future.set_exception(exc)
                continue
            self.batches, self.images = self.batches + 1, self.images + len(items)
            for (_, future), p in zip(items, proba):
                future.set_result(p)


# --------------------------------------------------------------------------- HTTP


def _need_serve():
    from cnncodes._optional import require

    require("starlette", "serving")
    require("uvicorn", "serving")


async def _read_upload(request, limit: int) -> bytes:
    """The photo's bytes: a multipart upload's first file (field ``file`` preferred) or the raw body."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    ctype = request.headers.get("content-type", "")
    multipart = ctype.startswith("multipart/form-data")
    cap = limit + (MULTIPART_SLACK if multipart else 0)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise BadUpload(413, f"upload of {int(length):,} bytes is larger than the limit of {limit:,} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():  # read with the limit, never the whole of a huge body
        size += len(chunk)
        if size > cap:
            raise BadUpload(413, f"upload larger than the limit of {limit:,} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not multipart:
        return body

    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=4, max_fields=16).parse()
    except MultiPartException as exc:
        raise BadUpload(400, f"malformed multipart form: {exc.message}") from None
    try:
        files = [v for k, v in form.multi_items() if hasattr(v, "read")]
        files.sort(key=lambda v: v is not form.get("file"))
        if not files:
            raise BadUpload(422, "the form holds no file: send the photo as the form field 'file'")
        data = await files[0].read()
    finally:
        await form.close()
    if len(data) > limit:
        raise BadUpload(413, f"upload of {len(data):,} bytes is larger than the limit of {limit:,} bytes")
    return data


def _requested_k(request) -> int:
    """The ``top_k`` query parameter (5 when absent); `top_k` caps it at the number of classes."""
    raw = request.query_params.get("top_k", "5")
    try:
        k = int(raw)
    except ValueError:
        raise BadUpload(422, f"top_k must be an integer >= 1, got {raw!r}") from None
    if k < 1:
        raise BadUpload(422, f"top_k must be an integer >= 1, got {k}")
    return k


def make_app(model, *, max_batch: int = 32, window_ms: float = 2.0, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
             threads: int | None = None):
    """The Starlette application of :func:`serve` (for tests, or to mount in a larger app).

    Parameters
    ----------
    model : path or Classifier
        An exported ``.onnx`` file, a ``.skops`` model from :func:`cnncodes.fit`, or a
        ``.pt`` network from :func:`cnncodes.finetune`.
    max_batch, window_ms, max_upload_mb, threads
        As in :func:`serve`.

    Returns
    -------
    starlette.applications.Starlette
        Routes ``GET /`` (the page), ``GET /health`` and ``POST /predict``.
    """
    _need_serve()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    clf = model if isinstance(model, Classifier) else Classifier(model, threads=threads)
    batcher = Batcher(clf.predict_proba, max_batch=max_batch, window_s=window_ms / 1000)
    limit = int(max_upload_mb * 2**20)
    page = _PAGE.replace("{{MODEL}}", clf.name).replace("{{LIMIT}}", str(limit))

    async def index(request):
        return HTMLResponse(page)

    async def health(request):
        return JSONResponse({"status": "ok", "model": clf.name, "runtime": clf.kind, "classes": clf.classes,
                             "batches": batcher.batches, "images": batcher.images,
                             "max_upload_bytes": limit})

    async def predict(request):
        try:
            k = _requested_k(request)
            data = await _read_upload(request, limit)
            pixels = await run_in_threadpool(clf.pixels, data)  # decoding runs beside the model thread
            proba = await asyncio.wrap_future(batcher.submit(pixels))
        except BadUpload as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        order = top_k(proba, k)
        return JSONResponse({"model": clf.name, "predictions": [
            {"label": clf.classes[j], "probability": float(proba[j])} for j in order]})

    async def server_error(request, exc):
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = Starlette(routes=[Route("/", index), Route("/health", health),
                            Route("/predict", predict, methods=["POST"])],
                    exception_handlers={Exception: server_error}, lifespan=lifespan)
    app.state.classifier, app.state.batcher = clf, batcher
    return app


def serve(model, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 32, window_ms: float = 2.0,
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, threads: int | None = None, log_level: str = "warning",
          ready=None) -> None:
    """Serve a model over HTTP until interrupted: ``POST /predict``, ``GET /health``, ``GET /`` (a page).

    ``POST /predict`` takes a photo as a multipart upload (field ``file``) or as the raw
    request body, and ``?top_k=K`` (default 5); it answers
    ``{"predictions": [{"label": ..., "probability": ...}, ...]}``, 413 for an upload over
    the limit, 422 with the reason for a file that is not a readable image. Requests that
    arrive together are classified as one batch on one model thread.

    Parameters
    ----------
    model : path
        An exported ``.onnx`` file (ONNX Runtime, no torch needed), a ``.skops`` model from
        :func:`cnncodes.fit`, or a ``.pt`` network from :func:`cnncodes.finetune`.
    host : str
        Interface to bind; the default serves this machine only. ``0.0.0.0`` exposes it.
    port : int
    max_batch : int
        Most images per model call.
    window_ms : float
        How long a request waits for others to join its batch.
    max_upload_mb : float
        Uploads larger than this are refused (413).
    threads : int, optional
        Threads of the model (ONNX Runtime's or torch's); by default theirs.
    log_level : str
        uvicorn's log level.
    ready : callable, optional
        Called with the URL once the model is loaded, before serving.

    Examples
    --------
    >>> serve("model.onnx", port=8000)  # doctest: +SKIP
    """
    _need_serve()
    import uvicorn

    if not 0 <= int(port) <= 65535:
        raise InvalidParameterError(f"port must be in 0..65535, got {port}.")
    app = make_app(model, max_batch=max_batch, window_ms=window_ms, max_upload_mb=max_upload_mb, threads=threads)
    if ready is not None:
        ready(f"http://{host}:{port}/")
    uvicorn.run(app, host=host, port=int(port), log_level=log_level, access_log=False)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cnncodes — {{MODEL}}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:16px/1.4 system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem;color:#222}
 #drop{display:block;margin:1rem 0;border:2px dashed #888;border-radius:8px;padding:2rem;text-align:center;cursor:pointer}
 #drop.over{background:#eef}
 #preview{max-width:100%;max-height:16rem;display:block;margin:1rem auto}
 li{margin:.3rem 0} .bar{display:inline-block;height:.7rem;background:#4a7;margin-left:.5rem;vertical-align:middle}
 #status.error{color:#b00}
</style></head><body>
<h1>cnncodes</h1>
<p>Model <code>{{MODEL}}</code>. Drop a photo below, or choose one; it is classified by this server.</p>
<label id="drop">Drop a photo here, or click to choose
 <input id="file" type="file" accept="image/*" hidden></label>
<img id="preview" alt="">
<p id="status"></p>
<ol id="results"></ol>
<script>
const input = document.getElementById("file"), drop = document.getElementById("drop");
const statusLine = document.getElementById("status"), results = document.getElementById("results");
async function classify(file) {
  if (!file) return;
  document.getElementById("preview").src = URL.createObjectURL(file);
  results.innerHTML = ""; statusLine.className = ""; statusLine.textContent = "classifying " + file.name + " ...";
  const form = new FormData(); form.append("file", file);
  try {
    const response = await fetch("predict?top_k=5", {method: "POST", body: form});
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || response.statusText);
    statusLine.textContent = file.name;
    for (const p of answer.predictions) {
      const li = document.createElement("li"), bar = document.createElement("span");
      li.textContent = p.label + " " + (100 * p.probability).toFixed(1) + " %";
      bar.className = "bar"; bar.style.width = (12 * p.probability) + "rem";
      li.appendChild(bar); results.appendChild(li);
    }
  } catch (err) { statusLine.className = "error"; statusLine.textContent = "error: " + err.message; }
}
input.addEventListener("change", () => classify(input.files[0]));
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over"); classify(e.dataTransfer.files[0]); });
</script></body></html>
"""
