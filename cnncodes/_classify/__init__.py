"""Classifiers on codes: fit, streaming fit, the split, the exact and approximate kNN."""
