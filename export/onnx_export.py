"""Export a trained checkpoint to a model repository entry `models/<name>/<version>/`.

The ONNX contract (what the service and outside tools rely on):
  inputs   x float32 [B, T, D] raw features, the state (h0, c0; h0 alone for the GRU) float32
           [L, B, H], lengths int64 [B]
  outputs  logits float32 [B, T, C] per step, the state after each row's last valid step (hn, cn)
`lengths` is wired to the recurrent op's `sequence_lens`: rows of different lengths share one call
and padding never reaches the state. Every cell is a native ONNX op: LSTM and GRU as exported by
PyTorch; the peephole LSTM is the LSTM op with its `P` input, the coupled LSTM the LSTM op with
`input_forget=1` (see `onnx_twin`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from lstm_serve.core.repository import version_number
from lstm_serve.model.data import DESCRIPTIONS, FEATURES, load_dataset
from lstm_serve.model.model import ModelConfig, SequenceClassifier
from lstm_serve.model.train import load_checkpoint

OPSET = 17
RECURRENT_OPS = {"lstm": "LSTM", "peephole": "LSTM", "coupled": "LSTM", "gru": "GRU"}


def tensor_names(model: SequenceClassifier) -> tuple[list[str], list[str]]:
    """Graph inputs and outputs: x, h0[, c0], lengths -> logits, hn[, cn]."""
    names = model.state_names
    return ["x", *(f"{n}0" for n in names), "lengths"], ["logits", *(f"{n}n" for n in names)]


class OnnxSignature(nn.Module):
    """The classifier with the contract's flat signature."""

    def __init__(self, model: SequenceClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, *state_and_lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        *state, lengths = state_and_lengths
        logits, final = self.model(x, tuple(state), lengths)
        return (logits, *final)


def onnx_twin(model: SequenceClassifier) -> tuple[SequenceClassifier, list[dict]]:
    """The peephole and coupled cells as a standard-LSTM classifier plus a patch per LSTM node.

    peephole: same W, R, b; the node gets P = [p_i, p_o, p_f] (ONNX's order).
    coupled:  onnxruntime's input_forget computes f = 1 - i, the notes' cell i = 1 - f. Since
              1 - sigmoid(a) = sigmoid(-a), the notes' forget-gate rows go negated into the input-gate
              slot: then ONNX's i is the notes' 1 - f and ONNX's f = 1 - i is the notes' f, exactly.
    """
    cell = model.config.cell
    if cell not in ("peephole", "coupled"):
        return model, []
    twin = SequenceClassifier(ModelConfig(**{**model.config.to_dict(), "cell": "lstm"})).eval()
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("rnns.")}, strict=False)
    patches: list[dict] = []
    H = model.config.hidden_size
    with torch.no_grad():
        for source, target in zip(model.rnns, twin.rnns, strict=True):
            for layer in range(model.config.num_layers):
                for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    value = getattr(source, f"{kind}_l{layer}")
                    if cell == "coupled":  # [f, c~, o] -> [i := -f, f := 0, c~, o]
                        f, g, o = value.split(H)
                        value = torch.cat([-f, torch.zeros_like(f), g, o])
                    getattr(target, f"{kind}_l{layer}").copy_(value)
                if cell == "peephole":
                    p_i, p_f, p_o = getattr(source, f"weight_peephole_l{layer}")
                    patches.append({"P": torch.cat([p_i, p_o, p_f])[None].numpy()})
                else:
                    patches.append({"input_forget": 1})
    return twin, patches


def patch_recurrent_nodes(graph: onnx.ModelProto, patches: list[dict]) -> None:
    """Apply onnx_twin's patches to the LSTM nodes, which the exporter writes member by member,
    layer by layer (export_onnx then checks the result against the original model)."""
    nodes = [n for n in graph.graph.node if n.op_type == "LSTM"]
    assert len(nodes) == len(patches), f"{len(nodes)} LSTM nodes for {len(patches)} patches"
    for k, (node, patch) in enumerate(zip(nodes, patches, strict=True)):
        if "P" in patch:
            name = f"peephole_weights_{k}"
            graph.graph.initializer.append(numpy_helper.from_array(patch["P"].astype(np.float32), name))
            node.input.extend([""] * (7 - len(node.input)) + [name])
        if "input_forget" in patch:
            kept = [a for a in node.attribute if a.name != "input_forget"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("input_forget", patch["input_forget"])])


