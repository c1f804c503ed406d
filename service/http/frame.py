"""The ASGI application. Every HTTP request and WebSocket passes through `Frame`, once: it matches the
route table, applies the limits every route shares (body size, media type), runs the endpoint, renders
any ServiceError in the route's protocol, and counts the request by route template, method and status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from lstm_serve.core.inputs import check_body_size
from lstm_serve.core.runtime import Runtime
from lstm_serve.errors import (
    BodyTooLarge,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    ServiceError,
    TooManySessions,
    UnsupportedMediaType,
)
from lstm_serve.http.table import RouteTable
from lstm_serve.protocols.codec import dumps
from lstm_serve.protocols.routing import HttpEndpoint, Route, SocketEndpoint

log = logging.getLogger("lstm_serve")
REJECTIONS = (Overloaded, TooManySessions, BodyTooLarge)
Lifespan = Callable[[], AbstractAsyncContextManager[None]]


def media_type(value: bytes) -> str:
    return value.split(b";", 1)[0].strip().lower().decode("latin-1")


def header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key == name), None)


class Frame:
    def __init__(self, table: RouteTable, runtime: Runtime, lifespan: Lifespan) -> None:
        self.table, self.runtime, self.lifespan_context = table, runtime, lifespan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    # -- HTTP ----------------------------------------------------------------------------------------
    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started, status = time.perf_counter(), 500
        method, path = scope["method"], scope["path"]
        found = self.table.match(method, path)
        route = found.route
        protocol = route.protocol if route else self.table.protocol_for(path)

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            try:
                if route is None:
                    if found.allowed:
                        allow = ", ".join(found.allowed)
                        raise MethodNotAllowed(f"{method} is not allowed here; use {allow}", headers={"Allow": allow})
                    raise NotFound(f"no endpoint {method} {path}; see /docs")
                if route.reads_body:
                    receive = self.checked_body(route, scope, receive)
                scope["path_params"] = found.params
                endpoint: HttpEndpoint = route.endpoint  # type: ignore[assignment]
                response = await endpoint(Request(scope, receive), self.runtime)
            except ServiceError as error:
                if isinstance(error, REJECTIONS):
                    self.runtime.metrics.rejected.labels(error.code).inc()
                response = protocol.render(error)
            except Exception:
                log.exception("unhandled error on %s %s", method, path)
                response = protocol.render(ServiceError("internal error; see the server log"))
            await response(scope, receive, send_counted)
        finally:
            labels = (found.template or "unmatched", method, str(status))
            self.runtime.metrics.requests.labels(*labels).inc()
            self.runtime.metrics.latency.labels(*labels).observe(time.perf_counter() - started)

    def checked_body(self, route: Route, scope: Scope, receive: Receive) -> Receive:
        """Refuse a body of a media type the route does not read, or over max_body_bytes (declared, or
        found while it streams in); the endpoint reads through the returned `receive`."""
        limits = self.runtime.limits
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit():
            check_body_size(int(declared), limits)
        has_body = (declared is not None and declared != b"0") or header(scope, b"transfer-encoding") is not None
        content_type = header(scope, b"content-type")
        if has_body and (content_type is not None or not route.untyped_body):
            given = media_type(content_type) if content_type is not None else "none"
            if given not in route.media_types:
                raise UnsupportedMediaType(
                    f"Content-Type {given!r} is not taken here; send {' or '.join(route.media_types)}"
                )
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                check_body_size(received, limits)
            return message

        return limited

    # -- WebSocket -----------------------------------------------------------------------------------
    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self.table.match("WEBSOCKET", scope["path"])
        if found.route is None:
            await self.refuse_upgrade(scope, send, NotFound(f"no WebSocket endpoint at {scope['path']}"))
            return
        scope["path_params"] = found.params
        endpoint: SocketEndpoint = found.route.endpoint  # type: ignore[assignment]
        await endpoint(WebSocket(scope, receive, send), self.runtime)

    @staticmethod
    async def refuse_upgrade(scope: Scope, send: Send, error: ServiceError) -> None:
        """An HTTP answer to the upgrade where the server can give one, else a plain refusal (403)."""
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008})
            return
        body = dumps({"error": {"code": error.code, "message": error.message}})
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "websocket.http.response.start", "status": error.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})

    # -- lifespan ------------------------------------------------------------------------------------
    async def lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        context = self.lifespan_context()
        try:
            await context.__aenter__()
        except BaseException as error:
            log.exception("start-up failed")
            await send({"type": "lifespan.startup.failed", "message": str(error)})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        try:
            await context.__aexit__(None, None, None)
        except Exception:
            log.exception("shut-down failed")
        await send({"type": "lifespan.shutdown.complete"})
