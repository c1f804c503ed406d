"""The Open Inference Protocol (KServe v2; Triton's HTTP/REST API) on the same engine as /v1.

Extensions: binary_tensor_data, classification, model_configuration, model_repository (protocols/repository.py)
and Triton's sequence extension,
whose sequence_id / sequence_start / sequence_end parameters map onto the engine's sessions, so a
sequence's h and c live in the same store (memory or Redis) as /v1 sessions. Errors are the spec's
`{"error": "<message>"}`; invalid input is a 400, as the spec and Triton answer it.
"""

from __future__ import annotations

import contextlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response

from lstm_serve.core.access import Caller
from lstm_serve.core.engine import LoadedModel
from lstm_serve.core.inputs import Chunk
from lstm_serve.core.repository import version_number
from lstm_serve.core.runner import Output
from lstm_serve.core.runtime import Runtime
from lstm_serve.errors import (
    InvalidInput,
    MalformedRequest,
    ModelNotFound,
    ModelVersionRetired,
    ServiceError,
    SessionNotFound,
    StepUnconfirmed,
    StoreUnavailable,
    UnsupportedMediaType,
)
from lstm_serve.protocols import oip_schemas as schemas
from lstm_serve.protocols.codec import JSON, dumps, read_body
from lstm_serve.protocols.oip_requests import (
    LOGITS,
    PROBABILITIES,
    Sequence,
    WantedOutput,
    decode_inference,
    input_names,
)
from lstm_serve.protocols.routing import OIP, Content, Reply, Route, context
from lstm_serve.protocols.schemas import default_example, example_model
from lstm_serve.protocols.tensors import HEADER_LENGTH, OutputTensor, write_response

EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository", "sequence"]
PLATFORM = "onnxruntime_onnx"
INFLATION = 1032  # the most a deflate stream inflates: a small compressed body may hold a large document


class SequenceNotStarted(ServiceError):
    status, code = 400, "sequence_not_started"


def server_version() -> str:
    try:
        return version("lstm-serve")
    except PackageNotFoundError:
        return "0+unknown"


# -- what a model looks like through the protocol ----------------------------------------------------
def metadata(model: LoadedModel, runtime: Runtime) -> dict[str, Any]:
    x, lengths = input_names(model.entry)
    D, C = model.entry.input_dim, len(model.entry.labels)
    return {
        "name": model.name,
        "versions": [str(v) for v in runtime.engine.fleet.versions_of(model.name, new_sessions=False)],
        "platform": PLATFORM,
        "inputs": [
            {"name": x, "datatype": "FP32", "shape": [-1, -1, D]},
            {"name": lengths, "datatype": "INT64", "shape": [-1]},
        ],
        "outputs": [
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, C]},
            {"name": LOGITS, "datatype": "FP32", "shape": [-1, -1, C]},
        ],
        "parameters": {
            "description": model.entry.description,
            "feature_names": model.entry.feature_names,
            "labels": model.entry.labels,
            "example": model.entry.example,
        },
    }


def configuration(model: LoadedModel, runtime: Runtime) -> dict[str, Any]:
    """Triton's model configuration: sequence batching with the implicit state the server keeps."""
    x, lengths = input_names(model.entry)
    D, C = model.entry.input_dim, len(model.entry.labels)
    return {
        "name": model.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": version_policy(runtime),
        "max_batch_size": runtime.settings.max_batch_size,
        "input": [
            {"name": x, "data_type": "TYPE_FP32", "dims": [-1, D]},
            {"name": lengths, "data_type": "TYPE_INT64", "dims": [1], "optional": True},
        ],
        "output": [
            {"name": PROBABILITIES, "data_type": "TYPE_FP32", "dims": [C]},
            {"name": LOGITS, "data_type": "TYPE_FP32", "dims": [-1, C]},
        ],
        "sequence_batching": {
            "max_sequence_idle_microseconds": int(runtime.settings.session_ttl_s * 1e6),
            "state": [
                {
                    "input_name": spec["input"],
                    "output_name": spec["output"],
                    "data_type": "TYPE_FP32",
                    "dims": list(spec["shape"]),
                }
                for spec in model.entry.state_specs
            ],
        },
        "parameters": {
            "labels": {"string_value": dumps(model.entry.labels).decode()},  # JSON: a label may hold a comma
            "feature_names": {"string_value": dumps(model.entry.feature_names).decode()},
            "description": {"string_value": model.entry.description},
            "example": {"string_value": dumps(model.entry.example).decode()},
            "cell": {"string_value": model.entry.config.get("cell", "lstm")},
        },
    }


