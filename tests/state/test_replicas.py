"""Two real replicas sharing one real Redis: state moves with the session, not the process."""

import asyncio
import os
import signal
import subprocess
import time

import httpx
import numpy as np

from tests.conftest import RedisProcess

ATOL = 1e-5


def replicas(start_server, redis_server, n=2, *flags):
    env = {"LSTM_SERVE_REDIS_URL": redis_server.url}
    return [start_server(*flags, env=env) for _ in range(n)]


def classify(url: str, frames: np.ndarray) -> np.ndarray:
    body = httpx.post(f"{url}/v1/classify", json={"sequences": [frames.tolist()]}).json()
    return np.array(body["predictions"][0]["probabilities"])


def test_a_session_continued_alternately_on_two_replicas_ends_exactly_like_classify(
    start_server, redis_server, test_sequences
):
    a, b = replicas(start_server, redis_server)
    frames = test_sequences[3]
    sid = httpx.post(f"{a.url}/v1/sessions", json={}).json()["session_id"]
    for t, frame in enumerate(frames):
        target = (a, b)[t % 2]
        reply = httpx.post(f"{target.url}/v1/sessions/{sid}/steps", json={"inputs": [frame.tolist()], "seq": t})
        assert reply.status_code == 200, reply.text
    assert reply.json()["steps"] == len(frames)
    np.testing.assert_allclose(reply.json()["prediction"]["probabilities"], classify(a.url, frames), atol=ATOL)
    assert httpx.get(f"{a.url}/v1/sessions/{sid}").json()["steps"] == len(frames)


def test_a_killed_replica_loses_nothing(start_server, redis_server, test_sequences):
    a, b = replicas(start_server, redis_server)
    frames = test_sequences[11]
    sid = httpx.post(f"{a.url}/v1/sessions", json={}).json()["session_id"]
    half = len(frames) // 2
    httpx.post(f"{a.url}/v1/sessions/{sid}/steps", json={"inputs": frames[:half].tolist(), "seq": 0})
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    reply = httpx.post(f"{b.url}/v1/sessions/{sid}/steps", json={"inputs": frames[half:].tolist(), "seq": half})
    assert reply.status_code == 200 and reply.json()["steps"] == len(frames)
    np.testing.assert_allclose(reply.json()["prediction"]["probabilities"], classify(b.url, frames), atol=ATOL)


def test_concurrent_steps_on_both_replicas_are_each_applied_exactly_once(start_server, redis_server):
    a, b = replicas(start_server, redis_server)
    sid = httpx.post(f"{a.url}/v1/sessions", json={}).json()["session_id"]
    frame = [0.4] * 12

    async def main():
        async with httpx.AsyncClient(timeout=30) as c:
            return await asyncio.gather(
                *(c.post(f"{(a, b)[k % 2].url}/v1/sessions/{sid}/steps", json={"inputs": [frame]}) for k in range(40))
            )

    responses = asyncio.run(main())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    assert sorted(r.json()["steps"] for r in responses) == list(range(1, 41)), "a step was lost or doubled"
    final = httpx.get(f"{b.url}/v1/sessions/{sid}").json()
    assert final["steps"] == 40
    np.testing.assert_allclose(final["prediction"]["probabilities"], classify(a.url, np.array([frame] * 40)), atol=ATOL)


