"""The ASGI application. Every HTTP request and WebSocket passes through `Frame`, once: it matches the
route table; gives the request its id; refuses a foreign Origin, a missing or wrong API key, a caller over
its rate (http/guard.py); applies the limits every route shares (body size and deadline, media type);
runs the endpoint; renders any ServiceError in the route's protocol; and counts and logs the request by
route template, method and status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from lstm_serve.core.access import Caller, RequestContext
from lstm_serve.core.inputs import check_body_size
from lstm_serve.core.runtime import Runtime
from lstm_serve.errors import (
    REJECTIONS,
    ForbiddenOrigin,
    MethodNotAllowed,
    NotFound,
    NotReady,
    Overloaded,
    RequestTimeout,
    ServiceError,
    TooManyWebSockets,
    Unauthorized,
    UnsupportedMediaType,
    UpgradeRequired,
)
from lstm_serve.http import logs
from lstm_serve.http.buffers import Holding
from lstm_serve.http.connections import BODY_COMPLETE
from lstm_serve.http.guard import Guard, chosen_subprotocol, client_address, header, request_id
from lstm_serve.http.table import RouteTable
from lstm_serve.protocols.codec import dumps
from lstm_serve.protocols.routing import HttpEndpoint, Route, SocketEndpoint, v1_error_body

log = logging.getLogger("lstm_serve")
Lifespan = Callable[[], AbstractAsyncContextManager[None]]
CLOSE_UNAUTHORIZED, CLOSE_TOO_MANY = 4401, 4429
CUT_AT_SHUTDOWN = (
    "the server shut down before this request finished (shutdown_timeout_s ran out); retry it: a session step "
    "sent with seq is applied once whatever happened to this one"
)


def media_type(value: bytes) -> str:
    return value.split(b";", 1)[0].strip().lower().decode("latin-1")


def unsupported_type(given: str, route: Route) -> UnsupportedMediaType:
    return UnsupportedMediaType(f"Content-Type {given!r} is not taken here; send {' or '.join(route.media_types)}")


class Frame:
    def __init__(self, table: RouteTable, runtime: Runtime, lifespan: Lifespan) -> None:
        self.table, self.runtime, self.lifespan_context = table, runtime, lifespan
        self.guard = Guard(runtime)
        self.websockets: Counter[str] = Counter()  # open WebSockets per caller, in this process

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    # -- HTTP ----------------------------------------------------------------------------------------
    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started, status, responding = time.perf_counter(), 500, False
        method, path = scope["method"], scope["path"]
        found = self.table.match(method, path)
        route = found.route
        protocol = route.protocol if route else self.table.protocol_for(path)
        context = RequestContext(request_id(scope), Caller(None, client_address(scope)))
        scope[RequestContext.SCOPE_KEY] = context
        extra_headers = [(b"x-request-id", context.request_id.encode())]
        body = Holding()  # what of its body this request holds, counted against max_buffered_bytes

        async def send_marked(message: Message) -> None:
            nonlocal status, responding
            if message["type"] == "http.response.start":
                status, responding = message["status"], True
                message["headers"] = [*message.get("headers", ()), *extra_headers]
            await send(message)

        try:
            try:
                if route is None or not route.public:
                    origin = self.guard.allowed_origin(scope)
                    preflight = self.guard.preflight(scope, found.allowed) if route is None and found.allowed else None
                    if preflight is not None:
                        await preflight(scope, receive, send_marked)
                        return
                    extra_headers += self.guard.cors_headers(origin)
                if route is None:
                    if found.allowed:
                        allow = ", ".join(found.allowed)
                        raise MethodNotAllowed(f"{method} is not allowed here; use {allow}", headers={"Allow": allow})
                    if found.websocket:
                        raise UpgradeRequired(
                            f"{path[:100]} is a WebSocket: open it with a GET that upgrades (Upgrade: websocket)",
                            headers={"Upgrade": "websocket", "Connection": "Upgrade"},
                        )
                    raise NotFound(f"no endpoint {method} {path}; see /docs")
                context.caller = self.guard.authenticate(scope, route)
                if not route.public:
                    await self.runtime.check_rate(context.caller)
                if route.reads_body:
                    receive = self.checked_body(route, scope, receive, started, body)
                scope["path_params"] = found.params
                context.session_id = found.params.get("session_id")
                endpoint: HttpEndpoint = route.endpoint  # type: ignore[assignment]
                response = await endpoint(Request(scope, receive), self.runtime)
            except ServiceError as error:
                if isinstance(error, REJECTIONS):
                    self.runtime.metrics.rejected.labels(error.code).inc()
                response = protocol.render(error, context.request_id)
            except Exception:
                log.exception("unhandled error on %s %s (request %s)", method, path, context.request_id)
                response = protocol.render(ServiceError("internal error; see the server log"), context.request_id)
            await response(scope, receive, send_marked)
        except asyncio.CancelledError:
            # only the server cancels a request, once shutdown_timeout_s has run out: the client hears so (if
            # nothing was sent yet) and it is logged as a 503, not as a server error with a traceback
            if not responding:
                status = 503
                with contextlib.suppress(Exception):
                    cut = NotReady(CUT_AT_SHUTDOWN, headers={"Retry-After": "1", "Connection": "close"})
                    await protocol.render(cut, context.request_id)(scope, receive, send_marked)
        finally:
            body.release()
            latency_s, template = time.perf_counter() - started, found.template or "unmatched"
            self.runtime.metrics.request_done(template, method, str(status), latency_s)
            logs.request_line(context, method, template, status, latency_s, self.runtime.settings.access_log)

    def checked_body(self, route: Route, scope: Scope, receive: Receive, started: float, body: Holding) -> Receive:
        """Refuse a body of a media type the route does not read, over max_body_bytes (declared, or found
        while it streams in), not all sent within body_timeout_s (408, and the connection closes), or whose
        next chunk would take the bodies held past max_buffered_bytes (503, and the connection closes); the
        endpoint reads through the returned `receive`."""
        limits = self.runtime.limits
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit():
            check_body_size(int(declared), limits)
        has_body = (declared is not None and declared != b"0") or header(scope, b"transfer-encoding") is not None
        content_type = header(scope, b"content-type")
        # a chunked body of unknown length without a type, where a body is optional: an empty one is no body
        optional_typed_body = not route.body_required and not route.untyped_body
        untyped_chunks = has_body and content_type is None and declared is None and optional_typed_body
        if has_body and not untyped_chunks and (content_type is not None or not route.untyped_body):
            given = media_type(content_type) if content_type is not None else "none"
            if given not in route.media_types:
                raise unsupported_type(given, route)
        encoding = header(scope, b"content-encoding")
        if has_body and encoding is not None and not route.compressed_body and encoding.strip().lower() != b"identity":
            raise UnsupportedMediaType(
                f"Content-Encoding {encoding.decode('latin-1')[:40]!r} is not taken here; send the body uncompressed"
            )
        received = 0
        timeout_s = self.runtime.settings.body_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s - (time.perf_counter() - started)

        async def limited() -> Message:
            nonlocal received
            if scope.get(BODY_COMPLETE):  # all of it is in: receive() answers at once, no deadline to keep
                message = await receive()
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    raise RequestTimeout(
                        f"the request body did not arrive within body_timeout_s={timeout_s:g}",
                        headers={"Connection": "close"},
                    ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                check_body_size(received, limits)
                if not body.hold(received):
                    raise Overloaded(
                        "the server holds too many request bodies that are still arriving; retry shortly",
                        headers={"Retry-After": "1", "Connection": "close"},
                    )
                if received and untyped_chunks:
                    raise unsupported_type("none", route)
            return message

        return limited

    # -- WebSocket -----------------------------------------------------------------------------------
    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A foreign Origin is refused before the upgrade (403); a missing key (4401), a caller over its
        rate or its WebSockets (4429) get an accepted socket closed with that code, which a browser can
        read (it sees no HTTP status)."""
        found = self.table.match("WEBSOCKET", scope["path"])
        context = RequestContext(request_id(scope), Caller(None, client_address(scope)))
        scope[RequestContext.SCOPE_KEY] = context
        if found.route is None:
            await self.refuse_upgrade(scope, send, NotFound(f"no WebSocket endpoint at {scope['path']}"))
            return
        try:
            self.guard.allowed_origin(scope)
        except ForbiddenOrigin as error:
            self.runtime.metrics.rejected.labels(error.code).inc()
            await self.refuse_upgrade(scope, send, error)
            return
        context.subprotocol = chosen_subprotocol(scope)
        try:
            context.caller = self.guard.authenticate(scope, found.route, websocket=True)
            await self.runtime.check_rate(context.caller)
            limit = self.runtime.settings.max_websockets_per_key
            if self.websockets[context.caller.quota_key] >= limit:
                raise TooManyWebSockets(f"this API key (or client address) has max_websockets_per_key={limit} open")
        except ServiceError as error:
            self.runtime.metrics.rejected.labels(error.code).inc()
            code = CLOSE_UNAUTHORIZED if isinstance(error, Unauthorized) else CLOSE_TOO_MANY
            await self.close_at_once(scope, receive, send, context, error, code)
            return
        scope["path_params"] = found.params
        endpoint: SocketEndpoint = found.route.endpoint  # type: ignore[assignment]
        key = context.caller.quota_key
        self.websockets[key] += 1
        try:
            await endpoint(WebSocket(scope, receive, send), self.runtime)
        finally:
            self.websockets[key] -= 1
            if not self.websockets[key]:
                del self.websockets[key]

    @staticmethod
    async def close_at_once(
        scope: Scope, receive: Receive, send: Send, context: RequestContext, error: ServiceError, code: int
    ) -> None:
        """Accept, say why in one message, and close with `code`."""
        socket = WebSocket(scope, receive, send)
        await socket.accept(subprotocol=context.subprotocol)
        await socket.send_text(dumps(v1_error_body(error, context.request_id)).decode())
        await socket.close(code=code, reason=error.code)

    @staticmethod
    async def refuse_upgrade(scope: Scope, send: Send, error: ServiceError) -> None:
        """An HTTP answer to the upgrade where the server can give one, else a plain refusal (403)."""
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008})
            return
        context: RequestContext = scope[RequestContext.SCOPE_KEY]
        body = dumps(v1_error_body(error, context.request_id))
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", context.request_id.encode()),
        ]
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
