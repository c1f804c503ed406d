"""Session state held between requests: what each streaming session has consumed and its h/c.

`SessionStore` is the interface the engine talks to; `InMemorySessionStore` is the default. Updates
are compare-and-set on a revision number, so a store shared by several processes (Redis) can refuse
a write that lost a race; within one process, `lock(id)` puts a session's steps in a line.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from service.errors import SessionNotFound, TooManySessions


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    model: str
    version: int
    created_at: float  # unix seconds
    last_used: float  # unix seconds of the last applied step (or creation)
    steps: int = 0  # frames consumed so far
    state: tuple[np.ndarray, ...] | None = None  # one (L, H) array per state tensor; None = zeros
    last_seq: int | None = None  # frames consumed before the last applied chunk
    last_digest: str | None = None  # digest of the last applied chunk, to recognise a retry
    last_response: dict | None = None  # the response to that chunk, replayed on a retry
    revision: int = 0  # bumped by every commit; commits are compare-and-set on it

    def advanced(self, **changes) -> SessionRecord:
        return replace(self, **changes)


def new_session_id() -> str:
    return secrets.token_urlsafe(24)  # 192 random bits


class SessionStore(Protocol):
    ttl_s: float

    async def create(self, model: str, version: int, session_id: str | None = None) -> SessionRecord:
        """A fresh session; with a session_id that exists, that session restarts from zero state."""
        ...

    async def load(self, session_id: str) -> SessionRecord: ...

    async def commit(self, record: SessionRecord, expected_revision: int) -> bool: ...

    async def delete(self, session_id: str) -> None: ...

    async def sweep(self) -> int: ...

    async def count(self) -> int: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...

    def lock(self, session_id: str) -> AsyncIterator[None]: ...


class KeyedLocks:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def __call__(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class InMemorySessionStore:
    """Sessions in this process, oldest-used first, so expiry pops from the front."""

    def __init__(self, ttl_s: float, max_sessions: int, on_expired: Callable[[int], None] = lambda n: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.ttl_s, self.max_sessions = ttl_s, max_sessions
        self.on_expired, self.clock = on_expired, clock
        self._sessions: OrderedDict[str, SessionRecord] = OrderedDict()
        self.lock = KeyedLocks()

    def _expired(self, record: SessionRecord, now: float) -> bool:
        return now - record.last_used >= self.ttl_s

    async def create(self, model: str, version: int, session_id: str | None = None) -> SessionRecord:
        previous = self._sessions.pop(session_id, None) if session_id else None
        if previous is None and len(self._sessions) >= self.max_sessions:
            await self.sweep()
        if previous is None and len(self._sessions) >= self.max_sessions:
            raise TooManySessions(
                f"the server holds its maximum of {self.max_sessions} sessions; delete finished sessions "
                "or retry after idle ones expire",
                headers={"Retry-After": str(max(1, round(self.ttl_s / 10)))},
            )
        now = self.clock()
        # a restart bumps the revision, so a step still running on the old state cannot commit over it
        revision = previous.revision + 1 if previous else 0
        record = SessionRecord(session_id or new_session_id(), model, version, created_at=now, last_used=now,
                               revision=revision)
        self._sessions[record.session_id] = record
        return record

    async def load(self, session_id: str) -> SessionRecord:
        record = self._sessions.get(session_id)
        if record is None:
            raise SessionNotFound(f"no session {session_id!r} (never created, deleted, or expired)")
        if self._expired(record, self.clock()):
            del self._sessions[session_id]
            self.on_expired(1)
            raise SessionNotFound(f"session {session_id!r} expired after {self.ttl_s:g} s idle")
        return record

    async def commit(self, record: SessionRecord, expected_revision: int) -> bool:
        stored = self._sessions.get(record.session_id)
        if stored is None:
            raise SessionNotFound(f"session {record.session_id!r} was deleted while a step ran")
        if stored.revision != expected_revision:
            return False
        self._sessions[record.session_id] = replace(record, revision=expected_revision + 1)
        self._sessions.move_to_end(record.session_id)
        return True

    async def delete(self, session_id: str) -> None:
        await self.load(session_id)  # 404 for unknown and expired ids alike
        del self._sessions[session_id]

    async def sweep(self) -> int:
        now, expired = self.clock(), 0
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if not self._expired(oldest, now):
                break
            self._sessions.popitem(last=False)
            expired += 1
        if expired:
            self.on_expired(expired)
        return expired

    async def count(self) -> int:
        return len(self._sessions)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._sessions.clear()
