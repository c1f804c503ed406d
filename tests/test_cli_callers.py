"""`lstm-serve classify`, `stream` and `models`: here with onnxruntime, or against a real server; a bad file
or an unreachable server is one line and exit 2."""

import csv
import json
import subprocess
import sys

from tests.conftest import ROOT

EXAMPLES = ROOT / "examples"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lstm_serve.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_classify_here_and_on_a_server_agree_in_every_format(server, client):
    expected = client.post("/v1/classify", json=json.loads((EXAMPLES / "classify-request.json").read_text())).json()
    label = expected["predictions"][0]["label"]
    for name in ("japanese-vowels.json", "japanese-vowels.npy", "japanese-vowels.csv"):
        for where in ((), ("--url", server.url)):
            done = cli("classify", str(EXAMPLES / name), "--json", *where)
            assert done.returncode == 0, done.stderr
            (row,) = json.loads(done.stdout)
            assert row["label"] == label, (name, where)
            assert abs(row["probability"] - max(expected["predictions"][0]["probabilities"])) < 1e-5
    table = cli("classify", str(ROOT / "model" / "examples" / "motions.npz"), "--model", "basic-motions")
    assert table.returncode == 0 and len(table.stdout.splitlines()) == 25 and "true" in table.stdout.splitlines()[0]


def test_a_csv_is_read_by_its_column_names_and_one_naming_other_features_is_refused(server, tmp_path):
    """Columns in another order were fed as they stood, and columns of other names were taken."""
    rows = list(csv.reader((EXAMPLES / "japanese-vowels.csv").open()))
    order = [0, 1, 3, 2, *range(4, len(rows[0]))]  # the first two features swapped
    swapped, renamed = tmp_path / "swapped.csv", tmp_path / "renamed.csv"
    csv.writer(swapped.open("w", newline="")).writerows([[row[i] for i in order] for row in rows])
    header = rows[0][:2] + [f"c{i}" for i in range(12)] + rows[0][14:]  # sequence_id, t, 12 features, label
    csv.writer(renamed.open("w", newline="")).writerows([header, *rows[1:]])
    original = json.loads(cli("classify", str(EXAMPLES / "japanese-vowels.csv"), "--json").stdout)
    for where in ((), ("--url", server.url), ("--url", server.url, "--model", "japanese-vowels")):
        reordered = cli("classify", str(swapped), "--json", *where)
        assert reordered.returncode == 0, reordered.stderr
        for got, want in zip(json.loads(reordered.stdout), original, strict=True):
            assert got["label"] == want["label"] and abs(got["probability"] - want["probability"]) < 1e-6, where
    for where in ((), ("--url", server.url)):
        refused = cli("classify", str(renamed), *where)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert "c0" in refused.stderr, refused.stderr
    streamed = cli("stream", str(swapped), "--url", server.url, "--chunk", "100")
    original = cli("stream", str(EXAMPLES / "japanese-vowels.csv"), "--url", server.url, "--chunk", "100")
    assert streamed.returncode == 0 and streamed.stdout == original.stdout, streamed.stderr
    wide = cli("stream", str(EXAMPLES / "basic-motions.npy"), "--url", server.url, "--model", "japanese-vowels")
    assert wide.returncode == 2 and "6 features per frame; japanese-vowels takes 12" in wide.stderr, wide.stderr


def test_stream_prints_a_prediction_per_chunk(server):
    done = cli(
        "stream", str(EXAMPLES / "basic-motions.npy"), "--url", server.url, "--model", "basic-motions", "--chunk", "10"
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("frames   100") and "standing" in lines[-1]


def test_models_here_and_on_a_server(server):
    here = json.loads(cli("models", "--json").stdout)
    there = json.loads(cli("models", "--json", "--url", server.url).stdout)
    assert {m["name"] for m in here} == {m["name"] for m in there} == {"japanese-vowels", "basic-motions"}


def test_a_bad_file_or_an_unreachable_server_is_one_line(tmp_path):
    (tmp_path / "bad.json").write_text('{"sequences": [[1, 2]]}')
    for args in (
        ("classify", str(tmp_path / "missing.npy")),
        ("classify", str(tmp_path / "bad.json")),
        ("classify", str(EXAMPLES / "japanese-vowels.npy"), "--url", "http://127.0.0.1:9"),
        ("classify", str(EXAMPLES / "basic-motions.npy")),  # 6 features for the 12-feature default model
    ):
        done = cli(*args)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, (args, done.stderr)
