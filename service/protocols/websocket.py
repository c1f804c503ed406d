"""Streaming a /v1 session over a WebSocket: each message is one chunk, each reply the steps response.

A message is JSON like the steps body ({"inputs": [[...]], "seq": n, "return_steps": b}) or binary,
little-endian float32 frames, T x D, row by row, optionally after a 12-byte header that carries `seq`:
the bytes 53 51 c0 7f (a NaN as float32, so never a frame) and seq as a little-endian uint64; with it,
a binary chunk resent after a dropped socket is answered, not applied twice. A bad message (or one over
the caller's rate_limit) gets an error reply and the socket stays open; an unknown, deleted or expired
session (or another key's) gets an error reply and close code 4404. With API keys, send
`Authorization: Bearer <key>`, or from a browser the subprotocol `bearer.<key>`; without a valid key the
socket closes with 4401, and over the caller's rate or max_websockets_per_key with 4429. A page from an
origin not in cors_origins is refused (403). `?version=N` states the model version the client expects
the session to run on: a session on another version gets an error reply and close 1008, as does one on a
retired version (also once a streaming session's version retires); one whose version is loading, or whose
store is unavailable, gets its 503 and close 1013.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from lstm_serve.core.batcher import arrivals
from lstm_serve.core.engine import LoadedModel
from lstm_serve.core.inputs import Chunk, check_body_size, chunk_from_bytes, chunk_from_lists
from lstm_serve.core.repository import version_number
from lstm_serve.core.runtime import Runtime
from lstm_serve.errors import REJECTIONS, InvalidInput, ModelVersionRetired, ServiceError, SessionNotFound
from lstm_serve.protocols import schemas
from lstm_serve.protocols.codec import dumps
from lstm_serve.protocols.routing import V1, Route, context, v1_error_body
from lstm_serve.protocols.v1 import SESSION_ID, step_response, store_key

PATH = "/v1/sessions/{session_id}/stream"
CLOSE_UNKNOWN_SESSION = 4404
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013  # RFC 6455 "try again later": the session is there, its model or store is not yet


def opening_close(error: ServiceError) -> int:
    """How a socket that cannot stream its session closes, after the error reply that says why."""
    if isinstance(error, SessionNotFound):
        return CLOSE_UNKNOWN_SESSION
    return CLOSE_TRY_AGAIN if error.status in (429, 503) else CLOSE_POLICY


# A binary message may start with this 4-byte mark and the seq as a little-endian uint64: the mark is a NaN
# as float32, which no valid frame holds, so a message without it is read as frames alone, as before.
SEQ_MARK = b"\x53\x51\xc0\x7f"
SEQ_HEADER = len(SEQ_MARK) + 8


def split_seq_header(payload: bytes) -> tuple[int | None, bytes]:
    if payload[: len(SEQ_MARK)] != SEQ_MARK:
        return None, payload
    if len(payload) < SEQ_HEADER:
        raise InvalidInput("a binary message that starts with the seq mark needs 8 bytes of seq after it")
    return int.from_bytes(payload[len(SEQ_MARK) : SEQ_HEADER], "little"), payload[SEQ_HEADER:]


def check_version(wanted: str | None, model: LoadedModel) -> None:
    """`?version=N` on the URL: the client states the model version it expects the session to run on."""
    if wanted is not None and version_number(wanted) != model.version:  # "01" is 1, as in /v2 paths
        raise InvalidInput(
            f"this session runs on {model.name} v{model.version}, not version {wanted[:20]!r}: a session stays "
            "on the version it started on; start a new session for another"
        )


def error_reply(error: ServiceError, request_id: str | None = None) -> str:
    return dumps(v1_error_body(error, request_id)).decode()


async def stream(websocket: WebSocket, runtime: Runtime) -> None:
    session_id = websocket.path_params["session_id"]
    caller = context(websocket).caller
    await websocket.accept(subprotocol=context(websocket).subprotocol)
    try:
        key = store_key(session_id, caller.owner)
        model = runtime.engine.session_model(await runtime.engine.find_session(key))
        check_version(websocket.query_params.get("version"), model)
    except ServiceError as error:
        await websocket.send_text(error_reply(error, context(websocket).request_id))
        await websocket.close(code=opening_close(error))
        return
    metrics, limited = runtime.metrics, runtime.limiter is not None
    # the accepted socket's ASGI channels, without starlette's per-message state checks (this loop handles
    # the disconnect message itself, and the server refuses a send after a close)
    receive, send = websocket._receive, websocket._send
    try:
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return
            started = time.perf_counter()
            try:
                if limited:
                    await runtime.check_rate(caller)
                reply = dumps(await stream_step(runtime, model, session_id, key, message)).decode()
                status = "200"
            except ServiceError as error:
                reply, status = error_reply(error, context(websocket).request_id), str(error.status)
                if isinstance(error, REJECTIONS):
                    metrics.rejected.labels(error.code).inc()
                if isinstance(error, (SessionNotFound, ModelVersionRetired)):  # the session can never step again
                    await websocket.send_text(reply)
                    await websocket.close(code=opening_close(error))
                    return
            try:
                await send({"type": "websocket.send", "text": reply})
            except OSError:  # the client went away before its reply (the server's ClientDisconnected)
                return
            finally:  # counted even when the client is gone before its reply
                metrics.request_done(PATH, "WS", status, time.perf_counter() - started)
    except WebSocketDisconnect:
        return


async def stream_step(runtime: Runtime, model: LoadedModel, session_id: str, key: str, message: Any) -> dict[str, Any]:
    limits = runtime.limits
    payload = message.get("bytes")
    if payload is not None:
        check_body_size(len(payload), limits, "the WebSocket message")
        seq, frames = split_seq_header(payload)
        chunk = chunk_from_bytes(frames, model.entry, limits, "binary message")
        result = await runtime.engine.step(key, lambda _: chunk, seq, False, arrivals.waiting == 0)
        return step_response(session_id, result, False)
    text = message.get("text") or ""
    check_body_size(len(text), limits, "the WebSocket message")
    body = await runtime.decoder.run(len(text), schemas.decode_step, text, "message")  # a large one off the loop
    checked: Chunk = chunk_from_lists(body.inputs, model.entry, limits, "inputs")
    result = await runtime.engine.step(key, lambda _: checked, body.seq, body.return_steps, arrivals.waiting == 0)
    return step_response(session_id, result, body.return_steps)


def asyncapi_channel(runtime: Runtime) -> dict[str, Any]:
    """The message protocol, for the AsyncAPI document (http/openapi.py)."""
    widths = sorted({m.entry.input_dim for m in runtime.engine.models.values()})
    return {
        "address": PATH,
        "parameters": {"session_id": {"description": f"a session from POST /v1/sessions; {SESSION_ID['pattern']}"}},
        "description": __doc__,
        "messages": {
            "chunkJson": {
                "name": "chunk (JSON)",
                "contentType": "application/json",
                "payload": {"$ref": "#/components/schemas/StepRequest"},
            },
            "chunkBinary": {
                "name": "chunk (binary)",
                "contentType": "application/octet-stream",
                "payload": {
                    "type": "string",
                    "format": "binary",
                    "description": f"T x D little-endian float32 frames, D = the session model's input_dim "
                    f"(one of {widths}); optionally after a 12-byte seq header: 53 51 c0 7f, then seq as a "
                    "little-endian uint64",
                },
            },
            "reply": {
                "name": "reply",
                "contentType": "application/json",
                "payload": {"$ref": "#/components/schemas/StepResponse"},
            },
            "error": {
                "name": "error",
                "contentType": "application/json",
                "payload": {"$ref": "#/components/schemas/ErrorResponse"},
                "description": "a bad message (the socket stays open), or an unknown session (then close 4404)",
            },
        },
    }


ROUTES = [
    Route(
        "WEBSOCKET",
        PATH,
        stream,
        V1,
        "Stream a session's frames over a WebSocket",
        "sessions",
        parameters={"session_id": SESSION_ID},
        in_schema=False,
        description=__doc__ or "",
        channel=asyncapi_channel,
    ),
]
