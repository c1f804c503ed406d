"""The Redis session store alone, against a private redis-server."""

import asyncio
import time

import numpy as np
import pytest

from lstm_serve.errors import SessionNotFound, StoreUnavailable, TooManySessions
from lstm_serve.state.redis import RedisSessionStore
from lstm_serve.state.sessions import new_record


def run(coro):
    return asyncio.run(coro)


def test_round_trip_of_a_record_with_state_and_response(redis_server):
    async def main():
        store = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10)
        record = await store.create(new_record("m", 3))
        state = (np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((2, 3), np.float32))
        previous = (np.full((2, 3), 0.5, np.float32), np.zeros((2, 3), np.float32))
        advanced = record.advanced(
            steps=4,
            state=state,
            last_seq=1,
            last_digest="abc",
            previous_state=previous,
            last_probabilities=np.array([0.25, 0.75], np.float32),
        )
        assert await store.commit(advanced, record)
        loaded = await store.load(record.session_id)
        await store.close()
        return loaded, advanced

    loaded, sent = run(main())
    assert (loaded.model, loaded.version, loaded.steps) == ("m", 3, 4) and loaded.revision != sent.revision
    assert (loaded.incarnation, loaded.last_seq, loaded.last_digest) == (sent.incarnation, 1, "abc")
    assert loaded.last_probabilities.tolist() == [0.25, 0.75]
    for ours, theirs in zip(loaded.state + loaded.previous_state, sent.state + sent.previous_state, strict=True):
        assert ours.dtype == np.float32 and np.array_equal(ours, theirs)


def test_commit_is_compare_and_set_across_store_instances(redis_server):
    async def main():
        a = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10)
        b = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10)  # another replica
        record = await a.create(new_record("m", 1))
        first = await a.commit(record.advanced(steps=1), record)
        second = await b.commit(record.advanced(steps=5), record)  # read the same revision
        stored = await b.load(record.session_id)
        await b.delete(record.session_id)
        with pytest.raises(SessionNotFound):
            await a.commit(stored.advanced(steps=9), stored)
        await a.close()
        await b.close()
        return first, second, stored

    first, second, stored = run(main())
    assert first and not second, "the stale write was not refused"
    assert stored.steps == 1 and stored.revision != 0


def test_max_sessions_and_ttl_expiry(redis_server):
    async def main():
        expired = []
        store = RedisSessionStore(redis_server.url, ttl_s=1, max_sessions=2, on_expired=expired.append)
        ids = [(await store.create(new_record("m", 1))).session_id for _ in range(2)]
        with pytest.raises(TooManySessions):
            await store.create(new_record("m", 1))
        await asyncio.sleep(2.2)
        with pytest.raises(SessionNotFound):
            await store.load(ids[0])
        assert await store.sweep() == 2
        assert await store.count() == 0
        await store.create(new_record("m", 1))  # room again
        await store.close()
        return expired

    assert run(main()) == [2]


def test_unreachable_redis_is_store_unavailable_not_a_crash():
    async def main():
        store = RedisSessionStore("redis://127.0.0.1:1/0", ttl_s=60, max_sessions=10, timeout_s=0.5)
        assert not await store.ping()
        with pytest.raises(StoreUnavailable) as error:
            await store.create(new_record("m", 1))
        await store.close()
        return error.value

    error = run(main())
    assert error.status == 503 and "unavailable" in error.message and "127.0.0.1" not in error.message


