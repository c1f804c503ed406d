"""The Grafana dashboard and compose's `monitoring` profile, checked statically: every PromQL expression of
the dashboard names only series the server exports (its metrics registry, and a live server's /metrics) and
only labels those series carry; Grafana's provisioning, prometheus.yml and docker-compose.yml agree on the
datasource uid, the mounted paths, the scraped service, port and key."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from lstm_serve.core.metrics import LoopCounter, LoopHistogram, Metrics
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
DASHBOARD_FILE = DEPLOY / "grafana" / "dashboards" / "lstm-serve.json"
DASHBOARD = json.loads(DASHBOARD_FILE.read_text())
DATASOURCES = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
PROVIDERS = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "lstm-serve.yaml").read_text())
PROMETHEUS = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]

# labels Prometheus gives every series it scrapes
TARGET_LABELS = frozenset({"instance", "job"})

# -- a small PromQL reader: which metrics an expression names, and which labels it needs each to have ---------
AGGREGATIONS = frozenset(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio".split()  # noqa: SIM905
)
FUNCTIONS = frozenset(
    """abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp clamp_max
    clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month deg delta deriv
    double_exponential_smoothing exp floor histogram_avg histogram_count histogram_fraction histogram_quantile
    histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta increase irate label_join
    label_replace last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month pi
    predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort
    sort_by_label sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh time
    timestamp vector year""".split()  # noqa: SIM905 - a word list, not 80 lines of one name each
)
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = GROUPING | {"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"}
MATCHERS = frozenset({"=", "!=", "=~", "!~"})
TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])  # [5m], [$__rate_interval], [1h:1m]: durations and Grafana variables only
  | (?P<variable>\$\{[^}]*\}|\$\w+)  # Grafana's: $model, ${model:regex}, $__rate_interval
  | (?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?(?:ms|[smhdwy])?)  # 0.99, 1e3, offset 5m
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}@])
  | (?P<error>.)
    """,
    re.VERBOSE,
)
LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.+),\s*(?P<label>[A-Za-z_]\w*)\s*\)\s*$", re.DOTALL)


def tokenize(expr: str) -> list[tuple[str, str]]:
    """(kind, text) of each token but spaces, strings, ranges and Grafana variables: none of those names a
    metric or a label."""
    tokens = []
    for match in TOKEN.finditer(expr):
        kind = match.lastgroup or "error"
        if kind == "error":
            raise ValueError(f"unexpected {match.group()!r} at {match.start()} in {expr!r}")
        if kind not in ("space", "string", "range", "variable"):
            tokens.append((kind, match.group()))
    return tokens


def label_list(tokens: list[tuple[str, str]], at: int, expr: str, optional: bool) -> tuple[set[str], int]:
    """The names of `( a, b )` starting at tokens[at]; returns them and the index after the `)`. Only
    group_left and group_right may go without one."""
    if at >= len(tokens) or tokens[at][1] != "(":
        if optional:
            return set(), at
        raise ValueError(f"a label list must follow by, without, on, ignoring: {expr!r}")
    labels, at = set(), at + 1
    while at < len(tokens) and tokens[at][1] != ")":
        kind, text = tokens[at]
        if kind == "name":
            labels.add(text)
        elif text != ",":
            raise ValueError(f"{text!r} in a label list: {expr!r}")
        at += 1
    return labels, at + 1


def selector_labels(tokens: list[tuple[str, str]], at: int, expr: str) -> tuple[set[str], int]:
    """The label names matched in `{ a="x", b=~"$var" }` starting at tokens[at] (the values are strings,
    already dropped); returns them and the index after the `}`."""
    labels, at = set(), at + 1
    while at < len(tokens) and tokens[at][1] != "}":
        kind, text = tokens[at]
        if kind == "name" and at + 1 < len(tokens) and tokens[at + 1][1] in MATCHERS:
            labels.add(text)
            at += 2
        elif text == ",":
            at += 1
        else:
            raise ValueError(f"{text!r} in a selector: {expr!r}")
    return labels, at + 1


