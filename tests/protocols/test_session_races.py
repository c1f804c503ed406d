"""A step still running while its session is restarted or deleted: the restarted session holds exactly its
own frames, and the step either completes first or fails with an error that says why."""

import asyncio
import json

import httpx
import numpy as np
import pytest

MODEL = "japanese-vowels"
ATOL = 1e-5


def oip_body(frames: np.ndarray, sequence_id: int, start: bool = False, end: bool = False) -> dict:
    return {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, *frames.shape], "data": frames.ravel().tolist()}],
        "outputs": [{"name": "probabilities"}],
        "parameters": {"sequence_id": sequence_id, "sequence_start": start, "sequence_end": end},
    }


def oip_binary(frames: np.ndarray, sequence_id: int) -> tuple[bytes, dict]:
    """A continue request with binary tensor data: parsed in microseconds, so it is running 30 ms later."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, *frames.shape],
                    "parameters": {"binary_data_size": frames.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities"}],
            "parameters": {"sequence_id": sequence_id},
        }
    ).encode()
    return header + frames.astype("<f4").tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def check_outcome(restart: httpx.Response, in_flight: httpx.Response, after: httpx.Response) -> str:
    """The restart holds exactly its 5 frames, and the chunk in flight either ran before it (and is gone
    with the old sequence), or failed saying why; `after` added one frame to the restarted sequence."""
    assert restart.status_code == 200, restart.text
    assert restart.json()["parameters"]["sequence_steps"] == 5
    assert after.json()["parameters"]["sequence_steps"] == 6
    if in_flight.status_code == 200:
        assert in_flight.json()["parameters"]["sequence_steps"] == 4098
        return "completed first"
    assert in_flight.status_code == 409 and "restarted" in in_flight.json()["error"], in_flight.text
    return "failed"


def chunks(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 4,096-frame chunk (about 80 ms of work) and 5 frames."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(4096, 12)).astype(np.float32), rng.normal(size=(5, 12)).astype(np.float32)


async def restart_during_a_long_step(url: str, sequence_id: int) -> tuple[httpx.Response, httpx.Response]:
    long_chunk, short = chunks(sequence_id)
    infer = f"{url}/v2/models/{MODEL}/infer"
    async with httpx.AsyncClient(timeout=60) as c:
        first = await c.post(infer, json=oip_body(short[:2], sequence_id, start=True))
        assert first.status_code == 200, first.text
        content, headers = oip_binary(long_chunk, sequence_id)
        in_flight = asyncio.create_task(c.post(infer, content=content, headers=headers))
        await asyncio.sleep(0.03)  # the 4,096-frame chunk is running
        restart = await c.post(infer, json=oip_body(short, sequence_id, start=True))
        return restart, await in_flight


def classify(url: str, frames: np.ndarray) -> np.ndarray:
    reply = httpx.post(f"{url}/v1/classify", json={"model": MODEL, "sequences": [frames.tolist()]})
    return np.array(reply.json()["predictions"][0]["probabilities"])


def check_restart_holds_only_its_own_frames(url: str) -> None:
    for sequence_id in range(5000, 5006):
        restart, in_flight = asyncio.run(restart_during_a_long_step(url, sequence_id))
        _, frames = chunks(sequence_id)
        after = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=oip_body(frames[:1], sequence_id, end=True))
        check_outcome(restart, in_flight, after)
        np.testing.assert_allclose(restart.json()["outputs"][0]["data"], classify(url, frames), atol=ATOL)


def test_a_restart_racing_a_step_holds_only_its_own_frames_in_memory(start_server):
    check_restart_holds_only_its_own_frames(start_server().url)


def test_a_restart_racing_a_step_holds_only_its_own_frames_in_redis(start_server, redis_server):
    check_restart_holds_only_its_own_frames(start_server(env={"LSTM_SERVE_REDIS_URL": redis_server.url}).url)


def test_a_restart_on_another_replica_fails_the_step_in_flight(start_server, redis_server):
    """Across replicas no lock orders the two: the step loses its compare-and-set and must not redo its
    chunk on the restarted sequence."""
    env = {"LSTM_SERVE_REDIS_URL": redis_server.url}
    a, b = start_server(env=env), start_server(env=env)

    async def race(sequence_id: int, delay_s: float) -> tuple[httpx.Response, httpx.Response]:
        long_chunk, short = chunks(sequence_id)
        async with httpx.AsyncClient(timeout=60) as c:
            await c.post(f"{a.url}/v2/models/{MODEL}/infer", json=oip_body(short[:2], sequence_id, start=True))
            content, headers = oip_binary(long_chunk, sequence_id)
            in_flight = asyncio.create_task(
                c.post(f"{a.url}/v2/models/{MODEL}/infer", content=content, headers=headers)
            )
            await asyncio.sleep(delay_s)
            restart = await c.post(f"{b.url}/v2/models/{MODEL}/infer", json=oip_body(short, sequence_id, start=True))
            return restart, await in_flight

    outcomes = []
    # the chunk runs for some 20-80 ms: restarts at several moments in it; every outcome must be right
    for sequence_id, delay_s in enumerate([0.008, 0.004, 0.012, 0.002, 0.02, 0.006, 0.03, 0.001], start=77):
        restart, in_flight = asyncio.run(race(sequence_id, delay_s))
        _, short = chunks(sequence_id)
        after = httpx.post(f"{a.url}/v2/models/{MODEL}/infer", json=oip_body(short[:1], sequence_id, end=True))
        outcomes.append(check_outcome(restart, in_flight, after))
        if outcomes[-1] == "failed":
            break
    # no lock orders two replicas: the step on `a` loses its compare-and-set to the restart on `b`
    assert "failed" in outcomes, outcomes


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_delete_racing_a_step_never_resurrects_the_session(start_server, redis_server, store):
    env = {"LSTM_SERVE_REDIS_URL": redis_server.url} if store == "redis" else {}
    server = start_server(env=env)
    long_chunk = np.random.default_rng(3).normal(size=(4096, 12)).tolist()

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            sid = (await c.post("/v1/sessions", json={})).json()["session_id"]
            in_flight = asyncio.create_task(c.post(f"/v1/sessions/{sid}/steps", json={"inputs": long_chunk}))
            await asyncio.sleep(0.03)
            deleted = await c.delete(f"/v1/sessions/{sid}")
            return sid, deleted, await in_flight, await c.get(f"/v1/sessions/{sid}")

    sid, deleted, step, after = asyncio.run(main())
    assert deleted.status_code == 204
    assert step.status_code in (200, 404), step.text
    assert after.status_code == 404, f"session {sid} came back after its delete: {after.text}"
