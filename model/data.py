"""The data a model learns from: the bundled UEA multivariate sets (read from the files inside the `aeon`
wheel, no network) or the user's own file (.npz or long-format CSV, see the README)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# name -> (aeon loader, human-readable label for class k is "<prefix><k>")
DATASETS = {
    "japanese-vowels": ("load_japanese_vowels", "speaker-"),
    "basic-motions": ("load_basic_motions", ""),
}
FEATURES = {
    "japanese-vowels": [f"lpc_cepstrum_{k}" for k in range(1, 13)],
    "basic-motions": [f"{sensor}_{axis}" for sensor in ("accelerometer", "gyroscope") for axis in "xyz"],
}
DESCRIPTIONS = {
    "japanese-vowels": "Which of 9 male speakers uttered the Japanese vowel /ae/: one frame per 6.7 ms of "
    "speech, 12 LPC cepstrum coefficients per frame (UEA JapaneseVowels).",
    "basic-motions": "Which activity (badminton, running, standing, walking) a wrist-worn smartwatch recorded: "
    "one frame per 0.1 s, 3-axis accelerometer and 3-axis gyroscope (UEA BasicMotions).",
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
    feature_names: list[str] = field(default_factory=list)  # what each of the D numbers of a frame is
    description: str = ""

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
        feature_names=FEATURES[name],
        description=DESCRIPTIONS[name],
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


# -- the user's own data ---------------------------------------------------------------------------------
class DataError(ValueError):
    """A data file that cannot be trained on; the message is one line that says what and where."""


@dataclass
class UserData:
    """Sequences and labels read from the user's file, before they are split."""

    sequences: list[np.ndarray]  # (T_i, D) float32
    labels: list[str]  # one per sequence, as written in the file
    feature_names: list[str]
    named: bool = True  # the file names its features (an .npz may not: then f0, f1, ...)


