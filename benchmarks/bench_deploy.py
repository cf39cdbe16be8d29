"""Deploy: an exported ONNX model against `cnncodes predict` (agreement, images/s) and `cnncodes serve` under load.

A logistic regression (C='auto') on a flowers5 block5 store, fitted on the stratified 75 % of
`split_store`, exported to ONNX. On N held-out photos, measured side by side in one run:

- agreement: ONNX Runtime's probabilities against `cnncodes.predict`'s (max abs diff), fed
  by the torch-free reference preprocessing (PIL) and by cnncodes' own decoded pixels;
- speed, model only: ONNX Runtime against the same network in torch (cnncodes' codes network,
  BatchNorm folded, in the store's arithmetic as predict runs it, then the estimator), on the
  same uint8 batches;
- speed, end to end (files to probabilities): PIL + ONNX Runtime against `cnncodes.predict`;
- `cnncodes serve model.onnx`: throughput and p50 / p99 latency at 1, 4 and 8 concurrent
  clients, 10 % of the uploads deliberately broken, counting failed requests (5xx or
  connection errors; a broken upload must get 422);
- optionally a screenshot of the page after a prediction (headless Chromium).

    python benchmarks/bench_deploy.py --store /tmp/f5/codes.h5 --data /work/shared/datasets/flowers5 \\
        --screenshot /tmp/deploy-page.png
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from _machine import cpu_name  # benchmarks/ is on sys.path when a script runs


def _race(*fns, repeat: int = 3) -> list[float]:
    """The best of `repeat` wall times of each of `fns`, after one warm-up call each, run in turn
    (on a shared machine the load then weighs on every contender alike)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def _batches(x, size=64):
    return [x[i:i + size] for i in range(0, len(x), size)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(url: str, bodies: list[bytes], clients: int, per_client: int) -> dict:
    """`clients` threads, each posting `per_client` bodies; latencies and failures."""
    import httpx

    latencies, statuses, failures = [], [], []

    def client(c):
        with httpx.Client(base_url=url, timeout=120) as http:
            for i in range(per_client):
                body = bodies[(c * per_client + i) % len(bodies)]
                t0 = time.perf_counter()
                try:
                    status = http.post("/predict", content=body).status_code
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                latencies.append(time.perf_counter() - t0)
                statuses.append(status)
                if status >= 500 or (status == 422) != (body == BROKEN):
                    failures.append(f"status {status}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100)
    return dict(n=clients * per_client, rps=clients * per_client / wall, p50=q[49] * 1e3, p99=q[98] * 1e3,
                failed=len(failures), broken=sum(s == 422 for s in statuses))


BROKEN = b"this upload is not a photo"


def _serve(model: Path, threads: int | None):
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "cnncodes", "serve", str(model), "--port", str(port)]
    proc = subprocess.Popen(cmd + (["--threads", str(threads)] if threads else []),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"{model.name}: the server did not start")


def _screenshot(url: str, photo: Path, out: str) -> str:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=os.environ.get("CNNCODES_CHROMIUM", "/usr/bin/chromium"),
                                     headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 800, "height": 720})
        page.goto(url + "/")
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("#results li", timeout=60_000)
        page.screenshot(path=out, full_page=True)
        top = page.locator("#results li").first.inner_text()
        browser.close()
    return top


