"""The HTTP API against a real uvicorn server: fields, numbers and status codes."""

import asyncio
import json

import httpx
import numpy as np
import pytest

from lstm_serve.export.parity import last_step_probabilities, ort_session
from tests.conftest import SHIPPED_ENTRY

D = 12


def zeros(t: int, d: int = D) -> list[list[float]]:
    return [[0.0] * d for _ in range(t)]


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == ["basic-motions", "japanese-vowels"]


def test_models_describe_what_is_served(client):
    listed = {model["name"]: model for model in client.get("/v1/models").json()}
    one = client.get("/v1/models/japanese-vowels").json()
    assert set(listed) == {"basic-motions", "japanese-vowels"} and listed["japanese-vowels"] == one
    assert listed["basic-motions"]["input_dim"] == 6 and len(listed["basic-motions"]["labels"]) == 4
    default = client.post("/v1/classify", json={"sequences": [zeros(3)]}).json()
    assert default["model"] == "japanese-vowels"  # a request that names no model
    config = json.loads((SHIPPED_ENTRY / "config.json").read_text())
    assert one["name"] == "japanese-vowels" and one["version"] == 1 and one["cell"] == "lstm"
    assert one["labels"] == config["labels"] and one["input_dim"] == 12
    assert (one["hidden_size"], one["num_layers"]) == (config["hidden_size"], config["num_layers"])
    assert one["metrics"]["test_accuracy"] == config["metrics"]["test_accuracy"]
    assert one["execution_provider"] == "CPUExecutionProvider"
    missing = client.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_classify_matches_onnxruntime_in_process(client, test_sequences):
    batch = test_sequences[:40]  # lengths 7..29, mixed in one request
    response = client.post("/v1/classify", json={"sequences": [s.tolist() for s in batch]})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "japanese-vowels" and body["version"] == 1
    expected = last_step_probabilities(ort_session(SHIPPED_ENTRY / "model.onnx"), batch)
    got = np.array([p["probabilities"] for p in body["predictions"]])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    labels = client.get("/v1/models/japanese-vowels").json()["labels"]
    for prediction, row in zip(body["predictions"], expected, strict=True):
        assert prediction["class_id"] == int(row.argmax()) and prediction["label"] == labels[prediction["class_id"]]


def test_concurrent_mixed_length_requests_are_batched_without_changing_results(server, test_sequences):
    sequences = test_sequences[:64]
    expected = last_step_probabilities(ort_session(SHIPPED_ENTRY / "model.onnx"), sequences)

    def batch_stats(metrics: str) -> tuple[float, float]:
        values = {}
        for line in metrics.splitlines():
            for key in ("lstm_serve_batch_size_sum", "lstm_serve_batch_size_count"):
                if line.startswith(key + "{"):
                    values[key] = float(line.rsplit(" ", 1)[1])
        return values["lstm_serve_batch_size_sum"], values["lstm_serve_batch_size_count"]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            before = batch_stats((await c.get("/metrics")).text)
            responses = await asyncio.gather(
                *(c.post("/v1/classify", json={"sequences": [s.tolist()]}) for s in sequences)
            )
            after = batch_stats((await c.get("/metrics")).text)
        return responses, before, after

    responses, before, after = asyncio.run(main())
    got = np.array([r.json()["predictions"][0]["probabilities"] for r in responses])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    items, calls = after[0] - before[0], after[1] - before[1]
    assert items == 64 and calls < 64, f"64 concurrent requests took {calls:.0f} onnxruntime calls: no batching"