def export_onnx(model: SequenceClassifier, path: Path, opset: int = OPSET) -> None:
    """Write model.onnx and prove it honours the contract and computes what the model computes."""
    cfg, model = model.config, model.eval()
    # torch 2.13 caches the first export's dispatch; a second export would silently freeze T
    for op in (torch.ops.aten.lstm.input, torch.ops.aten.gru.input):
        cache = getattr(op, "_dispatch_cache", None)
        if cache is not None:
            cache.clear()
    twin, patches = onnx_twin(model)
    inputs, outputs = tensor_names(model)
    B, T = 3, 5  # >= 2, or the exporter bakes them in as static dims
    example = (torch.randn(B, T, cfg.input_dim), *twin.zero_state(B), torch.tensor([5, 4, 2]))
    axes = {
        "x": {0: "batch", 1: "time"},
        "lengths": {0: "batch"},
        "logits": {0: "batch", 1: "time"},
        **{name: {1: "batch"} for name in inputs[1:-1] + outputs[1:]},
    }
    with torch.no_grad():
        torch.onnx.export(
            OnnxSignature(twin),
            example,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
        )
    model.eval(), twin.eval()  # torch 2.13's exporter leaves the module in training mode: dropout on
    graph = onnx.load(str(path))
    if patches:
        patch_recurrent_nodes(graph, patches)
        onnx.save(graph, str(path))
    onnx.checker.check_model(graph, full_check=True)
    check_contract(graph, model)
    check_against_model(path, model)


