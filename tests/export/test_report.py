"""`lstm-serve report` end to end on a small budget: every number in the report is measured."""

import json

import numpy as np
import torch

from lstm_serve.export.report import PlainOrGated, ReportConfig, gradient_by_step, report


def test_gradient_by_step_measures_each_frame():
    torch.manual_seed(0)
    net = PlainOrGated("lstm", 3, 4, 2)
    x, labels = torch.randn(5, 7, 3), torch.tensor([0, 1, 0, 1, 1])
    norms = gradient_by_step(net, x, labels)
    assert norms.shape == (7,) and np.isfinite(norms).all() and norms[-1] > 0
    x[:, 0] += 1.0  # the gradient depends on the data, not a constant
    assert not np.allclose(gradient_by_step(net, x, labels), norms)


def test_report_runs_and_writes_markdown_json_and_plots(tmp_path):
    cfg = ReportConfig(
        out_dir=str(tmp_path),
        datasets=["basic-motions"],
        cells=["peephole", "gru"],
        seeds=2,
        hidden_size=8,
        epochs=2,
        gradient_steps=5,
        workers=1,
        latency_runs=5,
    )
    markdown = report(cfg).read_text()
    results = json.loads((tmp_path / "report.json").read_text())
    rows = {row["cell"]: row for row in results["cells"]}
    assert set(rows) == {"peephole", "gru"} and len(results["runs"]) == 4
    for row in rows.values():
        assert len(row["accuracies"]) == 2 and 0 <= row["accuracy_mean"] <= 1
        assert row["step_us_batch64"] > 0 and row["step_us_batch1"] > 0 and row["onnx_bytes"] > 1000
    assert rows["gru"]["parameters"] < rows["peephole"]["parameters"]  # 3 gates against 4 plus peepholes
    assert "| peephole |" in markdown and "| gru |" in markdown and "bagnall2018" in markdown
    assert len(results["gradient_flow"]["lstm"]["trained"]) == 100
    for image in ("report.png", "gradient-flow.png"):
        assert (tmp_path / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
