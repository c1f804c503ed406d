"""The Open Inference Protocol, driven by NVIDIA's own client (tritonclient[http]) against a real server."""

import gzip
import json
import zlib

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

MODEL = "japanese-vowels"
ATOL = 1e-5


@pytest.fixture(scope="module")
def triton_client(server):
    client = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=30)
    yield client
    client.close()


def v1_probabilities(client, sequences: list[np.ndarray]) -> np.ndarray:
    response = client.post("/v1/classify", json={"sequences": [s.tolist() for s in sequences]})
    assert response.status_code == 200
    return np.array([p["probabilities"] for p in response.json()["predictions"]])


def padded(sequences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(s) for s in sequences], np.int64)
    x = np.zeros((len(sequences), lengths.max(), sequences[0].shape[1]), np.float32)
    for row, s in enumerate(sequences):
        x[row, : len(s)] = s
    return x, lengths


def tensor(name: str, array: np.ndarray, datatype: str, binary: bool = True) -> triton.InferInput:
    inp = triton.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array, binary_data=binary)
    return inp


def infer_sequence_chunk(triton_client, chunk: np.ndarray, sequence_id, start: bool, end: bool) -> np.ndarray:
    result = triton_client.infer(
        MODEL,
        [tensor("x", chunk[None], "FP32")],
        sequence_id=sequence_id,
        sequence_start=start,
        sequence_end=end,
        outputs=[triton.InferRequestedOutput("probabilities")],
    )
    return result.as_numpy("probabilities")[0]


def test_health_and_metadata(triton_client):
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready(MODEL) and triton_client.is_model_ready(MODEL, "1")
    assert not triton_client.is_model_ready(MODEL, "2") and not triton_client.is_model_ready("no-such-model")
    server = triton_client.get_server_metadata()
    assert server["name"] == "lstm-serve"
    assert {"binary_tensor_data", "sequence", "classification", "model_repository"} <= set(server["extensions"])
    meta = triton_client.get_model_metadata(MODEL)
    assert meta == triton_client.get_model_metadata(MODEL, "1")
    assert meta["name"] == MODEL and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert {"name": "x", "datatype": "FP32", "shape": [-1, -1, 12]} in meta["inputs"]
    assert {"name": "probabilities", "datatype": "FP32", "shape": [-1, 9]} in meta["outputs"]
    assert {"name": "logits", "datatype": "FP32", "shape": [-1, -1, 9]} in meta["outputs"]
    config = triton_client.get_model_config(MODEL)
    state = config["sequence_batching"]["state"]
    assert [(s["input_name"], s["output_name"], s["dims"]) for s in state] == [
        ("h0", "hn", [2, 192]),
        ("c0", "cn", [2, 192]),
    ]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_v1_classify(triton_client, client, test_sequences, binary):
    sequences = test_sequences[:37]  # lengths 7..29: padded, with a lengths input
    x, lengths = padded(sequences)
    x = np.concatenate([x, np.zeros((len(x), 3, x.shape[2]), np.float32)], axis=1)  # padded past the longest
    result = triton_client.infer(
        MODEL,
        [tensor("x", x, "FP32", binary), tensor("lengths", lengths, "INT64", binary)],
        outputs=[triton.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "logits")],
        request_id="req-17",
    )
    assert result.get_response()["id"] == "req-17"
    assert result.get_response()["model_name"] == MODEL and result.get_response()["model_version"] == "1"
    probabilities, logits = result.as_numpy("probabilities"), result.as_numpy("logits")
    assert probabilities.shape == (37, 9) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, v1_probabilities(client, sequences), atol=ATOL)
    assert logits.shape == (37, lengths.max() + 3, 9), "per-step outputs are [B, T, C] with the input's T"
    for row, n in enumerate(lengths):  # softmax of the last valid step's logits is the prediction
        last = np.exp(logits[row, n - 1] - logits[row, n - 1].max())
        np.testing.assert_allclose(last / last.sum(), probabilities[row], atol=ATOL)
        assert not logits[row, n:].any()


def test_all_outputs_when_none_requested_and_gzip(triton_client, client, test_sequences):
    sequence = test_sequences[5]
    result = triton_client.infer(MODEL, [tensor("x", sequence[None], "FP32")], request_compression_algorithm="gzip")
    assert {o["name"] for o in result.get_response()["outputs"]} == {"probabilities", "logits"}
    np.testing.assert_allclose(result.as_numpy("probabilities"), v1_probabilities(client, [sequence]), atol=ATOL)
    assert result.as_numpy("logits").shape == (1, len(sequence), 9)


