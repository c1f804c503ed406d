"""onnxruntime for one model: pads a batch of variable-length items into one call and splits it back.

An item is a chunk of frames plus the recurrent state it starts from (zeros for a fresh sequence).
A classify request is a step from zero state: one graph, one path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from lstm_serve.core.repository import ModelEntry

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
SHORT_CHUNK_FRAMES = 64  # chunks up to this long get a kept lengths array when they run alone


def native_run(session: ort.InferenceSession) -> Any:
    """The native session's run, or None where this onnxruntime has none to reach."""
    return getattr(getattr(session, "_sess", None), "run", None)


@dataclass(slots=True)
class Item:
    frames: np.ndarray  # (T, D) float32
    state: list[np.ndarray] | None  # one (L, H) array per state tensor; None = zeros
    keep_state: bool = True  # False: the caller needs no state after it (a classify), so none is copied out


@dataclass(slots=True)
class Output:
    logits: np.ndarray  # (T, C) per-step logits of this item's frames
    probabilities: np.ndarray  # (T, C) their softmax, computed for the whole batch at once
    state: list[np.ndarray]  # the state after its last frame, one (L, H) array per state tensor ([]: not kept)
    class_id: int  # the most likely class after its last frame


def choose_providers(setting: str) -> list[str]:
    available = ort.get_available_providers()
    if setting == "cpu":
        return [CPU]
    if setting == "cuda":
        if CUDA not in available:
            raise RuntimeError(
                f"providers=cuda but onnxruntime offers only {available}: install onnxruntime-gpu "
                "(pip install 'lstm-serve[gpu]') on a machine with an NVIDIA GPU, or use providers=auto|cpu"
            )
        return [CUDA, CPU]
    return [CUDA, CPU] if CUDA in available else [CPU]


