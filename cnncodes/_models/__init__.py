"""Model files and what they do: save/load, predict, evaluate, compare, export to ONNX, the ONNX runtime model, the HTTP server."""
