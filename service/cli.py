"""`lstm-serve`: one command line for operators and callers: serve, train, export, report, bench; classify,
stream, models (callers.py).

Training, export and the report need the `train` extra (torch); they are imported only when asked for,
so the serving image, which carries onnxruntime and no torch, runs `lstm-serve serve` unchanged.
A mistake on the command line (a bad setting, a missing repository) is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lstm_serve.settings import Settings


class HELP(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, also of options that have no help text of their own."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if not action.help and action.default is not argparse.SUPPRESS and action.option_strings:
            return "(default: %(default)s)"
        return super()._get_help_string(action) or ""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings:
            action.help = self._get_help_string(action)
        return super()._format_action(action)


def package_version() -> str:
    try:
        return version("lstm-serve")
    except PackageNotFoundError:
        return "0+unknown"


def fail(command: str, message: str) -> None:
    """One clear line and exit status 2, the status argparse gives a bad argument."""
    print(f"lstm-serve {command}: {message}", file=sys.stderr)
    raise SystemExit(2)


def has_torch(command: str, argv: Sequence[str]) -> bool:
    if importlib.util.find_spec("torch") is not None:  # looked up, not imported: serving never loads torch
        return True
    needs = f"lstm-serve {command} needs PyTorch: pip install 'lstm-serve[train]'"
    if "-h" in argv or "--help" in argv:
        print(f"usage: lstm-serve {command} [options]\n\n{needs}; its options are listed once it is installed.")
        raise SystemExit(0)
    fail(command, "needs PyTorch: pip install 'lstm-serve[train]'")
    return False


# -- serve -----------------------------------------------------------------------------------------
def settings_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "lstm-serve serve",
        description="Serve the model repository over HTTP. Every flag is also an LSTM_SERVE_* environment "
        "variable; flags win.",
        argument_default=argparse.SUPPRESS,  # a flag not given leaves the setting to its variable or default
    )
    for name, field in Settings.model_fields.items():
        flag, env = "--" + name.replace("_", "-"), f"LSTM_SERVE_{name.upper()}"
        default = "none" if field.default is None else field.default
        described = f"{field.description} (default: {default}) [{env}]"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=described)
        else:
            parser.add_argument(flag, dest=name, help=described)
    return parser


def describe_validation(error: ValidationError) -> str:
    problems = []
    for problem in error.errors(include_url=False):
        where = ".".join(map(str, problem["loc"]))
        message = problem["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def serve_settings(argv: Sequence[str]) -> Settings:
    given = vars(settings_parser().parse_args(argv))
    try:
        return Settings(**given)
    except ValidationError as error:
        fail("serve", f"bad settings: {describe_validation(error)}")
        raise  # unreachable: fail() exits


def check_servable(settings: Settings) -> None:
    """What would stop the start, said before it: a missing or broken repository, CUDA asked and absent,
    an unreadable key file."""
    from lstm_serve.core.access import KeyFileError, KeyRing
    from lstm_serve.core.repository import RepositoryError, load_repository
    from lstm_serve.core.runner import choose_providers

    try:
        entries = load_repository(settings.model_repository)
        choose_providers(settings.providers)
        KeyRing.from_settings(settings)
        KeyRing.admin_from_settings(settings)
    except (RepositoryError, RuntimeError, KeyFileError) as error:
        fail("serve", str(error))
        return
    if "default_model" in settings.model_fields_set and settings.default_model not in entries:
        fail(
            "serve",
            f"default model {settings.default_model!r} is not in {settings.model_repository} "
            f"(it has {', '.join(sorted(entries))})",
        )


def cmd_serve(argv: Sequence[str]) -> None:
    settings = serve_settings(argv)
    check_servable(settings)
    from lstm_serve.http.server import serve

    serve(settings)


# -- train, export, report, bench ----------------------------------------------------------------------
def add_dataclass_flags(parser: argparse.ArgumentParser, instance: Any, prefix: str = "") -> None:
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
            kind = str if value is None else type(value)  # an optional path or name: None unless given
            parser.add_argument(flag, dest=f"{prefix}{field.name}", type=kind, default=value)


def apply_flags(instance: Any, args: argparse.Namespace, prefix: str = "") -> Any:
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if dataclasses.is_dataclass(value):
            apply_flags(value, args, prefix=f"{prefix}{field.name}.")
        else:
            setattr(instance, field.name, getattr(args, f"{prefix}{field.name}"))
    return instance


def train_config(argv: Sequence[str]) -> tuple[Any, list[dict[str, Any]], int]:
    """Flags over the data set's recipe: `--dataset basic-motions` alone gives its batch size and epochs.
    Also the candidate recipes of --select (their cartesian product) and --folds."""
    from lstm_serve.model.train import TrainConfig, config_for

    dataset = argparse.ArgumentParser(add_help=False)
    dataset.add_argument("--dataset", default=TrainConfig().dataset)
    defaults = config_for(dataset.parse_known_args(argv)[0].dataset)
    parser = argparse.ArgumentParser(
        "lstm-serve train",
        description="Train a classifier on a bundled UEA data set (--dataset) or on your own file (--data, "
        "with --test for a test file; see the README's data formats).",
        formatter_class=HELP,
    )
    add_dataclass_flags(parser, defaults)
    parser.add_argument(
        "--select",
        action="append",
        default=[],
        metavar="FIELD=V1,V2",
        help="choose this training setting among the values by k-fold cross-validation on the training "
        "split (repeatable: every combination is a candidate); the test split is scored once, at the end",
    )
    parser.add_argument("--folds", type=int, default=5, help="folds of the cross-validation of --select")
    args = parser.parse_args(argv)
    cfg = apply_flags(defaults, args)
    for flag, value, allowed, say in (
        ("--epochs", cfg.epochs, cfg.epochs >= 1, "at least 1"),
        ("--batch-size", cfg.batch_size, cfg.batch_size >= 1, "at least 1"),
        ("--ensemble", cfg.ensemble, cfg.ensemble >= 1, "at least 1"),
        ("--threads", cfg.threads, cfg.threads >= 1, "at least 1"),
        ("--lr", cfg.lr, cfg.lr > 0, "above 0"),
        ("--test-fraction", cfg.test_fraction, 0 < cfg.test_fraction < 1, "between 0 and 1"),
        ("--val-fraction", cfg.val_fraction, 0 < cfg.val_fraction < 1, "between 0 and 1"),
        ("--crop", cfg.crop, 0 < cfg.crop <= 1, "above 0, at most 1"),
        ("--model.hidden-size", cfg.model.hidden_size, cfg.model.hidden_size >= 1, "at least 1"),
        ("--model.num-layers", cfg.model.num_layers, cfg.model.num_layers >= 1, "at least 1"),
        ("--model.dropout", cfg.model.dropout, 0 <= cfg.model.dropout < 1, "from 0, below 1"),
        ("--folds", args.folds, args.folds >= 2, "at least 2"),
    ):
        if not allowed:
            fail("train", f"{flag} {value}: must be {say}")
    return cfg, candidates(defaults, args.select), args.folds


def candidates(defaults: Any, selects: list[str]) -> list[dict[str, Any]]:
    import itertools

    choices = []
    for select in selects:
        name, _, values = select.partition("=")
        if not hasattr(defaults, name) or dataclasses.is_dataclass(getattr(defaults, name)) or not values:
            fail("train", f"--select {select!r}: expected FIELD=V1,V2 with FIELD a training setting")
        kind = type(getattr(defaults, name))
        parse = (lambda text: text.lower() in ("1", "true", "yes")) if kind is bool else kind
        try:
            choices.append([(name, parse(value)) for value in values.split(",")])
        except ValueError:
            fail("train", f"--select {select!r}: {name} takes {kind.__name__} values")
    return [dict(combination) for combination in itertools.product(*choices)] if choices else []


def cmd_train(argv: Sequence[str]) -> None:
    has_torch("train", argv)
    from lstm_serve.model.data import DataError
    from lstm_serve.model.train import train

    cfg, recipes, folds = train_config(argv)
    try:
        metrics = train(cfg, recipes, folds)
    except DataError as error:
        fail("train", str(error))
        return
    print(
        f"test accuracy {metrics['test_accuracy']:.4f} on {metrics['split']['test']} sequences, "
        f"{metrics['wall_time_s']} s; wrote {cfg.out_dir}/checkpoint.pt, metrics.json, training.png"
    )


def cmd_export(argv: Sequence[str]) -> None:
    has_torch("export", argv)
    parser = argparse.ArgumentParser(
        "lstm-serve export",
        description="A checkpoint of `lstm-serve train` (--checkpoint), or your own PyTorch module (--module, "
        "see the README's module contract) -> <repository>/<name>/<version>/.",
        formatter_class=HELP,
    )
    parser.add_argument("--checkpoint", default="runs/japanese-vowels/checkpoint.pt")
    parser.add_argument("--module", default=None, help="package.module:factory returning your torch.nn.Module")
    parser.add_argument(
        "--labels", default=None, help="with --module: the class names, comma-separated, in logit order"
    )
    parser.add_argument("--feature-names", default=None, help="with --module: what each number of a frame is")
    parser.add_argument("--input-dim", type=int, default=None, help="with --module: D, if no --feature-names")
    parser.add_argument("--description", default="", help="with --module: what the model tells apart")
    parser.add_argument(
        "--example-data",
        default=None,
        help="with --module: a .csv or .npz (README formats) of real sequences: checked for parity, and the "
        "first, with its label, is the example callers can try",
    )
    parser.add_argument("--repository", default="models", help="model repository folder")
    parser.add_argument("--name", default="japanese-vowels")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument(
        "--replace", action="store_true", help="overwrite <name>/<version> if it holds a model (never one served)"
    )
    parser.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the parity checks on the exported graph",
    )
    args = parser.parse_args(argv)
    if args.module is not None:
        export_user_module(args)
        return
    from lstm_serve.export.onnx_export import export_checkpoint
    from lstm_serve.export.parity import check_entry
    from lstm_serve.model.data import DataError

    report: list[str] = []

    def check(staged: Path) -> None:
        try:
            report.extend(check_entry(args.checkpoint, staged))
        except DataError as error:
            raise DataError(
                f"{error}: the check runs the checkpoint's test split, read from its training data "
                "(--no-check exports without it)"
            ) from None

    entry = export_checkpoint(
        args.checkpoint, args.repository, args.name, args.version, args.replace, check if args.check else None
    )
    print(f"wrote {entry}/model.onnx and config.json", *report, sep="\n")


def export_user_module(args: argparse.Namespace) -> None:
    import os

    from lstm_serve.export.user_module import ContractError, export_module, load_factory
    from lstm_serve.model.data import DataError, UserData, matching_features, read_user_data

    sys.path.insert(0, os.getcwd())  # the module is importable from the current folder, as with python -m
    if not args.labels:
        fail("export", "--module needs --labels (the class names, in logit order)")
    feature_names = [name.strip() for name in args.feature_names.split(",")] if args.feature_names else None
    sequences, example = [], None
    try:
        if args.example_data:  # real sequences, of any number of classes; the first, labelled, is the example
            data = read_user_data(args.example_data, training=False)
            if feature_names and data.named:  # matched by name, as train --test matches its file
                named = UserData(data.sequences, data.labels, feature_names)
                data = matching_features(data, named, args.example_data, "--feature-names")
            sequences = data.sequences[:8]
            if data.labels[0]:
                example = {"label": data.labels[0], "frames": data.sequences[0].tolist()}
            feature_names = feature_names or data.feature_names
        entry, report = export_module(
            load_factory(args.module),
            [label.strip() for label in args.labels.split(",")],
            args.repository,
            args.name,
            args.version,
            input_dim=args.input_dim,
            feature_names=feature_names,
            description=args.description,
            example=example,
            check_sequences=sequences,
            replace=args.replace,
        )
    except (ContractError, DataError) as error:
        fail("export", str(error))
        return
    print(f"wrote {entry}/model.onnx and config.json")
    for line in report:
        print(line)


def cmd_report(argv: Sequence[str]) -> None:
    has_torch("report", argv)
    from lstm_serve.export.report import ReportConfig, report

    parser = argparse.ArgumentParser(
        "lstm-serve report", description="Every cell on every data set, measured.", formatter_class=HELP
    )
    defaults = ReportConfig()
    parser.add_argument("--out-dir", default=defaults.out_dir)
    parser.add_argument("--datasets", nargs="*", default=defaults.datasets)
    parser.add_argument(
        "--data", nargs="+", default=[], help="your own .csv or .npz files (see the README), reported beside --datasets"
    )
    parser.add_argument("--cells", nargs="+", default=defaults.cells)
    for name in ("seeds", "hidden_size", "epochs", "gradient_steps", "workers", "latency_runs"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    args = vars(parser.parse_args(argv))
    args["datasets"] = [*args["datasets"], *(str(Path(path).resolve()) for path in args.pop("data"))]
    path = report(ReportConfig(**args))
    print(f"wrote {path} and its plots")


def cmd_bench(argv: Sequence[str]) -> None:
    from lstm_serve.bench.run import main

    main(list(argv))


def caller_command(name: str) -> Callable[[Sequence[str]], None]:
    def run(argv: Sequence[str]) -> None:
        from lstm_serve.callers import run as run_caller

        run_caller(name, argv, HELP)

    return run


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], None], str]] = {
    "serve": (cmd_serve, "serve the model repository over HTTP, WebSocket and the Open Inference Protocol"),
    "train": (cmd_train, "train a classifier (needs the train extra: torch)"),
    "export": (cmd_export, "export a checkpoint to the model repository as ONNX, with parity checks"),
    "report": (cmd_report, "measure every cell on every data set (models/REPORT.md)"),
    "bench": (cmd_bench, "benchmark a server against the afternoon baseline"),
    "classify": (caller_command("classify"), "classify the sequences in a file, here (onnxruntime) or on a server"),
    "stream": (caller_command("stream"), "stream a file's sequence through a session, printing each prediction"),
    "models": (caller_command("models"), "list the models, of the repository here or of a server"),
}


def top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "lstm-serve",
        description="Serve recurrent sequence classifiers: HTTP classification and stateful "
        "streaming sessions on onnxruntime.",
        epilog="`lstm-serve COMMAND --help` lists a command's options. An error is one line (exit code 2); "
        "LSTM_SERVE_TRACEBACK=1 shows its traceback instead.",
    )
    parser.add_argument("--version", action="version", version=f"lstm-serve {package_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        try:
            COMMANDS[argv[0]][0](argv[1:])
        except Exception as error:  # noqa: BLE001 - whatever went wrong, an operator reads one line
            if os.environ.get("LSTM_SERVE_TRACEBACK"):
                raise
            # a bad file, address or module named on the command line: one line, not a traceback
            said = next((line.strip() for line in str(error).splitlines() if line.strip()), "")[:300]
            fail(argv[0], f"{said} ({type(error).__name__}; LSTM_SERVE_TRACEBACK=1 shows where)")
        return
    parser = top_parser()
    parser.parse_args(argv)  # --help and --version exit here; an unknown command is an argparse error
    parser.print_help(sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
