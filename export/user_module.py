"""Export the user's own PyTorch recurrent classifier into the model repository.

The module contract:

    forward(x, state) -> (logits, new_state)
      x          float32 [B, T, D], frames as the caller sends them
      state      None (zeros), or as torch.nn.LSTM takes it, a tuple (h, c) of [L, B, H], or as
                 torch.nn.GRU takes it, h [L, B, H]
      logits     float32 [B, T, C], one row of class logits per frame
      new_state  the state after the last frame, in the same form

Each row of the batch must be computed alone (no batch statistics) and each frame's logits from that frame
and the frames before it only: that is what makes a streamed session equal to classifying the whole
sequence. The export proves it on the ONNX graph with onnxruntime (parity with PyTorch on random and on the
user's sequences, chunked streaming equals one call, batch independence, causality, any B and T) and
refuses a module that fails, saying which property failed and by how much.

    from lstm_serve.export.user_module import export_module
    export_module(my_module, labels=["walk", "run"], feature_names=["ax", "ay", "az"],
                  repository="models", name="gait", version=1)
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from lstm_serve.export.onnx_export import OPSET, config_text, entry_folder, sha256

ATOL = 1e-4


class ContractError(ValueError):
    """The module or its graph breaks the contract; the message says which property and by how much."""


@dataclass(frozen=True)
class Signature:
    input_dim: int
    num_classes: int
    state_names: tuple[str, ...]  # ("h0", "c0") for an LSTM's state, ("h0",) for a GRU's
    layers: int
    hidden: int

    @property
    def cell(self) -> str:
        return "lstm" if len(self.state_names) == 2 else "gru"

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("logits", *(name.replace("0", "n") for name in self.state_names))


class Exportable(nn.Module):
    """The user's module with its state as separate tensors, as the ONNX graph takes and returns them."""

    def __init__(self, module: nn.Module, lstm_state: bool) -> None:
        super().__init__()
        self.module, self.lstm_state = module, lstm_state

    def forward(self, x: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, new_state = self.module(x, (state[0], state[1]) if self.lstm_state else state[0])
        return (logits, *(new_state if self.lstm_state else (new_state,)))


def probe(module: nn.Module, input_dim: int, num_classes: int) -> Signature:
    """Run the module once on zeros-state input and read its shapes; ContractError if they break the contract."""
    x = torch.randn(2, 5, input_dim)
    try:
        with torch.no_grad():
            result = module(x, None)
    except Exception as error:
        said = next((line for line in reversed(str(error).splitlines()) if line.strip()), "").strip()[:300]
        raise ContractError(f"forward(x [2, 5, {input_dim}], None) failed: {type(error).__name__}: {said}") from None
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ContractError("forward must return (logits, new_state)")
    logits, state = result
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, 5, num_classes):
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ContractError(f"logits must be [B, T, C] = [2, 5, {num_classes}] for {num_classes} labels; got {shape}")
    tensors = state if isinstance(state, tuple) else (state,)
    if len(tensors) not in (1, 2) or not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in tensors):
        raise ContractError("new_state must be (h, c) as torch.nn.LSTM returns it, or h as torch.nn.GRU does")
    layers, batch, hidden = tensors[0].shape
    shapes = [list(t.shape) for t in tensors]
    if batch != 2 or any(t.shape[:2] != (layers, 2) for t in tensors):
        raise ContractError(f"state tensors must be [L, B, H] with B=2 here; got {shapes}")
    if any(t.shape[2] != hidden for t in tensors):  # nn.LSTM(proj_size=P): h is [L, B, P], c is [L, B, H]
        raise ContractError(f"h and c must have one hidden size H (no proj_size); got {shapes}")
    names = ("h0", "c0") if len(tensors) == 2 else ("h0",)
    return Signature(input_dim, num_classes, names, int(layers), int(hidden))


