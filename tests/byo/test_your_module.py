"""The user's own PyTorch module, written outside the project: trained by the user's loop on the example CSV,
exported with `lstm-serve export --module`, served and streamed; and modules that break the contract are
refused saying which property failed."""

import json
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from torch import nn
from websockets.sync.client import connect

from lstm_serve.export.user_module import ContractError, export_module
from lstm_serve.model.data import read_user_data
from tests.byo.graphs import graph_probabilities
from tests.conftest import ROOT

CSV = ROOT / "model" / "examples" / "speakers.csv"
OUTSIDE = ROOT / "tests" / "byo" / "outside" / "speaker_lstm.py"
LABELS = ["speaker-1", "speaker-2", "speaker-3"]


def test_a_user_module_is_trained_exported_served_and_streamed(tmp_path, start_server):
    workdir, repository = tmp_path / "work", tmp_path / "repository"
    workdir.mkdir()
    shutil.copy(OUTSIDE, workdir / "speaker_lstm.py")
    data = read_user_data(CSV)
    labels = [LABELS.index(label) for label in data.labels]
    trainer = (
        "import sys; import numpy as np; from speaker_lstm import train; "
        "d = np.load(sys.argv[1], allow_pickle=True); train(list(d['X']), list(d['y']))"
    )
    np.savez(tmp_path / "train.npz", X=np.array(data.sequences, dtype=object), y=np.array(labels))
    trained = subprocess.run(
        [sys.executable, "-c", trainer, str(tmp_path / "train.npz")],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    command = [
        sys.executable, "-m", "lstm_serve.cli", "export", "--module", "speaker_lstm:trained",
        "--labels", ",".join(LABELS), "--example-data", str(CSV), "--description", "who said /ae/",
        "--repository", str(repository), "--name", "speaker-lstm", "--version", "3",
    ]  # fmt: skip
    exported = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stderr[-2000:]
    for property_checked in ("parity", "streaming", "batch independence", "causality"):
        assert property_checked in exported.stdout
    graph = repository / "speaker-lstm" / "3" / "model.onnx"
    config = json.loads(graph.with_name("config.json").read_text())
    assert config["feature_names"] == data.feature_names and config["example"]["label"] == data.labels[0]

    server = start_server("--model-repository", str(repository))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        described = c.get("/v1/models/speaker-lstm").json()
        assert described["version"] == 3 and described["cell"] == "lstm" and described["description"] == "who said /ae/"
        # sequences of different lengths in one request: a graph without lengths runs one call per length
        sequences = data.sequences[:6]
        reply = c.post("/v1/classify", json={"sequences": [s.tolist() for s in sequences]})
        for got, frames in zip(reply.json()["predictions"], sequences, strict=True):
            np.testing.assert_allclose(got["probabilities"], graph_probabilities(graph, frames), atol=1e-6)
        frames = data.sequences[7]
        expected = graph_probabilities(graph, frames)
        session_id = c.post("/v1/sessions", json={}).json()["session_id"]
        for start in range(0, len(frames), 5):
            step = c.post(f"/v1/sessions/{session_id}/steps", json={"inputs": frames[start : start + 5].tolist()})
        np.testing.assert_allclose(step.json()["prediction"]["probabilities"], expected, atol=1e-5)
        streamed = c.post("/v1/sessions", json={}).json()["session_id"]
        with connect(f"{server.url.replace('http', 'ws')}/v1/sessions/{streamed}/stream") as ws:
            for frame in frames:
                ws.send(frame.astype("<f4").tobytes())
                last = json.loads(ws.recv())
        np.testing.assert_allclose(last["prediction"]["probabilities"], expected, atol=1e-5)
        body = {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, *frames.shape], "data": frames.ravel().tolist()}],
            "outputs": [{"name": "probabilities"}],
        }
        oip = c.post("/v2/models/speaker-lstm/infer", json=body).json()
        np.testing.assert_allclose(oip["outputs"][0]["data"], expected, atol=1e-6)


class Leaky(nn.Module):
    """Normalises with the batch's statistics: a row's answer depends on the others."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(4, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, x, state=None):
        out, state = self.rnn(x - x.mean(0, keepdim=True), state)
        return self.head(out), state


class Mixing(nn.Module):
    """Adds up the batch's rows before its GRU: row 0 is itself, every later row depends on those before it."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(4, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, x, state=None):
        out, state = self.rnn(torch.cumsum(x, dim=0), state)
        return self.head(out), state


