"""The afternoon baseline, kept for comparison only: what a user writes in an afternoon.

Plain FastAPI + onnxruntime: pydantic models, one `session.run` per request, an in-memory dict of
h/c for sessions, default onnxruntime session options. Served by `lstm-serve bench` with the same
uvicorn settings as lstm-serve, on the same model file:

    LSTM_SERVE_BASELINE_MODEL=models/japanese-vowels/1 uvicorn lstm_serve.bench.baseline:app
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, HTTPException, WebSocket, WebSocketDisconnect
from pydantic import BaseModel

MODEL_DIR = Path(os.environ.get("LSTM_SERVE_BASELINE_MODEL", "models/japanese-vowels/1"))
config = json.loads((MODEL_DIR / "config.json").read_text())
session = ort.InferenceSession(str(MODEL_DIR / "model.onnx"), providers=["CPUExecutionProvider"])
L, H = config["state"][0]["shape"]
labels = config["labels"]
sessions: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}

app = FastAPI()


class ClassifyRequest(BaseModel):
    sequences: list[list[list[float]]]


class StepRequest(BaseModel):
    inputs: list[list[float]]


def run(x: np.ndarray, h: np.ndarray, c: np.ndarray) -> list[np.ndarray]:
    feeds = {"x": x[None], "h0": h, "c0": c, "lengths": np.array([len(x)], np.int64)}
    return session.run(["logits", "hn", "cn"], feeds)


def prediction(logits: np.ndarray) -> dict:
    p = np.exp(logits - logits.max())
    p /= p.sum()
    k = int(p.argmax())
    return {"label": labels[k], "class_id": k, "probabilities": p.tolist()}


def zeros() -> np.ndarray:
    return np.zeros((L, 1, H), np.float32)


# response_model=None: the return annotations are for mypy; FastAPI would otherwise validate every
# response against them, which this baseline never did
@app.get("/healthz", response_model=None)
def healthz() -> dict[str, str]:
    return {"status": "alive"}


@app.post("/v1/classify", response_model=None)
def classify(request: ClassifyRequest) -> dict[str, list[dict]]:
    predictions = []
    for sequence in request.sequences:
        logits, _, _ = run(np.array(sequence, np.float32), zeros(), zeros())
        predictions.append(prediction(logits[0, -1]))
    return {"predictions": predictions}


@app.post("/v1/sessions", status_code=201, response_model=None)
def create_session() -> dict[str, str]:
    session_id = uuid.uuid4().hex
    sessions[session_id] = (zeros(), zeros(), 0)
    return {"session_id": session_id}


def apply(session_id: str, frames: np.ndarray) -> dict:
    if session_id not in sessions:
        raise HTTPException(404, "no such session")
    h, c, steps = sessions[session_id]
    logits, h, c = run(frames, h, c)
    sessions[session_id] = (h, c, steps + len(frames))
    return {"session_id": session_id, "steps": steps + len(frames), "prediction": prediction(logits[0, -1])}


@app.post("/v1/sessions/{session_id}/steps", response_model=None)
def step(session_id: str, request: StepRequest) -> dict:
    return apply(session_id, np.array(request.inputs, np.float32))


@app.delete("/v1/sessions/{session_id}", status_code=204)
def delete_session(session_id: str) -> None:
    sessions.pop(session_id, None)


@app.websocket("/v1/sessions/{session_id}/stream")
async def stream(websocket: WebSocket, session_id: str) -> None:
    await websocket.accept()
    try:
        while True:
            data = await websocket.receive_bytes()
            frames = np.frombuffer(data, "<f4").reshape(-1, config["input_dim"])
            await websocket.send_json(apply(session_id, frames))
    except WebSocketDisconnect:
        pass