def test_classification_extension(triton_client, client, test_sequences):
    sequences = test_sequences[40:44]
    x, lengths = padded(sequences)
    result = triton_client.infer(
        MODEL,
        [tensor("x", x, "FP32"), tensor("lengths", lengths, "INT64")],
        outputs=[triton.InferRequestedOutput("probabilities", class_count=3)],
    )
    top = result.as_numpy("probabilities")
    assert top.shape == (4, 3)
    expected = v1_probabilities(client, sequences)
    for row in range(4):
        cells = [cell.decode().split(":") for cell in top[row]]
        indices = [int(index) for _, index, _ in cells]
        assert indices == list(np.argsort(-expected[row])[:3])
        assert [label for _, _, label in cells] == [f"speaker-{i + 1}" for i in indices]
        np.testing.assert_allclose([float(v) for v, _, _ in cells], expected[row][indices], atol=1e-5)


def test_sequence_in_chunks_equals_whole(triton_client, client, test_sequences):
    sequence = test_sequences[7]
    chunks = np.split(sequence, [1, 4, 9])
    for i, chunk in enumerate(chunks):
        out = infer_sequence_chunk(triton_client, chunk, 1001, start=i == 0, end=i == len(chunks) - 1)
        np.testing.assert_allclose(
            out, v1_probabilities(client, [sequence[: sum(map(len, chunks[: i + 1]))]])[0], atol=ATOL
        )
    with pytest.raises(InferenceServerException, match="must specify sequence_start") as ended:
        infer_sequence_chunk(triton_client, chunks[0], 1001, start=False, end=False)  # end freed the state
    assert ended.value.status() == "400"


def test_interleaved_sequences_and_restart(triton_client, client, test_sequences):
    a, b = test_sequences[10], test_sequences[200]
    ids = ["speaker-a", 77]  # string and integer ids
    half = min(len(a), len(b)) // 2
    for t in range(half):  # one frame at a time, alternating between the two sequences
        for sid, seq in zip(ids, (a, b), strict=True):
            infer_sequence_chunk(triton_client, seq[t : t + 1], sid, start=t == 0, end=False)
    np.testing.assert_allclose(
        infer_sequence_chunk(triton_client, a[half:], ids[0], False, True), v1_probabilities(client, [a])[0], atol=ATOL
    )
    # a start on a live sequence begins again from zero state
    infer_sequence_chunk(triton_client, b[:3], ids[1], start=True, end=False)
    np.testing.assert_allclose(
        infer_sequence_chunk(triton_client, b[3:], ids[1], False, True), v1_probabilities(client, [b])[0], atol=ATOL
    )


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(0, 369), cuts=st.lists(st.integers(1, 28), max_size=6), data=st.data())
def test_any_chunking_equals_whole_sequence(triton_client, client, test_sequences, index, cuts, data):
    sequence = test_sequences[index]
    chunks = [c for c in np.split(sequence, sorted({c for c in cuts if c < len(sequence)})) if len(c)]
    sequence_id = data.draw(st.one_of(st.integers(1, 2**64 - 1), st.text("abcxyz-_", min_size=1, max_size=40)))
    for i, chunk in enumerate(chunks):
        out = infer_sequence_chunk(triton_client, chunk, sequence_id, start=i == 0, end=i == len(chunks) - 1)
    np.testing.assert_allclose(out, v1_probabilities(client, [sequence])[0], atol=ATOL)


def infer_raw(client, body, headers=None, path=f"/v2/models/{MODEL}/infer"):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, content=content, headers={"Content-Type": "application/json", **(headers or {})})


