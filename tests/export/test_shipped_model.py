"""The shipped default model: its file, its accuracy, and the parity properties of its graph."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lstm_serve.export.onnx_export import sha256
from lstm_serve.export.parity import check_entry, last_step_probabilities, ort_session, run_graph
from lstm_serve.model.data import load_dataset, pad_batch
from tests.conftest import SHIPPED_CHECKPOINT, SHIPPED_ENTRY


@pytest.fixture(scope="module")
def session():
    return ort_session(SHIPPED_ENTRY / "model.onnx")


@pytest.fixture(scope="module")
def test_split():
    return load_dataset("japanese-vowels").test


def test_shipped_file_matches_its_sha256_and_meets_the_accuracy_target(session, test_split):
    config = json.loads((SHIPPED_ENTRY / "config.json").read_text())
    assert sha256(SHIPPED_ENTRY / "model.onnx") == config["sha256"]
    predicted = last_step_probabilities(session, test_split.sequences).argmax(1)
    accuracy = float((predicted == test_split.labels).mean())
    assert accuracy == config["metrics"]["test_accuracy"], "re-evaluation disagrees with the recorded accuracy"
    assert accuracy >= 0.98, f"shipped model reaches {accuracy:.4f} < 0.98 on the 370 test sequences"


def test_onnxruntime_matches_pytorch_on_every_test_sequence():
    lines = check_entry(SHIPPED_CHECKPOINT, SHIPPED_ENTRY)  # probabilities within 1e-4, identical argmax
    assert "argmax identical" in lines[0]


@settings(max_examples=40, deadline=None)
@given(index=st.integers(0, 369), sizes=st.lists(st.sampled_from([1, 3, 7]) | st.integers(1, 30), min_size=1))
def test_chunked_streaming_reproduces_one_call(session, test_split, index, sizes):
    x = test_split.sequences[index][None]  # (1, T, D)
    whole = run_graph(session, x)[0]
    state, parts, t = None, [], 0
    for size in sizes + [x.shape[1]]:
        if t >= x.shape[1]:
            break
        logits, hn, cn = run_graph(session, x[:, t : t + size], state=state)
        state, t = (hn, cn), t + size
        parts.append(logits)
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(indices=st.lists(st.integers(0, 369), min_size=2, max_size=32))
def test_a_mixed_batch_equals_one_by_one(session, test_split, indices):
    sequences = [test_split.sequences[i] for i in indices]
    x, lengths = pad_batch(sequences)
    logits, hn, cn = run_graph(session, x, lengths)
    for row, seq in enumerate(sequences):
        alone_logits, alone_h, alone_c = run_graph(session, seq[None])
        np.testing.assert_allclose(logits[row, : len(seq)], alone_logits[0], atol=1e-5)
        np.testing.assert_allclose(hn[:, row], alone_h[:, 0], atol=1e-5)
        np.testing.assert_allclose(cn[:, row], alone_c[:, 0], atol=1e-5)


def test_the_basic_motions_model_ships_with_parity_and_its_accuracy():
    entry = SHIPPED_ENTRY.parents[1] / "basic-motions"
    lines = check_entry(entry / "training" / "checkpoint.pt", entry / "1")  # ORT vs PyTorch, sha256, accuracy
    assert "argmax identical" in lines[0]
    config = json.loads((entry / "1" / "config.json").read_text())
    assert config["input_dim"] == 6 and config["labels"] == ["running", "walking", "standing", "badminton"]
    assert config["metrics"]["test_accuracy"] >= 0.95
