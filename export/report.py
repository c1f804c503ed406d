"""`lstm-serve report`: every cell on every data set, measured, next to published results.

For each data set and cell: test accuracy over several seeds (single networks, the training recipe
of `model/train.py`), parameters, ONNX size, and onnxruntime latency of one streaming step at
batch 1 and 64. Plus the seed notes' argument for gates, measured: the gradient that reaches step t
from a loss at the end of a long sequence, for a plain RNN and an LSTM, before and after training on
a task that needs a 100-step memory. Writes REPORT.md, report.json and two PNGs.
"""

from __future__ import annotations

import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lstm_serve.model.model import CELLS, ModelConfig
from lstm_serve.model.train import DATASET_RECIPES

# Published test accuracies on the same train/test splits, quoted (not re-run here).
PUBLISHED = {
    "japanese-vowels": [
        ("1-NN Euclidean (ED)", 0.924, "bagnall2018"),
        ("1-NN DTW, independent (DTW_I)", 0.959, "bagnall2018"),
        ("1-NN DTW, dependent (DTW_D)", 0.949, "bagnall2018"),
        ("passing-through regions (the data set's authors)", 0.941, "kudo1999"),
    ],
    "basic-motions": [
        ("1-NN Euclidean (ED)", 0.676, "bagnall2018"),
        ("1-NN DTW, independent (DTW_I)", 1.000, "bagnall2018"),
        ("1-NN DTW, dependent (DTW_D)", 0.975, "bagnall2018"),
    ],
}
REFERENCES = {
    "bagnall2018": "A. Bagnall, H. A. Dau, J. Lines, M. Flynn, J. Large, A. Bostrom, P. Southam, E. Keogh. "
    "*The UEA multivariate time series classification archive, 2018.* arXiv:1811.00075, "
    "benchmark table (1-NN classifiers).",
    "kudo1999": "M. Kudo, J. Toyama, M. Shimbo. *Multidimensional curve classification using passing-through "
    "regions.* Pattern Recognition Letters 20(11-13):1103-1111, 1999.",
}


@dataclass
class ReportConfig:
    out_dir: str = "models"  # REPORT.md, report.json, report.png, gradient-flow.png
    datasets: list[str] = field(default_factory=lambda: ["japanese-vowels", "basic-motions"])
    cells: list[str] = field(default_factory=lambda: list(CELLS))
    seeds: int = 3
    hidden_size: int = 64
    epochs: int = 0  # 0: each data set's recipe (a smaller number makes a quick smoke run)
    gradient_steps: int = 400  # Adam steps for the plain RNN and the LSTM of the gradient-flow plot
    workers: int = 2  # training runs in parallel, one torch thread each
    latency_runs: int = 300


# -- accuracy, size, latency --------------------------------------------------------------------
def train_one(job: tuple[str, str, int, int, int]) -> dict:
    """One single-network training run; the first seed is also exported (size and latency later)."""
    from lstm_serve.export.onnx_export import export_checkpoint
    from lstm_serve.model.train import config_for, train

    dataset, cell, seed, hidden, epochs = job
    own_data = {"data": dataset} if is_data_file(dataset) else {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_for(
            Path(dataset).stem if own_data else dataset,
            **own_data,
            out_dir=tmp,
            seed=seed,
            ensemble=1,
            progress=False,
            model=ModelConfig(hidden_size=hidden, cell=cell),
            **({"epochs": epochs} if epochs else {}),
        )
        metrics = train(cfg)
        entry = export_checkpoint(Path(tmp) / "checkpoint.pt", Path(tmp) / "repo", f"{cfg.dataset}-{cell}", 1)
        onnx_bytes = (entry / "model.onnx").read_bytes()
        config = json.loads((entry / "config.json").read_text())
    return {
        "dataset": dataset,
        "cell": cell,
        "seed": seed,
        "test_accuracy": metrics["test_accuracy"],
        "parameters": config["parameters"],
        "onnx_bytes": len(onnx_bytes),
        "train_seconds": metrics["wall_time_s"],
        "onnx": onnx_bytes if seed == 0 else None,
    }


def is_data_file(dataset: str) -> bool:
    """A user's .csv or .npz (lstm-serve report --datasets my.csv), rather than a bundled set's name."""
    return dataset.lower().endswith((".csv", ".npz"))


def step_latency_us(onnx_bytes: bytes, batch: int, runs: int) -> float:
    """Median time of one streaming step (T=1, state in and out) at a batch size, one thread."""
    import onnxruntime as ort

    from lstm_serve.core.runner import session_options

    session = ort.InferenceSession(onnx_bytes, session_options(1), providers=["CPUExecutionProvider"])
    feeds = {}
    for tensor in session.get_inputs():
        if tensor.name == "x":
            feeds["x"] = np.random.default_rng(0).normal(size=(batch, 1, tensor.shape[2])).astype(np.float32)
        elif tensor.name == "lengths":
            feeds["lengths"] = np.ones(batch, np.int64)
        else:
            feeds[tensor.name] = np.zeros((tensor.shape[0], batch, tensor.shape[2]), np.float32)
    for _ in range(20):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1e6)


