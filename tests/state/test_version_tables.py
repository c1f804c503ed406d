"""The model version tables replicas share in Redis: every write is a compare-and-set against the table the
replica planned from, so no replica's change silently overwrites another's."""

from __future__ import annotations

import asyncio
import threading

import pytest

from lstm_serve.core.fleet import Fleet
from lstm_serve.core.inputs import Limits
from lstm_serve.core.metrics import Metrics
from lstm_serve.settings import Settings
from lstm_serve.state.directory import TableChanged
from lstm_serve.state.redis import RedisDirectory, RedisSessionStore
from tests.conftest import add_version, copy_model

MODEL = "japanese-vowels"


def test_a_table_written_by_another_replica_since_this_one_read_it_is_not_overwritten(redis_server):
    async def main():
        a = RedisDirectory(RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10))
        b = RedisDirectory(RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10))
        assert await a.read() == (0, {})
        await b.read()
        first = await a.write(MODEL, {"1": {"status": "serving"}})
        with pytest.raises(TableChanged):  # b planned from the empty table
            await b.write(MODEL, {"2": {"status": "serving"}})
        generation, tables = await b.read()
        assert (generation, tables) == (first, {MODEL: {"1": {"status": "serving"}}})
        assert await b.write(MODEL, {"1": {"status": "draining"}}) == first + 1  # planned from what it read
        with pytest.raises(TableChanged):
            await a.write(MODEL, {"1": {"status": "serving"}})
        for directory in (a, b):
            await directory.store.close()

    asyncio.run(main())


def test_a_poll_that_planned_before_an_unload_does_not_undo_it(redis_server, tmp_path):
    """Replica b's repository poll finds v3 and plans from the tables as they were (v1 and v2 serving); while
    it builds v3, replica a unloads v2. b's write must not put v2 back: it reads the tables again and plans
    anew (v3 serving, v2 still draining)."""
    repository = copy_model(tmp_path / "repository")
    add_version(repository, 2)
    settings = Settings(model_repository=repository, version_policy="all", redis_url=redis_server.url)

    def fleet() -> Fleet:
        store = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10)
        return Fleet(settings, Metrics(), RedisDirectory(store), Limits.from_settings(settings))

    async def main():
        a, b = fleet(), fleet()
        await a.start()
        await b.start()
        add_version(repository, 3)
        building, unloaded = threading.Event(), threading.Event()
        build = b.build

        def held_build(entry):
            building.set()
            assert unloaded.wait(30)
            return build(entry)

        b.build = held_build  # type: ignore[method-assign]
        poll = asyncio.create_task(b.poll())
        await asyncio.to_thread(building.wait, 30)
        await a.unload(MODEL, 2)
        unloaded.set()
        await poll
        await a.sync()
        tables = {name: {v: s.status for v, s in a.tables[name].items()} for name in a.tables}
        await a.stop()
        await b.stop()
        return tables, {v: s.status for v, s in b.tables[MODEL].items()}

    on_a, on_b = asyncio.run(main())
    assert on_a[MODEL] == on_b == {1: "serving", 2: "draining", 3: "serving"}
