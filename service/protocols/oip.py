"""The Open Inference Protocol (KServe v2; Triton's HTTP/REST API) on the same engine as /v1.

Extensions: binary_tensor_data, classification, model_configuration and Triton's sequence extension,
whose sequence_id / sequence_start / sequence_end parameters map onto the engine's sessions, so a
sequence's h and c live in the same store (memory or Redis) as /v1 sessions. Errors are the spec's
`{"error": "<message>"}`; invalid input is a 400, as the spec and Triton answer it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import numpy as np
from lstm_serve.core.engine import Engine, LoadedModel
from lstm_serve.core.runner import Output
from lstm_serve.errors import InvalidInput, ModelNotFound, NotFound, ServiceError, SessionNotFound
from lstm_serve.http.frontdoor import HotRoute
from lstm_serve.protocols.http import JSON
from lstm_serve.protocols.schemas import InferenceRequest, InferenceResponse, ModelMetadata, ServerMetadata
from lstm_serve.protocols.tensors import DTYPES, HEADER_LENGTH, OutputTensor, decompress, read_request, write_response
from lstm_serve.protocols.v1 import check_ready
from starlette.requests import Request
from starlette.responses import Response

EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "sequence"]
PLATFORM = "onnxruntime_onnx"
PROBABILITIES, LOGITS = "probabilities", "logits"
DATATYPE_OF = {np.dtype(dtype): name for name, dtype in DTYPES.items()}
MAX_SEQUENCE_ID_CHARS = 256


class SequenceNotStarted(ServiceError):
    status, code = 400, "sequence_not_started"


def render_error(error: ServiceError) -> JSON:
    return JSON(
        {"error": error.message}, status_code=400 if error.status == 422 else error.status, headers=error.headers
    )


def server_version() -> str:
    try:
        return version("lstm-serve")
    except PackageNotFoundError:
        return "0+unknown"


# -- what a model looks like through the protocol ----------------------------------------------------
def input_names(model: LoadedModel) -> tuple[str, str]:
    return model.runner.frames_input, model.runner.lengths_input or "lengths"


def metadata(model: LoadedModel) -> dict:
    x, lengths = input_names(model)
    D, C = model.entry.input_dim, len(model.entry.labels)
    return {
        "name": model.name,
        "versions": [str(model.version)],
        "platform": PLATFORM,
        "inputs": [
            {"name": x, "datatype": "FP32", "shape": [-1, -1, D]},
            {"name": lengths, "datatype": "INT64", "shape": [-1]},
        ],
        "outputs": [
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, C]},
            {"name": LOGITS, "datatype": "FP32", "shape": [-1, -1, C]},
        ],
    }


def configuration(model: LoadedModel, engine: Engine) -> dict:
    """Triton's model configuration: sequence batching with the implicit state the server keeps."""
    x, lengths = input_names(model)
    D, C = model.entry.input_dim, len(model.entry.labels)
    return {
        "name": model.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": {"specific": {"versions": [str(model.version)]}},
        "max_batch_size": engine.settings.max_batch_size,
        "input": [
            {"name": x, "data_type": "TYPE_FP32", "dims": [-1, D]},
            {"name": lengths, "data_type": "TYPE_INT64", "dims": [1], "optional": True},
        ],
        "output": [
            {"name": PROBABILITIES, "data_type": "TYPE_FP32", "dims": [C]},
            {"name": LOGITS, "data_type": "TYPE_FP32", "dims": [-1, C]},
        ],
        "sequence_batching": {
            "max_sequence_idle_microseconds": int(engine.settings.session_ttl_s * 1e6),
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
            "labels": {"string_value": ",".join(model.entry.labels)},
            "cell": {"string_value": model.entry.config.get("cell", "lstm")},
        },
    }


def resolve(engine: Engine, params: dict) -> LoadedModel:
    model = engine.model(params["model_name"])
    wanted = params.get("model_version")
    if wanted is not None and wanted != str(model.version):
        raise ModelNotFound(
            f"model {model.name!r} has no version {wanted!r}; this server serves version {model.version}"
        )
    return model


# -- request -> sequences ------------------------------------------------------------------------
def datatype_of(array: np.ndarray) -> str:
    return DATATYPE_OF.get(array.dtype, str(array.dtype))