def summarise(runs: list[dict], cfg: ReportConfig) -> list[dict]:
    rows = []
    for dataset in cfg.datasets:
        for cell in cfg.cells:
            mine = [r for r in runs if r["dataset"] == dataset and r["cell"] == cell]
            accuracy = np.array([r["test_accuracy"] for r in mine])
            first = next(r for r in mine if r["seed"] == 0)
            rows.append(
                {
                    "dataset": dataset,
                    "cell": cell,
                    "accuracy_mean": float(accuracy.mean()),
                    "accuracy_std": float(accuracy.std(ddof=1)) if len(accuracy) > 1 else 0.0,
                    "accuracy_min": float(accuracy.min()),
                    "accuracy_max": float(accuracy.max()),
                    "accuracies": accuracy.tolist(),
                    "parameters": first["parameters"],
                    "onnx_bytes": first["onnx_bytes"],
                    "train_seconds": float(np.mean([r["train_seconds"] for r in mine])),
                    "step_us_batch1": step_latency_us(first["onnx"], 1, cfg.latency_runs),
                    "step_us_batch64": step_latency_us(first["onnx"], 64, cfg.latency_runs),
                }
            )
    return rows


# -- gradient flow ------------------------------------------------------------------------------
class PlainOrGated(nn.Module):
    """A one-layer plain RNN (tanh) or LSTM with a head on the last step: the notes' comparison."""

    def __init__(self, kind: str, input_dim: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.rnn = {"rnn": nn.RNN, "lstm": nn.LSTM}[kind](input_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def gradient_by_step(net: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """||dL/dx_t|| for every step t, averaged over the sequences, where L is the loss at the last step."""
    x = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(net(x), labels).backward()
    assert x.grad is not None  # x requires grad, so backward() filled it
    return x.grad.norm(dim=2).mean(0).numpy()


def gradient_flow(dataset: str = "basic-motions", hidden: int = 32, train_steps: int = 400, seed: int = 0) -> dict:
    """Train a plain RNN and an LSTM on the same sequences; measure the gradient reaching each step."""
    from lstm_serve.model.data import load_dataset

    data = load_dataset(dataset)
    train_x = torch.from_numpy(np.stack(data.train.sequences))  # BasicMotions: all length 100
    test_x = torch.from_numpy(np.stack(data.test.sequences))
    mean, std = train_x.mean((0, 1)), train_x.std((0, 1))
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    train_y, test_y = torch.from_numpy(data.train.labels), torch.from_numpy(data.test.labels)
    results = {}
    for kind in ("rnn", "lstm"):
        torch.manual_seed(seed)
        net = PlainOrGated(kind, train_x.shape[2], hidden, len(data.label_names))
        at_init = gradient_by_step(net, test_x, test_y)
        optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(train_steps):
            rows = torch.randint(0, len(train_x), (8,))
            loss = nn.functional.cross_entropy(net(train_x[rows]), train_y[rows])
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
        net.zero_grad()
        with torch.no_grad():
            accuracy = float((net(test_x).argmax(1) == test_y).float().mean())
        results[kind] = {
            "at_init": at_init.tolist(),
            "trained": gradient_by_step(net, test_x, test_y).tolist(),
            "test_accuracy": accuracy,
        }
    return {"dataset": dataset, "steps": train_x.shape[1], "hidden": hidden, "train_steps": train_steps, **results}


# -- output -------------------------------------------------------------------------------------
def plot_cells(rows: list[dict], cfg: ReportConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    width = 0.8 / len(cfg.datasets)
    x = np.arange(len(cfg.cells))
    for k, dataset in enumerate(cfg.datasets):
        mine = [r for r in rows if r["dataset"] == dataset]
        offset = (k - (len(cfg.datasets) - 1) / 2) * width
        axes[0].bar(
            x + offset,
            [r["accuracy_mean"] for r in mine],
            width,
            yerr=[r["accuracy_std"] for r in mine],
            capsize=3,
            label=dataset,
        )
        for key, ax in (("step_us_batch1", axes[1]), ("step_us_batch64", axes[2])):
            ax.bar(x + offset, [r[key] for r in mine], width, label=dataset)
    axes[0].set_ylim(0.8, 1.0)
    axes[0].set_title(f"test accuracy, mean ± sd over {cfg.seeds} seeds")
    axes[1].set_title("one streaming step, batch 1 (µs, onnxruntime, 1 thread)")
    axes[2].set_title("one streaming step, batch 64 (µs)")
    for ax in axes:
        ax.set_xticks(x, cfg.cells)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_gradient_flow(flow: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    distance = np.arange(flow["steps"])[::-1]  # steps between x_t and the loss
    for ax, stage, title in ((axes[0], "at_init", "at initialisation"), (axes[1], "trained", "after training")):
        for kind, label in (("rnn", "plain RNN (tanh)"), ("lstm", "LSTM")):
            accuracy = f", test accuracy {flow[kind]['test_accuracy']:.2f}" if stage == "trained" else ""
            ax.semilogy(distance, np.maximum(flow[kind][stage], 1e-30), label=f"{label}{accuracy}")
        ax.set_xlabel("steps between input x_t and the loss at the last step")
        ax.set_title(f"gradient reaching step t, {title}")
        ax.invert_xaxis()
        ax.legend()
    axes[0].set_ylabel("mean ||dL/dx_t||")
    fig.suptitle(
        f"{flow['dataset']} test sequences of {flow['steps']} frames (one layer, hidden {flow['hidden']}, "
        f"{flow['train_steps']} Adam steps)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(rows: list[dict], flow: dict, cfg: ReportConfig, wall_s: float) -> str:
    lines = [
        "# Model report: every cell on every data set",
        "",
        f"Generated by `lstm-serve report` (`make report`, {wall_s / 60:.0f} min on 2 CPU cores). Each cell is "
        f"trained as a single network (hidden {cfg.hidden_size}, 2 layers, the recipe of `model/train.py`; for "
        f"BasicMotions {DATASET_RECIPES['basic-motions']}) from {cfg.seeds} seeds; the seed also picks the validation "
        "split. The shipped models are 3-member LSTM ensembles of the same recipe (their accuracies are in "
        "each model's config.json). Latency: one streaming step (T=1, state in and out) through onnxruntime "
        f"with the server's session options on one thread, median of {cfg.latency_runs} runs.",
        "",
        "![accuracy and latency per cell](report.png)",
        "",
    ]
    for dataset in cfg.datasets:
        lines += [
            f"## {Path(dataset).name if is_data_file(dataset) else dataset}",
            "",
            "| cell | test accuracy (mean ± sd) | min–max | parameters | ONNX size | step, batch 1 | "
            "step, batch 64 | per sequence at 64 | train time |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["dataset"] == dataset):
            lines.append(
                f"| {r['cell']} | {r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f} | {r['accuracy_min']:.4f}–"
                f"{r['accuracy_max']:.4f} | {r['parameters']:,} | {r['onnx_bytes'] / 1024:.0f} KiB | "
                f"{r['step_us_batch1']:.0f} µs | {r['step_us_batch64']:.0f} µs | {r['step_us_batch64'] / 64:.1f} µs | "
                f"{r['train_seconds']:.0f} s |"
            )
        if dataset in PUBLISHED:
            lines += ["", "Published results on the same split (quoted, not re-run here):", ""]
            lines += [f"- {name}: {accuracy:.3f} [{ref}]" for name, accuracy, ref in PUBLISHED[dataset]]
        lines.append("")

    def reach(gradients: list[float]) -> str:
        ratio = gradients[0] / gradients[-1]
        return f"{ratio:.2g}" if ratio else "0 (underflows float32)"

    lines += [
        "## Why gates matter: the gradient highway, measured",
        "",
        "![gradient norm by step](gradient-flow.png)",
        "",
        f"A one-layer plain RNN (tanh) and a one-layer LSTM, hidden {flow['hidden']}, trained the same way on "
        f"{flow['dataset']} ({flow['train_steps']} Adam steps). The plot is the mean norm of the gradient of the "
        f"loss at the last of {flow['steps']} steps with respect to each input frame, over the test sequences.",
        "",
        "| | test accuracy | gradient at the first frame / at the last, initialised | … trained |",
        "|---|---|---|---|",
        *(
            f"| {name} | {flow[k]['test_accuracy']:.3f} | {reach(flow[k]['at_init'])} | {reach(flow[k]['trained'])} |"
            for k, name in (("rnn", "plain RNN"), ("lstm", "LSTM"))
        ),
        "",
        "In the plain RNN every step multiplies the gradient by W_hh and tanh', so what reaches early frames "
        "shrinks geometrically with distance; in the LSTM it can also flow back along the cell state, multiplied "
        "only by the forget gates, which training can hold near 1 (the notes' 'highway').",
        "",
        "## References",
        "",
        *(f"- [{key}] {text}" for key, text in REFERENCES.items()),
        "",
    ]
    return "\n".join(lines)


def report(cfg: ReportConfig) -> Path:
    started = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(d, c, s, cfg.hidden_size, cfg.epochs) for d in cfg.datasets for c in cfg.cells for s in range(cfg.seeds)]
    # spawn, not fork: a forked child of a process with threads (onnxruntime, torch) can inherit a held lock
    with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = list(pool.map(train_one, jobs))
    rows = summarise(runs, cfg)  # latency after training: no other run competes for the cores
    flow = gradient_flow(train_steps=cfg.gradient_steps)
    plot_cells(rows, cfg, out / "report.png")
    plot_gradient_flow(flow, out / "gradient-flow.png")
    results = {
        "config": asdict(cfg),
        "cells": rows,
        "gradient_flow": flow,
        "runs": [{k: v for k, v in r.items() if k != "onnx"} for r in runs],
    }
    (out / "report.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "REPORT.md").write_text(markdown(rows, flow, cfg, time.time() - started))
    return out / "REPORT.md"
