"""The ONNX contract of an exported entry."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lstm_serve.export.onnx_export import export_checkpoint, sha256
from lstm_serve.export.parity import last_step_probabilities, run_graph, torch_probabilities


@pytest.fixture(scope="module")
def tiny_entry(tiny_run, tmp_path_factory):
    return export_checkpoint(tiny_run / "checkpoint.pt", tmp_path_factory.mktemp("repo"), "tiny", 3)


def test_entry_layout_and_config(tiny_entry):
    assert tiny_entry.parts[-2:] == ("tiny", "3")
    config = json.loads((tiny_entry / "config.json").read_text())
    assert config["name"] == "tiny" and config["version"] == 3 and config["cell"] == "lstm"
    assert (config["input_dim"], config["hidden_size"], config["num_layers"]) == (12, 16, 2)
    assert config["labels"] == [f"speaker-{k}" for k in range(1, 10)]
    assert config["state"] == [
        {"input": "h0", "output": "hn", "shape": [2, 16]},
        {"input": "c0", "output": "cn", "shape": [2, 16]},
    ]
    assert [i["name"] for i in config["inputs"]] == ["x", "h0", "c0", "lengths"]
    assert [o["name"] for o in config["outputs"]] == ["logits", "hn", "cn"]
    assert config["metrics"]["dataset"] == "japanese-vowels" and 0 <= config["metrics"]["test_accuracy"] <= 1
    assert config["sha256"] == sha256(tiny_entry / "model.onnx")


def test_graph_passes_checker_with_native_lstm_ops(tiny_entry):
    graph = onnx.load(str(tiny_entry / "model.onnx"))
    onnx.checker.check_model(graph, full_check=True)
    assert graph.opset_import[0].version >= 17
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("LSTM") == 2 * 2 and "Dropout" not in ops and "Loop" not in ops


@pytest.mark.parametrize("provider", ort.get_available_providers())
def test_loads_with_every_available_provider(tiny_entry, provider):
    session = ort.InferenceSession(str(tiny_entry / "model.onnx"), providers=[provider])
    logits, hn, cn = run_graph(session, np.zeros((2, 3, 12), np.float32))
    assert logits.shape == (2, 3, 9) and hn.shape == cn.shape == (2, 2, 16)


def test_a_second_export_in_one_process_keeps_batch_and_time_dynamic(tiny_run, tiny_entry, tmp_path):
    """torch 2.13 can freeze T to the example length on a second LSTM export; ours must not."""
    second = export_checkpoint(tiny_run / "checkpoint.pt", tmp_path, "again", 1)
    for entry in (tiny_entry, second):
        session = ort.InferenceSession(str(entry / "model.onnx"), providers=["CPUExecutionProvider"])
        for B, T in [(1, 1), (7, 31), (2, 200)]:
            logits, _, _ = run_graph(session, np.random.default_rng(0).normal(size=(B, T, 12)).astype(np.float32))
            assert logits.shape == (B, T, 9)


def test_tiny_export_matches_torch(tiny_run, tiny_entry):
    rng = np.random.default_rng(1)
    sequences = [rng.normal(size=(n, 12)).astype(np.float32) for n in (7, 29, 1, 15)]
    session = ort.InferenceSession(str(tiny_entry / "model.onnx"), providers=["CPUExecutionProvider"])
    ours = last_step_probabilities(session, sequences)
    assert np.abs(ours - torch_probabilities(tiny_run / "checkpoint.pt", sequences)).max() <= 1e-5


def test_an_export_never_overwrites_a_version_unless_asked(tiny_run, tmp_path):
    """Servers refuse other weights under a version number they served: overwriting one by mistake would break
    its next load, so the exporter refuses first, naming the way out."""
    first = export_checkpoint(tiny_run / "checkpoint.pt", tmp_path, "tiny", 1)
    before = (first / "model.onnx").read_bytes()
    with pytest.raises(ValueError, match="already holds a model: export the new weights as another version"):
        export_checkpoint(tiny_run / "checkpoint.pt", tmp_path, "tiny", 1)
    assert (first / "model.onnx").read_bytes() == before
    assert export_checkpoint(tiny_run / "checkpoint.pt", tmp_path, "tiny", 1, replace=True) == first
    result = subprocess.run(
        [sys.executable, "-m", "lstm_serve.cli", "export", "--checkpoint", str(tiny_run / "checkpoint.pt"),
         "--repository", str(tmp_path), "--name", "tiny", "--version", "1", "--no-check"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2 and "already holds a model" in result.stderr and "--replace" in result.stderr
