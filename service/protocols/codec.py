"""JSON on the wire: reading a request body into a schema (large ones off the event loop), and the
JSON response that writes numpy arrays directly."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from lstm_serve.errors import InvalidInput, MalformedRequest, ServiceError

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

# Parsing JSON holds the interpreter: a few MB take tens of milliseconds. Bodies this large are parsed in a
# worker thread, so the event loop keeps answering (health checks, other requests) in the meantime. One
# thread: parsers hold the GIL, so more threads would not parse faster, only take more turns from the loop.
OFF_LOOP_BYTES = 128 * 1024
DECODER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")


def dumps(content: Any) -> bytes:
    """JSON bytes; numpy arrays (the probabilities) are written by orjson directly."""
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


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


async def off_loop(size: int, work: Callable[[], T]) -> T:
    """work(), in a worker thread when `size` (the bytes it reads or writes) is large."""
    if size < OFF_LOOP_BYTES:
        return work()
    return await asyncio.get_running_loop().run_in_executor(DECODER, work)


async def decode(body: bytes, decoder: Callable[[bytes], T]) -> T:
    """decoder(body), in a worker thread when the body is large."""
    return await off_loop(len(body), lambda: decoder(body))