def promql_uses(expr: str) -> dict[str, set[str]]:
    """Each metric name the expression selects, with the labels it needs that metric to carry: those its
    selector matches, and those of a `by`/`without` around it (`sum by (l) (...)` or `sum(...) by (l)`).
    Labels of vector matching (on, ignoring, group_left/right) are asked of every metric of the expression.
    An unknown function is an error, not a metric: `rat(x[5m])` must not pass as the metric `rat`."""
    tokens = tokenize(expr)
    uses: dict[str, set[str]] = {}
    matching: set[str] = set()
    groups: list[list[str]] = [[]]  # the metrics inside each open parenthesis, outermost first
    grouping: list[set[str] | None] = [None]  # the by-labels each open parenthesis gives its metrics
    aggregation, pending = False, None  # after `sum` (and its `by (...)`), before its `(`
    closed: list[str] | None = None  # the metrics of an aggregation's argument just closed
    at = 0
    while at < len(tokens):
        kind, text = tokens[at]
        following = tokens[at + 1][1] if at + 1 < len(tokens) else ""
        if kind == "name" and text in GROUPING:
            labels, at = label_list(tokens, at + 1, expr, optional=text.startswith("group_"))
            if text in ("by", "without") and aggregation:
                pending = labels
            elif text in ("by", "without") and closed is not None:
                for metric in closed:
                    uses[metric] |= labels
            elif text in ("by", "without"):
                raise ValueError(f"{text} (...) belongs to no aggregation: {expr!r}")
            else:
                matching |= labels
            closed = None
            continue
        closed = None
        if kind == "name" and text in AGGREGATIONS and following in ("(", "by", "without"):
            aggregation = True
        elif kind == "name" and following == "(" and text not in KEYWORDS:
            if text not in FUNCTIONS:
                raise ValueError(f"unknown PromQL function {text!r} in {expr!r}")
        elif kind == "name" and text not in KEYWORDS:
            uses.setdefault(text, set())
            groups[-1].append(text)
            if following == "{":
                labels, at = selector_labels(tokens, at + 1, expr)
                uses[text] |= labels
                continue
        elif text == "{":
            raise ValueError(f"a selector without a metric name is not checked: {expr!r}")
        elif text == "(":
            groups.append([""] if aggregation else [])  # "": this parenthesis is an aggregation's argument
            grouping.append((pending or set()) if aggregation else None)
            aggregation, pending = False, None
        elif text == ")":
            inner, labels = groups.pop(), grouping.pop()
            metrics = [metric for metric in inner if metric]
            for metric in metrics:
                uses[metric] |= labels or set()
            groups[-1].extend(metrics)
            closed = metrics if inner[:1] == [""] else None
        at += 1
    for metric in uses:
        uses[metric] |= matching
    return uses


def grafana_query_uses(query: str) -> dict[str, set[str]]:
    """A templating query: Grafana's `label_values(<selector>, <label>)` asks <label> of the selector's
    metrics; anything else is PromQL."""
    found = LABEL_VALUES.match(query)
    if found is None:
        return promql_uses(query)
    uses = promql_uses(found["selector"])
    if not uses:
        raise ValueError(f"label_values without a metric scans every series: {query!r}")
    return {metric: labels | {found["label"]} for metric, labels in uses.items()}


HISTOGRAM_SERIES = re.compile(r"_(bucket|sum|count)$")


def problems(uses: dict[str, set[str]], exported: dict[str, set[str]]) -> list[str]:
    """What an expression asks that the server does not export: unknown metrics, unknown labels."""
    found = []
    for metric, labels in sorted(uses.items()):
        if metric not in exported:
            found.append(f"unknown metric {metric}")
        elif missing := labels - exported[metric] - TARGET_LABELS:
            found.append(f"{metric} has no label {sorted(missing)}")
    return found


