"""lstm-serve: the FastAPI service over onnxruntime. Imports no torch."""
