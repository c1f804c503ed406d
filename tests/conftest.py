from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_ENTRY = ROOT / "models" / "japanese-vowels" / "1"
SHIPPED_CHECKPOINT = ROOT / "models" / "japanese-vowels" / "training" / "checkpoint.pt"


@pytest.fixture(scope="session")
def shipped_entry() -> Path:
    return SHIPPED_ENTRY


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A few epochs of a small two-member ensemble: the real training path, fast."""
    from lstm_serve.model.model import ModelConfig
    from lstm_serve.model.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny-run")
    cfg = TrainConfig(out_dir=str(out), epochs=3, ensemble=2, progress=False, model=ModelConfig(hidden_size=8))
    train(cfg)
    return out


@pytest.fixture(scope="session")
def cell_runs(tmp_path_factory) -> Path:
    """One small model per cell, trained for two epochs on BasicMotions through the real entry point:
    `<cell>/checkpoint.pt` for lstm, peephole, coupled and gru."""
    from lstm_serve.model.model import CELLS, ModelConfig
    from lstm_serve.model.train import TrainConfig, train

    runs = tmp_path_factory.mktemp("cell-runs")
    for cell in CELLS:
        train(
            TrainConfig(
                dataset="basic-motions",
                out_dir=str(runs / cell),
                epochs=2,
                ensemble=1,
                progress=False,
                model=ModelConfig(hidden_size=8, cell=cell),
            )
        )
    return runs


@pytest.fixture(scope="session")
def cell_repository(cell_runs, tmp_path_factory) -> Path:
    """Those models exported: a model repository of entries `lstm`, `peephole`, `coupled`, `gru`."""
    from lstm_serve.export.onnx_export import export_checkpoint
    from lstm_serve.model.model import CELLS

    repository = tmp_path_factory.mktemp("cell-repository")
    for cell in CELLS:
        export_checkpoint(cell_runs / cell / "checkpoint.pt", repository, cell, 1)
    return repository
