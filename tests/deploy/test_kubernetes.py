"""The Kubernetes manifests (deploy/kubernetes), checked offline: every object validates strictly against
the Kubernetes schemas (kubernetes-validate ships them), and they agree with the settings the service
reads, the routes it serves and the image it runs in."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from lstm_serve.settings import Settings
from tests.conftest import ROOT

FOLDER = ROOT / "deploy" / "kubernetes"
KUBERNETES = "1.33"  # a version kubernetes-validate ships the schemas of


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((FOLDER / "kustomization.yaml").read_text())


def objects() -> list[dict[str, Any]]:
    found = []
    for name in kustomization()["resources"]:
        found += [doc for doc in yaml.safe_load_all((FOLDER / name).read_text()) if doc]
    return found


def generated_secret() -> dict[str, Any]:
    """The Secret the kustomization's secretGenerator makes (its data filled in by kustomize)."""
    (generator,) = kustomization()["secretGenerator"]
    keys = [entry.split("=", 1)[0] for entry in generator["files"]]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": generator["name"]},
        "data": dict.fromkeys(keys, ""),
    }


def find(kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name)


def serve_container() -> dict[str, Any]:
    (container,) = find("Deployment", "lstm-serve")["spec"]["template"]["spec"]["containers"]
    return container


def environment() -> dict[str, str]:
    return {e["name"]: e["value"] for e in serve_container()["env"]}


def settings() -> Settings:
    env = environment()
    fields = {name.removeprefix("LSTM_SERVE_").lower(): value for name, value in env.items()}
    fields.pop("api_keys_file")  # the Secret's file exists only in the pod
    return Settings(**fields, workers=1)


@pytest.mark.parametrize("index", range(len(objects()) + 1))
def test_every_object_validates_strictly_against_the_kubernetes_schemas(index):
    document = [*objects(), generated_secret()][index]
    kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_a_misspelt_field_fails_the_validation():
    broken = find("Deployment", "lstm-serve")
    broken["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_the_kustomization_lists_every_manifest_in_the_folder():
    listed = set(kustomization()["resources"])
    assert listed == {p.name for p in FOLDER.glob("*.yaml")} - {"kustomization.yaml"}


def test_the_environment_names_only_settings_and_builds_valid_settings():
    for name in environment():
        assert name.startswith("LSTM_SERVE_") and name.removeprefix("LSTM_SERVE_").lower() in Settings.model_fields
    assert settings().redis_url, "several replicas share sessions only through Redis"
    assert int(find("Deployment", "lstm-serve")["spec"]["replicas"]) >= 2


def test_the_probes_hit_public_health_routes_on_the_served_port():
    from lstm_serve.http.app import create_app

    public = {route.path for route in create_app().table.routes if route.public and route.method == "GET"}
    container = serve_container()
    (port,) = container["ports"]
    assert port["containerPort"] == settings().port
    probes = {kind: container[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["path"] in public and probe["port"] == port["name"]


def test_the_grace_period_covers_the_pre_stop_delay_the_drain_and_the_shutdown():
    pod = find("Deployment", "lstm-serve")["spec"]["template"]["spec"]
    command = serve_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    configured = settings()
    needed = float(command[1]) + configured.drain_delay_s + configured.shutdown_timeout_s
    assert pod["terminationGracePeriodSeconds"] > needed
    assert pod["terminationGracePeriodSeconds"] > configured.shutdown_timeout_s


def test_service_budget_and_autoscaler_select_the_deployment():
    deployment = find("Deployment", "lstm-serve")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert find("Service", "lstm-serve")["spec"]["selector"].items() <= labels.items()
    assert find("PodDisruptionBudget", "lstm-serve")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = find("HorizontalPodAutoscaler", "lstm-serve")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "lstm-serve")
    assert "cpu" in serve_container()["resources"]["requests"], "the autoscaler's utilisation needs a CPU request"
    service_port = find("Service", "lstm-serve")["spec"]["ports"][0]
    assert service_port["targetPort"] == serve_container()["ports"][0]["name"]


def test_the_redis_url_names_the_redis_service_and_its_port():
    url = urlparse(settings().redis_url or "")
    service = find("Service", url.hostname or "")
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    redis = find("Deployment", url.hostname or "")
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()


def test_the_keys_come_from_the_generated_secret_where_the_service_reads_them():
    pod = find("Deployment", "lstm-serve")["spec"]["template"]["spec"]
    keys_file = Path(environment()["LSTM_SERVE_API_KEYS_FILE"])
    (mount,) = [m for m in serve_container()["volumeMounts"] if m["mountPath"] == str(keys_file.parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = generated_secret()
    assert volume["secret"]["secretName"] == secret["metadata"]["name"] and keys_file.name in secret["data"]
    # the image's user (Dockerfile: uid 10001) reads the file through its group: fsGroup and mode 0440
    assert "--uid 10001" in (ROOT / "Dockerfile").read_text()
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"] == 10001
    assert volume["secret"]["defaultMode"] & 0o040
    (generator,) = kustomization()["secretGenerator"]
    source = generator["files"][0].split("=", 1)[1]
    assert (FOLDER / source).parent.name == "secrets"
    assert "deploy/kubernetes/secrets/" in (ROOT / ".gitignore").read_text(), "keys must never be committed"


def test_the_pods_run_locked_down():
    for deployment in (find("Deployment", "lstm-serve"), find("Deployment", "lstm-serve-redis")):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            assert "memory" in container["resources"]["limits"]
