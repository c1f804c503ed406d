"""A session's state exported from one server and imported on another continues exactly; an import that is
not for the served model version, or is not intact, is refused with a 422 that says what."""

import base64
import copy
import hashlib

import httpx
import numpy as np
import pytest

MODEL = "japanese-vowels"
ALICE, BOB = "alice-key-3f9a7c", "bob-key-81d2e0"
KEYS = {"LSTM_SERVE_API_KEYS": f"{ALICE},{BOB}"}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def checksum(document: dict) -> str:
    digest = hashlib.sha256(f"{document['model']}\n{document['version']}\n{document['steps']}\n".encode())
    for name in document["state"]:
        digest.update(name.encode() + b"\n" + base64.b64decode(document["state"][name]))
    return digest.hexdigest()


def test_a_session_exported_and_imported_elsewhere_continues_exactly(start_server, test_sequences):
    a, b = start_server(env=KEYS), start_server(env=KEYS)
    sequence = test_sequences[3]
    head, tail = sequence[:7].tolist(), sequence[7:].tolist()
    with httpx.Client(timeout=30) as c:
        original = c.post(f"{a.url}/v1/sessions", json={"model": MODEL}, headers=auth(ALICE)).json()["session_id"]
        c.post(f"{a.url}/v1/sessions/{original}/steps", json={"inputs": head, "seq": 0}, headers=auth(ALICE))
        exported = c.get(f"{a.url}/v1/sessions/{original}/state", headers=auth(ALICE)).json()
        assert exported["model"] == MODEL and exported["version"] == 1 and exported["steps"] == 7
        assert exported["sha256"] == checksum(exported)
        assert set(exported["state"]) == {"h0", "c0"}
        imported = c.post(f"{b.url}/v1/sessions", json={"state": exported}, headers=auth(BOB))
        assert imported.status_code == 201, imported.text
        assert imported.json()["steps"] == 7 and imported.json()["session_id"] != original
        resumed = imported.json()["session_id"]
        # the imported session is the importer's: the exporter's key cannot see it on b
        assert c.get(f"{b.url}/v1/sessions/{resumed}", headers=auth(ALICE)).status_code == 404
        there = c.post(f"{b.url}/v1/sessions/{resumed}/steps", json={"inputs": tail, "seq": 7}, headers=auth(BOB))
        here = c.post(f"{a.url}/v1/sessions/{original}/steps", json={"inputs": tail, "seq": 7}, headers=auth(ALICE))
        whole = c.post(
            f"{a.url}/v1/classify", json={"model": MODEL, "sequences": [sequence.tolist()]}, headers=auth(ALICE)
        )
    assert there.json()["steps"] == here.json()["steps"] == len(sequence)
    assert there.json()["prediction"]["probabilities"] == here.json()["prediction"]["probabilities"]
    np.testing.assert_allclose(
        there.json()["prediction"]["probabilities"], whole.json()["predictions"][0]["probabilities"], atol=1e-6
    )


def altered(document: dict, change) -> dict:
    changed = copy.deepcopy(document)
    change(changed)
    return changed


def resealed(document: dict, change) -> dict:
    """Changed, with a checksum that matches the change: only the other checks can refuse it."""
    changed = altered(document, change)
    changed["sha256"] = checksum(changed)
    return changed


def nan_h0(d: dict) -> None:
    values = np.frombuffer(base64.b64decode(d["state"]["h0"]), "<f4").copy()
    values[0] = np.nan
    d["state"]["h0"] = base64.b64encode(values.tobytes()).decode()


@pytest.mark.parametrize(
    ("name", "make", "status", "says"),
    [
        ("flipped bit", lambda d: altered(d, lambda x: x.update(steps=x["steps"] + 1)), 422, "sha256 does not match"),
        ("other version", lambda d: resealed(d, lambda x: x.update(version=2)), 422, "serves v1"),
        ("unknown model", lambda d: resealed(d, lambda x: x.update(model="nope")), 404, "no model 'nope'"),
        ("missing c0", lambda d: resealed(d, lambda x: x["state"].pop("c0")), 422, "lacks tensor 'c0'"),
        ("wrong shape", lambda d: resealed(d, lambda x: x["shape"].update(h0=[1, 192])), 422, "shape.h0"),
        ("short tensor", lambda d: resealed(d, lambda x: x["state"].update(h0="AAAA")), 422, "bytes"),
        ("not base64", lambda d: altered(d, lambda x: x["state"].update(h0="**")), 422, "not base64"),
        ("NaN", lambda d: resealed(d, nan_h0), 422, "NaN"),
        ("extra tensor", lambda d: resealed(d, lambda x: x["state"].update(z0="")), 422, "does not carry"),
        ("negative steps", lambda d: resealed(d, lambda x: x.update(steps=-1)), 422, "steps"),
        ("version as text", lambda d: resealed(d, lambda x: x.update(version="1")), 422, "whole number, as the"),
        ("unknown field", lambda d: resealed(d, lambda x: x.update(signed_by="me")), 422, "['signed_by']"),
        ("no fields", lambda d: {"model": MODEL}, 422, "lacks"),
        ("not an object", lambda d: [1, 2], 422, "state"),
    ],
)
def test_an_import_that_does_not_fit_is_refused_saying_what(client, name, make, status, says):
    session_id = client.post("/v1/sessions", json={"model": MODEL}).json()["session_id"]
    client.post(f"/v1/sessions/{session_id}/steps", json={"inputs": [[0.5] * 12] * 3})
    exported = client.get(f"/v1/sessions/{session_id}/state").json()
    answer = client.post("/v1/sessions", json={"state": make(exported)})
    assert answer.status_code == status, (name, answer.text)
    assert says in answer.json()["error"]["message"], answer.text
    assert client.post("/v1/sessions", json={"state": exported}).status_code == 201, "the intact state imports"