def version_policy(runtime: Runtime) -> dict[str, Any]:
    newest = runtime.engine.fleet.policy.newest
    return {"all": {}} if newest is None else {"latest": {"num_versions": newest}}


def resolve(runtime: Runtime, params: dict[str, str]) -> LoadedModel:
    """The model of a /v2/models/{name}[/versions/{version}] path; without a version, its newest serving."""
    wanted = params.get("model_version")
    if wanted is None:
        return runtime.engine.model(params["model_name"])
    version = version_number(wanted)
    if version is None:
        raise ModelNotFound(f"model {params['model_name'][:80]!r} has no version {wanted[:20]!r}")
    return runtime.engine.model(params["model_name"], version)


# -- request -> sequences ------------------------------------------------------------------------
async def run_sequence(
    runtime: Runtime, model: LoadedModel, sequence: Sequence, chunk: Chunk, caller: Caller
) -> tuple[Output, int, LoadedModel]:
    """One request of a sequence: start = fresh state, otherwise continue it; end = free it afterwards.
    Sequence ids are the caller's own: two API keys may both use sequence_id 1. A sequence runs on the
    version it started on, whatever version later requests name: the model that ran is returned."""
    engine, session_id = runtime.engine, sequence.session_id(model.name, caller.owner)
    if sequence.start and sequence.end:  # the whole sequence in one request: nothing to keep
        (out,) = await engine.classify(model, [chunk])
        with contextlib.suppress(SessionNotFound):
            await engine.delete_session(session_id)
        return out, len(chunk), model
    try:
        if sequence.start:
            result = await engine.restart(model, session_id, chunk, caller.quota_key)
        else:
            result = await engine.step(session_id, lambda ran_on: same_width(chunk, ran_on), None, True)
    except SessionNotFound:
        raise SequenceNotStarted(
            f"inference request for sequence {sequence.id!r} to model {model.name!r} must specify "
            "sequence_start on the first request of the sequence (this one was never started, has ended, or "
            f"expired after session_ttl_s={engine.session_ttl_s:g} idle)"
        ) from None
    except StepUnconfirmed as unconfirmed:  # /v1's advice (resend with its seq) does not hold: no seq here
        raise StoreUnavailable(
            f"the session store did not confirm this request of sequence {sequence.id!r}: it may have been "
            "applied, and a sequence has no seq to resend it by (a resend may apply it twice); start the sequence "
            "again (sequence_start) with all its frames",
            headers=unconfirmed.headers,
        ) from None
    if sequence.end:
        with contextlib.suppress(SessionNotFound):
            await engine.delete_session(session_id)
    assert result.outputs is not None, "a sequence step asks for its per-frame outputs"
    return result.outputs, result.steps, result.model


def same_width(chunk: Chunk, model: LoadedModel) -> Chunk:
    if chunk.frames.shape[1] != model.entry.input_dim:
        raise InvalidInput(
            f"this sequence runs on {model.name} v{model.version}, which takes {model.entry.input_dim} features per "
            f"frame, not {chunk.frames.shape[1]}"
        )
    return chunk


