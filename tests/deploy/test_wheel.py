"""The built wheel, installed into a fresh virtual environment, serves the shipped models from any folder,
and claims no generic top-level names in site-packages."""

import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, ServerProcess, free_port


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("lstm_serve-*.whl")
    return built


def test_the_wheel_holds_one_top_level_package_and_the_shipped_models(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"lstm_serve"}
    for model in ("japanese-vowels", "basic-motions"):
        assert {f"lstm_serve/models/{model}/1/model.onnx", f"lstm_serve/models/{model}/1/config.json"} <= set(names)
    assert not any("/training/" in name or name.endswith(".pt") for name in names), "training runs do not ship"


def test_the_installed_wheel_serves_from_any_folder(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # the runtime dependencies, already installed here, are made visible without installing them again
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    installed = {p.name for p in Path(purelib).iterdir()}
    assert "lstm_serve" in installed and not {"model", "service", "export", "models"} & installed

    cli = env_dir / "bin" / "lstm-serve"
    assert subprocess.run([cli, "--version"], capture_output=True, text=True).stdout.startswith("lstm-serve ")
    port = free_port()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSTM_SERVE_")} | {"LSTM_SERVE_DRAIN_DELAY_S": "0"}
    proc = subprocess.Popen(
        [cli, "serve", "--port", str(port)], cwd=elsewhere, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    server = ServerProcess.attach(proc, port)
    try:
        server.wait_ready()
        models = httpx.get(f"{server.url}/v1/models").json()
        assert {m["name"] for m in models} == {"japanese-vowels", "basic-motions"}
        example = next(m for m in models if m["name"] == "japanese-vowels")["example"]
        answer = httpx.post(f"{server.url}/v1/classify", json={"sequences": [example["frames"]]}).json()
        assert answer["predictions"][0]["label"] == example["label"]
        loaded_from = subprocess.run(
            [python, "-c", "import lstm_serve; print(lstm_serve.__file__)"],
            cwd=elsewhere,
            capture_output=True,
            text=True,
        ).stdout
        assert loaded_from.startswith(purelib), loaded_from  # the installed copy, not the repository
    finally:
        server.stop()
