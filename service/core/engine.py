"""The inference engine: models, their batchers and the session store, behind a small interface that
takes checked chunks (core/inputs.py) and returns typed results. It speaks no protocol.

classify: chunks -> batcher.submit(zero state) -> per-frame outputs of each sequence
step:     store.load -> check seq -> batcher.submit(session state) -> store.commit -> StepResult
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lstm_serve.core.batcher import Batcher
from lstm_serve.core.inputs import Catalogue, Chunk, Limits
from lstm_serve.core.metrics import Metrics
from lstm_serve.core.repository import ModelEntry, load_repository
from lstm_serve.core.runner import Item, OnnxRunner, Output
from lstm_serve.core.session_state import Exported
from lstm_serve.errors import ModelNotFound, SequenceConflict, SessionRestarted
from lstm_serve.settings import Settings
from lstm_serve.state.sessions import SessionRecord, SessionStore, new_record

log = logging.getLogger("lstm_serve")


@dataclass(frozen=True, slots=True)
class Prediction:
    """The model's verdict after one frame."""

    label: str
    class_id: int
    probabilities: np.ndarray  # (C,) float32


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

    def predict(self, probabilities: np.ndarray) -> Prediction:
        """The prediction for one frame's probabilities (C,); the row is copied so that it does not keep
        the whole batch's array alive."""
        class_id = int(probabilities.argmax())
        return Prediction(self.entry.labels[class_id], class_id, probabilities.copy())


@dataclass(frozen=True)
class StepResult:
    """What one chunk did to a session."""

    model: LoadedModel  # the model the session runs on
    steps: int  # frames the session has consumed after this chunk
    probabilities: np.ndarray  # (C,) class probabilities after its last frame
    outputs: Output | None  # per-frame logits and probabilities of this chunk (None for a replay not asking)
    replayed: bool  # a retry answered from the session, not applied again


def chunk_digest(frames: np.ndarray) -> str:
    return hashlib.blake2b(frames.tobytes(), digest_size=16).hexdigest()


# A chunk this short may run on the event loop when its model's batcher is idle (core/batcher.py): tens
# of microseconds of onnxruntime, less than handing it to the worker thread and back.
INLINE_FRAMES = 8