# -- outputs -> response ----------------------------------------------------------------------------
def top_classes(values: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """The classification extension: top-k along the class axis as b"value:index:label"."""
    order = np.argsort(-values, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(values, order, axis=-1)
    cells = [f"{v:f}:{i}:{labels[i]}".encode() for v, i in zip(top.ravel(), order.ravel(), strict=True)]
    return np.array(cells, dtype=object).reshape(order.shape)


def output_tensors(
    model: LoadedModel, outs: list[Output], wanted: list[WantedOutput], steps: int
) -> list[OutputTensor]:
    """The outputs asked for; per-step ones [B, steps, C] like the input x, zero past each sequence's length."""
    tensors = []
    for want in wanted:
        if want.name == PROBABILITIES:
            array = np.stack([out.probabilities[-1] for out in outs])
        else:
            array = np.zeros((len(outs), steps, len(model.entry.labels)), np.float32)
            for row, out in enumerate(outs):
                array[row, : len(out.logits)] = out.logits
        if want.classes:
            tensors.append(
                OutputTensor(want.name, "BYTES", top_classes(array, want.classes, model.entry.labels), want.binary)
            )
        else:
            tensors.append(OutputTensor(want.name, "FP32", array, want.binary))
    return tensors


# -- endpoints -----------------------------------------------------------------------------------
async def server_metadata(request: Request, runtime: Runtime) -> Response:
    return JSON({"name": "lstm-serve", "version": server_version(), "extensions": EXTENSIONS})


async def server_live(request: Request, runtime: Runtime) -> Response:
    return Response(status_code=200)


async def server_ready(request: Request, runtime: Runtime) -> Response:
    await runtime.check_ready()
    return Response(status_code=200)


async def model_metadata(request: Request, runtime: Runtime) -> Response:
    return JSON(metadata(resolve(runtime, request.path_params), runtime))


async def model_ready(request: Request, runtime: Runtime) -> Response:
    resolve(runtime, request.path_params)
    await runtime.check_ready(with_store=False)
    return Response(status_code=200)


async def model_config(request: Request, runtime: Runtime) -> Response:
    return JSON(configuration(resolve(runtime, request.path_params), runtime))


def resolve_infer(runtime: Runtime, params: dict[str, str]) -> tuple[LoadedModel, ModelVersionRetired | None]:
    """The model an inference request is decoded for. A model unloaded whole still has sequences live on its
    draining versions, which Triton's clients continue and end on the path without a version: that path then
    decodes for the newest draining version, and its refusal stands for everything but those sequences."""
    try:
        return resolve(runtime, params), None
    except ModelVersionRetired as refusal:
        name = params["model_name"]
        live = runtime.engine.fleet.versions_of(name, new_sessions=False)
        if "model_version" in params or not live:
            raise
        return runtime.engine.fleet.model(name, live[-1]), refusal


def given_header_length(headers: Headers) -> str | None:
    given = headers.getlist(HEADER_LENGTH)
    if len(set(given)) > 1:  # a proxy that keeps another of them would frame the body otherwise
        raise MalformedRequest(f"the request has {len(given)} different Inference-Header-Content-Length headers")
    return given[0] if given else None


async def infer(request: Request, runtime: Runtime) -> Response:
    model, refusal = resolve_infer(runtime, request.path_params)
    body, headers = await read_body(request), request.headers
    encoding = headers.get("content-encoding")
    try:
        inference = await runtime.decoder.run(
            len(body) * INFLATION if encoding else len(body),  # where it is decoded: by what it may inflate to
            decode_inference,
            body,
            encoding,
            given_header_length(headers),
            model.entry,
            runtime.limits,
        )
    except (InvalidInput, MalformedRequest, UnsupportedMediaType):
        if refusal is not None:  # no sequence goes on in a body not read: the model is gone, whatever it held
            raise refusal from None
        raise
    if refusal is not None and (inference.sequence is None or inference.sequence.start):
        raise refusal
    head: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version)}
    if inference.request.id is not None:
        head["id"] = inference.request.id
    if inference.sequence is None:
        outs = await runtime.engine.classify(model, inference.chunks)
    else:
        caller = context(request).caller
        out, steps, model = await run_sequence(runtime, model, inference.sequence, inference.chunks[0], caller)
        head["model_version"] = str(model.version)
        outs = [out]
        head["parameters"] = {"sequence_id": inference.sequence.id, "sequence_steps": steps}
    content, header_length = write_response(head, output_tensors(model, outs, inference.wanted, inference.steps))
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(header_length)}
    )


# -- the routes ------------------------------------------------------------------------------------
MODEL = "/v2/models/{model_name}"
VERSION = "/v2/models/{model_name}/versions/{model_version}"
MODEL_PARAMETERS = {"model_name": {"type": "string"}}
VERSION_PARAMETERS = {**MODEL_PARAMETERS, "model_version": {"type": "string"}}
NO_MODEL = OIP.error(404, "no model of that name or version")
UNLOADED = OIP.error(410, "the model or version was unloaded (its drain may have ended)")
NOT_READY = OIP.error(503, "loading, or draining after SIGTERM")


