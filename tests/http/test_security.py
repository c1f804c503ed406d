"""Secure by default, against real servers: API keys, sessions that belong to their key, limits per key,
Origin checks and CORS, request ids and logs. Every refusal has its status, its body and no side effect."""

import contextlib
import hashlib
import json
import logging
import socket
import time

import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

MODEL = "japanese-vowels"
ALICE, BOB = "alice-key-3f9a7c", "bob-key-81d2e0"
KEYS = {"LSTM_SERVE_API_KEYS": f"{ALICE},{BOB}"}
FRAMES = np.random.default_rng(5).normal(size=(6, 12)).round(4).tolist()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def ws_url(server, session_id: str) -> str:
    return server.url.replace("http", "ws") + f"/v1/sessions/{session_id}/stream"


@pytest.fixture(params=["memory", "redis"])
def keyed(request, start_server, redis_server):
    env = dict(KEYS)
    if request.param == "redis":
        env["LSTM_SERVE_REDIS_URL"] = redis_server.url
    return start_server(env=env)


# -- API keys --------------------------------------------------------------------------------------
def test_without_a_valid_key_every_route_but_health_is_401_in_its_protocol(start_server):
    server = start_server(env=KEYS)
    with httpx.Client(base_url=server.url) as c:
        for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
            assert c.get(path).status_code == 200, path
        for headers in ({}, auth("wrong"), {"Authorization": f"Basic {ALICE}"}, {"Authorization": "Bearer"}):
            v1 = c.post("/v1/sessions", json={}, headers=headers)
            assert v1.status_code == 401 and v1.headers["www-authenticate"] == "Bearer"
            assert v1.json()["error"]["code"] == "unauthorized"
            oip = c.get(f"/v2/models/{MODEL}", headers=headers)
            assert oip.status_code == 401 and set(oip.json()) == {"error", "request_id"}
            assert oip.headers["www-authenticate"] == "Bearer"
            for path in ("/v1/models", "/metrics", "/openapi.json", "/v2"):
                assert c.get(path, headers=headers).status_code == 401, path
        for key in (ALICE, BOB):
            assert c.get("/v1/models", headers=auth(key)).status_code == 200
            assert c.get(f"/v2/models/{MODEL}", headers=auth(key)).status_code == 200
        # two Authorization headers: the first won, though which one a proxy passes on varies
        for pair in ([f"Bearer {ALICE}", "Bearer bogus"], [f"Bearer {ALICE}", f"Bearer {BOB}"]):
            twice = c.get("/v1/models", headers=[("Authorization", value) for value in pair])
            assert twice.status_code == 401 and "one Authorization header" in twice.json()["error"]["message"]
    log = server.output()
    assert ALICE not in log and BOB not in log, "a key was written to the log"
    assert "401" in log, "a refused request is logged even without --access-log"


def test_a_key_file_holds_plain_keys_and_sha256_hashes(start_server, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# operators\n{ALICE}\nsha256:{hashlib.sha256(BOB.encode()).hexdigest()}\n\n")
    server = start_server(env={"LSTM_SERVE_API_KEYS_FILE": str(keys)})
    for key, status in ((ALICE, 200), (BOB, 200), ("sha256:" + hashlib.sha256(BOB.encode()).hexdigest(), 401)):
        assert httpx.get(f"{server.url}/v1/models", headers=auth(key)).status_code == status, key


@pytest.mark.parametrize(
    ("env", "where"),
    [
        ({"LSTM_SERVE_API_KEYS_FILE": "{file}"}, "line 2"),
        ({"LSTM_SERVE_API_KEYS": "good-key-1,two words"}, "api_keys"),
        ({"LSTM_SERVE_ADMIN_KEYS": "schl\u00fcssel"}, "admin_keys"),
    ],
)
def test_a_key_no_client_could_present_is_refused_at_start_not_loaded_to_never_match(
    start_server, tmp_path, env, where
):
    keys = tmp_path / "keys"
    keys.write_text("good-key-1\nschl\u00fcssel-\u043a\u043b\u044e\u0447\n", encoding="utf-8")
    env = {name: value.replace("{file}", str(keys)) for name, value in env.items()}
    server = start_server(env={"LSTM_SERVE_API_KEYS": "good-key-1", **env}, wait=False)
    assert server.proc.wait(30) != 0
    output = server.output()
    assert where in output and "printable ASCII without spaces" in output, output[-500:]
    assert "schl" not in output and "two words" not in output, "the refused key was written out"


def test_a_server_without_keys_says_so_loudly(start_server):
    server = start_server()
    assert "NO API KEYS ARE SET" in server.output()
    assert httpx.get(f"{server.url}/v1/models").status_code == 200


def test_websockets_take_the_header_or_a_bearer_subprotocol_and_close_4401_without(start_server):
    server = start_server(env=KEYS)
    session_id = httpx.post(f"{server.url}/v1/sessions", json={}, headers=auth(ALICE)).json()["session_id"]
    with connect(ws_url(server, session_id), additional_headers=auth(ALICE)) as ws:
        ws.send(json.dumps({"inputs": FRAMES[:2], "seq": 0}))
        assert json.loads(ws.recv())["steps"] == 2
    # a browser cannot set headers: the key rides as a subprotocol, and the answer names one it offered
    with connect(ws_url(server, session_id), subprotocols=["lstm-serve", f"bearer.{ALICE}"]) as ws:
        assert ws.subprotocol == "lstm-serve"
        ws.send(json.dumps({"inputs": FRAMES[2:3], "seq": 2}))
        assert json.loads(ws.recv())["steps"] == 3
    for kwargs in ({}, {"additional_headers": auth("wrong")}, {"subprotocols": ["bearer.wrong"]}):
        with connect(ws_url(server, session_id), **kwargs) as ws:
            assert json.loads(ws.recv())["error"]["code"] == "unauthorized"
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=5)
            assert ws.close_code == 4401
    assert httpx.get(f"{server.url}/v1/sessions/{session_id}", headers=auth(ALICE)).json()["steps"] == 3


