"""Session state held between requests: what each streaming session has consumed and its h/c.

`SessionStore` is the interface the engine talks to; `InMemorySessionStore` is the default. Updates
are compare-and-set on (incarnation, revision), so a store shared by several processes (Redis) can
refuse a write that lost a race, and a step that started on a session cannot land on a restarted one
of the same id; within one process, `lock(id)` puts a session's steps in a line.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np

from lstm_serve.errors import SessionNotFound, TooManySessions
from lstm_serve.ids import caller_id, unique_id


@dataclass(frozen=True)
class SessionRecord:
    """A session's whole state. Its size is bounded by the model, never by what a request asked for: the
    recurrent state twice (after and before the last chunk) and one row of class probabilities."""

    session_id: str  # the store key; protocols namespace it by protocol and owner (protocols/v1.py, oip.py)
    model: str
    version: int
    created_at: float  # unix seconds
    last_used: float  # unix seconds of the last applied step (or creation)
    incarnation: str = ""  # new for every create: a restart or a delete-then-create is another session
    steps: int = 0  # frames consumed so far
    state: tuple[np.ndarray, ...] | None = None  # one (L, H) array per state tensor; None = zeros
    # what a retry of the last chunk needs: its seq and digest recognise it, the probabilities after it
    # answer it, and the state before it recomputes its per-frame outputs when the retry asks for them
    last_seq: int | None = None  # frames consumed before the last applied chunk
    last_digest: str | None = None  # digest of the last applied chunk
    last_probabilities: np.ndarray | None = None  # (C,) after the last applied chunk
    previous_state: tuple[np.ndarray, ...] | None = None  # the state the last applied chunk started from
    revision: int = 0  # new at every commit (a count in memory, random in Redis); commits compare-and-set on it
    quota: str = ""  # whose share it counts against: an API key, or a client address without keys (Caller.quota_key)

    def advanced(self, **changes: Any) -> SessionRecord:
        """A copy with `changes`: dataclasses.replace re-runs __init__ through every field, which costs more
        than the rest of a step's bookkeeping; a frozen record's fields are copied as they are."""
        unknown = changes.keys() - RECORD_FIELDS
        if unknown:
            raise TypeError(f"SessionRecord has no fields {sorted(unknown)}")
        copy = object.__new__(SessionRecord)
        copy.__dict__.update(self.__dict__)
        copy.__dict__.update(changes)
        return copy

    def stepped(
        self,
        steps: int,
        state: tuple[np.ndarray, ...],
        last_digest: str,
        last_probabilities: np.ndarray,
        last_used: float,
    ) -> SessionRecord:
        """This session after one more chunk, which started from its state at `self.steps` frames: `advanced`
        for the one change every step makes, without its keyword checks."""
        copy = object.__new__(SessionRecord)
        fields = copy.__dict__
        fields.update(self.__dict__)
        fields["steps"], fields["state"], fields["previous_state"] = steps, state, self.state
        fields["last_seq"], fields["last_digest"], fields["last_probabilities"] = (
            self.steps,
            last_digest,
            last_probabilities,
        )
        fields["last_used"] = last_used
        return copy

    def revised(self, revision: int) -> SessionRecord:
        """A copy at another revision (what a store's commit writes)."""
        copy = object.__new__(SessionRecord)
        copy.__dict__.update(self.__dict__)
        copy.__dict__["revision"] = revision
        return copy


RECORD_FIELDS = frozenset(field.name for field in fields(SessionRecord))


def new_session_id() -> str:
    return secrets.token_urlsafe(24)  # 192 random bits


def new_record(
    model: str, version: int, session_id: str | None = None, now: float | None = None, **fields: Any
) -> SessionRecord:
    """A session that starts now, as a new incarnation; `fields` may give it a state to start from."""
    now = time.time() if now is None else now
    return SessionRecord(
        session_id or new_session_id(),
        model,
        version,
        created_at=now,
        last_used=now,
        incarnation=unique_id(),
        **fields,
    )


def server_full(max_sessions: int, ttl_s: float) -> TooManySessions:
    return TooManySessions(
        f"the server holds its maximum of {max_sessions} sessions; delete finished sessions "
        "or retry after idle ones expire",
        headers={"Retry-After": str(max(1, round(ttl_s / 10)))},
    )


def quota_full(max_per_quota: int, ttl_s: float) -> TooManySessions:
    return TooManySessions(
        f"this API key (or client address) holds its maximum of {max_per_quota} sessions; delete finished "
        "sessions or retry after idle ones expire",
        headers={"Retry-After": str(max(1, round(ttl_s / 10)))},
    )


class SessionStore(Protocol):
    ttl_s: float
    lock: KeyedLocks  # orders the steps of one session within this process
    clock_error_s: float  # how far apart two processes' now() may be

    def now(self) -> float:
        """Unix seconds, as every process sharing this store tells them apart (a session's creation, a step's
        start: whether a restart came before a step or during it)."""
        ...

    async def create(self, record: SessionRecord) -> SessionRecord:
        """Store a new session; a record whose id exists replaces that session (a restart keeps its slot)."""
        ...

    async def load(self, session_id: str) -> SessionRecord: ...

    def recall(self, session_id: str) -> SessionRecord | None:
        """A view of the session that may be stale, without a round trip (None: load it). A commit from a
        stale view loses its compare-and-set, so a step may start from one."""
        ...

    async def commit(self, record: SessionRecord, expected: SessionRecord) -> bool:
        """Write `record` if the stored session is still `expected` (same incarnation and revision); False
        if it has moved on or was replaced, SessionNotFound if it is gone."""
        ...

    async def delete(self, session_id: str) -> None: ...

    def abandon(self, session_id: str) -> None:
        """A create of a new id, known to no one, whose answer was lost: take the session out if it landed."""
        ...

    async def sweep(self) -> int: ...

    async def count(self) -> int: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class KeyedLocks:
    """A lock per key, first come first served, held by nobody when its key is absent. Taking a free key
    is a dict insert (every step takes one: no lock object, no generator); a waiter parks on a future
    that the holder's release resolves, handing the lock over."""

    def __init__(self) -> None:
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}  # held keys -> who waits, in order

    def __call__(self, key: str) -> KeyHeld:
        return KeyHeld(self, key)

    def try_acquire(self, key: str) -> bool:
        """Take a free key at once (True); False if someone holds it (then await `acquire`)."""
        if key in self._waiters:
            return False
        self._waiters[key] = deque()
        return True

    async def acquire(self, key: str) -> None:
        if self.try_acquire(key):
            return
        waiters = self._waiters[key]
        turn = asyncio.get_running_loop().create_future()
        waiters.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # handed over, then cancelled: pass it on
                self.release(key)
            else:
                waiters.remove(turn)
            raise

    def release(self, key: str) -> None:
        waiters = self._waiters[key]
        while waiters:
            turn = waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        del self._waiters[key]

    def __len__(self) -> int:
        return len(self._waiters)


