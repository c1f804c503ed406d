"""The outermost ASGI layer: limits and metrics for every HTTP request, and the hot routes.

Classify, session create/delete and steps are dispatched here straight to their endpoints; the
FastAPI stack (docs, models, health, session reads, the WebSocket) serves the rest. Under
`lstm-serve bench` the FastAPI middleware chain and per-route machinery cost more CPU per request
than onnxruntime does for the model (py-spy), and the event loop is what saturates first.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI
from lstm_serve.core.metrics import Metrics
from lstm_serve.errors import BodyTooLarge, MethodNotAllowed, Overloaded, ServiceError, TooManySessions
from lstm_serve.protocols.http import error_response
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket

log = logging.getLogger("lstm_serve")
REJECTIONS = (Overloaded, TooManySessions, BodyTooLarge)
Endpoint = Callable[[Request], Awaitable[Response]] | Callable[[WebSocket], Awaitable[None]]


@dataclass(frozen=True)
class HotRoute:
    method: str  # an HTTP method, WEBSOCKET, or * for any method of a path no other route claims
    path: str  # template, e.g. /v1/sessions/{session_id}/steps
    endpoint: Endpoint
    render_error: Callable[[ServiceError], Response] = error_response  # the protocol's error body

    @property
    def regex(self) -> re.Pattern:
        return compile_path(self.path)[0]


def rejected(metrics: Metrics, error: ServiceError) -> None:
    if isinstance(error, REJECTIONS):
        metrics.rejected.labels(error.code).inc()


class FrontDoor:
    def __init__(self, app: FastAPI, metrics: Metrics, max_body_bytes: int, routes: list[HotRoute]) -> None:
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes
        self.routes = [(route, route.regex) for route in routes]

    @property
    def state(self):
        return self.app.state

    def match(self, scope: Scope) -> tuple[HotRoute | None, dict, list[str], str | None]:
        """The hot route for this request, its path parameters, the methods its path allows, and
        the path template that matched (for metric labels: never the raw path with a session id)."""
        path, allowed, template, fallback = scope["path"], [], None, None
        method = scope["method"] if scope["type"] == "http" else "WEBSOCKET"
        for route, regex in self.routes:
            found = regex.match(path)
            if found:
                if route.method == method:
                    return route, found.groupdict(), allowed, route.path
                if route.method == "*":
                    fallback = fallback or (route, found.groupdict())
                    continue
                allowed.append(route.method)
                template = route.path
        if fallback and not allowed and method != "WEBSOCKET":
            return fallback[0], fallback[1], allowed, fallback[0].path
        return None, {}, allowed, template

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            route, params, _, _ = self.match(scope)
            if route is None:
                await self.app(scope, receive, send)
            else:
                scope["app"], scope["path_params"] = self.app, params
                await route.endpoint(WebSocket(scope, receive, send))
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500
        limit = self.max_body_bytes
        too_large = BodyTooLarge(f"request body is over max_body_bytes={limit}")
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large
            return message

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        route, params, allowed, template = self.match(scope)

        def render(error: ServiceError) -> Response:  # looked up only when the front door itself refuses
            return (route.render_error if route else self.render_error(template))(error)

        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        try:
            if declared is not None and declared.isdigit() and int(declared) > limit:
                rejected(self.metrics, too_large)
                await render(too_large)(scope, receive, record_status)
            elif route is not None:
                await self.dispatch(route, params, scope, limited_receive, record_status)
            elif allowed:
                message = f"{scope['method']} is not allowed here; use {' or '.join(allowed)}"
                error = MethodNotAllowed(message, headers={"Allow": ", ".join(allowed)})
                await render(error)(scope, receive, record_status)
            else:
                await self.app(scope, limited_receive, record_status)
        finally:
            template = template or getattr(scope.get("route"), "path", None) or "unmatched"
            labels = (template, scope["method"], str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)

    def render_error(self, template: str | None) -> Callable[[ServiceError], Response]:
        """The error body of the protocol a path belongs to (OIP paths answer {"error": "..."})."""
        route = next((route for route, _ in self.routes if route.path == template), None)
        return route.render_error if route else error_response

    async def dispatch(self, route: HotRoute, params: dict, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"], scope["path_params"] = self.app, params
        try:
            response = await route.endpoint(Request(scope, receive))
        except ServiceError as error:
            rejected(self.metrics, error)
            response = route.render_error(error)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            response = route.render_error(ServiceError("internal error; see the server log"))
        await response(scope, receive, send)
