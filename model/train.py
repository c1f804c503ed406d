"""Train a SequenceClassifier on a UEA data set: BPTT with gradient clipping, Adam, cosine schedule.

    lstm-serve train --dataset japanese-vowels --out runs/japanese-vowels

Writes `checkpoint.pt` (config + weights + labels, enough to rebuild the model), `metrics.json`
and `training.png` (learning curves and the test confusion matrix) into the output folder.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lstm_serve.model.data import DataError, Dataset, Split, load_dataset, pad_batch, stratified_split, user_dataset
from lstm_serve.model.model import ModelConfig, SequenceClassifier, combine_members


@dataclass
class TrainConfig:
    dataset: str = "japanese-vowels"  # a name from lstm_serve.model.data.DATASETS (unless data is given)
    data: str | None = None  # the user's .npz or long-format CSV, instead of a bundled data set
    test: str | None = None  # the user's test file; without it a stratified test_fraction of data is held out
    test_fraction: float = 0.2  # of each class of `data`, held out as the test split when no test file is given
    out_dir: str = "runs/japanese-vowels"  # where checkpoint, metrics and plot go
    seed: int = 0  # seeds data split, init, shuffling and augmentation
    epochs: int = 100  # passes over the training part (per ensemble member)
    batch_size: int = 32
    lr: float = 3e-3  # peak Adam learning rate, cosine-decayed to lr/100
    weight_decay: float = 1e-4
    grad_clip: float = 1.0  # max global gradient norm (BPTT through every step)
    noise_sigma: float = 0.5  # std of Gaussian noise added to normalised inputs while training
    crop: float = 0.7  # training windows keep at least this fraction of each sequence (1.0: no cropping)
    val_fraction: float = 0.15  # of each class in the training split, held out for model selection
    ema_decay: float = 0.99  # weights are averaged with this decay; the average is what gets evaluated
    step_loss_weight: float = 0.0  # weight of the mean loss over every valid step (besides the last)
    select_on: str = "loss"  # model selection on validation "loss" or "accuracy" (ties: the other)
    ensemble: int = 3  # members trained from different seeds (same split), served side by side
    threads: int = 1  # torch intra-op threads (1 keeps training bit-reproducible)
    progress: bool = True  # show a progress bar
    model: ModelConfig = field(default_factory=ModelConfig)


# Per data set, the TrainConfig fields that differ from the defaults. BasicMotions has 34 sequences
# to fit: at batch 32 that is 2 optimiser steps per epoch, too few for the recipe above (0.45-0.63 test
# accuracy); batch 8, 300 epochs and a faster-moving weight average reach 1.0.
DATASET_RECIPES = {"basic-motions": {"batch_size": 8, "epochs": 300, "ema_decay": 0.95}}


def config_for(dataset: str, **overrides: Any) -> TrainConfig:
    """The training config for a data set: defaults, then its recipe, then the caller's overrides."""
    return TrainConfig(dataset=dataset, **{**DATASET_RECIPES.get(dataset, {}), **overrides})


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def random_crop(seq: np.ndarray, min_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A random contiguous window holding at least `min_fraction` of the frames."""
    T = len(seq)
    if T <= 2:  # nothing shorter to keep
        return seq
    length = rng.integers(max(2, int(np.ceil(min_fraction * T))), T + 1)
    start = rng.integers(0, T - length + 1)
    return seq[start : start + length]


def batches(
    split: Split, indices: np.ndarray, batch_size: int, crop: float = 1.0, rng: np.random.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    for start in range(0, len(indices), batch_size):
        rows = indices[start : start + batch_size]
        sequences = [split.sequences[i] for i in rows]
        if crop < 1.0:
            assert rng is not None, "cropping needs a random generator"
            sequences = [random_crop(s, crop, rng) for s in sequences]
        x, lengths = pad_batch(sequences)
        yield torch.from_numpy(x), torch.from_numpy(lengths), torch.from_numpy(split.labels[rows])


@torch.no_grad()
def evaluate(model: SequenceClassifier, split: Split, indices: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Mean loss, accuracy and predicted class ids over `indices`, using the last valid step."""
    model.eval()
    losses, predictions = [], []
    for x, lengths, y in batches(split, indices, 256):
        logits = model.last_step(model(x, lengths=lengths)[0], lengths)
        losses.append(F.cross_entropy(logits, y, reduction="sum").item())
        predictions.append(logits.argmax(-1).numpy())
    predicted = np.concatenate(predictions)
    return sum(losses) / len(indices), float((predicted == split.labels[indices]).mean()), predicted


def train_member(
    cfg: TrainConfig, data: Dataset, fit_idx: np.ndarray, val_idx: np.ndarray, seed: int, label: str
) -> tuple[SequenceClassifier, dict, int]:
    """Train one network; return its best weights (by validation), its history and the best epoch."""
    set_seed(seed)
    model = SequenceClassifier(cfg.model)
    frames = torch.from_numpy(np.concatenate([data.train.sequences[i] for i in fit_idx]))
    frames64 = frames.double()  # a float32 sum of large values (1e37) overflows to inf
    model.set_normalisation(frames64.mean(0), frames64.std(0))
    ema = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(fit_idx) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs * steps_per_epoch, cfg.lr / 100)
    rng = np.random.default_rng(seed)

    history: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "val_accuracy": []}
    best: tuple[float, float] = (-math.inf, -math.inf)  # larger is better
    best_state, best_epoch = None, 0
    progress = tqdm(range(cfg.epochs), desc=label, disable=not cfg.progress)
    for epoch in progress:
        model.train()
        epoch_loss = 0.0
        for x, lengths, y in batches(data.train, rng.permutation(fit_idx), cfg.batch_size, cfg.crop, rng):
            # noise in normalised units, so sigma means the same for every feature
            x = x + cfg.noise_sigma * model.feature_std * torch.randn_like(x)
            step_logits = model(x, lengths=lengths)[0]
            loss = F.cross_entropy(model.last_step(step_logits, lengths), y)
            if cfg.step_loss_weight:
                valid = torch.arange(x.shape[1]) < lengths[:, None]  # (B, T)
                per_step = F.cross_entropy(step_logits[valid], y[:, None].expand_as(valid)[valid])
                loss = loss + cfg.step_loss_weight * per_step
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                for averaged, live in zip(ema.parameters(), model.parameters(), strict=True):
                    averaged.lerp_(live, 1 - cfg.ema_decay)
            epoch_loss += loss.item() * len(y)
        val_loss, val_acc, _ = evaluate(ema, data.train, val_idx)
        history["train_loss"].append(epoch_loss / len(fit_idx))
        history["val_loss"].append(val_loss)
        history["val_accuracy"].append(val_acc)
        score = (-val_loss, val_acc) if cfg.select_on == "loss" else (val_acc, -val_loss)
        if best_state is None or score > best:
            best, best_state, best_epoch = score, copy.deepcopy(ema.state_dict()), epoch + 1
        progress.set_postfix(loss=f"{history['train_loss'][-1]:.3f}", val_acc=f"{val_acc:.3f}")
    assert best_state is not None, "no epoch was trained"
    model.load_state_dict(best_state)
    return model.eval(), history, best_epoch


