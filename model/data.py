"""UEA multivariate data sets, read from the files that ship inside the `aeon` wheel (no network)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# name -> (aeon loader, human-readable label for class k is "<prefix><k>")
DATASETS = {
    "japanese-vowels": ("load_japanese_vowels", "speaker-"),
    "basic-motions": ("load_basic_motions", ""),
}


@dataclass
class Split:
    sequences: list[np.ndarray]  # each (T_i, D) float32, raw features
    labels: np.ndarray  # (N,) int64 class ids

    def __len__(self) -> int:
        return len(self.sequences)


@dataclass
class Dataset:
    name: str
    label_names: list[str]  # class id -> label
    train: Split
    test: Split

    @property
    def input_dim(self) -> int:
        return self.train.sequences[0].shape[1]


def load_dataset(name: str) -> Dataset:
    """Load the official train/test split. Sequences come as (T, D) float32, time first."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    import aeon.datasets

    loader_name, prefix = DATASETS[name]
    loader = getattr(aeon.datasets, loader_name)
    raw = {split: loader(split=split) for split in ("train", "test")}
    classes = sorted(set(raw["train"][1]), key=lambda c: (len(c), c))  # "1".."9" in numeric order
    class_id = {c: k for k, c in enumerate(classes)}

    def to_split(xs: Iterable[np.ndarray], ys: Iterable[str]) -> Split:
        sequences = [np.ascontiguousarray(np.asarray(x, dtype=np.float32).T) for x in xs]  # (D, T) -> (T, D)
        return Split(sequences, np.array([class_id[y] for y in ys], dtype=np.int64))

    return Dataset(
        name=name,
        label_names=[f"{prefix}{c}" for c in classes],
        train=to_split(*raw["train"]),
        test=to_split(*raw["test"]),
    )


def pad_batch(sequences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad (T_i, D) sequences with zeros -> (B, T_max, D) and lengths (B,) int64."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    batch = np.zeros((len(sequences), int(lengths.max()), sequences[0].shape[1]), dtype=np.float32)
    for row, seq in enumerate(sequences):
        batch[row, : len(seq)] = seq
    return batch, lengths


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out) with `fraction` of every class held out."""
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        held.extend(members[: max(1, round(fraction * len(members)))])
    held_out = np.sort(np.array(held))
    keep = np.setdiff1d(np.arange(len(labels)), held_out)
    return keep, held_out
