"""How a protocol declares its routes. A Route carries everything about one method on one path: the
endpoint, the protocol that renders its errors, the request bodies it reads, and every response it can
really give. The HTTP frame serves the routes of every protocol from one table (http/table.py) and the
OpenAPI document is generated from the same table (http/openapi.py): nothing is declared twice.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from lstm_serve.core.access import RequestContext
from lstm_serve.core.runtime import Runtime
from lstm_serve.errors import ServiceError
from lstm_serve.protocols.codec import JSON

HttpEndpoint = Callable[[Request, Runtime], Awaitable[Response]]
SocketEndpoint = Callable[[WebSocket, Runtime], Awaitable[None]]
# A documented schema: a type pydantic can describe (a model, list[Model]), or a function of the runtime that
# builds one from what the server serves (its models, its limits).
Schema = Any
Example = Callable[[Runtime], Any]


def built(schema: Schema) -> bool:
    """Whether a schema is a function of the runtime rather than a type."""
    return callable(schema) and not isinstance(schema, type) and getattr(schema, "__origin__", None) is None


def context(request: Request | WebSocket) -> RequestContext:
    """Who the request is from, its id, and where its endpoint notes the session it touched."""
    found: RequestContext = request.scope[RequestContext.SCOPE_KEY]
    return found


@dataclass(frozen=True)
class Content:
    media_type: str
    schema: Schema | None = None
    example: Example | None = None


@dataclass(frozen=True)
class Reply:
    status: int
    description: str
    content: tuple[Content, ...] = ()
    headers: tuple[str, ...] = ()  # response headers it carries, e.g. Retry-After


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str | None = None  # the X-Request-ID of the request, to find it in the server's log
    expected_seq: int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class OipError(BaseModel):
    error: str
    request_id: str | None = None


@dataclass(frozen=True)
class Protocol:
    """How a family of routes speaks errors."""

    name: str
    error_schema: type[BaseModel]
    render: Callable[[ServiceError, str | None], Response]

    def error(self, status: int, description: str, headers: tuple[str, ...] = ()) -> Reply:
        """A documented error response of this protocol."""
        return Reply(status, description, (Content("application/json", self.error_schema),), headers)


def v1_error_body(error: ServiceError, request_id: str | None) -> dict[str, Any]:
    described = {"code": error.code, "message": error.message, **error.details}
    if request_id is not None:
        described["request_id"] = request_id
    return {"error": described}


def render_v1_error(error: ServiceError, request_id: str | None = None) -> Response:
    return JSON(v1_error_body(error, request_id), status_code=error.status, headers=error.headers)


def render_oip_error(error: ServiceError, request_id: str | None = None) -> Response:
    """The Open Inference Protocol's {"error": "<message>"}; what the client can fix is a 400, as in Triton."""
    status = 400 if error.status == 422 else error.status
    body = {"error": error.message} if request_id is None else {"error": error.message, "request_id": request_id}
    return JSON(body, status_code=status, headers=error.headers)


V1 = Protocol("v1", ErrorResponse, render_v1_error)
OIP = Protocol("oip", OipError, render_oip_error)


@dataclass(frozen=True)
class Route:
    method: str  # GET, POST, DELETE, or WEBSOCKET
    path: str  # a template: /v1/sessions/{session_id}/steps
    endpoint: HttpEndpoint | SocketEndpoint
    protocol: Protocol
    summary: str
    tag: str
    replies: tuple[Reply, ...] = ()
    request: tuple[Content, ...] = ()  # the bodies it reads, by media type; () = it reads none
    body_required: bool = True
    untyped_body: bool = False  # a body without Content-Type is taken as the first media type
    compressed_body: bool = False  # it reads a gzip or deflate Content-Encoding itself; others get 415 for one
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)  # path parameter -> JSON schema
    description: str = ""
    in_schema: bool = True  # documented in OpenAPI (WebSockets are, in AsyncAPI, instead)
    channel: Callable[[Runtime], dict[str, Any]] | None = None  # a WebSocket's AsyncAPI channel
    public: bool = False  # served without an API key and to any Origin: health checks only
    admin: bool = False  # needs an admin key (admin_keys); without any, a loopback client of a keyless server

    @property
    def reads_body(self) -> bool:
        return bool(self.request)

    @functools.cached_property
    def media_types(self) -> tuple[str, ...]:
        return tuple(content.media_type for content in self.request)