def model_sequences(engine: Engine, model: LoadedModel, tensors: dict[str, np.ndarray]) -> list[np.ndarray]:
    """x [B, T, D] FP32 and optional lengths [B] -> B sequences of (T_b, D) frames."""
    x_name, lengths_name = input_names(model)
    D, settings = model.entry.input_dim, engine.settings
    takes = f"model {model.name!r} takes {x_name!r} FP32 [B, T, {D}] and optionally {lengths_name!r} INT64 [B]"
    unknown = sorted(set(tensors) - {x_name, lengths_name})
    if unknown:
        raise InvalidInput(f"unexpected inference input {unknown[0]!r}: {takes}")
    if x_name not in tensors:
        raise InvalidInput(f"input {x_name!r} is missing: {takes}")
    x = tensors[x_name]
    if x.dtype != np.float32:
        raise InvalidInput(f"input {x_name!r} has datatype {datatype_of(x)}, but {takes}")
    if x.ndim != 3 or x.shape[2] != D or 0 in x.shape:
        raise InvalidInput(f"input {x_name!r} has shape {list(x.shape)}, but {takes} (B, T >= 1)")
    batch, steps, _ = x.shape
    if batch > settings.max_sequences_per_request:
        raise InvalidInput(
            f"{batch} sequences in one request, over max_sequences_per_request={settings.max_sequences_per_request}"
        )
    if steps > settings.max_sequence_length:
        raise InvalidInput(f"{steps} time steps, over max_sequence_length={settings.max_sequence_length}")
    lengths = np.full(batch, steps)
    if lengths_name in tensors:
        given = tensors[lengths_name]
        if given.dtype not in (np.int64, np.int32):
            raise InvalidInput(f"input {lengths_name!r} has datatype {datatype_of(given)}; it takes INT64 (or INT32)")
        if given.shape != (batch,) or given.min() < 1 or given.max() > steps:
            raise InvalidInput(f"input {lengths_name!r} must hold {batch} lengths between 1 and T={steps}")
        lengths = given
    return [engine.check_finite(x[b, : lengths[b]], f"{x_name}[{b}]") for b in range(batch)]


@dataclass(frozen=True)
class WantedOutput:
    name: str
    binary: bool
    classes: int  # > 0: the classification extension's top-k as BYTES "value:index:label"


def wanted_outputs(request: InferenceRequest, model: LoadedModel) -> list[WantedOutput]:
    binary_default = request.parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInput("parameters.binary_data_output must be a boolean")
    if request.outputs is None:
        return [WantedOutput(name, binary_default, 0) for name in (PROBABILITIES, LOGITS)]
    wanted, C = [], len(model.entry.labels)
    for out in request.outputs:
        if out.name not in (PROBABILITIES, LOGITS):
            raise InvalidInput(
                f"unexpected inference output {out.name!r} for model {model.name!r}; it has "
                f"{PROBABILITIES!r} and {LOGITS!r}"
            )
        binary = out.parameters.get("binary_data", binary_default)
        classes = out.parameters.get("classification", 0)
        if not isinstance(binary, bool):
            raise InvalidInput(f"output {out.name!r}: parameters.binary_data must be a boolean")
        if not isinstance(classes, int) or isinstance(classes, bool) or not 0 <= classes <= C:
            raise InvalidInput(f"output {out.name!r}: classification must be a whole number from 1 to {C} classes")
        wanted.append(WantedOutput(out.name, binary, classes))
    return wanted


@dataclass(frozen=True)
class Sequence:
    """Triton's sequence extension: which sequence a request belongs to, and whether it starts or ends it."""

    id: int | str
    start: bool
    end: bool

    def session_id(self, model: LoadedModel) -> str:
        kind = "n" if isinstance(self.id, int) else "s"
        return f"oip:{model.name}:{kind}:{self.id}"

    @classmethod
    def from_parameters(cls, parameters: dict) -> Sequence | None:
        sequence_id = parameters.get("sequence_id", 0)
        start, end = parameters.get("sequence_start", False), parameters.get("sequence_end", False)
        if not isinstance(start, bool) or not isinstance(end, bool):
            raise InvalidInput("parameters.sequence_start and sequence_end must be booleans")
        if isinstance(sequence_id, bool) or not isinstance(sequence_id, int | str):
            raise InvalidInput("parameters.sequence_id must be an unsigned integer or a string")
        if sequence_id in (0, ""):
            if start or end:
                raise InvalidInput("sequence_start or sequence_end needs a sequence_id (not 0 or empty)")
            return None
        if isinstance(sequence_id, int) and not 0 < sequence_id < 2**64:
            raise InvalidInput(f"sequence_id {sequence_id} is not an unsigned 64-bit integer")
        if isinstance(sequence_id, str) and len(sequence_id) > MAX_SEQUENCE_ID_CHARS:
            raise InvalidInput(f"a string sequence_id is limited to {MAX_SEQUENCE_ID_CHARS} characters")
        return cls(sequence_id, start, end)


async def run_sequence(
    engine: Engine, model: LoadedModel, sequence: Sequence, frames: np.ndarray
) -> tuple[Output, int]:
    """One request of a sequence: start = fresh state, otherwise continue it; end = free it afterwards."""
    session_id = sequence.session_id(model)
    if sequence.start and sequence.end:  # the whole sequence in one request: nothing to keep
        (out,) = await engine.infer(model, [frames])
        with contextlib.suppress(SessionNotFound):
            await engine.delete_session(session_id)
        return out, len(frames)
    try:
        if sequence.start:
            result = await engine.restart(model, session_id, frames)
        else:
            result = await engine.step(session_id, lambda _: frames, None, True)
    except SessionNotFound:
        raise SequenceNotStarted(
            f"inference request for sequence {sequence.id!r} to model {model.name!r} must specify "
            "sequence_start on the first request of the sequence (this one was never started, has ended, or "
            f"expired after session_ttl_s={engine.settings.session_ttl_s:g} idle)"
        ) from None
    if sequence.end:
        with contextlib.suppress(SessionNotFound):
            await engine.delete_session(session_id)
    assert result.outputs is not None, "a sequence step asks for its per-frame outputs"
    return result.outputs, result.steps