def session_options(intra_op_threads: int = 1) -> ort.SessionOptions:
    """How the server runs a graph; the model report measures latency with the same options."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # without this, idle onnxruntime threads spin and burn the cores the HTTP server needs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    return options


class OnnxRunner:
    def __init__(self, entry: ModelEntry, providers: str = "auto", intra_op_threads: int = 1) -> None:
        self.entry = entry
        options = session_options(intra_op_threads)
        self.session = ort.InferenceSession(str(entry.onnx_path), options, providers=choose_providers(providers))
        if providers == "cuda" and self.session.get_providers()[0] != CUDA:
            raise RuntimeError(f"providers=cuda but onnxruntime fell back to {self.session.get_providers()}")
        config = entry.config
        self.input_dim = entry.input_dim
        self.frames_input = entry.frames_input
        self.lengths_input = entry.lengths_input
        self.logits_output = config.get("logits_output", config["outputs"][0]["name"])
        self.state_specs = entry.state_specs
        self.output_names = [self.logits_output] + [s["output"] for s in self.state_specs]
        self.zero_state = [np.zeros((s["shape"][0], 1, s["shape"][1]), np.float32) for s in self.state_specs]
        for zeros in self.zero_state:
            zeros.flags.writeable = False  # fed to every fresh item of one: nothing may write it
        # the lengths input of a batch of one chunk of T frames, for the short chunks of a stream
        self.one_length = [np.array([t], np.int64) for t in range(SHORT_CHUNK_FRAMES + 1)]
        for lengths in self.one_length:
            lengths.flags.writeable = False
        # InferenceSession.run checks the feeds' names against the graph's in Python on every call; these
        # feeds are built from the names check_contract verified, so calls go to the native session. An
        # execution provider's failure still goes through run, which falls back to the CPU as it does.
        self.native_run = native_run(self.session)

    def check_contract(self) -> None:
        """The graph takes and gives what its config.json promises (RuntimeError saying what it lacks), and
        one small batch from zero state and from a given state comes back in the promised shapes."""
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        wanted_in = {self.frames_input, *(s["input"] for s in self.state_specs)}
        if self.lengths_input:
            wanted_in.add(self.lengths_input)
        if wanted_in - inputs or set(self.output_names) - outputs:
            missing = sorted((wanted_in - inputs) | (set(self.output_names) - outputs))
            has = sorted(inputs | outputs)
            raise RuntimeError(f"the graph lacks {missing} that its config.json names (it has {has})")
        C = len(self.entry.labels)
        frames = np.zeros((3, self.input_dim), np.float32)
        zero = [np.zeros(s["shape"], np.float32) for s in self.state_specs]
        for out in self.run([Item(frames, None), Item(frames[:2], zero)]):
            if out.logits.shape[1:] != (C,) or not np.isfinite(out.probabilities).all():
                raise RuntimeError(f"the graph's logits are {list(out.logits.shape)} per item, not [T, {C}] labels")
            shapes = [list(s.shape) for s in out.state]
            if shapes != [list(s["shape"]) for s in self.state_specs]:
                raise RuntimeError(f"the graph's state comes back as {shapes}, not as its config.json's state")

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def run(self, items: list[Item]) -> list[Output]:
        """One onnxruntime call for all items: right-pad to the longest, pass lengths, split back. A graph
        without a lengths input (an exported user module) gets one call per length instead: padding would
        run its state through the pad frames."""
        if len(items) == 1:
            return [self.run_one(items[0])]
        if not self.lengths_input and len({len(item.frames) for item in items}) > 1:
            return self.run_by_length(items)
        B = len(items)
        lengths = np.fromiter((len(item.frames) for item in items), np.int64, B)
        T = int(lengths.max())
        if (lengths == T).all():  # a stream's steps: one chunk length, nothing to pad
            x = np.stack([item.frames for item in items], dtype=np.float32)
        else:
            x = np.zeros((B, T, self.input_dim), np.float32)
            for row, item in enumerate(items):
                x[row, : lengths[row]] = item.frames
        feeds: dict[str, np.ndarray] = {self.frames_input: x}
        if self.lengths_input:
            feeds[self.lengths_input] = lengths
        fresh = all(item.state is None for item in items)  # a classify batch: zeros, not 64 stacked copies
        for k, spec in enumerate(self.state_specs):
            if fresh:
                feeds[spec["input"]] = np.zeros((spec["shape"][0], B, spec["shape"][1]), np.float32)
                continue
            zeros = self.zero_state[k][:, 0]
            states_k = [zeros if item.state is None else item.state[k] for item in items]
            feeds[spec["input"]] = np.stack(states_k, axis=1, dtype=np.float32)
        logits, *states = self.infer(feeds)
        if logits.shape[0] != B or any(s.shape[1] != B for s in states):
            raise RuntimeError(f"onnxruntime returned {logits.shape[0]} rows for {B} items")
        # softmax and argmax for the whole batch at once, not row by row
        probabilities = softmax(logits)
        class_ids = probabilities[np.arange(B), lengths - 1].argmax(axis=1).tolist()
        # each row's state is copied out (a view would keep the whole batch's arrays alive with the session)
        by_row = [s.transpose(1, 0, 2) for s in states]
        return [
            Output(
                logits[row, :length],
                probabilities[row, :length],
                [s[row].copy() for s in by_row] if item.keep_state else [],
                class_id,
            )
            for row, (item, length, class_id) in enumerate(zip(items, lengths.tolist(), class_ids, strict=True))
        ]

    def infer(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.native_run is not None:
            try:
                return self.native_run(self.output_names, feeds, None)
            except ort.capi.onnxruntime_pybind11_state.EPFail:
                pass
        outputs = self.session.run(self.output_names, feeds)
        self.native_run = native_run(self.session)  # a fallback replaced the native session: follow it
        return outputs

    def run_one(self, item: Item) -> Output:
        """A batch of one, the common case at low load: no padding, its arrays fed as views."""
        T = len(item.frames)
        feeds: dict[str, np.ndarray] = {self.frames_input: np.ascontiguousarray(item.frames, np.float32)[None]}
        if self.lengths_input:
            feeds[self.lengths_input] = self.one_length[T] if len(self.one_length) > T else np.array([T], np.int64)
        state = item.state
        for k, spec in enumerate(self.state_specs):
            feeds[spec["input"]] = (
                self.zero_state[k] if state is None else np.ascontiguousarray(state[k], np.float32)[:, None]
            )
        logits, *states = self.infer(feeds)
        if logits.shape[0] != 1:
            raise RuntimeError(f"onnxruntime returned {logits.shape[0]} rows for 1 item")
        probabilities = softmax(logits[0, :T])
        return Output(logits[0, :T], probabilities, [s[:, 0] for s in states], int(probabilities[-1].argmax()))

    def run_by_length(self, items: list[Item]) -> list[Output]:
        groups: dict[int, list[int]] = {}
        for row, item in enumerate(items):
            groups.setdefault(len(item.frames), []).append(row)
        outputs: list[Output | None] = [None] * len(items)
        for rows in groups.values():
            for row, output in zip(rows, self.run([items[r] for r in rows]), strict=True):
                outputs[row] = output
        return [output for output in outputs if output is not None]


def softmax(logits: np.ndarray) -> np.ndarray:
    # the ufuncs' reduce directly: ndarray.max and .sum go through numpy's Python wrappers first
    z = np.subtract(logits, row_max(logits))
    np.exp(z, out=z)
    z /= np.add.reduce(z, axis=-1, keepdims=True)
    return z


WIDE_ROWS = 256  # from this many rows on, a row's maximum is taken class by class
FEW_CLASSES = 16  # and only up to this many classes: past them numpy's own reduce is no slower


def row_max(logits: np.ndarray) -> np.ndarray:
    """The maximum of each row (the last axis), keeping it. numpy reduces a short last axis row by row, ~80 ns
    a row: a classify batch's (64, T, 9) logits took 120 us of the interpreter lock that the event loop waits
    for. Many rows go class by class instead, one ufunc call per class over all rows (~20 us): a maximum is
    the same whichever the order (but for the sign of a zero maximum, which changes no exp of the difference),
    so the softmax is the same to the bit."""
    classes = logits.shape[-1]
    if classes < 2 or classes > FEW_CLASSES or logits.size < WIDE_ROWS * classes:
        return np.maximum.reduce(logits, axis=-1, keepdims=True)
    peak = np.maximum(logits[..., 0:1], logits[..., 1:2])
    for c in range(2, classes):
        np.maximum(peak, logits[..., c : c + 1], out=peak)
    return peak