def x_tensor(shape, data=None, datatype="FP32", **extra):
    data = data if data is not None else [0.5] * int(np.prod(shape))
    return {"name": "x", "shape": shape, "datatype": datatype, "data": data, **extra}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"inputs": [x_tensor([1, 2, 12], datatype="FP64")]}, 400, "datatype FP64"),
        ({"inputs": [x_tensor([1, 2, 12], datatype="STRING")]}, 400, "datatype 'STRING'"),
        ({"inputs": [x_tensor([1, 2, 11])]}, 400, "shape [1, 2, 11]"),
        ({"inputs": [x_tensor([1, 2, 12], data=[0.5] * 23)]}, 400, "23 values in data"),
        ({"inputs": [x_tensor([1, 2, 12], data=["a"] * 24)]}, 400, "must be JSON numbers"),
        ({"inputs": [x_tensor([2, 12])]}, 400, "shape [2, 12]"),
        (
            {"inputs": [{"name": "h0", "shape": [1], "datatype": "FP32", "data": [0]}]},
            400,
            "unexpected inference input",
        ),
        (
            {"inputs": [x_tensor([1, 2, 12]), {"name": "lengths", "shape": [1], "datatype": "INT64", "data": [3]}]},
            400,
            "lengths between 1 and T=2",
        ),
        ({"inputs": [x_tensor([1, 2, 12])], "outputs": [{"name": "hn"}]}, 400, "unexpected inference output"),
        (
            {"inputs": [x_tensor([1, 2, 12])], "outputs": [{"name": "logits"}, {"name": "logits"}]},
            400,
            "output 'logits' is asked for twice",
        ),
        (
            {"inputs": [x_tensor([1, 2, 12])], "outputs": [{"name": "logits", "parameters": {"classification": 10}}]},
            400,
            "classification",
        ),
        ({"inputs": [x_tensor([1, 2, 12], data=[1e39] * 24)]}, 400, "NaN or Inf"),
        ({"inputs": [x_tensor([1, 2, 12])], "parameters": {"sequence_id": 555}}, 400, "must specify sequence_start"),
        ({"inputs": [x_tensor([1, 2, 12])], "parameters": {"sequence_start": True}}, 400, "needs a sequence_id"),
        (
            {"inputs": [x_tensor([2, 2, 12])], "parameters": {"sequence_id": 5, "sequence_start": True}},
            400,
            "one sequence",
        ),
        (
            {"inputs": [x_tensor([1, 2, 12])], "parameters": {"sequence_id": -1, "sequence_start": True}},
            400,
            "unsigned 64-bit",
        ),
        ({"inputs": [x_tensor([1, 2, 12], data=[0.5] * 23 + [True])]}, 400, "FP32 must be JSON numbers"),
        (
            {"inputs": [x_tensor([1, 2, 12]), {"name": "lengths", "shape": [1], "datatype": "INT64", "data": [True]}]},
            400,
            "INT64 must be JSON integers",
        ),
        (
            {"inputs": [x_tensor([1, 2, 12]), {"name": "lengths", "shape": [1], "datatype": "INT32", "data": [2**32]}]},
            400,
            "INT32 must lie between -2147483648 and 2147483647",  # it was read as 0 (2**32 + 1 as 1)
        ),
        ({"inputs": [x_tensor([1, 2, 12], data=[10**400] * 24)]}, 400, "must be JSON numbers"),
        ({"inputs": [x_tensor([1, 2, 12], data=[2**64] + ["3"] * 23)]}, 400, "must be JSON numbers"),  # "3" was 3.0
        ({"inputs": [x_tensor([1, 2, 12], data=[2**64] + [None] * 23)]}, 400, "must be JSON numbers"),
        ({"inputs": [x_tensor([1, 2, 12])], "model_name": "basic-motions"}, 400, "the body names model"),
        ({"inputs": []}, 400, "inputs"),
        ({"input": [x_tensor([1, 2, 12])]}, 400, "invalid inference request"),
    ],
)
def test_bad_requests_get_the_spec_error(client, body, status, message):
    response = infer_raw(client, body)
    assert response.status_code == status
    assert set(response.json()) == {"error", "request_id"} and message in response.json()["error"]
    assert response.json()["request_id"] == response.headers["x-request-id"]


def test_unknown_model_version_endpoint_and_method(client):
    body = {"inputs": [x_tensor([1, 2, 12])]}
    for path, status in [
        ("/v2/models/nope/infer", 404),
        (f"/v2/models/{MODEL}/versions/9/infer", 404),
        (f"/v2/models/{MODEL}/versions/1/infer", 200),
    ]:
        response = infer_raw(client, body, path=path)
        assert response.status_code == status, path
    assert "no version 9" in infer_raw(client, body, path=f"/v2/models/{MODEL}/versions/9/infer").json()["error"]
    missing = client.get("/v2/models/nope").json()
    assert set(missing) == {"error", "request_id"} and missing["error"].startswith("no model 'nope'; this server has [")
    long_name = client.get(f"/v2/models/{'n' * 5000}")  # not echoed whole
    assert long_name.status_code == 404 and len(long_name.json()["error"]) < 300
    unknown = client.get("/v2/repository/index")  # Triton's repository API takes POST only
    assert unknown.status_code == 405 and unknown.headers["allow"] == "POST"
    assert set(unknown.json()) == {"error", "request_id"}
    wrong_method = client.get(f"/v2/models/{MODEL}/infer")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert set(wrong_method.json()) == {"error", "request_id"}
    read_only = client.post(f"/v2/models/{MODEL}")  # HEAD is served wherever GET is, and Allow says so
    assert read_only.status_code == 405 and read_only.headers["allow"] == "GET, HEAD"
    assert client.head(f"/v2/models/{MODEL}").status_code == 200


