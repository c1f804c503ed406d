"""The Kubernetes manifests (deploy/kubernetes), checked offline: every object validates strictly against
the Kubernetes schemas (kubernetes-validate ships them; an unknown field fails), and they agree with the
settings the service reads, the routes it serves, the image it runs in and its shutdown sequence."""

from __future__ import annotations

import base64
import re
import shutil
import stat
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from lstm_serve.http.app import route_table
from lstm_serve.http.docs import Documents
from lstm_serve.settings import Settings
from tests.conftest import ROOT

Object = dict[str, Any]

FOLDER = ROOT / "deploy" / "kubernetes"
# the oldest Kubernetes these files are meant for, and the newest whose schemas kubernetes-validate ships
KUBERNETES = ["1.30", "1.37"]
KUSTOMIZATION: Object = yaml.safe_load((FOLDER / "kustomization.yaml").read_text())
(GENERATOR,) = KUSTOMIZATION["secretGenerator"]
COMPOSE_ENV: dict[str, str] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["lstm-serve"][
    "environment"
]
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "kb": 2**10, "mb": 2**20, "gb": 2**30}  # Kubernetes, Redis


def objects() -> list[Object]:
    """Every document of every manifest the kustomization lists (a fresh copy: tests may change it)."""
    found = []
    for name in KUSTOMIZATION["resources"]:
        found += [doc for doc in yaml.safe_load_all((FOLDER / name).read_text()) if doc]
    return found


def find(kind: str, name: str) -> Object:
    (found,) = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


SERVE = find("Deployment", "lstm-serve")
REDIS = find("Deployment", "lstm-serve-redis")


def pod(deployment: Object) -> Object:
    return deployment["spec"]["template"]["spec"]


def pod_labels(deployment: Object) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def container(deployment: Object) -> Object:
    (only,) = pod(deployment)["containers"]
    return only


def environment() -> dict[str, str]:
    return {var["name"]: var["value"] for var in container(SERVE)["env"]}


class PodSettings(Settings):
    """Settings from the values given only: the pod has the manifest's environment, not this process's."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource, **others: Any
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def settings() -> Settings:
    """The settings the server builds from the manifest's environment (the values validate; the rest are
    the defaults)."""
    return PodSettings(**{k.removeprefix("LSTM_SERVE_").lower(): v for k, v in environment().items()})


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def container_port(deployment: Object, port: int | str) -> int:
    """A probe's or a Service's target port (a number, or the name of a container port) as a number."""
    named = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    return named[port] if isinstance(port, str) else port


def secret_volume(deployment: Object) -> Object:
    (volume,) = [v for v in pod(deployment)["volumes"] if "secret" in v]
    return volume


def generated_key() -> str:
    """The key of the generated Secret: `key=path`, or the file's name."""
    (entry,) = GENERATOR["files"]
    return entry.split("=", 1)[0] if "=" in entry else PurePosixPath(entry).name


def generated_secret() -> Object:
    """The Secret the secretGenerator makes, with a placeholder key (kustomize appends a hash to its name)."""
    placeholder = base64.b64encode(b"placeholder-key-0123456789\n").decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": GENERATOR.get("type", "Opaque"),
        "metadata": {"name": GENERATOR["name"]},
        "data": {generated_key(): placeholder},
    }


def image_uid() -> int:
    runtime = (ROOT / "Dockerfile").read_text().split("AS runtime", 1)[1]
    found = re.search(r"^USER (\d+)$", runtime, re.M)
    assert found, "the Dockerfile's runtime stage names no numeric USER"
    return int(found[1])


def readable(mode: int, uid: int, groups: set[int], owner: int, group: int) -> bool:
    """Whether a process of this uid and these groups may read a file of this mode, owner and group."""
    return (
        uid == 0
        or (uid == owner and bool(mode & stat.S_IRUSR))
        or (group in groups and bool(mode & stat.S_IRGRP))
        or bool(mode & stat.S_IROTH)
    )


