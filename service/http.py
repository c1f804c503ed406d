"""HTTP plumbing shared by the routes: body parsing, the JSON response, limits and request metrics."""

from __future__ import annotations

import time
from typing import Any, TypeVar

import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BodyTooLarge, InvalidInput, MalformedRequest, ServiceError
from service.metrics import Metrics

M = TypeVar("M", bound=BaseModel)


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(error: ServiceError) -> JSON:
    return JSON(error.body(), status_code=error.status, headers=error.headers)


def validation_error(error: ValidationError, where: str = "body") -> ServiceError:
    problems = error.errors(include_url=False)
    if any(p["type"] == "json_invalid" for p in problems):
        detail = next(p for p in problems if p["type"] == "json_invalid")
        return MalformedRequest(f"{where} is not valid JSON: {detail['ctx'].get('error', detail['msg'])}")
    described = "; ".join(f"{'.'.join(str(part) for part in p['loc']) or where}: {p['msg']}" for p in problems[:3])
    more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
    return InvalidInput(f"invalid {where}: {described}{more}")


def parse(model: type[M], payload: bytes | str, where: str = "body") -> M:
    try:
        return model.model_validate_json(payload)
    except ValidationError as error:
        raise validation_error(error, where) from None


def json_body(model: type[M]):
    """A dependency that parses the raw body with pydantic's JSON parser (no json.loads detour)."""

    async def dependency(request: Request) -> M:
        return parse(model, await request.body())

    dependency.__annotations__["return"] = model
    return dependency


def request_schema(model: type[BaseModel]) -> dict:
    """OpenAPI entry for a body parsed by `json_body`, so /docs still shows it."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


class LimitsAndMetrics:
    """Pure ASGI middleware: refuses oversized bodies with 413 and records every HTTP request."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int) -> None:
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500
        limit = self.max_body_bytes
        too_large = BodyTooLarge(f"request body is over max_body_bytes={limit}")

        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
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

        try:
            if declared is not None and declared.isdigit() and int(declared) > limit:
                self.metrics.rejected.labels(too_large.code).inc()
                await error_response(too_large)(scope, receive, record_status)
            else:
                await self.app(scope, limited_receive, record_status)
        finally:
            route = scope.get("route")
            labels = (getattr(route, "path", "unmatched"), scope["method"], str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)