def tensor_shape(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def check_contract(graph: onnx.ModelProto, model: SequenceClassifier) -> None:
    cfg, H = model.config, model.state_size
    inputs, outputs = tensor_names(model)
    state = [cfg.num_layers, "batch", H]
    expected = {
        "x": ["batch", "time", cfg.input_dim],
        "lengths": ["batch"],
        "logits": ["batch", "time", cfg.num_classes],
        **{name: state for name in inputs[1:-1] + outputs[1:]},
    }
    found = {v.name: tensor_shape(v) for v in [*graph.graph.input, *graph.graph.output]}
    assert found == expected, f"exported graph breaks the contract: {found} != {expected}"
    ops = {n.op_type for n in graph.graph.node}
    assert RECURRENT_OPS[cfg.cell] in ops and not ops & {"Loop", "Scan", "Dropout"}, f"unexpected ops: {sorted(ops)}"


def check_against_model(path: Path, model: SequenceClassifier, atol: float = 1e-4) -> None:
    """onnxruntime on random frames, mixed lengths and a non-zero state vs the PyTorch model."""
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(0)
    B, T = 4, 9
    x = torch.randn(B, T, model.config.input_dim, generator=generator) * model.feature_std + model.feature_mean
    state = tuple(0.5 * torch.randn(s.shape, generator=generator) for s in model.zero_state(B))
    lengths = torch.tensor([9, 1, 5, 8])
    with torch.no_grad():
        logits, final = model(x, state, lengths)
    inputs, outputs = tensor_names(model)
    feeds = dict(zip(inputs, [x.numpy(), *(s.numpy() for s in state), lengths.numpy()], strict=True))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    results = session.run(outputs, feeds)
    valid = np.arange(T)[None, :, None] < lengths.numpy()[:, None, None]  # logits past a length are padding
    for name, ours, theirs in zip(outputs, results, [logits, *final], strict=True):
        theirs = theirs.numpy()
        if name == "logits":
            ours, theirs = ours * valid, theirs * valid
        diff = float(np.abs(ours - theirs).max())
        assert diff <= atol, f"{name}: onnxruntime and PyTorch differ by {diff:.2e} (> {atol})"


NUMBER_LIST = re.compile(r"\[\s+(-?[\d.e+-]+(?:,\s+-?[\d.e+-]+)*)\s+\]")


def config_text(config: dict) -> str:
    """config.json, indented, with every list of numbers (a shape, a frame) on one line."""
    text = json.dumps(config, indent=2)
    return NUMBER_LIST.sub(lambda m: "[" + ", ".join(n.strip() for n in m.group(1).split(",")) + "]", text) + "\n"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def example_sequence(dataset: str) -> dict:
    """The first test sequence of the data set with its true label: what a caller can send to try the model.
    Each number is written as the shortest decimal that reads back as the same float32."""
    data = load_dataset(dataset)
    frames = [[float(str(np.float32(value))) for value in frame] for frame in data.test.sequences[0]]
    return {"label": data.label_names[int(data.test.labels[0])], "frames": frames}


def model_config(model: SequenceClassifier, checkpoint: dict, name: str, version: int, onnx_path: Path) -> dict:
    cfg = model.config
    L, H = cfg.num_layers, model.state_size
    fp32 = "FP32"
    metrics = checkpoint["metrics"]
    inputs, outputs = tensor_names(model)
    state_inputs, state_outputs = inputs[1:-1], outputs[1:]
    return {
        "name": name,
        "version": version,
        "cell": cfg.cell,
        "input_dim": cfg.input_dim,
        "hidden_size": H,  # width of each state tensor
        "num_layers": L,
        "ensemble": cfg.ensemble,  # K member networks of hidden_size / K each, side by side
        "num_classes": cfg.num_classes,
        "labels": checkpoint["labels"],
        "description": checkpoint.get("description") or DESCRIPTIONS.get(checkpoint["dataset"], ""),
        "feature_names": checkpoint.get("feature_names") or FEATURES.get(checkpoint["dataset"], []),
        "inputs": [
            {"name": "x", "datatype": fp32, "shape": [-1, -1, cfg.input_dim]},
            *({"name": n, "datatype": fp32, "shape": [L, -1, H]} for n in state_inputs),
            {"name": "lengths", "datatype": "INT64", "shape": [-1]},
        ],
        "outputs": [
            {"name": "logits", "datatype": fp32, "shape": [-1, -1, cfg.num_classes]},
            *({"name": n, "datatype": fp32, "shape": [L, -1, H]} for n in state_outputs),
        ],
        "state": [{"input": i, "output": o, "shape": [L, H]} for i, o in zip(state_inputs, state_outputs, strict=True)],
        "lengths_input": "lengths",
        "logits_output": "logits",
        "metrics": {
            "dataset": checkpoint["dataset"],
            "test_accuracy": metrics["test_accuracy"],
            "test_sequences": metrics["split"]["test"],
            "per_class_accuracy": metrics["per_class_accuracy"],
        },
        "example": checkpoint.get("example") or example_sequence(checkpoint["dataset"]),
        "parameters": model.num_parameters(),
        "opset": OPSET,
        "exported_with": f"torch {torch.__version__}",
        "sha256": sha256(onnx_path),
    }


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def entry_folder(repository: str | Path, name: str, version: int, replace: bool = False) -> Path:
    """<repository>/<name>/<version>, for a name that is one folder (no path, no '..') and a version the server
    serves (1 to 18 digits), that holds no model yet unless `replace`: servers never take other weights under a
    version number they served, so overwriting one by mistake breaks its next load."""
    if not MODEL_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"model name {name[:60]!r}: letters, digits, '.', '_' and '-', one folder, not '..'")
    if version_number(str(version)) is None:  # the repository's own rule, so the server serves what it writes
        raise ValueError(f"version {version}: a whole number from 1 to 18 digits")
    entry = Path(repository) / name / str(version)
    if not replace and any((entry / file).exists() for file in ("model.onnx", "config.json")):
        raise ValueError(
            f"{entry} already holds a model: export the new weights as another version (servers refuse other "
            "weights under a version they served), or pass --replace for a version no server has loaded"
        )
    return entry


def export_checkpoint(
    checkpoint_path: str | Path,
    repository: str | Path,
    name: str,
    version: int = 1,
    replace: bool = False,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """checkpoint.pt -> <repository>/<name>/<version>/{model.onnx, config.json}; returns the entry folder. The
    entry is written in a staging folder, and `check` (given it) runs there: a graph that fails never reaches
    the repository, where a rerun would have found the version taken."""
    entry = entry_folder(repository, name, version, replace)
    model, checkpoint = load_checkpoint(checkpoint_path)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        export_onnx(model, staged / "model.onnx")
        config = model_config(model, checkpoint, name, version, staged / "model.onnx")
        (staged / "config.json").write_text(config_text(config))
        if check is not None:
            check(staged)
        entry.mkdir(parents=True, exist_ok=True)  # only once there is a graph: no empty entry stops a server
        for file in ("model.onnx", "config.json"):  # the config last: an entry is whole once it is there
            part = entry / f".{file}.part"  # copied when the staging folder is on another file system, then
            shutil.move(staged / file, part)  # renamed in one step: a poll never reads half a file
            os.replace(part, entry / file)
    return entry
