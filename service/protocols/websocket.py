"""Streaming a /v1 session over a WebSocket: each message is one chunk, each reply the steps response.

A message is JSON like the steps body ({"inputs": [[...]], "seq": n, "return_steps": b}) or binary,
little-endian float32 frames, T x D, row by row. A bad message gets an error reply and the socket stays
open; an unknown, deleted or expired session gets an error reply and close code 4404.
"""

from __future__ import annotations

from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from lstm_serve.core.engine import LoadedModel
from lstm_serve.core.inputs import Chunk, check_body_size, chunk_from_bytes, chunk_from_lists
from lstm_serve.core.runtime import Runtime
from lstm_serve.errors import ServiceError, SessionNotFound
from lstm_serve.protocols import schemas
from lstm_serve.protocols.codec import dumps, parse
from lstm_serve.protocols.routing import V1, Route
from lstm_serve.protocols.v1 import SESSION_ID, SESSION_PREFIX, step_response, store_key

PATH = "/v1/sessions/{session_id}/stream"
CLOSE_UNKNOWN_SESSION = 4404
CLOSE_POLICY = 1008


def error_reply(error: ServiceError) -> str:
    return dumps({"error": {"code": error.code, "message": error.message, **error.details}}).decode()


async def stream(websocket: WebSocket, runtime: Runtime) -> None:
    session_id = websocket.path_params["session_id"]
    await websocket.accept()
    try:
        model = runtime.engine.session_model(await runtime.engine.get_session(store_key(session_id)))
    except ServiceError as error:
        await websocket.send_text(error_reply(error))
        await websocket.close(code=CLOSE_UNKNOWN_SESSION if isinstance(error, SessionNotFound) else CLOSE_POLICY)
        return
    count = runtime.metrics.requests
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                reply = dumps(await stream_step(runtime, model, session_id, message)).decode()
                status = "200"
            except ServiceError as error:
                reply, status = error_reply(error), str(error.status)
                if isinstance(error, SessionNotFound):
                    await websocket.send_text(reply)
                    await websocket.close(code=CLOSE_UNKNOWN_SESSION)
                    return
            count.labels(PATH, "WS", status).inc()
            await websocket.send_text(reply)
    except WebSocketDisconnect:
        return


async def stream_step(runtime: Runtime, model: LoadedModel, session_id: str, message: Any) -> dict[str, Any]:
    key, limits = SESSION_PREFIX + session_id, runtime.limits
    payload = message.get("bytes")
    if payload is not None:
        check_body_size(len(payload), limits, "the WebSocket message")
        chunk = chunk_from_bytes(payload, model.entry, limits, "binary message")
        return step_response(session_id, await runtime.engine.step(key, lambda _: chunk, None, False), False)
    text = message.get("text") or ""
    check_body_size(len(text), limits, "the WebSocket message")
    body = parse(schemas.StepRequest, text, "message")
    checked: Chunk = chunk_from_lists(body.inputs, model.entry, limits, "inputs")
    result = await runtime.engine.step(key, lambda _: checked, body.seq, body.return_steps)
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
                    f"(one of {widths}); no seq: a binary chunk is applied as it comes",
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
