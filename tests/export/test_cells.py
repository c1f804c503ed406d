"""Every cell through the ONNX graph: native ops, the contract's state list, parity with PyTorch,
streaming in any chunking and batch independence."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from lstm_serve.export.parity import check_entry, ort_session, run_graph
from lstm_serve.model.data import load_dataset, pad_batch
from lstm_serve.model.model import CELLS

ATOL = 1e-5


@pytest.fixture(scope="module")
def sessions(cell_repository):
    return {cell: ort_session(cell_repository / cell / "1" / "model.onnx") for cell in CELLS}


@pytest.fixture(scope="module")
def test_split():
    return load_dataset("basic-motions").test


def test_state_list_says_what_the_state_is(cell_repository):
    for cell in CELLS:
        config = json.loads((cell_repository / cell / "1" / "config.json").read_text())
        expected = [("h0", "hn")] if cell == "gru" else [("h0", "hn"), ("c0", "cn")]
        assert [(s["input"], s["output"]) for s in config["state"]] == expected
        assert config["cell"] == cell and config["state"][0]["shape"] == [2, 8]
        assert [i["name"] for i in config["inputs"]] == ["x", *(i for i, _ in expected), "lengths"]


def test_every_cell_is_a_native_onnx_op(cell_repository):
    nodes = {
        cell: [
            n
            for n in onnx.load(str(cell_repository / cell / "1" / "model.onnx")).graph.node
            if n.op_type in ("LSTM", "GRU", "Loop", "Scan")
        ]
        for cell in CELLS
    }
    assert [n.op_type for n in nodes["gru"]] == ["GRU", "GRU"]
    for cell in ("lstm", "peephole", "coupled"):
        assert [n.op_type for n in nodes[cell]] == ["LSTM", "LSTM"]
    assert all(len(n.input) == 8 and n.input[7] for n in nodes["peephole"])  # the P input
    assert all(len(n.input) < 8 or not n.input[7] for n in nodes["lstm"])
    forget = {
        cell: [next((a.i for a in n.attribute if a.name == "input_forget"), 0) for n in nodes[cell]]
        for cell in ("lstm", "coupled")
    }
    assert forget == {"lstm": [0, 0], "coupled": [1, 1]}


@pytest.mark.parametrize("cell", CELLS)
def test_graph_equals_pytorch_on_the_test_split(cell, cell_runs, cell_repository):
    report = check_entry(cell_runs / cell / "checkpoint.pt", cell_repository / cell / "1")
    assert "argmax identical" in report[0]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cell=st.sampled_from(CELLS), index=st.integers(0, 39), cuts=st.lists(st.integers(1, 99), max_size=8))
def test_streaming_in_any_chunking_equals_one_call(sessions, test_split, cell, index, cuts):
    session, x = sessions[cell], test_split.sequences[index][None]
    whole = run_graph(session, x)
    state, t, last = None, 0, None
    for end in sorted(set(cuts)) + [x.shape[1]]:
        if end <= t:
            continue
        logits, *state = run_graph(session, x[:, t:end], state=tuple(state) if state else None)
        np.testing.assert_allclose(logits, whole[0][:, t:end], atol=ATOL)
        t, last = end, state
    for ours, theirs in zip(last, whole[1:], strict=True):
        np.testing.assert_allclose(ours, theirs, atol=ATOL)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cell=st.sampled_from(CELLS),
    rows=st.lists(st.tuples(st.integers(0, 39), st.integers(1, 100)), min_size=1, max_size=6),
)
def test_a_padded_batch_equals_each_sequence_alone(sessions, test_split, cell, rows):
    session = sessions[cell]
    sequences = [test_split.sequences[i][:n] for i, n in rows]
    x, lengths = pad_batch(sequences)
    for row, n in enumerate(lengths):  # garbage in the padding must change nothing
        x[row, n:] = 1e4
    batched = run_graph(session, x, lengths)
    for row, sequence in enumerate(sequences):
        alone = run_graph(session, sequence[None])
        np.testing.assert_allclose(batched[0][row, : lengths[row]], alone[0][0], atol=ATOL)
        for ours, theirs in zip(batched[1:], alone[1:], strict=True):
            np.testing.assert_allclose(ours[:, row], theirs[:, 0], atol=ATOL)


def test_the_variants_patches_carry_their_weights(cell_repository, test_split):
    """Zeroing the peephole input, or dropping input_forget, changes the result: the variants are
    not a standard LSTM in disguise."""
    x = test_split.sequences[0][None]
    for cell in ("peephole", "coupled"):
        graph = onnx.load(str(cell_repository / cell / "1" / "model.onnx"))
        exact = run_graph(ort.InferenceSession(graph.SerializeToString()), x)[0]
        for node in (n for n in graph.graph.node if n.op_type == "LSTM"):
            if cell == "peephole":
                weights = next(i for i in graph.graph.initializer if i.name == node.input[7])
                weights.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(weights)), weights.name))
            else:
                node.attribute.remove(next(a for a in node.attribute if a.name == "input_forget"))
        altered = run_graph(ort.InferenceSession(graph.SerializeToString()), x)[0]
        assert np.abs(exact - altered).max() > 1e-3, cell