def load_data(cfg: TrainConfig) -> Dataset:
    """The bundled data set, or the user's file (DataError, one line, when it cannot be trained on)."""
    if cfg.data is None:
        return load_dataset(cfg.dataset)
    cfg.data = str(Path(cfg.data).resolve())  # recorded in the checkpoint: the export checks re-read it
    cfg.test = None if cfg.test is None else str(Path(cfg.test).resolve())
    data = user_dataset(cfg.data, cfg.test, cfg.test_fraction, cfg.seed)
    cfg.dataset = data.name
    return data


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """`folds` disjoint index sets, each holding about 1/folds of every class."""
    rng = np.random.default_rng(seed)
    assigned: list[list[int]] = [[] for _ in range(folds)]
    for c in np.unique(labels):
        for k, i in enumerate(rng.permutation(np.flatnonzero(labels == c))):
            assigned[k % folds].append(int(i))
    return [np.sort(np.array(fold)) for fold in assigned]


def cross_validate(cfg: TrainConfig, data: Dataset, candidates: list[dict[str, Any]], folds: int) -> list[dict]:
    """Score each candidate recipe by k-fold cross-validation on the training split alone: one member per
    fold, its epoch chosen on a validation part of the other folds, scored on the fold. The test split is
    never read."""
    if len(data.train.labels) < 2 * folds:
        raise DataError(
            f"{folds}-fold cross-validation needs at least {2 * folds} training sequences (each fold is held out "
            f"once, the rest trains); there are {len(data.train.labels)}: use fewer --folds, or no --select"
        )
    fold_idx = stratified_folds(data.train.labels, folds, cfg.seed)
    results = []
    for number, candidate in enumerate(candidates, start=1):
        recipe = replace(cfg, **candidate, ensemble=1, progress=False)
        accuracies, losses = [], []
        for k, held in enumerate(fold_idx):
            rest = np.concatenate([f for j, f in enumerate(fold_idx) if j != k])
            keep, val = stratified_split(data.train.labels[rest], cfg.val_fraction, cfg.seed + k)
            member, _, _ = train_member(recipe, data, rest[keep], rest[val], cfg.seed + k, f"candidate {number}")
            loss, accuracy, _ = evaluate(member, data.train, held)
            accuracies.append(accuracy)
            losses.append(loss)
        results.append(
            {"recipe": candidate, "cv_accuracy": float(np.mean(accuracies)), "cv_loss": float(np.mean(losses))}
        )
        print(
            f"candidate {number}/{len(candidates)} {candidate}: cv accuracy {results[-1]['cv_accuracy']:.4f}, "
            f"cv loss {results[-1]['cv_loss']:.4f}",
            flush=True,
        )
    return results


