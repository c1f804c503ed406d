"""The inference engine: models, their batchers, and the session store, behind a small interface.

classify: frames -> batcher.submit(zero state) -> prediction at the last frame
step:     store.load -> check seq -> batcher.submit(session state) -> store.commit -> prediction
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.batcher import Batcher
from service.errors import InvalidInput, ModelNotFound, SequenceConflict
from service.metrics import Metrics
from service.repository import ModelEntry, load_repository
from service.runner import Item, OnnxRunner, Output
from service.sessions import SessionRecord, SessionStore
from service.settings import Settings

log = logging.getLogger("lstm_serve")


@dataclass
class LoadedModel:
    entry: ModelEntry
    runner: OnnxRunner
    batcher: Batcher[Item, Output]

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def version(self) -> int:
        return self.entry.version

    def describe(self) -> dict:
        config = self.entry.config
        return {
            "name": self.name,
            "version": self.version,
            "labels": self.entry.labels,
            "input_dim": self.entry.input_dim,
            "cell": config.get("cell", "lstm"),
            "hidden_size": config.get("hidden_size"),
            "num_layers": config.get("num_layers"),
            "state": [spec["input"] for spec in self.entry.state_specs],
            "metrics": config.get("metrics", {}),
            "execution_provider": self.runner.provider,
        }

    def predict(self, probabilities: np.ndarray) -> dict:
        """Class prediction from one step's probabilities (C,). The array stays an array: orjson
        writes float32 arrays in C, several times faster than .tolist() and Python floats."""
        class_id = int(probabilities.argmax())
        return {"label": self.entry.labels[class_id], "class_id": class_id, "probabilities": probabilities.copy()}


def chunk_digest(frames: np.ndarray) -> str:
    return hashlib.blake2b(frames.tobytes(), digest_size=16).hexdigest()


class Engine:
    def __init__(self, settings: Settings, store: SessionStore, metrics: Metrics) -> None:
        self.settings, self.store, self.metrics = settings, store, metrics
        self.models: dict[str, LoadedModel] = {}
        self.default_model: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        entries = load_repository(s.model_repository)
        if s.default_model in entries:
            self.default_model = s.default_model
        elif "default_model" in s.model_fields_set:  # asked for explicitly: a typo must not go unnoticed
            raise ModelNotFound(f"default model {s.default_model!r} is not in {s.model_repository}")
        else:
            self.default_model = next(iter(entries))
        for name, entry in entries.items():
            runner = OnnxRunner(entry, s.providers, s.intra_op_threads)
            batcher = Batcher(runner.run, s.max_batch_size, s.max_queue_delay_ms / 1000, s.max_queue_length,
                              observer=self.metrics.observer(name), name=f"{name}-batcher")
            self.models[name] = LoadedModel(entry, runner, batcher)
            log.info("loaded %s v%d on %s", name, entry.version, runner.provider)
        await asyncio.to_thread(self.warm_up)
        for model in self.models.values():
            model.batcher.start()

    def warm_up(self) -> None:
        """Run each graph at the batch sizes it will see, so the first requests pay no set-up."""
        for model in self.models.values():
            frames = np.zeros((3, model.entry.input_dim), np.float32)
            for batch_size in sorted({1, self.settings.max_batch_size}):
                model.runner.run([Item(frames, None)] * batch_size)

    async def stop(self) -> None:
        await asyncio.gather(*(m.batcher.stop() for m in self.models.values()))

    # -- models ------------------------------------------------------------------------------
    def model(self, name: str | None) -> LoadedModel:
        name = name or self.default_model
        if name not in self.models:
            raise ModelNotFound(f"no model {name!r}; this server has {sorted(self.models)}")
        return self.models[name]

    def as_frames(self, raw, model: LoadedModel, where: str) -> np.ndarray:
        """Nested lists of numbers -> (T, D) float32, or an InvalidInput that says what is wrong."""
        D, limit = model.entry.input_dim, self.settings.max_sequence_length
        if len(raw) == 0:
            raise InvalidInput(f"{where} is empty; send at least one frame")
        if len(raw) > limit:
            raise InvalidInput(f"{where} has {len(raw)} frames, over max_sequence_length={limit}")
        try:
            frames = np.asarray(raw, dtype=np.float32)
        except ValueError:
            frames = None
        if frames is None or frames.ndim != 2 or frames.shape[1] != D:
            for t, frame in enumerate(raw):
                if len(frame) != D:
                    raise InvalidInput(f"{where}: frame {t} has {len(frame)} features; model {model.name!r} "
                                       f"takes {D} per frame")
            raise InvalidInput(f"{where} must be a list of frames of {D} numbers")
        return self.check_finite(frames, where)

    def frames_from_bytes(self, payload: bytes, model: LoadedModel, where: str) -> np.ndarray:
        """Little-endian float32 (T x D) -> (T, D) float32."""
        D, limit = model.entry.input_dim, self.settings.max_sequence_length
        if len(payload) == 0 or len(payload) % (4 * D):
            raise InvalidInput(f"{where}: {len(payload)} bytes is not a whole number of frames of "
                               f"{D} little-endian float32 ({4 * D} bytes each)")
        frames = np.frombuffer(payload, dtype="<f4").reshape(-1, D).astype(np.float32)
        if len(frames) > limit:
            raise InvalidInput(f"{where} has {len(frames)} frames, over max_sequence_length={limit}")
        return self.check_finite(frames, where)

    @staticmethod
    def check_finite(frames: np.ndarray, where: str) -> np.ndarray:
        if not np.isfinite(frames).all():
            t = int(np.flatnonzero(~np.isfinite(frames).all(axis=1))[0])
            raise InvalidInput(f"{where}: frame {t} holds NaN or Inf (or a value beyond float32)")
        return frames

    # -- classify ----------------------------------------------------------------------------
    async def infer(self, model: LoadedModel, sequences: list[np.ndarray]) -> list[Output]:
        """Each sequence from zero state, batched with whatever else is queued."""
        return await asyncio.gather(*(model.batcher.submit(Item(x, None)) for x in sequences))

    async def classify(self, model: LoadedModel, sequences: list[np.ndarray]) -> list[dict]:
        return [model.predict(out.probabilities[-1]) for out in await self.infer(model, sequences)]

    # -- sessions ----------------------------------------------------------------------------
    async def create_session(self, model: LoadedModel, session_id: str | None = None) -> SessionRecord:
        """A new session; naming an existing one restarts it from zero state."""
        return await self.store.create(model.name, model.version, session_id)

    async def get_session(self, session_id: str) -> SessionRecord:
        return await self.store.load(session_id)

    async def delete_session(self, session_id: str) -> None:
        await self.store.delete(session_id)

    def session_model(self, record: SessionRecord) -> LoadedModel:
        model = self.model(record.model)
        if model.version != record.version:
            raise ModelNotFound(f"session {record.session_id!r} was started on {record.model} v{record.version}, "
                                f"which this server no longer serves (it has v{model.version})")
        return model

    def describe_session(self, record: SessionRecord) -> dict:
        prediction = record.last_response["prediction"] if record.last_response else None
        return {
            "session_id": record.session_id,
            "model": record.model,
            "version": record.version,
            "steps": record.steps,
            "created_at": record.created_at,
            "expires_at": record.last_used + self.store.ttl_s,
            "prediction": prediction,
        }

    async def step(self, session_id: str, to_frames: Callable[[LoadedModel], np.ndarray], seq: int | None,
                   return_steps: bool) -> dict:
        return (await self.advance(session_id, to_frames, seq, return_steps))[0]

    async def advance(self, session_id: str, to_frames: Callable[[LoadedModel], np.ndarray], seq: int | None,
                      return_steps: bool) -> tuple[dict, Output | None]:
        """Apply one chunk to a session exactly once, in order; replay the answer to a retried chunk.
        `to_frames` validates the chunk against the session's model, known once the session is loaded
        (one load per step: with Redis each load is a round trip). Returns the response and the model's
        output for this chunk (None for a replayed retry)."""
        frames = digest = None
        async with self.store.lock(session_id):
            while True:
                record = await self.store.load(session_id)
                if frames is None:
                    frames = to_frames(self.session_model(record))
                    digest = chunk_digest(frames)
                if seq is not None and seq != record.steps:
                    if seq == record.last_seq and digest == record.last_digest:
                        return record.last_response, None  # a retry of the chunk already applied
                    raise SequenceConflict(
                        f"seq {seq} does not match: session {session_id!r} has consumed {record.steps} frames",
                        expected_seq=record.steps,
                    )
                model = self.session_model(record)
                out = await model.batcher.submit(Item(frames, list(record.state) if record.state else None))
                steps = record.steps + len(frames)
                prediction = model.predict(out.probabilities[-1])
                response = {"session_id": session_id, "steps": steps, "prediction": prediction}
                if return_steps:
                    response["step_predictions"] = [model.predict(row) for row in out.probabilities]
                updated = record.advanced(
                    steps=steps, state=tuple(out.state), last_seq=record.steps, last_digest=digest,
                    last_response=response, last_used=time.time(),
                )
                if await self.store.commit(updated, record.revision):
                    return response, out
                # another process advanced the session meanwhile: redo this chunk on its new state
