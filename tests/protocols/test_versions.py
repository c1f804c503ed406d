"""Model versions side by side, loaded and unloaded without a restart, against real servers: a session stays
on the version it started on, new sessions get the newest, and an unloaded version drains, then answers 410."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from lstm_serve.client import Client, Session
from lstm_serve.client import ModelLoading as ClientModelLoading
from tests.conftest import ROOT, add_version, copy_model

MODEL = "japanese-vowels"


@pytest.fixture
def repository(tmp_path) -> Path:
    return copy_model(tmp_path / "repository")


def oip_body(frames: np.ndarray) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, *frames.shape], "data": frames.ravel().tolist()}]}


def probabilities(reply: httpx.Response) -> np.ndarray:
    assert reply.status_code == 200, reply.text
    body = reply.json()
    found = body["predictions"][0] if "predictions" in body else body["prediction"]
    return np.array(found["probabilities"], np.float32)


def classify(c: httpx.Client, frames: np.ndarray, version: int | None = None) -> httpx.Response:
    body = {"sequences": [frames.tolist()], **({"version": version} if version else {})}
    return c.post("/v1/classify", json=body)


def step(c: httpx.Client, session_id: str, frames: np.ndarray) -> httpx.Response:
    return c.post(f"/v1/sessions/{session_id}/steps", json={"inputs": frames.tolist()})


def versions(c: httpx.Client) -> dict[int, str]:
    (model,) = c.get("/v1/models").json()
    return {v["version"]: v["status"] for v in model["versions"]}


def eventually(check, timeout: float = 15.0):
    deadline = time.time() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def test_a_session_streamed_across_a_hot_load_ends_exactly_as_classify_on_its_version(
    start_server, repository, test_sequences
):
    server = start_server("--model-repository", str(repository), "--version-drain-s", "600")
    sequence = test_sequences[3]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        before = probabilities(classify(c, sequence))
        session = c.post("/v1/sessions", json={}).json()
        assert session["version"] == 1
        assert step(c, session["session_id"], sequence[:6]).status_code == 200

        add_version(repository, 2)
        loaded = c.post(f"/v2/repository/models/{MODEL}/load")
        assert loaded.status_code == 200, loaded.text
        assert {v["version"]: v["state"] for v in loaded.json()["versions"]} == {"1": "UNLOADING", "2": "READY"}

        end = probabilities(step(c, session["session_id"], sequence[6:]))
        np.testing.assert_allclose(end, before, rtol=0, atol=2e-6)  # v1's answer, though v2 now serves
        np.testing.assert_allclose(end, probabilities(classify(c, sequence, version=1)), rtol=0, atol=2e-6)
        assert c.get(f"/v1/sessions/{session['session_id']}").json()["version"] == 1

        newer = c.post("/v1/sessions", json={}).json()
        assert newer["version"] == 2
        on_v2 = probabilities(step(c, newer["session_id"], sequence))
        assert on_v2.shape == before.shape and np.abs(on_v2 - before).max() > 1e-4  # same contract, other weights
        np.testing.assert_allclose(on_v2, probabilities(classify(c, sequence)), rtol=0, atol=2e-6)
        assert classify(c, sequence).json()["version"] == 2

        assert versions(c) == {1: "draining", 2: "serving"}
        assert c.get(f"/v2/models/{MODEL}").json()["versions"] == ["1", "2"]
        refused = c.post("/v1/sessions", json={"version": 1})
        assert refused.status_code == 410 and refused.json()["error"]["code"] == "model_version_retired"
        assert "v2" in refused.json()["error"]["message"]


def test_after_an_unload_and_its_drain_the_old_version_answers_410_everywhere(start_server, repository, test_sequences):
    add_version(repository, 2)
    server = start_server(
        "--model-repository", str(repository), "--version-policy", "all", "--version-drain-s", "2",
        "--sweep-interval-s", "0.2",
    )  # fmt: skip
    sequence = test_sequences[0]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert versions(c) == {1: "serving", 2: "serving"}
        on_v1 = c.post("/v1/sessions", json={"version": 1}).json()["session_id"]
        assert step(c, on_v1, sequence[:4]).status_code == 200
        oip_v1 = f"/v2/models/{MODEL}/versions/1/infer"
        infer = {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4, 12], "data": sequence[:4].ravel().tolist()}]
        }
        assert c.post(oip_v1, json=infer).status_code == 200

        streaming = connect(server.url.replace("http", "ws") + f"/v1/sessions/{on_v1}/stream")
        unloaded = c.post(f"/v2/repository/models/{MODEL}/unload", json={"parameters": {"version": "1"}})
        assert unloaded.status_code == 200, unloaded.text
        assert step(c, on_v1, sequence[4:8]).status_code == 200  # draining: the live session goes on
        assert c.post("/v1/sessions", json={"version": 1}).status_code == 410  # but no new one starts on v1
        exported = c.get(f"/v1/sessions/{on_v1}/state").json()
        imported = c.post("/v1/sessions", json={"state": exported})  # nor one from its exported state
        assert imported.status_code == 410 and "is draining" in imported.json()["error"]["message"]

        def retired() -> httpx.Response:
            reply = step(c, on_v1, sequence[8:10])
            assert reply.status_code == 410, reply.text
            return reply

        error = eventually(retired).json()["error"]
        assert error["code"] == "model_version_retired" and "v2 replaced it" in error["message"]
        with streaming:  # a socket open across the retirement says so once, then closes: it can never step again
            streaming.send(json.dumps({"inputs": sequence[8:10].tolist()}))
            assert json.loads(streaming.recv())["error"]["code"] == "model_version_retired"
            with pytest.raises(ConnectionClosed):
                streaming.recv(timeout=5)
            assert streaming.close_code == 1008
        assert classify(c, sequence, version=1).status_code == 410
        oip = c.post(oip_v1, json=infer)
        assert oip.status_code == 410 and "v2 replaced it" in oip.json()["error"]
        assert versions(c) == {2: "serving"}
        index = {row["version"]: row["state"] for row in c.post("/v2/repository/index").json()}
        assert index == {"1": "UNAVAILABLE", "2": "READY"}
        ws_url = server.url.replace("http", "ws") + f"/v1/sessions/{on_v1}/stream"
        with connect(ws_url) as ws:
            assert json.loads(ws.recv())["error"]["code"] == "model_version_retired"
        assert classify(c, sequence).json()["version"] == 2  # the rest serves on


def test_a_sequence_goes_on_and_ends_on_the_path_without_a_version_while_its_unloaded_model_drains(
    start_server, repository, test_sequences
):
    """tritonclient sends a sequence to /v2/models/{name}/infer (no version). Once the model was unloaded whole,
    that path answered 410 to the sequence's next request: it could neither go on nor end while it drained."""
    server = start_server("--model-repository", str(repository), "--version-drain-s", "600")
    sequence, path = test_sequences[2], f"/v2/models/{MODEL}/infer"

    def part(frames: np.ndarray, **flags: bool) -> dict:
        return {**oip_body(frames), "parameters": {"sequence_id": 7, **flags}}

    with httpx.Client(base_url=server.url, timeout=30) as c:
        whole = probabilities(classify(c, sequence))
        assert c.post(path, json=part(sequence[:4], sequence_start=True)).status_code == 200
        unloaded = c.post(f"/v2/repository/models/{MODEL}/unload")
        assert unloaded.status_code == 200, unloaded.text
        going_on = c.post(path, json=part(sequence[4:8]))
        assert going_on.status_code == 200 and going_on.json()["model_version"] == "1", going_on.text
        ended = c.post(path, json={**part(sequence[8:], sequence_end=True), "outputs": [{"name": "probabilities"}]})
        assert ended.status_code == 200, ended.text
        np.testing.assert_allclose(ended.json()["outputs"][0]["data"], whole, rtol=0, atol=2e-6)
        assert ended.json()["parameters"]["sequence_steps"] == len(sequence)
        for body in (part(sequence[:4], sequence_start=True), oip_body(sequence)):  # nothing new starts on it
            refused = c.post(path, json=body)
            assert refused.status_code == 410 and "was unloaded" in refused.json()["error"], refused.text
        assert c.post(path, json=part(sequence[:4])).status_code == 400  # that sequence has ended
        for body in (b"{not json", b'{"inputs": []}'):  # no sequence goes on in a body not read: the model's answer
            refused = c.post(path, content=body, headers={"content-type": "application/json"})
            assert refused.status_code == 410 and "was unloaded" in refused.json()["error"], refused.text
        (row,) = c.post("/v2/repository/index").json()
        assert row["state"] == "UNLOADING" and "no version of it takes new sessions" in row["reason"], row
        for name in ("a" * 300, "a%00b"):  # past the file system's names; a NUL no path may hold
            refused = c.post(f"/v2/repository/models/{name}/load")
            assert refused.status_code == 400 and refused.json()["error"].startswith("no model 'a"), refused.text


