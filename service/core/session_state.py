"""A session's recurrent state as a portable document, and the checks an imported one must pass.

    {"model": "japanese-vowels", "version": 1, "steps": 17,
     "state": {"h0": "<base64 of little-endian float32>", "c0": "..."},
     "shape": {"h0": [1, 64], "c0": [1, 64]},
     "sha256": "<hex>"}

`sha256` is over `model\\nversion\\nsteps\\n`, then for each tensor in the model's state order its name, a
newline, and its raw bytes: a state damaged on the way (or edited without its checksum) is refused, as is
one whose tensors do not fit the model. It is a checksum, not a signature: a caller who recomputes it can
start their own session from any state that fits, which is theirs to do (it reaches no one else's). The
state is the whole of what the model carries between chunks, so a session imported on any server with the
same model version continues exactly as the original would.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lstm_serve.core.repository import ModelEntry
from lstm_serve.errors import InvalidInput
from lstm_serve.state.sessions import SessionRecord


@dataclass(frozen=True)
class Exported:
    steps: int
    state: tuple[np.ndarray, ...]  # one (L, H) float32 array per state tensor, in the model's order


def names_and_shapes(entry: ModelEntry) -> list[tuple[str, tuple[int, ...]]]:
    return [(spec["input"], tuple(spec["shape"])) for spec in entry.state_specs]


def checksum(model: str, version: int, steps: int, tensors: list[tuple[str, bytes]]) -> str:
    digest = hashlib.sha256(f"{model}\n{version}\n{steps}\n".encode())
    for name, data in tensors:
        digest.update(name.encode() + b"\n" + data)
    return digest.hexdigest()


def export(entry: ModelEntry, record: SessionRecord) -> dict[str, Any]:
    tensors = []
    for i, (name, shape) in enumerate(names_and_shapes(entry)):
        array = np.zeros(shape, np.float32) if record.state is None else record.state[i]
        tensors.append((name, np.ascontiguousarray(array, "<f4").tobytes()))
    return {
        "model": entry.name,
        "version": entry.version,
        "steps": record.steps,
        "state": {name: base64.b64encode(data).decode() for name, data in tensors},
        "shape": {name: list(shape) for name, shape in names_and_shapes(entry)},
        "sha256": checksum(entry.name, entry.version, record.steps, tensors),
    }


FIELDS = ("model", "version", "steps", "state", "shape", "sha256")


def check(entry: ModelEntry, document: Any) -> Exported:
    """The state in an exported document, if it is for this model and version and intact; InvalidInput
    (422) saying what is wrong otherwise."""
    if not isinstance(document, dict):
        raise InvalidInput("state must be the object GET /v1/sessions/{id}/state returned")
    missing = [k for k in FIELDS if k not in document]
    if missing:
        raise InvalidInput(f"state lacks {', '.join(missing)}")
    unknown = sorted(str(k)[:40] for k in document if k not in FIELDS)
    if unknown:
        raise InvalidInput(f"state has fields {unknown[:4]} that an exported state does not have")
    version, steps = document["version"], document["steps"]
    if document["model"] != entry.name:
        raise InvalidInput(f"state.model is {str(document['model'])[:80]!r}, not {entry.name!r}")
    if not isinstance(version, int) or isinstance(version, bool):
        raise InvalidInput(f"state.version must be a whole number, as the export writes it, not {str(version)[:20]!r}")
    if version != entry.version:
        raise InvalidInput(
            f"state is of {entry.name} v{str(version)[:20]}; this server serves v{entry.version}, and a state "
            "continues only on the model version that made it"
        )
    if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps < 2**53:
        raise InvalidInput("state.steps must be a whole number of frames, 0 or more")
    tensors, arrays = [], []
    for name, shape in names_and_shapes(entry):
        data, array = tensor(document, name, shape)
        tensors.append((name, data))
        arrays.append(array)
    extra = set(document["state"]) - {name for name, _ in names_and_shapes(entry)}
    if extra:
        raise InvalidInput(f"state has tensors {sorted(extra)[:4]} that {entry.name} does not carry")
    if not isinstance(document["sha256"], str) or document["sha256"].lower() != checksum(
        entry.name, entry.version, steps, tensors
    ):
        raise InvalidInput("state.sha256 does not match its contents: the state was altered or damaged")
    return Exported(steps, tuple(arrays))


def tensor(document: dict[str, Any], name: str, shape: tuple[int, ...]) -> tuple[bytes, np.ndarray]:
    state, shapes = document["state"], document["shape"]
    if not isinstance(state, dict) or not isinstance(shapes, dict):
        raise InvalidInput("state.state and state.shape must be objects keyed by tensor name")
    if name not in state:
        raise InvalidInput(f"state lacks tensor {name!r}")
    if shapes.get(name) != list(shape):
        raise InvalidInput(f"state.shape.{name} is {str(shapes.get(name))[:40]}; {name} is {list(shape)} here")
    try:
        data = base64.b64decode(state[name], validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise InvalidInput(f"state.state.{name} is not base64") from None
    if len(data) != 4 * math.prod(shape):
        raise InvalidInput(f"state.state.{name} has {len(data)} bytes; {list(shape)} float32 is {4 * math.prod(shape)}")
    array = np.frombuffer(data, "<f4").reshape(shape).astype(np.float32)
    if not np.isfinite(array).all():
        raise InvalidInput(f"state.state.{name} holds NaN or infinity")
    return data, array
