"""The model version tables replicas share in Redis: every write is a compare-and-set against the table the
replica planned from, so no replica's change silently overwrites another's."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading

import pytest

from lstm_serve.core.fleet import Fleet
from lstm_serve.core.inputs import Limits
from lstm_serve.core.metrics import Metrics
from lstm_serve.core.versions import VersionState, table_from_json
from lstm_serve.errors import ModelLoading
from lstm_serve.settings import Settings
from lstm_serve.state.directory import TableChanged
from lstm_serve.state.redis import RedisDirectory, RedisSessionStore
from tests.conftest import add_version, copy_model, free_port

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
        assert await b.write(MODEL, {"1": {"status": "draining"}}) > first  # planned from what it read
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


def test_the_tables_a_release_before_sha256_reads_are_what_it_wrote_and_a_sha256_never_changes(redis_server):
    """Replicas of the previous release read the tables during a rolling upgrade: the sha256 are kept in a
    hash of their own, never inside the table (the old parser took no unknown field). A version's sha256,
    once written, is never replaced; the generation moves by random steps, so after Redis comes back empty
    or from an older snapshot no replica finds the very generation it last read."""
    import redis as redis_py

    async def main():
        a = RedisDirectory(RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10))
        b = RedisDirectory(RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10))
        await a.read()
        first = await a.write(MODEL, {"1": {"status": "serving", "deadline": None, "replaced_by": None, "sha256": "x"}})
        generation, tables = await b.read()
        assert tables[MODEL]["1"]["sha256"] == "x" and generation == first
        with pytest.raises(TableChanged):  # other weights under v1
            await b.write(MODEL, {"1": {"status": "serving", "deadline": None, "replaced_by": None, "sha256": "y"}})
        second = await a.write(MODEL, {"1": {"status": "draining", "deadline": 5.0, "replaced_by": None}})
        for directory in (a, b):
            await directory.store.close()
        return first, second

    first, second = asyncio.run(main())
    assert second - first > 1 or first > 1  # random steps (1 in 2**40 to be 1)
    with redis_py.Redis.from_url(redis_server.url) as r:
        stored = json.loads(r.hget("lstm-serve:models", MODEL))
        weights = json.loads(r.hget("lstm-serve:models:sha256", MODEL))
    assert stored == {"1": {"status": "draining", "deadline": 5.0, "replaced_by": None}}
    assert weights == {"1": "x"}  # kept though the last write named none
    assert table_from_json({"1": {"status": "serving", "from_a_later_release": 1}}) == {1: VersionState("serving")}


def weights_moved(repository, version: int = 1) -> None:
    """The repository's v1 replaced by other weights under the same number (a mistake the tables must catch)."""
    other = add_version(repository, 9)
    target = repository / MODEL / str(version)
    shutil.rmtree(target)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "version": version}))
    other.rename(target)


def test_a_version_a_replica_loaded_alone_with_other_weights_stops_serving_once_it_reads_the_tables(
    redis_server, tmp_path
):
    """Replica b starts while Redis is out of reach and loads its own v1, whose weights differ from the v1 the
    others serve. Once it reads the tables it drops that v1 (a v1 session there answers 503, never a step on
    other weights), and it keeps following them."""
    first, second = copy_model(tmp_path / "a"), copy_model(tmp_path / "b")
    weights_moved(second)

    def fleet(repository, url: str) -> Fleet:
        settings = Settings(model_repository=repository, redis_url=url)
        store = RedisSessionStore(url, ttl_s=60, max_sessions=10, timeout_s=0.5)
        return Fleet(settings, Metrics(), RedisDirectory(store), Limits.from_settings(settings))

    async def main():
        a = fleet(first, redis_server.url)
        await a.start()
        b = fleet(second, f"redis://127.0.0.1:{free_port()}/0")  # nobody there
        await b.start()
        alone = b.session_model(MODEL, 1)
        b.directory = RedisDirectory(RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10))  # Redis is back
        await b.refresh()
        with pytest.raises(ModelLoading, match="other weights"):
            b.session_model(MODEL, 1)
        await a.stop()
        await b.stop()
        return alone

    alone = asyncio.run(main())
    assert alone.entry.path == second / MODEL / "1"


def test_a_table_redis_restores_from_an_older_snapshot_is_written_back_not_followed(redis_server, tmp_path):
    """Redis restored from a snapshot taken before an unload (a restart from an older RDB, a failover to a lagging
    replica): the replicas followed the older table, and the unloaded version served new sessions again. A table's
    count only grows, so one that went back is one the replicas have seen written since: they write theirs back."""
    import redis as redis_py

    repository = copy_model(tmp_path / "repository")
    add_version(repository, 2)
    settings = Settings(model_repository=repository, version_policy="all", redis_url=redis_server.url)
    keys = ("lstm-serve:models", "lstm-serve:models:generation", "lstm-serve:models:sha256", "lstm-serve:models:count")

    def fleet() -> Fleet:
        store = RedisSessionStore(redis_server.url, ttl_s=60, max_sessions=10)
        return Fleet(
            settings,
            Metrics(),
            RedisDirectory(store),
            Limits.from_settings(settings),
        )

    async def main():
        a, b = fleet(), fleet()
        await a.start()
        await b.start()
        with redis_py.Redis.from_url(redis_server.url) as r:
            snapshot = {key: r.dump(key) for key in keys}
            await a.unload(MODEL, 1)
            await b.refresh()
            for key, value in snapshot.items():  # Redis forgets the unload
                r.delete(key)
                if value is not None:
                    r.restore(key, 0, value)
            for replica in (b, a):
                await replica.refresh()
            stored = json.loads(r.hget("lstm-serve:models", MODEL))
        tables = [{v: s.status for v, s in replica.tables[MODEL].items()} for replica in (a, b)]
        await a.stop()
        await b.stop()
        return tables, {int(v): s["status"] for v, s in stored.items()}

    tables, stored = asyncio.run(main())
    assert tables == [{1: "draining", 2: "serving"}] * 2 and stored == {1: "draining", 2: "serving"}
