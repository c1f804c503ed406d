"""PyTorch checkpoint -> ONNX model repository entry (model.onnx + config.json), with parity checks."""
