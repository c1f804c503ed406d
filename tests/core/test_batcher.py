"""The batcher alone, with a fake model."""

import asyncio
import threading
import time

import pytest

from lstm_serve.core.batcher import Batcher
from lstm_serve.errors import Overloaded


class Recorder:
    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.thread_ids: set[int] = set()

    def __call__(self, items: list[int]) -> list[int]:
        self.thread_ids.add(threading.get_ident())
        self.batches.append(list(items))
        time.sleep(self.delay)
        return [x * 10 for x in items]


async def with_batcher(model, **kwargs) -> Batcher:
    batcher = Batcher(model, **kwargs)
    batcher.start()
    return batcher


def test_concurrent_submits_form_a_batch_and_each_gets_its_own_result():
    async def main():
        model = Recorder()
        batcher = await with_batcher(model, max_batch_size=8, max_delay_s=0.05)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
        await batcher.stop()
        return model, results

    model, results = asyncio.run(main())
    assert results == [i * 10 for i in range(20)]
    assert max(len(b) for b in model.batches) == 8, "no full batch formed"
    assert sorted(x for b in model.batches for x in b) == list(range(20))
    assert threading.get_ident() not in model.thread_ids, "the model ran on the event loop thread"


def test_items_arriving_while_a_batch_runs_are_gathered_into_the_next():
    async def main():
        model = Recorder(delay=0.05)
        batcher = await with_batcher(model, max_batch_size=64, max_delay_s=0.0)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)  # the first batch (one item) is running now
        rest = await asyncio.gather(*(batcher.submit(i) for i in range(1, 11)))
        await first
        await batcher.stop()
        return model, rest

    model, rest = asyncio.run(main())
    assert rest == [i * 10 for i in range(1, 11)]
    assert model.batches[0] == [0] and model.batches[1] == list(range(1, 11))


def test_a_failing_batch_fails_every_caller_and_the_loop_goes_on():
    calls = []

    def flaky(items):
        calls.append(items)
        if len(calls) == 1:
            raise ValueError("boom")
        return items

    async def main():
        batcher = await with_batcher(flaky, max_batch_size=4, max_delay_s=0.05)
        first = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
        second = await batcher.submit(7)
        await batcher.stop()
        return first, second

    first, second = asyncio.run(main())
    assert all(isinstance(e, ValueError) and str(e) == "boom" for e in first)
    assert second == 7


def test_a_model_returning_the_wrong_count_is_an_error_not_a_misrouted_result():
    async def main():
        batcher = await with_batcher(lambda items: items[:-1], max_batch_size=4, max_delay_s=0.05)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
        await batcher.stop()
        return results

    for result in asyncio.run(main()):
        assert isinstance(result, RuntimeError) and "2 results for 3 items" in str(result)


def test_full_queue_refuses_with_overloaded_and_retry_after():
    async def main():
        batcher = await with_batcher(Recorder(delay=0.2), max_batch_size=1, max_queue_length=2)
        running = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.05)
        queued = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(3)
        await asyncio.gather(running, *queued)
        await batcher.stop()
        return refused.value

    error = asyncio.run(main())
    assert error.status == 503 and error.headers["Retry-After"] == "1"


def test_stop_finishes_queued_work_first():
    async def main():
        batcher = await with_batcher(Recorder(delay=0.02), max_batch_size=2)
        pending = [asyncio.create_task(batcher.submit(i)) for i in range(6)]
        await asyncio.sleep(0)
        await batcher.stop()
        return [p.result() for p in pending]

    assert asyncio.run(main()) == [0, 10, 20, 30, 40, 50]


def test_a_lone_cheap_item_runs_at_once_and_a_burst_is_still_batched():
    async def main():
        model = Recorder(delay=0.01)
        batcher = await with_batcher(model, max_batch_size=8, cheap=lambda items: sum(items) < 100)
        alone = await batcher.submit(3)  # idle and cheap: on the event loop, no hand-off
        on_loop = threading.get_ident() in model.thread_ids
        model.thread_ids.clear()
        expensive = await batcher.submit(500)  # idle but not cheap: the worker thread
        burst = await asyncio.gather(*(batcher.submit(i) for i in range(100, 112)))  # no batch of them is cheap
        await batcher.stop()
        return model, alone, on_loop, expensive, burst

    model, alone, on_loop, expensive, burst = asyncio.run(main())
    assert alone == 30 and on_loop, "a lone cheap item should run on the event loop"
    assert expensive == 5000 and burst == [i * 10 for i in range(100, 112)]
    assert threading.get_ident() not in model.thread_ids, "an expensive batch ran on the event loop"
    assert max(len(b) for b in model.batches[2:]) > 1, f"the burst was not batched: {model.batches}"


def test_a_cheap_batch_runs_on_the_event_loop_and_an_expensive_one_in_the_thread():
    async def main():
        model = Recorder(delay=0.01)
        batcher = await with_batcher(model, max_batch_size=8, cheap=lambda items: sum(items) < 100)
        small = await asyncio.gather(*(batcher.submit(i) for i in range(1, 6)))  # one batch, 15 in all: cheap
        threads_of_small = set(model.thread_ids)
        model.thread_ids.clear()
        large = await asyncio.gather(*(batcher.submit(i) for i in range(60, 64)))  # 246 in all: not cheap
        await batcher.stop()
        return model, small, threads_of_small, large

    model, small, threads_of_small, large = asyncio.run(main())
    assert small == [10, 20, 30, 40, 50] and large == [600, 610, 620, 630]
    assert sorted(model.batches[0]) == [1, 2, 3, 4, 5], f"the cheap items were not batched together: {model.batches}"
    assert threads_of_small == {threading.get_ident()}, "the cheap batch did not run on the event loop"
    assert threading.get_ident() not in model.thread_ids, "the expensive batch ran on the event loop"


