"""Extraction: the API and plan, the forward pass, the local engine and the Ray engine, device and precision."""
