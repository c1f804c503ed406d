"""An Open Inference Protocol request, decoded: its tensors as checked sequences, the outputs it wants, and
the sequence it belongs to. No model runtime here: a decode process imports this module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lstm_serve.core.inputs import Chunk, Limits, check_sequence_count, chunk_from_array
from lstm_serve.core.repository import ModelEntry
from lstm_serve.errors import InvalidInput
from lstm_serve.protocols.oip_schemas import InferenceRequest
from lstm_serve.protocols.tensors import DTYPES, decompress, read_request

PROBABILITIES, LOGITS = "probabilities", "logits"
DATATYPE_OF = {np.dtype(dtype): name for name, dtype in DTYPES.items()}
MAX_SEQUENCE_ID_CHARS = 256


def input_names(entry: ModelEntry) -> tuple[str, str]:
    return entry.frames_input, entry.lengths_input or "lengths"


def datatype_of(array: np.ndarray) -> str:
    return DATATYPE_OF.get(array.dtype, str(array.dtype))


def model_sequences(entry: ModelEntry, limits: Limits, tensors: dict[str, np.ndarray]) -> list[Chunk]:
    """x [B, T, D] FP32 and optional lengths [B] -> B checked chunks of their own lengths."""
    x_name, lengths_name = input_names(entry)
    D = entry.input_dim
    takes = f"model {entry.name!r} takes {x_name!r} FP32 [B, T, {D}] and optionally {lengths_name!r} INT64 [B]"
    unknown = sorted(set(tensors) - {x_name, lengths_name})
    if unknown:
        raise InvalidInput(f"unexpected inference input {unknown[0]!r}: {takes}")
    if x_name not in tensors:
        raise InvalidInput(f"input {x_name!r} is missing: {takes}")
    x = tensors[x_name]
    if x.dtype != np.float32:
        raise InvalidInput(f"input {x_name!r} has datatype {datatype_of(x)}, but {takes}")
    if x.ndim != 3 or x.shape[2] != D or 0 in x.shape:
        raise InvalidInput(f"input {x_name!r} has shape {list(x.shape)}, but {takes} (B, T >= 1)")
    batch, steps, _ = x.shape
    check_sequence_count(batch, limits)
    lengths = np.full(batch, steps)
    if lengths_name in tensors:
        given = tensors[lengths_name]
        if given.dtype not in (np.int64, np.int32):
            raise InvalidInput(f"input {lengths_name!r} has datatype {datatype_of(given)}; it takes INT64 (or INT32)")
        if given.shape != (batch,) or given.min() < 1 or given.max() > steps:
            raise InvalidInput(f"input {lengths_name!r} must hold {batch} lengths between 1 and T={steps}")
        lengths = given
    return [chunk_from_array(x[b, : lengths[b]], entry, limits, f"{x_name}[{b}]") for b in range(batch)]


@dataclass(frozen=True)
class WantedOutput:
    name: str
    binary: bool
    classes: int  # > 0: the classification extension's top-k as BYTES "value:index:label"


def wanted_outputs(request: InferenceRequest, entry: ModelEntry) -> list[WantedOutput]:
    binary_default = request.parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInput("parameters.binary_data_output must be a boolean")
    if not request.outputs:  # none named: all of them (Triton reads an empty list the same way)
        return [WantedOutput(name, binary_default, 0) for name in (PROBABILITIES, LOGITS)]
    wanted: list[WantedOutput] = []
    C = len(entry.labels)
    for out in request.outputs:
        if any(earlier.name == out.name for earlier in wanted):
            raise InvalidInput(f"output {out.name!r} is asked for twice")
        if out.name not in (PROBABILITIES, LOGITS):
            raise InvalidInput(
                f"unexpected inference output {out.name!r} for model {entry.name!r}; it has "
                f"{PROBABILITIES!r} and {LOGITS!r}"
            )
        binary = out.parameters.get("binary_data", binary_default)
        classes = out.parameters.get("classification", 0)
        if not isinstance(binary, bool):
            raise InvalidInput(f"output {out.name!r}: parameters.binary_data must be a boolean")
        if not isinstance(classes, int) or isinstance(classes, bool) or not 0 <= classes <= C:
            raise InvalidInput(f"output {out.name!r}: classification must be a whole number from 1 to {C} classes")
        wanted.append(WantedOutput(out.name, binary, classes))
    return wanted


@dataclass(frozen=True)
class Sequence:
    """Triton's sequence extension: which sequence a request belongs to, and whether it starts or ends it."""

    id: int | str
    start: bool
    end: bool

    def session_id(self, model: str, owner: str) -> str:
        """The store key: per protocol, per owner (API key), per model; ints and strings apart."""
        kind = "n" if isinstance(self.id, int) else "s"
        return f"oip:{owner}:{model}:{kind}:{self.id}"

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any]) -> Sequence | None:
        sequence_id = parameters.get("sequence_id", 0)
        start, end = parameters.get("sequence_start", False), parameters.get("sequence_end", False)
        if not isinstance(start, bool) or not isinstance(end, bool):
            raise InvalidInput("parameters.sequence_start and sequence_end must be booleans")
        if isinstance(sequence_id, bool) or not isinstance(sequence_id, int | str):
            raise InvalidInput("parameters.sequence_id must be an unsigned integer or a string")
        if sequence_id in (0, ""):
            if start or end:
                raise InvalidInput("sequence_start or sequence_end needs a sequence_id (not 0 or empty)")
            return None
        if isinstance(sequence_id, int) and not 0 < sequence_id < 2**64:
            raise InvalidInput(f"sequence_id {sequence_id} is not an unsigned 64-bit integer")
        if isinstance(sequence_id, str) and len(sequence_id) > MAX_SEQUENCE_ID_CHARS:
            raise InvalidInput(f"a string sequence_id is limited to {MAX_SEQUENCE_ID_CHARS} characters")
        return cls(sequence_id, start, end)


def check_names_model(request: InferenceRequest, entry: ModelEntry) -> None:
    """A body may repeat the path's model and version (Triton's binary-data example does); not name others."""
    if request.model_name is not None and request.model_name != entry.name:
        raise InvalidInput(f"the body names model {request.model_name[:80]!r}, the path {entry.name!r}")
    if request.model_version not in (None, "", str(entry.version)):
        raise InvalidInput(f"the body names version {request.model_version[:20]!r}, the path v{entry.version}")


@dataclass(frozen=True)
class Inference:
    """A decoded inference request: its sequences, the outputs it wants, and the sequence it belongs to."""

    request: InferenceRequest
    chunks: list[Chunk]
    wanted: list[WantedOutput]
    sequence: Sequence | None
    steps: int  # T of the input x: per-step outputs are [B, T, ...] whatever the lengths


def decode_inference(
    body: bytes, encoding: str | None, header_length: str | None, entry: ModelEntry, limits: Limits
) -> Inference:
    """An inference body -> its checked sequences, wanted outputs and sequence (in a decode process when large)."""
    body = decompress(body, encoding, limits)
    request, tensors = read_request(body, header_length)
    check_names_model(request, entry)
    chunks = model_sequences(entry, limits, tensors)
    wanted = wanted_outputs(request, entry)
    sequence = Sequence.from_parameters(request.parameters)
    if sequence is not None and len(chunks) != 1:
        raise InvalidInput(f"a sequence request carries one sequence: x must be [1, T, D], not B={len(chunks)}")
    return Inference(request, chunks, wanted, sequence, tensors[input_names(entry)[0]].shape[1])
