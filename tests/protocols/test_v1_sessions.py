"""Streaming sessions against a real server: exactness, order, retries, lifecycle, WebSocket."""

import asyncio
import json
import random

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

ATOL = 1e-5


def classify(client, frames: np.ndarray) -> np.ndarray:
    response = client.post("/v1/classify", json={"sequences": [frames.tolist()]})
    return np.array(response.json()["predictions"][0]["probabilities"])


def new_session(client) -> str:
    response = client.post("/v1/sessions", json={})
    assert response.status_code == 201
    return response.json()["session_id"]


def split(frames: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    cuts = np.cumsum(sizes)[:-1]
    return [c for c in np.split(frames, cuts) if len(c)]


def test_session_lifecycle_fields(client):
    created = client.post("/v1/sessions", json={"model": "japanese-vowels"})
    body = created.json()
    assert set(body) == {"session_id", "model", "version", "steps", "expires_at", "input_dim"}
    assert body["model"] == "japanese-vowels" and body["input_dim"] == 12
    sid = body["session_id"]
    info = client.get(f"/v1/sessions/{sid}").json()
    assert info["steps"] == 0 and info["prediction"] is None and info["created_at"] < info["expires_at"]
    step = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.1] * 12] * 3, "return_steps": True}).json()
    assert step["steps"] == 3 and len(step["step_predictions"]) == 3
    assert step["step_predictions"][-1] == step["prediction"]
    assert client.get(f"/v1/sessions/{sid}").json()["prediction"] == step["prediction"]
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    for call in (
        client.get(f"/v1/sessions/{sid}"),
        client.delete(f"/v1/sessions/{sid}"),
        client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.0] * 12]}),
    ):
        assert call.status_code == 404 and call.json()["error"]["code"] == "session_not_found"
        assert call.json()["error"]["message"].startswith(f"no session {sid!r} "), "not the id the caller knows"


def test_unknown_model_for_a_session_is_a_404(client):
    assert client.post("/v1/sessions", json={"model": "nope"}).status_code == 404


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(0, 369), sizes=st.lists(st.integers(1, 9), min_size=1, max_size=30))
def test_any_chunking_gives_the_probabilities_of_classify(client, test_sequences, index, sizes):
    frames = test_sequences[index]
    sizes = sizes + [len(frames)]  # whatever the sizes, the last chunk takes what is left
    sid = new_session(client)
    step_predictions = []
    for chunk in split(frames, sizes):
        body = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": chunk.tolist(), "return_steps": True}).json()
        step_predictions += body["step_predictions"]
    assert body["steps"] == len(frames)
    np.testing.assert_allclose(body["prediction"]["probabilities"], classify(client, frames), atol=ATOL)
    # a prefix streamed so far predicts what classify says of that prefix
    t = len(frames) // 2
    np.testing.assert_allclose(step_predictions[t - 1]["probabilities"], classify(client, frames[:t]), atol=ATOL)
    client.delete(f"/v1/sessions/{sid}")


def test_sixty_sessions_streamed_concurrently_and_interleaved(server, client, test_sequences):
    chosen = test_sequences[100:160]

    async def stream(c: httpx.AsyncClient, frames: np.ndarray, rng: random.Random) -> np.ndarray:
        sid = (await c.post("/v1/sessions", json={})).json()["session_id"]
        steps = 0
        for chunk in split(frames, [rng.randint(1, 4) for _ in range(len(frames))]):
            r = await c.post(f"/v1/sessions/{sid}/steps", json={"inputs": chunk.tolist(), "seq": steps})
            assert r.status_code == 200, r.text
            steps = r.json()["steps"]
            await asyncio.sleep(rng.random() * 0.002)  # interleave with the other sessions
        return np.array(r.json()["prediction"]["probabilities"])

    async def main():
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:
            return await asyncio.gather(*(stream(c, f, random.Random(k)) for k, f in enumerate(chosen)))

    results = asyncio.run(main())
    for frames, got in zip(chosen, results, strict=True):
        np.testing.assert_allclose(got, classify(client, frames), atol=ATOL)


def test_concurrent_steps_on_one_session_are_each_applied_exactly_once(server, client):
    frame = [[0.3] * 12]
    sid = new_session(client)

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            return await asyncio.gather(
                *(c.post(f"/v1/sessions/{sid}/steps", json={"inputs": frame}) for _ in range(40))
            )

    responses = asyncio.run(main())
    assert all(r.status_code == 200 for r in responses)
    assert sorted(r.json()["steps"] for r in responses) == list(range(1, 41)), "a step was lost or doubled"
    final = client.get(f"/v1/sessions/{sid}").json()
    assert final["steps"] == 40
    np.testing.assert_allclose(final["prediction"]["probabilities"], classify(client, np.array(frame * 40)), atol=ATOL)