def export_graph(module: nn.Module, signature: Signature, path: Path, opset: int = OPSET) -> None:
    wrapper = Exportable(module, signature.cell == "lstm").eval()
    B, T = 3, 5  # >= 2, or the exporter bakes them in as static dims
    state = [torch.zeros(signature.layers, B, signature.hidden) for _ in signature.state_names]
    axes = {
        "x": {0: "batch", 1: "time"},
        "logits": {0: "batch", 1: "time"},
        **{name: {1: "batch"} for name in signature.state_names + signature.outputs[1:]},
    }
    for op in (torch.ops.aten.lstm.input, torch.ops.aten.gru.input):  # see onnx_export.export_onnx
        cache = getattr(op, "_dispatch_cache", None)
        if cache is not None:
            cache.clear()
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (torch.randn(B, T, signature.input_dim), *state),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["x", *signature.state_names],
            output_names=list(signature.outputs),
            dynamic_axes=axes,
        )
    module.eval()  # the exporter leaves modules in training mode
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


class Checker:
    """The contract, checked on the exported graph in onnxruntime against the PyTorch module."""

    def __init__(self, module: nn.Module, signature: Signature, path: Path) -> None:
        self.module, self.signature = module, signature
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.report: list[str] = []

    def graph(self, x: np.ndarray, state: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        s = self.signature
        state = state or [np.zeros((s.layers, len(x), s.hidden), np.float32) for _ in s.state_names]
        feeds = {"x": x.astype(np.float32), **dict(zip(s.state_names, state, strict=True))}
        return self.session.run(list(s.outputs), feeds)

    def torch(self, x: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            logits, state = self.module(torch.from_numpy(x.astype(np.float32)), None)
        tensors = state if isinstance(state, tuple) else (state,)
        return [logits.numpy(), *(t.numpy() for t in tensors)]

    def run(self, sequences: Sequence[np.ndarray], scale: np.ndarray) -> list[str]:
        rng = np.random.default_rng(0)
        D = self.signature.input_dim
        shapes = [(1, 1), (1, 7), (4, 9), (7, 3), (2, 40)]
        random = [rng.normal(size=(B, T, D)).astype(np.float32) * scale for B, T in shapes]
        self.parity(random + [seq[None] for seq in sequences])
        self.report.append(f"any B and T: shapes {shapes} and {len(sequences)} given sequences ran")
        self.batch_independence(random[2])
        self.causality(random[4])
        self.streaming(random[4][0], [5, 1, 13, 21])
        return self.report

    def parity(self, batches: list[np.ndarray]) -> None:
        worst = 0.0
        for x in batches:
            for name, ours, theirs in zip(self.signature.outputs, self.graph(x), self.torch(x), strict=True):
                for side, values in (("PyTorch", theirs), ("onnxruntime", ours)):
                    if not np.isfinite(values).all():
                        raise ContractError(
                            f"parity: {side}'s {name} holds NaN or Inf for input {list(x.shape)}; a served model "
                            "must give finite outputs for finite frames"
                        )
                diff = gap(ours, theirs)
                worst = max(worst, diff)
                if not diff <= ATOL:
                    raise ContractError(
                        f"parity: onnxruntime and PyTorch differ by {diff:.2e} (> {ATOL}) on {name} for input "
                        f"{list(x.shape)}"
                    )
        self.report.append(
            f"parity: max |onnxruntime - PyTorch| = {worst:.2e} (relative to values over 1) over {len(batches)} inputs"
        )

    def streaming(self, sequence: np.ndarray, chunks: list[int]) -> None:
        whole = self.graph(sequence[None])
        state, logits, start = None, [], 0
        for size in chunks:
            out = self.graph(sequence[None, start : start + size], state)
            logits.append(out[0])
            state, start = out[1:], start + size
        diff = max(
            gap(np.concatenate(logits, axis=1), whole[0]),
            *(gap(a, b) for a, b in zip(state or [], whole[1:], strict=True)),
        )
        if not diff <= ATOL:
            raise ContractError(
                f"streaming: the sequence fed in chunks {chunks} differs from one call by {diff:.2e} (> {ATOL}); "
                "the state returned must be all the module carries between frames"
            )
        self.report.append(f"streaming: chunks {chunks} equal one call within {diff:.2e}")

    def batch_independence(self, x: np.ndarray) -> None:
        """Every row's outputs in the batch equal that row alone, and row 0's stay when the others change: from
        zero state (a classify batch) and from each row's own state (the server batches steps of many sessions,
        and a module can mix states across the batch that are all zeros alike)."""
        s, rng = self.signature, np.random.default_rng(1)
        given = [rng.normal(0, 0.5, (s.layers, len(x), s.hidden)).astype(np.float32) for _ in s.state_names]
        for state, start in ((None, "zero state"), (given, "their own states")):
            changed, changed_state = x.copy(), [a.copy() for a in state or []]
            changed[1:] = changed[1:] * 3 + 1
            for a in changed_state:
                a[:, 1:] = a[:, 1:] * -2 + 0.25
            batched = self.graph(x, state)  # logits [B, T, C], states [L, B, H]
            # (row, outputs where that row's result is row 0, tolerance): the batch with the others changed (the
            # same batch size: the same kernels, exact), then each row alone (another batch size may take other
            # kernels)
            pairs = [(0, self.graph(changed, changed_state or None), 1e-6)] + [
                (row, self.graph(x[row : row + 1], [a[:, row : row + 1] for a in state] if state else None), ATOL)
                for row in range(len(x))
            ]
            for row, other, tolerance in pairs:
                diff = max(
                    gap(batched[0][row], other[0][0]),
                    *(gap(a[:, row], b[:, 0]) for a, b in zip(batched[1:], other[1:], strict=True)),
                )
                if not diff <= tolerance:
                    raise ContractError(
                        f"batch independence: from {start}, row {row}'s outputs change by {diff:.2e} with the "
                        "other rows of its batch; each sequence must be computed alone (no batch statistics, no "
                        "mixing across the batch, its state taken as [L, B, H])"
                    )
        self.report.append("batch independence: other rows never change a row's outputs, from zero or given states")

    def causality(self, x: np.ndarray) -> None:
        T, cut = x.shape[1], x.shape[1] // 2
        changed = x.copy()
        changed[:, cut:] = changed[:, cut:] * 3 + 1
        diff = gap(self.graph(x)[0][:, :cut], self.graph(changed)[0][:, :cut])
        if not diff <= 1e-6:
            raise ContractError(
                f"causality: changing frames from t={cut} on changed the logits before t={cut} by {diff:.2e}; "
                "a frame's logits may depend only on it and the frames before it (no bidirectional layers)"
            )
        self.report.append(f"causality: frames after t never change logits up to t (T={T})")


def gap(a: np.ndarray, b: np.ndarray) -> float:
    """The largest |a - b|, relative to the largest value where that passes 1 (float32 keeps 7 digits: logits
    near 1e4 differ by 1e-3 between two runtimes from rounding alone, and an absolute tolerance refused such
    modules); infinite where either is not finite (a NaN difference passes every `>` test)."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    if not a.size:
        return 0.0
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.abs(a - b).max() / max(1.0, np.abs(a).max(), np.abs(b).max()))


def export_module(
    module: nn.Module,
    labels: Sequence[str],
    repository: str | Path,
    name: str,
    version: int = 1,
    input_dim: int | None = None,
    feature_names: Sequence[str] | None = None,
    description: str = "",
    example: dict[str, Any] | None = None,
    check_sequences: Sequence[np.ndarray] = (),
    replace: bool = False,
) -> tuple[Path, list[str]]:
    """Export `module` to <repository>/<name>/<version>/{model.onnx, config.json} after proving the contract.
    `input_dim` defaults to the number of feature names; `example` ({"label", "frames"}: a real sequence and
    its true label, for callers to try) and `check_sequences` (real sequences, checked for parity too) are
    optional; `replace` overwrites a version folder that holds a model.
    Returns the entry folder and what was checked; ContractError if the module breaks the contract."""
    labels = [str(label) for label in labels]
    if len(set(labels)) < 2 or len(set(labels)) != len(labels) or not all(label.strip() for label in labels):
        raise ContractError("labels must name at least two classes, each once, none empty")
    if example is not None:
        example = {**example, "label": str(example.get("label"))}  # as the labels are written: text
        if example["label"] not in labels:
            raise ContractError(f"the example's label {example['label'][:40]!r} is not one of the labels")
    try:
        entry = entry_folder(repository, name, version, replace)
    except ValueError as error:
        raise ContractError(str(error)) from None
    if input_dim is None:
        if not feature_names:
            raise ContractError("give input_dim or feature_names")
        input_dim = len(feature_names)
    names = list(feature_names) if feature_names else [f"f{k}" for k in range(input_dim)]
    if len(names) != input_dim:
        raise ContractError(f"{len(names)} feature names for input_dim={input_dim}")
    sequences = [np.asarray(seq, np.float32) for seq in check_sequences]
    if any(seq.ndim != 2 or seq.shape[1] != input_dim for seq in sequences):
        raise ContractError(f"check sequences must be [T, {input_dim}]")
    module = module.eval()
    scale = np.std(np.concatenate(sequences), axis=0) if sequences else np.ones(input_dim, np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model.onnx"
        try:
            signature = probe(module, input_dim, len(labels))
            export_graph(module, signature, staged)
            report = Checker(module, signature, staged).run(sequences, np.maximum(scale, 1e-3).astype(np.float32))
        except ContractError:
            raise
        except Exception as error:  # torch's or onnxruntime's own words, on a module the checks did not foresee
            first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            raise ContractError(
                f"the module could not be exported and run as the contract asks ({type(error).__name__}: {first}); "
                "it must take (x [B, T, D], state) and use the state it is given"
            ) from None
        entry.mkdir(parents=True, exist_ok=True)
        staged.replace(entry / "model.onnx")
    config = entry_config(module, signature, labels, names, description, example, name, version, entry)
    (entry / "config.json").write_text(config_text(config))
    return entry, report


def entry_config(
    module: nn.Module,
    signature: Signature,
    labels: list[str],
    feature_names: list[str],
    description: str,
    example: dict[str, Any] | None,
    name: str,
    version: int,
    entry: Path,
) -> dict[str, Any]:
    s, fp32 = signature, "FP32"
    state_shape = [s.layers, -1, s.hidden]
    return {
        "name": name,
        "version": version,
        "cell": s.cell,
        "source": f"user module {type(module).__module__}.{type(module).__qualname__}",
        "input_dim": s.input_dim,
        "hidden_size": s.hidden,
        "num_layers": s.layers,
        "num_classes": s.num_classes,
        "labels": labels,
        "description": description,
        "feature_names": feature_names,
        "inputs": [
            {"name": "x", "datatype": fp32, "shape": [-1, -1, s.input_dim]},
            *({"name": n, "datatype": fp32, "shape": state_shape} for n in s.state_names),
        ],
        "outputs": [
            {"name": "logits", "datatype": fp32, "shape": [-1, -1, s.num_classes]},
            *({"name": n, "datatype": fp32, "shape": state_shape} for n in s.outputs[1:]),
        ],
        "state": [
            {"input": i, "output": o, "shape": [s.layers, s.hidden]}
            for i, o in zip(s.state_names, s.outputs[1:], strict=True)
        ],
        "logits_output": "logits",
        "metrics": {},
        "example": example,
        "parameters": sum(p.numel() for p in module.parameters()),
        "opset": OPSET,
        "exported_with": f"torch {torch.__version__}",
        "sha256": sha256(entry / "model.onnx"),
    }


def load_factory(spec: str) -> nn.Module:
    """`package.module:factory` -> the module the factory returns (a class is a factory too)."""
    import importlib

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ContractError(f"--module {spec!r} must be package.module:factory")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ContractError(f"--module {spec}: {error}") from None
    built = factory()
    if not isinstance(built, nn.Module):
        raise ContractError(f"--module {spec} returned a {type(built).__name__}, not a torch.nn.Module")
    return built
