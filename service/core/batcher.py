"""Dynamic batching: a bounded queue of (item, future) and one loop that runs them in batches.

The loop takes everything already queued (up to max_batch_size), optionally waits up to max_delay
for more, runs the batch in a worker thread (the event loop keeps serving), and resolves every
future: with its own result, or with the batch's exception. While one batch runs, the next one
gathers, so batches grow with load and a quiet server pays no wait. The worker thread takes the next
batch from the queue itself as soon as one ends, until the queue is empty: were the event loop to hand
over each batch, onnxruntime would wait for it to come round, behind every callback already due (at
saturation a few milliseconds a batch). With a max_delay, a batch that is not full goes back to the
event loop, which waits for it to fill.

A batch that is `cheap` (a few frames in all: a few hundred microseconds of onnxruntime at most) that the
event loop takes from the queue runs on the event loop instead: handing it to the worker thread and back
(two wake-ups across threads, and the interpreter lock changing hands) costs about as much as the run,
and when every core is busy (several workers, Redis, the clients) the thread wins no parallel time to pay
for it. Long batches (a classify of whole sequences) still run in the thread while the loop serves I/O;
a cheap batch that queued while the thread ran follows there, the hand-off already paid.

Nor the queue: a cheap item that finds nothing queued or running first yields once to the event loop,
so that requests arriving with it queue behind it; if it is still alone, it runs at once. Only one item
at a time may try this: under load the others queue and are batched as before. A caller that knows no
other request is waiting (`alone`: `arrivals` counts what the server has read and no handler has taken
yet) skips the yield, a turn of the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from lstm_serve.errors import Overloaded

In = TypeVar("In")
Out = TypeVar("Out")


class Arrivals:
    """Messages this process has read off its sockets that no handler has taken yet, as the server's
    WebSocket protocol counts them (one event loop per process: a plain number)."""

    __slots__ = ("waiting",)

    def __init__(self) -> None:
        self.waiting = 0


arrivals = Arrivals()


class BatchObserver(Protocol):
    def batch_done(self, size: int, queue_waits: list[float], run_seconds: float) -> None: ...


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]
    enqueued: float


class Batcher(Generic[In, Out]):
    def __init__(
        self,
        run_batch: Callable[[list[In]], list[Out]],
        max_batch_size: int = 64,
        max_delay_s: float = 0.0,
        max_queue_length: int = 2048,
        observer: BatchObserver | None = None,
        name: str = "batcher",
        cheap: Callable[[list[In]], bool] | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_length = max_queue_length
        self.observer = observer
        self.name = name
        # the queue: a deque and one future the loop waits on when it is empty (an asyncio.Queue's put and
        # get cost several times more, for getters and joiners this loop does not have)
        self.pending: deque[_Pending[In, Out]] = deque()
        self.wakeup: asyncio.Future[None] | None = None
        self.drained: asyncio.Future[None] | None = None  # stop() waits on it for the queue to empty
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.task: asyncio.Task | None = None
        self.cheap = cheap
        self.running = False  # a batch is in the worker thread
        self.inline_pending = False  # an item is looking whether it may run inline
        self.collecting: list[_Pending[In, Out]] = []  # taken from the queue, waiting up to max_delay for more
        self.closing = False  # stop() has begun: nothing new is taken

    @property
    def queued(self) -> int:
        return len(self.pending)

    async def submit(self, item: In, alone: bool = False) -> Out:
        """The item's result, from a batch. `alone`: the caller knows of no other request waiting to be
        handled, so a cheap item on an idle batcher runs at once."""
        if self.closing or self.task is None or self.task.done():
            raise Overloaded(f"{self.name} is not running", headers={"Retry-After": "1"})
        if self.cheap is not None and not self.inline_pending and self.idle and self.cheap([item]):
            if alone:
                return self.run_inline(item)
            self.inline_pending = True
            try:
                await asyncio.sleep(0)  # whatever arrived with this item queues now, and is batched
                if self.idle:
                    return self.run_inline(item)
            finally:
                self.inline_pending = False
        if len(self.pending) >= self.max_queue_length:
            raise Overloaded(
                f"the {self.name} queue is full ({self.max_queue_length} waiting); retry shortly",
                headers={"Retry-After": "1"},
            )
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self.pending.append(_Pending(item, future, time.perf_counter()))
        self.wake()
        return await future

    def wake(self) -> None:
        wakeup, self.wakeup = self.wakeup, None
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing running, and no wait configured for batches to fill."""
        return not self.running and not self.pending and not self.max_delay_s

    def run_inline(self, item: In) -> Out:
        started = time.perf_counter()
        try:
            (result,) = self.run_batch([item])
        finally:
            if self.observer is not None:
                self.observer.batch_done(1, [0.0], time.perf_counter() - started)
        return result

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        """Take nothing new, finish everything already taken (queued, running, or gathering for a batch),
        then stop. Should the loop have died, what it left is refused rather than left unanswered."""
        self.closing = True
        if self.task is not None:
            if (self.pending or self.running or self.collecting) and not self.task.done():
                self.drained = asyncio.get_running_loop().create_future()
                await asyncio.wait([self.drained, self.task], return_when=asyncio.FIRST_COMPLETED)
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None
        stranded, self.collecting = [*self.collecting, *self.pending], []
        self.pending.clear()
        for p in stranded:
            if not p.future.done():
                p.future.set_exception(Overloaded(f"{self.name} stopped; retry", headers={"Retry-After": "1"}))
        self.executor.shutdown(wait=True)

    async def _wait(self, timeout: float | None) -> None:
        """Until an item is submitted, or `timeout` seconds have passed."""
        loop = asyncio.get_running_loop()
        self.wakeup = wakeup = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, self.wake)
        try:
            await wakeup
        finally:
            if timer is not None:
                timer.cancel()

    async def _collect(self) -> list[_Pending[In, Out]]:
        while not self.pending:
            if self.drained is not None and not self.drained.done():
                self.drained.set_result(None)
            await self._wait(None)
        deadline = time.perf_counter() + self.max_delay_s
        batch = self.collecting = [self.pending.popleft()]  # stop() waits for these too
        while len(batch) < self.max_batch_size:
            if self.pending:
                batch.append(self.pending.popleft())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            await self._wait(remaining)
        self.collecting = []
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [p for p in batch if not p.future.cancelled()]
            if live:
                await self._run(loop, live)
            del batch, live  # the outputs are their callers' now: hold none of them while the next batch gathers
            if not self.pending and self.drained is not None and not self.drained.done():
                self.drained.set_result(None)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[In, Out]]) -> None:
        self.running = True
        try:
            items = [p.item for p in batch]
            if self.cheap is not None and self.cheap(items):
                self._settle(batch, *self._attempt(batch, items))
            else:
                await loop.run_in_executor(self.executor, self._drain, loop, batch)
        finally:
            self.running = False

    def _attempt(self, batch: list[_Pending[In, Out]], items: list[In]) -> tuple[list[Out] | Exception, float, float]:
        """The batch's results (of `items`, its items), or the exception it failed with; when it started and
        ended."""
        started = time.perf_counter()
        try:
            results = self.run_batch(items)
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: model returned {len(results)} results for {len(batch)} items")
        except Exception as error:  # every caller hears about a failed batch; none is left hanging
            return error, started, time.perf_counter()
        return results, started, time.perf_counter()

    def _drain(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[In, Out]]) -> None:
        """In the worker thread: `batch`, then whatever queued while it ran, batch after batch until the
        queue is empty, each one's outcome handed to the event loop as it ends."""
        while batch:
            loop.call_soon_threadsafe(self._settle, batch, *self._attempt(batch, [p.item for p in batch]))
            batch = []
            while self.pending and len(batch) < self.max_batch_size:
                p = self.pending.popleft()  # a deque's append and popleft are atomic: submit may append meanwhile
                if not p.future.cancelled():
                    batch.append(p)
            if batch and self.max_delay_s and len(batch) < self.max_batch_size:
                self.pending.extendleft(reversed(batch))  # back to the event loop, which waits max_delay to fill it
                return

    def _settle(
        self, batch: list[_Pending[In, Out]], outcome: list[Out] | Exception, started: float, ended: float
    ) -> None:
        """On the event loop: each caller gets its result, or the batch's exception."""
        if self.observer is not None:
            self.observer.batch_done(len(batch), [started - p.enqueued for p in batch], ended - started)
        if isinstance(outcome, Exception):
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(outcome)
            return
        for p, result in zip(batch, outcome, strict=True):
            if not p.future.done():
                p.future.set_result(result)
