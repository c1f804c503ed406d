"""HTTP and WebSocket routes. Thin: validate, hand to the engine, shape the answer."""

from __future__ import annotations

import contextlib
import re
from typing import Annotated

from fastapi import APIRouter, Depends, Request, WebSocket, WebSocketDisconnect
from lstm_serve.core.engine import Engine, LoadedModel, StepResult
from lstm_serve.errors import InvalidInput, NotReady, ServiceError, SessionNotFound
from lstm_serve.http.frontdoor import HotRoute
from lstm_serve.protocols.http import JSON, dumps, parse
from lstm_serve.protocols.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    ModelInfo,
    SessionCreated,
    SessionCreateRequest,
    SessionInfo,
    StepRequest,
    StepResponse,
)
from lstm_serve.state.sessions import SessionRecord, new_session_id
from starlette.responses import Response


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]
ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 409, 413, 422, 429, 503)}

router = APIRouter(responses=ERRORS)


@router.get("/healthz", tags=["health"])
async def healthz() -> JSON:
    return JSON({"status": "alive"})


async def check_ready(state, with_store: bool = True) -> None:
    """Ready: every model loaded and warm, not draining, and (with_store) the session store reachable."""
    if getattr(state, "draining", False):
        raise NotReady("draining: the server is shutting down and finishes the requests it receives meanwhile")
    if not getattr(state, "ready", False):
        raise NotReady("models are loading or the server is shutting down")
    if with_store and not await state.engine.store.ping():
        raise NotReady("the session store is unreachable")


@router.get("/readyz", tags=["health"])
async def readyz(request: Request) -> JSON:
    await check_ready(request.app.state)
    return JSON({"status": "ready", "models": sorted(request.app.state.engine.models)})


@router.get("/metrics", tags=["health"])
async def metrics(request: Request) -> Response:
    state = request.app.state
    for name, model in state.engine.models.items():
        state.metrics.queue_length.labels(name).set(model.batcher.queued)
    with contextlib.suppress(ServiceError):  # the store is down: /readyz says so; the rest still matters
        state.metrics.active_sessions.set(await state.engine.store.count())
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models", tags=["models"], response_model=list[ModelInfo])
async def list_models(engine: EngineDep) -> JSON:
    return JSON([model.describe() for model in engine.models.values()])


@router.get("/v1/models/{name}", tags=["models"], response_model=ModelInfo)
async def get_model(name: str, engine: EngineDep) -> JSON:
    return JSON(engine.model(name).describe())


# The session and classify routes are plain endpoints that the front door (service/frontdoor.py) calls directly,
# outside FastAPI. They parse their own bodies with the same pydantic schemas; service/openapi.py
# documents them in /docs.
async def classify(request: Request) -> JSON:
    engine: Engine = request.app.state.engine
    body = parse(ClassifyRequest, await request.body())
    model = engine.model(body.model)
    limit = engine.settings.max_sequences_per_request
    if len(body.sequences) > limit:
        raise InvalidInput(f"{len(body.sequences)} sequences in one request, over max_sequences_per_request={limit}")
    sequences = [engine.as_frames(raw, model, f"sequences[{i}]") for i, raw in enumerate(body.sequences)]
    predictions = await engine.classify(model, sequences)
    return JSON({"model": model.name, "version": model.version, "predictions": predictions})


# /v1 session ids live in their own part of the store: a client's id is never another protocol's key.
SESSION_PREFIX = "v1:"
PUBLIC_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def store_key(session_id: str) -> str:
    """The store key of a /v1 session id; an id /v1 never hands out is unknown, whatever the store holds."""
    if not PUBLIC_ID.fullmatch(session_id):
        raise SessionNotFound(f"no session {session_id[:80]!r} (never created, deleted, or expired)")
    return SESSION_PREFIX + session_id


def public_id(record: SessionRecord) -> str:
    return record.session_id.removeprefix(SESSION_PREFIX)


def describe_session(engine: Engine, record: SessionRecord) -> dict:
    prediction = None
    if record.last_probabilities is not None:
        prediction = engine.session_model(record).predict(record.last_probabilities)
    return {
        "session_id": public_id(record),
        "model": record.model,
        "version": record.version,
        "steps": record.steps,
        "created_at": record.created_at,
        "expires_at": record.last_used + engine.store.ttl_s,
        "prediction": prediction,
    }


def step_response(session_id: str, result: StepResult, return_steps: bool) -> dict:
    model = result.model
    response = {"session_id": session_id, "steps": result.steps, "prediction": model.predict(result.probabilities)}
    if return_steps:
        assert result.outputs is not None, "per-frame outputs were asked for"
        response["step_predictions"] = [model.predict(row) for row in result.outputs.probabilities]
    return response


