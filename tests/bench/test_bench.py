"""`lstm-serve bench` end to end at toy sizes: it must run both servers, measure, and write its outputs.
No speed is asserted here; the numbers live in service/bench/results/. Then the parts that need no
server: the open-loop scheduler's latency accounting and the target table on made-up results."""

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lstm_serve.bench import openloop, report, run
from tests.conftest import ROOT


def test_bench_runs_both_servers_and_writes_json_markdown_and_plots(tmp_path):
    out = tmp_path / "bench"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lstm_serve.cli",
            "bench",
            "--classify-levels",
            "1,4",
            "--stream-levels",
            "2",
            "--warmup-s",
            "0.2",
            "--duration-s",
            "0.5",
            "--replay-lengths",
            "1,20",
            "--replay-repeats",
            "3",
            "--open-loop-rates",
            "100,200",
            "--open-loop-sessions",
            "4",
            "--redis-levels",
            "2",
            "--rounds",
            "2",
            "--out-dir",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        timeout=300,
        capture_output=True,
    )
    results = json.loads((out / "results.json").read_text())
    assert all(len(p["round_throughputs"]) == 2 for p in results["points"] + results["redis"])  # alternating rounds
    points = {(p["server"], p["workload"], p["concurrency"]) for p in results["points"]}
    for server in ("lstm-serve", "baseline"):
        assert {
            (server, "classify", 1),
            (server, "classify", 4),
            (server, "stream-http", 2),
            (server, "stream-ws", 2),
            (server, "stream-ws-steady", 2),
        } <= points
    for p in results["points"]:
        assert p["errors"] == 0, p["error_examples"]
        assert p["requests"] > 0 and p["p50_ms"] <= p["p99_ms"]
        if p["server"] == "lstm-serve":
            assert p["mean_batch_size"] >= 1 and p["onnxruntime_items_per_s"] > 0
    # the saturation point's onnxruntime ceiling is measured between its rounds, the others' after the run
    beside = {(p["workload"], p["concurrency"]) for p in results["points"] if p.get("onnxruntime_between_rounds")}
    assert beside == {("classify", 4)}
    assert [r["t"] for r in results["replay"]] == [1, 20]
    # onnxruntime's cost of one call, in the report (no order asserted: this machine's speed flips ~1.8x)
    per_call = results["onnxruntime_per_call_us"]
    assert per_call["step"] > 0 and per_call["sequence"] > 0
    assert any(row["target"].startswith("classify") for row in results["summary"])
    # open loop: both servers' ladders, from the lowest rate up (stopping early only past saturation)
    for server in ("lstm-serve", "baseline"):
        rows = [r for r in results["open_loop"] if r["server"] == server]
        assert rows and rows[0]["offered_per_s"] == 100 and len(rows) <= 2
        for r in rows:
            assert r["sessions"] == 4 and r["due"] > 0 and r["errors"] == 0
            assert r["achieved_per_s"] > 0 and r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
            assert r["generator_lag_p99_ms"] >= 0 and r["server_cpu_pct"] is not None
    # sessions in Redis: three set-ups x three workloads, redis-server's CPU beside lstm-serve's
    setups = {(r["setup"], r["workload"], r["concurrency"]): r for r in results["redis"]}
    assert set(setups) == {
        (setup, workload, 2)
        for setup in ("memory, 1 worker", "redis, 1 worker", "redis, 2 workers")
        for workload in ("classify", "stream-http", "stream-ws")
    }
    for r in results["redis"]:
        assert r["errors"] == 0, r["error_examples"]
        assert r["requests"] > 0 and r["server_cpu_pct"] > 0
        assert ("redis_cpu_pct" in r) == r["redis"]
    targets = {row["target"]: row for row in results["summary"]}
    assert sum(t.startswith("sessions in Redis, 2 sessions") for t in targets) == 2
    assert all("margin" in row for row in results["summary"])
    markdown = (out / "results.md").read_text()
    for heading in ("## Targets", "## Sessions in Redis", "## Open loop: one model step"):
        assert heading in markdown
    assert f"{per_call['step']:.0f} us per call for one step" in markdown
    for plot in ("throughput_latency.png", "replay.png", "open_loop.png", "redis.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"


def test_bench_with_every_part_left_out_still_reports(tmp_path, server):
    """Empty levels skip a part (to measure only the Redis rows, say) rather than fail on an empty max(). The
    suite's server stands in for both servers: nothing is measured."""
    out = tmp_path / "bench"
    args = ["--classify-levels", "", "--stream-levels", "", "--replay-lengths", "", "--no-open-loop", "--no-redis"]
    args += ["--url", server.url, "--baseline-url", server.url]
    subprocess.run(
        [sys.executable, "-m", "lstm_serve.cli", "bench", *args, "--out-dir", str(out)],
        cwd=ROOT,
        check=True,
        timeout=120,
        capture_output=True,
    )
    results = json.loads((out / "results.json").read_text())
    assert results["points"] == [] and results["replay"] == [] and "wrk" not in results
    assert "## Targets" in (out / "results.md").read_text()


class InstantServer:
    """A fake WebSocket that answers every message at once; its nth send blocks the event loop for a
    while, as a load generator's pause (GC, a busy core) would."""

    def __init__(self, pause_at: int = -1, pause_s: float = 0.0) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()
        self.sends, self.pause_at, self.pause_s = 0, pause_at, pause_s

    def send_binary(self, payload: bytes) -> None:
        if self.sends == self.pause_at:
            time.sleep(self.pause_s)
        self.sends += 1
        self.replies.put_nowait(b'{"prediction": {}}')

    async def recv(self) -> bytes:
        return await self.replies.get()


def test_open_loop_counts_latency_from_the_scheduled_time_not_the_send():
    """At 1,000/s a 50 ms stall of the sender delays the ~50 messages due meanwhile: each counts the time
    since it was due (a closed-loop client would count the stall once, or not at all)."""
    fake = InstantServer(pause_at=100, pause_s=0.05)

    async def run() -> openloop.Record:
        scheduled = time.perf_counter() + 0.01 + openloop.arrival_offsets(1000, 0.3, "uniform")
        return await openloop.drive([fake], [b"x"], scheduled, drain_s=1.0)

    record = asyncio.run(run())
    latency = record.done - record.scheduled
    assert not np.isnan(record.done).any() and not record.failed.any()
    assert np.all(latency >= record.sent - record.scheduled)  # the send's lateness is inside the latency
    late = latency > 0.02
    assert 25 <= late.sum() <= 70, late.sum()  # the messages due during the stall
    assert latency.max() >= 0.045
    assert np.median(record.done - record.sent) < 0.005  # from the send, as a closed loop measures: ~0
    row = openloop.summarise(record, 1000, (record.scheduled[0], record.scheduled[-1] + 1e-9))
    assert row["max_ms"] >= 45 and row["p99_ms"] >= 20 and row["unanswered"] == 0 and row["due"] == 300


def test_open_loop_summary_counts_unanswered_and_failed_messages():
    scheduled = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    record = openloop.Record(
        scheduled=scheduled,
        sent=scheduled + 0.5,
        done=np.array([0.1, 1.2, np.nan, np.nan, 4.3]),
        failed=np.array([False, False, False, True, False]),
        ended=6.0,
    )
    row = openloop.summarise(record, 1.0, (0.0, 5.0))
    # latencies 0.1, 0.2, 4.0 (unanswered: up to the end of the drain) and 0.3; the failed one is an error
    assert row["due"] == 5 and row["unanswered"] == 1 and row["errors"] == 1
    assert row["max_ms"] == 4000 and abs(row["p50_ms"] - 250) < 1e-6
    assert row["achieved_per_s"] == 3 / 5 and row["window_s"] == 5  # replies that arrived in the window
    assert row["generator_lag_p50_ms"] == 500
    assert openloop.saturated(row)  # an unanswered message ends the ladder
    assert not openloop.saturated({**row, "achieved_per_s": 1.0, "p99_ms": 5.0, "errors": 0, "unanswered": 0})
    assert openloop.saturated({**row, "achieved_per_s": 0.85, "p99_ms": 5.0, "errors": 0, "unanswered": 0})


def test_arrivals_are_at_the_offered_rate():
    uniform = openloop.arrival_offsets(500, 2.0, "uniform")
    assert len(uniform) == 1000 and np.allclose(np.diff(uniform), 0.002)
    poisson = openloop.arrival_offsets(500, 2.0, "poisson")
    assert 900 < len(poisson) < 1100 and poisson.min() >= 0 and poisson.max() < 2.0
    assert np.all(np.diff(poisson) > 0)


def synthetic(ours: float, base: float, redis_1: float, redis_2: float) -> dict:
    """Results where lstm-serve's throughputs are `ours` times the baseline's and its p50s 1/ours of them,
    and the Redis set-ups' frames/s are redis_1 and redis_2 times the in-memory one's."""

    def pt(server: str, workload: str, c: int, throughput: float, p50: float) -> dict:
        return dict(
            server=server,
            workload=workload,
            concurrency=c,
            throughput=throughput,
            p50_ms=p50,
            p90_ms=1.5 * p50,
            p99_ms=2 * p50,
            errors=0,
            server_cpu_pct=100.0,
            loadgen_cpu_pct=20.0,
        )

    points = []
    for workload in ("classify", "stream-http", "stream-ws", "stream-ws-steady"):
        for c in (1, 64, 256):
            points.append(pt("lstm-serve", workload, c, 1000.0 * ours, 1.0 / ours))
            points.append(pt("baseline", workload, c, 1000.0 * base, 1.0 / base))
    points[0]["fraction_of_onnxruntime"], points[0]["mean_batch_size"] = 0.7, 1.0
    redis = [
        {**pt(setup, workload, 64, 1000.0 * factor, 1.0), "setup": setup}
        for setup, factor in (("memory, 1 worker", 1.0), ("redis, 1 worker", redis_1), ("redis, 2 workers", redis_2))
        for workload in ("classify", "stream-http", "stream-ws")
    ]
    redis[5]["throughput"] *= 0.9  # Redis x1 over WebSocket a little lower: the row takes the lower one
    return {"points": points, "replay": [], "redis": redis}


def test_target_rows_on_made_up_results_met_and_not_met():
    met = {row["target"]: row for row in report.summary(synthetic(ours=5.0, base=1.0, redis_1=0.9, redis_2=1.2))}
    short = {row["target"]: row for row in report.summary(synthetic(ours=2.0, base=1.0, redis_1=0.5, redis_2=0.8))}
    assert set(met) == set(short)
    ws256 = "stream, 256 sessions, WebSocket, a new session per sequence: frames/s vs baseline WebSocket"
    assert met[ws256]["value"] == 5.0 and met[ws256]["floor"] == 2.5 and met[ws256]["met"]
    assert met[ws256]["margin"] == 2.0
    assert short[ws256]["met"] is False and short[ws256]["margin"] == 0.8
    classify = "classify, 64 clients: req/s vs baseline (our load generator)"
    assert met[classify]["floor"] == 4.0 and met[classify]["met"] and not short[classify]["met"]
    p50_ws = "stream over WebSocket, 1 session: p50 vs baseline's WebSocket"
    assert met[p50_ws]["ceiling"] == 1.0 and met[p50_ws]["value"] == 0.2 and met[p50_ws]["margin"] == 5.0
    p50_http = "stream over HTTP (a step), 1 client: p50 vs baseline's"
    assert met[p50_http]["ceiling"] == 0.8 and short[p50_http]["value"] == 0.5 and short[p50_http]["met"]
    saturation = next(t for t in met if t.startswith("classify at saturation"))
    assert met[saturation]["floor"] == 0.6 and met[saturation]["met"]
    redis_1 = next(t for t in met if t.startswith("sessions in Redis, 64 sessions, 1 worker"))
    redis_2 = next(t for t in met if t.startswith("sessions in Redis, 64 sessions, 2 workers"))
    assert met[redis_1]["floor"] == 0.7 and met[redis_1]["value"] == 0.81 and met[redis_1]["met"]  # 0.9 x 0.9
    assert short[redis_1]["value"] == 0.45 and short[redis_1]["met"] is False
    assert met[redis_2]["floor"] == 1.0 and met[redis_2]["met"] and short[redis_2]["met"] is False
    two_workers = next(t for t in met if t.startswith("classify, 64 clients, 2 workers on Redis"))
    assert met[two_workers]["value"] == 1.2 and short[two_workers]["value"] == 0.8  # no goal: never met or not
    assert met[two_workers]["met"] is None and "floor" not in met[two_workers]
    # the floors these replace are gone: WebSocket against the baseline's HTTP, 3.0x, 1.1, 0.25
    assert not any("vs baseline HTTP" in t and "WebSocket" in t for t in met)
    assert {row.get("floor") for row in met.values()}.isdisjoint({3.0, 5.0, 0.25})
    assert 1.1 not in {row.get("ceiling") for row in met.values()}
    lines = report.markdown(
        {
            **synthetic(2.0, 1.0, 0.5, 0.8),
            "summary": list(short.values()),
            "config": {"warmup_s": 1, "duration_s": 5},
            "machine": {"cpus": 2},
            "wall_s": 1.0,
        }
    )
    assert "| margin |" in lines and "0.80x" in lines and "## Sessions in Redis" in lines


def test_a_point_measured_in_rounds_sums_its_counts_and_takes_the_median_of_its_percentiles():
    from lstm_serve.bench.run import combine_rounds

    def round_result(requests: int, p50: float, cpu: float, batch: float | None) -> dict:
        return {
            "server": "lstm-serve",
            "workload": "classify",
            "concurrency": 4,
            "duration_s": 2.0,
            "requests": requests,
            "errors": 1,
            "throughput": requests / 2.0,
            "p50_ms": p50,
            "p90_ms": 2 * p50,
            "p99_ms": 3 * p50,
            "error_examples": ["500 x"],
            "server_cpu_pct": cpu,
            "loadgen_cpu_pct": 10.0,
            "mean_batch_size": batch,
        }

    point = combine_rounds(
        [round_result(100, 1.0, 90.0, 2.0), round_result(300, 5.0, 100.0, None), round_result(200, 2.0, 95.0, 4.0)]
    )
    assert (point["requests"], point["errors"], point["duration_s"]) == (600, 3, 6.0)
    assert point["throughput"] == 100.0 and point["round_throughputs"] == [50.0, 150.0, 100.0]
    assert (point["p50_ms"], point["p90_ms"], point["p99_ms"]) == (2.0, 4.0, 6.0)
    assert point["server_cpu_pct"] == 95.0 and point["mean_batch_size"] == 3.0 and len(point["error_examples"]) == 3


def gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    return "Z" in state.split()[1]  # a zombie has exited; only its parent's wait is left


def test_a_server_that_ignores_sigterm_is_killed_with_its_workers_and_stopping_never_raises():
    ignoring = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    parent = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"child = subprocess.Popen([sys.executable, '-c', {ignoring!r}]); print(child.pid, flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    worker = int(proc.stdout.readline())
    started = time.monotonic()
    run.stop_process(proc, "stubborn server", grace_s=0.5)
    assert proc.returncode == -9 and time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while not gone(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(worker), "the server's worker outlived it"
    run.stop_process(proc, "stubborn server", grace_s=0.5)  # stopping a stopped process is a no-op


def test_the_callback_websocket_sends_each_frame_after_the_last_answer_and_answers_pings():
    """The stream workload's client: answers split across reads, 16-bit lengths, and a ping before each answer
    (which must be ponged, and is no answer); each frame leaves only once the one before is answered."""
    from lstm_serve.bench.clients import CallbackWebSocket, masked_frame

    def unmask(data: bytes) -> tuple[int, bytes]:
        n, at = data[1] & 0x7F, 2
        if n == 126:
            n, at = int.from_bytes(data[2:4], "big"), 4
        mask = data[at : at + 4]
        return data[0] & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(data[at + 4 : at + 4 + n]))

    async def main():
        seen: list[tuple[int, bytes]] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            while True:
                head = await reader.readexactly(2)
                extra = 2 if head[1] & 0x7F == 126 else 0
                rest = await reader.readexactly(extra + 4)
                n = int.from_bytes(rest[:2], "big") if extra else head[1] & 0x7F
                opcode, payload = unmask(head + rest + await reader.readexactly(n))
                seen.append((opcode, payload))
                if opcode == 0x8:
                    break
                if opcode == 0x2:
                    writer.write(b"\x89\x02hi")  # a ping first
                    answer = b"\x82\x7e" + (300).to_bytes(2, "big") + payload * 100
                    writer.write(answer[:3])  # split mid-header, then mid-payload
                    await writer.drain()
                    await asyncio.sleep(0.01)
                    writer.write(answer[3:150])
                    await writer.drain()
                    await asyncio.sleep(0.01)
                    writer.write(answer[150:])
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        answers: list[tuple[float, float, bytes]] = []
        ws = await CallbackWebSocket().connect("127.0.0.1", port, "/x")
        frames = [masked_frame(bytes([k, k, k])) for k in range(4)]
        await ws.exchange(frames, time.perf_counter() + 30, lambda *answer: answers.append(answer))
        late = await CallbackWebSocket().connect("127.0.0.1", port, "/x")
        await late.exchange(frames, time.perf_counter() - 1, lambda *answer: answers.append(answer))
        await ws.close()
        await late.close()
        await asyncio.sleep(0.05)
        server.close()
        return seen, answers

    seen, answers = asyncio.run(main())
    assert [payload for *_, payload in answers] == [bytes([k]) * 300 for k in range(4)]  # past its deadline: none
    assert all(started <= answered for started, answered, _ in answers)
    assert all(answers[k][0] >= answers[k - 1][1] for k in range(1, 4))  # sent after the answer before it
    binary = [payload for opcode, payload in seen if opcode == 0x2]
    pongs = [payload for opcode, payload in seen if opcode == 0xA]
    assert binary == [bytes([k, k, k]) for k in range(4)] and pongs == [b"hi"] * 4