def size(quantity: str) -> int:
    """A memory size in bytes: Kubernetes' 512Mi, 1Gi or Redis' 768mb."""
    found = re.fullmatch(r"(\d+)([KMG]i|[kmg]b)", quantity)
    assert found, f"{quantity!r}: give it in Ki/Mi/Gi (Kubernetes) or kb/mb/gb (Redis, powers of 1024)"
    return int(found[1]) * UNITS[found[2]]


def validate(obj: Object, version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        where = ".".join(str(part) for part in error.path)
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {where}: {error.message} (Kubernetes {version})")


def kustomize(folder: Path) -> subprocess.CompletedProcess[str]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "no kubectl (kustomize is built in): make test installs it (apt-get install kubectl)"
    return subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)


# -- valid Kubernetes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES)
@pytest.mark.parametrize(
    "index", range(len(objects()) + 1), ids=[f"{o['kind']}-{o['metadata']['name']}" for o in objects()] + ["Secret"]
)
def test_every_object_validates_strictly_against_the_kubernetes_schemas(index, version):
    validate([*objects(), generated_secret()][index], version)


def test_a_misspelt_field_fails_the_validation():
    broken = find("Deployment", "lstm-serve")
    broken["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES[0], strict=True)


def test_the_kustomization_lists_every_manifest_in_the_folder():
    listed = KUSTOMIZATION["resources"]
    assert sorted(listed) == sorted({p.name for p in FOLDER.glob("*.y*ml")} - {"kustomization.yaml"})


def test_kustomize_refuses_to_build_without_keys_and_rolls_the_pods_on_new_ones(tmp_path):
    folder = tmp_path / "kubernetes"
    shutil.copytree(FOLDER, folder, ignore=shutil.ignore_patterns("secrets"))  # never an operator's real keys
    refused = kustomize(folder)
    assert refused.returncode != 0 and "secrets/api_keys" in refused.stderr, "it must not deploy without keys"
    (folder / "secrets").mkdir()
    (folder / "secrets" / "api_keys").write_text("placeholder-key-0123456789\n")
    built = [doc for doc in yaml.safe_load_all(kustomize(folder).stdout) if doc]
    (secret,) = [o for o in built if o["kind"] == "Secret"]
    assert secret["metadata"]["name"].startswith(f"{GENERATOR['name']}-"), "the name carries the keys' hash"
    (deployment,) = [o for o in built if o["kind"] == "Deployment" and o["metadata"]["name"] == "lstm-serve"]
    assert secret_volume(deployment)["secret"]["secretName"] == secret["metadata"]["name"]
    for obj in built:
        validate(obj, KUBERNETES[-1])
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "lstm-serve"


# -- the settings --------------------------------------------------------------------------------------------


def test_the_environment_names_only_settings_and_builds_valid_settings():
    known = {f"LSTM_SERVE_{name.upper()}" for name in Settings.model_fields}
    assert set(environment()) <= known, f"unknown variables {set(environment()) - known}"
    assert settings().host == "0.0.0.0", "a pod must listen on its own address, not on loopback"


def test_the_environment_is_the_compose_files_but_for_the_redis_host_and_the_proxy_it_trusts():
    """The compose file's nginx sets X-Forwarded-For, so the replicas it alone reaches trust it ("*"); pods behind a
    Service are reached by any client, and with "*" any client could name its own address."""
    env = environment()
    assert env.get("LSTM_SERVE_FORWARDED_ALLOW_IPS", "127.0.0.1") != "*"
    only_compose = set(COMPOSE_ENV) - set(env) - {"LSTM_SERVE_FORWARDED_ALLOW_IPS"}
    assert not only_compose, f"set in docker-compose.yml only: {only_compose}"
    differ = {name for name, value in COMPOSE_ENV.items() if name in env and env[name] != str(value)}
    assert differ == {"LSTM_SERVE_REDIS_URL"}, f"values differ from docker-compose.yml: {differ}"


def test_service_links_are_off_as_the_services_would_set_lstm_serve_variables():
    """Kubernetes gives each container <SERVICE>_PORT=tcp://ip:port, <SERVICE>_SERVICE_HOST, ... for every
    Service in the namespace: the Service lstm-serve would set LSTM_SERVE_PORT, the port the server binds."""
    fields = {f"LSTM_SERVE_{name.upper()}" for name in Settings.model_fields}
    links = set()
    for service in [o for o in objects() if o["kind"] == "Service"]:
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        links |= {f"{prefix}_PORT", f"{prefix}_SERVICE_HOST", f"{prefix}_SERVICE_PORT"}
    assert links & fields, "no collision left (a Service was renamed?): this test may go"
    assert pod(SERVE)["enableServiceLinks"] is False


def test_several_replicas_share_sessions_through_redis():
    assert find("HorizontalPodAutoscaler", "lstm-serve")["spec"]["minReplicas"] >= 2
    assert "replicas" not in SERVE["spec"], "the autoscaler owns the count: `kubectl apply` would reset it"
    assert settings().redis_url, "several replicas share sessions only through Redis"


# -- probes and shutdown -------------------------------------------------------------------------------------


def test_the_probes_hit_public_health_routes_on_the_served_port():
    table = route_table(Documents(lambda: table))
    main = container(SERVE)
    assert container_port(SERVE, "http") == settings().port
    probes = {kind: main[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz", "liveness must not fail (and restart pods) with Redis"
    assert probes["readinessProbe"]["path"] == "/readyz", "readiness must turn 503 while draining"
    for kind, probe in probes.items():
        route = table.match("GET", probe["path"]).route
        assert route is not None and route.public, f"{kind}: {probe['path']} is not a public route"
        assert container_port(SERVE, probe["port"]) == settings().port, kind


def test_the_grace_period_covers_the_pre_stop_delay_the_drain_and_the_shutdown():
    command = container(SERVE)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop, configured = float(command[1]), settings()
    assert pre_stop >= 3, "the endpoint's removal takes a few seconds to reach kube-proxy and the ingress"
    needed = pre_stop + configured.drain_delay_s + configured.shutdown_timeout_s
    assert pod(SERVE)["terminationGracePeriodSeconds"] > needed


# -- the objects fit together --------------------------------------------------------------------------------


def test_service_budget_and_autoscaler_select_the_deployment():
    labels, redis = pod_labels(SERVE), pod_labels(REDIS)
    assert selects(SERVE["spec"]["selector"]["matchLabels"], labels)
    service = find("Service", "lstm-serve")
    for selector in (
        service["spec"]["selector"],
        find("PodDisruptionBudget", "lstm-serve")["spec"]["selector"]["matchLabels"],
    ):
        assert selects(selector, labels) and not selects(selector, redis)
    assert "sessionAffinity" not in service["spec"], "any replica serves any session"
    assert container_port(SERVE, service["spec"]["ports"][0]["targetPort"]) == settings().port
    target = find("HorizontalPodAutoscaler", "lstm-serve")["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "lstm-serve")
    (spread,) = pod(SERVE)["topologySpreadConstraints"]
    assert selects(spread["labelSelector"]["matchLabels"], labels)


def test_the_redis_url_names_the_redis_service_and_its_port():
    url = urlsplit(settings().redis_url or "")
    service = find("Service", url.hostname or "")
    (port,) = service["spec"]["ports"]
    assert (url.scheme, url.port) == ("redis", port["port"])
    assert selects(service["spec"]["selector"], pod_labels(REDIS))
    assert container_port(REDIS, port["targetPort"]) == 6379


def test_redis_is_one_pod_replaced_not_rolled_and_full_before_its_memory_limit():
    assert REDIS["spec"]["replicas"] == 1
    assert REDIS["spec"]["strategy"]["type"] == "Recreate", "two Redis pods behind one Service split sessions"
    redis = container(REDIS)
    assert redis["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]
    args = redis["args"]
    assert args[0] == "redis-server"
    option = dict(zip(args[1::2], args[2::2], strict=True))
    assert option["--save"] == "" and option["--appendonly"] == "no", "like docker-compose.yml: memory only"
    assert option["--maxmemory-policy"] == "noeviction", "eviction would drop live sessions silently"
    assert size(option["--maxmemory"]) < size(redis["resources"]["limits"]["memory"]), "an OOM kill loses all"


def test_only_the_server_pods_may_reach_redis():
    policy = find("NetworkPolicy", "lstm-serve-redis")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], pod_labels(REDIS))
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    assert selects(source["podSelector"]["matchLabels"], pod_labels(SERVE))
    assert not selects(source["podSelector"]["matchLabels"], pod_labels(REDIS))
    assert [p["port"] for p in rule["ports"]] == [container_port(REDIS, "redis")]


# -- keys and privileges -------------------------------------------------------------------------------------


def test_the_keys_come_from_the_generated_secret_where_the_service_reads_them():
    keys_file = PurePosixPath(environment()["LSTM_SERVE_API_KEYS_FILE"])
    volume = secret_volume(SERVE)
    assert volume["secret"]["secretName"] == GENERATOR["name"]
    (mount,) = [m for m in container(SERVE)["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == str(keys_file.parent) and mount["readOnly"] is True
    assert "items" not in volume["secret"] and generated_key() == keys_file.name
    assert not [o for o in objects() if o["kind"] == "Secret"], "keys must never be committed in a manifest"


def test_the_image_user_and_nobody_else_can_read_the_key_file():
    security = pod(SERVE)["securityContext"]
    uid = container(SERVE)["securityContext"].get("runAsUser", security["runAsUser"])
    assert uid == image_uid()
    mode = secret_volume(SERVE)["secret"]["defaultMode"]
    assert mode in (0o400, 0o440), oct(mode)
    # a Secret's files belong to root, and to the fsGroup where there is one, which the pod's processes join
    fs_group = security.get("fsGroup")
    groups = {security.get("runAsGroup", 0), *security.get("supplementalGroups", [])}
    if fs_group is not None:
        groups.add(fs_group)
    assert readable(mode, uid, groups, owner=0, group=0 if fs_group is None else fs_group)


def test_the_key_file_kustomize_reads_is_ignored_by_git():
    git = shutil.which("git")
    assert git and (ROOT / ".git").exists(), "the suite runs in a git checkout (CI clones main)"
    (entry,) = GENERATOR["files"]
    path = (FOLDER / entry.split("=", 1)[-1]).relative_to(ROOT)
    ignored = subprocess.run([git, "check-ignore", "-q", "--no-index", str(path)], cwd=ROOT)
    assert ignored.returncode == 0, f"{path} holds real keys: it must be in .gitignore"


@pytest.mark.parametrize("deployment", [SERVE, REDIS], ids=["lstm-serve", "redis"])
def test_the_pods_run_locked_down(deployment):
    spec, main = pod(deployment), container(deployment)
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    security = main["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert security["readOnlyRootFilesystem"] is True


def test_the_server_has_a_writable_tmp_under_its_read_only_root():
    """The decode process's forkserver makes a folder in the temporary directory: without one the
    server stops at start ("No usable temporary directory found")."""
    temporary = environment().get("TMPDIR", "/tmp")
    mounts = {m["mountPath"]: m["name"] for m in container(SERVE)["volumeMounts"]}
    empty_dirs = {v["name"] for v in pod(SERVE)["volumes"] if "emptyDir" in v}
    assert mounts.get(temporary) in empty_dirs


@pytest.mark.parametrize("deployment", [SERVE, REDIS], ids=["lstm-serve", "redis"])
def test_every_container_requests_cpu_and_memory_and_has_a_memory_limit(deployment):
    resources = container(deployment)["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]), "the autoscaler's utilisation is a share of CPU requests"
    assert "memory" in resources["limits"]


def test_every_object_is_labelled_and_the_pods_like_their_deployment():
    assert KUSTOMIZATION["labels"] == [{"pairs": {"app.kubernetes.io/part-of": "lstm-serve"}}]
    for obj in objects():
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"], obj["metadata"]["name"]
    for deployment in (SERVE, REDIS):
        assert deployment["metadata"]["labels"].items() <= pod_labels(deployment).items()