class Engine:
    def __init__(self, settings: Settings, store: SessionStore, metrics: Metrics) -> None:
        self.settings, self.store, self.metrics = settings, store, metrics
        self.models: dict[str, LoadedModel] = {}
        self.catalogue = Catalogue(Limits.from_settings(settings), {}, settings.default_model)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        entries = load_repository(s.model_repository)
        default_model = s.default_model
        if default_model not in entries:
            if "default_model" in s.model_fields_set:  # asked for explicitly: a typo must not go unnoticed
                raise ModelNotFound(f"default model {s.default_model!r} is not in {s.model_repository}")
            default_model = next(iter(entries))
        loaded = []
        for name, entry in entries.items():
            runner = OnnxRunner(entry, s.providers, s.intra_op_threads)
            batcher = Batcher(
                runner.run,
                s.max_batch_size,
                s.max_queue_delay_ms / 1000,
                s.max_queue_length,
                observer=self.metrics.observer(name),
                name=f"{name}-batcher",
                cheap=lambda item: len(item.frames) <= INLINE_FRAMES,
            )
            loaded.append(LoadedModel(entry, runner, batcher))
            log.info("loaded %s v%d on %s", name, entry.version, runner.provider)
        self.serve(loaded, default_model)
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
    def serve(self, models: list[LoadedModel], default_model: str) -> None:
        """Make these the served models; requests that name no model get `default_model`."""
        self.models = {model.entry.name: model for model in models}
        entries = {name: model.entry for name, model in self.models.items()}
        self.catalogue = Catalogue(self.catalogue.limits, entries, default_model)

    @property
    def default_model(self) -> str:
        return self.catalogue.default_model

    def model(self, name: str | None = None) -> LoadedModel:
        return self.models[self.catalogue.entry(name).name]

    # -- classify ----------------------------------------------------------------------------
    async def classify(self, model: LoadedModel, chunks: list[Chunk]) -> list[Output]:
        """Each sequence from zero state, batched with whatever else is queued: its per-frame outputs."""
        return await asyncio.gather(*(model.batcher.submit(Item(chunk.frames, None)) for chunk in chunks))

    # -- sessions ----------------------------------------------------------------------------
    @property
    def session_ttl_s(self) -> float:
        return self.store.ttl_s

    async def create_session(self, model: LoadedModel, session_id: str, owner: str) -> SessionRecord:
        return await self.store.create(new_record(model.name, model.version, session_id, owner=owner))

    async def import_session(
        self, model: LoadedModel, session_id: str, owner: str, exported: Exported
    ) -> SessionRecord:
        """A new session that continues from an exported state (core/session_state.py)."""
        record = new_record(
            model.name, model.version, session_id, owner=owner, steps=exported.steps, state=exported.state
        )
        return await self.store.create(record)

    async def get_session(self, session_id: str) -> SessionRecord:
        return await self.store.load(session_id)

    async def delete_session(self, session_id: str) -> None:
        async with self.store.lock(session_id):  # after a step of this process in flight, never under it
            await self.store.delete(session_id)

    def session_model(self, record: SessionRecord) -> LoadedModel:
        model = self.model(record.model)
        if model.version != record.version:
            raise ModelNotFound(
                f"session {record.session_id!r} was started on {record.model} v{record.version}, "
                f"which this server no longer serves (it has v{model.version})"
            )
        return model

    async def restart(self, model: LoadedModel, session_id: str, chunk: Chunk, owner: str) -> StepResult:
        """The session `session_id` from zero state with exactly this chunk, replacing any session of
        that id (a step still running on the old one fails instead of landing on this one)."""
        async with self.store.lock(session_id):
            (out,) = await self.classify(model, [chunk])
            record = new_record(
                model.name,
                model.version,
                session_id,
                owner=owner,
                steps=len(chunk),
                state=tuple(out.state),
                last_seq=0,
                last_digest=chunk_digest(chunk.frames),
                last_probabilities=out.probabilities[-1].copy(),
            )
            await self.store.create(record)
        return StepResult(model, record.steps, out.probabilities[-1], out, replayed=False)

    async def step(
        self, session_id: str, to_chunk: Callable[[LoadedModel], Chunk], seq: int | None, per_frame: bool
    ) -> StepResult:
        """Apply one chunk to a session exactly once, in order; answer a retried chunk without applying it
        again. `to_chunk` checks the frames against the session's model, known once the session is
        loaded (one load per step: with Redis each load is a round trip)."""
        async with self.store.lock(session_id):
            record = await self.store.load(session_id)
            model = self.session_model(record)
            chunk = to_chunk(model)
            digest = chunk_digest(chunk.frames)
            while True:
                if seq is not None and seq != record.steps:
                    if seq == record.last_seq and digest == record.last_digest:
                        return await self.replay(model, record, chunk, per_frame)
                    raise SequenceConflict(
                        f"seq {seq} does not match: session {session_id!r} has consumed {record.steps} frames",
                        expected_seq=record.steps,
                    )
                out = await model.batcher.submit(Item(chunk.frames, list(record.state) if record.state else None))
                updated = record.advanced(
                    steps=record.steps + len(chunk),
                    state=tuple(out.state),
                    last_seq=record.steps,
                    last_digest=digest,
                    last_probabilities=out.probabilities[-1].copy(),
                    previous_state=record.state,
                    last_used=time.time(),
                )
                if await self.store.commit(updated, record):
                    return StepResult(model, updated.steps, out.probabilities[-1], out, replayed=False)
                # Lost the compare-and-set. Another replica stepped this session meanwhile: redo the chunk on
                # its state (with seq, the check above decides again). But a session restarted (or deleted
                # and created again) under the same id is another session: this chunk was not meant for it.
                current = await self.store.load(session_id)
                if current.incarnation != record.incarnation:
                    raise SessionRestarted(
                        f"session {session_id!r} was restarted while this chunk ran; the chunk was not applied"
                    )
                record = current

    async def replay(self, model: LoadedModel, record: SessionRecord, chunk: Chunk, per_frame: bool) -> StepResult:
        """The answer to a retry of the last chunk, from what the session keeps: the probabilities after the
        chunk as they were sent, and its per-frame outputs recomputed from the state before it."""
        out = None
        if per_frame:
            state = list(record.previous_state) if record.previous_state else None
            out = await model.batcher.submit(Item(chunk.frames, state))
        assert record.last_probabilities is not None, "a session with a last chunk keeps its probabilities"
        return StepResult(model, record.steps, record.last_probabilities, out, replayed=True)
