"""HTTP and WebSocket routes. Thin: validate, hand to the engine, shape the answer."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Request, WebSocket, WebSocketDisconnect
from starlette.responses import Response

from service.engine import Engine
from service.errors import InvalidInput, NotReady, ServiceError, SessionNotFound
from service.http import JSON, json_body, parse, request_schema
from service.schemas import (
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


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]
ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 409, 413, 422, 429, 503)}

router = APIRouter(responses=ERRORS)


@router.get("/healthz", tags=["health"])
async def healthz() -> JSON:
    return JSON({"status": "alive"})


@router.get("/readyz", tags=["health"])
async def readyz(request: Request) -> JSON:
    state = request.app.state
    if not getattr(state, "ready", False):
        raise NotReady("models are loading or the server is shutting down")
    if not await state.engine.store.ping():
        raise NotReady("the session store is unreachable")
    return JSON({"status": "ready", "models": sorted(state.engine.models)})


@router.get("/metrics", tags=["health"])
async def metrics(request: Request) -> Response:
    state = request.app.state
    for name, model in state.engine.models.items():
        state.metrics.queue_length.labels(name).set(model.batcher.queued)
    state.metrics.active_sessions.set(await state.engine.store.count())
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models", tags=["models"], response_model=list[ModelInfo])
async def list_models(engine: EngineDep) -> JSON:
    return JSON([model.describe() for model in engine.models.values()])


@router.get("/v1/models/{name}", tags=["models"], response_model=ModelInfo)
async def get_model(name: str, engine: EngineDep) -> JSON:
    return JSON(engine.model(name).describe())


@router.post("/v1/classify", tags=["classify"], response_model=ClassifyResponse,
             openapi_extra=request_schema(ClassifyRequest))
async def classify(body: Annotated[ClassifyRequest, Depends(json_body(ClassifyRequest))], engine: EngineDep) -> JSON:
    model = engine.model(body.model)
    limit = engine.settings.max_sequences_per_request
    if len(body.sequences) > limit:
        raise InvalidInput(f"{len(body.sequences)} sequences in one request, over max_sequences_per_request={limit}")
    sequences = [engine.as_frames(raw, model, f"sequences[{i}]") for i, raw in enumerate(body.sequences)]
    predictions = await engine.classify(model, sequences)
    return JSON({"model": model.name, "version": model.version, "predictions": predictions})


@router.post("/v1/sessions", tags=["sessions"], status_code=201, response_model=SessionCreated,
             openapi_extra=request_schema(SessionCreateRequest))
async def create_session(request: Request, engine: EngineDep) -> JSON:
    raw = await request.body()
    body = parse(SessionCreateRequest, raw) if raw.strip() else SessionCreateRequest()
    record = await engine.create_session(engine.model(body.model))
    info = engine.describe_session(record)
    return JSON({k: info[k] for k in ("session_id", "model", "version", "expires_at")}, status_code=201)


@router.get("/v1/sessions/{session_id}", tags=["sessions"], response_model=SessionInfo)
async def get_session(session_id: str, engine: EngineDep) -> JSON:
    return JSON(engine.describe_session(await engine.get_session(session_id)))


@router.delete("/v1/sessions/{session_id}", tags=["sessions"], status_code=204)
async def delete_session(session_id: str, engine: EngineDep) -> Response:
    await engine.delete_session(session_id)
    return Response(status_code=204)


@router.post("/v1/sessions/{session_id}/steps", tags=["sessions"], response_model=StepResponse,
             openapi_extra=request_schema(StepRequest))
async def step(session_id: str, body: Annotated[StepRequest, Depends(json_body(StepRequest))],
               engine: EngineDep) -> JSON:
    record = await engine.get_session(session_id)
    frames = engine.as_frames(body.inputs, engine.session_model(record), "inputs")
    return JSON(await engine.step(session_id, frames, body.seq, body.return_steps))


@router.websocket("/v1/sessions/{session_id}/stream")
async def stream(websocket: WebSocket, session_id: str) -> None:
    """Each message is one chunk (JSON like the steps body, or binary little-endian float32 T x D);
    each reply is the steps response. A bad message gets an error reply; the socket stays open."""
    engine: Engine = websocket.app.state.engine
    metrics = websocket.app.state.metrics
    await websocket.accept()
    try:
        model = engine.session_model(await engine.get_session(session_id))
    except ServiceError as error:
        await websocket.send_text(orjson.dumps(error.body()).decode())
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
                    await websocket.send_text(orjson.dumps(reply).decode())
                    await websocket.close(code=4404)
                    return
            metrics.requests.labels(route, "WS", status).inc()
            await websocket.send_text(orjson.dumps(reply).decode())
    except WebSocketDisconnect:
        return


async def stream_step(engine: Engine, model, session_id: str, message: dict) -> dict:
    limit = engine.settings.max_body_bytes
    if message.get("bytes") is not None:
        payload = message["bytes"]
        if len(payload) > limit:
            raise InvalidInput(f"message of {len(payload)} bytes is over max_body_bytes={limit}")
        frames = engine.frames_from_bytes(payload, model, "binary message")
        return await engine.step(session_id, frames, None, False)
    text = message.get("text") or ""
    if len(text) > limit:
        raise InvalidInput(f"message of {len(text)} characters is over max_body_bytes={limit}")
    body = parse(StepRequest, text, "message")
    frames = engine.as_frames(body.inputs, model, "inputs")
    return await engine.step(session_id, frames, body.seq, body.return_steps)
