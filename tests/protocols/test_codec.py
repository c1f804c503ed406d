"""Large bodies are decoded off the event loop; small ones where they are."""

import asyncio
import threading

from lstm_serve.protocols.codec import OFF_LOOP_BYTES, decode


def test_a_large_body_is_decoded_in_a_worker_thread_and_a_small_one_inline():
    async def main():
        loop_thread = threading.get_ident()
        where = {}

        def decoder(body: bytes) -> int:
            where[len(body)] = threading.get_ident() != loop_thread
            return len(body)

        sizes = [100, OFF_LOOP_BYTES - 1, OFF_LOOP_BYTES, 6_500_000]
        results = await asyncio.gather(*(decode(b" " * size, decoder) for size in sizes))
        return results, where, sizes

    results, where, sizes = asyncio.run(main())
    assert results == sizes
    assert where == {100: False, OFF_LOOP_BYTES - 1: False, OFF_LOOP_BYTES: True, 6_500_000: True}


def test_the_event_loop_keeps_running_while_a_large_body_decodes():
    async def main():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        await decode(b" " * OFF_LOOP_BYTES, lambda body: threading.Event().wait(0.2))
        ticker.cancel()
        return ticks

    assert asyncio.run(main()) > 50, "the loop stood still while the body decoded"