# -- sessions belong to their key ------------------------------------------------------------------
def test_a_session_is_invisible_to_every_other_key(keyed):
    with httpx.Client(base_url=keyed.url, timeout=30) as c:
        session_id = c.post("/v1/sessions", json={}, headers=auth(ALICE)).json()["session_id"]
        c.post(f"/v1/sessions/{session_id}/steps", json={"inputs": FRAMES[:3]}, headers=auth(ALICE))
        unknown = c.get("/v1/sessions/never-created", headers=auth(BOB))
        for method, path, body in [
            ("GET", "", None),
            ("GET", "/state", None),
            ("POST", "/steps", {"inputs": FRAMES[:1]}),
            ("DELETE", "", None),
        ]:
            answer = c.request(method, f"/v1/sessions/{session_id}{path}", json=body, headers=auth(BOB))
            assert answer.status_code == 404, (method, path, answer.text)
            assert answer.json()["error"]["code"] == unknown.json()["error"]["code"] == "session_not_found"
        with connect(ws_url(keyed, session_id), additional_headers=auth(BOB)) as ws:
            assert json.loads(ws.recv())["error"]["code"] == "session_not_found"
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=5)
            assert ws.close_code == 4404
        mine = c.get(f"/v1/sessions/{session_id}", headers=auth(ALICE)).json()
        assert mine["steps"] == 3, "another key's attempts changed the session"


def test_two_keys_may_use_the_same_oip_sequence_id(keyed):
    def infer(key: str, frames: list, start: bool) -> dict:
        body = {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, len(frames), 12], "data": frames}],
            "parameters": {"sequence_id": 1, "sequence_start": start},
        }
        return httpx.post(f"{keyed.url}/v2/models/{MODEL}/infer", json=body, headers=auth(key)).json()

    infer(ALICE, FRAMES[:4], True)
    infer(BOB, FRAMES[:1], True)
    assert infer(ALICE, FRAMES[4:5], False)["parameters"]["sequence_steps"] == 5
    assert infer(BOB, FRAMES[1:2], False)["parameters"]["sequence_steps"] == 2


# -- limits per key --------------------------------------------------------------------------------
def test_a_key_over_its_rate_gets_429_with_retry_after_and_other_keys_do_not(start_server):
    server = start_server(env={**KEYS, "LSTM_SERVE_RATE_LIMIT": "5/s", "LSTM_SERVE_RATE_BURST": "5"})
    with httpx.Client(base_url=server.url) as c:
        answers = [c.get("/v1/models", headers=auth(ALICE)) for _ in range(12)]
        refused = [a for a in answers if a.status_code == 429]
        assert len(refused) >= 5, [a.status_code for a in answers]
        assert refused[0].json()["error"]["code"] == "rate_limited"
        assert int(refused[0].headers["retry-after"]) >= 1
        assert c.get("/v1/models", headers=auth(BOB)).status_code == 200
        assert c.get("/healthz").status_code == 200, "health checks are never rate limited"
        time.sleep(1.2)
        assert c.get("/v1/models", headers=auth(ALICE)).status_code == 200, "the bucket refills"