class Timeline(Recorder):
    """A Recorder that notes when each batch started."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(delay)
        self.started: list[float] = []

    def __call__(self, items: list[int]) -> list[int]:
        self.started.append(time.perf_counter())
        return super().__call__(items)


def test_batches_that_queued_while_the_thread_ran_follow_there_without_the_event_loop():
    """The worker thread takes the next batch from the queue itself: with the event loop blocked (as busy
    with other callbacks), onnxruntime still goes from one batch to the next."""

    async def main():
        model = Timeline(delay=0.05)
        batcher = await with_batcher(model, max_batch_size=4, cheap=lambda items: sum(items) < 100)
        first = asyncio.create_task(batcher.submit(1000))
        await asyncio.sleep(0.01)  # the first batch runs in the thread now
        queued = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3, 4, 5, 200, 201, 202, 203)]
        await asyncio.sleep(0)  # each queued
        time.sleep(0.4)  # the event loop is blocked: nothing of it hands a batch over
        released = time.perf_counter()
        results = await asyncio.gather(first, *queued)
        await batcher.stop()
        return model, results, released

    model, results, released = asyncio.run(main())
    assert results == [10000, 10, 20, 30, 40, 50, 2000, 2010, 2020, 2030]
    assert model.batches == [[1000], [1, 2, 3, 4], [5, 200, 201, 202], [203]]
    assert all(started < released for started in model.started), "a batch waited for the event loop"
    assert threading.get_ident() not in model.thread_ids, "a batch ran on the event loop"


def test_in_the_thread_a_failed_batch_fails_its_callers_only_and_a_cancelled_item_is_skipped():
    calls: list[list[int]] = []

    def model(items: list[int]) -> list[int]:
        calls.append(list(items))
        time.sleep(0.03)
        if 13 in items:
            raise ValueError("boom")
        return items

    async def main():
        batcher = await with_batcher(model, max_batch_size=2)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)
        queued = [asyncio.create_task(batcher.submit(i)) for i in (11, 12, 13, 14, 15, 16)]
        await asyncio.sleep(0)
        queued[1].cancel()  # 12: its caller went away while it waited
        outcomes = await asyncio.gather(first, *queued, return_exceptions=True)
        after = await batcher.submit(7)
        await batcher.stop()
        return outcomes, after

    outcomes, after = asyncio.run(main())
    assert calls == [[0], [11, 13], [14, 15], [16], [7]]
    assert outcomes[0] == 0 and isinstance(outcomes[2], asyncio.CancelledError)
    assert all(isinstance(outcomes[k], ValueError) for k in (1, 3)), "11 and 13 were one batch"
    assert outcomes[4:] == [14, 15, 16] and after == 7


def test_an_item_alone_runs_without_yielding_and_one_that_is_not_yields_a_turn_first():
    """`alone` (no other message waiting, core/batcher.arrivals) skips the turn of the event loop that lets
    requests arriving together queue and batch."""

    async def main():
        model = Recorder()
        batcher = await with_batcher(model, max_batch_size=8, cheap=lambda items: sum(items) < 100)
        turns = []
        loop = asyncio.get_running_loop()
        loop.call_soon(turns.append, "alone")
        alone = await batcher.submit(3, alone=True)
        ran_before_alone = list(turns)
        await asyncio.sleep(0)
        loop.call_soon(turns.append, "not alone")
        yielded = await batcher.submit(4)
        await batcher.stop()
        return alone, ran_before_alone, yielded, turns

    alone, ran_before_alone, yielded, turns = asyncio.run(main())
    assert (alone, yielded) == (30, 40)
    assert ran_before_alone == [], "an item alone waited for a turn of the event loop"
    assert turns == ["alone", "not alone"], "an item not known to be alone ran without letting others queue"


def test_stop_answers_items_gathering_for_a_batch_and_refuses_new_ones():
    async def main():
        model = Recorder()
        batcher = await with_batcher(model, max_batch_size=8, max_delay_s=0.5)
        gathering = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0.05)  # taken from the queue, waiting for the batch to fill
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):  # not taken, to be left unanswered once the loop is gone
            await asyncio.wait_for(batcher.submit(3), 2)
        await asyncio.wait_for(stopping, 2)
        return await asyncio.wait_for(asyncio.gather(*gathering), 2), model.batches

    results, batches = asyncio.run(main())
    assert results == [10, 20] and batches == [[1, 2]]


def test_with_a_queue_delay_what_queued_during_a_batch_still_waits_to_fill():
    """max_delay_s is a promise to wait for fuller batches: the worker thread does not run a short one it
    finds queued at once, it leaves it to the event loop's wait."""

    async def main():
        model = Recorder(delay=0.05)
        batcher = await with_batcher(model, max_batch_size=8, max_delay_s=0.3)
        first = asyncio.create_task(batcher.submit(1))  # runs at ~0.3 s, until ~0.35 s
        await asyncio.sleep(0.32)
        second = asyncio.create_task(batcher.submit(2))  # queued while the first runs
        await asyncio.sleep(0.13)
        third = asyncio.create_task(batcher.submit(3))  # within the second's wait to fill
        results = await asyncio.gather(first, second, third)
        await batcher.stop()
        return results, model.batches

    results, batches = asyncio.run(main())
    assert results == [10, 20, 30] and batches == [[1], [2, 3]], batches