def test_the_version_policy_picks_what_serves_and_a_request_may_name_a_version(
    start_server, repository, test_sequences
):
    add_version(repository, 2)
    add_version(repository, 3)
    sequence = test_sequences[1]
    server = start_server("--model-repository", str(repository), "--version-policy", "latest:2")
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert versions(c) == {2: "serving", 3: "serving"}
        assert c.get(f"/v1/models/{MODEL}").json()["version"] == 3  # the default: the newest
        two, three = probabilities(classify(c, sequence, 2)), probabilities(classify(c, sequence, 3))
        assert np.abs(two - three).max() > 1e-4
        missing = classify(c, sequence, 1)
        assert missing.status_code == 404 and "[2, 3]" in missing.json()["error"]["message"]
        session = c.post("/v1/sessions", json={"version": 2}).json()
        np.testing.assert_allclose(probabilities(step(c, session["session_id"], sequence)), two, rtol=0, atol=2e-6)
        ws_url = server.url.replace("http", "ws") + f"/v1/sessions/{session['session_id']}/stream?version=3"
        with connect(ws_url) as ws:
            assert "runs on japanese-vowels v2" in json.loads(ws.recv())["error"]["message"]
        with connect(ws_url.replace("version=3", "version=02")) as ws:  # a version number, as in /v2 paths
            ws.send(json.dumps({"inputs": sequence[:1].tolist()}))
            assert json.loads(ws.recv())["steps"] == len(sequence) + 1
        oip = f"/v2/models/{MODEL}/versions/2/infer"
        infer = {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1, len(sequence), 12], "data": sequence.ravel().tolist()}
            ]
        }
        reply = c.post(oip, json=infer).json()
        assert reply["model_version"] == "2"
        np.testing.assert_allclose(reply["outputs"][0]["data"], two, rtol=0, atol=2e-6)
        assert c.get(f"/v2/models/{MODEL}/config").json()["version_policy"] == {"latest": {"num_versions": 2}}


