"""From the example CSV to a served model, with the documented commands: train, export, serve; then classify
and a chunked session through HTTP equal onnxruntime on the exported graph, and the model describes itself."""

import json
import shutil
import subprocess
import sys

import httpx
import numpy as np

from lstm_serve.model.data import read_user_data
from tests.byo.graphs import graph_probabilities
from tests.conftest import ROOT

CSV = ROOT / "model" / "examples" / "speakers.csv"


def lstm_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lstm_serve.cli", *args], capture_output=True, text=True, timeout=600, cwd=ROOT
    )


def test_train_export_and_serve_the_example_csv(tmp_path, start_server):
    run, repository, csv = tmp_path / "run", tmp_path / "repository", tmp_path / "speakers.csv"
    shutil.copy(CSV, csv)
    trained = lstm_serve("train", "--data", str(csv), "--epochs", "20", "--ensemble", "1", "--out-dir", str(run))
    assert trained.returncode == 0, trained.stderr[-2000:]
    export = (
        "export",
        "--checkpoint",
        str(run / "checkpoint.pt"),
        "--repository",
        str(repository),
        "--name",
        "speakers",
    )
    csv.rename(tmp_path / "moved.csv")  # the check reads the test split from the training data
    refused = lstm_serve(*export)
    assert refused.returncode == 2 and "--no-check exports without it" in refused.stderr, refused.stderr[-2000:]
    assert not (repository / "speakers" / "1").exists(), "an unchecked entry was left in the repository"
    (tmp_path / "moved.csv").rename(csv)
    exported = lstm_serve(*export)  # no --replace: the refused export took no version
    assert exported.returncode == 0 and "parity" in exported.stdout, exported.stderr[-2000:]
    graph = repository / "speakers" / "1" / "model.onnx"
    server = start_server("--model-repository", str(repository))
    data = read_user_data(CSV)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        described = c.get("/v1/models/speakers").json()
        assert described["feature_names"] == data.feature_names and described["input_dim"] == 12
        assert (
            described["labels"] == ["speaker-1", "speaker-2", "speaker-3"]
            and "speakers.csv" in described["description"]
        )
        example = described["example"]
        assert example["label"] in described["labels"] and len(example["frames"][0]) == 12
        oip = c.get("/v2/models/speakers").json()
        assert oip["parameters"]["feature_names"] == data.feature_names and oip["parameters"]["example"] == example
        triton_config = c.get("/v2/models/speakers/config").json()["parameters"]
        assert json.loads(triton_config["example"]["string_value"]) == example
        assert json.loads(triton_config["feature_names"]["string_value"]) == data.feature_names
        assert json.loads(triton_config["labels"]["string_value"]) == described["labels"]
        for frames in data.sequences[:5]:
            expected = graph_probabilities(graph, frames)
            reply = c.post("/v1/classify", json={"model": "speakers", "sequences": [frames.tolist()]})
            np.testing.assert_allclose(reply.json()["predictions"][0]["probabilities"], expected, atol=1e-6)
            session_id = c.post("/v1/sessions", json={"model": "speakers"}).json()["session_id"]
            for start in range(0, len(frames), 4):
                step = c.post(f"/v1/sessions/{session_id}/steps", json={"inputs": frames[start : start + 4].tolist()})
            np.testing.assert_allclose(step.json()["prediction"]["probabilities"], expected, atol=1e-5)
        tried = c.post("/v1/classify", json={"model": "speakers", "sequences": [example["frames"]]})
        assert tried.status_code == 200
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_config"]["data"] == str(csv) and metrics["split"]["test"] == 6


def test_a_bad_data_file_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("sequence_id,t,a,label\ns1,0,1,x\ns1,1,2,y\n")
    done = lstm_serve("train", "--data", str(bad), "--out-dir", str(tmp_path / "run"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "line 3: sequence 's1' changes label from 'x' to 'y'" in done.stderr


def test_the_model_report_covers_your_data(tmp_path):
    done = lstm_serve(
        "report", "--datasets", "--data", str(CSV), "--cells", "lstm", "gru", "--seeds", "1", "--epochs", "2",
        "--gradient-steps", "5", "--workers", "1", "--latency-runs", "5", "--out-dir", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = (tmp_path / "REPORT.md").read_text()
    assert "## speakers.csv" in report and "| lstm |" in report and "| gru |" in report