def main(argv=None):
    import torch

    from cnncodes import CodeStore, OnnxModel, export, fit, predict, save, split_store
    from cnncodes._models.export import build
    from cnncodes._input.images import Preprocess, decode, resize_batch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", required=True, help="a flowers5 store with block5")
    p.add_argument("--data", required=True, help="the folder the store was extracted from")
    p.add_argument("--n", type=int, default=200, help="held-out photos (default %(default)s)")
    p.add_argument("--requests", type=int, default=200, help="serve requests per concurrency level")
    p.add_argument("--work", default=None, help="folder for the model files (default: a temporary one)")
    p.add_argument("--screenshot", help="write a PNG of the page after a prediction")
    p.add_argument("--no-serve", dest="serve", action="store_false", help="skip the serve measurements")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-deploy-"))
    work.mkdir(parents=True, exist_ok=True)
    store = CodeStore(args.store)
    print(f"# {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"# command: python benchmarks/bench_deploy.py --store {args.store} --data {args.data} --n {args.n}")
    print(f"# store: {len(store)} rows, codes computed in {store.spec.precision}, resize {store.spec.preprocessing.resize}")

    train, test = split_store(store, test_size=0.25, random_state=0)
    t0 = time.perf_counter()
    model = fit(store, layer="block5", rows=train)
    skops = save(model, work / "logreg.skops")
    print(f"fit logreg on {len(train)} rows (C={model.cnncodes_['fit']['C']:g}): {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    onnx_path = export(skops, work / "logreg.onnx")
    print(f"export to {onnx_path.name} ({onnx_path.stat().st_size / 2**20:.1f} MiB): {time.perf_counter() - t0:.1f} s")
    onnx = OnnxModel(onnx_path)
    ids = [store.ids[r] for r in sorted(test)[: args.n]]
    paths = [str(Path(args.data) / i) for i in ids]

    # --- agreement
    preds = predict(skops, paths, top_k=5)
    got_ids = [Path(p.id).name for p in preds]
    assert got_ids == [Path(x).name for x in paths], "predict returned the photos in another order"
    expected = np.array([[dict(zip(p.labels, p.probabilities))[c] for c in onnx.classes] for p in preds])
    pil = np.stack([onnx.preprocess(x) for x in paths])
    meta = onnx.metadata["preprocessing"]
    prep = Preprocess(**{**{k: meta[k] for k in meta}, "mean": tuple(meta["mean"]), "std": tuple(meta["std"])})

    def own(path):
        x = decode(Path(path).read_bytes(), prep)
        return (resize_batch(x[None], prep, torch.device("cpu"))[0] if prep.resize == "device" else x).contiguous()

    ours = torch.stack([own(x) for x in paths]).numpy()
    p_pil = np.concatenate([onnx.predict_proba(b) for b in _batches(pil)])
    p_own = np.concatenate([onnx.predict_proba(b) for b in _batches(ours)])
    same = (p_pil.argmax(1) == expected.argmax(1)).mean()
    print(f"\nagreement on {len(paths)} held-out photos (max abs diff of probabilities vs cnncodes predict):")
    print(f"  ONNX Runtime, reference PIL preprocessing : {np.abs(p_pil - expected).max():.2e}  "
          f"(top-1 equal for {same:.1%}; {int((pil != ours).sum())} of {pil.size} pixels differ from cnncodes')")
    print(f"  ONNX Runtime, cnncodes' decoded pixels    : {np.abs(p_own - expected).max():.2e}")

    # --- speed, model only: the same uint8 batches
    net, _ = build(skops, codes_only=True)  # in the store's arithmetic, as predict extracts
    net = net.to(memory_format=torch.channels_last)  # as extract runs it

    def torch_model():
        with torch.inference_mode():
            for b in _batches(ours):
                x = torch.from_numpy(b).contiguous(memory_format=torch.channels_last)
                model.predict_proba(net(x).numpy())

    def ort_model():
        for b in _batches(ours):
            onnx.predict_proba(b)

    t_torch, t_ort = _race(torch_model, ort_model)
    n = len(paths)
    print(f"\nmodel only ({n} photos, batches of 64, uint8 pixels in, probabilities out):")
    print(f"  cnncodes network (torch, {store.spec.precision:<8}): {n / t_torch:7.1f} img/s")
    print(f"  ONNX Runtime                      : {n / t_ort:7.1f} img/s  ({t_torch / t_ort:.2f}x)")

    # --- speed, end to end: files to probabilities
    def ort_e2e():
        onnx_pixels = np.stack([onnx.preprocess(x) for x in paths])
        for b in _batches(onnx_pixels):
            onnx.predict_proba(b)

    t_pred, t_e2e = _race(lambda: predict(skops, paths, top_k=5), ort_e2e, repeat=2)
    print(f"\nend to end ({n} photo files to probabilities, model file loaded once for ONNX):")
    print(f"  cnncodes predict (library call)      : {n / t_pred:7.1f} img/s")
    print(f"  PIL + ONNX Runtime (one process)     : {n / t_e2e:7.1f} img/s  ({t_pred / t_e2e:.2f}x)")

    # --- serve
    good = [Path(x).read_bytes() for x in paths[:50]]
    bodies = [BROKEN if i % 10 == 9 else good[i % len(good)] for i in range(100)]
    for model_file in (onnx_path, skops) if args.serve else ():
        proc, url = _serve(model_file, None)
        try:
            print(f"\ncnncodes serve {model_file.name}: {args.requests} requests per level, 10 % broken uploads")
            for clients in (1, 4, 8):
                r = _load(url, bodies, clients, max(1, args.requests // clients))
                print(f"  {clients} client(s): {r['rps']:6.1f} req/s, p50 {r['p50']:6.1f} ms, p99 {r['p99']:6.1f} ms, "
                      f"{r['failed']} failed of {r['n']} ({r['broken']} broken uploads answered 422)", flush=True)
            if args.screenshot and model_file == onnx_path:
                top = _screenshot(url, Path(paths[0]), args.screenshot)
                print(f"  screenshot of the page after a prediction ({Path(paths[0]).parent.name}/"
                      f"{Path(paths[0]).name}: {top}): {args.screenshot}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