def break_sha256(version_dir: Path) -> None:
    data = bytearray((version_dir / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (version_dir / "model.onnx").write_bytes(bytes(data))


def break_contract(version_dir: Path) -> None:
    """A config whose labels the graph's head does not give (10 promised, 9 computed)."""
    config = json.loads((version_dir / "config.json").read_text())
    config["labels"] = [*config["labels"], "speaker-10"]
    (version_dir / "config.json").write_text(json.dumps(config))


def break_name(version_dir: Path) -> None:
    """A config naming another model: loaded, it would have served under that model's name."""
    config = json.loads((version_dir / "config.json").read_text())
    (version_dir / "config.json").write_text(json.dumps({**config, "name": "basic-motions"}))


@pytest.mark.parametrize(
    ("breaks", "said"),
    [(break_sha256, "sha256"), (break_contract, "labels"), (break_name, "names the model 'basic-motions'")],
)
def test_a_version_that_fails_its_checks_is_refused_while_the_current_one_serves(
    start_server, repository, test_sequences, breaks, said
):
    server = start_server("--model-repository", str(repository))
    sequence = test_sequences[2]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        before = probabilities(classify(c, sequence))
        breaks(add_version(repository, 2))
        refused = c.post(f"/v2/repository/models/{MODEL}/load")
        assert refused.status_code == 400 and "v2" in refused.json()["error"] and said in refused.json()["error"]
        assert classify(c, sequence).json()["version"] == 1
        np.testing.assert_allclose(probabilities(classify(c, sequence)), before, rtol=0, atol=0)
        assert versions(c) == {1: "serving"}
        index = {row["version"]: row for row in c.post("/v2/repository/index").json()}
        assert index["2"]["state"] == "UNAVAILABLE" and said in index["2"]["reason"]


def test_polling_the_repository_serves_a_new_version_to_new_sessions(start_server, repository):
    server = start_server("--model-repository", str(repository), "--repository-poll-s", "0.3")
    with httpx.Client(base_url=server.url, timeout=30) as c:
        old = c.post("/v1/sessions", json={}).json()
        add_version(repository, 2)

        def moved() -> None:
            assert c.post("/v1/sessions", json={}).json()["version"] == 2

        eventually(moved)
        assert c.get(f"/v1/sessions/{old['session_id']}").json()["version"] == 1


def test_the_repository_api_is_for_operators_only(start_server, repository):
    keys = {"LSTM_SERVE_API_KEYS": "caller-key", "LSTM_SERVE_ADMIN_KEYS": "operator-key"}
    server = start_server("--model-repository", str(repository), env=keys)
    index = f"{server.url}/v2/repository/index"
    assert httpx.post(index).status_code == 401
    caller = httpx.post(index, headers={"Authorization": "Bearer caller-key"})
    assert caller.status_code == 403 and "admin" in caller.json()["error"]
    assert httpx.post(index, headers={"Authorization": "Bearer operator-key"}).status_code == 200
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer operator-key"}).status_code == 401

    closed = start_server("--model-repository", str(repository), env={"LSTM_SERVE_API_KEYS": "caller-key"})
    refused = httpx.post(f"{closed.url}/v2/repository/index", headers={"Authorization": "Bearer caller-key"})
    assert refused.status_code == 403 and "LSTM_SERVE_ADMIN_KEYS" in refused.json()["error"]


def test_without_keys_only_loopback_clients_may_use_the_repository_api():
    from lstm_serve.core.access import Caller
    from lstm_serve.errors import Forbidden
    from lstm_serve.http.guard import Guard
    from lstm_serve.protocols.repository import ROUTES

    class Open:
        keys = admin_keys = type("NoKeys", (), {"enabled": False})()
        settings = type("S", (), {"origins": frozenset()})()

    guard, route = Guard(Open()), ROUTES[0]  # type: ignore[arg-type]
    for address in ("127.0.0.1", "127.0.0.53", "::1"):
        assert guard.authenticate({"client": (address, 1), "headers": []}, route) == Caller(None, address)
    for address in ("10.0.0.7", "192.168.1.2", "2001:db8::1", "unknown"):
        with pytest.raises(Forbidden, match="loopback"):
            guard.authenticate({"client": (address, 1), "headers": []}, route)


def test_replicas_on_one_redis_agree_on_versions_and_never_answer_from_the_wrong_one(
    start_server, redis_server, tmp_path, test_sequences
):
    first, second = copy_model(tmp_path / "a"), copy_model(tmp_path / "b")
    env = {"LSTM_SERVE_REDIS_URL": redis_server.url, "LSTM_SERVE_SWEEP_INTERVAL_S": "0.2"}
    a = start_server("--model-repository", str(first), env=env)
    b = start_server("--model-repository", str(second), env=env)
    sequence = test_sequences[5]
    with httpx.Client(base_url=a.url, timeout=30) as on_a, httpx.Client(base_url=b.url, timeout=30) as on_b:
        v1_session = on_b.post("/v1/sessions", json={}).json()["session_id"]
        assert step(on_a, v1_session, sequence[:5]).status_code == 200

        add_version(first, 2)  # only replica a has v2 on its disk
        assert on_a.post(f"/v2/repository/models/{MODEL}/load").status_code == 200
        v2_session = on_a.post("/v1/sessions", json={}).json()
        assert v2_session["version"] == 2
        expected = probabilities(classify(on_a, sequence))

        def b_follows() -> httpx.Response:
            reply = step(on_b, v2_session["session_id"], sequence[:3])
            assert reply.status_code == 503, reply.text  # b cannot serve v2: it says so, never answers with v1
            return reply

        waiting = eventually(b_follows)
        assert waiting.headers["retry-after"] == "1" and waiting.json()["error"]["code"] == "model_loading"
        new_on_b = on_b.post("/v1/sessions", json={})
        assert new_on_b.status_code == 503  # the cluster's newest is v2, which b has not loaded
        end_v1 = probabilities(step(on_b, v1_session, sequence[5:]))  # v1 sessions drain on both replicas
        np.testing.assert_allclose(end_v1, probabilities(classify(on_a, sequence, 1)), rtol=0, atol=2e-6)

        shutil.copytree(first / MODEL / "2", second / MODEL / "2")  # the operator ships v2 to b too

        def b_serves() -> np.ndarray:
            return probabilities(step(on_b, v2_session["session_id"], sequence[:3]))

        eventually(b_serves)
        rest = probabilities(step(on_a, v2_session["session_id"], sequence[3:]))
        np.testing.assert_allclose(rest, expected, rtol=0, atol=2e-6)
        assert versions(on_b) == {1: "draining", 2: "serving"}


def test_a_version_that_fails_its_checks_at_start_stops_the_start(start_server, repository):
    add_version(repository, 2)
    break_sha256(repository / MODEL / "1")  # the older version: the start's own check of the newest passes
    server = start_server("--model-repository", str(repository), "--version-policy", "all", wait=False)
    try:
        server.proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server started with a damaged version: {server.output()[-2000:]}")
    assert server.proc.returncode != 0
    assert "japanese-vowels v1 was not loaded" in server.output() and "sha256" in server.output()


def test_the_api_documents_follow_loads_and_unloads(start_server, repository):
    """Every body the schema allows is one the server accepts, after a hot load too; and with the default
    model unloaded the documents still build (they answered 410 before)."""
    server = start_server("--model-repository", str(repository), "--version-policy", "all")
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert '"enum":[1]' in c.get("/openapi.json").text
        add_version(repository, 2)
        assert c.post("/v2/repository/models/japanese-vowels/load").status_code == 200
        document = c.get("/openapi.json").text
        assert '"enum":[1,2]' in document and '"enum":[1]' not in document
        assert c.post("/v2/repository/models/japanese-vowels/unload").status_code == 200
        for path in ("/openapi.json", "/asyncapi.json"):
            assert c.get(path).status_code == 200, path


def test_a_load_that_finds_a_loaded_versions_files_changed_is_refused_and_it_serves_on(
    start_server, repository, test_sequences
):
    """Weights must not change under a version's sessions: the operator hears so at the load, not at the
    next start (it answered 200 READY and the next start failed)."""
    server = start_server("--model-repository", str(repository))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        before = probabilities(classify(c, test_sequences[2]))
        version_dir = repository / MODEL / "1"
        config = json.loads((version_dir / "config.json").read_text())
        break_sha256(version_dir)
        refused = c.post(f"/v2/repository/models/{MODEL}/load")
        assert refused.status_code == 400 and "v1 is loaded, but its files no longer load" in refused.json()["error"]
        data = (version_dir / "model.onnx").read_bytes()  # other bytes, with a config that vouches for them
        (version_dir / "config.json").write_text(json.dumps({**config, "sha256": hashlib.sha256(data).hexdigest()}))
        refused = c.post(f"/v2/repository/models/{MODEL}/load")
        assert refused.status_code == 400 and "changed on disk since" in refused.json()["error"]
        np.testing.assert_allclose(probabilities(classify(c, test_sequences[2])), before, rtol=0, atol=0)


def client_session(client: Client, session_id: str) -> Session:
    return Session(client, {"session_id": session_id, "model": MODEL, "version": 2})


def shared_table(redis_server, key: str = "lstm-serve:models") -> dict:
    import redis

    with redis.Redis.from_url(redis_server.url) as r:
        stored = r.hget(key, MODEL)
    return json.loads(stored) if stored else {}


def test_a_version_number_never_comes_back_with_other_weights(start_server, repository, test_sequences):
    """v2 served, unloaded and retired; new weights copied into its folder are refused on load (its sessions'
    state belongs to the old ones), while its own files load again."""
    add_version(repository, 2)
    server = start_server(
        "--model-repository", str(repository), "--version-policy", "all", "--version-drain-s", "0.5",
        "--sweep-interval-s", "0.2",
    )  # fmt: skip
    with httpx.Client(base_url=server.url, timeout=30) as c:
        v2 = probabilities(classify(c, test_sequences[1]))
        assert c.post(f"/v2/repository/models/{MODEL}/unload", json={"parameters": {"version": "2"}}).status_code == 200

        def retired() -> None:  # and its runner freed by a sweep
            assert f"retired {MODEL} v2" in server.output()

        eventually(retired)
        assert classify(c, test_sequences[1], version=2).status_code == 410
        original = repository / MODEL / "2"
        shutil.move(original, repository / "kept-v2")
        add_version(repository, 2, shift=-0.9)  # other weights, a config.json that vouches for them
        refused = c.post(f"/v2/repository/models/{MODEL}/load")
        assert refused.status_code == 400, refused.text
        assert "never changes its weights" in refused.json()["error"] and "new version" in refused.json()["error"]
        assert c.post("/v1/sessions", json={}).json()["version"] == 1
        index = {row["version"]: row for row in c.post("/v2/repository/index").json()}
        assert index["2"]["state"] == "UNAVAILABLE" and "other weights" in index["2"]["reason"]

        shutil.rmtree(original)
        shutil.move(repository / "kept-v2", original)  # its own files: v2 serves again, as it was
        assert c.post(f"/v2/repository/models/{MODEL}/load").status_code == 200
        np.testing.assert_allclose(probabilities(classify(c, test_sequences[1], version=2)), v2, rtol=0, atol=0)


def test_a_replica_whose_files_for_a_version_differ_never_serves_that_version(
    start_server, redis_server, tmp_path, test_sequences
):
    """Two replicas, two different sets of weights under v2: the one loaded first is v2 for the cluster; the
    other replica refuses its own v2 and answers 503 for v2's sessions (never steps them with other weights)."""
    first, second = copy_model(tmp_path / "a"), copy_model(tmp_path / "b")
    add_version(first, 2)
    add_version(second, 2, shift=-0.9)
    env = {"LSTM_SERVE_REDIS_URL": redis_server.url, "LSTM_SERVE_SWEEP_INTERVAL_S": "0.2"}
    a = start_server("--model-repository", str(first), env=env)
    b = start_server("--model-repository", str(second), env=env)
    with httpx.Client(base_url=a.url, timeout=30) as on_a, httpx.Client(base_url=b.url, timeout=30) as on_b:
        session = on_a.post("/v1/sessions", json={}).json()
        assert session["version"] == 2
        reply = step(on_b, session["session_id"], test_sequences[0][:4])
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"]["code"] == "model_loading" and "other weights" in reply.json()["error"]["message"]
        expected = probabilities(classify(on_a, test_sequences[0][:4]))
        np.testing.assert_allclose(probabilities(step(on_a, session["session_id"], test_sequences[0][:4])), expected)
        assert on_b.post(f"/v2/repository/models/{MODEL}/load").status_code == 400
    sha = hashlib.sha256((first / MODEL / "2" / "model.onnx").read_bytes()).hexdigest()
    assert shared_table(redis_server, "lstm-serve:models:sha256")["2"] == sha
    assert "other weights" in b.output()


def test_a_load_the_shared_tables_refuse_changes_nothing_and_its_retry_writes_them(
    start_server, redis_server, repository
):
    """Redis refusing the table write: the load answers 503 and this replica goes on serving what it did;
    the retry, once Redis takes writes, loads and writes the table every replica follows."""
    env = {"LSTM_SERVE_REDIS_URL": redis_server.url, "LSTM_SERVE_SWEEP_INTERVAL_S": "0.2"}
    server = start_server("--model-repository", str(repository), env=env)
    add_version(repository, 2)
    refuse = ["redis-cli", "-p", str(redis_server.port), "config", "set", "min-replicas-to-write"]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        subprocess.run([*refuse, "1"], check=True, capture_output=True)
        try:
            refused = c.post(f"/v2/repository/models/{MODEL}/load")
            assert refused.status_code == 503, refused.text
            assert versions(c) == {1: "serving"} and classify(c, np.zeros((3, 12), np.float32)).json()["version"] == 1
        finally:
            subprocess.run([*refuse, "0"], check=True, capture_output=True)
        assert shared_table(redis_server).keys() == {"1"}
        assert c.post(f"/v2/repository/models/{MODEL}/load").status_code == 200
        assert versions(c) == {1: "draining", 2: "serving"}
    assert {v: s["status"] for v, s in shared_table(redis_server).items()} == {"1": "draining", "2": "serving"}


def test_an_unload_survives_a_redis_that_restarted_empty(start_server, redis_server, repository):
    """The tables are written back by the next sweep, so the unloaded version is not served again by a
    replica that reads them (a poll, a new replica)."""
    add_version(repository, 2)
    env = {"LSTM_SERVE_REDIS_URL": redis_server.url, "LSTM_SERVE_SWEEP_INTERVAL_S": "0.2"}
    a = start_server("--model-repository", str(repository), "--version-policy", "all", env=env)
    with httpx.Client(base_url=a.url, timeout=30) as c:
        assert c.post(f"/v2/repository/models/{MODEL}/unload", json={"parameters": {"version": "2"}}).status_code == 200
    subprocess.run(["redis-cli", "-p", str(redis_server.port), "flushall"], check=True, capture_output=True)

    def written_back() -> dict:
        table = shared_table(redis_server)
        assert table, "the tables were not written back"
        return table

    assert {v: s["status"] for v, s in eventually(written_back).items()} == {"1": "serving", "2": "draining"}
    b = start_server("--model-repository", str(repository), "--version-policy", "all", env=env)
    with httpx.Client(base_url=b.url, timeout=30) as c:
        assert versions(c) == {1: "serving", 2: "draining"}
        assert c.post("/v1/sessions", json={}).json()["version"] == 1


# root reads any folder; without these two capabilities (util-linux's setpriv drops them) it reads only what its
# mode allows, as any other user does
AS_ANOTHER_USER = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--") if os.geteuid() == 0 else ()


def test_a_folder_the_server_cannot_read_stops_a_start_and_later_is_refused_in_a_line_and_logged_once(
    start_server, repository
):
    shutil.copytree(ROOT / "models" / "basic-motions" / "1", repository / "basic-motions" / "1")
    unreadable = repository / "basic-motions"
    flags = ("--model-repository", str(repository), "--repository-poll-s", "0.1")
    unreadable.chmod(0)
    try:
        stopped = start_server(*flags, prefix=AS_ANOTHER_USER, wait=False)
        assert stopped.proc.wait(60) != 0
        assert f"model folder {unreadable} cannot be read (Permission denied)" in stopped.output()
        unreadable.chmod(0o755)
        server = start_server(*flags, "--default-model", MODEL, prefix=AS_ANOTHER_USER)
        unreadable.chmod(0)
        with httpx.Client(base_url=server.url, timeout=30) as c:
            refused = c.post("/v2/repository/models/basic-motions/load")
            assert refused.status_code == 400, refused.text
            assert "cannot be read (Permission denied)" in refused.json()["error"]
            time.sleep(1.0)  # ten polls
            assert classify(c, np.zeros((3, 12), np.float32)).status_code == 200
            unreadable.chmod(0o755)
            assert c.post("/v2/repository/models/basic-motions/load").status_code == 200
            body = {"model": "basic-motions", "sequences": [[[0.0] * 6]]}
            assert c.post("/v1/classify", json=body).status_code == 200
    finally:
        unreadable.chmod(0o755)
    log = server.output()
    assert log.count("it cannot be read (Permission denied)") == 1 and "Traceback" not in log, log[-3000:]


def test_why_a_version_does_not_load_on_a_replica_reaches_callers_without_the_servers_paths(
    start_server, redis_server, tmp_path
):
    first, second = copy_model(tmp_path / "a"), copy_model(tmp_path / "b")
    add_version(first, 2)
    env = {"LSTM_SERVE_REDIS_URL": redis_server.url, "LSTM_SERVE_SWEEP_INTERVAL_S": "0.2"}
    a = start_server("--model-repository", str(first), env=env)
    b = start_server("--model-repository", str(second), env=env)
    shutil.copytree(first / MODEL / "2", second / MODEL / "2")  # the operator ships v2 to b, damaged on the way
    break_sha256(second / MODEL / "2")
    with httpx.Client(base_url=a.url, timeout=30) as on_a, httpx.Client(base_url=b.url, timeout=30) as on_b:
        session = on_a.post("/v1/sessions", json={}).json()["session_id"]

        def refused_on_b() -> httpx.Response:
            reply = step(on_b, session, np.zeros((2, 12), np.float32))
            assert reply.status_code == 503 and "does not load on this replica" in reply.text, reply.text
            return reply

        reply = eventually(refused_on_b)
        with connect(b.url.replace("http", "ws") + f"/v1/sessions/{session}/stream") as ws:
            assert json.loads(ws.recv())["error"]["code"] == "model_loading"
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=5)
            assert ws.close_code == 1013  # try again later: not a policy violation
        # the client reconnects on 1013, and gives up with the typed error
        with Client(b.url) as client, pytest.raises(ClientModelLoading, match="does not load on this replica"):
            list(client_session(client, session).stream([np.zeros((1, 12), np.float32)], reconnects=1))
    assert "<repository>/japanese-vowels/2/model.onnx does not match the sha256" in reply.json()["error"]["message"]
    assert str(tmp_path) not in reply.text
