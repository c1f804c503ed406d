"""`lstm-serve` as an operator meets it: help, version, and one clear line for a mistake."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lstm_serve.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=None if env is None else {**os.environ, **env},
    )


@pytest.mark.parametrize("command", ["", "serve", "train", "export", "report", "bench"])
def test_every_help_exits_0_and_shows_defaults(command):
    result = run(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: lstm-serve" in result.stdout
    if command:
        assert "(default:" in result.stdout, f"lstm-serve {command} --help shows no defaults"


def test_serve_help_names_each_setting_its_default_and_its_variable():
    text = " ".join(run("serve", "--help").stdout.split())
    assert "--max-batch-size MAX_BATCH_SIZE sequences or session steps per onnxruntime call (default: 64)" in text
    assert "[LSTM_SERVE_MAX_BATCH_SIZE]" in text and "--redis-url" in text


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("lstm-serve ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["serve", "--max-batch-size", "0"],
            "bad settings: max_batch_size: Input should be greater than or equal to 1",
        ),
        (["serve", "--port", "http"], "bad settings: port: Input should be a valid integer"),
        (["serve", "--workers", "2"], "bad settings: workers=2 with the in-memory session store"),
        (["serve", "--model-repository", "/nowhere"], "model repository /nowhere does not exist"),
        (["serve", "--default-model", "nope"], "default model 'nope' is not in"),
        (["nope"], "invalid choice: 'nope'"),
        (["serve", "--admin-keys", "sha256:xyz"], "admin_keys: sha256: must be followed by 64 hex digits"),
        (["serve", "--redis-url", "http://x"], "Redis URL must specify one of the following schemes"),
        (["models", "--model-repository", "/nowhere"], "model repository /nowhere does not exist"),
        (["bench", "--url", "notaurl"], "'notaurl' needs a host and a port"),
        (["export", "--checkpoint", "README.md", "--repository", "/nonexistent/r"], "(UnpicklingError; LSTM_SERVE_"),
        (["export", "--name", "../up", "--repository", "/nonexistent/r"], "model name '../up': letters, digits"),
    ],
)
def test_a_mistake_is_one_line_on_stderr_and_a_nonzero_exit(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2  # argparse adds its usage line to its own errors


def test_lstm_serve_traceback_shows_where_a_one_line_error_came_from(tmp_path):
    assert "LSTM_SERVE_TRACEBACK=1" in run("--help").stdout
    args = ("models", "--model-repository", str(tmp_path / "nowhere"))
    one_line = run(*args)
    assert one_line.returncode == 2 and "Traceback" not in one_line.stderr
    assert "does not exist (RepositoryError; LSTM_SERVE_TRACEBACK=1 shows where)" in one_line.stderr
    traced = run(*args, env={"LSTM_SERVE_TRACEBACK": "1"})
    assert traced.returncode != 0 and "Traceback (most recent call last)" in traced.stderr
    assert "RepositoryError: model repository" in traced.stderr


def test_a_file_the_server_would_refuse_is_refused_by_the_local_commands_in_one_line(tmp_path):
    np.save(tmp_path / "nan.npy", np.full((3, 12), np.nan, np.float32))
    np.save(tmp_path / "empty.npy", np.zeros((0, 12), np.float32))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    for name, message in [
        ("nan.npy", "sequence 0 holds NaN or Inf"),
        ("empty.npy", "sequence 0 has no frames"),
        ("objects.npy", "not a numeric .npy array"),
        ("broken.npy", "not a numeric .npy array"),
    ]:
        result = run("classify", str(tmp_path / name))
        assert result.returncode == 2 and message in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cross_validation_over_too_few_sequences_says_so_in_one_line(tmp_path):
    """Two training sequences a class and 5 folds made an empty fold: an IndexError about array indices."""
    rows = ["sequence_id,t,a,b,label"]
    for n in range(6):
        rows += [f"s{n},{t},{n + t * 0.5},{t - n},{'xy'[n % 2]}" for t in range(4)]
    (tmp_path / "few.csv").write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "run")
    result = run("train", "--data", str(tmp_path / "few.csv"), "--select", "lr=0.01,0.001", "--out-dir", out)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "5-fold cross-validation needs at least 10 training sequences" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "--epochs 0: must be at least 1"),  # was an AssertionError, "no epoch was trained"
        (["--ensemble", "0"], "--ensemble 0: must be at least 1"),  # an IndexError
        (["--folds", "1"], "--folds 1: must be at least 2"),  # "need at least one array to concatenate"
        (["--val-fraction", "1.5"], "--val-fraction 1.5: must be between 0 and 1"),
    ],
)
def test_a_training_setting_out_of_its_range_is_one_line(args, message, capsys):
    """In this process: `lstm-serve train` reads its flags before it trains anything."""
    from lstm_serve.cli import train_config

    with pytest.raises(SystemExit) as stopped:
        train_config(args)
    assert stopped.value.code == 2 and capsys.readouterr().err == f"lstm-serve train: {message}\n"
