"""Anything a client can send gets an answer below 500, and the server keeps serving.

Random bytes, random JSON and random Open Inference Protocol tensor headers (shapes whose element
count overflows 64 bits, odd datatypes, bogus binary sizes, non-ASCII header values) at every route.
"""

import json
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODELS = ["japanese-vowels", "basic-motions", "nope", "", "..", "%00", "x" * 300]
PATHS = [
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/models",
    "/v1/models/{model}",
    "/v1/classify",
    "/v1/sessions",
    "/v1/sessions/{session}",
    "/v1/sessions/{session}/steps",
    "/v1/sessions/{session}/stream",
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/{model}",
    "/v2/models/{model}/ready",
    "/v2/models/{model}/config",
    "/v2/models/{model}/infer",
    "/v2/models/{model}/versions/{version}",
    "/v2/models/{model}/versions/{version}/infer",
    "/v2/models/{model}/versions/{version}/ready",
    "/v2/repository/index",
    "/docs",
    "/openapi.json",
    "/nope",
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_subnormal=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
dimensions = st.one_of(st.integers(-3, 30), st.sampled_from([0, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, 2**70]))
datatypes = st.sampled_from(["FP32", "FP16", "FP64", "INT64", "INT32", "UINT64", "BOOL", "BYTES", "STRING", "fp32", ""])


def sendable_header_value(value: bytes) -> bool:
    """What a client can send as a header value (RFC 9110 field-value, as h11 checks it): visible ASCII and
    obs-text, with spaces and tabs only between them; any other control byte is refused before sending."""
    visible = all(c in (0x09, 0x20) or 0x21 <= c <= 0x7E or c >= 0x80 for c in value)
    return visible and value[:1] not in (b" ", b"\t") and value[-1:] not in (b" ", b"\t")


@st.composite
def tensor_requests(draw) -> tuple[bytes, dict[str, bytes]]:
    """An inference request, well formed or not, with or without binary tensor data after its JSON header."""
    inputs = []
    for _ in range(draw(st.integers(0, 3))):
        tensor: dict = {
            "name": draw(st.sampled_from(["x", "lengths", "h0", ""])),
            "datatype": draw(datatypes),
            "shape": draw(st.lists(dimensions, max_size=4)),
        }
        if draw(st.booleans()):
            tensor["parameters"] = {"binary_data_size": draw(st.one_of(dimensions, json_values))}
        else:
            tensor["data"] = draw(
                st.one_of(
                    st.lists(st.floats(allow_nan=False, allow_subnormal=False, width=32), max_size=40), json_values
                )
            )
        inputs.append(tensor)
    body: dict = {"inputs": inputs}
    if draw(st.booleans()):
        body["parameters"] = draw(
            st.dictionaries(
                st.sampled_from(["sequence_id", "sequence_start", "sequence_end", "binary_data_output", "x"]),
                json_values,
                max_size=3,
            )
        )
    if draw(st.booleans()):
        body["outputs"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {"name": st.sampled_from(["probabilities", "logits", "x"])},
                    optional={
                        "parameters": st.dictionaries(st.sampled_from(["classification", "binary_data"]), json_values)
                    },
                ),
                max_size=3,
            )
        )
    header = json.dumps(body).encode()
    tail = draw(st.binary(max_size=400))
    headers: dict[str, bytes] = {}
    if draw(st.booleans()):
        headers["Inference-Header-Content-Length"] = draw(
            st.one_of(
                st.integers(-5, len(header) + len(tail) + 5).map(lambda n: str(n).encode()),
                st.binary(min_size=1, max_size=6).filter(sendable_header_value),
                st.just(b"\xb2"),
                st.just("٣".encode()),
            )
        )
    return header + tail, headers


bodies = st.one_of(
    st.binary(max_size=300).map(lambda b: (b, {})),
    json_values.map(lambda v: (json.dumps(v).encode(), {})),
    st.fixed_dictionaries(
        {"sequences": json_values, "inputs": json_values, "model": json_values},
        optional={"seq": json_values, "return_steps": json_values},
    ).map(lambda v: (json.dumps(v).encode(), {})),
    tensor_requests(),
)


@pytest.fixture(scope="module")
def live_session(client) -> str:
    return client.post("/v1/sessions", json={}).json()["session_id"]


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
    path=st.sampled_from(PATHS),
    model=st.sampled_from(MODELS),
    session=st.one_of(st.just("live"), st.text(min_size=1, max_size=40), st.just("oip:japanese-vowels:n:1")),
    version=st.sampled_from(["1", "2", "0", "-1", "01", "99999999999999999999", "a"]),
    body=bodies,
    content_type=st.sampled_from([None, b"application/json", b"text/plain", b"application/octet-stream", b"\xff\xfe"]),
    encoding=st.sampled_from([None, b"gzip", b"deflate", b"br", b"identity", b"\xb2"]),
)
def test_no_request_gets_a_5xx(
    client, live_session, method, path, model, session, version, body, content_type, encoding
):
    session_id = live_session if session == "live" else session
    url = path.format(model=quote(model, safe=""), session=quote(session_id, safe=""), version=version)
    content, headers = body
    if content_type is not None:
        headers = {**headers, "Content-Type": content_type}
    if encoding is not None:
        headers = {**headers, "Content-Encoding": encoding}
    try:
        response = client.request(
            method, url, content=content if method not in ("GET", "HEAD") else None, headers=headers
        )
    except httpx.RemoteProtocolError:
        return  # the server closed a connection it could not parse: an answer, not a crash
    assert response.status_code < 500, f"{method} {url} -> {response.status_code}: {response.text[:300]}"
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("shape", "binary"),
    [
        ([4294967296, 4294967296], False),
        ([2**62, 4, 4], True),
        ([2**63, 2], False),
        ([2**64, 1, 12], True),
        ([1, 2**40, 12], False),
    ],
)
def test_a_shape_whose_element_count_overflows_is_a_400(client, shape, binary):
    tensor: dict = {"name": "x", "shape": shape, "datatype": "FP32"}
    if binary:
        tensor["parameters"] = {"binary_data_size": 96}
        header = json.dumps({"inputs": [tensor]}).encode()
        response = client.post(
            "/v2/models/japanese-vowels/infer",
            content=header + b"\0" * 96,
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
    else:
        tensor["data"] = []
        response = client.post("/v2/models/japanese-vowels/infer", json={"inputs": [tensor]})
    assert response.status_code == 400, response.text
    assert "shape" in response.json()["error"]


@pytest.mark.parametrize("length", [b"\xb2", "٣".encode(), b"+5", b"5_0", b"0x10", b"-1"])
def test_a_header_length_that_is_not_ascii_digits_is_a_400(client, length):
    header = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 1, 12], "datatype": "FP32", "parameters": {"binary_data_size": 48}}]}
    ).encode()
    response = client.post(
        "/v2/models/japanese-vowels/infer",
        content=header + b"\0" * 48,
        headers={"Inference-Header-Content-Length": length},
    )
    assert response.status_code == 400, response.text
    assert "Inference-Header-Content-Length" in response.json()["error"]
