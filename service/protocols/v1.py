"""The /v1 API: models, classification, and streaming sessions over HTTP. Each endpoint decodes its
request into checked chunks, calls the engine, and renders the engine's typed result as /v1 JSON."""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from lstm_serve.core.engine import LoadedModel, Prediction, StepResult
from lstm_serve.core.inputs import chunk_from_lists
from lstm_serve.core.runtime import Runtime
from lstm_serve.errors import SessionNotFound
from lstm_serve.protocols import schemas
from lstm_serve.protocols.codec import JSON, parse
from lstm_serve.protocols.routing import V1, Content, Reply, Route
from lstm_serve.state.sessions import SessionRecord, new_session_id

# /v1 session ids live in their own part of the store: a client's id is never another protocol's key.
SESSION_PREFIX = "v1:"
PUBLIC_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
SESSION_ID = {"type": "string", "pattern": f"^{PUBLIC_ID.pattern}$"}


def store_key(session_id: str) -> str:
    """The store key of a /v1 session id; an id /v1 never hands out is unknown, whatever the store holds."""
    if not PUBLIC_ID.fullmatch(session_id):
        raise SessionNotFound(f"no session {session_id[:80]!r} (never created, deleted, or expired)")
    return SESSION_PREFIX + session_id


# -- rendering -----------------------------------------------------------------------------------
def prediction(p: Prediction) -> dict[str, Any]:
    """The probabilities stay a float32 array: orjson writes it in C, several times faster than floats."""
    return {"label": p.label, "class_id": p.class_id, "probabilities": p.probabilities}


def describe_model(model: LoadedModel) -> dict[str, Any]:
    config = model.entry.config
    return {
        "name": model.name,
        "version": model.version,
        "labels": model.entry.labels,
        "input_dim": model.entry.input_dim,
        "cell": config.get("cell", "lstm"),
        "hidden_size": config.get("hidden_size"),
        "num_layers": config.get("num_layers"),
        "state": [spec["input"] for spec in model.entry.state_specs],
        "metrics": config.get("metrics", {}),
        "execution_provider": model.runner.provider,
        "example": model.entry.example,
    }


def describe_session(runtime: Runtime, record: SessionRecord) -> dict[str, Any]:
    last = record.last_probabilities
    return {
        "session_id": record.session_id.removeprefix(SESSION_PREFIX),
        "model": record.model,
        "version": record.version,
        "steps": record.steps,
        "created_at": record.created_at,
        "expires_at": record.last_used + runtime.engine.session_ttl_s,
        "prediction": None if last is None else prediction(runtime.engine.session_model(record).predict(last)),
    }


def step_response(session_id: str, result: StepResult, return_steps: bool) -> dict[str, Any]:
    model = result.model
    response: dict[str, Any] = {
        "session_id": session_id,
        "steps": result.steps,
        "prediction": prediction(model.predict(result.probabilities)),
    }
    if return_steps:
        assert result.outputs is not None, "per-frame outputs were asked for"
        response["step_predictions"] = [prediction(model.predict(row)) for row in result.outputs.probabilities]
    return response


# -- endpoints -------------------------------------------------------------------------------------
async def list_models(request: Request, runtime: Runtime) -> Response:
    return JSON([describe_model(model) for model in runtime.engine.models.values()])


async def get_model(request: Request, runtime: Runtime) -> Response:
    return JSON(describe_model(runtime.engine.model(request.path_params["name"])))


async def classify(request: Request, runtime: Runtime) -> Response:
    body = await request.body()
    name, chunks = await runtime.decoder.run(len(body), schemas.decode_classify, body, runtime.engine.catalogue)
    model = runtime.engine.model(name)
    outputs = await runtime.engine.classify(model, chunks)
    predictions = [prediction(model.predict(out.probabilities[-1])) for out in outputs]
    return JSON({"model": model.name, "version": model.version, "predictions": predictions})


async def create_session(request: Request, runtime: Runtime) -> Response:
    raw = await request.body()
    body = parse(schemas.SessionCreateRequest, raw) if raw.strip() else schemas.SessionCreateRequest()
    model = runtime.engine.model(body.model)
    record = await runtime.engine.create_session(model, SESSION_PREFIX + new_session_id())
    info = describe_session(runtime, record)
    return JSON({k: info[k] for k in ("session_id", "model", "version", "expires_at")}, status_code=201)


async def get_session(request: Request, runtime: Runtime) -> Response:
    record = await runtime.engine.get_session(store_key(request.path_params["session_id"]))
    return JSON(describe_session(runtime, record))


async def delete_session(request: Request, runtime: Runtime) -> Response:
    await runtime.engine.delete_session(store_key(request.path_params["session_id"]))
    return Response(status_code=204)


