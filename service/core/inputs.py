"""Every limit and shape check on what a client sends, each in one place with one wording.

The engine takes frames only as a `Chunk`, and only this module makes one: a chunk has passed every
check for the model it is meant for. Protocols decode their wire format (JSON lists, raw float32
bytes, OIP tensors) and hand the numbers here.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lstm_serve.core.repository import ModelEntry
from lstm_serve.errors import BodyTooLarge, InvalidInput, ModelNotFound, ServiceError
from lstm_serve.settings import Settings

LITTLE_ENDIAN_F32 = np.dtype("<f4")
NATIVE_IS_LITTLE_ENDIAN = sys.byteorder == "little"


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int  # a request body, a decompressed body or a WebSocket message
    max_sequence_length: int  # frames in one sequence or one streamed chunk
    max_sequences_per_request: int  # sequences in one classify or inference request

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(settings.max_body_bytes, settings.max_sequence_length, settings.max_sequences_per_request)


@dataclass(frozen=True)
class Catalogue:
    """The served models' entries and the limits: all that checking a request needs. Small and plain, so it
    travels to a decode process (core/offload.py)."""

    limits: Limits
    entries: dict[str, ModelEntry]  # each model's default version: its newest serving one
    default_model: str
    versions: dict[tuple[str, int], ModelEntry] = field(default_factory=dict)  # every version taking work
    # why a model (version None) or a version takes no work here: retired (410), loading (503), ...
    refusals: dict[tuple[str, int | None], ServiceError] = field(default_factory=dict)

    def entry(self, name: str | None = None, version: int | None = None) -> ModelEntry:
        """The model a request names, at the version it names; the default model and its default version
        when it names none."""
        name = self.default_model if name is None else name
        found = self.entries.get(name) if version is None else self.versions.get((name, version))
        if found is not None:
            return found
        if (name, version) in self.refusals:
            raise copy.copy(self.refusals[name, version])  # a fresh exception per request
        if version is not None and any(n == name for n, _ in self.versions):
            loaded = sorted(v for n, v in self.versions if n == name)
            raise ModelNotFound(f"model {name!r} has no version {version}; this server serves versions {loaded}")
        raise ModelNotFound(f"no model {name[:80]!r}; this server has {sorted(self.entries)}")


@dataclass(frozen=True, slots=True)
class Chunk:
    """Frames that passed every check: (T, D) float32, all finite, 1 <= T <= max_sequence_length, D the
    model's input size."""

    frames: np.ndarray

    def __len__(self) -> int:
        return len(self.frames)


def check_body_size(size: int, limits: Limits, what: str = "the request body") -> None:
    if size > limits.max_body_bytes:
        raise BodyTooLarge(f"{what} is over max_body_bytes={limits.max_body_bytes}")


def check_sequence_count(count: int, limits: Limits) -> None:
    if count > limits.max_sequences_per_request:
        raise InvalidInput(
            f"{count} sequences in one request, over max_sequences_per_request={limits.max_sequences_per_request}"
        )


def check_length(length: int, limits: Limits, where: str) -> None:
    if length == 0:
        raise InvalidInput(f"{where} is empty; send at least one frame")
    if length > limits.max_sequence_length:
        raise InvalidInput(f"{where} has {length} frames, over max_sequence_length={limits.max_sequence_length}")


def feature_count_error(model: ModelEntry, where: str, t: int, features: int) -> InvalidInput:
    return InvalidInput(
        f"{where}: frame {t} has {features} features; model {model.name!r} takes {model.input_dim} per frame"
    )


def chunk_from_lists(raw: Sequence[Sequence[Any]], model: ModelEntry, limits: Limits, where: str) -> Chunk:
    """JSON frames (lists of D numbers) -> a chunk, or an InvalidInput that says what is wrong."""
    check_length(len(raw), limits, where)
    try:
        frames = np.asarray(raw, dtype=np.float32)
    except (ValueError, TypeError):
        frames = None
    if frames is None or frames.ndim != 2 or frames.shape[1] != model.input_dim:
        for t, frame in enumerate(raw):
            if not isinstance(frame, Sequence) or len(frame) != model.input_dim:
                raise feature_count_error(model, where, t, len(frame) if isinstance(frame, Sequence) else 1)
        raise InvalidInput(f"{where} must be a list of frames of {model.input_dim} numbers")
    return finite_chunk(frames, where)


def chunk_from_bytes(payload: bytes, model: ModelEntry, limits: Limits, where: str) -> Chunk:
    """Little-endian float32, T x D, row by row -> a chunk."""
    frame_bytes = 4 * model.input_dim
    if len(payload) % frame_bytes:
        raise InvalidInput(
            f"{where}: {len(payload)} bytes is not a whole number of frames of {model.input_dim} "
            f"little-endian float32 ({frame_bytes} bytes each)"
        )
    check_length(len(payload) // frame_bytes, limits, where)
    # read-only view of the message, which nothing mutates: no copy (on a big-endian host, a converted copy)
    frames = np.frombuffer(payload, LITTLE_ENDIAN_F32).reshape(-1, model.input_dim)
    if not NATIVE_IS_LITTLE_ENDIAN:
        frames = frames.astype(np.float32)
    return finite_chunk(frames, where)


def chunk_from_array(frames: np.ndarray, model: ModelEntry, limits: Limits, where: str) -> Chunk:
    """A decoded (T, D) tensor row -> a chunk."""
    if frames.ndim != 2 or frames.shape[1] != model.input_dim:
        raise InvalidInput(f"{where} has shape {list(frames.shape)}; model {model.name!r} takes [T, {model.input_dim}]")
    check_length(len(frames), limits, where)
    return finite_chunk(np.ascontiguousarray(frames, dtype=np.float32), where)


SMALL_CHUNK_VALUES = 64  # up to this many numbers (a streamed frame or a few), Python's sum beats numpy's


def finite_chunk(frames: np.ndarray, where: str) -> Chunk:
    # One sum in float64 on the common path: a NaN or Inf anywhere makes it non-finite (float32 values
    # cannot overflow it; the exact check below words the error)
    if frames.size <= SMALL_CHUNK_VALUES:
        total = sum(frames.ravel().tolist())
    else:
        total = np.add.reduce(frames, axis=None, dtype=np.float64)
    if math.isfinite(total):
        return Chunk(frames)
    finite = np.isfinite(frames)
    if not finite.all():
        t = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise InvalidInput(f"{where}: frame {t} holds NaN or Inf (or a value beyond float32)")
    return Chunk(frames)
