"""Start-up, limits and shut-down, each on a server started with its own settings."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from lstm_serve.http.app import create_app
from lstm_serve.settings import Settings
from tests.conftest import ROOT


def test_idle_sessions_expire_and_give_404(start_server):
    server = start_server("--session-ttl-s", "1", "--sweep-interval-s", "0.2")
    with httpx.Client(base_url=server.url) as c:
        idle = c.post("/v1/sessions").json()["session_id"]
        busy = c.post("/v1/sessions").json()["session_id"]
        for _ in range(6):  # a step every 0.3 s keeps `busy` alive well past the TTL
            assert c.post(f"/v1/sessions/{busy}/steps", json={"inputs": [[0.0] * 12]}).status_code == 200
            time.sleep(0.3)
        assert c.get(f"/v1/sessions/{idle}").status_code == 404
        assert c.get(f"/v1/sessions/{busy}").json()["steps"] == 6
        metrics = c.get("/metrics").text
    assert "lstm_serve_sessions_expired_total 1.0" in metrics
    assert "lstm_serve_active_sessions 1.0" in metrics


def test_max_sessions_answers_429_and_keeps_existing_sessions(start_server):
    server = start_server("--max-sessions", "3")
    with httpx.Client(base_url=server.url) as c:
        ids = [c.post("/v1/sessions").json()["session_id"] for _ in range(3)]
        refused = c.post("/v1/sessions")
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_sessions"
        assert int(refused.headers["Retry-After"]) >= 1
        assert all(c.get(f"/v1/sessions/{sid}").status_code == 200 for sid in ids)
        c.delete(f"/v1/sessions/{ids[0]}")
        assert c.post("/v1/sessions").status_code == 201
        assert 'lstm_serve_rejected_requests_total{reason="too_many_sessions"} 1.0' in c.get("/metrics").text


def test_a_full_queue_answers_503_with_retry_after_and_recovers(start_server):
    server = start_server("--max-queue-length", "2", "--max-batch-size", "1")
    long_sequence = {"sequences": [np.zeros((4000, 12)).tolist()]}

    async def flood():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            return await asyncio.gather(*(c.post("/v1/classify", json=long_sequence) for _ in range(12)))

    statuses = [r.status_code for r in asyncio.run(flood())]
    refused = [r for r in asyncio.run(flood()) if r.status_code == 503]
    assert set(statuses) <= {200, 503} and 200 in statuses and refused
    assert refused[0].headers["Retry-After"] == "1" and refused[0].json()["error"]["code"] == "overloaded"
    with httpx.Client(base_url=server.url) as c:
        assert c.post("/v1/classify", json={"sequences": [[[0.0] * 12]]}).status_code == 200


def test_sigterm_finishes_in_flight_work_then_exits(start_server):
    server = start_server()
    long_sequence = {"sequences": [np.zeros((4000, 12)).tolist()] * 16}

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            in_flight = asyncio.create_task(c.post("/v1/classify", json=long_sequence))
            await asyncio.sleep(0.3)
            server.proc.send_signal(signal.SIGTERM)
            return await in_flight

    response = asyncio.run(main())
    assert response.status_code == 200 and len(response.json()["predictions"]) == 16
    # uvicorn re-raises the signal after a clean shutdown, so the exit status says "terminated"
    assert server.proc.wait(30) in (0, -signal.SIGTERM)
    log = server.output()
    assert "Finished server process" in log and "Traceback" not in log
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz", timeout=1)


def test_sigterm_drains_readiness_first_then_stops_accepting(start_server):
    """For the drain delay after SIGTERM the server says 503 on /readyz and /v2/health/ready while it
    accepts new connections and serves them; then it stops accepting and exits."""
    server = start_server("--drain-delay-s", "2", "--shutdown-timeout-s", "5")
    frames = {"sequences": [[[0.1] * 12] * 5]}
    server.proc.send_signal(signal.SIGTERM)
    signalled, seen = time.perf_counter(), []
    while time.perf_counter() - signalled < 10:
        try:
            with httpx.Client(base_url=server.url, timeout=2) as c:  # a new connection every round
                seen.append(
                    (
                        time.perf_counter() - signalled,
                        c.get("/readyz").status_code,
                        c.get("/v2/health/ready").status_code,
                        c.post("/v1/classify", json=frames).status_code,
                    )
                )
        except httpx.TransportError:
            break  # refused: the listening socket is closed
        time.sleep(0.1)
    refused_after = time.perf_counter() - signalled
    assert seen and all(ready == v2_ready == 503 and classify == 200 for _, ready, v2_ready, classify in seen), seen
    assert seen[-1][0] >= 1.7 and 1.9 <= refused_after <= 4, (seen[-1], refused_after)
    assert server.proc.wait(10) in (0, -signal.SIGTERM)
    assert "draining for 2 s" in server.output()


def run_serve(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lstm_serve.cli", "serve", "--port", "0", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_several_workers_with_in_memory_sessions_are_refused_at_start():
    result = run_serve("--workers", "2")
    assert result.returncode != 0
    assert "workers=2 with the in-memory session store would split session state" in result.stderr


def test_bad_settings_are_refused_with_the_setting_named():
    result = run_serve("--max-batch-size", "0")
    assert result.returncode != 0 and "max_batch_size" in result.stderr


def test_cuda_without_cuda_fails_loudly():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return  # the GPU case is proven by test_runner on a GPU machine
    result = run_serve("--providers", "cuda")
    assert result.returncode != 0 and "onnxruntime-gpu" in result.stdout + result.stderr


def test_settings_come_from_lstm_serve_environment_variables():
    env = {"LSTM_SERVE_MAX_BATCH_SIZE": "7", "LSTM_SERVE_PROVIDERS": "cpu", "LSTM_SERVE_SESSION_TTL_S": "2.5"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        settings = Settings()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    assert (settings.max_batch_size, settings.providers, settings.session_ttl_s) == (7, "cpu", 2.5)


def test_readyz_is_503_until_the_lifespan_has_warmed_up():
    app = create_app(Settings())

    async def main():
        transport = httpx.ASGITransport(app=app)  # no lifespan: models never load
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.get("/readyz"), await c.get("/healthz")

    ready, alive = asyncio.run(main())
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
    assert alive.status_code == 200


def test_the_serving_runtime_never_imports_torch():
    code = (
        "import sys, lstm_serve.http.app, lstm_serve.cli, lstm_serve.http.server; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_no_process_outlives_a_killed_server(start_server):
    """The decode process exits with its server, even one killed with SIGKILL: nothing is left holding the
    server's output open (a supervisor reading it would wait forever) or using memory."""
    server = start_server(pipe=True)
    server.proc.kill()
    server.proc.wait(10)
    reader = threading.Thread(target=server.proc.stdout.read, daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "something the server started still holds its stdout open"


def test_sigterm_under_load_loses_no_accepted_request(start_server):
    """32 clients classify and step while SIGTERM arrives: every request sent before the drain delay ends
    completes with 200, /readyz says 503 meanwhile, then new connections are refused, and the process
    exits within the drain delay plus shutdown_timeout_s."""
    drain_s, shutdown_s = 1.5, 5.0
    server = start_server("--drain-delay-s", str(drain_s), "--shutdown-timeout-s", str(shutdown_s))
    rng = np.random.default_rng(11)
    outcomes: list[tuple[float, str, object]] = []  # (sent at, what, status or error)
    signalled = asyncio.Event()
    signalled_at = [0.0]

    async def worker(index: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            session_id = (await c.post("/v1/sessions", json={})).json()["session_id"]
            steps = 0
            while True:
                frames = rng.normal(size=(int(rng.integers(1, 40)), 12)).tolist()
                sent = time.perf_counter()
                try:
                    if index % 2:
                        reply = await c.post("/v1/classify", json={"sequences": [frames]})
                    else:
                        reply = await c.post(f"/v1/sessions/{session_id}/steps", json={"inputs": frames, "seq": steps})
                        if reply.status_code == 200:
                            steps = reply.json()["steps"]
                    outcomes.append((sent, "request", reply.status_code))
                except httpx.TransportError as error:
                    outcomes.append((sent, "request", type(error).__name__))
                    if signalled.is_set():
                        return
                if signalled.is_set() and time.perf_counter() - signalled_at[0] > drain_s + shutdown_s + 5:
                    return

    async def probe_readiness() -> list[tuple[float, object]]:
        seen = []
        while True:
            await asyncio.sleep(0.1)
            try:
                async with httpx.AsyncClient(timeout=2) as c:
                    seen.append((time.perf_counter(), (await c.get(f"{server.url}/readyz")).status_code))
            except httpx.TransportError:
                seen.append((time.perf_counter(), "refused"))
                return seen

    async def main() -> list[tuple[float, object]]:
        workers = [asyncio.create_task(worker(i)) for i in range(32)]
        await asyncio.sleep(1.0)
        server.proc.send_signal(signal.SIGTERM)
        signalled_at[0] = time.perf_counter()
        signalled.set()
        readiness = await probe_readiness()
        await asyncio.gather(*workers)
        return readiness

    readiness = asyncio.run(main())
    t0 = signalled_at[0]
    exit_code = server.proc.wait(drain_s + shutdown_s + 5)
    exited_after = time.perf_counter() - t0
    assert exit_code in (0, -signal.SIGTERM)
    assert exited_after < drain_s + shutdown_s + 3, exited_after
    accepted = [status for sent, _, status in outcomes if sent < t0 + drain_s - 0.2]
    assert len(accepted) > 100 and set(accepted) == {200}, {s: accepted.count(s) for s in set(accepted)}
    during = [status for at, status in readiness if at < t0 + drain_s - 0.2]
    assert during and set(during) == {503}, readiness
    assert readiness[-1][1] == "refused" and readiness[-1][0] - t0 >= drain_s - 0.2


def test_a_request_cut_off_at_shutdown_timeout_is_a_503_not_a_server_error(start_server):
    """A client still sending its body when shutdown_timeout_s runs out: it hears 503 (retry elsewhere), and
    the server logs a 503, not a 500 with an ASGI traceback."""
    server = start_server("--drain-delay-s", "0", "--shutdown-timeout-s", "1", "--body-timeout-s", "60")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
        slow.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        slow.sendall(b"Content-Length: 100000\r\n\r\n{")
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        reply = b""
        while chunk := slow.recv(65536):
            reply += chunk
    assert server.proc.wait(10) in (0, -signal.SIGTERM)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), reply[:200]
    assert b'"code":"not_ready"' in body and b"shutdown_timeout_s" in body
    log = server.output()
    assert "Exception in ASGI application" not in log and "CancelledError" not in log, log
    assert " 503 " in log and "POST /v1/classify 500" not in log, log


def test_a_model_whose_example_is_over_max_sequence_length_is_warned_about_at_load(start_server):
    """A model trained on long sequences advertised an example every caller who tried it got a 422 for."""
    server = start_server("--max-sequence-length", "5")
    example = httpx.get(f"{server.url}/v1/models/japanese-vowels").json()["example"]
    assert len(example["frames"]) > 5
    assert httpx.post(f"{server.url}/v1/classify", json={"sequences": [example["frames"]]}).status_code == 422
    said = f"japanese-vowels v1: its example has {len(example['frames'])} frames, over max_sequence_length=5"
    assert said in server.output(), server.output()[-2000:]


def test_a_background_round_that_keeps_failing_is_logged_once_per_window_not_every_round(caplog):
    """With Redis down, the once-a-second sweep logged a warning every second in every process."""
    from lstm_serve.errors import StoreUnavailable
    from lstm_serve.http.app import every

    async def failing() -> None:
        raise StoreUnavailable("the session store is unavailable; retry shortly")

    async def run_for(seconds: float) -> None:
        task = asyncio.create_task(every(0.005, failing, "session sweep"))
        await asyncio.sleep(seconds)
        task.cancel()

    with caplog.at_level("WARNING", logger="lstm_serve"):
        asyncio.run(run_for(0.3))
    warnings = [r.getMessage() for r in caplog.records if "session sweep skipped" in r.getMessage()]
    assert warnings == ["session sweep skipped: the session store is unavailable; retry shortly"], warnings