def test_redis_down_gives_clean_503s_classify_keeps_working_and_service_resumes(start_server):
    redis_server = RedisProcess().start()
    try:
        (a,) = replicas(start_server, redis_server, 1)
        sid = httpx.post(f"{a.url}/v1/sessions", json={}).json()["session_id"]
        redis_server.stop()
        for call in (
            lambda: httpx.post(f"{a.url}/v1/sessions", json={}),
            lambda: httpx.post(f"{a.url}/v1/sessions/{sid}/steps", json={"inputs": [[0.0] * 12]}),
            lambda: httpx.get(f"{a.url}/v1/sessions/{sid}"),
        ):
            response = call()
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert error["code"] == "session_store_unavailable" and "session store" in error["message"]
            # where the store lives is the operator's business: logged on the server, never told to clients
            assert str(redis_server.port) not in response.text and "127.0.0.1" not in response.text
        sequence = {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1, 12], "data": [0.0] * 12}],
            "parameters": {"sequence_id": 9, "sequence_start": True},
        }
        oip = httpx.post(f"{a.url}/v2/models/japanese-vowels/infer", json=sequence)
        assert oip.status_code == 503 and str(redis_server.port) not in oip.text, oip.text
        assert httpx.get(f"{a.url}/readyz").status_code == 503
        assert httpx.post(f"{a.url}/v1/classify", json={"sequences": [[[0.0] * 12]]}).status_code == 200
        assert httpx.get(f"{a.url}/metrics").status_code == 200
        redis_server.start()  # same port, empty: this Redis keeps nothing on disk
        deadline = time.time() + 15
        while httpx.get(f"{a.url}/readyz").status_code != 200:
            assert time.time() < deadline, "readiness did not come back with Redis"
            time.sleep(0.2)
        sid = httpx.post(f"{a.url}/v1/sessions", json={}).json()["session_id"]
        assert httpx.post(f"{a.url}/v1/sessions/{sid}/steps", json={"inputs": [[0.0] * 12]}).json()["steps"] == 1
        a.stop()
        assert f"127.0.0.1:{redis_server.port}" in a.output(), "the server log names the store"
    finally:
        redis_server.stop()


def test_idle_sessions_expire_in_redis_too(start_server, redis_server):
    a, b = replicas(start_server, redis_server, 2, "--session-ttl-s", "1", "--sweep-interval-s", "0.2")
    idle = httpx.post(f"{a.url}/v1/sessions", json={}).json()["session_id"]
    busy = httpx.post(f"{a.url}/v1/sessions", json={}).json()["session_id"]
    for k in range(6):
        assert (
            httpx.post(f"{(a, b)[k % 2].url}/v1/sessions/{busy}/steps", json={"inputs": [[0.0] * 12]}).status_code
            == 200
        )
        time.sleep(0.3)
    assert httpx.get(f"{b.url}/v1/sessions/{idle}").status_code == 404
    assert httpx.get(f"{a.url}/v1/sessions/{busy}").json()["steps"] == 6


def test_several_workers_are_allowed_with_redis_and_share_sessions(start_server, redis_server):
    (server,) = replicas(start_server, redis_server, 1, "--workers", "2")
    sid = httpx.post(f"{server.url}/v1/sessions", json={}).json()["session_id"]
    with httpx.Client(base_url=server.url) as c:  # new connections land on either worker
        steps = [
            httpx.post(f"{server.url}/v1/sessions/{sid}/steps", json={"inputs": [[0.1] * 12]}).json()["steps"]
            for _ in range(10)
        ]
        assert c.get(f"/v1/sessions/{sid}").json()["steps"] == 10
    assert steps == list(range(1, 11))