# -- what the server exports ---------------------------------------------------------------------------------
def registry_series(metrics: Metrics) -> dict[str, set[str]]:
    """Every series name the registry can export, with its label names: a counter exports `<name>_total`,
    a gauge `<name>`, a histogram `<name>_bucket` (with `le`), `<name>_sum` and `<name>_count`."""
    described: dict[str, set[str]] = {}  # metric name -> its label names
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):  # prometheus_client keeps no public accessor
            described[value._name] = set(value._labelnames)
        elif isinstance(value, LoopCounter | LoopHistogram):
            described[value.name] = set(value.labelnames)
    families = {family.name: family.type for family in metrics.registry.collect()}
    assert set(described) == set(families), "a metric outside Metrics' fields"
    series: dict[str, set[str]] = {}
    for name, labels in described.items():
        kind = families[name]
        if kind == "counter":
            series[f"{name}_total"] = labels
        elif kind == "gauge":
            series[name] = labels
        elif kind == "histogram":
            series |= {f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels, f"{name}_count": labels}
        else:
            raise AssertionError(f"{name}: a {kind}, which this test does not know how to expand")
    return series


def scraped_series(text: str) -> dict[str, set[str]]:
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


# -- what the dashboard asks ---------------------------------------------------------------------------------
def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def panel_expressions() -> list[str]:
    return [target["expr"] for panel in panels(DASHBOARD["panels"]) for target in panel.get("targets", [])]