def train(cfg: TrainConfig, candidates: list[dict[str, Any]] | None = None, folds: int = 5) -> dict:
    """Train and score once on the test split. With `candidates` (recipes: TrainConfig fields to vary), the
    recipe is first chosen by cross-validation on the training split (best mean accuracy, then loss)."""
    selection = None
    if candidates:
        data = load_data(cfg)
        cfg.model.input_dim, cfg.model.num_classes = data.input_dim, len(data.label_names)
        selection = cross_validate(cfg, data, candidates, folds)
        best = max(selection, key=lambda r: (r["cv_accuracy"], -r["cv_loss"]))
        cfg = replace(cfg, **best["recipe"])
    metrics = train_once(cfg)
    if selection is not None:
        metrics["selection"] = {"folds": folds, "candidates": selection, "chosen": cfg_fields(cfg, selection)}
        Path(cfg.out_dir, "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def cfg_fields(cfg: TrainConfig, selection: list[dict]) -> dict[str, Any]:
    return {key: getattr(cfg, key) for key in selection[0]["recipe"]}


def train_once(cfg: TrainConfig) -> dict:
    started = time.time()
    torch.set_num_threads(cfg.threads)
    assert cfg.model.ensemble == 1, "members are trained one by one: set --ensemble K, not --model.ensemble"
    data = load_data(cfg)
    cfg.model.input_dim, cfg.model.num_classes = data.input_dim, len(data.label_names)
    fit_idx, val_idx = stratified_split(data.train.labels, cfg.val_fraction, cfg.seed)
    members = [
        train_member(cfg, data, fit_idx, val_idx, cfg.seed + 1000 * k, f"{cfg.dataset} {k + 1}/{cfg.ensemble}")
        for k in range(cfg.ensemble)
    ]
    model = combine_members([m for m, _, _ in members])
    # the learning curves plotted are the first member's; every member is selected the same way
    _, history, best_epoch = members[0]
    member_val = [evaluate(m, data.train, val_idx)[1] for m, _, _ in members]
    test_loss, test_acc, predicted = evaluate(model, data.test, np.arange(len(data.test)))
    metrics = report(cfg, data, predicted, test_acc, test_loss, best_epoch, history, time.time() - started)
    metrics["members"] = {"best_epochs": [b for _, _, b in members], "validation_accuracy": member_val}
    save(cfg, data, model, metrics)
    return metrics


def report(
    cfg: TrainConfig,
    data: Dataset,
    predicted: np.ndarray,
    test_acc: float,
    test_loss: float,
    best_epoch: int,
    history: dict[str, list[float]],
    wall_s: float,
) -> dict:
    C = len(data.label_names)
    confusion = np.zeros((C, C), dtype=int)
    np.add.at(confusion, (data.test.labels, predicted), 1)
    return {
        "dataset": cfg.dataset,
        "split": {"train": len(data.train), "test": len(data.test), "validation_fraction": cfg.val_fraction},
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "per_class_accuracy": {
            # null for a class the test split does not hold (NaN is not JSON)
            name: float(confusion[k, k] / confusion[k].sum()) if confusion[k].sum() else None
            for k, name in enumerate(data.label_names)
        },
        "confusion_matrix": confusion.tolist(),  # rows: true class, columns: predicted
        "labels": data.label_names,
        "epochs": cfg.epochs,
        "best_epoch": best_epoch,
        "wall_time_s": round(wall_s, 1),
        "history": history,
        "train_config": asdict(cfg),
    }


def save(cfg: TrainConfig, data: Dataset, model: SequenceClassifier, metrics: dict) -> None:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model_config": model.config.to_dict(),
            "state_dict": model.state_dict(),
            "labels": data.label_names,
            "dataset": cfg.dataset,
            "feature_names": data.feature_names,
            "description": data.description,
            "example": example_of(data),
            "metrics": {k: v for k, v in metrics.items() if k != "history"},
        },
        out / "checkpoint.pt",
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot(metrics, out / "training.png")