class Peeking(nn.Module):
    """Adds the sequence's last frame to every frame: the logits see the future."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(4, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, x, state=None):
        out, state = self.rnn(x + x[:, -1:], state)
        return self.head(out), state


class Forgetful(nn.Module):
    """Returns a state that is not what it carries between frames (always zeros)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(4, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, x, state=None):
        out, (h, c) = self.rnn(x, state)
        return self.head(out), (torch.zeros_like(h), torch.zeros_like(c))


class NotFinite(nn.Module):
    """NaN for any negative frame value (torch.sqrt); onnxruntime's GRU turned the NaN into finite logits, and the
    export reported parity 0.00e+00: every check compared with `>`, which a NaN difference passes."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(4, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, x, state=None):
        out, state = self.rnn(torch.sqrt(x), state)
        return self.head(out), state


class SharedState(nn.Module):
    """Starts every row from the batch's mean state: from zero state (all the checks used) that is each row's
    own; for sessions stepped in one batch it mixed their states, and each ended off its classify."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(4, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, x, state=None):
        if state is not None:
            state = state.mean(1, keepdim=True).expand_as(state).contiguous()
        out, state = self.rnn(x, state)
        return self.head(out), state


class SaysMuch(nn.Module):
    """Fails with a message of many lines, as a TorchScript module's errors are (its whole traceback)."""

    def forward(self, x, state=None):
        raise RuntimeError("The following operation failed in the TorchScript interpreter.\n  File ...\nbad shapes")


