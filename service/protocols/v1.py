"""The /v1 API: models, classification, and streaming sessions over HTTP. Each endpoint decodes its
request into checked chunks, calls the engine, and renders the engine's typed result as /v1 JSON."""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from lstm_serve.core import session_state
from lstm_serve.core.engine import LoadedModel, Prediction, StepResult
from lstm_serve.core.inputs import chunk_from_lists
from lstm_serve.core.runtime import Runtime
from lstm_serve.core.session_state import Exported
from lstm_serve.errors import InvalidInput, SessionNotFound
from lstm_serve.ids import caller_id
from lstm_serve.protocols import schemas
from lstm_serve.protocols.codec import JSON, read_body
from lstm_serve.protocols.routing import V1, Content, Reply, Route, context
from lstm_serve.state.sessions import SessionRecord, new_session_id

# /v1 session ids live in their own part of the store, and each key's in its own part of that: a client's
# id is never another protocol's key, and a session is unknown (404) to every key but its owner's.
SESSION_PREFIX = "v1:"
PUBLIC_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
SESSION_ID = {"type": "string", "pattern": f"^{PUBLIC_ID.pattern}$"}


def store_key(session_id: str, owner: str) -> str:
    """The store key of a /v1 session id for its owner; an id /v1 never hands out is unknown, whatever the
    store holds."""
    if not PUBLIC_ID.fullmatch(session_id):
        raise SessionNotFound(f"no session {session_id[:80]!r} (never created, deleted, or expired)")
    return f"{SESSION_PREFIX}{owner}:{session_id}"


def session_key(request: Request | WebSocket) -> str:
    """The store key of the session a request names, for the request's caller."""
    return store_key(request.path_params["session_id"], context(request).caller.owner)


# -- rendering -----------------------------------------------------------------------------------
def prediction(p: Prediction) -> dict[str, Any]:
    """The probabilities stay a float32 array: orjson writes it in C, several times faster than floats."""
    return {"label": p.label, "class_id": p.class_id, "probabilities": p.probabilities}


def describe_model(model: LoadedModel, runtime: Runtime) -> dict[str, Any]:
    config = model.entry.config
    return {
        "name": model.name,
        "version": model.version,
        "versions": runtime.engine.fleet.version_states(model.name),
        "description": model.entry.description,
        "labels": model.entry.labels,
        "input_dim": model.entry.input_dim,
        "feature_names": model.entry.feature_names,
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
        "session_id": caller_id(record.session_id),
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
        "prediction": prediction(model.predict(result.probabilities, result.class_id)),
    }
    if return_steps:
        assert result.outputs is not None, "per-frame outputs were asked for"
        response["step_predictions"] = [prediction(model.predict(row)) for row in result.outputs.probabilities]
    return response


# -- endpoints -------------------------------------------------------------------------------------
async def list_models(request: Request, runtime: Runtime) -> Response:
    return JSON([describe_model(model, runtime) for model in runtime.engine.models.values()])


async def get_model(request: Request, runtime: Runtime) -> Response:
    return JSON(describe_model(runtime.engine.model(request.path_params["name"]), runtime))


async def classify(request: Request, runtime: Runtime) -> Response:
    body = await read_body(request)
    name, version, chunks = await runtime.decoder.run(
        len(body), schemas.decode_classify, body, runtime.engine.catalogue
    )
    model = runtime.engine.model(name, version)
    outputs = await runtime.engine.classify(model, chunks)
    predictions = [prediction(model.predict(out.probabilities[-1], out.class_id)) for out in outputs]
    return JSON({"model": model.name, "version": model.version, "predictions": predictions})


async def create_session(request: Request, runtime: Runtime) -> Response:
    """A new session from zero state, or (with `state`) from a state exported by GET .../state."""
    raw = await read_body(request)
    body = (
        await runtime.decoder.run(len(raw), schemas.decode_session_create, raw)
        if raw
        else schemas.SessionCreateRequest()
    )
    caller = context(request).caller
    session_id = new_session_id()
    key = store_key(session_id, caller.owner)
    if body.state is not None:
        model, exported = checked_import(runtime, body.model, body.version, body.state)
        record = await runtime.engine.import_session(model, key, caller.quota_key, exported)
    else:
        model = runtime.engine.model(body.model, body.version)
        record = await runtime.engine.create_session(model, key, caller.quota_key)
    context(request).session_id = session_id
    info = describe_session(runtime, record)
    created = {k: info[k] for k in ("session_id", "model", "version", "steps", "expires_at")}
    return JSON({**created, "input_dim": model.entry.input_dim}, status_code=201)


async def get_session(request: Request, runtime: Runtime) -> Response:
    record = await runtime.engine.get_session(session_key(request))
    return JSON(describe_session(runtime, record))


async def delete_session(request: Request, runtime: Runtime) -> Response:
    await runtime.engine.delete_session(session_key(request))
    return Response(status_code=204)


async def export_state(request: Request, runtime: Runtime) -> Response:
    record = await runtime.engine.get_session(session_key(request))
    model = runtime.engine.session_model(record)
    return JSON(session_state.export(model.entry, record))


def checked_import(
    runtime: Runtime, named: str | None, version: int | None, state: dict[str, Any]
) -> tuple[LoadedModel, Exported]:
    """The model an exported state is for (it must be served, at its version) and its checked tensors."""
    name = state.get("model") if isinstance(state, dict) else None
    of = state.get("version") if isinstance(state, dict) else None
    if named is not None and name is not None and named != name:
        raise InvalidInput(f"the body names model {named!r} but the state is of {name!r}")
    if version is not None and of is not None and version != of:
        raise InvalidInput(f"the body names version {version} but the state is of version {str(of)[:20]}")
    served = (  # draining versions too: the import then answers 410 as a new session on that version does
        isinstance(of, int) and not isinstance(of, bool) and of in runtime.engine.fleet.versions_of(str(name), False)
    )
    model = runtime.engine.model(name if isinstance(name, str) else None, of if served else None)
    return model, session_state.check(model.entry, state)


async def step(request: Request, runtime: Runtime) -> Response:
    session_id = request.path_params["session_id"]
    key = session_key(request)
    raw = await read_body(request)
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
                429,
                "`too_many_sessions`: the server holds max_sessions, or the API key max_sessions_per_key; retry "
                "after Retry-After",
                ("Retry-After",),
            ),
            STORE_DOWN,
        ),
        description="Starts from zero state, or with `state` (from GET /v1/sessions/{session_id}/state, on any "
        "server of the same model version) continues from it under a new id. A state that does not fit the model, "
        "or does not match its sha256, is refused with 422 saying what.",
    ),
    Route(
        "GET",
        "/v1/sessions/{session_id}/state",
        export_state,
        V1,
        "Export a session's state",
        "sessions",
        replies=(ok(schemas.SessionState), NO_SESSION, STORE_DOWN),
        parameters=SESSION,
        description="The recurrent state (h and c) with the frames consumed: POST it to /v1/sessions as `state` "
        "to continue the session on another server, after a restart, or in another region.",
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
