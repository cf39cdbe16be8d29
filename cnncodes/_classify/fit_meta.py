"""What a fitted model carries for `save`: its fit details, layer, extractor spec and training rows."""

from __future__ import annotations

from cnncodes._store.store import CodeStore


def fit_meta(info: dict, layer, store: CodeStore | None, rows) -> dict:
    """What a fitted model carries for `save`: fit details, layer, extractor spec, training rows."""
    return {
        "fit": info,
        "layer": layer,
        "extractor": None if store is None else _extractor_spec(store, layer),
        "train_ids": None if store is None else [str(i) for i in store.ids[rows]],
        "train_sha256": None if store is None else sorted({str(h) for h in store.sha256[rows]}),
        "store": None if store is None else str(store.path),
    }


def _extractor_spec(store: CodeStore, layer: str) -> dict:
    """The store's settings narrowed to one layer: what extracting new photos needs.

    A model file's dict (`ExtractorSpec.to_model_json`): the estimator carries it, and skops
    files hold no cnncodes types.
    """
    return store.spec.narrow(layer).to_model_json()
