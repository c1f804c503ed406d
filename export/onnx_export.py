"""Export a trained checkpoint to a model repository entry `models/<name>/<version>/`.

The ONNX contract (what the service and outside tools rely on):
  inputs   x float32 [B, T, D] raw features, h0 and c0 float32 [L, B, H], lengths int64 [B]
  outputs  logits float32 [B, T, C] per step, hn and cn float32 [L, B, H] after each row's last valid step
`lengths` is wired to the ONNX LSTM op's `sequence_lens`: rows of different lengths share one call
and padding never reaches the state.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import onnx
import torch
from torch import nn

from model.model import SequenceClassifier
from model.train import load_checkpoint

OPSET = 17
INPUTS = ["x", "h0", "c0", "lengths"]
OUTPUTS = ["logits", "hn", "cn"]
DYNAMIC_AXES = {
    "x": {0: "batch", 1: "time"},
    "h0": {1: "batch"},
    "c0": {1: "batch"},
    "lengths": {0: "batch"},
    "logits": {0: "batch", 1: "time"},
    "hn": {1: "batch"},
    "cn": {1: "batch"},
}


class OnnxSignature(nn.Module):
    """The classifier with the contract's flat signature."""

    def __init__(self, model: SequenceClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, h0, c0, lengths):
        logits, (hn, cn) = self.model(x, (h0, c0), lengths)
        return logits, hn, cn


def export_onnx(model: SequenceClassifier, path: Path, opset: int = OPSET) -> None:
    """Write model.onnx and prove the result honours the contract's dynamic axes."""
    cfg = model.config
    # torch 2.13 caches the first LSTM export's dispatch; a second export would silently freeze T
    cache = getattr(torch.ops.aten.lstm.input, "_dispatch_cache", None)
    if cache is not None:
        cache.clear()
    B, T = 3, 5  # >= 2, or the exporter bakes them in as static dims
    example = (
        torch.randn(B, T, cfg.input_dim),
        torch.zeros(cfg.num_layers, B, model.state_size),
        torch.zeros(cfg.num_layers, B, model.state_size),
        torch.tensor([5, 4, 2]),
    )
    with torch.no_grad():
        torch.onnx.export(
            OnnxSignature(model.eval()), example, str(path), dynamo=False, opset_version=opset,
            input_names=INPUTS, output_names=OUTPUTS, dynamic_axes=DYNAMIC_AXES,
        )
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    check_contract(graph, cfg.input_dim, cfg.num_classes, cfg.num_layers, model.state_size)


def tensor_shape(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def check_contract(graph: onnx.ModelProto, D: int, C: int, L: int, H: int) -> None:
    expected = {
        "x": ["batch", "time", D], "h0": [L, "batch", H], "c0": [L, "batch", H], "lengths": ["batch"],
        "logits": ["batch", "time", C], "hn": [L, "batch", H], "cn": [L, "batch", H],
    }
    found = {v.name: tensor_shape(v) for v in [*graph.graph.input, *graph.graph.output]}
    assert found == expected, f"exported graph breaks the contract: {found} != {expected}"
    ops = {n.op_type for n in graph.graph.node}
    assert "LSTM" in ops and not ops & {"Loop", "Scan", "Dropout"}, f"unexpected ops in graph: {sorted(ops)}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_config(model: SequenceClassifier, checkpoint: dict, name: str, version: int, onnx_path: Path) -> dict:
    cfg = model.config
    L, H = cfg.num_layers, model.state_size
    fp32 = "FP32"
    metrics = checkpoint["metrics"]
    return {
        "name": name,
        "version": version,
        "cell": cfg.cell,
        "input_dim": cfg.input_dim,
        "hidden_size": H,  # width of h and c in the state tensors
        "num_layers": L,
        "ensemble": cfg.ensemble,  # K member LSTMs of hidden_size / K each, side by side
        "num_classes": cfg.num_classes,
        "labels": checkpoint["labels"],
        "inputs": [
            {"name": "x", "datatype": fp32, "shape": [-1, -1, cfg.input_dim]},
            {"name": "h0", "datatype": fp32, "shape": [L, -1, H]},
            {"name": "c0", "datatype": fp32, "shape": [L, -1, H]},
            {"name": "lengths", "datatype": "INT64", "shape": [-1]},
        ],
        "outputs": [
            {"name": "logits", "datatype": fp32, "shape": [-1, -1, cfg.num_classes]},
            {"name": "hn", "datatype": fp32, "shape": [L, -1, H]},
            {"name": "cn", "datatype": fp32, "shape": [L, -1, H]},
        ],
        "state": [
            {"input": "h0", "output": "hn", "shape": [L, H]},
            {"input": "c0", "output": "cn", "shape": [L, H]},
        ],
        "lengths_input": "lengths",
        "logits_output": "logits",
        "metrics": {
            "dataset": checkpoint["dataset"],
            "test_accuracy": metrics["test_accuracy"],
            "test_sequences": metrics["split"]["test"],
            "per_class_accuracy": metrics["per_class_accuracy"],
        },
        "parameters": model.num_parameters(),
        "opset": OPSET,
        "exported_with": f"torch {torch.__version__}",
        "sha256": sha256(onnx_path),
    }


def export_checkpoint(checkpoint_path: str | Path, repository: str | Path, name: str, version: int = 1) -> Path:
    """checkpoint.pt -> <repository>/<name>/<version>/{model.onnx, config.json}; returns the entry folder."""
    model, checkpoint = load_checkpoint(checkpoint_path)
    entry = Path(repository) / name / str(version)
    entry.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model.onnx"
        export_onnx(model, staged)
        staged.replace(entry / "model.onnx")
    config = model_config(model, checkpoint, name, version, entry / "model.onnx")
    (entry / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return entry