def test_a_deleted_session_leaves_no_commit_encoding_and_its_id_commits_again_as_a_new_session(redis_server):
    """The store keeps each live session's commit command head (its keys and incarnation, encoded once);
    a delete drops it, and a session created again under the id commits under its own incarnation."""

    async def main():
        store = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10)
        for _ in range(5):
            record = await store.create(new_record("m", 1))
            assert await store.commit(record.advanced(steps=1), record)
            await store.delete(record.session_id)
        kept_after_deletes = len(store.commit_heads)
        first = await store.create(new_record("m", 1, "oip:m:n:1"))
        assert await store.commit(first.advanced(steps=1), first)
        await store.delete("oip:m:n:1")
        again = await store.create(new_record("m", 1, "oip:m:n:1"))
        state = (np.arange(6, dtype=np.float64).reshape(3, 2).T,)  # float64, not C-contiguous
        committed = await store.commit(again.advanced(steps=2, state=state), again)
        loaded = await store.load("oip:m:n:1")
        await store.close()
        return kept_after_deletes, committed, loaded, again

    kept_after_deletes, committed, loaded, again = run(main())
    assert kept_after_deletes == 0
    assert committed and (loaded.steps, loaded.incarnation) == (2, again.incarnation)
    assert loaded.state[0].dtype == np.float32 and loaded.state[0].tolist() == [[0, 2, 4], [1, 3, 5]]


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_create_with_an_id_restarts_that_session(kind, request):
    """What an Open Inference Protocol sequence_start relies on, the same in both stores."""
    from lstm_serve.state.sessions import InMemorySessionStore

    def make_store():
        if kind == "memory":
            return InMemorySessionStore(ttl_s=60, max_sessions=1)
        return RedisSessionStore(request.getfixturevalue("redis_server").url, ttl_s=60, max_sessions=1)

    async def main():
        store = make_store()
        first = await store.create(new_record("m", 1, "oip:m:n:7"))
        state = (np.ones((2, 3), np.float32),)
        assert await store.commit(first.advanced(steps=5, state=state), first)
        stale = await store.load("oip:m:n:7")  # a step that read the old sequence, then lost the race
        restarted = await store.create(new_record("m", 1, "oip:m:n:7"))  # full store, but a restart keeps its slot
        loaded = await store.load("oip:m:n:7")
        with pytest.raises(TooManySessions):
            await store.create(new_record("m", 1))
        assert not await store.commit(stale.advanced(steps=9, state=state), stale)
        await store.close()
        return restarted, loaded, stale

    restarted, loaded, stale = run(main())
    assert restarted.session_id == loaded.session_id == "oip:m:n:7"
    assert (loaded.steps, loaded.state, loaded.incarnation) == (0, None, restarted.incarnation)
    assert restarted.incarnation != stale.incarnation


def test_the_commits_of_one_turn_go_in_one_transaction_with_one_script_call_and_each_gets_its_own_answer(
    redis_server,
):
    """A batch's sessions commit in one event-loop turn: one write, one MULTI, one COMMIT for all of them (each
    command costs Redis, which every replica shares), and still each commit its own outcome."""

    async def calls(store):
        stats = await store.client.info("commandstats")
        return {name: stats[f"cmdstat_{name}"]["calls"] for name in ("evalsha", "exec", "multi")}

    async def main():
        store = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=100)
        other = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=100)  # another replica
        records = [await store.create(new_record("m", 1)) for _ in range(8)]
        assert await other.commit(records[0].advanced(steps=9), records[0])  # records[0] is now stale
        await other.delete(records[1].session_id)  # and records[1] gone
        connection = store.lean.connection
        flushes, flush = [], connection.flush

        def counted() -> None:
            flushes.append(len(connection.waiting))
            flush()

        connection.flush = counted
        before = await calls(store)
        results = await asyncio.gather(*(store.commit(r.advanced(steps=1), r) for r in records), return_exceptions=True)
        after = await calls(store)
        connection.flush = flush
        steps = [(await store.load(r.session_id)).steps for r in records[2:]]
        await store.close()
        await other.close()
        return flushes, results, steps, {name: after[name] - before[name] for name in after}

    flushes, results, steps, commands = run(main())
    assert flushes == [1]  # one write, one round trip, for the eight
    assert commands == {"evalsha": 1, "exec": 1, "multi": 1}
    assert results[0] is False and isinstance(results[1], SessionNotFound) and results[2:] == [True] * 6
    assert steps == [1] * 6


def test_a_turns_commits_are_written_at_the_end_of_the_turn_not_a_turn_later(redis_server):
    """The batch's commits leave as soon as the turn that made them ends: each event-loop turn before the write
    (a task to send them, another to flush) held the batch's replies back, and its sessions out of the next
    batch."""

    async def main():
        store = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=100)
        records = [await store.create(new_record("m", 1)) for _ in range(3)]
        connection = store.lean.connection
        commits = [asyncio.ensure_future(store.commit(r.advanced(steps=1), r)) for r in records]
        await asyncio.sleep(0)  # the three commits join the turn
        await asyncio.sleep(0)  # the turn has ended
        written = (len(connection.waiting), len(connection.outgoing))
        results = await asyncio.gather(*commits)
        await store.close()
        return written, results

    written, results = run(main())
    assert written == (1, 0), f"{written}: (commands waiting for their answer, parts not yet written)"
    assert results == [True] * 3


