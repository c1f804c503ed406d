"""Fixtures for the whole suite: the shipped model, small trained runs, and real servers (`lstm-serve serve`
in a subprocess on a free loopback port) and private redis-servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from lstm_serve.model.data import load_dataset

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    @classmethod
    def attach(cls, proc: subprocess.Popen, port: int) -> ServerProcess:
        """A server some other way started (another executable, another folder)."""
        server = cls.__new__(cls)
        server.port, server.url, server.proc = port, f"http://127.0.0.1:{port}", proc
        server.log = tempfile.NamedTemporaryFile(prefix="lstm-serve-", suffix=".log")  # noqa: SIM115 - closed in stop()
        return server

    def __init__(
        self, *flags: str, env: dict[str, str] | None = None, pipe: bool = False, prefix: tuple[str, ...] = ()
    ) -> None:
        """The server's output goes to a file (read it with output()): a pipe nobody reads fills after
        64 KB of log lines and then blocks the server. `pipe` gives a pipe, for tests of the pipe itself;
        `prefix` runs the server under another command (setpriv, to drop root's powers)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="lstm-serve-", suffix=".log")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "lstm_serve.cli", "serve", "--port", str(self.port), *flags],
            # no drain delay unless a test asks for one: every server the suite stops would wait it out
            cwd=ROOT,
            env={**os.environ, "LSTM_SERVE_DRAIN_DELAY_S": "0", **(env or {})},
            stdout=subprocess.PIPE if pipe else self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        """What the server has written to stdout and stderr so far."""
        if self.log.closed:
            return self.final_output
        with open(self.log.name, errors="replace") as log:
            return log.read()

    def wait_ready(self, timeout: float = 60) -> ServerProcess:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server on {self.url} not ready after {timeout} s")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.final_output = self.output()
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def start_server():
    """Start servers with custom flags; all are stopped after the test."""
    started: list[ServerProcess] = []

    def start(
        *flags: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
        pipe: bool = False,
        prefix: tuple[str, ...] = (),
    ) -> ServerProcess:
        server = ServerProcess(*flags, env=env, pipe=pipe, prefix=prefix)
        started.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server():
    """The default server: shipped model repository, in-memory sessions, CPU."""
    process = ServerProcess("--max-queue-delay-ms", "2").wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def test_sequences() -> list[np.ndarray]:
    return load_dataset("japanese-vowels").test.sequences


class RedisProcess:
    """A private redis-server on a free loopback port (never the machine's shared one)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisProcess:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 10
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def redis_server():
    process = RedisProcess().start()
    yield process
    process.stop()


def copy_model(repository: Path, name: str = "japanese-vowels") -> Path:
    """A model repository of one shipped model's version 1, to change under a running server."""
    import shutil

    shutil.copytree(ROOT / "models" / name / "1", repository / name / "1")
    return repository


def add_version(repository: Path, version: int, name: str = "japanese-vowels", shift: float = 0.7) -> Path:
    """Version `version` of a model: version 1's graph with the classifier head's bias moved by a fixed random
    vector, so the same contract gives other probabilities. Its config.json carries the new sha256."""
    import hashlib
    import json

    import onnx
    from onnx import numpy_helper

    source, target = repository / name / "1", repository / name / str(version)
    graph = onnx.load(source / "model.onnx")
    for k, tensor in enumerate(graph.graph.initializer):
        if tensor.name.endswith("head.bias"):
            bias = numpy_helper.to_array(tensor)
            moved = bias + shift * np.random.default_rng(version).standard_normal(bias.shape).astype(bias.dtype)
            graph.graph.initializer[k].CopyFrom(numpy_helper.from_array(moved, tensor.name))
    target.mkdir(parents=True)
    onnx.save(graph, target / "model.onnx")
    config = json.loads((source / "config.json").read_text())
    config.update(version=version, sha256=hashlib.sha256((target / "model.onnx").read_bytes()).hexdigest())
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target