def test_a_server_starts_without_redis_and_a_redis_refusing_writes_is_a_503_not_a_500(start_server, redis_server):
    from tests.conftest import free_port

    nowhere = start_server(env={"LSTM_SERVE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, wait=False)
    deadline = time.time() + 60
    while True:  # alive and classifying, not ready: the store is unreachable
        try:
            if httpx.get(f"{nowhere.url}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert nowhere.proc.poll() is None and time.time() < deadline, nowhere.output()
        time.sleep(0.2)
    assert httpx.get(f"{nowhere.url}/readyz").status_code == 503
    assert httpx.post(f"{nowhere.url}/v1/classify", json={"sequences": [[[0.0] * 12]]}).status_code == 200

    (a,) = replicas(start_server, redis_server, 1)
    sid = httpx.post(f"{a.url}/v1/sessions", json={}).json()["session_id"]
    # Redis refusing writes (as when full, read-only or short of replicas): NOREPLICAS on every write
    refuse = ["redis-cli", "-p", str(redis_server.port), "config", "set", "min-replicas-to-write"]
    subprocess.run([*refuse, "1"], check=True, capture_output=True)
    try:
        refused = [
            httpx.post(f"{a.url}/v1/sessions", json={}),
            httpx.post(f"{a.url}/v1/sessions/{sid}/steps", json={"inputs": [[0.0] * 12]}),
        ]
    finally:
        subprocess.run([*refuse, "0"], check=True, capture_output=True)
    for response in refused:
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "session_store_unavailable"
        assert "refused the command (full, read-only or not permitted)" in response.json()["error"]["message"]
        assert response.headers["Retry-After"] == "5"
    assert httpx.post(f"{a.url}/v1/sessions/{sid}/steps", json={"inputs": [[0.0] * 12]}).json()["steps"] == 1


def test_a_step_redis_stalls_on_says_it_may_have_been_applied_and_its_seq_retry_is_answered_once(start_server):
    """The commit left for Redis, which stalled: the server cannot know whether it ran (it runs when Redis
    wakes), so the 503 says it may have been applied, and the same chunk resent with its seq is answered
    from the session, not applied again."""
    redis_server = RedisProcess().start()
    try:
        (a,) = replicas(start_server, redis_server, 1)
        sid = httpx.post(f"{a.url}/v1/sessions", json={}).json()["session_id"]
        chunk = {"inputs": [[0.5] * 12, [-0.25] * 12], "seq": 0}
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            stalled = httpx.post(f"{a.url}/v1/sessions/{sid}/steps", json=chunk, timeout=30)
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        assert stalled.status_code == 503 and stalled.headers["Retry-After"] == "1", stalled.text
        error = stalled.json()["error"]
        assert error["code"] == "session_store_unavailable" and "may have been applied" in error["message"]
        retried = httpx.post(f"{a.url}/v1/sessions/{sid}/steps", json=chunk).json()
        assert retried["steps"] == 2 and httpx.get(f"{a.url}/v1/sessions/{sid}").json()["steps"] == 2
        expected = classify(a.url, np.array(chunk["inputs"], np.float32))
        np.testing.assert_allclose(retried["prediction"]["probabilities"], expected, atol=ATOL)
    finally:
        redis_server.stop()


def test_an_unconfirmed_step_is_advised_by_protocol_and_a_step_that_never_left_says_it_was_not_applied(
    start_server,
):
    """An OIP sequence has no seq, and its sessions are not /v1's: the /v1 advice (resend with the same seq, or
    read GET /v1/sessions/{id}) applied a resent chunk twice there. And a step sent while Redis refused
    connections never left: it was not applied, and the message said it may have been."""
    redis_server = RedisProcess().start()
    try:
        (a,) = replicas(start_server, redis_server, 1)
        frames = [[0.5] * 12, [-0.25] * 12]
        infer = f"{a.url}/v2/models/japanese-vowels/infer"

        def oip(**flags: bool) -> dict:
            tensor = {"name": "x", "datatype": "FP32", "shape": [1, 2, 12], "data": sum(frames, [])}
            return {"inputs": [tensor], "parameters": {"sequence_id": 5, **flags}}

        assert httpx.post(infer, json=oip(sequence_start=True)).status_code == 200
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            stalled = httpx.post(infer, json=oip(), timeout=30)
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        assert stalled.status_code == 503, stalled.text
        assert "no seq to resend it by" in stalled.json()["error"] and "/v1" not in stalled.json()["error"]
        sid = httpx.post(f"{a.url}/v1/sessions", json={}).json()["session_id"]
        redis_server.stop()
        down = httpx.post(f"{a.url}/v1/sessions/{sid}/steps", json={"inputs": frames, "seq": 0}, timeout=30)
        assert down.status_code == 503 and "this step was not applied" in down.json()["error"]["message"], down.text
    finally:
        redis_server.stop()


def test_a_session_create_redis_stalls_on_is_taken_out_when_it_lands(start_server):
    """The create left for Redis, which stalled: the 503 gave no id, but the create ran when Redis woke, and the
    session counted against max_sessions (and its caller's share) until it expired, with no one able to delete
    it. The server now deletes it once Redis answers again."""
    redis_server = RedisProcess().start()
    try:
        (a,) = replicas(start_server, redis_server, 1)
        kept = httpx.post(f"{a.url}/v1/sessions", json={}).json()["session_id"]
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            stalled = [httpx.post(f"{a.url}/v1/sessions", json={}, timeout=30) for _ in range(2)]
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        assert all(r.status_code == 503 for r in stalled), [r.text for r in stalled]
        count = ["redis-cli", "-p", str(redis_server.port), "zcard", "lstm-serve:sessions"]
        deadline = time.monotonic() + 10
        while int(subprocess.run(count, capture_output=True, text=True).stdout) != 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert int(subprocess.run(count, capture_output=True, text=True).stdout) == 1  # the one a caller knows
        keys = subprocess.run(["redis-cli", "-p", str(redis_server.port), "--scan", "--pattern", "lstm-serve:s:*"],
                              capture_output=True, text=True).stdout.split()  # fmt: skip
        assert len(keys) == 1, keys
        assert httpx.get(f"{a.url}/v1/sessions/{kept}").status_code == 200
    finally:
        redis_server.stop()


def test_with_a_rate_limit_a_redis_refusing_writes_fails_the_limit_open_not_every_request(start_server, redis_server):
    """The rate buckets live in Redis: a Redis that refuses writes lets requests through (as one that is down
    does), instead of turning every request into a 500."""
    env = {"LSTM_SERVE_REDIS_URL": redis_server.url, "LSTM_SERVE_RATE_LIMIT": "1000/s"}
    a = start_server(env=env)
    refuse = ["redis-cli", "-p", str(redis_server.port), "config", "set", "min-replicas-to-write"]
    subprocess.run([*refuse, "1"], check=True, capture_output=True)
    try:
        classified = httpx.post(f"{a.url}/v1/classify", json={"sequences": [[[0.0] * 12]]})
        models = httpx.get(f"{a.url}/v1/models")
        created = httpx.post(f"{a.url}/v1/sessions", json={})
    finally:
        subprocess.run([*refuse, "0"], check=True, capture_output=True)
    assert classified.status_code == 200 and models.status_code == 200, (classified.text, models.text)
    assert created.status_code == 503 and created.json()["error"]["code"] == "session_store_unavailable"
    assert "Traceback" not in a.output()


def test_with_a_rate_limit_a_stalled_redis_delays_one_request_not_every_one(start_server):
    redis_server = RedisProcess().start()
    try:
        env = {"LSTM_SERVE_REDIS_URL": redis_server.url, "LSTM_SERVE_RATE_LIMIT": "1000/s"}
        a = start_server(env=env)
        body = {"sequences": [[[0.0] * 12]]}
        assert httpx.post(f"{a.url}/v1/classify", json=body).status_code == 200
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            took = []
            for _ in range(8):
                started = time.monotonic()
                assert httpx.post(f"{a.url}/v1/classify", json=body, timeout=30).status_code == 200
                took.append(time.monotonic() - started)
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
    finally:
        redis_server.stop()
    assert sum(took) < 2.0 and sorted(took)[-2] < 0.3, took  # one waits for the bucket's timeout, at most
    assert "a rate bucket took over 0.5 s" in a.output()


def test_with_redis_stalled_probes_and_scrapes_answer_within_a_second_and_readiness_comes_back(start_server):
    """A stalled Redis answers nothing until its client gives up (2 s): a readiness probe (a kubelet's has a
    timeout) hears "not ready" within half a second instead, a metrics scrape is served without the session
    count, and once Redis answers again the server is ready again."""
    redis_server = RedisProcess().start()
    try:
        a = start_server(env={"LSTM_SERVE_REDIS_URL": redis_server.url})
        assert httpx.get(f"{a.url}/readyz").status_code == 200
        assert "lstm_serve_active_sessions 0.0" in httpx.get(f"{a.url}/metrics").text
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            answers = []
            for path in ("/readyz", "/v2/health/ready", "/metrics", "/readyz", "/metrics", "/v2/health/ready"):
                started = time.monotonic()
                reply = httpx.get(f"{a.url}{path}", timeout=30)
                answers.append((path, reply.status_code, time.monotonic() - started, reply.text))
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while httpx.get(f"{a.url}/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        ready_again = httpx.get(f"{a.url}/readyz")
    finally:
        redis_server.stop()
    assert all(took < 1.0 for _, _, took, _ in answers), [(p, s, t) for p, s, t, _ in answers]
    for path, status, _, text in answers:
        if path == "/metrics":
            assert status == 200 and "lstm_serve_batch_size" in text, text[:200]
        elif path == "/readyz":
            assert status == 503 and "the session store" in text, text  # did not answer in 0.5 s, or unreachable
        else:
            assert status == 503, text  # OIP's server ready: not ready, without a body
    assert ready_again.status_code == 200, ready_again.text
