"""Parity of an exported entry with its PyTorch checkpoint, run through onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from lstm_serve.export.onnx_export import sha256
from lstm_serve.model.data import Split, load_dataset, pad_batch, user_dataset
from lstm_serve.model.train import load_checkpoint


def ort_session(path: str | Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_graph(
    session: ort.InferenceSession,
    x: np.ndarray,
    lengths: np.ndarray | None = None,
    state: tuple[np.ndarray, ...] | None = None,
) -> tuple[np.ndarray, ...]:
    """x (B, T, D) -> logits (B, T, C) and the state after it (hn[, cn], each (L, B, H)); zero state and
    full lengths by default. The state tensors are whatever the graph declares besides x and lengths."""
    B, T, _ = x.shape
    state_inputs = [i for i in session.get_inputs() if i.name not in ("x", "lengths")]
    if state is None:
        state = tuple(np.zeros((i.shape[0], B, i.shape[2]), np.float32) for i in state_inputs)
    if lengths is None:
        lengths = np.full(B, T, np.int64)
    feeds = {
        "x": x.astype(np.float32),
        "lengths": lengths.astype(np.int64),
        **{i.name: s for i, s in zip(state_inputs, state, strict=True)},
    }
    return tuple(session.run(None, feeds))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def last_step_probabilities(session: ort.InferenceSession, sequences: list[np.ndarray]) -> np.ndarray:
    """(N, C) class probabilities at each sequence's last frame, in one padded batch."""
    x, lengths = pad_batch(sequences)
    logits = run_graph(session, x, lengths)[0]
    return softmax(logits[np.arange(len(sequences)), lengths - 1])


def torch_probabilities(checkpoint: str | Path, sequences: list[np.ndarray]) -> np.ndarray:
    model, _ = load_checkpoint(checkpoint)
    x, lengths = pad_batch(sequences)
    with torch.no_grad():
        lengths_t = torch.from_numpy(lengths)
        logits = model.last_step(model(torch.from_numpy(x), lengths=lengths_t)[0], lengths_t)
    return torch.softmax(logits, -1).numpy()


def test_split(checkpoint: str | Path) -> Split:
    """The test split the checkpoint was scored on: a bundled set's, or the one held out of the user's data
    (the same file, fraction and seed give the same split)."""
    _, saved = load_checkpoint(checkpoint)
    cfg = saved["metrics"]["train_config"]
    if cfg.get("data"):
        return user_dataset(cfg["data"], cfg.get("test"), cfg.get("test_fraction", 0.2), cfg["seed"]).test
    return load_dataset(saved["dataset"]).test


def check_entry(checkpoint: str | Path, entry: str | Path) -> list[str]:
    """ORT vs PyTorch on the whole test split; the recorded sha256 and accuracy. Raises on failure."""
    entry = Path(entry)
    config = json.loads((entry / "config.json").read_text())
    assert sha256(entry / "model.onnx") == config["sha256"], "model.onnx does not match the sha256 in config.json"
    test = test_split(checkpoint)
    ours = last_step_probabilities(ort_session(entry / "model.onnx"), test.sequences)
    reference = torch_probabilities(checkpoint, test.sequences)
    max_diff = float(np.abs(ours - reference).max())
    assert max_diff <= 1e-4, f"onnxruntime and PyTorch differ by {max_diff:.2e} > 1e-4"
    assert (ours.argmax(1) == reference.argmax(1)).all(), "onnxruntime and PyTorch disagree on a class"
    accuracy = float((ours.argmax(1) == test.labels).mean())
    assert abs(accuracy - config["metrics"]["test_accuracy"]) < 1e-9, "accuracy differs from the recorded one"
    return [
        f"parity: max |p_ort - p_torch| = {max_diff:.2e} over {len(test)} test sequences, argmax identical",
        f"accuracy with onnxruntime: {accuracy:.4f} (recorded {config['metrics']['test_accuracy']:.4f})",
    ]
