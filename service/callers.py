"""`lstm-serve classify`, `stream` and `models`: the command line for callers.

Without --url, classify and models run onnxruntime in this process on the model repository (no server
needed); with --url they call a server through lstm_serve.client. A FILE is .npy ([T, D] or [N, T, D]),
.npz or .csv (the training data formats of the README), or .json (a list of [T, D] sequences, or
{"sequences": [...]}, or a model's example {"frames": [...]}).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from lstm_serve.client import Client, Prediction, ServerError
from lstm_serve.settings import DEFAULT_REPOSITORY, Settings


class InputError(ValueError):
    """A file that cannot be read as sequences; one line."""


@dataclass(frozen=True)
class SequencesFile:
    path: str
    sequences: list[np.ndarray]
    labels: list[str] | None  # their true labels, when the file has them
    feature_names: list[str] | None  # what each number of a frame is, when the file names its columns

    def in_order_of(self, model: str, wanted: Sequence[str]) -> list[np.ndarray]:
        """The frames with their numbers in the model's feature order, matched by name when the file and the
        model both name them (a CSV's columns in another order were fed as they stood)."""
        names = self.feature_names
        if not names or unnamed(wanted) or list(names) == list(wanted):
            return self.sequences
        if sorted(names) != sorted(wanted):
            raise InputError(
                f"{self.path}: its features {names[:6]} are not model {model!r}'s {list(wanted)[:6]} "
                "(columns are matched by name)"
            )
        order = [names.index(name) for name in wanted]
        return [sequence[:, order] for sequence in self.sequences]


def unnamed(features: Sequence[str]) -> bool:
    """A model exported without feature names lists f0, f1, ...: a file's columns then go by position."""
    return list(features) == [f"f{k}" for k in range(len(features))]


def read_sequences(path: str) -> SequencesFile:
    """The sequences in a file, each of one frame or more, every number finite (what the server refuses is
    refused here too, before any model runs)."""
    read = read_file(path)
    for i, sequence in enumerate(read.sequences):
        if len(sequence) == 0:
            raise InputError(f"{path}: sequence {i} has no frames")
        if not np.isfinite(sequence).all():
            raise InputError(f"{path}: sequence {i} holds NaN or Inf (or a value beyond float32)")
    return read


def read_file(path: str) -> SequencesFile:
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{path}: no such file")
    suffix = file.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(file).astype(np.float32)  # no pickles: an object array is refused
        except (ValueError, TypeError, OSError, EOFError) as error:
            raise InputError(f"{path}: not a numeric .npy array ({str(error)[:100]})") from None
        if array.ndim == 2:
            return SequencesFile(path, [array], None, None)
        if array.ndim == 3:
            return SequencesFile(path, list(array), None, None)
        raise InputError(f"{path}: a .npy must be [T, D] or [N, T, D]; it is {list(array.shape)}")
    if suffix in (".csv", ".npz"):
        from lstm_serve.model.data import DataError, read_user_data

        try:
            data = read_user_data(file, training=False)
        except DataError as error:
            raise InputError(str(error)) from None
        labels = data.labels if all(data.labels) else None
        return SequencesFile(path, data.sequences, labels, data.feature_names if data.named else None)
    if suffix == ".json":
        return SequencesFile(path, *json_sequences(path, json.loads(file.read_text())), None)
    raise InputError(f"{path}: expected .npy, .npz, .csv or .json")


def json_sequences(path: str, document: Any) -> tuple[list[np.ndarray], list[str] | None]:
    if isinstance(document, dict) and "frames" in document:  # a model's example
        return [np.asarray(document["frames"], np.float32)], [document["label"]] if "label" in document else None
    if isinstance(document, dict):
        document = document.get("sequences")
    try:
        sequences = [np.asarray(s, np.float32) for s in document]
    except (TypeError, ValueError):
        raise InputError(f"{path}: expected a list of [T, D] sequences") from None
    if not sequences or any(s.ndim != 2 for s in sequences):
        raise InputError(f"{path}: expected a list of [T, D] sequences")
    return sequences, None


def local_predictions(repository: Path, model: str | None, read: SequencesFile) -> list[Prediction]:
    """onnxruntime in this process, as the server would run it (one call per batch, zero state)."""
    from lstm_serve.core.repository import load_repository
    from lstm_serve.core.runner import Item, OnnxRunner

    entries = load_repository(repository)
    default = Settings.model_fields["default_model"].default  # as the server picks it
    name = model or (default if default in entries else next(iter(entries)))
    if name not in entries:
        raise InputError(f"no model {name!r} in {repository} (it has {', '.join(sorted(entries))})")
    entry = entries[name]
    sequences = read.in_order_of(name, entry.feature_names)
    if any(s.shape[1] != entry.input_dim for s in sequences):
        raise InputError(f"{name} takes {entry.input_dim} features per frame")
    outputs = OnnxRunner(entry, "cpu").run([Item(s, None) for s in sequences])
    return [
        Prediction(entry.labels[int(p.argmax())], int(p.argmax()), p.astype(np.float64))
        for p in (out.probabilities[-1] for out in outputs)
    ]


def print_predictions(predictions: list[Prediction], truths: list[str] | None, as_json: bool) -> None:
    rows = [
        {"sequence": i, "label": p.label, "class_id": p.class_id, "probability": float(p.probabilities[p.class_id])}
        | ({"true_label": truths[i]} if truths else {})
        for i, p in enumerate(predictions)
    ]
    if as_json:
        print(json.dumps(rows))
        return
    print(f"{'#':>4}  {'label':<20} {'p':>6}" + ("  true" if truths else ""))
    for row in rows:
        truth = f"  {row['true_label']}" if truths else ""
        print(f"{row['sequence']:>4}  {row['label']:<20} {row['probability']:6.3f}{truth}")


def common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="a server; without it, onnxruntime runs here")
    parser.add_argument("--api-key", default=None, help="the server's API key (or LSTM_SERVE_API_KEY)")
    parser.add_argument("--model-repository", default=str(DEFAULT_REPOSITORY), help="without --url: models to run")


