"""Every cell served by one server: sessions carry whatever state the entry declares (h and c, or h
alone for the GRU), with the same exactness as the shipped LSTM, over /v1 and the Open Inference Protocol."""

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lstm_serve.model.data import load_dataset
from lstm_serve.model.model import CELLS

ATOL = 1e-5


@pytest.fixture(scope="module")
def cell_server(cell_repository):
    from tests.conftest import ServerProcess

    process = ServerProcess("--model-repository", str(cell_repository), "--max-queue-delay-ms", "2").wait_ready()
    with httpx.Client(base_url=process.url, timeout=30) as client:
        yield client
    process.stop()


@pytest.fixture(scope="module")
def motions():
    return load_dataset("basic-motions").test.sequences


def classify(client, model: str, sequences) -> np.ndarray:
    response = client.post("/v1/classify", json={"model": model, "sequences": [s.tolist() for s in sequences]})
    assert response.status_code == 200, response.text
    return np.array([p["probabilities"] for p in response.json()["predictions"]])


def test_every_cell_is_listed_with_its_state(cell_server):
    models = {m["name"]: m for m in cell_server.get("/v1/models").json()}
    assert set(models) == set(CELLS)
    for cell in CELLS:
        assert models[cell]["cell"] == cell
        assert models[cell]["state"] == (["h0"] if cell == "gru" else ["h0", "c0"])
        assert models[cell]["input_dim"] == 6 and len(models[cell]["labels"]) == 4


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cell=st.sampled_from(CELLS), index=st.integers(0, 39), cuts=st.lists(st.integers(1, 99), max_size=6))
def test_a_session_in_any_chunking_ends_where_classify_does(cell_server, motions, cell, index, cuts):
    sequence = motions[index]
    sid = cell_server.post("/v1/sessions", json={"model": cell}).json()["session_id"]
    t = 0
    for end in sorted(set(cuts)) + [len(sequence)]:
        if end <= t:
            continue
        step = cell_server.post(f"/v1/sessions/{sid}/steps", json={"inputs": sequence[t:end].tolist(), "seq": t})
        assert step.status_code == 200, step.text
        t = end
    got = np.array(step.json()["prediction"]["probabilities"])
    np.testing.assert_allclose(got, classify(cell_server, cell, [sequence])[0], atol=ATOL)
    cell_server.delete(f"/v1/sessions/{sid}")


@pytest.mark.parametrize("cell", CELLS)
def test_batching_mixed_lengths_changes_nothing(cell_server, motions, cell):
    rng = np.random.default_rng(CELLS.index(cell))
    sequences = [motions[i][: rng.integers(1, 101)] for i in range(12)]
    together = classify(cell_server, cell, sequences)
    alone = np.concatenate([classify(cell_server, cell, [s]) for s in sequences])
    np.testing.assert_allclose(together, alone, atol=ATOL)


def test_interleaved_sessions_of_different_cells_never_mix(cell_server, motions):
    sessions = {cell: cell_server.post("/v1/sessions", json={"model": cell}).json()["session_id"] for cell in CELLS}
    sequence = motions[11]
    for t in range(0, 100, 10):  # ten frames at a time, round robin over the four cells
        for sid in sessions.values():
            step = cell_server.post(f"/v1/sessions/{sid}/steps", json={"inputs": sequence[t : t + 10].tolist()})
            assert step.json()["steps"] == t + 10
    for cell, sid in sessions.items():
        final = np.array(cell_server.get(f"/v1/sessions/{sid}").json()["prediction"]["probabilities"])
        np.testing.assert_allclose(final, classify(cell_server, cell, [sequence])[0], atol=ATOL)


def test_a_gru_sequence_over_the_open_inference_protocol(cell_server, motions):
    sequence = motions[5].astype(np.float32)
    chunks = np.split(sequence, [30, 31, 77])
    for i, chunk in enumerate(chunks):
        x = {"name": "x", "datatype": "FP32", "shape": [1, len(chunk), 6], "data": chunk.ravel().tolist()}
        body = {
            "inputs": [x],
            "parameters": {"sequence_id": 9, "sequence_start": i == 0, "sequence_end": i == len(chunks) - 1},
            "outputs": [{"name": "probabilities"}],
        }
        response = cell_server.post("/v2/models/gru/infer", json=body)
        assert response.status_code == 200, response.text
    got = np.array(response.json()["outputs"][0]["data"])
    np.testing.assert_allclose(got, classify(cell_server, "gru", [sequence])[0], atol=ATOL)
    config = cell_server.get("/v2/models/gru/config").json()
    assert [s["input_name"] for s in config["sequence_batching"]["state"]] == ["h0"]


def test_without_japanese_vowels_the_default_is_the_first_model_by_name(cell_server, motions):
    response = cell_server.post("/v1/classify", json={"sequences": [motions[0].tolist()]})
    assert response.status_code == 200 and response.json()["model"] == "coupled"


def test_an_explicit_default_model_that_is_missing_stops_the_start(start_server, cell_repository):
    server = start_server("--model-repository", str(cell_repository), "--default-model", "japanese-vowels", wait=False)
    assert server.proc.wait(60) != 0
    assert "default model 'japanese-vowels' is not in" in server.output()
