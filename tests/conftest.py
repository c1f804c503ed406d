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
    from model.model import ModelConfig
    from model.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny-run")
    cfg = TrainConfig(out_dir=str(out), epochs=3, ensemble=2, progress=False, model=ModelConfig(hidden_size=8))
    train(cfg)
    return out