def test_binary_framing_errors(client):
    header = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 2, 12], "datatype": "FP32", "parameters": {"binary_data_size": 96}}]}
    ).encode()
    data = np.ones((1, 2, 12), "<f4").tobytes()
    both = json.dumps(  # which of the two holds the tensor is not for the server to guess
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1, 2, 12],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 96},
                    "data": [0.5] * 24,
                }
            ]
        }
    ).encode()
    ok = infer_raw(client, header + data, {"Inference-Header-Content-Length": str(len(header))})
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
    for body, length, message in [
        (header + data[:-4], len(header), "does not fit"),
        (header + data + b"\0\0\0\0", len(header), "no input claims"),
        (header + data, 10**6, "Inference-Header-Content-Length"),
        (header + data, "ten", "Inference-Header-Content-Length"),
        (header[:-1] + data, len(header) - 1, "not valid JSON"),
        (both + data, len(both), "both data and parameters.binary_data_size"),
    ]:
        response = infer_raw(client, body, {"Inference-Header-Content-Length": str(length)})
        assert response.status_code == 400 and message in response.json()["error"], message
    nan = np.full((1, 2, 12), np.nan, "<f4").tobytes()
    response = infer_raw(client, header + nan, {"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 400 and "NaN" in response.json()["error"]
    response = infer_raw(
        client, gzip.compress(header + data)[:-8], {"Content-Encoding": "gzip", "Inference-Header-Content-Length": "0"}
    )
    assert response.status_code == 400 and "decompressed" in response.json()["error"]
    bomb = gzip.compress(b" " * (8 * 1024 * 1024 + 1))  # small on the wire, over max_body_bytes inflated
    response = infer_raw(client, bomb, {"Content-Encoding": "gzip"})
    assert response.status_code == 413 and "decompressed" in response.json()["error"]
    response = infer_raw(client, header + data, {"Content-Encoding": "br"})
    assert response.status_code == 415 and "br" in response.json()["error"]
    framed = {"Inference-Header-Content-Length": str(len(header))}
    response = infer_raw(client, gzip.compress(header + data), {**framed, "Content-Encoding": "GZip"})
    assert response.status_code == 200, "content codings are case-insensitive"
    response = infer_raw(client, gzip.compress(header + data) + b"junk", {**framed, "Content-Encoding": "gzip"})
    assert response.status_code == 400 and "after its compressed stream" in response.json()["error"]
    v1 = client.post(
        "/v1/classify",
        content=gzip.compress(b'{"sequences": [[[0.5]]]}'),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert v1.status_code == 415 and "Content-Encoding 'gzip'" in v1.json()["error"]["message"]
    assert client.get("/readyz").status_code == 200  # still serving


def test_what_other_clients_send_is_read_as_they_mean_it(client, test_sequences):
    """An integer literal past int64 is a number (as /v1 reads it); the body may repeat the path's model (as
    Triton's binary-data example does); an empty outputs list asks for all (as in Triton); a gzip body may be
    several members (RFC 1952)."""
    frames = test_sequences[0][:5].copy()
    frames[0, 0] = 1e20
    data: list = frames.ravel().tolist()
    data[0] = 10**20  # a JSON integer, not 1e+20
    body = {"inputs": [x_tensor([1, 5, 12], data=data)], "model_name": MODEL, "model_version": "1"}
    reply = infer_raw(client, body)
    assert reply.status_code == 200, reply.text
    probabilities = next(out["data"] for out in reply.json()["outputs"] if out["name"] == "probabilities")
    np.testing.assert_allclose(probabilities, v1_probabilities(client, [frames])[0], rtol=0, atol=1e-6)
    assert {out["name"] for out in infer_raw(client, {**body, "outputs": []}).json()["outputs"]} == {
        "probabilities",
        "logits",
    }
    raw = json.dumps(body).encode()
    members = gzip.compress(raw[:100]) + gzip.compress(raw[100:])
    again = infer_raw(client, members, {"Content-Encoding": "gzip"})
    assert again.status_code == 200 and again.json()["outputs"] == reply.json()["outputs"], again.text
    # deflate as RFC 9110 says (zlib-wrapped) and as many clients send it (raw)
    for wbits in (15, -15):
        packer = zlib.compressobj(wbits=wbits)
        deflated = infer_raw(client, packer.compress(raw) + packer.flush(), {"Content-Encoding": "deflate"})
        assert deflated.status_code == 200 and deflated.json()["outputs"] == reply.json()["outputs"], deflated.text
    packer = zlib.compressobj(wbits=-15)
    cut = (packer.compress(raw) + packer.flush())[:-3]
    assert infer_raw(client, cut, {"Content-Encoding": "deflate"}).status_code == 400


def test_an_inference_header_length_given_twice_differently_is_refused(client):
    header = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 2, 12], "datatype": "FP32", "parameters": {"binary_data_size": 96}}]}
    ).encode()
    body = header + np.ones((1, 2, 12), "<f4").tobytes()
    length, json_type = ("Inference-Header-Content-Length", str(len(header))), ("Content-Type", "application/json")
    twice = client.post(
        f"/v2/models/{MODEL}/infer", content=body, headers=[json_type, length, ("Inference-Header-Content-Length", "7")]
    )
    assert twice.status_code == 400 and "2 different Inference-Header-Content-Length" in twice.json()["error"]
    same = client.post(f"/v2/models/{MODEL}/infer", content=body, headers=[json_type, length, length])
    assert same.status_code == 200, same.text