def json_reply(schema: Any, description: str = "OK") -> Reply:
    return Reply(200, description, (Content("application/json", schema),))


def model_routes(base: str, parameters: dict[str, dict[str, Any]]) -> list[Route]:
    versioned = " (one version)" if "versions" in base else ""
    return [
        Route(
            "POST",
            f"{base}/infer",
            infer,
            OIP,
            f"Inference{versioned}",
            "open inference protocol",
            request=(
                Content("application/json", schemas.InferenceRequest, inference_example),
                Content("application/octet-stream", {"type": "string", "format": "binary"}),
            ),
            untyped_body=True,
            compressed_body=True,
            parameters=parameters,
            description=INFER_DESCRIPTION,
            replies=(
                Reply(
                    200,
                    "OK: JSON outputs, or a JSON header and binary outputs when binary data was asked for",
                    (
                        Content("application/json", schemas.InferenceResponse),
                        Content("application/octet-stream", {"type": "string", "format": "binary"}),
                    ),
                ),
                OIP.error(400, "the request, its tensors or its sequence parameters are not what the model takes"),
                NO_MODEL,
                OIP.error(409, "the sequence was restarted while this request ran; it was not applied"),
                UNLOADED,
                OIP.error(413, "the body (or the decompressed body) is over max_body_bytes"),
                OIP.error(415, "a Content-Type or Content-Encoding the server does not take"),
                OIP.error(429, "sequence_start when the server holds max_sessions", ("Retry-After",)),
                OIP.error(503, "the model's queue is full, or the session store is unreachable", ("Retry-After",)),
            ),
        ),
        Route(
            "GET",
            base,
            model_metadata,
            OIP,
            f"Model metadata{versioned}",
            "open inference protocol",
            parameters=parameters,
            replies=(json_reply(schemas.ModelMetadata), NO_MODEL, UNLOADED),
        ),
        Route(
            "GET",
            f"{base}/ready",
            model_ready,
            OIP,
            f"Model ready{versioned}",
            "open inference protocol",
            parameters=parameters,
            replies=(Reply(200, "ready"), NO_MODEL, UNLOADED, NOT_READY),
        ),
        Route(
            "GET",
            f"{base}/config",
            model_config,
            OIP,
            f"Model configuration (Triton){versioned}",
            "open inference protocol",
            parameters=parameters,
            replies=(json_reply({"type": "object"}, "Triton's model configuration"), NO_MODEL, UNLOADED),
        ),
    ]


def inference_example(runtime: Runtime) -> dict[str, Any]:
    model = example_model(runtime)
    frames = default_example(runtime)
    return {
        "id": "example",
        "inputs": [
            {
                "name": model.entry.frames_input if model else "x",
                "datatype": "FP32",
                "shape": [1, len(frames), len(frames[0])],
                "data": [value for frame in frames for value in frame],
            }
        ],
        "outputs": [{"name": PROBABILITIES, "parameters": {"classification": 1}}],
    }


INFER_DESCRIPTION = (
    "Input `x` FP32 [B, T, D] and optionally `lengths` INT64 [B]; outputs `probabilities` [B, C] and `logits` "
    "[B, T, C]. Tensors as JSON `data` or as binary tensor data after the JSON header "
    "(`Inference-Header-Content-Length`). Sequences: `parameters.sequence_id` with `sequence_start` / "
    "`sequence_end`; x is then [1, T, D]."
)

ROUTES = [
    Route(
        "GET",
        "/v2",
        server_metadata,
        OIP,
        "Server metadata",
        "open inference protocol",
        replies=(json_reply(schemas.ServerMetadata),),
    ),
    Route(
        "GET",
        "/v2/health/live",
        server_live,
        OIP,
        "Server live",
        "open inference protocol",
        replies=(Reply(200, "live"),),
        public=True,
    ),
    Route(
        "GET",
        "/v2/health/ready",
        server_ready,
        OIP,
        "Server ready",
        "open inference protocol",
        replies=(Reply(200, "ready"), OIP.error(503, "loading, draining, or the session store is unreachable")),
        public=True,
    ),
    *model_routes(MODEL, MODEL_PARAMETERS),
    *model_routes(VERSION, VERSION_PARAMETERS),
]
