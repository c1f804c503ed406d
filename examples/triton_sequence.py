"""The same streaming session through NVIDIA's tritonclient and the Open Inference Protocol's sequence
extension: start, continue, end. pip install 'tritonclient[http]'. LSTM_SERVE_URL, LSTM_SERVE_API_KEY."""

import os
from pathlib import Path

import numpy as np
import tritonclient.http as triton

url = os.environ.get("LSTM_SERVE_URL", "http://127.0.0.1:8000").removeprefix("http://")
key = os.environ.get("LSTM_SERVE_API_KEY")
headers = {"Authorization": f"Bearer {key}"} if key else None
client = triton.InferenceServerClient(url)
frames = np.load(Path(__file__).parent / "japanese-vowels.npy")[None]  # [1, T, 12]
chunks = np.array_split(frames, 3, axis=1)
for k, chunk in enumerate(chunks):
    x = triton.InferInput("x", list(chunk.shape), "FP32")
    x.set_data_from_numpy(chunk, binary_data=True)
    result = client.infer(
        "japanese-vowels",
        [x],
        outputs=[triton.InferRequestedOutput("probabilities", class_count=1)],
        sequence_id=42,
        sequence_start=k == 0,
        sequence_end=k == len(chunks) - 1,
        headers=headers,
    )
    print(f"chunk {k + 1}/{len(chunks)}: {result.as_numpy('probabilities')[0][0].decode()}")  # score:index:label