class KeyHeld:
    __slots__ = ("locks", "key")

    def __init__(self, locks: KeyedLocks, key: str) -> None:
        self.locks, self.key = locks, key

    async def __aenter__(self) -> None:
        await self.locks.acquire(self.key)

    async def __aexit__(self, *exc_info: object) -> None:
        self.locks.release(self.key)


class InMemorySessionStore:
    """Sessions in this process, oldest-used first, so expiry pops from the front."""

    def __init__(
        self,
        ttl_s: float,
        max_sessions: int,
        on_expired: Callable[[int], None] = lambda n: None,
        clock: Callable[[], float] = time.time,
        max_per_quota: int | None = None,
    ) -> None:
        self.ttl_s, self.max_sessions = ttl_s, max_sessions
        self.max_per_quota = max_per_quota or max_sessions
        self.on_expired, self.clock = on_expired, clock
        self._sessions: OrderedDict[str, SessionRecord] = OrderedDict()
        self._per_quota: Counter[str] = Counter()  # live sessions per quota key
        self.lock = KeyedLocks()
        self.clock_error_s = 0.0  # one process

    def now(self) -> float:
        return self.clock()

    def _expired(self, record: SessionRecord, now: float) -> bool:
        return now - record.last_used >= self.ttl_s

    async def create(self, record: SessionRecord) -> SessionRecord:
        replacing = record.session_id in self._sessions
        if not replacing:
            full = len(self._sessions) >= self.max_sessions or self._per_quota[record.quota] >= self.max_per_quota
            if full:
                await self.sweep()
            if len(self._sessions) >= self.max_sessions:
                raise server_full(self.max_sessions, self.ttl_s)
            if self._per_quota[record.quota] >= self.max_per_quota:
                raise quota_full(self.max_per_quota, self.ttl_s)
            self._per_quota[record.quota] += 1
        self._sessions.pop(record.session_id, None)
        self._sessions[record.session_id] = record
        return record

    def _remove(self, session_id: str) -> None:
        record = self._sessions.pop(session_id)
        self._per_quota[record.quota] -= 1
        if not self._per_quota[record.quota]:
            del self._per_quota[record.quota]

    async def load(self, session_id: str) -> SessionRecord:
        record = self._sessions.get(session_id)
        if record is None:
            raise SessionNotFound(f"no session {caller_id(session_id)!r} (never created, deleted, or expired)")
        if self._expired(record, self.clock()):
            self._remove(session_id)
            self.on_expired(1)
            raise SessionNotFound(f"session {caller_id(session_id)!r} expired after {self.ttl_s:g} s idle")
        return record

    def recall(self, session_id: str) -> SessionRecord | None:
        """The session as it is (never stale here), without load's await; None when it is missing or
        expired, for load to say so."""
        record = self._sessions.get(session_id)
        if record is None or self._expired(record, self.clock()):
            return None
        return record

    async def commit(self, record: SessionRecord, expected: SessionRecord) -> bool:
        stored = self._sessions.get(record.session_id)
        if stored is None:
            raise SessionNotFound(
                f"session {caller_id(record.session_id)!r} was deleted while this chunk ran; the chunk was not applied"
            )
        if (stored.incarnation, stored.revision) != (expected.incarnation, expected.revision):
            return False
        self._sessions[record.session_id] = record.revised(expected.revision + 1)
        self._sessions.move_to_end(record.session_id)
        return True

    async def delete(self, session_id: str) -> None:
        await self.load(session_id)  # 404 for unknown and expired ids alike
        self._remove(session_id)

    async def sweep(self) -> int:
        now, expired = self.clock(), 0
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if not self._expired(oldest, now):
                break
            self._remove(oldest.session_id)
            expired += 1
        if expired:
            self.on_expired(expired)
        return expired

    async def count(self) -> int:
        return len(self._sessions)

    def abandon(self, session_id: str) -> None:
        pass  # a create here lands or fails whole, and says which

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._sessions.clear()
        self._per_quota.clear()