def read_user_data(path: str | Path, training: bool = True, several_classes: bool | None = None) -> UserData:
    """An .npz (X, y, optional lengths and feature_names) or a long-format CSV (sequence_id, t, one
    column per feature, label); anything malformed raises DataError. Not for training, the labels may
    be missing (then "") and one class is fine; `several_classes` (default: `training`) asks for two or more."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() == ".npz":
        data = read_npz(path, training)
    elif path.suffix.lower() == ".csv":
        data = read_csv(path, training)
    else:
        raise DataError(f"{path}: expected a .npz or a .csv file (see the README's data formats)")
    check_sequences(path, data, training if several_classes is None else several_classes)
    return data


def read_npz(path: Path, training: bool = True) -> UserData:
    try:
        archive = np.load(path, allow_pickle=True)  # X as an object array of (T_i, D) needs pickle
    except Exception as error:  # a corrupt archive raises zipfile, pickle or value errors
        raise DataError(f"{path}: not a readable .npz ({error})") from None
    for key in ("X", "y") if training else ("X",):
        if key not in archive.files:
            raise DataError(f"{path}: no array {key!r} (it has {sorted(archive.files)})")
    X = archive["X"]
    if X.dtype == object:
        sequences = [np.asarray(seq) for seq in X]
    elif X.ndim == 3:
        if "lengths" not in archive.files:
            raise DataError(f"{path}: X is a padded [N, T, D] array, so 'lengths' [N] is needed")
        lengths = archive["lengths"]
        whole = lengths.dtype.kind in "iu" or (lengths.dtype.kind == "f" and bool((lengths == np.round(lengths)).all()))
        if not whole or lengths.shape != (len(X),) or (lengths < 1).any() or (lengths > X.shape[1]).any():
            raise DataError(f"{path}: lengths must be N={len(X)} whole numbers between 1 and T={X.shape[1]}")
        sequences = [X[i, : int(n)] for i, n in enumerate(lengths)]
    else:
        raise DataError(f"{path}: X must be an object array of [T_i, D] arrays or a padded [N, T, D] array")
    y = archive["y"] if "y" in archive.files else np.full(len(sequences), "")
    if y.ndim != 1 or len(y) != len(sequences):
        raise DataError(f"{path}: y must hold one label per sequence ({len(sequences)}), it has shape {list(y.shape)}")
    for i, seq in enumerate(sequences):
        if seq.ndim != 2:
            raise DataError(f"{path}: sequence {i} has shape {list(seq.shape)}, not [T, D]")
        if not np.issubdtype(seq.dtype, np.number) or np.issubdtype(seq.dtype, np.complexfloating):
            raise DataError(f"{path}: sequence {i} holds {seq.dtype} values, not real numbers")
    width = sequences[0].shape[1] if sequences else 0
    names = [text(n) for n in np.atleast_1d(archive["feature_names"])] if "feature_names" in archive.files else []
    if names and len(names) != width:
        raise DataError(f"{path}: {len(names)} feature_names for {width} features")
    if (twice := repeated(names)) is not None:
        raise DataError(f"{path}: feature_names repeats {twice!r}")
    labels = [text(label) for label in y.tolist()]
    if training and any(label in ("", "nan", "None") for label in labels):
        raise DataError(
            f"{path}: sequence {next(i for i, v in enumerate(labels) if v in ('', 'nan', 'None'))} has no label"
        )
    sequences32 = [np.asarray(s, np.float32) for s in sequences]
    return UserData(sequences32, labels, names or [f"f{k}" for k in range(width)], named=bool(names))


def repeated(names: list[str]) -> str | None:
    """The first name that occurs again, if any."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def text(value: object) -> str:
    """A label or a name as written: bytes (an .npz saved with |S strings) decoded, not "b'x'"."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


CSV_COLUMNS = ("sequence_id", "t", "label")
FLOAT32_MAX = float(np.finfo(np.float32).max)


def read_csv(path: Path, training: bool = True) -> UserData:
    import csv

    try:
        with path.open(newline="", encoding="utf-8-sig") as file:  # -sig: a byte-order mark (Excel) is no name
            return parse_csv(path, csv.reader(file), training)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}); save the CSV as UTF-8") from None


def parse_csv(path: Path, reader: Iterator[list[str]], training: bool) -> UserData:
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}: empty file")
    header = [name.strip() for name in header]
    if (twice := repeated(header)) is not None:
        raise DataError(f"{path}: the header names column {twice!r} more than once")
    missing = [c for c in CSV_COLUMNS if c not in header and (training or c != "label")]
    if missing:
        raise DataError(
            f"{path}: no column {', '.join(missing)} (a long-format CSV has sequence_id, t, label and "
            "one column per feature)"
        )
    features = [name for name in header if name not in CSV_COLUMNS]
    if not features:
        raise DataError(f"{path}: no feature columns besides sequence_id, t and label")
    at = {name: header.index(name) for name in header}
    frames: dict[str, list[tuple[float, list[float]]]] = {}
    labels: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{path} line {line}: {len(row)} fields, the header has {len(header)}")
        sequence_id, label = row[at["sequence_id"]].strip(), row[at["label"]].strip() if "label" in at else ""
        if training and not label:
            raise DataError(f"{path} line {line}: no label")
        try:
            t = float(row[at["t"]])
            values = [float(row[at[name]]) for name in features]
        except ValueError:
            raise DataError(f"{path} line {line}: t and every feature must be numbers") from None
        if not math.isfinite(t):
            raise DataError(f"{path} line {line}: t is {row[at['t']].strip()!r}, not a finite number")
        if sequence_id in labels and labels[sequence_id] != label:
            raise DataError(
                f"{path} line {line}: sequence {sequence_id!r} changes label from {labels[sequence_id]!r} to {label!r}"
            )
        labels[sequence_id] = label
        frames.setdefault(sequence_id, []).append((t, values))
    sequences = []
    for sequence_id, rows in frames.items():
        times = [t for t, _ in rows]
        if len(set(times)) != len(times):
            raise DataError(f"{path}: sequence {sequence_id!r} has two frames at the same t")
        ordered = np.array([values for _, values in sorted(rows, key=lambda r: r[0])], np.float64)
        if (np.abs(ordered) > FLOAT32_MAX).any():  # inf as float32: say so, not "NaN or infinite"
            raise DataError(f"{path}: sequence {sequence_id!r} holds {np.abs(ordered).max():g}, beyond float32's range")
        sequences.append(ordered.astype(np.float32))
    return UserData(sequences, [labels[s] for s in frames], features)


def check_sequences(path: Path, data: UserData, training: bool = True) -> None:
    if not data.sequences:
        raise DataError(f"{path}: no sequences")
    width = data.sequences[0].shape[1]
    for i, seq in enumerate(data.sequences):
        if len(seq) == 0:
            raise DataError(f"{path}: sequence {i} has no frames")
        if seq.shape[1] != width:
            raise DataError(f"{path}: sequence {i} has {seq.shape[1]} features per frame, the first has {width}")
        bad = np.argwhere(~np.isfinite(seq))
        if len(bad):
            t, d = bad[0]
            raise DataError(f"{path}: sequence {i} frame {t} feature {data.feature_names[d]!r} is NaN or infinite")
    if training and len(set(data.labels)) < 2:
        raise DataError(f"{path}: every sequence has label {data.labels[0]!r}; a classifier needs at least two classes")


def as_number(label: str) -> tuple[bool, float, str]:
    """A numeric label's sort key: by value, then as written ("1" before "1.0"), "nan" last: the same order
    every run (a set's order, which NaN's comparisons would leave in place, changes with the hash seed)."""
    value = float(label)
    return (math.isnan(value), 0.0 if math.isnan(value) else value, label)


def label_order(labels: Iterable[str]) -> list[str]:
    """Labels sorted as numbers when they all are, else as text."""
    unique = set(labels)
    try:
        return sorted(unique, key=as_number)
    except ValueError:
        return sorted(unique)


def matching_features(test: UserData, data: UserData, test_path: str | Path, path: str | Path) -> UserData:
    """The test data with its features in the training data's order, matched by name when both files name
    them (by position when either does not: an .npz without feature_names)."""
    width = data.sequences[0].shape[1]
    if test.sequences[0].shape[1] != width:
        raise DataError(f"{test_path}: {test.sequences[0].shape[1]} features per frame, {path} has {width}")
    if not (test.named and data.named) or test.feature_names == data.feature_names:
        return test
    if sorted(test.feature_names) != sorted(data.feature_names):
        extra = sorted(set(test.feature_names) - set(data.feature_names))
        raise DataError(f"{test_path}: features {extra[:5]} are not among {path}'s features {data.feature_names[:8]}")
    order = [test.feature_names.index(name) for name in data.feature_names]
    return UserData([seq[:, order] for seq in test.sequences], test.labels, data.feature_names)


def user_dataset(
    path: str | Path, test_path: str | Path | None = None, test_fraction: float = 0.2, seed: int = 0
) -> Dataset:
    """The user's data as a Dataset: the test split from `test_path`, else a stratified `test_fraction` of
    the data, held out before anything is trained or selected."""
    data = read_user_data(path)
    names = label_order(data.labels)
    if test_path is not None:
        test = matching_features(read_user_data(test_path, several_classes=False), data, test_path, path)
        unknown = sorted(set(test.labels) - set(names))
        if unknown:
            raise DataError(f"{test_path}: labels {unknown[:5]} do not occur in {path}")
        train_split = Split(data.sequences, np.array([names.index(label) for label in data.labels], np.int64))
        test_split = Split(test.sequences, np.array([names.index(label) for label in test.labels], np.int64))
    else:
        ids = np.array([names.index(label) for label in data.labels], np.int64)
        counts = np.bincount(ids, minlength=len(names))
        if counts.min() < 3:
            rare = names[int(counts.argmin())]
            raise DataError(
                f"{path}: class {rare!r} has {counts.min()} sequences; with no --test file each class needs at "
                "least 3 (training, validation and test)"
            )
        keep, held = stratified_split(ids, test_fraction, seed)
        train_split = Split([data.sequences[i] for i in keep], ids[keep])
        test_split = Split([data.sequences[i] for i in held], ids[held])
    counts = np.bincount(train_split.labels, minlength=len(names))
    if counts.min() < 2:
        raise DataError(
            f"{path}: class {names[int(counts.argmin())]!r} has fewer than 2 training sequences; "
            "a validation split needs 2"
        )
    width = len(data.feature_names)
    description = f"Trained on {Path(path).name}: {len(names)} classes, {width} feature{'s' * (width != 1)} per frame."
    return Dataset(Path(path).stem, names, train_split, test_split, data.feature_names, description)
