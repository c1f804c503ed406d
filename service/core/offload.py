"""Decoding large request bodies without stalling the event loop.

A JSON parser holds the interpreter for a whole document: a 6.5 MB body takes 50-120 ms in one call, and
whichever thread that call runs in, the event loop answers nothing meanwhile (not even /healthz). So a
body up to `inline_bytes` is decoded where it arrives (a few milliseconds at most), and a larger one in a
decode process: this interpreter then only copies the bytes out and the checked arrays back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from lstm_serve.errors import Overloaded

log = logging.getLogger("lstm_serve")
T = TypeVar("T")

INLINE_BYTES = 512 * 1024
STALL_S = 5.0  # a 6.5 MB body decodes in 50-120 ms


def ready() -> bool:
    return True


def exit_with(server_pid: int) -> None:
    """In the decode process: exit when the server process is gone, however it went (even SIGKILL), so no
    decode process outlives its server holding the server's stdout and stderr open."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(server_pid, 0)
            except ProcessLookupError:
                os._exit(0)

    threading.Thread(target=watch, name="server-watch", daemon=True).start()


def decode_pool() -> ProcessPoolExecutor:
    # forkserver: the server process has threads (batchers, onnxruntime), which a plain fork would copy
    return ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("forkserver"),
        initializer=exit_with,
        initargs=(os.getpid(),),
    )


def unread(future: asyncio.Future[Any]) -> None:
    """Marks an abandoned body's outcome read, so a failure there is not logged as never retrieved."""
    if not future.cancelled():
        future.exception()


def undecoded() -> Overloaded:
    return Overloaded(
        "the server's decode process stopped answering and was replaced; send the request again",
        headers={"Retry-After": "1"},
    )


class Decoder:
    """`stall_s`: a decode process that has finished nothing for this long while a body waited on it is
    stalled (stopped, swapped out, or on a body that takes that long): it is killed and replaced, and the
    bodies that waited on it are answered 503 with Retry-After. Never decoded here instead: a body that
    stalls or kills the decode process would stall (or kill) the server. Measured from its last progress,
    not from a body's arrival, so a queue of large bodies behind it is no stall."""

    def __init__(self, inline_bytes: int = INLINE_BYTES, stall_s: float = STALL_S) -> None:
        self.inline_bytes, self.stall_s = inline_bytes, stall_s
        self.pool: ProcessPoolExecutor | None = None
        self.outstanding: set[Future[Any]] = set()  # submitted to the decode process, not finished yet
        self.progressed = time.monotonic()  # when it last finished one, or took one while idle

    async def start(self) -> None:
        """Start the decode process and wait until it answers, so the first large body pays no start-up."""
        self.pool = decode_pool()
        await asyncio.wrap_future(self.pool.submit(ready))

    async def run(self, size: int, work: Callable[..., T], *args: Any) -> T:
        """work(*args): inline for a body of `size` bytes up to inline_bytes, else in the decode process.
        `work` and its arguments must be picklable (module-level functions, plain data)."""
        pool = self.pool
        if size <= self.inline_bytes or pool is None:
            return work(*args)
        if not self.outstanding:
            self.progressed = time.monotonic()
        try:
            submitted = pool.submit(work, *args)
            self.outstanding.add(submitted)
            submitted.add_done_callback(self.finished)
            result = asyncio.wrap_future(submitted)
            while True:
                deadline = self.progressed + self.stall_s  # a stall is judged from the last progress, by any body
                try:
                    return await asyncio.wait_for(asyncio.shield(result), max(0.01, deadline - time.monotonic()))
                except TimeoutError:
                    if time.monotonic() - self.progressed >= self.stall_s:
                        result.add_done_callback(unread)  # it breaks with the process
                        self.replace(pool, f"finished nothing in {self.stall_s:g} s (stalled)")
                        raise undecoded() from None
                except asyncio.CancelledError:
                    if result.cancelled() and self.pool is not pool:  # queued on a stalled process, since replaced
                        raise undecoded() from None
                    result.add_done_callback(unread)  # this request was cancelled: nobody reads what comes back
                    raise
        except BrokenProcessPool:  # the decode process died (killed, out of memory): another one takes over
            self.replace(pool, "died")
            raise undecoded() from None

    def finished(self, future: Future[Any]) -> None:
        """In the executor's thread: a body came back (one a caller gave up on before it ran is no progress)."""
        self.outstanding.discard(future)
        if not future.cancelled():
            self.progressed = time.monotonic()

    def replace(self, pool: ProcessPoolExecutor, what: str) -> None:
        """Kill `pool`'s process and start another, once (the bodies that waited on it all come here)."""
        if self.pool is not pool:
            return
        log.error("the decode process %s; starting another (the bodies it held are answered 503)", what)
        processes = getattr(pool, "_processes", None) or {}  # the executor does not offer a kill
        for process in list(processes.values()):
            with contextlib.suppress(OSError):
                process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        self.pool, self.outstanding = decode_pool(), set()

    def stop(self) -> None:
        """Stop the decode process and wait for it to exit (a body it was decoding is at most ~100 ms)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