def example_of(data: Dataset) -> dict:
    """The first test sequence with its true label: what a caller can send to try the model. Each number is
    the shortest decimal that reads back as the same float32."""
    frames = [[float(str(np.float32(value))) for value in frame] for frame in data.test.sequences[0]]
    return {"label": data.label_names[int(data.test.labels[0])], "frames": frames}


def plot(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = metrics["history"]
    fig, (curves, matrix) = plt.subplots(1, 2, figsize=(12, 5))
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    curves.plot(epochs, history["train_loss"], label="train loss")
    curves.plot(epochs, history["val_loss"], label="validation loss")
    curves.set_xlabel("epoch")
    curves.set_ylabel("cross-entropy")
    curves.set_yscale("log")
    accuracy = curves.twinx()
    accuracy.plot(epochs, history["val_accuracy"], color="tab:green", alpha=0.6, label="validation accuracy")
    accuracy.set_ylabel("accuracy")
    curves.axvline(metrics["best_epoch"], color="grey", linestyle=":", label="selected epoch")
    curves.legend(loc="upper right")
    curves.set_title(f"{metrics['dataset']}: learning curves")
    confusion = np.array(metrics["confusion_matrix"])
    matrix.imshow(confusion, cmap="Blues")
    for (r, c), n in np.ndenumerate(confusion):
        if n:
            matrix.text(c, r, str(n), ha="center", va="center", color="white" if n > confusion.max() / 2 else "black")
    ticks = range(len(metrics["labels"]))
    matrix.set_xticks(ticks, metrics["labels"], rotation=45, ha="right")
    matrix.set_yticks(ticks, metrics["labels"])
    matrix.set_xlabel("predicted")
    matrix.set_ylabel("true")
    matrix.set_title(f"test confusion matrix (accuracy {metrics['test_accuracy']:.4f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_checkpoint(path: str | Path) -> tuple[SequenceClassifier, dict]:
    """Rebuild the model from the checkpoint alone."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = SequenceClassifier(ModelConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint
