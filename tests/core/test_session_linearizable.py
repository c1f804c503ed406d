"""Steps, restarts and deletes of one session id, run concurrently in random interleavings, must be
explained by some sequential order of the same operations (linearizability): no chunk lands on a
session it was not sent to, none is applied twice, and a failed operation changes nothing.

The model here is a fake whose state is the history of frames it has consumed, so every result says
exactly which frames the session holds. Both stores; with Redis, two engines (two replicas) share it.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lstm_serve.core.batcher import Batcher
from lstm_serve.core.engine import Engine, LoadedModel
from lstm_serve.core.inputs import Chunk
from lstm_serve.core.metrics import Metrics
from lstm_serve.core.repository import ModelEntry
from lstm_serve.core.runner import Item, Output
from lstm_serve.errors import SessionNotFound, SessionRestarted
from lstm_serve.settings import Settings
from lstm_serve.state.redis import RedisSessionStore
from lstm_serve.state.sessions import InMemorySessionStore, new_record

CAPACITY = 64  # frames a history can hold


class HistoryRunner:
    """state = [n, tag_1, ..., tag_n]; the output after each frame is that state, so results show history."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)

    def run(self, items: list[Item]) -> list[Output]:
        outputs = []
        for item in items:
            history = item.state[0][0].copy() if item.state else np.zeros(CAPACITY + 1, np.float32)
            rows = []
            for tag in item.frames[:, 0]:
                n = int(history[0])
                history[1 + n], history[0] = tag, n + 1
                rows.append(history.copy())
            probabilities = np.array(rows)
            class_id = int(probabilities[-1].argmax())
            outputs.append(
                Output(logits=probabilities, probabilities=probabilities, state=[history[None, :]], class_id=class_id)
            )
        time.sleep(self.random.uniform(0, 0.004))  # long enough for requests to overtake each other
        return outputs


def fake_engine(store, seed: int) -> Engine:
    engine = Engine(Settings(), store, Metrics())
    config = {
        "labels": [str(i) for i in range(CAPACITY + 1)],
        "input_dim": 1,
        "state": [{"input": "h0", "output": "hn", "shape": [1, CAPACITY + 1]}],
    }
    runner = HistoryRunner(seed)
    batcher = Batcher(runner.run, max_batch_size=8)
    engine.serve([LoadedModel(ModelEntry("fake", 1, Path("."), config), runner, batcher)], "fake")  # type: ignore[arg-type]
    batcher.start()
    return engine


def history(probabilities: np.ndarray) -> tuple[int, ...]:
    return tuple(int(tag) for tag in probabilities[1 : 1 + int(probabilities[0])])


@dataclass
class Op:
    kind: str  # step, restart, delete
    tags: tuple[int, ...]
    replica: int
    delay: float
    started: float = 0.0
    ended: float = 0.0
    outcome: str = ""  # ok, not_found, restarted
    result: tuple[int, ...] = ()


async def perform(engine: Engine, key: str, op: Op) -> None:
    await asyncio.sleep(op.delay)
    op.started = time.perf_counter()
    chunk = Chunk(np.array(op.tags, np.float32)[:, None])
    model = engine.model("fake")
    try:
        if op.kind == "step":
            result = await engine.step(key, lambda _: chunk, None, False)
            op.result = history(result.probabilities)
        elif op.kind == "restart":
            op.result = history((await engine.restart(model, key, chunk, "open")).probabilities)
        else:
            await engine.delete_session(key)
        op.outcome = "ok"
    except SessionNotFound:
        op.outcome = "not_found"
    except SessionRestarted:
        op.outcome = "restarted"
    op.ended = time.perf_counter()


def explains(order: list[Op]) -> bool:
    """Does running `order` one at a time from a fresh, empty session give every observed outcome?"""
    session: tuple[int, ...] | None = ()
    for op in order:
        if op.outcome == "restarted":  # refused: changes nothing, wherever it falls
            continue
        if op.kind == "restart":
            session = op.tags
            if op.result != session:
                return False
        elif session is None:
            if op.outcome != "not_found":
                return False
        elif op.outcome == "not_found":
            return False
        elif op.kind == "step":
            session = session + op.tags
            if op.result != session:
                return False
        else:
            session = None
    return True


def linearizable(ops: list[Op]) -> bool:
    for order in itertools.permutations(ops):
        # real time: an operation that ended before another started comes first
        if all(not (b.ended < a.started) for i, a in enumerate(order) for b in order[i + 1 :]) and explains(
            list(order)
        ):
            return True
    return False


operations = st.lists(
    st.tuples(
        st.sampled_from(["step", "step", "restart", "delete"]),
        st.integers(1, 3),
        st.integers(0, 1),
        st.floats(0, 0.006, allow_subnormal=False),  # onnxruntime in this process flushes subnormals
    ),
    min_size=2,
    max_size=6,
)


async def run_interleaving(engines: list[Engine], spec: list) -> list[Op]:
    key = f"test:{uuid.uuid4().hex}"
    await engines[0].create_session(engines[0].model("fake"), key, "open")
    tags = itertools.count(1)
    ops = [
        Op(kind, tuple(next(tags) for _ in range(n)), replica % len(engines), delay) for kind, n, replica, delay in spec
    ]
    await asyncio.gather(*(perform(engines[op.replica], key, op) for op in ops))
    return ops