def api_key(args: argparse.Namespace) -> str | None:
    import os

    return args.api_key or os.environ.get("LSTM_SERVE_API_KEY")


def classify(argv: Sequence[str], formatter: type[argparse.HelpFormatter]) -> None:
    parser = argparse.ArgumentParser(
        "lstm-serve classify", description="Classify the sequences in FILE.", formatter_class=formatter
    )
    parser.add_argument("file", help=".npy ([T, D] or [N, T, D]), .npz, .csv (README formats) or .json")
    parser.add_argument("--model", default=None, help="model name (the default model when not given)")
    parser.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    common(parser)
    args = parser.parse_args(argv)
    read = read_sequences(args.file)
    if args.url:
        with Client(args.url, api_key(args)) as client:
            model, sequences = args.model, read.sequences
            if read.feature_names:
                model, sequences = served_order(client, model, read)
            predictions = client.classify(sequences, model)
    else:
        predictions = local_predictions(Path(args.model_repository), args.model, read)
    print_predictions(predictions, read.labels, args.json)


def served_order(client: Client, model: str | None, read: SequencesFile) -> tuple[str | None, list[np.ndarray]]:
    """A file that names its features, in the order of the model that will run it: the one named; else the
    order of the served models whose features the file's are (the server's default model, which runs it, is
    not known here), when they agree on one."""
    if model is not None:
        return model, read.in_order_of(model, client.model(model).feature_names)
    described = client.models()
    names = sorted(read.feature_names or [])
    orders = {tuple(m.feature_names) for m in described if sorted(m.feature_names) == names}
    if len(orders) == 1:  # the server's default model decides, as without the names
        return None, read.in_order_of("the server's", list(orders.pop()))
    if not orders and all(not unnamed(m.feature_names) for m in described):
        raise InputError(f"{read.path}: no model on the server has its features {names[:6]}: name one with --model")
    return None, read.sequences  # models that name theirs in other orders, or not at all: by position


def stream(argv: Sequence[str], formatter: type[argparse.HelpFormatter]) -> None:
    parser = argparse.ArgumentParser(
        "lstm-serve stream",
        description="Stream the first sequence of FILE through a session, chunk by chunk, over the WebSocket; "
        "print the prediction after each chunk.",
        formatter_class=formatter,
    )
    parser.add_argument("file")
    parser.add_argument("--url", required=True)
    parser.add_argument("--api-key", default=None, help="the server's API key (or LSTM_SERVE_API_KEY)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--chunk", type=int, default=1, help="frames per message")
    args = parser.parse_args(argv)
    if args.chunk < 1:
        raise InputError("--chunk must be at least 1")
    read = read_sequences(args.file)
    with Client(args.url, api_key(args)) as client, client.session(args.model) as session:
        named = client.model(session.model).feature_names if read.feature_names else []  # a round trip only then
        frames = read.in_order_of(session.model, named)[0]
        if session.input_dim is not None and frames.shape[1] != session.input_dim:  # binary frames carry no width
            raise InputError(
                f"{read.path}: {frames.shape[1]} features per frame; {session.model} takes {session.input_dim}"
            )
        chunks = [frames[i : i + args.chunk] for i in range(0, len(frames), args.chunk)]
        for prediction in session.stream(chunks):
            p = prediction.probabilities[prediction.class_id]
            print(f"frames {session.steps:>5}  {prediction.label:<20} {p:6.3f}", flush=True)
    if read.labels:
        print(f"true label: {read.labels[0]}")


def models(argv: Sequence[str], formatter: type[argparse.HelpFormatter]) -> None:
    parser = argparse.ArgumentParser("lstm-serve models", description="List the models.", formatter_class=formatter)
    parser.add_argument("--json", action="store_true")
    common(parser)
    args = parser.parse_args(argv)
    if args.url:
        with Client(args.url, api_key(args)) as client:
            described = [vars(m) | {"example": None} for m in client.models()]
    else:
        from lstm_serve.core.repository import load_repository

        entries = load_repository(Path(args.model_repository))
        described = [
            {"name": e.name, "version": e.version, "labels": e.labels, "input_dim": e.input_dim,
             "feature_names": e.feature_names, "description": e.description}
            for e in entries.values()
        ]  # fmt: skip
    if args.json:
        print(json.dumps(described))
        return
    for m in described:
        print(
            f"{m['name']} v{m['version']}: {m['input_dim']} features -> {len(m['labels'])} classes. {m['description']}"
        )


def run(command: str, argv: Sequence[str], formatter: type[argparse.HelpFormatter]) -> None:
    """Run a caller command; a bad file or a server's refusal is one line on stderr and exit 2."""
    try:
        {"classify": classify, "stream": stream, "models": models}[command](argv, formatter)
    except (InputError, ServerError) as error:
        print(f"lstm-serve {command}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (OSError, httpx.TransportError) as error:  # the server cannot be reached
        print(f"lstm-serve {command}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