async def create_session(request: Request) -> JSON:
    engine: Engine = request.app.state.engine
    raw = await request.body()
    body = parse(SessionCreateRequest, raw) if raw.strip() else SessionCreateRequest()
    model = engine.model(body.model)
    record = await engine.create_session(model, SESSION_PREFIX + new_session_id())
    info = describe_session(engine, record)
    return JSON({k: info[k] for k in ("session_id", "model", "version", "expires_at")}, status_code=201)


async def get_session(request: Request) -> JSON:
    engine: Engine = request.app.state.engine
    return JSON(describe_session(engine, await engine.get_session(store_key(request.path_params["session_id"]))))


async def delete_session(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    await engine.delete_session(store_key(request.path_params["session_id"]))
    return Response(status_code=204)


async def step(request: Request) -> JSON:
    engine: Engine = request.app.state.engine
    session_id = request.path_params["session_id"]
    key = store_key(session_id)
    body = parse(StepRequest, await request.body())
    to_frames = lambda model: engine.as_frames(body.inputs, model, "inputs")  # noqa: E731
    result = await engine.step(key, to_frames, body.seq, body.return_steps)
    return JSON(step_response(session_id, result, body.return_steps))


async def stream(websocket: WebSocket) -> None:
    """Each message is one chunk (JSON like the steps body, or binary little-endian float32 T x D);
    each reply is the steps response. A bad message gets an error reply; the socket stays open."""
    session_id = websocket.path_params["session_id"]
    engine: Engine = websocket.app.state.engine
    metrics = websocket.app.state.metrics
    await websocket.accept()
    try:
        model = engine.session_model(await engine.get_session(store_key(session_id)))
    except ServiceError as error:
        await websocket.send_text(dumps(error.body()).decode())
        await websocket.close(code=4404 if isinstance(error, SessionNotFound) else 1008)
        return
    route = "/v1/sessions/{session_id}/stream"
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            status = "200"
            try:
                reply = await stream_step(engine, model, session_id, message)
            except ServiceError as error:
                reply, status = error.body(), str(error.status)
                if isinstance(error, SessionNotFound):
                    await websocket.send_text(dumps(reply).decode())
                    await websocket.close(code=4404)
                    return
            metrics.requests.labels(route, "WS", status).inc()
            await websocket.send_text(dumps(reply).decode())
    except WebSocketDisconnect:
        return


async def stream_step(engine: Engine, model: LoadedModel, session_id: str, message: dict) -> dict:
    limit = engine.settings.max_body_bytes
    key = SESSION_PREFIX + session_id
    if message.get("bytes") is not None:
        payload = message["bytes"]
        if len(payload) > limit:
            raise InvalidInput(f"message of {len(payload)} bytes is over max_body_bytes={limit}")
        frames = engine.frames_from_bytes(payload, model, "binary message")
        return step_response(session_id, await engine.step(key, lambda _: frames, None, False), False)
    text = message.get("text") or ""
    if len(text) > limit:
        raise InvalidInput(f"message of {len(text)} characters is over max_body_bytes={limit}")
    body = parse(StepRequest, text, "message")
    frames = engine.as_frames(body.inputs, model, "inputs")
    result = await engine.step(key, lambda _: frames, body.seq, body.return_steps)
    return step_response(session_id, result, body.return_steps)


HOT_ROUTES = [
    HotRoute("POST", "/v1/classify", classify),
    HotRoute("POST", "/v1/sessions", create_session),
    HotRoute("GET", "/v1/sessions/{session_id}", get_session),
    HotRoute("DELETE", "/v1/sessions/{session_id}", delete_session),
    HotRoute("POST", "/v1/sessions/{session_id}/steps", step),
    HotRoute("WEBSOCKET", "/v1/sessions/{session_id}/stream", stream),
]
# (route, summary, request schema, response schema, status) for service/openapi.py
HOT_ROUTE_DOCS = [
    (HOT_ROUTES[0], "Classify whole sequences", ClassifyRequest, ClassifyResponse, 200),
    (HOT_ROUTES[1], "Start a streaming session", SessionCreateRequest, SessionCreated, 201),
    (HOT_ROUTES[2], "Read a session", None, SessionInfo, 200),
    (HOT_ROUTES[3], "End a session", None, None, 204),
    (HOT_ROUTES[4], "Feed frames to a session", StepRequest, StepResponse, 200),
]