def check(make_stores, spec: list, seed: int) -> None:
    async def main() -> list[Op]:
        stores = make_stores()
        engines = [fake_engine(store, seed + i) for i, store in enumerate(stores)]
        try:
            return await run_interleaving(engines, spec)
        finally:
            for engine in engines:
                await engine.stop()
            for store in stores:
                await store.close()

    ops = asyncio.run(main())
    assert linearizable(ops), "no sequential order explains: " + "; ".join(
        f"{op.kind}{list(op.tags)}@{op.replica} -> {op.outcome} {list(op.result)}" for op in ops
    )


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(spec=operations, seed=st.integers(0, 2**16))
def test_memory_store_interleavings_are_linearizable(spec, seed):
    check(lambda: [InMemorySessionStore(ttl_s=60, max_sessions=10**6)], spec, seed)


@pytest.fixture(scope="module")
def shared_redis():
    from tests.conftest import RedisProcess

    process = RedisProcess().start()
    yield process
    process.stop()


@SETTINGS
@given(spec=operations, seed=st.integers(0, 2**16))
def test_redis_store_interleavings_on_two_replicas_are_linearizable(shared_redis, spec, seed):
    def stores():
        return [RedisSessionStore(shared_redis.url, ttl_s=60, max_sessions=10**6) for _ in range(2)]

    check(stores, spec, seed)


class GatedRunner(HistoryRunner):
    """Holds every batch until the test lets it go, so the test decides what happens meanwhile."""

    def __init__(self) -> None:
        super().__init__(0)
        self.entered, self.release = threading.Event(), threading.Event()

    def run(self, items: list[Item]) -> list[Output]:
        self.entered.set()
        self.release.wait(10)
        return super().run(items)


@pytest.mark.parametrize("replacement", ["restart", "delete then create"])
@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_step_never_lands_on_a_session_that_replaced_its_own(kind, replacement, request):
    """The step loads the session, its batch runs; meanwhile another replica replaces the session under the
    same id. The step's compare-and-set fails and it must not redo its chunk on the replacement."""

    async def main():
        if kind == "memory":
            shared = InMemorySessionStore(ttl_s=60, max_sessions=10)
            stores = [shared, shared]
        else:
            url = request.getfixturevalue("shared_redis").url
            stores = [RedisSessionStore(url, ttl_s=60, max_sessions=10**6) for _ in range(2)]
        a, b = fake_engine(stores[0], 0), fake_engine(stores[1], 1)
        gate = GatedRunner()
        a.models["fake"].batcher.run_batch = gate.run
        key = f"test:{uuid.uuid4().hex}"
        await a.create_session(a.model("fake"), key, "open")
        step = asyncio.create_task(a.step(key, lambda _: Chunk(np.array([[1.0]], np.float32)), None, False))
        await asyncio.to_thread(gate.entered.wait, 10)
        # the other replica, which holds no lock of a's (the store's writes are all it shares)
        if replacement == "restart":
            await stores[1].create(new_record("fake", 1, key))
        else:
            await stores[1].delete(key)
            await stores[1].create(new_record("fake", 1, key))
        gate.release.set()
        with pytest.raises(SessionRestarted, match="restarted while this chunk ran"):
            await step
        held = (await stores[1].load(key)).steps
        for engine in (a, b):
            await engine.stop()
        for store in set(stores):
            await store.close()
        return held

    assert asyncio.run(main()) == 0, "the replaced session holds a chunk that was sent to the one before it"


def test_a_step_from_a_stale_view_lands_on_a_restart_made_just_before_it_on_another_replica(shared_redis):
    """Replica a holds a view of the session from before b restarted it; the next chunk reaches a 50 ms after
    the restart (a load balancer's next pick). The chunk is for the restarted session: a compared the restart's
    time with its step's on clocks that could differ by a second, and refused it (409 session_restarted);
    each replica now measures its clock against Redis's, which they agree on within milliseconds."""

    async def main():
        stores = [RedisSessionStore(shared_redis.url, ttl_s=60, max_sessions=10**6) for _ in range(2)]
        for store in stores:
            await store.sweep()  # as every replica's sweep does once a second: the clock is sampled
        a, b = fake_engine(stores[0], 0), fake_engine(stores[1], 1)
        key = f"test:{uuid.uuid4().hex}"
        await a.create_session(a.model("fake"), key, "open")
        assert stores[0].recall(key) is not None and stores[0].clock_error_s < 0.1
        await b.create_session(b.model("fake"), key, "open")  # the restart, on the other replica
        await asyncio.sleep(0.05)
        result = await a.step(key, lambda _: Chunk(np.array([[1.0]], np.float32)), None, False)
        stored = await stores[1].load(key)
        for engine in (a, b):
            await engine.stop()
        for store in stores:
            await store.close()
        return result.steps, stored

    steps, stored = asyncio.run(main())
    assert steps == 1 and stored.steps == 1
