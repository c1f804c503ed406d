import json

import numpy as np
import torch

from lstm_serve.model.train import load_checkpoint, random_crop
from tests.conftest import ROOT


def test_training_writes_checkpoint_metrics_and_plot(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["dataset"] == "japanese-vowels" and metrics["epochs"] == 3
    assert metrics["split"] == {"train": 270, "test": 370, "validation_fraction": 0.15}
    confusion = np.array(metrics["confusion_matrix"])
    assert confusion.shape == (9, 9) and confusion.sum() == 370
    assert metrics["test_accuracy"] == np.trace(confusion) / 370
    assert set(metrics["per_class_accuracy"]) == {f"speaker-{k}" for k in range(1, 10)}
    assert len(metrics["history"]["val_loss"]) == 3 and metrics["wall_time_s"] > 0
    assert (tiny_run / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_rebuilds_the_model_from_the_file_alone(tiny_run):
    model, checkpoint = load_checkpoint(tiny_run / "checkpoint.pt")
    assert model.config.ensemble == 2 and model.state_size == 2 * 8
    assert checkpoint["labels"][0] == "speaker-1"
    assert not torch.equal(model.feature_std, torch.ones(12)), "normalisation statistics were not stored"


def test_random_crop_keeps_a_contiguous_window_of_at_least_the_fraction():
    seq = np.arange(20, dtype=np.float32)[:, None]
    rng = np.random.default_rng(0)
    for _ in range(200):
        window = random_crop(seq, 0.7, rng)
        assert len(window) >= 14 and np.all(np.diff(window[:, 0]) == 1)
    for frames in (1, 2):  # one-frame sequences train too (the crop drew from an empty range)
        assert len(random_crop(seq[:frames], 0.7, rng)) == frames


def test_training_is_deterministic_for_a_seed(tmp_path):
    from lstm_serve.model.model import ModelConfig
    from lstm_serve.model.train import TrainConfig, train

    weights = []
    for run in ("a", "b"):
        cfg = TrainConfig(
            out_dir=str(tmp_path / run), epochs=2, ensemble=1, progress=False, model=ModelConfig(hidden_size=8)
        )
        metrics = train(cfg)
        weights.append((load_checkpoint(tmp_path / run / "checkpoint.pt")[0].state_dict(), metrics["test_accuracy"]))
    (first, acc_a), (second, acc_b) = weights
    assert acc_a == acc_b
    assert all(torch.equal(first[k], second[k]) for k in first), "same seed, different weights"


def test_a_data_sets_recipe_is_the_default_and_flags_still_win():
    from dataclasses import asdict
    from pathlib import Path

    from lstm_serve.cli import train_config

    shipped = json.loads((Path(__file__).parents[2] / "models/basic-motions/training/metrics.json").read_text())
    recipe = asdict(train_config(["--dataset", "basic-motions"])[0])
    ignored = {"out_dir", "progress", "model"}  # where it was written, a progress bar, dims filled in by train()
    newer = {"data": None, "test": None, "test_fraction": 0.2}  # fields the shipped run predates, at their defaults
    assert {k: v for k, v in recipe.items() if k not in ignored and k not in newer} == {
        k: v for k, v in shipped["train_config"].items() if k not in ignored
    }
    assert {k: recipe[k] for k in newer} == newer
    assert train_config(["--dataset", "basic-motions", "--epochs", "5"])[0].epochs == 5
    assert train_config([])[0].batch_size == 32 and train_config([])[0].dataset == "japanese-vowels"
    cfg, candidates, folds = train_config(["--select", "noise_sigma=0,0.5", "--select", "crop=1.0,0.7", "--folds", "4"])
    assert folds == 4 and len(candidates) == 4 and {"noise_sigma": 0.0, "crop": 0.7} in candidates


def test_selection_is_by_cross_validation_and_the_test_split_is_scored_once(tmp_path, monkeypatch):
    from lstm_serve.model import train as training

    scored = []
    real_evaluate = training.evaluate

    def spy(model, split, indices):
        scored.append(split)
        return real_evaluate(model, split, indices)

    monkeypatch.setattr(training, "evaluate", spy)
    loaded = []
    real_load = training.load_data
    monkeypatch.setattr(training, "load_data", lambda cfg: loaded.append(real_load(cfg)) or loaded[-1])
    cfg = training.TrainConfig(
        data=str(ROOT / "model" / "examples" / "speakers.csv"),
        epochs=2,
        ensemble=1,
        progress=False,
        out_dir=str(tmp_path),
    )
    metrics = training.train(cfg, [{"noise_sigma": 0.0}, {"noise_sigma": 0.5}], folds=3)
    selection = metrics["selection"]
    assert selection["folds"] == 3 and len(selection["candidates"]) == 2
    assert selection["chosen"] in [c["recipe"] for c in selection["candidates"]]
    tests = [split for split in scored if any(split is data.test for data in loaded)]
    assert len(tests) == 1 and scored[-1] is tests[0], "the test split was read before the final score"
