"""/openapi.json, /asyncapi.json, and the pages that read them: Swagger UI at /docs and ReDoc at /redoc.
Their JavaScript and CSS are served from the installed fastapi-offline package, so the pages work
offline and air-gapped: nothing is fetched from a CDN."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from lstm_serve.core.runtime import Runtime
from lstm_serve.errors import NotFound
from lstm_serve.http.openapi import asyncapi_document, openapi_document
from lstm_serve.http.table import RouteTable
from lstm_serve.protocols.codec import JSON
from lstm_serve.protocols.routing import V1, Content, Reply, Route

ASSETS = Path(fastapi_offline.__file__).parent / "static"
ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
ASSET_URL = "/docs/assets/{name}"


LIVE_PAGE = Path(__file__).with_name("static") / "live.html"


def server_version() -> str:
    try:
        return version("lstm-serve")
    except PackageNotFoundError:
        return "0+unknown"


def served_versions(runtime: Runtime) -> object:
    engine = runtime.engine
    versions = {name: engine.fleet.version_states(name) for name in sorted(engine.models)}
    return engine.default_model, [
        (name, [(v["version"], v["status"]) for v in states]) for name, states in versions.items()
    ]


class Documents:
    """The documents of one table, built on first request (the models must be loaded) and kept until what is
    served changes: a version loaded, draining or unloaded changes the schemas (the versions a body may name,
    the frame widths, the examples)."""

    def __init__(self, table: Callable[[], RouteTable]) -> None:
        self.table = table
        self.cache: dict[str, tuple[object, dict[str, Any]]] = {}

    def get(self, name: str, runtime: Runtime) -> dict[str, Any]:
        served = served_versions(runtime)
        kept = self.cache.get(name)
        if kept is None or kept[0] != served:
            build = openapi_document if name == "openapi" else asyncapi_document
            kept = self.cache[name] = (served, build(self.table(), runtime, server_version()))
        return kept[1]

    # -- endpoints -------------------------------------------------------------------------------------
    async def openapi(self, request: Request, runtime: Runtime) -> Response:
        return JSON(self.get("openapi", runtime))

    async def asyncapi(self, request: Request, runtime: Runtime) -> Response:
        return JSON(self.get("asyncapi", runtime))

    async def swagger(self, request: Request, runtime: Runtime) -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="lstm-serve",
            swagger_js_url=ASSET_URL.format(name="swagger-ui-bundle.js"),
            swagger_css_url=ASSET_URL.format(name="swagger-ui.css"),
            swagger_favicon_url=ASSET_URL.format(name="favicon.png"),
            swagger_ui_parameters={"validatorUrl": None},  # no call to validator.swagger.io
        )

    async def redoc(self, request: Request, runtime: Runtime) -> Response:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title="lstm-serve",
            redoc_js_url=ASSET_URL.format(name="redoc.standalone.js"),
            redoc_favicon_url=ASSET_URL.format(name="favicon.png"),
            with_google_fonts=False,
        )

    async def asset(self, request: Request, runtime: Runtime) -> Response:
        name = request.path_params["name"]
        if name not in ASSET_TYPES:
            raise NotFound(f"no asset {name[:80]!r}")
        return FileResponse(ASSETS / name, media_type=ASSET_TYPES[name], headers={"Cache-Control": "max-age=86400"})

    @staticmethod
    async def live(request: Request, runtime: Runtime) -> Response:
        """The live page: a session streamed frame by frame, its probabilities plotted (static/live.html)."""
        return FileResponse(LIVE_PAGE, media_type="text/html; charset=utf-8")

    def routes(self) -> list[Route]:
        def page(path: str, endpoint: Any, summary: str, media_type: str) -> Route:
            reply = Reply(200, "OK", (Content(media_type),))
            return Route("GET", path, endpoint, V1, summary, "docs", replies=(reply,), in_schema=False)

        return [
            page("/openapi.json", self.openapi, "This OpenAPI document", "application/json"),
            page("/asyncapi.json", self.asyncapi, "The WebSocket's AsyncAPI document", "application/json"),
            page("/docs", self.swagger, "Swagger UI", "text/html"),
            page("/redoc", self.redoc, "ReDoc", "text/html"),
            page(ASSET_URL, self.asset, "Swagger UI and ReDoc assets", "*/*"),
            # static HTML and JS with no data in it: it loads without a key, and every call it makes sends one
            Route(
                "GET",
                "/",
                self.live,
                V1,
                "The live page: stream a sequence and watch the prediction",
                "docs",
                replies=(Reply(200, "OK", (Content("text/html"),)),),
                in_schema=False,
                public=True,
            ),
        ]
