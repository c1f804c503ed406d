"""Stream a BasicMotions recording (a smartwatch's accelerometer and gyroscope, 10 frames a second) frame by
frame over the WebSocket, and watch the prediction settle. LSTM_SERVE_URL, LSTM_SERVE_API_KEY as in classify.py."""

import json
import os
from pathlib import Path

import numpy as np

from lstm_serve.client import Client

here = Path(__file__).parent
frames = np.load(here / "basic-motions.npy")  # [100, 6]
truth = json.loads((here / "basic-motions.json").read_text())["label"]
with (
    Client(os.environ.get("LSTM_SERVE_URL", "http://127.0.0.1:8000"), os.environ.get("LSTM_SERVE_API_KEY")) as client,
    client.session("basic-motions") as session,
):
    for t, prediction in enumerate(session.stream(frame[None] for frame in frames), start=1):
        if t % 10 == 0:
            print(f"after {t / 10:4.1f} s: {prediction.label:<10} p={prediction.probabilities.max():.3f}")
print(f"true label: {truth}")
