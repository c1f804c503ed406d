"""The in-memory session store alone, with a fake clock."""

import asyncio

import numpy as np
import pytest

from lstm_serve.errors import SessionNotFound, TooManySessions
from lstm_serve.state.sessions import InMemorySessionStore, KeyedLocks, new_record


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_store(**kwargs):
    clock, expired = Clock(), []
    store = InMemorySessionStore(ttl_s=10, max_sessions=3, on_expired=expired.append, clock=clock, **kwargs)
    return store, clock, expired


async def create(store, clock):
    return await store.create(new_record("m", 1, now=clock.now))


def test_ids_are_unguessable_and_unique():
    async def main():
        store, clock, _ = make_store()
        return [(await create(store, clock)).session_id for _ in range(3)]

    ids = asyncio.run(main())
    assert len(set(ids)) == 3 and all(len(i) >= 32 for i in ids)  # 24 random bytes, base64url


def test_idle_sessions_expire_after_the_ttl_and_are_swept():
    async def main():
        store, clock, expired = make_store()
        a = await create(store, clock)
        clock.now += 5
        b = await create(store, clock)
        clock.now += 6  # a is 11 s idle, b 6 s
        assert await store.sweep() == 1
        with pytest.raises(SessionNotFound):
            await store.load(a.session_id)
        assert (await store.load(b.session_id)).session_id == b.session_id
        clock.now += 10
        with pytest.raises(SessionNotFound, match="expired"):
            await store.load(b.session_id)
        return expired

    assert asyncio.run(main()) == [1, 1]


def test_a_committed_step_keeps_a_session_alive():
    async def main():
        store, clock, _ = make_store()
        record = await create(store, clock)
        clock.now += 9
        assert await store.commit(record.advanced(last_used=clock.now, steps=1), record)
        clock.now += 9
        return await store.load(record.session_id)

    assert asyncio.run(main()).steps == 1


def test_full_store_answers_too_many_sessions_and_never_evicts():
    async def main():
        store, clock, _ = make_store()
        kept = [await create(store, clock) for _ in range(3)]
        with pytest.raises(TooManySessions) as refused:
            await create(store, clock)
        for record in kept:
            await store.load(record.session_id)
        return refused.value

    assert asyncio.run(main()).status == 429


def test_commit_is_compare_and_set_on_the_revision():
    async def main():
        store, clock, _ = make_store()
        record = await create(store, clock)
        state = (np.ones((2, 4), np.float32),)
        assert await store.commit(record.advanced(steps=3, state=state), record)
        assert not await store.commit(record.advanced(steps=5), record), "a stale write was accepted"
        return await store.load(record.session_id)

    stored = asyncio.run(main())
    assert stored.steps == 3 and stored.revision == 1


def test_keyed_locks_serialise_one_key_and_are_dropped_after_use():
    async def main():
        locks, order = KeyedLocks(), []

        async def worker(key, tag):
            async with locks(key):
                order.append(f"{tag}+")
                await asyncio.sleep(0.01)
                order.append(f"{tag}-")

        await asyncio.gather(worker("a", 1), worker("a", 2), worker("b", 3))
        return locks, order

    locks, order = asyncio.run(main())
    assert len(locks) == 0
    a_events = [e for e in order if e[0] in "12"]
    assert a_events in (["1+", "1-", "2+", "2-"], ["2+", "2-", "1+", "1-"])


def test_a_keyed_lock_waiter_cancelled_in_line_or_after_its_turn_never_strands_the_key():
    """Cancelling a waiter removes it from the line; cancelling one that was just handed the lock (before it
    resumed) passes the lock on. Either way the next waiter runs and the key is dropped at the end."""

    async def main():
        locks, order = KeyedLocks(), []

        async def worker(tag):
            async with locks("a"):
                order.append(tag)

        await locks.acquire("a")  # held here
        in_line, handed, last = (asyncio.create_task(worker(t)) for t in ("in line", "handed", "last"))
        for _ in range(3):
            await asyncio.sleep(0)  # all three wait in line
        in_line.cancel()
        await asyncio.sleep(0)
        locks.release("a")  # hands the lock to `handed`...
        handed.cancel()  # ...which is cancelled before it resumes: the lock must go on to `last`
        results = await asyncio.wait_for(asyncio.gather(in_line, handed, last, return_exceptions=True), 5)
        return locks, order, results

    locks, order, results = asyncio.run(main())
    assert order == ["last"]
    assert [type(r).__name__ for r in results] == ["CancelledError", "CancelledError", "NoneType"]
    assert len(locks) == 0


def test_errors_name_the_session_by_the_id_its_caller_knows_not_by_its_store_key():
    async def main():
        store, clock, _ = make_store()
        with pytest.raises(SessionNotFound) as unknown:
            await store.load("v1:owner-digest:abc")
        record = await store.create(new_record("m", 1, now=clock.now, session_id="v1:owner-digest:xyz"))
        clock.now += 11
        with pytest.raises(SessionNotFound) as expired:
            await store.load(record.session_id)
        return str(unknown.value), str(expired.value)

    unknown, expired = asyncio.run(main())
    assert unknown.startswith("no session 'abc' ") and expired.startswith("session 'xyz' expired")
    assert "owner-digest" not in unknown + expired