@pytest.mark.parametrize("fault", ["write raises", "answer of another shape"])
def test_a_turn_whose_write_fails_or_whose_answer_is_unreadable_fails_its_commits_never_leaves_them_waiting(
    redis_server, fault
):
    """The turn is sent and answered from the event loop's callbacks: an error there must reach every commit of
    the turn (a 503 for its step), not be logged by the loop with the steps waiting forever."""

    async def main():
        store = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=100)
        records = [await store.create(new_record("m", 1)) for _ in range(2)]
        connection = store.lean.connection
        send_now = connection.send_now

        def faulty(command, replies):
            if fault == "write raises":
                raise OSError("the socket broke under the write")
            answer = asyncio.get_running_loop().create_future()
            send_now(command, replies).add_done_callback(lambda _: answer.set_result(None))  # as EXEC after WATCH
            return answer

        connection.send_now = faulty
        commits = [store.commit(r.advanced(steps=1), r) for r in records]
        outcomes = await asyncio.wait_for(asyncio.gather(*commits, return_exceptions=True), 5)
        connection.send_now = send_now
        current = await store.load(records[0].session_id)  # whether or not the unconfirmed step landed
        stepped = await store.commit(current.advanced(steps=current.steps + 1), current)  # the store steps on
        await store.close()
        return outcomes, stepped

    outcomes, stepped = run(main())
    assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes), outcomes
    assert stepped is True


def test_a_commit_cancelled_while_its_turn_waits_on_redis_leaves_the_others_of_the_turn_their_answers(redis_server):
    async def main():
        store = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=100)
        records = [await store.create(new_record("m", 1)) for _ in range(3)]
        commits = [asyncio.ensure_future(store.commit(r.advanced(steps=1), r)) for r in records]
        await asyncio.sleep(0)  # all three joined the turn, which is on its way
        commits[1].cancel()
        results = await asyncio.gather(*commits, return_exceptions=True)
        steps = [(await store.load(r.session_id)).steps for r in records]
        await store.close()
        return results, steps

    results, steps = run(main())
    assert results[0] is True and results[2] is True and isinstance(results[1], asyncio.CancelledError)
    assert steps == [1, 1, 1]  # the cancelled caller's commit had left with the others: it landed


def test_commits_go_in_one_round_trip_and_survive_a_redis_that_lost_its_scripts(redis_server):
    """A pipeline of commits is EVALSHA alone (no SCRIPT EXISTS in front of it); after SCRIPT FLUSH (as after
    a Redis restart) the NOSCRIPT answers are retried once the script is loaded again, each step applied once."""

    async def script_calls(store):
        stats = await store.client.info("commandstats")
        return {name: stats[name]["calls"] for name in stats if name.startswith("cmdstat_script")}

    async def main():
        store = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=100)
        records = [await store.create(new_record("m", 1)) for _ in range(4)]
        await store.commit(records[0].advanced(steps=1), records[0])  # loads COMMIT if this Redis lacks it
        records[0] = await store.load(records[0].session_id)
        before = await script_calls(store)
        assert all(await asyncio.gather(*(store.commit(r.advanced(steps=2), r) for r in records)))
        after_pipeline = await script_calls(store)
        await store.client.script_flush()
        records = [await store.load(r.session_id) for r in records]
        assert all(await asyncio.gather(*(store.commit(r.advanced(steps=r.steps + 1), r) for r in records)))
        views = [store.recall(r.session_id) for r in records]
        loaded = [await store.load(r.session_id) for r in records]
        again = await asyncio.gather(*(store.commit(r.advanced(steps=9), r) for r in records))
        await store.close()
        return before, after_pipeline, views, loaded, again

    before, after_pipeline, views, loaded, again = run(main())
    assert after_pipeline == before  # no SCRIPT EXISTS (nor LOAD) for a pipeline of commits
    assert [r.steps for r in loaded] == [3] * 4
    assert [r.revision for r in loaded] == [r.revision for r in views]  # the resent commit did not run twice ...
    assert again == [False] * 4  # ... nor does it now: each committed once, at the revision its store remembers


