"""Decoding large request bodies without stalling the event loop.

A JSON parser holds the interpreter for a whole document: a 6.5 MB body takes 50-120 ms in one call, and
whichever thread that call runs in, the event loop answers nothing meanwhile (not even /healthz). So a
body up to `inline_bytes` is decoded where it arrives (a few milliseconds at most), and a larger one in a
decode process: this interpreter then only copies the bytes out and the checked arrays back.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

log = logging.getLogger("lstm_serve")
T = TypeVar("T")

INLINE_BYTES = 512 * 1024


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


class Decoder:
    def __init__(self, inline_bytes: int = INLINE_BYTES) -> None:
        self.inline_bytes = inline_bytes
        self.pool: ProcessPoolExecutor | None = None

    async def start(self) -> None:
        """Start the decode process and wait until it answers, so the first large body pays no start-up."""
        self.pool = decode_pool()
        await asyncio.wrap_future(self.pool.submit(ready))

    async def run(self, size: int, work: Callable[..., T], *args: Any) -> T:
        """work(*args): inline for a body of `size` bytes up to inline_bytes, else in the decode process.
        `work` and its arguments must be picklable (module-level functions, plain data)."""
        if size <= self.inline_bytes or self.pool is None:
            return work(*args)
        try:
            return await asyncio.wrap_future(self.pool.submit(work, *args))
        except BrokenProcessPool:  # the decode process died (killed, out of memory): another one takes over
            log.error("the decode process died; starting another, and decoding this body here")
            self.pool = decode_pool()
            return work(*args)

    def stop(self) -> None:
        """Stop the decode process and wait for it to exit (a body it was decoding is at most ~100 ms)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
