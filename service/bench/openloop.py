"""Open loop: one model step sent at fixed times whatever the replies, latency from the scheduled time.

A closed-loop client waits for each reply before it sends again, so a slow reply delays the requests that
would have arrived meanwhile and its slowness is counted once instead of for each of them (coordinated
omission). Here the arrival times are drawn before the run (Poisson, or evenly spaced, at the offered
rate) and every message's latency runs from its scheduled send time to its reply: a server, or a load
generator, that falls behind shows as latency, not as fewer requests.

Transport: single-frame binary messages round robin over many WebSocket sessions (64 by default), so a
message does not wait for its own session's previous reply; a server answers one session's messages in
order, so each session can still queue behind itself once a reply takes longer than the gap between that
session's messages (64 sessions at 1,000/s: 64 ms). HTTP/1.1 is not used here: one request in flight per
connection would make an open-loop generator either pipeline (served one by one per connection anyway)
or open a connection per outstanding request, which measures connection set-up.

Messages not answered by the end of the drain count with the latency they had reached then (a lower
bound) and are reported as `unanswered`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import orjson

from lstm_serve.bench.clients import HttpConnection, WebSocketConnection

BEHIND = 0.10  # a ladder stops after a rate whose replies per second fall short of the messages due by more
STOP_P99_MS = 200.0  # ... or whose p99 passes this (the curve has exploded), or that saw errors or no reply
YIELD_EVERY = 32  # sends in a row before the scheduler lets the reply readers run


class Channel(Protocol):
    """What the scheduler needs of a connection: send a message now, receive replies in order."""

    def send_binary(self, payload: bytes) -> None: ...

    async def recv(self) -> bytes: ...


@dataclass
class Record:
    """Per message, perf_counter seconds: when it was due, when it went out, when its reply came (nan: none)."""

    scheduled: np.ndarray
    sent: np.ndarray
    done: np.ndarray
    failed: np.ndarray  # bool: an error reply, or the connection closed under it
    ended: float  # end of the drain: an unanswered message's latency is counted up to here
    error_examples: list[str] = field(default_factory=list)


def arrival_offsets(rate: float, seconds: float, arrivals: str = "poisson", seed: int = 0) -> np.ndarray:
    """Send times in [0, seconds) at `rate` per second: exponential gaps (poisson) or evenly spaced."""
    if arrivals == "uniform":
        return np.arange(int(rate * seconds)) / rate
    if arrivals != "poisson":
        raise ValueError(f"arrivals: poisson or uniform, not {arrivals!r}")
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1 / rate, int(rate * seconds * 1.2) + 64))
    while times[-1] < seconds:
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1 / rate, len(times)))])
    return times[times < seconds]


async def drive(channels: list[Channel], payloads: list[bytes], scheduled: np.ndarray, drain_s: float) -> Record:
    """Send message i at scheduled[i] (absolute perf_counter time) on channel i % len(channels), whatever
    has been answered; then wait up to drain_s after the last for the outstanding replies. A sender that
    runs late sends at once, and its lateness counts in the latency (measured from scheduled[i])."""
    n, k = len(scheduled), len(channels)
    sent, done = np.full(n, np.nan), np.full(n, np.nan)
    failed = np.zeros(n, bool)
    pending: list[deque[int]] = [deque() for _ in channels]
    examples: list[str] = []
    dead: dict[int, str] = {}  # channel -> why its reader stopped; later messages for it fail at once
    outstanding, sent_all = 0, n == 0
    all_answered = asyncio.Event()

    def settle(i: int, error: str | None) -> None:
        nonlocal outstanding
        if error is None:
            done[i] = time.perf_counter()
        else:
            failed[i] = True
            if len(examples) < 3:
                examples.append(error[:200])
        outstanding -= 1
        if outstanding == 0 and sent_all:
            all_answered.set()

    async def reader(j: int) -> None:
        queue = pending[j]
        try:
            while True:
                reply = await channels[j].recv()
                if not queue:
                    continue  # a reply to nothing sent: ignore
                settle(queue.popleft(), reply[:200].decode(errors="replace") if b'"error"' in reply[:10] else None)
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as error:
            dead[j] = f"connection lost: {error!r}"
            while queue:
                settle(queue.popleft(), f"connection lost: {error!r}")

    readers = [asyncio.create_task(reader(j)) for j in range(k)]
    i = 0
    while i < n:
        burst = 0
        while i < n and scheduled[i] <= time.perf_counter() and burst < YIELD_EVERY:
            j = i % k
            outstanding += 1
            try:
                if j in dead:
                    raise ConnectionError(dead[j])
                channels[j].send_binary(payloads[i % len(payloads)])
                pending[j].append(i)
            except (ConnectionError, OSError, AssertionError) as error:
                settle(i, f"send failed: {error}")
            sent[i] = time.perf_counter()
            i += 1
            burst += 1
        if i < n:
            await asyncio.sleep(max(0.0, scheduled[i] - time.perf_counter()))
    sent_all = True
    if outstanding == 0:
        all_answered.set()
    last = scheduled[-1] if n else time.perf_counter()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_answered.wait(), max(0.0, last + drain_s - time.perf_counter()))
    ended = time.perf_counter()
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    return Record(scheduled, sent, done, failed, ended, examples)


def summarise(record: Record, offered: float, window: tuple[float, float]) -> dict:
    """The messages due inside the window: latency percentiles from their scheduled times (unanswered ones
    at what they had reached when the drain ended), and replies per second that arrived inside it."""
    lo, hi = window
    due = (record.scheduled >= lo) & (record.scheduled < hi)
    answered = ~np.isnan(record.done)
    unanswered = due & ~answered & ~record.failed
    latency_s = np.where(answered, record.done, record.ended) - record.scheduled
    counted = latency_s[due & ~record.failed] * 1000
    p50, p90, p99 = map(float, np.percentile(counted, [50, 90, 99])) if len(counted) else (float("nan"),) * 3
    lag = (record.sent - record.scheduled)[due & ~np.isnan(record.sent)] * 1000
    from_send = (record.done - record.sent)[due & answered] * 1000  # what a closed-loop client would see
    replies = int(np.count_nonzero(answered & (record.done >= lo) & (record.done < hi)))
    return {
        "offered_per_s": offered,
        "due": int(np.count_nonzero(due)),
        "window_s": hi - lo,
        "achieved_per_s": replies / (hi - lo),
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "max_ms": float(counted.max()) if len(counted) else float("nan"),
        "unanswered": int(np.count_nonzero(unanswered)),
        "errors": int(np.count_nonzero(due & record.failed)),
        "error_examples": record.error_examples,
        "generator_lag_p50_ms": float(np.percentile(lag, 50)) if len(lag) else float("nan"),
        "generator_lag_p99_ms": float(np.percentile(lag, 99)) if len(lag) else float("nan"),
        "p50_from_send_ms": float(np.percentile(from_send, 50)) if len(from_send) else float("nan"),
    }


def saturated(row: dict) -> bool:
    """Past this rate the ladder stops: replies fell behind the messages due (not the nominal rate: Poisson
    arrivals in a short window stray from it), p99 exploded, or messages failed or went unanswered."""
    return bool(
        row["achieved_per_s"] < (1 - BEHIND) * row["due"] / row["window_s"]
        or not row["p99_ms"] <= STOP_P99_MS
        or row["errors"]
        or row["unanswered"]
    )


async def point(
    host: str,
    port: int,
    frames: np.ndarray,
    rate: float,
    sessions: int,
    warmup_s: float,
    duration_s: float,
    arrivals: str = "poisson",
    drain_s: float = 2.0,
    cpu: Callable[[], float | None] = lambda: None,
) -> dict:
    """Open `sessions` sessions with a WebSocket each, offer `rate` single-frame steps per second round
    robin over them for warm-up + duration, count the messages due in the measured window. CPU of the
    server (`cpu`) and of this process is read at the window's start and end."""
    conn = await HttpConnection(host, port).connect()
    ids, channels = [], []
    try:
        for _ in range(sessions):
            status, body = await conn.request("POST", "/v1/sessions", b"{}")
            if status != 201:
                raise RuntimeError(f"open loop: creating a session gave {status} {body[:120]!r}")
            ids.append(orjson.loads(body)["session_id"])
            channels.append(await WebSocketConnection(host, port, f"/v1/sessions/{ids[-1]}/stream").connect())
        payloads = [frame.astype("<f4").tobytes() for frame in frames]
        start = time.perf_counter() + 0.05
        window = (start + warmup_s, start + warmup_s + duration_s)
        scheduled = start + arrival_offsets(rate, warmup_s + duration_s, arrivals, seed=int(rate))
        marks: list[tuple[float | None, float, float]] = []

        async def mark_window() -> None:
            for at in window:
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                times = time.process_time()
                marks.append((cpu(), times, time.perf_counter()))

        marking = asyncio.create_task(mark_window())
        record = await drive(list(channels), payloads, scheduled, drain_s)
        await marking
    finally:
        for ws in channels:
            await ws.close()
        for sid in ids:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                await conn.request("DELETE", f"/v1/sessions/{sid}")
        await conn.close()
    row = summarise(record, rate, window)
    (server0, own0, t0), (server1, own1, t1) = marks
    row["sessions"], row["arrivals"] = sessions, arrivals
    row["server_cpu_pct"] = (
        round(100 * (server1 - server0) / (t1 - t0), 1) if server0 is not None and server1 is not None else None
    )
    row["loadgen_cpu_pct"] = round(100 * (own1 - own0) / (t1 - t0), 1)
    return row