def test_a_replica_steps_from_its_last_view_and_a_stale_view_is_caught(redis_server):
    async def main():
        a = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10)
        b = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10)
        record = await a.create(new_record("m", 1))
        assert a.recall(record.session_id) == record  # no round trip for a's next step
        assert b.recall(record.session_id) is None  # b must read it
        loaded = await b.load(record.session_id)
        assert await b.commit(loaded.advanced(steps=2), loaded)
        view = a.recall(record.session_id)
        assert view is not None and view.steps == 0  # a's view is stale now ...
        assert not await a.commit(view.advanced(steps=1), view)  # ... and its commit says so
        await a.delete(record.session_id)
        assert a.recall(record.session_id) is None
        await a.close()
        await b.close()

    run(main())


def test_a_redis_restored_from_an_older_snapshot_does_not_let_a_stale_view_commit(redis_server):
    """Replica a steps a session twice; Redis then rolls back to a snapshot taken between the two (a restart
    from an older RDB, a failover to a lagging replica). Replica b steps the rolled-back session. a's view
    (after its second step) is stale, and its commit must be refused: with counted revisions, b's commit
    wrote the very revision a had seen, a's compare-and-set passed, and a's chunk landed on b's state."""

    async def main():
        a = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10)
        b = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10)
        record = await a.create(new_record("m", 1))
        key = f"lstm-serve:s:{record.session_id}"
        assert await a.commit(record.advanced(steps=1), record)
        snapshot = await a.client.dump(key)
        view = a.recall(record.session_id)
        assert await a.commit(view.advanced(steps=2), view)
        await a.client.restore(key, 60_000, snapshot, replace=True)  # Redis forgets the second step
        rolled_back = await b.load(record.session_id)
        assert rolled_back.steps == 1
        assert await b.commit(rolled_back.advanced(steps=7), rolled_back)
        stale = a.recall(record.session_id)
        assert stale is not None and stale.steps == 2
        mixed = await a.commit(stale.advanced(steps=3), stale)
        stored = await b.load(record.session_id)
        await a.close()
        await b.close()
        return mixed, stored

    mixed, stored = run(main())
    assert not mixed, "a stale view committed over another replica's step after a rollback"
    assert stored.steps == 7


def test_a_session_written_by_an_earlier_release_is_not_found_rather_than_an_error(redis_server):
    async def main():
        store = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10)
        await store.client.hset(
            "lstm-serve:s:old", mapping={"model": "m", "version": "1", "steps": "3", "revision": "2"}
        )
        with pytest.raises(SessionNotFound, match="earlier lstm-serve release"):
            await store.load("old")
        await store.close()

    run(main())


def test_a_stepped_session_stays_counted_while_its_index_is_renewed_only_once_per_slack(redis_server):
    """The index scores are upper bounds of last use, renewed by a commit only when the last one has passed:
    a session stepped for longer than its TTL is counted all along (never swept as expired), the sorted
    sets are written a few times instead of at every step, and once it idles it expires and is counted
    as expired exactly once."""

    async def zadd_calls(store):
        return (await store.client.info("commandstats")).get("cmdstat_zadd", {}).get("calls", 0)

    async def main():
        expired = []
        store = RedisSessionStore(redis_server.url, ttl_s=1.0, max_sessions=10, on_expired=expired.append)
        assert store.index_slack_s == pytest.approx(0.1)
        record = await store.create(new_record("m", 1))
        before, counts, commits = await zadd_calls(store), [], 0
        deadline = asyncio.get_running_loop().time() + 2.5  # over twice the TTL
        while asyncio.get_running_loop().time() < deadline:
            stepped = record.advanced(steps=record.steps + 1, last_used=time.time())
            assert await store.commit(stepped, record)
            record, commits = store.recall(record.session_id), commits + 1
            assert record is not None and record.steps == stepped.steps
            assert await store.sweep() == 0
            counts.append(await store.count())
            await asyncio.sleep(0.01)
        renewals = (await zadd_calls(store) - before) // 2  # the index and the owner's index
        await asyncio.sleep(1.0 + store.index_slack_s + 0.1)
        swept, left = await store.sweep(), await store.count()
        await store.close()
        return counts, commits, renewals, swept, left, expired

    counts, commits, renewals, swept, left, expired = run(main())
    assert set(counts) == {1}, "a live session dropped out of the count"
    assert 10 <= renewals <= 40 and commits > 3 * renewals, f"{renewals} index renewals for {commits} commits"
    assert (swept, left, expired) == (1, 0, [1])