def test_websocket_messages_over_the_rate_are_refused_counted_and_every_message_is_timed(start_server):
    server = start_server(env={**KEYS, "LSTM_SERVE_RATE_LIMIT": "2/min", "LSTM_SERVE_RATE_BURST": "4"})
    session_id = httpx.post(f"{server.url}/v1/sessions", json={}, headers=auth(ALICE)).json()["session_id"]
    with connect(ws_url(server, session_id), additional_headers=auth(ALICE)) as ws:  # the upgrade spends one
        replies = []
        for _ in range(5):
            ws.send(json.dumps({"inputs": FRAMES[:1]}))
            replies.append(json.loads(ws.recv()))
    codes = [reply["error"]["code"] if "error" in reply else 200 for reply in replies]
    assert codes == [200, 200, "rate_limited", "rate_limited", "rate_limited"], codes
    metrics = httpx.get(f"{server.url}/metrics", headers=auth(BOB)).text
    route = 'method="WS",route="/v1/sessions/{session_id}/stream"'
    assert 'lstm_serve_rejected_requests_total{reason="rate_limited"} 3.0' in metrics
    assert f'lstm_serve_request_duration_seconds_count{{{route},status="200"}} 2.0' in metrics
    assert f'lstm_serve_request_duration_seconds_count{{{route},status="429"}} 3.0' in metrics


def test_rate_and_session_limits_hold_across_replicas(start_server, redis_server):
    env = {**KEYS, "LSTM_SERVE_REDIS_URL": redis_server.url, "LSTM_SERVE_MAX_SESSIONS_PER_KEY": "3"}
    limited = {**env, "LSTM_SERVE_RATE_LIMIT": "4/min", "LSTM_SERVE_RATE_BURST": "4"}
    a, b = start_server(env=limited), start_server(env=limited)
    statuses = [httpx.get(f"{s.url}/v1/models", headers=auth(ALICE)).status_code for s in (a, b, a, b, a, b)]
    assert statuses == [200, 200, 200, 200, 429, 429], statuses
    # sessions: a fresh pair of replicas without a rate limit
    c, d = start_server(env=env), start_server(env=env)
    created = [httpx.post(f"{s.url}/v1/sessions", json={}, headers=auth(BOB)) for s in (c, d, c, d)]
    assert [r.status_code for r in created] == [201, 201, 201, 429]
    assert created[3].json()["error"]["code"] == "too_many_sessions" and "retry-after" in created[3].headers
    assert httpx.post(f"{d.url}/v1/sessions", json={}, headers=auth(ALICE)).status_code == 201
    httpx.delete(f"{c.url}/v1/sessions/{created[0].json()['session_id']}", headers=auth(BOB))
    assert httpx.post(f"{d.url}/v1/sessions", json={}, headers=auth(BOB)).status_code == 201


def test_sessions_per_key_in_memory_and_per_address_without_keys(start_server):
    server = start_server(env={"LSTM_SERVE_MAX_SESSIONS_PER_KEY": "2"})
    created = [httpx.post(f"{server.url}/v1/sessions", json={}) for _ in range(3)]
    assert [r.status_code for r in created] == [201, 201, 429]
    assert "API key (or client address)" in created[2].json()["error"]["message"]
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3")) as elsewhere:
        # another address has its own share, and sessions stay open to every caller on a server without keys
        assert elsewhere.post(f"{server.url}/v1/sessions", json={}).status_code == 201
        theirs = created[0].json()["session_id"]
        step = elsewhere.post(f"{server.url}/v1/sessions/{theirs}/steps", json={"inputs": FRAMES[:1]})
        assert step.status_code == 200
        assert elsewhere.delete(f"{server.url}/v1/sessions/{theirs}").status_code == 204
    assert httpx.post(f"{server.url}/v1/sessions", json={}).status_code == 201, "a deleted session kept its place"


def test_a_key_over_its_websockets_is_closed_with_4429(start_server):
    server = start_server(env={**KEYS, "LSTM_SERVE_MAX_WEBSOCKETS_PER_KEY": "2"})
    session_id = httpx.post(f"{server.url}/v1/sessions", json={}, headers=auth(ALICE)).json()["session_id"]
    with contextlib.ExitStack() as open_ones:
        for _ in range(2):
            open_ones.enter_context(connect(ws_url(server, session_id), additional_headers=auth(ALICE)))
        with connect(ws_url(server, session_id), additional_headers=auth(ALICE)) as third:
            assert json.loads(third.recv())["error"]["code"] == "too_many_websockets"
            with pytest.raises(ConnectionClosed):
                third.recv(timeout=5)
            assert third.close_code == 4429
        with connect(ws_url(server, session_id), additional_headers=auth(ALICE)) as again:
            pass  # still at the limit: refused again
        assert again.close_code == 4429
    time.sleep(0.3)
    with connect(ws_url(server, session_id), additional_headers=auth(ALICE)) as ws:
        ws.send(json.dumps({"inputs": FRAMES[:1]}))
        assert json.loads(ws.recv())["steps"] == 1, "closing sockets frees their places"