def test_seq_applies_once_replays_a_retry_and_refuses_the_rest(server, client):
    sid = new_session(client)
    first = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.1] * 12] * 2, "seq": 0})
    assert first.status_code == 200 and first.json()["steps"] == 2
    retry = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.1] * 12] * 2, "seq": 0})
    assert retry.status_code == 200 and retry.json() == first.json(), "a retry was not answered from the record"
    assert client.get(f"/v1/sessions/{sid}").json()["steps"] == 2, "a retry was applied twice"
    different = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.9] * 12], "seq": 0})
    ahead = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.1] * 12], "seq": 5})
    for refused in (different, ahead):
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "seq_conflict" and refused.json()["error"]["expected_seq"] == 2
        assert f"session {sid!r} has consumed 2 frames" in refused.json()["error"]["message"]

    async def race():  # ten clients send the same chunk with the same seq at once: it applies once
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            body = {"inputs": [[0.2] * 12], "seq": 2}
            return await asyncio.gather(*(c.post(f"/v1/sessions/{sid}/steps", json=body) for _ in range(10)))

    responses = asyncio.run(race())
    assert all(r.status_code == 200 and r.json()["steps"] == 3 for r in responses)
    assert client.get(f"/v1/sessions/{sid}").json()["steps"] == 3


BAD_STEPS = [
    ({"inputs": [[0.0] * 5]}, 422, "frame 0 has 5 features"),
    ({"inputs": []}, 422, "inputs: List should have at least 1 item"),
    ({"inputs": [[0.0] * 12], "seq": -1}, 422, "seq: Input should be greater than or equal to 0"),
    ({"inputs": [[0.0] * 12], "seq": "1"}, 422, "seq: Input should be a valid integer"),
    ({"inputs": [[0.0] * 12] * 4097}, 422, "over max_sequence_length=4096"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_STEPS)
def test_a_bad_step_changes_nothing(client, body, status, message):
    sid = new_session(client)
    good = client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[0.5] * 12]}).json()
    response = client.post(f"/v1/sessions/{sid}/steps", json=body)
    assert response.status_code == status and message in response.json()["error"]["message"]
    info = client.get(f"/v1/sessions/{sid}").json()
    assert info["steps"] == 1 and info["prediction"] == good["prediction"]


def ws_url(server, sid: str) -> str:
    return server.url.replace("http://", "ws://") + f"/v1/sessions/{sid}/stream"


def test_websocket_stream_json_and_binary_equals_classify(server, client, test_sequences):
    frames = test_sequences[7]
    sid = new_session(client)
    with connect(ws_url(server, sid)) as ws:
        ws.send(json.dumps({"inputs": frames[:5].tolist(), "seq": 0}))
        assert json.loads(ws.recv())["steps"] == 5
        for t in range(5, len(frames)):
            ws.send(frames[t : t + 1].astype("<f4").tobytes())
            reply = json.loads(ws.recv())
            assert reply["steps"] == t + 1
    np.testing.assert_allclose(reply["prediction"]["probabilities"], classify(client, frames), atol=ATOL)


def test_a_bad_websocket_message_gets_an_error_and_the_socket_stays_usable(server, client):
    sid = new_session(client)
    with connect(ws_url(server, sid)) as ws:
        for bad, message in [
            (b"\x00\x01\x02", "3 bytes is not a whole number of frames"),
            ("not json", "message is not valid JSON"),
            (json.dumps({"inputs": [[1.0] * 3]}), "frame 0 has 3 features"),
            (np.full((1, 12), np.nan, "<f4").tobytes(), "NaN or Inf"),
            (json.dumps({"inputs": [[1.0] * 12], "seq": 9}), "seq 9 does not match"),
        ]:
            ws.send(bad)
            error = json.loads(ws.recv())["error"]
            assert message in error["message"], error
        ws.send(json.dumps({"inputs": [[1.0] * 12]}))
        assert json.loads(ws.recv())["steps"] == 1
    assert client.get(f"/v1/sessions/{sid}").json()["steps"] == 1


def test_websocket_to_an_unknown_session_says_so_and_closes(server):
    with connect(ws_url(server, "missing")) as ws:
        assert json.loads(ws.recv())["error"]["code"] == "session_not_found"
        with pytest.raises(Exception):  # noqa: B017 - closed by the server, code 4404
            ws.recv()
        assert ws.close_code == 4404


def test_an_empty_chunked_body_is_no_body_and_a_typeless_one_is_refused(client):
    """POST /v1/sessions takes no body; sent chunked, an empty one is the same (it was 415 for lacking a type)."""

    def chunks(*parts: bytes):
        yield from parts

    empty = client.post("/v1/sessions", content=chunks())
    assert empty.status_code == 201, empty.text
    assert empty.request.headers.get("transfer-encoding") == "chunked"
    typeless = client.post("/v1/sessions", content=chunks(b"{}"))
    assert typeless.status_code == 415 and "Content-Type 'none'" in typeless.json()["error"]["message"]
    typed = client.post("/v1/sessions", content=chunks(b"{}"), headers={"Content-Type": "application/json"})
    assert typed.status_code == 201
