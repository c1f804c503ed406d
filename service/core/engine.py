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

from lstm_serve.core.fleet import Fleet, LoadedModel, Prediction
from lstm_serve.core.inputs import Catalogue, Chunk, Limits
from lstm_serve.core.metrics import Metrics
from lstm_serve.core.runner import Item, Output
from lstm_serve.core.session_state import Exported
from lstm_serve.errors import SequenceConflict, SessionRestarted, StoreUnavailable
from lstm_serve.ids import caller_id
from lstm_serve.settings import Settings
from lstm_serve.state.directory import LocalDirectory, ModelDirectory
from lstm_serve.state.sessions import SessionRecord, SessionStore, new_record

__all__ = ["Engine", "LoadedModel", "Prediction", "StepResult", "chunk_digest"]
log = logging.getLogger("lstm_serve")


@dataclass(slots=True)
class StepResult:
    """What one chunk did to a session."""

    model: LoadedModel  # the model the session runs on
    steps: int  # frames the session has consumed after this chunk
    probabilities: np.ndarray  # (C,) class probabilities after its last frame
    outputs: Output | None  # per-frame logits and probabilities of this chunk (None for a replay not asking)
    replayed: bool  # a retry answered from the session, not applied again
    class_id: int | None = None  # the argmax of `probabilities`, when the batch computed it