# -- browsers --------------------------------------------------------------------------------------
def test_a_foreign_origin_is_refused_before_anything_changes(start_server):
    server = start_server(env={"LSTM_SERVE_CORS_ORIGINS": "https://app.example"})
    with httpx.Client(base_url=server.url) as c:
        before = active_sessions(c)
        # the "simple" cross-site POST a page can send without a preflight
        forged = c.post(
            "/v1/sessions", content=b"{}", headers={"Origin": "https://evil.example", "Content-Type": "text/plain"}
        )
        assert forged.status_code == 403 and forged.json()["error"]["code"] == "forbidden_origin"
        json_forged = c.post("/v1/sessions", json={}, headers={"Origin": "https://evil.example"})
        assert json_forged.status_code == 403
        assert c.post("/v1/classify", json={"sequences": [FRAMES]}, headers={"Origin": "null"}).status_code == 403
        assert active_sessions(c) == before, "a refused cross-origin request created a session"
        allowed = c.post("/v1/sessions", json={}, headers={"Origin": "https://app.example"})
        assert allowed.status_code == 201
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "X-Request-ID" in allowed.headers["access-control-expose-headers"]
        own = c.post("/v1/sessions", json={}, headers={"Origin": server.url})  # the server's own pages (/docs)
        assert own.status_code == 201 and "access-control-allow-origin" not in own.headers
        port = server.url.rsplit(":", 1)[1]
        rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}  # DNS rebinding
        assert c.post("/v1/sessions", json={}, headers=rebound).status_code == 403
        assert c.post("/v2/repository/index", headers=rebound).status_code == 403
        twice = [("Origin", server.url), ("Origin", "http://evil.example")]
        assert c.post("/v1/sessions", json={}, headers=twice).status_code == 403
        assert active_sessions(c) == before + 2, "a refused cross-origin request created a session"
        assert c.get("/healthz", headers={"Origin": "https://evil.example"}).status_code == 200


def test_cors_preflight_answers_listed_origins_only(start_server):
    server = start_server(env={"LSTM_SERVE_CORS_ORIGINS": "https://app.example"})
    asked = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    with httpx.Client(base_url=server.url) as c:
        ok = c.options("/v1/sessions", headers={"Origin": "https://app.example", **asked})
        assert ok.status_code == 204
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in ok.headers["access-control-allow-methods"]
        assert set(ok.headers["access-control-allow-headers"].split(", ")) == {"authorization", "content-type"}
        refused = c.options("/v1/sessions", headers={"Origin": "https://evil.example", **asked})
        assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers


def test_a_websocket_from_a_foreign_origin_is_refused_with_403(start_server):
    server = start_server(env={"LSTM_SERVE_CORS_ORIGINS": "https://app.example"})
    session_id = httpx.post(f"{server.url}/v1/sessions", json={}).json()["session_id"]
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(server, session_id), origin="https://evil.example")
    assert refused.value.response.status_code == 403
    with connect(ws_url(server, session_id), origin="https://app.example") as ws:
        ws.send(json.dumps({"inputs": FRAMES[:2]}))
        assert json.loads(ws.recv())["steps"] == 2
    assert httpx.get(f"{server.url}/v1/sessions/{session_id}").json()["steps"] == 2


def active_sessions(c: httpx.Client) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith("lstm_serve_active_sessions "):
            return float(line.split()[1])
    raise AssertionError("no lstm_serve_active_sessions metric")