# -- outputs -> response ----------------------------------------------------------------------------
def top_classes(values: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """The classification extension: top-k along the class axis as b"value:index:label"."""
    order = np.argsort(-values, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(values, order, axis=-1)
    cells = [f"{v:f}:{i}:{labels[i]}".encode() for v, i in zip(top.ravel(), order.ravel(), strict=True)]
    return np.array(cells, dtype=object).reshape(order.shape)


def output_tensors(model: LoadedModel, outs: list[Output], wanted: list[WantedOutput]) -> list[OutputTensor]:
    tensors = []
    for want in wanted:
        if want.name == PROBABILITIES:
            array = np.stack([out.probabilities[-1] for out in outs])
        else:  # per-step logits, zero past each sequence's length
            T = max(len(out.logits) for out in outs)
            array = np.zeros((len(outs), T, len(model.entry.labels)), np.float32)
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
async def server_metadata(request: Request) -> JSON:
    return JSON({"name": "lstm-serve", "version": server_version(), "extensions": EXTENSIONS})


async def server_live(request: Request) -> Response:
    return Response(status_code=200)


async def server_ready(request: Request) -> Response:
    await check_ready(request.app.state)
    return Response(status_code=200)


async def model_metadata(request: Request) -> JSON:
    return JSON(metadata(resolve(request.app.state.engine, request.path_params)))


async def model_ready(request: Request) -> Response:
    resolve(request.app.state.engine, request.path_params)
    await check_ready(request.app.state, with_store=False)
    return Response(status_code=200)


async def model_config(request: Request) -> JSON:
    engine: Engine = request.app.state.engine
    return JSON(configuration(resolve(engine, request.path_params), engine))


async def infer(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    model = resolve(engine, request.path_params)
    body = decompress(await request.body(), request.headers.get("content-encoding"), engine.settings.max_body_bytes)
    inference, tensors = read_request(body, request.headers.get(HEADER_LENGTH))
    sequences = model_sequences(engine, model, tensors)
    wanted = wanted_outputs(inference, model)
    sequence = Sequence.from_parameters(inference.parameters)
    head: dict = {"model_name": model.name, "model_version": str(model.version)}
    if inference.id is not None:
        head["id"] = inference.id
    if sequence is None:
        outs = await engine.infer(model, sequences)
    else:
        if len(sequences) != 1:
            raise InvalidInput(f"a sequence request carries one sequence: x must be [1, T, D], not B={len(sequences)}")
        out, steps = await run_sequence(engine, model, sequence, sequences[0])
        outs = [out]
        head["parameters"] = {"sequence_id": sequence.id, "sequence_steps": steps}
    content, header_length = write_response(head, output_tensors(model, outs, wanted))
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(header_length)}
    )


async def unknown_endpoint(request: Request) -> Response:
    raise NotFound(f"no endpoint {request.method} {request.url.path}; see GET /v2 and /docs")


MODEL = "/v2/models/{model_name}"
VERSION = "/v2/models/{model_name}/versions/{model_version}"


def route(method: str, path: str, endpoint) -> HotRoute:
    return HotRoute(method, path, endpoint, render_error)


OIP_ROUTES = [
    route("GET", "/v2", server_metadata),
    route("GET", "/v2/health/live", server_live),
    route("GET", "/v2/health/ready", server_ready),
    *(route("POST", f"{base}/infer", infer) for base in (MODEL, VERSION)),
    *(route("GET", base, model_metadata) for base in (MODEL, VERSION)),
    *(route("GET", f"{base}/ready", model_ready) for base in (MODEL, VERSION)),
    *(route("GET", f"{base}/config", model_config) for base in (MODEL, VERSION)),
    route("*", "/v2/{rest:path}", unknown_endpoint),
]
# (route, summary, request schema, response schema, status) for service/openapi.py
OIP_ROUTE_DOCS = [
    (OIP_ROUTES[0], "Server metadata (Open Inference Protocol)", None, ServerMetadata, 200),
    (OIP_ROUTES[1], "Server live", None, None, 200),
    (OIP_ROUTES[2], "Server ready", None, None, 200),
    *(
        (r, "Inference; sequences via parameters.sequence_id/start/end", InferenceRequest, InferenceResponse, 200)
        for r in OIP_ROUTES[3:5]
    ),
    *((r, "Model metadata", None, ModelMetadata, 200) for r in OIP_ROUTES[5:7]),
    *((r, "Model ready", None, None, 200) for r in OIP_ROUTES[7:9]),
    *((r, "Model configuration (Triton)", None, None, 200) for r in OIP_ROUTES[9:11]),
]
