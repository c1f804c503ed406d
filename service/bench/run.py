"""`lstm-serve bench`: run the workloads against lstm-serve and the afternoon baseline, then report.

    lstm-serve bench                    # starts both servers on loopback, writes service/bench/results/
    lstm-serve bench --url http://127.0.0.1:8000 --baseline-url http://127.0.0.1:8001

Per concurrency level: requests/s (frames/s for streams), p50/p90/p99 latency, errors, the
server's mean batch size and queue wait (from /metrics), CPU of server and load generator; plus
onnxruntime in-process at the batch sizes the server formed, and stateless replay versus a step.

The servers a ratio compares are measured in --rounds alternating rounds (A B, B A, A B, ...) of
duration / rounds each, not one after the other: this shared machine's speed flips between two rates
about 1.8x apart, for one to ten seconds at a time, and short alternating rounds let a flip fall on both
sides of a ratio alike. A point reports the requests of all its rounds over their summed time and the
median of their percentiles. For the same reason onnxruntime in-process, which the classify point at the
highest concurrency (saturation) is compared with, is measured between that point's rounds, each time
at the batch size the round formed and for as long as the round; the other points' in-process figures
are measured after the run.

Two more parts, each on by default and skipped with its flag:
  open loop (--no-open-loop): one model step (a single-frame WebSocket message) offered at a ladder of
    rates whatever the replies, latency from each message's scheduled time (bench/openloop.py);
  sessions in Redis (--no-redis): the stream workloads at --redis-levels sessions against three
    lstm-serve set-ups started here, one worker with sessions in memory, one worker on Redis and two
    workers on Redis, with a private redis-server on a free port (--save "" --appendonly no).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import orjson

from lstm_serve.bench import openloop, report
from lstm_serve.bench.clients import HttpConnection
from lstm_serve.bench.workloads import (
    Client,
    classify_client,
    run_point,
    stream_http_client,
    stream_ws_client,
    summarise,
)

ROOT = Path(__file__).resolve().parents[2]
TICKS = os.sysconf("SC_CLK_TCK")
STEADY_SEQUENCES = 20  # test sequences streamed back to back in one session for the steady-stream point
SERVE = [sys.executable, "-m", "lstm_serve.cli", "serve"]
SERVE_ENV = {"LSTM_SERVE_DRAIN_DELAY_S": "0"}  # a server started here stops at once (no load balancer to drain)
ROUND_WARMUP_S = 0.3
# a process started here (server, redis-server) gets this long after SIGTERM before it is killed: a server
# has no drain delay and nothing in flight when stopped, and its shutdown timeout is 30 s by default
STOP_GRACE_S = 45.0
REDIS_SETUPS = [  # (name, sessions in Redis, workers)
    ("memory, 1 worker", False, 1),
    ("redis, 1 worker", True, 1),
    ("redis, 2 workers", True, 2),
]


@dataclass
class BenchConfig:
    url: str | None = None  # a running lstm-serve; started on loopback when omitted
    baseline_url: str | None = None  # a running baseline; started on loopback when omitted
    model_dir: str = "models/japanese-vowels/1"
    classify_levels: list[int] = field(default_factory=lambda: [1, 4, 16, 64, 128])
    stream_levels: list[int] = field(default_factory=lambda: [1, 16, 64, 256])
    replay_lengths: list[int] = field(default_factory=lambda: [1, 10, 100, 1000])
    warmup_s: float = 1.0  # before a point's first round; later rounds warm up for at most ROUND_WARMUP_S
    duration_s: float = 5.0  # measured seconds per point, over all its rounds
    rounds: int = 6  # alternating rounds per point of the servers a ratio compares
    replay_repeats: int = 40
    out_dir: str = "service/bench/results"
    # open loop: offered single-frame steps per second, each server's ladder stopping past saturation
    open_loop: bool = True
    open_loop_rates: list[int] = field(default_factory=lambda: [250, 500, 1000, 2000, 4000, 6000, 8000, 12000, 16000])
    open_loop_sessions: int = 64
    open_loop_arrivals: str = "poisson"
    # sessions in Redis: concurrent sessions per point, for memory x1, Redis x1 and Redis x2 workers
    redis: bool = True
    redis_levels: list[int] = field(default_factory=lambda: [64])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its live descendants (uvicorn's workers run as children of its supervisor)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += cpu_seconds(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # gone between the listing and the read
    return total


class Server:
    """A server under test: started here (so its CPU can be read) or reached at a URL."""

    def __init__(self, name: str, url: str | None, command: list[str], env: dict | None = None) -> None:
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.has_metrics = int((env or {}).get("LSTM_SERVE_WORKERS", "1")) == 1  # a scrape reaches one worker
        self.metrics_conn: HttpConnection | None = None
        if url is None:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            self.proc = subprocess.Popen(
                [*command, "--port", str(port)],
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() can end its workers with it
            )
        parsed = urlparse(url)
        if parsed.hostname is None or parsed.port is None:
            raise ValueError(f"{name}: {url!r} needs a host and a port (http://host:port)")
        self.url, self.host, self.port = url, parsed.hostname, parsed.port

    async def wait_ready(self, path: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                conn = await HttpConnection(self.host, self.port).connect()
                status, _ = await conn.request("GET", path)
                await conn.close()
                if status == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name} at {self.url} not ready")

    def cpu(self) -> float | None:
        return tree_cpu_seconds(self.proc.pid) if self.proc else None

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc, self.name)


class RedisServer:
    """A private redis-server on a free loopback port, no persistence (never the machine's shared one)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, as every process stop_process ends
        )

    async def wait_ready(self, timeout: float = 10) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"PING\r\n")
                pong = await reader.readline()
                writer.close()
                if pong.startswith(b"+PONG"):
                    return
            except OSError:
                pass
            await asyncio.sleep(0.05)
        raise TimeoutError(f"redis-server on port {self.port} did not start")

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc, f"redis-server on port {self.port}")


