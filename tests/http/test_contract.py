"""The API contract is exactly what the server does: schemathesis against a live server's /openapi.json
with every check, the documented examples work as shipped, the AsyncAPI document describes the
WebSocket, and /docs and /redoc load everything they need from the server itself."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urljoin

from tests.conftest import ROOT

CONFIG = Path(__file__).with_name("schemathesis.toml")
# A fixed seed keeps CI repeatable; set LSTM_SERVE_CONTRACT_SEED to explore other requests.
SEED = os.environ.get("LSTM_SERVE_CONTRACT_SEED", "20261123")
BUDGET_S = os.environ.get("LSTM_SERVE_CONTRACT_SECONDS", "45")


def test_schemathesis_finds_nothing_with_every_check(start_server, tmp_path):
    # schemathesis sends no key: the repository API (load, unload) answers its documented 401, and the models
    # stay loaded for the other operations
    server = start_server(env={"LSTM_SERVE_ADMIN_KEYS": "an-operator-key-schemathesis-does-not-have"})
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis (the dev extra) is missing"
    command = [
        st,
        "--config-file",
        str(CONFIG),
        "--no-color",
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "all",
        "--max-time",
        BUDGET_S,
        "--workers",
        "1",
        "--seed",
        SEED,
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=int(BUDGET_S) + 120)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert re.search(r"Tested: 25\b", result.stdout), report  # every documented operation was exercised
    assert server.proc.poll() is None, "the server died under schemathesis"


def test_the_documented_examples_work_as_shipped(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    classify = paths["/v1/classify"]["post"]["requestBody"]["content"]["application/json"]["example"]
    answer = client.post("/v1/classify", json=classify)
    assert answer.status_code == 200
    true_label = client.get(f"/v1/models/{classify['model']}").json()["example"]["label"]
    assert answer.json()["predictions"][0]["label"] == true_label  # a real sequence, rightly classified
    created = client.post(
        "/v1/sessions", json=paths["/v1/sessions"]["post"]["requestBody"]["content"]["application/json"]["example"]
    )
    assert created.status_code == 201
    step = paths["/v1/sessions/{session_id}/steps"]["post"]["requestBody"]["content"]["application/json"]["example"]
    assert client.post(f"/v1/sessions/{created.json()['session_id']}/steps", json=step).status_code == 200
    infer = paths["/v2/models/{model_name}/infer"]["post"]["requestBody"]["content"]["application/json"]["example"]
    result = client.post(f"/v2/models/{classify['model']}/infer", json=infer)
    assert result.status_code == 200 and true_label in result.json()["outputs"][0]["data"][0]


def test_every_route_of_the_table_is_documented_once():
    from lstm_serve.http.app import create_app

    app = create_app()
    documented = [(r.method, r.path) for r in app.table.routes if r.in_schema]
    assert len(documented) == len(set(documented)) == 25
    sockets = [r.path for r in app.table.routes if r.method == "WEBSOCKET"]
    assert sockets == ["/v1/sessions/{session_id}/stream"]


def test_the_websocket_is_described_in_asyncapi(client):
    doc = client.get("/asyncapi.json").json()
    assert doc["asyncapi"].startswith("3.")
    (channel,) = doc["channels"].values()
    assert channel["address"] == "/v1/sessions/{session_id}/stream"
    assert {"chunkJson", "chunkBinary", "reply", "error"} <= set(channel["messages"])
    widths = doc["components"]["schemas"]["StepRequest"]["properties"]["inputs"]["anyOf"]
    assert sorted(w["items"]["minItems"] for w in widths) == [6, 12]  # basic-motions, japanese-vowels


def test_docs_pages_load_every_asset_from_the_server_itself(client):
    for page in ("/docs", "/redoc"):
        html = client.get(page)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        references = re.findall(r'(?:src|href)="([^"]+)"', html.text) + re.findall(r"url: '([^']+)'", html.text)
        references += re.findall(r"spec-url=\"([^\"]+)\"", html.text)
        assert references, page
        for reference in references:
            url = urljoin(str(client.base_url) + page, reference)
            assert url.startswith(str(client.base_url)), f"{page} loads {reference} from elsewhere"
            assert client.get(url).status_code == 200, f"{page}: {reference} is missing"
        assert "cdn" not in html.text.lower() and "googleapis" not in html.text


def test_the_docs_assets_are_vendored_by_an_installed_package():
    from lstm_serve.http.docs import ASSET_TYPES, ASSETS

    assert all((ASSETS / name).stat().st_size > 0 for name in ASSET_TYPES)
    assert not str(ASSETS).startswith(str(ROOT / "service"))
