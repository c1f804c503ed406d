"""Closed-loop workloads: each virtual client sends, waits for the answer, and sends again.

A point runs `concurrency` clients for warm-up + duration seconds; only requests started inside the
measured window count. Latency is per request (per frame for streams).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import orjson

from lstm_serve.bench.clients import CallbackWebSocket, HttpConnection, masked_frame


@dataclass
class Samples:
    started: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)

    def ok(self, started: float, finished: float) -> None:
        self.started.append(started)
        self.latency.append(finished - started)

    def failed(self, what: str) -> None:
        self.errors += 1
        if len(self.error_examples) < 3:
            self.error_examples.append(what[:200])


# a virtual client: (samples, deadline), sending until the deadline
Client = Callable[[Samples, float], Awaitable[None]]
# streams one session: (conn, session id, index of its test sequence, samples, deadline)
Stream = Callable[[HttpConnection, str, int, Samples, float], Awaitable[None]]


@dataclass
class PointResult:
    workload: str
    concurrency: int
    duration_s: float
    requests: int
    errors: int
    throughput: float  # requests (or frames) per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    error_examples: list[str]


def summarise(workload: str, concurrency: int, samples: Samples, window: tuple[float, float]) -> PointResult:
    lo, hi = window
    started = np.array(samples.started)
    latency = np.array(samples.latency)[(started >= lo) & (started < hi)] * 1000
    pct = np.percentile(latency, [50, 90, 99]) if len(latency) else [float("nan")] * 3
    p50, p90, p99 = map(float, pct)
    return PointResult(
        workload,
        concurrency,
        hi - lo,
        len(latency),
        samples.errors,
        len(latency) / (hi - lo),
        p50,
        p90,
        p99,
        samples.error_examples,
    )


async def run_point(
    client: Client, concurrency: int, warmup_s: float, duration_s: float
) -> tuple[Samples, tuple[float, float]]:
    samples = Samples()
    start = time.perf_counter()
    deadline = start + warmup_s + duration_s
    await asyncio.gather(*(client(samples, deadline) for _ in range(concurrency)))
    return samples, (start + warmup_s, start + warmup_s + duration_s)


def classify_client(host: str, port: int, bodies: list[bytes], offset: int = 0) -> Client:
    """Each client cycles through the test sequences, one sequence per request."""
    counter = iter(range(offset, 1 << 62))

    async def client(samples: Samples, deadline: float) -> None:
        conn = await HttpConnection(host, port).connect()
        requests = [conn.encode("POST", "/v1/classify", body) for body in bodies]
        k = next(counter)
        try:
            while (now := time.perf_counter()) < deadline:
                status, body = await conn.send(requests[k % len(requests)])
                k += 7
                if status == 200:
                    samples.ok(now, time.perf_counter())
                else:
                    samples.failed(f"{status} {body[:120]!r}")
        finally:
            await conn.close()

    return client


def frames_json(frame: np.ndarray, seq: int) -> bytes:
    return orjson.dumps({"inputs": [frame.tolist()], "seq": seq})


def session_client(host: str, port: int, stream: Stream) -> Client:
    """A client that starts a session, streams test sequences through `stream`, ends the session, repeats."""
    counter = iter(range(1 << 62))

    async def client(samples: Samples, deadline: float) -> None:
        conn = await HttpConnection(host, port).connect()
        k = next(counter)
        try:
            while time.perf_counter() < deadline:
                status, body = await conn.request("POST", "/v1/sessions", b"{}")
                if status != 201:
                    samples.failed(f"create {status} {body[:120]!r}")
                    continue
                sid = orjson.loads(body)["session_id"]
                await stream(conn, sid, k, samples, deadline)
                await conn.request("DELETE", f"/v1/sessions/{sid}")
                k += 7
        finally:
            await conn.close()

    return client


def stream_http_client(host: str, port: int, sequences: list[np.ndarray], use_seq: bool = True) -> Client:
    """One session per sequence, one frame per request, one request in flight per session."""

    async def stream(conn: HttpConnection, sid: str, first: int, samples: Samples, deadline: float) -> None:
        path = f"/v1/sessions/{sid}/steps"
        for t, frame in enumerate(sequences[first % len(sequences)]):
            payload = frames_json(frame, t) if use_seq else orjson.dumps({"inputs": [frame.tolist()]})
            raw = conn.encode("POST", path, payload)
            now = time.perf_counter()
            if now >= deadline:
                return
            status, body = await conn.send(raw)
            if status == 200:
                samples.ok(now, time.perf_counter())
            else:
                samples.failed(f"step {status} {body[:120]!r}")

    return session_client(host, port, stream)


def stream_ws_client(host: str, port: int, sequences: list[np.ndarray], sequences_per_session: int = 1) -> Client:
    """Like stream_http_client, over one WebSocket per session, binary float32 frames (encoded once, before
    the clients start). With sequences_per_session > 1 a session streams that many test sequences back to
    back (a steady stream, like a wearable's), so connection set-up no longer dominates."""
    encoded = [[masked_frame(frame.astype("<f4").tobytes()) for frame in sequence] for sequence in sequences]

    def answered(samples: Samples) -> Callable[[float, float, bytes], None]:
        def on_answer(started: float, finished: float, reply: bytes) -> None:
            if b'"error"' in reply[:10]:
                samples.failed(reply[:120].decode(errors="replace"))
            else:
                samples.ok(started, finished)

        return on_answer

    async def stream(conn: HttpConnection, sid: str, first: int, samples: Samples, deadline: float) -> None:
        frames = [f for j in range(sequences_per_session) for f in encoded[(first + j) % len(encoded)]]
        ws = await CallbackWebSocket().connect(conn.host, conn.port, f"/v1/sessions/{sid}/stream")
        try:
            await ws.exchange(frames, deadline, answered(samples))
        finally:
            await ws.close()

    return session_client(host, port, stream)