def stop_process(proc: subprocess.Popen[bytes], name: str, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM, then SIGKILL to its whole process group (started with start_new_session) if it has not
    exited within grace_s. Never raises: one process slow to stop must not leave the others (a
    redis-server, another server) running."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
        return
    except subprocess.TimeoutExpired:
        print(f"{name} (pid {proc.pid}) did not stop within {grace_s:g} s of SIGTERM; killed", file=sys.stderr)
    with contextlib.suppress(ProcessLookupError):  # the whole group ended between the wait and the kill
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def scrape(server: Server) -> dict[str, float]:
    """Sums and counts of the batch-size and queue-wait histograms (a server without /metrics: {}).
    One kept-alive connection: a new one would queue behind the load being measured."""
    values: dict[str, float] = {}
    if not server.has_metrics:
        return values
    if server.metrics_conn is None:
        server.metrics_conn = await HttpConnection(server.host, server.port).connect()
    status, body = await server.metrics_conn.request("GET", "/metrics")
    if status != 200:
        server.has_metrics = False
        return values
    for line in body.decode().splitlines():
        for key in (
            "lstm_serve_batch_size_sum",
            "lstm_serve_batch_size_count",
            "lstm_serve_queue_wait_seconds_sum",
            "lstm_serve_queue_wait_seconds_count",
        ):
            if line.startswith(key + "{"):
                values[key] = values.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def server_side(before: dict, after: dict) -> dict:
    if not before or not after:
        return {}
    batches = after["lstm_serve_batch_size_count"] - before["lstm_serve_batch_size_count"]
    items = after["lstm_serve_batch_size_sum"] - before["lstm_serve_batch_size_sum"]
    waits = after["lstm_serve_queue_wait_seconds_count"] - before["lstm_serve_queue_wait_seconds_count"]
    wait_s = after["lstm_serve_queue_wait_seconds_sum"] - before["lstm_serve_queue_wait_seconds_sum"]
    return {
        "mean_batch_size": items / batches if batches else None,
        "mean_queue_wait_ms": 1000 * wait_s / waits if waits else None,
    }


async def measure(
    server: Server,
    workload: str,
    client: Client,
    concurrency: int,
    cfg: BenchConfig,
    also: dict[str, Callable[[], float]] | None = None,
    quiet: bool = False,
) -> dict:
    """One point (or one round of it). Server metrics and CPU are read at the start and the end of the
    measured window; `also`: other processes' CPU seconds (redis-server), reported as <name>_cpu_pct."""
    snapshots: list[tuple[dict, float | None, os.times_result, float]] = []
    others: list[dict[str, float]] = []

    async def snapshot() -> None:  # CPU first: the scrape itself waits in the server's queue under load
        cpu, times, now = server.cpu(), os.times(), time.perf_counter()
        others.append({name: read() for name, read in (also or {}).items()})
        snapshots.append((await scrape(server), cpu, times, now))

    async def snapshot_window() -> None:
        await asyncio.sleep(cfg.warmup_s)
        await snapshot()
        await asyncio.sleep(max(0.0, window_end() - time.perf_counter()))
        await snapshot()

    started = time.perf_counter()
    window_end = lambda: started + cfg.warmup_s + cfg.duration_s  # noqa: E731

    snapshotter = asyncio.create_task(snapshot_window())
    samples, window = await run_point(client, concurrency, cfg.warmup_s, cfg.duration_s)
    await snapshotter
    (before, cpu_before, times_before, t0), (after, cpu_after, times_after, t1) = snapshots
    result = asdict(summarise(workload, concurrency, samples, window))
    result["server"] = server.name
    result.update(server_side(before, after))
    own = (times_after.user + times_after.system) - (times_before.user + times_before.system)
    result["loadgen_cpu_pct"] = round(100 * own / (t1 - t0), 1)
    result["server_cpu_pct"] = (
        round(100 * (cpu_after - cpu_before) / (t1 - t0), 1)
        if cpu_after is not None and cpu_before is not None
        else None
    )
    for name in also or {}:
        result[f"{name}_cpu_pct"] = round(100 * (others[1][name] - others[0][name]) / (t1 - t0), 1)
    if not quiet:
        print_point(result)
    return result


def print_point(result: dict) -> None:
    others = [key[: -len("_cpu_pct")] for key in result if key.endswith("_cpu_pct")]
    others = [name for name in others if name not in ("server", "loadgen")]
    rounds = result.get("round_throughputs")
    print(
        f"  {result['server']:9s} {result['workload']:12s} c={result['concurrency']:<4d} {result['throughput']:8.0f}/s "
        f"p50 {result['p50_ms']:6.2f} p99 {result['p99_ms']:7.2f} ms  err {result['errors']}  "
        f"batch {result.get('mean_batch_size') or 0:5.1f}  cpu srv {result['server_cpu_pct']}% "
        f"gen {result['loadgen_cpu_pct']}%"
        + "".join(f" {name} {result[f'{name}_cpu_pct']}%" for name in others)
        + (f"  rounds {'/'.join(f'{t:.0f}' for t in rounds)}" if rounds and len(rounds) > 1 else ""),
        flush=True,
    )


# (server, a new client for it, other processes' CPU to report)
Run = tuple["Server", Callable[[], Client], dict[str, Callable[[], float]] | None]


async def measure_rounds(
    runs: list[Run],
    workload: str,
    concurrency: int,
    cfg: BenchConfig,
    ceiling: Callable[[dict], float] | None = None,
) -> list[dict]:
    """One point for each run, in cfg.rounds alternating rounds (the order reversed every other round),
    so that the machine's drift falls on every run alike; each run's rounds combined (combine_rounds).
    `ceiling`: onnxruntime in-process items/s measured right after each round of the first run, given that
    round (its batch size and duration), so the share of it the server reached is measured at one time."""
    per_run: list[list[dict]] = [[] for _ in runs]
    ceilings: list[float] = []
    rounds = max(1, cfg.rounds)
    for k in range(rounds):
        warmup = cfg.warmup_s if k == 0 else min(cfg.warmup_s, ROUND_WARMUP_S)
        round_cfg = replace(cfg, duration_s=cfg.duration_s / rounds, warmup_s=warmup)
        order = list(range(len(runs)))
        for i in order if k % 2 == 0 else order[::-1]:
            server, client, also = runs[i]
            per_run[i].append(await measure(server, workload, client(), concurrency, round_cfg, also, quiet=True))
            if i == 0 and ceiling is not None:
                ceilings.append(ceiling(per_run[0][-1]))
    points = [combine_rounds(results) for results in per_run]
    if ceilings:
        limit = float(np.mean(ceilings))
        points[0].update(
            onnxruntime_items_per_s=limit,
            fraction_of_onnxruntime=points[0]["throughput"] / limit,
            onnxruntime_between_rounds=True,
        )
    for point in points:
        print_point(point)
    return points


def combine_rounds(results: list[dict]) -> dict:
    """A point from its rounds: counts summed, throughput, batch, queue wait and CPU averaged, each latency
    percentile the median of the rounds'."""
    point = dict(results[0])
    point["duration_s"] = round(sum(r["duration_s"] for r in results), 6)  # the windows carry float noise
    point["requests"] = sum(r["requests"] for r in results)
    point["errors"] = sum(r["errors"] for r in results)
    point["error_examples"] = [e for r in results for e in r["error_examples"]][:3]
    point["round_throughputs"] = [r["throughput"] for r in results]
    point["throughput"] = point["requests"] / point["duration_s"] if point["duration_s"] else 0.0
    for key in ("p50_ms", "p90_ms", "p99_ms"):
        point[key] = float(np.median([r[key] for r in results]))
    for key in {k for r in results for k in r if k.endswith("_cpu_pct") or k.startswith("mean_")}:
        values = [r[key] for r in results if r.get(key) is not None]
        point[key] = round(float(np.mean(values)), 3) if values else None
    return point


async def replay(server: Server, sequences: list[np.ndarray], cfg: BenchConfig) -> list[dict]:
    """p50 cost of the prediction after frame t: re-send all t frames (stateless), versus one step on a
    session that already holds t-1 frames. All sessions of every t are brought to t-1 frames first; the
    timed steps then go round the lengths (t=1, t=10, ..., t=1, ...), so no timed step follows its own big
    set-up request, and the machine's drift over the minute falls on every t alike."""
    long = np.concatenate(sequences * (1 + max(cfg.replay_lengths) // sum(map(len, sequences))))
    conn = await HttpConnection(server.host, server.port).connect()
    rows, sessions = [], []
    for t in cfg.replay_lengths:
        history = long[:t]
        body = orjson.dumps({"sequences": [history.tolist()]})
        classify_raw = conn.encode("POST", "/v1/classify", body)
        stateless, ids = [], []
        for _ in range(cfg.replay_repeats):
            start = time.perf_counter()
            status, _ = await conn.send(classify_raw)
            stateless.append(time.perf_counter() - start)
            assert status == 200, status
            status, created = await conn.request("POST", "/v1/sessions", b"{}")
            sid = orjson.loads(created)["session_id"]
            if t > 1:
                await conn.request("POST", f"/v1/sessions/{sid}/steps", frames_body(history[: t - 1]))
            ids.append(sid)
        sessions.append(ids)
        rows.append({"t": t, "body_bytes": len(body), "stateless_p50_ms": 1000 * float(np.median(stateless))})
    stateful: list[list[float]] = [[] for _ in cfg.replay_lengths]
    for k in range(cfg.replay_repeats):
        for i, t in enumerate(cfg.replay_lengths):
            step_raw = conn.encode("POST", f"/v1/sessions/{sessions[i][k]}/steps", frames_body(long[t - 1 : t]))
            start = time.perf_counter()
            status, _ = await conn.send(step_raw)
            stateful[i].append(time.perf_counter() - start)
            assert status == 200, status
    for sid in (sid for ids in sessions for sid in ids):
        await conn.request("DELETE", f"/v1/sessions/{sid}")
    for row, times in zip(rows, stateful, strict=True):
        row["stateful_step_p50_ms"] = 1000 * float(np.median(times))
        print(
            f"  replay t={row['t']:<5d} stateless {row['stateless_p50_ms']:7.2f} ms ({row['body_bytes']} B)  "
            f"session step {row['stateful_step_p50_ms']:6.2f} ms",
            flush=True,
        )
    await conn.close()
    return rows


def frames_body(frames: np.ndarray) -> bytes:
    return orjson.dumps({"inputs": frames.tolist()})


class InProcess:
    """onnxruntime in-process, as the server runs it (one intra-op thread), on the test sequences: the
    ceiling a served throughput is compared with."""

    def __init__(self, model_dir: str, sequences: list[np.ndarray]) -> None:
        from lstm_serve.core.repository import load_entry
        from lstm_serve.core.runner import OnnxRunner

        self.runner = OnnxRunner(load_entry(ROOT / model_dir), "cpu", 1)
        self.sequences = sequences

    def items_per_s(self, batch_size: int, frames: int | None, seconds: float = 1.5) -> float:
        """Items per second at this batch size. frames=None: whole test sequences (classify, no state kept,
        as the server's classify); frames=1: one step from a carried state (stream)."""
        from lstm_serve.core.runner import Item

        rng = np.random.default_rng(0)
        state = [rng.normal(size=s["shape"]).astype(np.float32) for s in self.runner.state_specs]
        batches = []
        for _ in range(16):
            picks = rng.integers(0, len(self.sequences), batch_size)
            batches.append(
                [
                    Item(self.sequences[i], None, keep_state=False)
                    if frames is None
                    else Item(self.sequences[i][:frames], state)
                    for i in picks
                ]
            )
        self.runner.run(batches[0])
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            self.runner.run(batches[done % len(batches)])
            done += 1
        return done * batch_size / (time.perf_counter() - start)


async def wrk_check(server: Server, bodies: list[bytes], connections: int, cfg: BenchConfig) -> dict | None:
    """The classify point again with wrk (C, one thread), to show the Python load generator is not
    what limits the numbers. wrk sends one fixed sequence; ours cycles through the test split."""
    import shutil
    import tempfile

    if shutil.which("wrk") is None:
        return None  # optional: the check runs where wrk is installed (apt-get install wrk)
    body = sorted(bodies, key=len)[len(bodies) // 2]  # a median-length sequence
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = [==[{body.decode()}]==]\n"
        )
    proc = await asyncio.create_subprocess_exec(
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(cfg.duration_s))}s",
        "--latency",
        "-s",
        script.name,
        f"{server.url}/v1/classify",
        stdout=asyncio.subprocess.PIPE,
    )
    out = (await proc.communicate())[0].decode()
    os.unlink(script.name)
    rps = next((float(line.split()[1]) for line in out.splitlines() if line.startswith("Requests/sec")), None)
    if rps is None:
        print(f"  wrk gave no result: {out[-300:]!r}", flush=True)
        return None
    p99 = next((line.split()[1] for line in out.splitlines() if line.strip().startswith("99%")), None)
    errors = next((int(line.split()[-1]) for line in out.splitlines() if "Non-2xx" in line), 0)
    print(
        f"  {server.name:9s} wrk classify  c={connections:<4d} {rps or 0:8.0f}/s p99 {p99} errors {errors}", flush=True
    )
    return {"server": server.name, "connections": connections, "requests_per_s": rps, "p99": p99, "errors": errors}


def load_test_sequences() -> list[np.ndarray]:
    try:
        from lstm_serve.model.data import load_dataset
    except ImportError:
        sys.exit("lstm-serve bench reads the JapaneseVowels test split from aeon: pip install 'lstm-serve[train]'")
    return load_dataset("japanese-vowels").test.sequences


def per_call_us(in_process: InProcess) -> dict[str, float]:
    """onnxruntime's cost of one call at a batch of one, in microseconds: one step, one whole test sequence."""
    return {
        "step": 1e6 / in_process.items_per_s(1, 1),
        "sequence": 1e6 / in_process.items_per_s(1, None),
    }


def classify_ceiling(in_process: InProcess, served: dict) -> float:
    """onnxruntime in-process on whole sequences at the batch size a classify round formed, for as long."""
    return in_process.items_per_s(max(1, round(served.get("mean_batch_size") or 1)), None, served["duration_s"])


async def run_servers(cfg: BenchConfig, sequences: list[np.ndarray], in_process: InProcess) -> dict:
    ours = Server("lstm-serve", cfg.url, SERVE, env=SERVE_ENV)
    uvicorn_flags = [
        "--http",
        "httptools",
        "--loop",
        "uvloop",
        "--ws",
        "websockets-sansio",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    baseline = Server(
        "baseline",
        cfg.baseline_url,
        [sys.executable, "-m", "uvicorn", "lstm_serve.bench.baseline:app", *uvicorn_flags],
        env={"LSTM_SERVE_BASELINE_MODEL": str(ROOT / cfg.model_dir)},
    )
    bodies = [orjson.dumps({"sequences": [s.tolist()]}) for s in sequences]
    results: dict = {"points": [], "replay": []}
    try:
        await ours.wait_ready("/readyz")
        await baseline.wait_ready("/healthz")
        servers = (ours, baseline)
        print(f"classify: one test sequence per request, closed loop ({cfg.rounds} alternating rounds)", flush=True)
        for level in cfg.classify_levels:
            runs: list[Run] = [(s, partial(classify_client, s.host, s.port, bodies), None) for s in servers]
            ceiling = partial(classify_ceiling, in_process) if level == max(cfg.classify_levels) else None
            results["points"] += await measure_rounds(runs, "classify", level, cfg, ceiling)
        print("stream: one frame per request, one request in flight per session", flush=True)
        for level in cfg.stream_levels:
            http: list[Run] = [
                (s, partial(stream_http_client, s.host, s.port, sequences, use_seq=s is ours), None) for s in servers
            ]
            results["points"] += await measure_rounds(http, "stream-http", level, cfg)
            ws: list[Run] = [(s, partial(stream_ws_client, s.host, s.port, sequences), None) for s in servers]
            results["points"] += await measure_rounds(ws, "stream-ws", level, cfg)
        if cfg.classify_levels:
            results["wrk"] = [await wrk_check(server, bodies, max(cfg.classify_levels), cfg) for server in servers]
        if cfg.stream_levels:
            steady = max(cfg.stream_levels)
            print(f"steady streaming: {steady} WebSocket sessions of {STEADY_SEQUENCES} sequences each", flush=True)
            runs = [(s, partial(stream_ws_client, s.host, s.port, sequences, STEADY_SEQUENCES), None) for s in servers]
            results["points"] += await measure_rounds(runs, "stream-ws-steady", steady, cfg)
        print("stateless replay versus a session step (lstm-serve)", flush=True)
        results["replay"] = await replay(ours, sequences, cfg) if cfg.replay_lengths else []
        if cfg.open_loop and cfg.open_loop_rates:
            print(
                f"open loop: one model step (1 frame per WebSocket message), {cfg.open_loop_arrivals} arrivals "
                f"round robin over {cfg.open_loop_sessions} sessions, latency from the scheduled send time",
                flush=True,
            )
            results["open_loop"] = []
            for server, ready in ((ours, "/readyz"), (baseline, "/healthz")):
                results["open_loop"] += await open_loop_ladder(server, sequences, cfg)
                await asyncio.sleep(0.5)  # a saturated server works off its backlog before the next runs
                await server.wait_ready(ready)
    finally:
        ours.stop()
        baseline.stop()
    return results


async def open_loop_ladder(server: Server, sequences: list[np.ndarray], cfg: BenchConfig) -> list[dict]:
    """The offered rates in order, stopping after the first at which the server saturates."""
    frames = np.concatenate(sequences[:50])
    rows = []
    for rate in sorted(cfg.open_loop_rates):
        row = await openloop.point(
            server.host,
            server.port,
            frames,
            rate,
            cfg.open_loop_sessions,
            cfg.warmup_s,
            cfg.duration_s,
            cfg.open_loop_arrivals,
            cpu=server.cpu,
        )
        row["server"] = server.name
        rows.append(row)
        print(
            f"  {server.name:9s} offered {rate:6d}/s achieved {row['achieved_per_s']:7.0f}/s "
            f"p50 {row['p50_ms']:7.2f} p99 {row['p99_ms']:8.2f} ms  unanswered {row['unanswered']} "
            f"err {row['errors']}  gen lag p99 {row['generator_lag_p99_ms']:.2f} ms  "
            f"cpu srv {row['server_cpu_pct']}% gen {row['loadgen_cpu_pct']}%",
            flush=True,
        )
        if openloop.saturated(row):
            break
    return rows


async def run_redis(cfg: BenchConfig, sequences: list[np.ndarray]) -> list[dict]:
    """Classify and the stream workloads at cfg.redis_levels clients (sessions) on lstm-serve with sessions in
    memory (one worker), in Redis (one worker) and in Redis (two workers), all started here and measured in
    alternating rounds. Classify keeps no state: its rows show what a second worker process adds on this
    machine, which needs Redis only because sessions must be shared between workers."""
    if shutil.which("redis-server") is None:
        print("sessions in Redis: skipped, no redis-server on PATH", flush=True)
        return []
    print("sessions in Redis: classify and streams, lstm-serve in memory vs on a private redis-server", flush=True)
    redis = RedisServer()
    rows: list[dict] = []
    servers: list[tuple[Server, bool, int]] = []
    try:
        await redis.wait_ready()
        for setup, in_redis, workers in REDIS_SETUPS:
            env = {**SERVE_ENV, "LSTM_SERVE_WORKERS": str(workers)}
            if in_redis:
                env["LSTM_SERVE_REDIS_URL"] = redis.url
            servers.append((Server(setup, None, SERVE, env=env), in_redis, workers))
        for server, _, _ in servers:
            await server.wait_ready("/readyz")
        bodies = [orjson.dumps({"sequences": [s.tolist()]}) for s in sequences]
        workloads: list[tuple[str, Callable[[str, int], Client]]] = [
            ("classify", lambda host, port: classify_client(host, port, bodies)),
            ("stream-http", lambda host, port: stream_http_client(host, port, sequences)),
            ("stream-ws", lambda host, port: stream_ws_client(host, port, sequences)),
        ]
        for level in cfg.redis_levels:
            for workload, make in workloads:
                runs: list[Run] = [
                    (s, partial(make, s.host, s.port), {"redis": redis.cpu} if in_redis else None)
                    for s, in_redis, _ in servers
                ]
                for row, (server, in_redis, workers) in zip(
                    await measure_rounds(runs, workload, level, cfg), servers, strict=True
                ):
                    row.update(setup=server.name, redis=in_redis, workers=workers)
                    rows.append(row)
    finally:
        for server, _, _ in servers:
            server.stop()
        redis.stop()
    return rows


def add_limits(results: dict, in_process: InProcess) -> None:
    """onnxruntime in-process at the mean batch sizes lstm-serve formed, for the points not measured beside
    it between their rounds (measure_rounds' ceiling: the saturation point)."""
    cache: dict[tuple[bool, int], float] = {}
    for point in results["points"]:
        if point["server"] != "lstm-serve" or not point.get("mean_batch_size") or "onnxruntime_items_per_s" in point:
            continue
        frames = None if point["workload"] == "classify" else 1
        b = max(1, round(point["mean_batch_size"]))
        key = (point["workload"] == "classify", b)
        if key not in cache:
            cache[key] = in_process.items_per_s(b, frames)
        point["onnxruntime_items_per_s"] = cache[key]
        point["fraction_of_onnxruntime"] = point["throughput"] / cache[key]


def levels(value: str) -> list[int]:
    return [int(x) for x in value.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        "lstm-serve bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    defaults = BenchConfig()
    parser.add_argument("--url", help="a running lstm-serve (default: start one on loopback)")
    parser.add_argument("--baseline-url", help="a running afternoon baseline (default: start one)")
    parser.add_argument(
        "--classify-levels",
        type=levels,
        default=defaults.classify_levels,
        help="concurrent clients, comma-separated (empty: skip classify)",
    )
    parser.add_argument(
        "--stream-levels",
        type=levels,
        default=defaults.stream_levels,
        help="concurrent sessions, comma-separated (empty: skip the streams)",
    )
    parser.add_argument(
        "--replay-lengths", type=levels, default=defaults.replay_lengths, help="frames per replay (empty: skip it)"
    )
    parser.add_argument("--warmup-s", type=float, default=defaults.warmup_s)
    parser.add_argument("--duration-s", type=float, default=defaults.duration_s, help="measured seconds per point")
    parser.add_argument(
        "--rounds",
        type=int,
        default=defaults.rounds,
        help="alternating rounds per point of the servers a ratio compares (duration split among them)",
    )
    parser.add_argument("--replay-repeats", type=int, default=defaults.replay_repeats)
    parser.add_argument("--out-dir", default=defaults.out_dir)
    parser.add_argument(
        "--no-open-loop", dest="open_loop", action="store_false", help="skip the open-loop part (one model step)"
    )
    parser.add_argument(
        "--open-loop-rates",
        type=levels,
        default=defaults.open_loop_rates,
        help="offered single-frame steps per second, comma-separated; each server stops past saturation",
    )
    parser.add_argument(
        "--open-loop-sessions",
        type=int,
        default=defaults.open_loop_sessions,
        help="WebSocket sessions the open-loop messages go round robin over",
    )
    parser.add_argument("--open-loop-arrivals", choices=["poisson", "uniform"], default=defaults.open_loop_arrivals)
    parser.add_argument("--no-redis", dest="redis", action="store_false", help="skip the sessions-in-Redis part")
    parser.add_argument(
        "--redis-levels",
        type=levels,
        default=defaults.redis_levels,
        help="concurrent sessions for the sessions-in-Redis part, comma-separated (empty: skip it)",
    )
    cfg = BenchConfig(**vars(parser.parse_args(argv)))
    sequences = load_test_sequences()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    started = time.time()
    in_process = InProcess(cfg.model_dir, sequences)
    results = asyncio.run(run_servers(cfg, sequences, in_process))
    if cfg.redis and cfg.redis_levels:
        results["redis"] = asyncio.run(run_redis(cfg, sequences))
    add_limits(results, in_process)
    results["onnxruntime_per_call_us"] = per_call_us(in_process)
    results["config"] = asdict(cfg)
    results["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    results["wall_s"] = round(time.time() - started, 1)
    results["summary"] = report.summary(results)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(report.markdown(results))
    report.plots(results, out)
    print(report.markdown(results))
    print(f"wrote {out}/results.json, results.md and plots in {results['wall_s']} s")
