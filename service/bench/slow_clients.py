"""Classify latency with slow clients held against the server, against the same server idle.

`python -m lstm_serve.bench.slow_clients --url http://127.0.0.1:8000` keeps N clients trickling a request
one header byte at a time (each reconnects when the server cuts it off, so N are always held) while one
client classifies a real test sequence back to back; then the same classify run with no tricklers.
Prints both p50/p99 and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from urllib.parse import urlsplit

import httpx
import numpy as np


async def trickle(host: str, port: int, stop: asyncio.Event, held: list[int]) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        held[0] += 1
        try:
            writer.write(b"POST /v1/classify HTTP/1.1\r\nHost: bench\r\n")
            while not stop.is_set() and not reader.at_eof():
                writer.write(b"X")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.read(65536), 1.0)
        except (ConnectionError, OSError):
            pass
        finally:
            held[0] -= 1
            writer.close()


async def classify_latencies(url: str, body: bytes, seconds: float, headers: dict[str, str]) -> np.ndarray:
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=10, headers=headers) as client:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            reply = await client.post("/v1/classify", content=body, headers={"Content-Type": "application/json"})
            reply.raise_for_status()
            latencies.append(time.perf_counter() - started)
    return np.array(latencies) * 1000


async def measure(url: str, clients: int, seconds: float, key: str | None) -> dict[str, float]:
    from lstm_serve.model.data import load_dataset

    sequence = load_dataset("japanese-vowels").test.sequences[0]
    body = json.dumps({"sequences": [sequence.tolist()]}).encode()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    idle = await classify_latencies(url, body, seconds, headers)
    parts = urlsplit(url)
    stop, held = asyncio.Event(), [0]
    tricklers = [
        asyncio.create_task(trickle(parts.hostname or "127.0.0.1", parts.port or 80, stop, held))
        for _ in range(clients)
    ]
    await asyncio.sleep(1.0)
    held_at_start = held[0]
    loaded = await classify_latencies(url, body, seconds, headers)
    stop.set()
    await asyncio.gather(*tricklers, return_exceptions=True)
    result = {
        "trickling_clients": held_at_start,
        "idle_p50_ms": float(np.percentile(idle, 50)),
        "idle_p99_ms": float(np.percentile(idle, 99)),
        "trickled_p50_ms": float(np.percentile(loaded, 50)),
        "trickled_p99_ms": float(np.percentile(loaded, 99)),
    }
    result["p99_ratio"] = result["trickled_p99_ms"] / result["idle_p99_ms"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser("lstm_serve.bench.slow_clients", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--key", default=None, help="an API key, when the server has keys")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(measure(args.url, args.clients, args.seconds, args.key)), indent=2))


if __name__ == "__main__":
    main()