def test_a_session_lives_at_least_its_ttl_after_its_last_step_and_its_expiry_is_renewed_once_per_slack(redis_server):
    """Like the index, the hash's expiry is renewed only once the last bound has passed, to TTL + slack: after
    every step the session still has at least its TTL to live (never less, whichever step renewed it last), at
    most TTL + slack, and a busy session costs Redis one expiry write per slack, not one per step."""

    async def pexpire_calls(store):
        return (await store.client.info("commandstats")).get("cmdstat_pexpire", {}).get("calls", 0)

    async def main():
        store = RedisSessionStore(redis_server.url, ttl_s=2.0, max_sessions=10)  # slack 0.2 s
        record = await store.create(new_record("m", 1))
        key = f"lstm-serve:s:{record.session_id}"
        before, lives, commits = await pexpire_calls(store), [], 0
        deadline = asyncio.get_running_loop().time() + 1.0
        while asyncio.get_running_loop().time() < deadline:
            stepped = record.advanced(steps=record.steps + 1, last_used=time.time())
            assert await store.commit(stepped, record)
            lives.append(await store.client.pttl(key))  # ms left, read right after the step
            record, commits = store.recall(record.session_id), commits + 1
            await asyncio.sleep(0.01)
        renewals = await pexpire_calls(store) - before
        await asyncio.sleep(2.0 + 0.2 + 0.1)  # TTL + slack after the last renewal, and a margin
        gone = await store.client.exists(key) == 0
        await store.close()
        return lives, commits, renewals, gone

    lives, commits, renewals, gone = run(main())
    assert min(lives) >= 2000 - 50, f"a session had {min(lives)} ms left right after a step (TTL 2000 ms)"
    assert max(lives) <= 2200, f"{max(lives)} ms: more than TTL + slack"
    assert 3 <= renewals <= 10 and commits > 3 * renewals, f"{renewals} expiry renewals for {commits} commits"
    assert gone, "the session outlived TTL + slack after its last step"


def test_errors_name_the_session_by_the_id_its_caller_knows_not_by_its_store_key(redis_server):
    async def main():
        store = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10)
        record = await store.create(new_record("m", 1, session_id="v1:owner-digest:xyz"))
        await store.delete(record.session_id)
        messages = []
        for attempt in (store.load(record.session_id), store.commit(record.advanced(steps=1), record)):
            with pytest.raises(SessionNotFound) as refused:
                await attempt
            messages.append(str(refused.value))
        await store.close()
        return messages

    loaded, committed = run(main())
    assert loaded.startswith("no session 'xyz' ") and committed.startswith("session 'xyz' was deleted")
    assert "owner-digest" not in loaded + committed


def test_a_full_redis_refuses_a_new_session_before_writing_any_of_it(redis_server):
    """A Redis over maxmemory (noeviction) refuses only a script's first command that may grow memory: the create
    script began with removals, so a full Redis still took sessions (and imported states) that could not take a
    step, and its memory grew past the limit."""
    import redis as redis_py

    admin = redis_py.Redis.from_url(redis_server.url)

    async def main():
        store = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10)
        kept = await store.create(new_record("m", 1))
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)  # every byte used is over it
        try:
            keys_before = set(admin.keys("*"))
            for _ in range(3):
                with pytest.raises(StoreUnavailable) as refused:
                    await store.create(new_record("m", 1))
                assert "refused the command (full" in refused.value.message
            assert set(admin.keys("*")) == keys_before and await store.count() == 1
        finally:
            admin.config_set("maxmemory", 0)
        await store.create(new_record("m", 1))  # room again once Redis has it
        assert await store.count() == 2 and (await store.load(kept.session_id)).steps == 0
        await store.close()

    run(main())
    admin.close()


def test_a_commit_leaves_one_record_in_the_hash_whether_it_won_lost_or_found_the_session_gone(redis_server):
    """The new record goes to Redis as a plain HSET beside the current one, and the compare-and-set script makes
    it the record or takes it back: a record as a script argument cost Redis more than the rest of a step."""
    import redis as redis_py

    admin = redis_py.Redis.from_url(redis_server.url)
    state = (np.full((4, 64), 0.5, np.float32), np.ones((4, 64), np.float32))

    async def main():
        store = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10)
        other = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10)
        record = await store.create(new_record("m", 1))
        key = f"lstm-serve:s:{record.session_id}"
        sent: list[bytes] = []
        send = store.lean.send

        async def captured(command, replies=1):
            sent.append(b"".join(command) if isinstance(command, list) else command)
            return await send(command, replies)

        store.lean.send = captured
        assert await store.commit(record.advanced(steps=1, state=state), record)
        won = await store.load(record.session_id)
        after_win = set(admin.hkeys(key))
        assert await other.commit(won.advanced(steps=2), won)
        assert not await store.commit(won.advanced(steps=9, state=state), won)  # lost: other moved it on
        after_loss = set(admin.hkeys(key))
        current = await store.load(record.session_id)
        await other.delete(record.session_id)
        with pytest.raises(SessionNotFound):
            await store.commit(current.advanced(steps=3, state=state), current)
        gone = admin.exists(key)
        await store.close()
        await other.close()
        return won, after_win, after_loss, current, gone, sent

    won, after_win, after_loss, current, gone, sent = run(main())
    fields = {b"incarnation", b"owner", b"revision", b"indexed"}
    assert after_win == fields | {b"s:%d" % won.revision} and won.steps == 1 and np.array_equal(won.state[0], state[0])
    assert after_loss == fields | {b"s:%d" % current.revision} and current.steps == 2
    assert gone == 0, "a commit to a deleted session left a hash behind"
    script_part = sent[0][sent[0].index(b"EVALSHA") :]
    assert len(script_part) < 1024 < len(sent[0]), "the record went to Redis as a script argument"
    admin.close()


def test_a_full_redis_refuses_a_step_and_the_session_stays_as_it_was(redis_server):
    import redis as redis_py

    admin = redis_py.Redis.from_url(redis_server.url)

    async def main():
        store = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10)
        record = await store.create(new_record("m", 1))
        key = f"lstm-serve:s:{record.session_id}"
        fields_before = admin.hgetall(key)
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        try:
            with pytest.raises(StoreUnavailable, match="refused the command"):
                await store.commit(record.advanced(steps=1), record)
            assert admin.hgetall(key) == fields_before
        finally:
            admin.config_set("maxmemory", 0)
        view = store.recall(record.session_id)
        assert view is not None and await store.commit(view.advanced(steps=1), view)  # the same view steps now
        assert (await store.load(record.session_id)).steps == 1
        await store.close()

    run(main())
    admin.close()


@pytest.mark.parametrize("field", ["record", "r:77"])
def test_a_session_stored_by_an_earlier_release_loads_and_steps(redis_server, field):
    """Two releases before kept the record in field `record`, the one before in r:<revision>, each with the previous
    state inside; a rolling upgrade meets their sessions."""
    import redis as redis_py

    from lstm_serve.state.redis import encode_blob

    admin = redis_py.Redis.from_url(redis_server.url)
    state = (np.full((2, 3), 0.25, np.float32), np.zeros((2, 3), np.float32))
    before = (np.full((2, 3), 0.5, np.float32), np.ones((2, 3), np.float32))
    old = new_record("m", 2).advanced(
        steps=5, state=state, revision=77, last_seq=4, last_digest="d", previous_state=before
    )
    key = f"lstm-serve:s:{old.session_id}"
    layout = {"incarnation": old.incarnation, "owner": "", "revision": "77", field: encode_blob(old)}
    admin.hset(key, mapping=layout)
    admin.zadd("lstm-serve:sessions", {old.session_id: time.time() + 1})

    async def main():
        store = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10)
        loaded = await store.load(old.session_id)
        assert await store.commit(loaded.stepped(6, before, "e", np.ones(3, np.float32), time.time()), loaded)
        stepped = await store.load(old.session_id)
        await store.close()
        return loaded, stepped

    loaded, stepped = run(main())
    assert (loaded.steps, loaded.version, loaded.revision, loaded.last_seq) == (5, 2, 77, 4)
    assert np.array_equal(loaded.state[0], state[0]) and np.array_equal(loaded.previous_state[0], before[0])
    assert stepped.steps == 6 and np.array_equal(stepped.previous_state[0], state[0])
    assert set(admin.hkeys(key)) == {b"incarnation", b"owner", b"revision", b"indexed", b"s:%d" % stepped.revision}
    admin.close()


def test_a_replica_stepping_its_own_view_sends_only_the_new_state_and_the_record_before_is_kept_for_it(redis_server):
    """A step's record holds the state after its chunk and, for a retry's per-frame outputs, the state before it:
    when that is the state this replica committed last, the record points to the record before (kept beside it,
    one step long) instead of carrying it again, half the bytes a step writes to Redis."""
    import redis as redis_py

    admin = redis_py.Redis.from_url(redis_server.url)
    imported = tuple(np.full((4, 64), 0.5, np.float32) for _ in range(2))
    states = [tuple(np.full((4, 64), k, np.float32) for _ in range(2)) for k in range(1, 5)]

    async def main():
        store = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10)
        record = await store.create(new_record("m", 1, state=imported))  # a state this store did not commit
        key = f"lstm-serve:s:{record.session_id}"
        sizes, hashes, views = [], [], []
        connection = store.lean.connection
        queue = connection.queue

        def measured(command, replies=1):
            if isinstance(command, list):  # a commit's (a script load is one command)
                sizes.append(sum(map(len, command)))
            return queue(command, replies)

        connection.queue = measured
        for k, state in enumerate(states):
            stepped = record.stepped(k + 1, state, f"d{k}", np.full(9, k, np.float32), time.time())
            assert await store.commit(stepped, record)
            record = store.recall(record.session_id)
            hashes.append(set(admin.hkeys(key)))
            views.append(await RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10).load(record.session_id))
        await store.close()
        return sizes, hashes, views

    sizes, hashes, views = run(main())
    base = {b"incarnation", b"owner", b"revision", b"indexed"}
    assert hashes[0] == base | {b"s:%d" % views[0].revision}  # the first carries its previous state
    for k in (1, 2, 3):
        assert hashes[k] == base | {b"previous", b"s:%d" % views[k].revision, b"s:%d" % views[k - 1].revision}
        assert views[k].steps == k + 1 and np.array_equal(views[k].state[0], states[k][0])
        assert np.array_equal(views[k].previous_state[0], states[k - 1][0])  # read from the record before
        assert views[k].last_seq == k and views[k].last_digest == f"d{k}"
    assert np.array_equal(views[0].previous_state[0], imported[0])
    state_bytes = 2 * 4 * 64 * 4
    assert sizes[0] > 2 * state_bytes and all(state_bytes < size < 1.5 * state_bytes for size in sizes[-3:]), sizes


def test_revisions_differ_between_processes_forked_or_spawned():
    """Revisions come from a seeded generator; a forked child carries its parent's, and must not repeat its numbers."""
    import multiprocessing

    from lstm_serve.state.redis import new_revision

    drawn = []
    for method in ("fork", "spawn"):
        with multiprocessing.get_context(method).Pool(1) as pool:
            drawn += [pool.apply(new_revision) for _ in range(4)]
        drawn += [new_revision() for _ in range(4)]  # what the parent draws next, as a forked copy would
    assert len(set(drawn)) == 16


def test_a_record_whose_state_before_it_is_missing_is_refused_not_taken_for_zeros(redis_server):
    """Only a Redis that lost part of a hash can get here (a failover to a replica behind); a retry's per-frame
    outputs would come from the wrong state, so the session is refused instead."""
    import redis as redis_py

    admin = redis_py.Redis.from_url(redis_server.url)
    state = tuple(np.full((2, 8), 0.5, np.float32) for _ in range(2))

    async def main():
        store = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10)
        record = await store.create(new_record("m", 1))
        for k in range(2):
            assert await store.commit(record.stepped(k + 1, state, "d", np.ones(3, np.float32), time.time()), record)
            record = store.recall(record.session_id)
        key = f"lstm-serve:s:{record.session_id}"
        admin.hdel(key, b"s:" + admin.hget(key, "previous"))
        with pytest.raises(StoreUnavailable, match="damaged"):
            await store.load(record.session_id)
        await store.close()

    run(main())
    admin.close()