class Projected(nn.Module):
    """nn.LSTM(proj_size=...): h [L, B, P], c [L, B, H]; it was refused "with B=2 here" when B was 2."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(4, 8, batch_first=True, proj_size=3), nn.Linear(3, 2)

    def forward(self, x, state=None):
        out, state = self.rnn(x, state)
        return self.head(out), state


class WrongShape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(4, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, x, state=None):
        out, state = self.rnn(x, state)
        return self.head(out[:, -1]), state  # [B, C]: only the last step


@pytest.mark.parametrize(
    ("module", "says"),
    [
        (Leaky, "batch independence: from zero state, row 0's outputs change by"),
        (Mixing, "batch independence: from zero state, row 1's outputs change by"),
        (SharedState, "batch independence: from their own states, row 0's outputs change by"),
        (NotFinite, "parity: PyTorch's logits holds NaN or Inf for input [1, 1, 4]"),
        (Peeking, "causality: changing frames from t=20 on changed the logits before t=20 by"),
        (Forgetful, "streaming: the sequence fed in chunks"),
        (WrongShape, "logits must be [B, T, C] = [2, 5, 2]"),
        (Projected, "h and c must have one hidden size H (no proj_size); got [[1, 2, 3], [1, 2, 8]]"),
        (SaysMuch, "forward(x [2, 5, 4], None) failed: RuntimeError: bad shapes"),  # its last line, not all 3
    ],
)
def test_a_module_that_breaks_the_contract_is_refused_saying_which_property(tmp_path, module, says):
    torch.manual_seed(0)
    with pytest.raises(ContractError) as refused:
        export_module(module(), ["a", "b"], tmp_path, "bad", feature_names=["w", "x", "y", "z"])
    assert says in str(refused.value) and "\n" not in str(refused.value), str(refused.value)
    assert not (tmp_path / "bad" / "1" / "model.onnx").exists(), "a refused module left an entry behind"


def test_a_gru_module_exports_with_h_alone(tmp_path):
    class Gru(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.GRU(3, 5, num_layers=2, batch_first=True), nn.Linear(5, 4)

        def forward(self, x, state=None):
            out, state = self.rnn(x, state)
            return self.head(out), state

    entry, report = export_module(Gru(), list("abcd"), tmp_path, "gru", input_dim=3)
    config = json.loads((entry / "config.json").read_text())
    assert config["cell"] == "gru" and config["state"] == [{"input": "h0", "output": "hn", "shape": [2, 5]}]
    assert config["feature_names"] == ["f0", "f1", "f2"] and len(report) == 5


def test_a_module_with_large_logits_exports_within_float32_rounding(tmp_path):
    """Logits near 1e4 (an unnormalised head) differ by ~1e-3 between onnxruntime and PyTorch from float32
    rounding alone: parity compared them with an absolute 1e-4 and refused the module."""

    class Loud(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.LSTM(4, 16, batch_first=True), nn.Linear(16, 3)

        def forward(self, x, state=None):
            out, state = self.rnn(x, state)
            return self.head(out) * 3e4, state

    torch.manual_seed(0)
    module = Loud()
    entry, report = export_module(module, list("abc"), tmp_path, "loud", input_dim=4)
    assert report[0].startswith("parity: max |onnxruntime - PyTorch| = ") and "relative" in report[0]
    frames = np.random.default_rng(3).normal(size=(9, 4)).astype(np.float32)
    with torch.no_grad():
        expected = torch.softmax(module(torch.from_numpy(frames[None]))[0][0, -1].double(), -1).numpy()
    assert np.abs(graph_probabilities(entry / "model.onnx", frames) - expected).max() < 1e-6


def test_the_export_cli_refuses_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lstm_serve.cli", "export", "--module", "nowhere:factory", "--labels", "a,b"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "nowhere" in done.stderr, done.stderr


def test_the_export_cli_takes_labels_and_feature_names_with_spaces_after_the_commas(tmp_path):
    """`--labels "a, b"` kept ' b' as a label, and an example labelled b was then not one of the labels."""
    (tmp_path / "gru_module.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Gru(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.rnn, self.head = nn.GRU(4, 8, batch_first=True), nn.Linear(8, 2)\n\n"
        "    def forward(self, x, state=None):\n        out, state = self.rnn(x, state)\n"
        "        return self.head(out), state\n\n\ndef made():\n    torch.manual_seed(0)\n    return Gru()\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "lstm_serve.cli", "export", "--module", "gru_module:made", "--labels", "a, b",
         "--feature-names", "w, x, y, z", "--repository", "repo", "--name", "spaced"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "repo" / "spaced" / "1" / "config.json").read_text())
    assert config["labels"] == ["a", "b"] and config["feature_names"] == ["w", "x", "y", "z"]

    # example data of one class, its columns in another order: matched by name (the example's frames were kept
    # in the file's order under the model's names), and refused when they name other features
    rows = [f"s{n},{t},{4 * t + 3},{4 * t + 2},{4 * t + 1},{4 * t},a" for n in range(3) for t in range(5)]
    (tmp_path / "reversed.csv").write_text("sequence_id,t,z,y,x,w,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "other.csv").write_text("sequence_id,t,p,q,r,s,label\n" + "\n".join(rows) + "\n")
    for data, version, status in (("reversed.csv", "2", 0), ("other.csv", "3", 2)):
        done = subprocess.run(
            [sys.executable, "-m", "lstm_serve.cli", "export", "--module", "gru_module:made", "--labels", "a,b",
             "--feature-names", "w,x,y,z", "--example-data", data, "--repository", "repo", "--name", "spaced",
             "--version", version],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == status, done.stderr
    config = json.loads((tmp_path / "repo" / "spaced" / "2" / "config.json").read_text())
    assert config["example"] == {"label": "a", "frames": [[4.0 * t + k for k in range(4)] for t in range(5)]}
    assert "features ['p', 'q', 'r', 's'] are not among --feature-names" in done.stderr, done.stderr
    # a model exported without feature names lists f0..f3: a CSV's columns then go by position, whatever named
    for command in (
        ["export", "--module", "gru_module:made", "--labels", "a,b", "--input-dim", "4", "--repository", "repo",
         "--name", "plain"],
        ["classify", "other.csv", "--model-repository", "repo", "--model", "plain"],
    ):  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "lstm_serve.cli", *command],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr


class Stateless(nn.Module):
    """Never uses the state it is given: its graph has no state input for a session to feed."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(4, 8, batch_first=True), nn.Linear(8, 2)

    def forward(self, x, state=None):
        out, state = self.rnn(x)
        return self.head(out), state


def test_what_the_checks_did_not_foresee_and_bad_names_are_refused_in_words_not_tracebacks(tmp_path):
    features = ["w", "x", "y", "z"]
    with pytest.raises(ContractError, match="could not be exported and run as the contract asks"):
        export_module(Stateless(), ["a", "b"], tmp_path, "stateless", feature_names=features)
    for name in ("../outside", "a/b", ".."):
        with pytest.raises(ContractError, match="one folder"):
            export_module(WrongShape(), ["a", "b"], tmp_path, name, feature_names=features)
    with pytest.raises(ContractError, match="from 1 to 18 digits"):
        export_module(WrongShape(), ["a", "b"], tmp_path, "ok", version=0, feature_names=features)
    with pytest.raises(ContractError, match="none empty"):
        export_module(WrongShape(), ["a", "", "b"], tmp_path, "ok", feature_names=features)
    example = {"label": "c0", "frames": [[0.0] * 4]}
    with pytest.raises(ContractError, match="the example's label 'c0' is not one of the labels"):
        export_module(WrongShape(), ["a", "b"], tmp_path, "ok", feature_names=features, example=example)
    assert not any(tmp_path.rglob("*.onnx")) and not (tmp_path.parent / "outside").exists()
