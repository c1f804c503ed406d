"""Large bodies are decoded in a decode process, small ones where they arrive; errors come back whole."""

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest

from lstm_serve.core.offload import Decoder
from lstm_serve.errors import Overloaded, SequenceConflict


def process_id(body: bytes) -> int:
    return os.getpid()


def slow_process_id(body: bytes) -> int:
    time.sleep(0.25)
    return os.getpid()


def refuse(body: bytes) -> None:
    raise SequenceConflict("no", headers={"Retry-After": "1"}, expected_seq=7)


@contextlib.asynccontextmanager
async def started(inline_bytes: int = 0, stall_s: float = 5.0) -> AsyncIterator[Decoder]:
    decoder = Decoder(inline_bytes=inline_bytes, stall_s=stall_s)
    await decoder.start()
    try:
        yield decoder
    finally:
        decoder.stop()


async def stop_its_process(decoder: Decoder) -> int:
    """SIGSTOP, not a kill: the decode process is alive and answers nothing. Its pid."""
    worker = await decoder.run(1, process_id, b"")
    os.kill(worker, signal.SIGSTOP)
    return worker


def test_a_large_body_is_decoded_in_another_process_and_a_small_one_here():
    async def main():
        async with started(inline_bytes=1000) as decoder:
            return [await decoder.run(size, process_id, b"") for size in (10, 1000, 1001, 6_500_000)]

    here = os.getpid()
    small, limit, over, large = asyncio.run(main())
    assert small == limit == here and over == large != here


def test_an_error_raised_in_the_decode_process_arrives_with_its_details():
    async def main():
        async with started() as decoder:
            await decoder.run(1, refuse, b"")

    with pytest.raises(SequenceConflict) as raised:
        asyncio.run(main())
    assert (raised.value.message, raised.value.headers, raised.value.details) == (
        "no",
        {"Retry-After": "1"},
        {"expected_seq": 7},
    )


def test_a_dead_decode_process_is_replaced():
    async def main():
        async with started() as decoder:
            worker = await decoder.run(1, process_id, b"")
            os.kill(worker, 9)
            await asyncio.sleep(0.5)
            with pytest.raises(Overloaded, match="send the request again"):  # 503: never decoded in the server
                await decoder.run(1, process_id, b"")
            return worker, await decoder.run(1, process_id, b"")

    worker, new = asyncio.run(main())
    assert new not in (worker, os.getpid())


def test_a_stalled_decode_process_is_replaced_and_the_bodies_waiting_on_it_answered_503():
    """Bodies waiting on a stopped decode process are answered 503 (retry) once it has finished nothing for
    stall_s, never decoded in the server (a body that stalls the decode process would stall the server), and
    a new process takes the next ones."""

    async def main():
        async with started(stall_s=1.0) as decoder:
            worker = await stop_its_process(decoder)
            begun = time.monotonic()
            waited = await asyncio.gather(*(decoder.run(1, process_id, b"") for _ in range(3)), return_exceptions=True)
            took = time.monotonic() - begun
            return worker, waited, took, await decoder.run(1, process_id, b"")

    worker, waited, took, new = asyncio.run(main())
    assert all(isinstance(w, Overloaded) for w in waited) and took < 5, waited
    assert new not in (worker, os.getpid())
    with pytest.raises(ProcessLookupError):  # killed, not left stopped
        for _ in range(50):
            os.kill(worker, 0)
            time.sleep(0.1)


def test_a_queue_of_bodies_longer_than_the_stall_limit_is_not_a_stall():
    async def main():
        async with started(stall_s=1.0) as decoder:
            return await asyncio.gather(*(decoder.run(1, slow_process_id, b"") for _ in range(12)))  # 3 s

    answered = asyncio.run(main())
    assert len(set(answered)) == 1 and answered[0] != os.getpid()


def test_callers_that_give_up_on_a_stalled_decode_process_do_not_keep_it_from_being_replaced():
    async def main():
        async with started(stall_s=1.0) as decoder:
            worker = await stop_its_process(decoder)
            for _ in range(2):  # each gives up before stall_s, and a new one comes
                with contextlib.suppress(TimeoutError, Overloaded):
                    await asyncio.wait_for(decoder.run(1, process_id, b""), 0.7)
            begun = time.monotonic()
            answered = await decoder.run(1, process_id, b"")
            return worker, answered, time.monotonic() - begun

    worker, answered, took = asyncio.run(main())
    assert answered != worker and took < 0.5, took  # replaced as soon as the stall was 1 s old