def chunk_digest(frames: np.ndarray) -> str:
    data = frames.data if frames.flags.c_contiguous else frames.tobytes()  # a contiguous array: in place
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class Engine:
    def __init__(
        self, settings: Settings, store: SessionStore, metrics: Metrics, directory: ModelDirectory | None = None
    ) -> None:
        self.settings, self.store, self.metrics = settings, store, metrics
        self.fleet = Fleet(settings, metrics, directory or LocalDirectory(), Limits.from_settings(settings))

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        await self.fleet.start()

    async def stop(self) -> None:
        await self.fleet.stop()

    # -- models ------------------------------------------------------------------------------
    def serve(self, models: list[LoadedModel], default_model: str) -> None:
        """Make these the served models; requests that name no model get `default_model`."""
        self.fleet.serve(models, default_model)

    @property
    def models(self) -> dict[str, LoadedModel]:
        """Each model's default version (its newest serving), by name."""
        return self.fleet.models

    @property
    def catalogue(self) -> Catalogue:
        return self.fleet.catalogue

    @property
    def default_model(self) -> str:
        return self.fleet.default_model

    def model(self, name: str | None = None, version: int | None = None) -> LoadedModel:
        return self.fleet.model(name, version)

    # -- classify ----------------------------------------------------------------------------
    async def classify(self, model: LoadedModel, chunks: list[Chunk], keep_state: bool = False) -> list[Output]:
        """Each sequence from zero state, batched with whatever else is queued: its per-frame outputs (and
        the state after it when `keep_state`)."""
        if len(chunks) == 1:  # the common case, without gather's task per sequence
            return [await model.batcher.submit(Item(chunks[0].frames, None, keep_state))]
        return await asyncio.gather(*(model.batcher.submit(Item(c.frames, None, keep_state)) for c in chunks))

    # -- sessions ----------------------------------------------------------------------------
    @property
    def session_ttl_s(self) -> float:
        return self.store.ttl_s

    async def create_session(self, model: LoadedModel, session_id: str, quota: str) -> SessionRecord:
        """`quota`: whose share of sessions it counts against (Caller.quota_key)."""
        self.fleet.check_new_session(model)
        record = new_record(model.name, model.version, session_id, now=self.store.now(), quota=quota)
        return await self.created(record)

    async def import_session(
        self, model: LoadedModel, session_id: str, quota: str, exported: Exported
    ) -> SessionRecord:
        """A new session that continues from an exported state (core/session_state.py)."""
        self.fleet.check_new_session(model)
        now = self.store.now()
        record = new_record(
            model.name, model.version, session_id, now, quota=quota, steps=exported.steps, state=exported.state
        )
        return await self.created(record)

    async def created(self, record: SessionRecord) -> SessionRecord:
        """A session under a new id, which its caller learns only from the answer: a create the store did not
        confirm may land still, and is taken out again (no one could use or delete it)."""
        try:
            return await self.store.create(record)
        except StoreUnavailable:
            self.store.abandon(record.session_id)
            raise

    async def get_session(self, session_id: str) -> SessionRecord:
        return await self.store.load(session_id)

    async def find_session(self, session_id: str) -> SessionRecord:
        """The session, from this replica's last view of it when it has one (no round trip to Redis): for
        a stream to learn its model; each step then checks the session against the store."""
        return self.store.recall(session_id) or await self.store.load(session_id)

    async def delete_session(self, session_id: str) -> None:
        async with self.store.lock(session_id):  # after a step of this process in flight, never under it
            await self.store.delete(session_id)

    def session_model(self, record: SessionRecord) -> LoadedModel:
        return self.fleet.session_model(record.model, record.version)

    async def restart(self, model: LoadedModel, session_id: str, chunk: Chunk, quota: str) -> StepResult:
        """The session `session_id` from zero state with exactly this chunk, replacing any session of
        that id (a step still running on the old one fails instead of landing on this one)."""
        self.fleet.check_new_session(model)
        async with self.store.lock(session_id):
            (out,) = await self.classify(model, [chunk], keep_state=True)
            record = new_record(
                model.name,
                model.version,
                session_id,
                self.store.now(),
                quota=quota,
                steps=len(chunk),
                state=tuple(out.state),
                last_seq=0,
                last_digest=chunk_digest(chunk.frames),
                last_probabilities=out.probabilities[-1].copy(),
            )
            await self.store.create(record)
        return StepResult(model, record.steps, out.probabilities[-1], out, False, out.class_id)

    async def step(
        self,
        session_id: str,
        to_chunk: Callable[[LoadedModel], Chunk],
        seq: int | None,
        per_frame: bool,
        alone: bool = False,
    ) -> StepResult:
        """Apply one chunk to a session exactly once, in order; answer a retried chunk without applying it
        again. `to_chunk` checks the frames against the session's model, known once the session is
        loaded (one load per step: with Redis each load is a round trip). `alone`: no other request is
        waiting (Batcher.submit)."""
        started = self.store.now()
        locks = self.store.lock
        if not locks.try_acquire(session_id):  # the common case takes a free lock without awaiting
            await locks.acquire(session_id)
        try:
            recalled = self.store.recall(session_id)  # with Redis: this replica's last view, maybe stale
            record = recalled or await self.store.load(session_id)
            fresh = recalled is None  # read from the store after this step began
            while True:
                model = self.session_model(record)
                chunk = to_chunk(model)
                digest = chunk_digest(chunk.frames)
                if seq is not None and seq != record.steps:
                    if not fresh:  # the view may be behind the session: decide on what the store holds
                        record, fresh = await self.store.load(session_id), True
                        continue
                    if seq == record.last_seq and digest == record.last_digest:
                        return await self.replay(model, record, chunk, per_frame)
                    raise SequenceConflict(
                        f"seq {seq} does not match: session {caller_id(session_id)!r} has consumed "
                        f"{record.steps} frames",
                        expected_seq=record.steps,
                    )
                state = list(record.state) if record.state else None
                out = await model.batcher.submit(Item(chunk.frames, state), alone)
                last = out.probabilities[-1]
                updated = record.stepped(record.steps + len(chunk), tuple(out.state), digest, last.copy(), time.time())
                if await self.store.commit(updated, record):
                    return StepResult(model, updated.steps, last, out, False, out.class_id)
                # Lost the compare-and-set. Another replica stepped this session meanwhile (or the view was
                # stale): redo the chunk on its state (with seq, the check above decides again). But a session
                # restarted (or deleted and created again) under the same id while this chunk ran is another
                # session: this chunk was not meant for it. From a stale view, a replacement created before the
                # step began (by more than the store's clock_error_s) is the session this chunk is for.
                current = await self.store.load(session_id)
                if current.incarnation != record.incarnation and (
                    fresh or current.created_at > started - self.store.clock_error_s
                ):
                    raise SessionRestarted(
                        f"session {caller_id(session_id)!r} was restarted while this chunk ran; "
                        "the chunk was not applied"
                    )
                record, fresh = current, True
        finally:
            locks.release(session_id)

    async def replay(self, model: LoadedModel, record: SessionRecord, chunk: Chunk, per_frame: bool) -> StepResult:
        """The answer to a retry of the last chunk, from what the session keeps: the probabilities after the
        chunk as they were sent, and its per-frame outputs recomputed from the state before it."""
        out = None
        if per_frame:
            state = list(record.previous_state) if record.previous_state else None
            out = await model.batcher.submit(Item(chunk.frames, state))
        assert record.last_probabilities is not None, "a session with a last chunk keeps its probabilities"
        return StepResult(model, record.steps, record.last_probabilities, out, replayed=True)