BAD_CLASSIFY = [
    ({"sequences": [zeros(3, 11)]}, 422, "frame 0 has 11 features; model 'japanese-vowels' takes 12"),
    ({"sequences": [[[0.0] * 12, [0.0] * 13]]}, 422, "frame 1 has 13 features"),
    ({"sequences": [[]]}, 422, "sequences[0] is empty"),
    ({"sequences": []}, 422, "sequences: List should have at least 1 item"),
    ({"sequences": [zeros(5000)]}, 422, "5000 frames, over max_sequence_length=4096"),
    ({"sequences": [zeros(1)] * 257}, 422, "257 sequences in one request, over max_sequences_per_request=256"),
    ({"sequences": [[["a"] * 12]]}, 422, "sequences.0.0.0: Input should be a valid number"),
    ({"sequences": [[[True] * 12]]}, 422, "Input should be a valid number"),
    ({"sequences": 5}, 422, "sequences: Input should be a valid array"),
    ({"sequence": [zeros(2)]}, 422, "sequence: Extra inputs are not permitted"),
    ({"model": "nope", "sequences": [zeros(2)]}, 404, "no model 'nope'"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_CLASSIFY)
def test_bad_classify_input_gets_a_4xx_that_says_what_is_wrong(client, body, status, message):
    response = client.post("/v1/classify", json=body)
    assert response.status_code == status
    assert message in response.json()["error"]["message"]


@pytest.mark.parametrize("first_value", [b"NaN", b"Infinity", b"-Infinity", b"1e39"])
def test_nan_and_inf_are_refused(client, first_value):
    raw = b'{"sequences": [[[' + first_value + b",0" * 11 + b"]]]}"
    response = client.post("/v1/classify", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "frame 0 holds NaN or Inf" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"sequences": [[[1,2', "not valid JSON: "),
        (b'\xef\xbb\xbf{"sequences": [[[0.1]]]}', "starts with a byte order mark"),
        (b'{"sequences": [[[0.1]]], "model": "\\ud800"}', "half of a surrogate pair"),
        (b'{"sequences": [[[0.1]]], "model": "\\udc00x"}', "half of a surrogate pair"),
    ],
    ids=["truncated", "byte-order-mark", "lone-high-surrogate", "lone-low-surrogate"],
)
def test_malformed_json_is_a_400_that_says_why(client, body, says):
    response = client.post("/v1/classify", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "malformed_request"
    assert says in response.json()["error"]["message"]


def test_an_oversized_body_is_a_413_declared_or_streamed(client):
    big = b'{"sequences": [' + b"[[0,0,0,0,0,0,0,0,0,0,0,0]]," * 400_000 + b"]}"
    response = client.post("/v1/classify", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "max_body_bytes" in response.json()["error"]["message"]

    def chunks():
        for _ in range(100):
            yield b" " * 100_000

    streamed = client.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    # a new connection: the one answered before its body arrived is closed (a pooled reuse could race it)
    assert httpx.get(str(client.base_url.join("/readyz"))).status_code == 200


def test_unknown_routes_and_methods_use_the_error_shape(client):
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    response = client.put("/v1/classify")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    plain = client.get("/v1/sessions/abc/stream")  # a WebSocket's path without the upgrade
    assert plain.status_code == 426 and plain.headers["upgrade"] == "websocket"
    assert plain.json()["error"]["code"] == "upgrade_required"


def test_metrics_expose_the_promised_series(client):
    client.post("/v1/classify", json={"sequences": [zeros(3)]})
    text = client.get("/metrics").text
    for series in [
        'lstm_serve_requests_total{method="POST",route="/v1/classify",status="200"}',
        "lstm_serve_request_duration_seconds_bucket",
        "lstm_serve_batch_size_bucket",
        "lstm_serve_queue_wait_seconds_bucket",
        "lstm_serve_inference_seconds_bucket",
        "lstm_serve_active_sessions",
        "lstm_serve_sessions_expired_total",
        "lstm_serve_queue_length",
    ]:
        assert series in text, f"{series} missing from /metrics"


def test_openapi_documents_every_route_including_the_hot_ones(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths["/v1/classify"]) == {"post"}
    assert set(paths["/v1/sessions/{session_id}"]) == {"get", "delete"}
    assert "requestBody" in paths["/v1/sessions/{session_id}/steps"]["post"]
    step_body = schema["components"]["schemas"]["StepRequest"]["properties"]
    assert {"inputs", "seq", "return_steps"} <= set(step_body)
    assert client.get("/docs").status_code == 200


def test_metric_labels_use_route_templates_never_session_ids(client):
    sid = client.post("/v1/sessions", json={}).json()["session_id"]
    client.put(f"/v1/sessions/{sid}")  # 405 on a session path
    client.get(f"/v1/sessions/{sid}")
    for method in ("PROPFIND", "MKCOL", "QUERY"):  # methods httptools parses, one series for all of them
        assert client.request(method, f"/v1/sessions/{sid}").status_code == 405
    text = client.get("/metrics").text
    assert sid not in text
    assert "PROPFIND" not in text and 'method="OTHER",route="/v1/sessions/{session_id}",status="405"' in text
    assert 'lstm_serve_requests_total{method="PUT",route="/v1/sessions/{session_id}",status="405"}' in text


@pytest.mark.parametrize(
    ("path", "body", "first"),
    [
        ("/v1/classify", '{"sequences": [[[' + ",".join(['"a"'] * 100_000) + "]]]}", "sequences.0.0.0"),
        ("/v1/classify", '{"sequences": [' + ",".join(["1"] * 100_000) + "]}", "sequences.0:"),
        ("/v2/models/japanese-vowels/infer", '{"inputs": [' + ",".join(["1"] * 100_000) + "]}", "inputs.0:"),
    ],
)
def test_a_body_of_many_bad_items_is_refused_at_the_first_not_after_building_an_error_for_each(
    client, path, body, first
):
    """A list stops at its first bad item: reporting three of a million errors built all million (seconds of
    the event loop and gigabytes, from a body of a few KB compressed)."""
    reply = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code in (400, 422), reply.text
    assert first in reply.text and "more problems" not in reply.text, reply.text[:300]