# -- request ids and logs ----------------------------------------------------------------------------
def test_request_ids_are_echoed_or_made_and_logged_as_json(start_server):
    server = start_server(env={**KEYS, "LSTM_SERVE_LOG_FORMAT": "json"})
    with httpx.Client(base_url=server.url) as c:
        mine = c.get("/v1/models", headers={**auth(ALICE), "X-Request-ID": "trace-42.a"})
        assert mine.headers["x-request-id"] == "trace-42.a"
        for bad in ("has space", "x" * 300, "ünïcode"):
            made = c.get("/v1/models", headers={**auth(ALICE), "X-Request-ID": bad.encode("utf-8")})
            assert made.status_code == 200 and made.headers["x-request-id"] not in (bad, "")
        missing = c.get("/v1/sessions/nope", headers={**auth(ALICE), "X-Request-ID": "find-me-1"})
        assert missing.status_code == 404 and missing.json()["error"]["request_id"] == "find-me-1"
        oip = c.get("/v2/models/nope", headers={**auth(BOB), "X-Request-ID": "find-me-2"})
        assert oip.json()["request_id"] == "find-me-2"
    time.sleep(0.2)
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    requests = {line.get("request_id"): line for line in lines if "request_id" in line}
    first = requests["find-me-1"]
    assert first["level"] == "warning" and first["status"] == 404
    assert first["route"] == "/v1/sessions/{session_id}" and first["key_id"] == key_id(ALICE)
    assert first["session_id"] == "nope" and first["latency_ms"] >= 0
    assert (
        requests["find-me-2"]["key_id"] == key_id(BOB) and requests["find-me-2"]["route"] == "/v2/models/{model_name}"
    )
    assert "trace-42.a" not in requests, "2xx are logged only with access_log"
    assert all("time" in line and "message" in line for line in lines), "every line is JSON with a time"


def test_the_openapi_document_describes_the_keys_and_what_the_frame_refuses(start_server):
    server = start_server(env={**KEYS, "LSTM_SERVE_RATE_LIMIT": "100/s"})
    document = httpx.get(f"{server.url}/openapi.json", headers=auth(ALICE)).json()
    assert document["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    public = {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"}
    for path, operations in document["paths"].items():
        for method, described in operations.items():
            if path in public:
                assert "security" not in described and "401" not in described["responses"], path
                continue
            assert described["security"] == [{"bearer": []}], (method, path)
            assert {"401", "403", "429"} <= set(described["responses"]), (method, path)
            assert "WWW-Authenticate" in described["responses"]["401"]["headers"]
    create = document["paths"]["/v1/sessions"]["post"]["responses"]
    assert (
        "408" in create
        and "rate_limit" in create["429"]["description"]
        and "max_sessions" in create["429"]["description"]
    )


def test_tritonclient_works_with_a_key(start_server):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    server = start_server(env=KEYS)
    client = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=30)
    frames = np.asarray([FRAMES], np.float32)
    x = triton.InferInput("x", list(frames.shape), "FP32")
    x.set_data_from_numpy(frames, binary_data=True)
    result = client.infer(MODEL, [x], headers=auth(ALICE), sequence_id=7, sequence_start=True)
    assert result.as_numpy("probabilities").shape == (1, 9)
    assert client.is_server_ready()  # health needs no key
    with pytest.raises(InferenceServerException, match="API key"):
        client.infer(MODEL, [x])
    with pytest.raises(InferenceServerException):
        client.infer(MODEL, [x], headers=auth(BOB), sequence_id=7)  # Bob never started sequence 7


def test_connections_over_max_connections_get_503(start_server):
    server = start_server("--max-connections", "4")
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
    try:
        time.sleep(0.2)
        refused = httpx.get(f"{server.url}/v1/models")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "too_many_connections"
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(f"{server.url}/v1/models").status_code == 200
    counted = 'lstm_serve_rejected_requests_total{reason="too_many_connections"} 1.0'
    assert counted in httpx.get(f"{server.url}/metrics").text


def test_a_header_sent_twice_reads_as_its_first_value_on_every_look():
    from lstm_serve.http.guard import header

    scope = {
        "headers": [
            (b"authorization", b"Bearer first"),
            (b"x-request-id", b"abc"),
            (b"authorization", b"Bearer second"),
        ]
    }
    assert header(scope, b"authorization") == b"Bearer first"
    assert header(scope, b"authorization") == b"Bearer first"  # again, from the kept lookup
    assert header(scope, b"x-request-id") == b"abc"
    assert header(scope, b"origin") is None


def test_a_refusal_logs_a_warning_and_only_a_failure_an_error(caplog):
    """A 503 (overloaded, draining: /readyz during a drain) is the server doing its job, not an error."""
    from lstm_serve.core.access import Caller, RequestContext
    from lstm_serve.http import logs

    context = RequestContext("r1", Caller(None, "127.0.0.1"))
    with caplog.at_level(logging.INFO, logger="lstm_serve"):
        for status in (503, 500, 404):
            logs.request_line(context, "GET", "/readyz", status, 0.001, access_log=False)
    assert [r.levelname for r in caplog.records] == ["WARNING", "ERROR", "WARNING"]
