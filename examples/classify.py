"""Classify real test sequences of both shipped models with the Python client, and compare with their true
labels. LSTM_SERVE_URL (default http://127.0.0.1:8000), LSTM_SERVE_API_KEY when the server has keys."""

import json
import os
from pathlib import Path

import numpy as np

from lstm_serve.client import Client

here = Path(__file__).parent
with Client(os.environ.get("LSTM_SERVE_URL", "http://127.0.0.1:8000"), os.environ.get("LSTM_SERVE_API_KEY")) as client:
    for model in ("japanese-vowels", "basic-motions"):
        frames = np.load(here / f"{model}.npy")  # [T, D] float32
        truth = json.loads((here / f"{model}.json").read_text())["label"]
        (prediction,) = client.classify([frames], model=model)
        print(f"{model}: {prediction.label} (p={prediction.probabilities.max():.3f}); true label {truth}")