async def step(request: Request, runtime: Runtime) -> Response:
    session_id = request.path_params["session_id"]
    key = store_key(session_id)
    raw = await request.body()
    body = await runtime.decoder.run(len(raw), schemas.decode_step, raw)
    result = await runtime.engine.step(
        key,
        lambda model: chunk_from_lists(body.inputs, model.entry, runtime.limits, "inputs"),
        body.seq,
        body.return_steps,
    )
    return JSON(step_response(session_id, result, body.return_steps))


# -- the routes ------------------------------------------------------------------------------------
def ok(schema: Any, status: int = 200, description: str = "OK") -> Reply:
    return Reply(status, description, (Content("application/json", schema),))


def json_request(schema: Any, example: Any = None) -> tuple[Content, ...]:
    return (Content("application/json", schema, example),)


MALFORMED = V1.error(400, "`malformed_request`: the body is not valid JSON")
TOO_LARGE = V1.error(413, "`body_too_large`: the body is over max_body_bytes")
NOT_JSON = V1.error(415, "`unsupported_media_type`: the body is not `application/json`")
INVALID = V1.error(422, "`invalid_input`: the body does not fit the model or the limits; the message says where")
NO_MODEL = V1.error(404, "`model_not_found`: no model of that name")
NO_SESSION = V1.error(404, "`session_not_found`: never created, deleted, or expired")
STORE_DOWN = V1.error(503, "`session_store_unavailable`: the session store is unreachable", ("Retry-After",))
QUEUE_OR_STORE = V1.error(
    503, "`overloaded` (the model's queue is full) or `session_store_unavailable`", ("Retry-After",)
)
SESSION = {"session_id": SESSION_ID}

ROUTES = [
    Route(
        "GET", "/v1/models", list_models, V1, "List the models served", "models", replies=(ok(list[schemas.ModelInfo]),)
    ),
    Route(
        "GET",
        "/v1/models/{name}",
        get_model,
        V1,
        "Describe one model",
        "models",
        replies=(ok(schemas.ModelInfo), NO_MODEL),
        parameters={"name": {"type": "string"}},
    ),
    Route(
        "POST",
        "/v1/classify",
        classify,
        V1,
        "Classify whole sequences",
        "classify",
        request=json_request(schemas.classify_schema, schemas.classify_example),
        replies=(
            ok(schemas.ClassifyResponse),
            MALFORMED,
            NO_MODEL,
            TOO_LARGE,
            NOT_JSON,
            INVALID,
            V1.error(503, "`overloaded`: the model's queue is full, retry after Retry-After", ("Retry-After",)),
        ),
        description="Each sequence runs from zero state; sequences may differ in length. The prediction is "
        "the model's verdict after each sequence's last frame.",
    ),
    Route(
        "POST",
        "/v1/sessions",
        create_session,
        V1,
        "Start a streaming session",
        "sessions",
        request=json_request(schemas.session_create_schema, lambda runtime: {"model": runtime.engine.default_model}),
        body_required=False,
        replies=(
            ok(schemas.SessionCreated, 201, "Created"),
            MALFORMED,
            NO_MODEL,
            TOO_LARGE,
            NOT_JSON,
            INVALID,
            V1.error(
                429, "`too_many_sessions`: the server holds max_sessions; retry after Retry-After", ("Retry-After",)
            ),
            STORE_DOWN,
        ),
    ),
    Route(
        "GET",
        "/v1/sessions/{session_id}",
        get_session,
        V1,
        "Read a session",
        "sessions",
        replies=(ok(schemas.SessionInfo), NO_SESSION, STORE_DOWN),
        parameters=SESSION,
    ),
    Route(
        "DELETE",
        "/v1/sessions/{session_id}",
        delete_session,
        V1,
        "End a session",
        "sessions",
        replies=(Reply(204, "Deleted"), NO_SESSION, STORE_DOWN),
        parameters=SESSION,
    ),
    Route(
        "POST",
        "/v1/sessions/{session_id}/steps",
        step,
        V1,
        "Feed frames to a session",
        "sessions",
        request=json_request(schemas.step_schema, schemas.step_example),
        replies=(
            ok(schemas.StepResponse),
            MALFORMED,
            NO_SESSION,
            V1.error(
                409,
                "`seq_conflict` (with `expected_seq`): seq is not the frames the session has "
                "consumed; or `session_restarted`",
            ),
            TOO_LARGE,
            NOT_JSON,
            INVALID,
            QUEUE_OR_STORE,
        ),
        parameters=SESSION,
        description="Applies the chunk exactly once, in order. With `seq` (the frames the client believes the "
        "session has consumed), the same chunk sent again with the same `seq` is answered without being applied "
        "again: a safe retry. The frames must have the width of the session's model.",
    ),
]
