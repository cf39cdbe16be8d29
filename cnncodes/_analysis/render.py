"""Rendering an evaluation as one self-contained HTML file (Jinja2 template, inline thumbnails)."""

from __future__ import annotations

import base64
import datetime as _dt
import io
from pathlib import Path

import numpy as np

from cnncodes._io import atomic_write
from cnncodes._outputs import REPORT, check_output

TEMPLATE = "report.html.j2"
THUMB_PX = 160
LIBRARIES = ("cnncodes", "torch", "torchvision", "scikit-learn", "numpy", "h5py", "skops", "jinja2")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a result depends on (from package metadata: no imports)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            if name == "cnncodes":
                from cnncodes import __version__

                out[name] = __version__
    return out


def provenance(model, store, layer) -> dict:
    """What made an evaluation: model, classifier, extractor settings, store, library versions."""
    spec = model.extractor
    fit = model.fit or {}
    out = {"model": Path(model.path).name if model.path else "(in memory)"}
    if model.path:
        out["model file"] = str(model.path)
    if fit:
        out["classifier"] = fit.get("classifier", "?") + (f", C={fit['C']:g}" if "C" in fit else "")
        out["trained on"] = f"{fit.get('n_train', '?')} images"
    if spec is not None:
        w = spec.weights
        out.update({"backbone": spec.backbone, "weights": w.id, "weights sha256": w.sha256 or "-",
                    "layer": " + ".join(f"{name} ({spec.layers.get(name, '?')})"
                                        for name in ([layer] if isinstance(layer, str) else layer)),
                    "pooling": spec.pooling,
                    "codes": f"{spec.dtype}, computed in {spec.precision}, tta {spec.tta}",
                    "preprocessing": spec.preprocessing.description})
    out["store"] = str(store.path)
    out["data root"] = str(store.attrs.get("data_root", "?"))
    out["libraries"] = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    return out


def thumbnail(path, px: int = THUMB_PX) -> str | None:
    """A JPEG thumbnail of an image file as a ``data:`` URI, or None when it cannot be read."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((px, px))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _gallery(ev, k: int) -> dict[str, list[dict]]:
    out = {}
    for kind, rows in ev.gallery(k).items():
        for row in rows:
            row["src"] = thumbnail(Path(ev.root) / row["id"]) if ev.root else None
        out[kind] = rows
    return out


def _confusion(ev) -> list[list[dict]]:
    """Confusion matrix cells with a shade by share of the true class (row)."""
    cm = np.asarray(ev.confusion)
    totals = np.maximum(cm.sum(axis=1, keepdims=True), 1)
    return [[{"n": int(v), "share": float(v / t[0]), "diag": i == j} for j, v in enumerate(row)]
            for i, (row, t) in enumerate(zip(cm, totals))]


def _curve_svg(curve, width: int = 520, height: int = 260) -> dict:
    """Coordinates of the learning curve for an inline SVG: log2 images per class against accuracy."""
    pad_l, pad_r, pad_t, pad_b = 48, 16, 12, 36
    xs = np.log2([p.per_class for p in curve.points])
    lows = [p.interval.low for p in curve.points]
    highs = [p.interval.high for p in curve.points]
    y0, y1 = max(0.0, min(lows) - 0.02), min(1.0, max(highs) + 0.02)
    x0, x1 = float(xs.min()), float(xs.max()) if xs.max() > xs.min() else float(xs.min()) + 1

    def sx(x):
        return pad_l + (x - x0) / (x1 - x0) * (width - pad_l - pad_r)

    def sy(y):
        return pad_t + (y1 - y) / max(y1 - y0, 1e-9) * (height - pad_t - pad_b)

    pts = [{"x": sx(x), "y": sy(p.accuracy), "lo": sy(p.interval.low), "hi": sy(p.interval.high),
            "label": "all" if p.size == "all" else f"{p.per_class:g}", "acc": p.accuracy}
           for x, p in zip(xs, curve.points)]
    ticks = [{"y": sy(v), "label": f"{v:.2f}"} for v in np.linspace(y0, y1, 5)]
    return {"width": width, "height": height, "points": pts, "ticks": ticks,
            "line": " ".join(f"{p['x']:.1f},{p['y']:.1f}" for p in pts), "left": pad_l,
            "bottom": height - pad_b, "right": width - pad_r}


def render(ev, *, curve=None, sweep=None, thumbnails: int = 12, title: str | None = None) -> str:
    """The report of an `Evaluation` as one HTML document (no network, images inline)."""
    from importlib.resources import files

    from cnncodes._optional import require

    jinja2 = require("jinja2", "the HTML report")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    template = env.from_string((files("cnncodes") / "_data" / TEMPLATE).read_text(encoding="utf-8"))
    sweep_rows = None
    if sweep is not None:
        diffs = sweep.differences()
        sweep_rows = [{"layer": s.layer, "dims": s.dims, "mean": s.mean, "std": s.std,
                       "diff": diffs[s.layer], "best": s.layer == sweep.best_layer} for s in sweep.layers]
    return template.render(
        title=title or f"cnncodes report: {ev.provenance.get('model', 'model')}",
        ev=ev, gallery=_gallery(ev, thumbnails), confusion=_confusion(ev),
        curve=curve, curve_svg=_curve_svg(curve) if curve is not None and curve.points else None,
        curve_verdict=curve.more_labels_help()[1] if curve is not None else None,
        sweep=sweep, sweep_rows=sweep_rows,
        created=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def write_html(html: str, path) -> Path:
    """Write a report, refusing to overwrite a file that is not a cnncodes report."""
    path = Path(path)
    check_output(path, REPORT)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fh:
        fh.write(html.encode("utf-8"))
    return path
