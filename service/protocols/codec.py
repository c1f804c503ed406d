"""JSON on the wire: reading a request body into a schema, and the JSON response that writes numpy arrays
directly."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from lstm_serve.errors import ClientClosedRequest, InvalidInput, MalformedRequest, ServiceError

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def dumps(content: Any) -> bytes:
    """JSON bytes; numpy arrays (the probabilities) are written by orjson directly."""
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


HIGH, LOW = rb"\\u[dD][89abAB][0-9a-fA-F]{2}", rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}"
LONE_SURROGATE = re.compile(HIGH + rb"(?!" + LOW + rb")|(?<!" + HIGH + rb")" + LOW)


def json_hint(payload: bytes | str) -> str:
    """What the parser's message does not say about two mistakes it reports only by their position."""
    raw = payload.encode() if isinstance(payload, str) else payload
    if raw.startswith(b"\xef\xbb\xbf"):
        return " (the body starts with a byte order mark; JSON sent over a network has none, RFC 8259 8.1)"
    if LONE_SURROGATE.search(raw):
        return " (a \\uD800-\\uDFFF escape is half of a surrogate pair and must come with its other half)"
    return ""


def validation_error(error: ValidationError, where: str = "body", payload: bytes | str = b"") -> ServiceError:
    problems = error.errors(include_url=False)
    if any(p["type"] == "json_invalid" for p in problems):
        detail = next(p for p in problems if p["type"] == "json_invalid")
        reason = detail["ctx"].get("error", detail["msg"])
        return MalformedRequest(f"{where} is not valid JSON: {reason}{json_hint(payload)}")
    described = "; ".join(f"{'.'.join(str(part) for part in p['loc']) or where}: {p['msg']}" for p in problems[:3])
    more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
    return InvalidInput(f"invalid {where}: {described}{more}")


def parse(model: type[M], payload: bytes | str, where: str = "body") -> M:
    try:
        return model.model_validate_json(payload)
    except ValidationError as error:
        raise validation_error(error, where, payload) from None


async def read_body(request: Request) -> bytes:
    """The whole request body. Starlette's Request.body() reads it through an async generator, a few
    microseconds per request that a body which has all arrived (one message) does not need; a client that
    closes its connection before sending all of it gets ClientClosedRequest, not an internal error."""
    chunks: list[bytes] = []
    while True:
        message = await request.receive()
        if message["type"] != "http.request":
            raise ClientClosedRequest("the client closed the connection before it sent the whole request body")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
