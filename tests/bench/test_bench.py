"""`lstm-serve bench` end to end at toy sizes: it must run both servers, measure, and write its outputs.
No speed is asserted here; the numbers live in service/bench/results/."""

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_bench_runs_both_servers_and_writes_json_markdown_and_plots(tmp_path):
    out = tmp_path / "bench"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lstm_serve.cli",
            "bench",
            "--classify-levels",
            "1,4",
            "--stream-levels",
            "2",
            "--warmup-s",
            "0.2",
            "--duration-s",
            "0.5",
            "--replay-lengths",
            "1,20",
            "--replay-repeats",
            "3",
            "--out-dir",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        timeout=300,
        capture_output=True,
    )
    results = json.loads((out / "results.json").read_text())
    points = {(p["server"], p["workload"], p["concurrency"]) for p in results["points"]}
    for server in ("lstm-serve", "baseline"):
        assert {
            (server, "classify", 1),
            (server, "classify", 4),
            (server, "stream-http", 2),
            (server, "stream-ws", 2),
            (server, "stream-ws-steady", 2),
        } <= points
    for p in results["points"]:
        assert p["errors"] == 0, p["error_examples"]
        assert p["requests"] > 0 and p["p50_ms"] <= p["p99_ms"]
        if p["server"] == "lstm-serve":
            assert p["mean_batch_size"] >= 1 and p["onnxruntime_items_per_s"] > 0
    assert [r["t"] for r in results["replay"]] == [1, 20]
    assert any(row["target"].startswith("classify") for row in results["summary"])
    assert "## Targets" in (out / "results.md").read_text()
    for plot in ("throughput_latency.png", "replay.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
