"""Acceptance of issue 17 (results people look at) on a labelled code store, e.g. flowers5.

    python benchmarks/acceptance_results.py STORE.h5 [--workdir DIR] [--repeats 5] [--jobs 2]

On the store (block4 + block5, labelled): a stratified 75/25 split by content (random_state 0),
logistic regression (C by 5-fold CV) on each layer, then

1. ``evaluate`` of the block5 model: accuracy and mean per-class accuracy with 95 % intervals;
2. ``compare`` block4 vs block5: the paired bootstrap interval of the difference;
3. ``learning_curve`` at 1, 2, 5, 10, 20, 50 and all images per class on block5;
4. a 5-fold ``sweep`` of both layers (differences to the best one with their intervals);
5. the HTML report of the block5 model with the curve and the sweep, opened in headless
   Chromium (a phone-sized and a desktop window): images decoded, gallery ids real test ids,
   and a full-page screenshot ``report.png`` next to it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


def screenshot(html: Path, png: Path, ids: set[str]) -> None:
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import CHROMIUM_ARGS

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        for name, width in (("phone", 390), ("desktop", 1200)):
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(html.as_uri())
            widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
            shown = page.eval_on_selector_all("figure", "fs => fs.map(f => f.dataset.id)")
            out = png.with_name(f"{png.stem}-{name}.png")
            page.screenshot(path=str(out), full_page=True)
            print(f"{name} ({width} px): {len(widths)} images, {sum(w > 0 for w in widths)} decoded; "
                  f"{len(shown)} gallery ids, {len(set(shown) & ids)} of them test ids; "
                  f"page width {page.evaluate('document.documentElement.scrollWidth')} px; wrote {out}")
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store")
    ap.add_argument("--workdir", default="/tmp/cnncodes-acceptance-results")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()

    from cnncodes import compare, evaluate, fit, learning_curve, save, split_store, sweep

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_name()}; store {args.store}")
    t0 = time.perf_counter()
    train, test = split_store(args.store, test_size=0.25, random_state=0)
    print(f"split: {len(train)} train, {len(test)} test rows", flush=True)
    models = {}
    for layer in ("block4", "block5"):
        t = time.perf_counter()
        m = fit(args.store, layer=layer, rows=train, n_jobs=args.jobs, random_state=0)
        models[layer] = save(m, work / f"{layer}.skops")
        print(f"fit logreg {layer}: C={m.cnncodes_['fit']['C']:g}, {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    ev = evaluate(models["block5"], args.store)
    print(f"\n## evaluate ({time.perf_counter() - t:.2f} s)\n{ev.summary()}", flush=True)
    t = time.perf_counter()
    c = compare(models["block4"], models["block5"], args.store)
    print(f"\n## compare ({time.perf_counter() - t:.2f} s)\n{c.summary()}", flush=True)
    t = time.perf_counter()
    curve = learning_curve(args.store, layer="block5", repeats=args.repeats, n_jobs=args.jobs)
    print(f"\n## learning curve ({time.perf_counter() - t:.1f} s)\n{curve.table()}", flush=True)
    t = time.perf_counter()
    sw = sweep(args.store, cv=5, n_jobs=args.jobs)
    print(f"\n## sweep ({time.perf_counter() - t:.1f} s)\n{sw.table()}", flush=True)
    html = work / "report.html"
    ev.to_html(html, curve=curve, sweep=sw)
    print(f"\n## report\nwrote {html} ({html.stat().st_size / 1e3:.0f} kB)")
    screenshot(html, work / "report.png", set(ev.ids))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