def test_binary_output_framing(client):
    body = {
        "inputs": [x_tensor([1, 3, 12])],
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "probabilities"}, {"name": "logits", "parameters": {"binary_data": False}}],
    }
    response = infer_raw(client, body)
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    head = json.loads(response.content[:length])
    probabilities, logits = head["outputs"]
    assert probabilities["parameters"] == {"binary_data_size": 36} and "data" not in probabilities
    assert len(response.content) == length + 36 and len(logits["data"]) == 27
    values = np.frombuffer(response.content[length:], "<f4")
    assert abs(values.sum() - 1) < 1e-5


def test_v2_requests_are_counted_by_route_template(client):
    client.get(f"/v2/models/{MODEL}")
    metrics = client.get("/metrics").text
    assert 'route="/v2/models/{model_name}",status="200"' in metrics.replace('method="GET",', "")


def test_sequences_live_in_the_shared_store(start_server, redis_server, client, test_sequences):
    """A sequence started on one replica continues on another: the state is in Redis, not the process."""
    replicas = [start_server("--redis-url", redis_server.url) for _ in range(2)]
    clients = [triton.InferenceServerClient(r.url.removeprefix("http://")) for r in replicas]
    sequence = test_sequences[3]
    chunks = np.split(sequence, [2, 5, 9, 14])
    for i, chunk in enumerate(chunks):
        out = infer_sequence_chunk(clients[i % 2], chunk, "shared-1", start=i == 0, end=i == len(chunks) - 1)
    np.testing.assert_allclose(out, v1_probabilities(client, [sequence])[0], atol=ATOL)
    for c in clients:
        c.close()
    with httpx.Client(base_url=replicas[1].url) as other:
        response = infer_raw(other, {"inputs": [x_tensor([1, 2, 12])], "parameters": {"sequence_id": "shared-1"}})
        assert response.status_code == 400  # ended on replica A: gone for replica B too


def test_oip_sequences_are_not_reachable_through_v1(client, test_sequences):
    """Another client guessing the internal id of an OIP sequence gets a 404 everywhere on /v1, and the
    sequence's owner carries on as if nothing happened."""
    frames = test_sequences[0]
    first = {
        "inputs": [x_tensor([1, 3, 12], data=frames[:3].ravel().tolist())],
        "parameters": {"sequence_id": 42, "sequence_start": True},
    }
    assert infer_raw(client, first).status_code == 200
    for guess in ("oip:japanese-vowels:n:42", "oip%3Ajapanese-vowels%3An%3A42", "v1:oip:japanese-vowels:n:42"):
        assert client.get(f"/v1/sessions/{guess}").status_code == 404
        step = client.post(f"/v1/sessions/{guess}/steps", json={"inputs": [[0.0] * 12]})
        assert step.status_code == 404 and step.json()["error"]["code"] == "session_not_found"
        assert client.delete(f"/v1/sessions/{guess}").status_code == 404
    rest = {
        "inputs": [x_tensor([1, len(frames) - 3, 12], data=frames[3:].ravel().tolist())],
        "parameters": {"sequence_id": 42, "sequence_end": True},
    }
    finished = infer_raw(client, rest).json()
    assert finished["parameters"]["sequence_steps"] == len(frames)
    np.testing.assert_allclose(finished["outputs"][0]["data"], v1_probabilities(client, [frames])[0], atol=ATOL)
