"""Every example in examples/ runs against a real server and gives the true label, so none can rot."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

EXAMPLES = ROOT / "examples"


def run(server, *command: str) -> str:
    env = {**os.environ, "LSTM_SERVE_URL": server.url}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("model", ["japanese-vowels", "basic-motions"])
def test_the_example_files_hold_the_same_real_sequence(model):
    document = json.loads((EXAMPLES / f"{model}.json").read_text())
    np.testing.assert_array_equal(np.load(EXAMPLES / f"{model}.npy"), np.asarray(document["frames"], np.float32))
    rows = (EXAMPLES / f"{model}.csv").read_text().splitlines()
    assert len(rows) == len(document["frames"]) + 1 and rows[1].endswith("," + document["label"])


def test_classify_with_curl(server):
    reply = json.loads(run(server, "bash", str(EXAMPLES / "classify.sh")))
    assert reply["predictions"][0]["label"] == json.loads((EXAMPLES / "japanese-vowels.json").read_text())["label"]


def test_classify_with_the_client(server):
    out = run(server, sys.executable, str(EXAMPLES / "classify.py"))
    for line in out.strip().splitlines():
        predicted, truth = line.split(": ")[1].split(" (")[0], line.rsplit("true label ", 1)[1]
        assert predicted == truth, line


def test_stream_basic_motions_with_the_client(server):
    out = run(server, sys.executable, str(EXAMPLES / "stream_basic_motions.py"))
    lines = out.strip().splitlines()
    assert len(lines) == 11 and lines[-1] == "true label: standing" and "standing" in lines[-2]


def test_the_tritonclient_sequence(server, client):
    out = run(server, sys.executable, str(EXAMPLES / "triton_sequence.py"))
    expected = client.post("/v1/classify", json=json.loads((EXAMPLES / "classify-request.json").read_text())).json()
    assert out.strip().splitlines()[-1].endswith(":" + expected["predictions"][0]["label"])