def templating_queries() -> list[str]:
    queries = []
    for variable in DASHBOARD["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def dashboard_uses() -> list[tuple[str, dict[str, set[str]]]]:
    return [(expr, promql_uses(expr)) for expr in panel_expressions()] + [
        (query, grafana_query_uses(query)) for query in templating_queries()
    ]


def bind_mounts(service: str) -> dict[str, tuple[str, list[str]]]:
    """A service's short-syntax volumes: target -> (source, options)."""
    mounts = {}
    for volume in SERVICES[service].get("volumes", []):
        source, target, *options = volume.split(":")
        mounts[target] = (source, options)
    return mounts


# -- the PromQL reader itself: it must be able to fail ------------------------------------------------------
EXPORTED = registry_series(Metrics())


@pytest.mark.parametrize(
    ("expr", "uses"),
    [
        (
            'sum by (route) (rate(lstm_serve_requests_total{instance=~"$instance", status=~"5.."}[$__rate_interval]))',
            {"lstm_serve_requests_total": {"route", "instance", "status"}},
        ),
        (
            "histogram_quantile(0.99, sum by (le, model) (rate(lstm_serve_batch_size_bucket[5m])))",
            {"lstm_serve_batch_size_bucket": {"le", "model"}},
        ),
        (
            "sum(rate(lstm_serve_queue_wait_seconds_sum[1h:1m] offset 5m)) by (model)",
            {"lstm_serve_queue_wait_seconds_sum": {"model"}},
        ),
        (
            "sum by (model) (rate(lstm_serve_inference_seconds_sum[$__rate_interval]))\n/\n"
            "sum without (instance) (rate(lstm_serve_inference_seconds_count[${__rate_interval}]))",
            {"lstm_serve_inference_seconds_sum": {"model"}, "lstm_serve_inference_seconds_count": {"instance"}},
        ),
        (
            'label_replace(max(lstm_serve_active_sessions), "dst", "$1", "src", "(.*)") > bool 0',
            {"lstm_serve_active_sessions": set()},
        ),
        (
            "rate(lstm_serve_requests_total[5m]) / on (route) group_left sum by (route) (rate(x:y_total[5m]))",
            {"lstm_serve_requests_total": {"route"}, "x:y_total": {"route"}},
        ),
        (
            "lstm_serve_queue_length > bool (lstm_serve_active_sessions) or (vector(0))",
            {"lstm_serve_queue_length": set(), "lstm_serve_active_sessions": set()},
        ),
    ],
)
def test_the_reader_finds_each_metric_and_the_labels_asked_of_it(expr, uses):
    assert promql_uses(expr) == uses


def test_the_reader_reads_grafana_label_values_queries():
    uses = grafana_query_uses('label_values(lstm_serve_queue_length{instance=~"$instance"}, model)')
    assert uses == {"lstm_serve_queue_length": {"instance", "model"}}


@pytest.mark.parametrize(
    ("expr", "found"),
    [
        ("rate(lstm_serve_requestz_total[$__rate_interval])", ["unknown metric lstm_serve_requestz_total"]),
        ("lstm_serve_batch_size", ["unknown metric lstm_serve_batch_size"]),  # a histogram has no bare series
        ("sum(rate(lstm_serve_requests[5m]))", ["unknown metric lstm_serve_requests"]),  # a counter is *_total
        ("sum by (rout) (rate(lstm_serve_requests_total[5m]))", ["lstm_serve_requests_total has no label ['rout']"]),
        ('lstm_serve_queue_length{route="/v1/classify"}', ["lstm_serve_queue_length has no label ['route']"]),
        ("sum(rate(lstm_serve_batch_size_sum[5m])) by (le)", ["lstm_serve_batch_size_sum has no label ['le']"]),
        ("histogram_quantile(0.5, sum by (le) (rate(lstm_serve_batch_size_bucket[5m])))", []),
        ("sum by (job, instance) (lstm_serve_active_sessions)", []),
    ],
)
def test_a_made_up_metric_or_label_is_caught(expr, found):
    assert problems(promql_uses(expr), EXPORTED) == found


@pytest.mark.parametrize("expr", ["rat(lstm_serve_requests_total[5m])", "{__name__=~'lstm.*'}", "a ? b"])
def test_what_the_reader_cannot_check_is_an_error_not_a_pass(expr):
    with pytest.raises(ValueError):
        promql_uses(expr)


# -- the dashboard against the server ----------------------------------------------------------------------
def test_every_dashboard_expression_names_only_exported_metrics_and_labels():
    uses = dashboard_uses()
    assert len(uses) >= 20 and len(templating_queries()) == 2
    for expr, used in uses:
        assert used, f"no metric in {expr!r}"
        assert problems(used, EXPORTED) == [], expr
    named = set().union(*(used for _, used in uses))
    graphed = {HISTOGRAM_SERIES.sub("", name) for name in named}
    assert {HISTOGRAM_SERIES.sub("", name) for name in EXPORTED} == graphed, "a metric the server exports has no panel"


def test_a_live_server_exports_every_series_the_dashboard_reads(start_server, test_sequences, tmp_path):
    """The server as compose runs it (API keys on), after one request of each kind: every series and label the
    dashboard reads is in its /metrics, which needs the key Prometheus is given."""
    key = "dashboard-key-0123456789"
    (tmp_path / "api_keys").write_text(f"{key}\n")
    server = start_server(env={"LSTM_SERVE_API_KEYS_FILE": str(tmp_path / "api_keys")})
    auth = {"Authorization": f"Bearer {key}"}
    frames = test_sequences[0].tolist()
    with httpx.Client(base_url=server.url, headers=auth, timeout=30) as client:
        assert client.get("/v1/models").status_code == 200
        assert client.post("/v1/classify", json={"sequences": [frames]}).status_code == 200
        session_id = client.post("/v1/sessions", json={}).json()["session_id"]
        assert client.post(f"/v1/sessions/{session_id}/steps", json={"inputs": frames[:3]}).status_code == 200
        assert httpx.get(f"{server.url}/metrics").status_code == 401, "/metrics needs a key: Prometheus sends one"
        scrape = client.get("/metrics")
    assert scrape.status_code == 200
    scraped = scraped_series(scrape.text)
    assert 'reason="unauthorized"' in scrape.text
    assert set(scraped) <= set(EXPORTED), "the registry and the scrape disagree"
    for expr, used in dashboard_uses():
        assert problems(used, scraped) == [], expr


# -- the dashboard's own shape -------------------------------------------------------------------------------
def test_the_dashboard_has_units_rate_windows_and_the_variables_it_uses():
    assert DASHBOARD["schemaVersion"] >= 39 and DASHBOARD["uid"] == "lstm-serve"
    shown = [panel for panel in panels(DASHBOARD["panels"]) if panel["type"] != "row"]
    ids = [panel["id"] for panel in panels(DASHBOARD["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in shown:
        assert panel["targets"] and panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    defined = {variable["name"] for variable in DASHBOARD["templating"]["list"]}
    assert defined == {"instance", "model"}
    for expr in panel_expressions() + templating_queries():
        assert re.findall(r"\[([^\]]*)\]", expr) == ["$__rate_interval"] * expr.count("["), expr
        used = set(re.findall(r"\$\{?(\w+)", expr)) - {"__rate_interval"}
        assert used <= defined, f"{expr!r} uses undefined variables {used - defined}"
    units = {panel["title"]: panel["fieldConfig"]["defaults"]["unit"] for panel in shown}
    assert units["p99 latency by route"] == "s" and units["Request rate by route"] == "reqps"


# -- Grafana, Prometheus and compose agree -------------------------------------------------------------------
def test_every_panel_queries_the_provisioned_datasource():
    (source,) = DATASOURCES["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "127.0.0.1:9090:9090" in SERVICES["prometheus"]["ports"]
    assert source["jsonData"]["timeInterval"] == PROMETHEUS["global"]["scrape_interval"], (
        "$__rate_interval is computed from the datasource's scrape interval"
    )
    wanted = {"type": "prometheus", "uid": source["uid"]}
    for panel in panels(DASHBOARD["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == wanted, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == wanted, panel["title"]
    for variable in DASHBOARD["templating"]["list"]:
        assert variable["datasource"] == wanted, variable["name"]


def test_grafana_loads_the_dashboard_from_where_compose_mounts_it():
    (provider,) = PROVIDERS["providers"]
    assert provider["type"] == "file"
    mounts = bind_mounts("grafana")
    source, options = mounts[provider["options"]["path"]]
    assert (ROOT / source / DASHBOARD_FILE.name).samefile(DASHBOARD_FILE)
    for kind in ("datasources", "dashboards"):
        source, _ = mounts[f"/etc/grafana/provisioning/{kind}"]
        assert (ROOT / source).samefile(DEPLOY / "grafana" / "provisioning" / kind)
    for target, (source, options) in mounts.items():
        assert source.startswith("./deploy/") and options == ["ro"], target
    env = SERVICES["grafana"]["environment"]
    home = PurePosixPath(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert str(home.parent) == provider["options"]["path"] and home.name == DASHBOARD_FILE.name
    assert (
        env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer" and "GRAFANA_ADMIN_PASSWORD" in env["GF_SECURITY_ADMIN_PASSWORD"]
    )
    assert "127.0.0.1:3000:3000" in SERVICES["grafana"]["ports"]


def test_prometheus_scrapes_each_replica_of_the_compose_service_with_a_mounted_key():
    (job,) = PROMETHEUS["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    (name,) = sd["names"]
    serve = SERVICES[name]
    assert name == "lstm-serve" and serve["deploy"]["replicas"] >= 2 and sd["type"] == "A"
    port = serve["environment"]["LSTM_SERVE_PORT"]
    assert sd["port"] == int(port) and port in serve["expose"]
    assert job["metrics_path"] == "/metrics" and job.get("scheme", "http") == "http"
    assert job["authorization"]["type"] == "Bearer"
    secret = PurePosixPath(job["authorization"]["credentials_file"])
    assert str(secret.parent) == "/run/secrets" and SERVICES["prometheus"]["secrets"] == [secret.name]
    assert COMPOSE["secrets"][secret.name]["file"] == "./secrets/metrics_key"
    assert "secrets/" in (ROOT / ".gitignore").read_text().split(), "keys must never be committed"
    source, options = bind_mounts("prometheus")["/etc/prometheus/prometheus.yml"]  # the image's config path
    assert (ROOT / source).samefile(DEPLOY / "prometheus" / "prometheus.yml") and options == ["ro"]


def test_the_monitoring_services_start_only_with_their_profile_and_pinned_images():
    for name in ("prometheus", "grafana"):
        service = SERVICES[name]
        assert service["profiles"] == ["monitoring"], name
        image, _, tag = service["image"].partition(":")
        assert image in ("prom/prometheus", "grafana/grafana") and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), name
    for name in ("redis", "lstm-serve", "nginx"):
        assert "profiles" not in SERVICES[name], f"{name} must start without a profile"
    assert "docker compose --profile monitoring up" in (ROOT / "docker-compose.yml").read_text()
