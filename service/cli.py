"""`lstm-serve` — one command line: train, export, report, serve, bench.

Training and export need the `train` extra (torch); they are imported only when asked for, so the
serving image, which carries onnxruntime and no torch, runs `lstm-serve serve` unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from collections.abc import Sequence


def needs_torch(command: str) -> None:
    if importlib.util.find_spec("torch") is None:  # looked up, not imported: serving never loads torch
        sys.exit(f"lstm-serve {command} needs PyTorch: pip install 'lstm-serve[train]'")


def add_dataclass_flags(parser: argparse.ArgumentParser, instance, prefix: str = "") -> None:
    """One --flag per field of a (nested) config dataclass, its default taken from the instance."""
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if dataclasses.is_dataclass(value):
            add_dataclass_flags(parser, value, prefix=f"{prefix}{field.name}.")
            continue
        flag = f"--{prefix}{field.name}".replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(
                flag, dest=f"{prefix}{field.name}", action=argparse.BooleanOptionalAction, default=value
            )
        else:
            parser.add_argument(
                flag, dest=f"{prefix}{field.name}", type=type(value), default=value, help=f"(default: {value})"
            )


def apply_flags(instance, args: argparse.Namespace, prefix: str = ""):
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if dataclasses.is_dataclass(value):
            apply_flags(value, args, prefix=f"{prefix}{field.name}.")
        else:
            setattr(instance, field.name, getattr(args, f"{prefix}{field.name}"))
    return instance


def train_config(argv: Sequence[str]):
    """Flags over the data set's recipe: `--dataset basic-motions` alone gives its batch size and epochs."""
    from lstm_serve.model.train import TrainConfig, config_for

    dataset = argparse.ArgumentParser(add_help=False)
    dataset.add_argument("--dataset", default=TrainConfig().dataset)
    defaults = config_for(dataset.parse_known_args(argv)[0].dataset)
    parser = argparse.ArgumentParser("lstm-serve train", description="Train a classifier on a UEA data set.")
    add_dataclass_flags(parser, defaults)
    return apply_flags(defaults, parser.parse_args(argv))


def cmd_train(argv: Sequence[str]) -> None:
    needs_torch("train")
    from lstm_serve.model.train import train

    cfg = train_config(argv)
    metrics = train(cfg)
    print(
        f"test accuracy {metrics['test_accuracy']:.4f} on {metrics['split']['test']} sequences, "
        f"{metrics['wall_time_s']} s; wrote {cfg.out_dir}/checkpoint.pt, metrics.json, training.png"
    )


def cmd_export(argv: Sequence[str]) -> None:
    needs_torch("export")
    from lstm_serve.export.onnx_export import export_checkpoint

    parser = argparse.ArgumentParser("lstm-serve export", description="Checkpoint -> models/<name>/<version>/.")
    parser.add_argument("--checkpoint", default="runs/japanese-vowels/checkpoint.pt")
    parser.add_argument("--repository", default="models", help="model repository folder")
    parser.add_argument("--name", default="japanese-vowels")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the parity checks on the exported graph",
    )
    args = parser.parse_args(argv)
    entry = export_checkpoint(args.checkpoint, args.repository, args.name, args.version)
    print(f"wrote {entry}/model.onnx and config.json")
    if args.check:
        from lstm_serve.export.parity import check_entry

        for line in check_entry(args.checkpoint, entry):
            print(line)


def cmd_report(argv: Sequence[str]) -> None:
    needs_torch("report")
    from lstm_serve.export.report import ReportConfig, report

    parser = argparse.ArgumentParser("lstm-serve report", description="Every cell on every data set, measured.")
    defaults = ReportConfig()
    parser.add_argument("--out-dir", default=defaults.out_dir)
    parser.add_argument("--datasets", nargs="+", default=defaults.datasets)
    parser.add_argument("--cells", nargs="+", default=defaults.cells)
    for name in ("seeds", "hidden_size", "epochs", "gradient_steps", "workers", "latency_runs"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    path = report(ReportConfig(**vars(parser.parse_args(argv))))
    print(f"wrote {path} and its plots")


def cmd_serve(argv: Sequence[str]) -> None:
    from lstm_serve.http.server import main

    main(argv)


def cmd_bench(argv: Sequence[str]) -> None:
    from lstm_serve.bench.run import main

    main(list(argv))


COMMANDS = {"train": cmd_train, "export": cmd_export, "report": cmd_report, "serve": cmd_serve, "bench": cmd_bench}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        sys.exit(f"usage: lstm-serve {{{names}}} [options]   (lstm-serve COMMAND --help for its options)")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
