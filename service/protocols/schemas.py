"""/v1 bodies. Requests are strict (numbers must be JSON numbers, unknown fields are refused); the
documented request schemas are built from what the server serves (each model's frame width, the
limits), so that every body the schema allows is one the server accepts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pydantic.types import FailFast

from lstm_serve.core.inputs import Catalogue, Chunk, check_sequence_count, chunk_from_lists
from lstm_serve.protocols.codec import parse

if TYPE_CHECKING:  # this module is also what a decode process imports: it loads no model runtime
    from lstm_serve.core.engine import LoadedModel
    from lstm_serve.core.runtime import Runtime

# Lists stop at their first bad item: a body of a million bad numbers is one error, not a million of them built
# (seconds of the event loop, gigabytes) to report three.
Frame = Annotated[list[float], FailFast()]
# The smallest magnitude that rounds to infinity in float32 (halfway between its largest value and 2**128):
# a JSON number this large or larger is no float32, and is refused.
FLOAT32_LIMIT = float(np.finfo(np.float32).max) + (2.0**128 - float(np.finfo(np.float32).max)) / 2


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


VERSION = Field(None, ge=1, description="model version; the newest serving version when omitted")


class ClassifyRequest(Request):
    model: str | None = Field(None, description="model name; the server's default when omitted")
    version: int | None = VERSION
    sequences: list[Annotated[list[Frame], FailFast()]] = Field(
        ..., min_length=1, fail_fast=True, description="N sequences of T_i frames of D numbers"
    )


class SessionCreateRequest(Request):
    model: str | None = Field(None, description="model name; the server's default when omitted")
    version: int | None = Field(
        None, ge=1, description="model version the session runs on for its whole life; the newest when omitted"
    )
    state: dict[str, Any] | None = Field(
        None, description="a state from GET /v1/sessions/{id}/state: the new session continues from it"
    )


class StepRequest(Request):
    inputs: list[Frame] = Field(..., min_length=1, fail_fast=True, description="T new frames of D numbers")
    seq: int | None = Field(None, ge=0, description="frames the client believes the session has consumed")
    return_steps: bool = Field(False, description="also return one prediction per frame of this chunk")


def decode_classify(body: bytes, catalogue: Catalogue) -> tuple[str, int, list[Chunk]]:
    """A classify body -> the model and version it names and its checked sequences (in a decode process
    when large)."""
    request = parse(ClassifyRequest, body)
    entry = catalogue.entry(request.model, request.version)
    check_sequence_count(len(request.sequences), catalogue.limits)
    return (
        entry.name,
        entry.version,
        [chunk_from_lists(raw, entry, catalogue.limits, f"sequences[{i}]") for i, raw in enumerate(request.sequences)],
    )


def decode_step(body: bytes | str, where: str = "body") -> StepRequest:
    return parse(StepRequest, body, where)


def decode_session_create(body: bytes) -> SessionCreateRequest:
    return parse(SessionCreateRequest, body)


class Prediction(BaseModel):
    label: str
    class_id: int
    probabilities: list[float]


class ClassifyResponse(BaseModel):
    model: str
    version: int
    predictions: list[Prediction]


class SessionCreated(BaseModel):
    session_id: str
    model: str
    version: int
    steps: int
    expires_at: float
    input_dim: int = Field(description="numbers per frame the session takes (D): a binary frame carries no width")


class SessionState(BaseModel):
    """A session's recurrent state, to resume it elsewhere with POST /v1/sessions {"state": ...}."""

    model: str
    version: int
    steps: int
    state: dict[str, str] = Field(description="tensor name -> base64 of its little-endian float32 bytes")
    shape: dict[str, list[int]]
    sha256: str = Field(description="sha256 of model, version, steps and the tensors (see the README)")


class StepResponse(BaseModel):
    session_id: str
    steps: int
    prediction: Prediction
    step_predictions: list[Prediction] | None = None


class SessionInfo(BaseModel):
    session_id: str
    model: str
    version: int
    steps: int
    created_at: float
    expires_at: float
    prediction: Prediction | None


class Example(BaseModel):
    label: str = Field(description="its true label")
    frames: list[Frame] = Field(description="a real sequence of the model's test data")


class VersionInfo(BaseModel):
    version: int
    status: str = Field(description="serving; or draining: its sessions continue, no new ones start on it")
    drain_deadline: float | None = Field(None, description="draining: when its sessions stop being served")
    replaced_by: int | None = Field(None, description="draining: the version new sessions get instead")


class ModelInfo(BaseModel):
    name: str
    version: int = Field(description="the default version: the newest serving, what requests naming none get")
    versions: list[VersionInfo] = Field(description="every version loaded, serving or draining")
    description: str
    labels: list[str]
    input_dim: int
    feature_names: list[str] = Field(description="what each of the input_dim numbers of a frame is")
    cell: str
    hidden_size: int | None
    num_layers: int | None
    state: list[str]
    metrics: dict[str, Any]
    execution_provider: str
    example: Example | None


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    models: list[str]


# -- documented request schemas, from the models served --------------------------------------------------
def frames_schema(input_dim: int, runtime: Runtime) -> dict[str, Any]:
    number = {"type": "number", "exclusiveMinimum": -FLOAT32_LIMIT, "exclusiveMaximum": FLOAT32_LIMIT}
    frame = {"type": "array", "items": number, "minItems": input_dim, "maxItems": input_dim}
    return {"type": "array", "items": frame, "minItems": 1, "maxItems": runtime.limits.max_sequence_length}


def model_field(model: LoadedModel, runtime: Runtime) -> tuple[dict[str, Any], list[str]]:
    """The `model` property that picks this model, and whether it may be left out (the default model)."""
    if model.name == runtime.engine.default_model:
        return {"anyOf": [{"const": model.name}, {"type": "null"}]}, []
    return {"const": model.name}, ["model"]


def version_field(runtime: Runtime, name: str, new_sessions: bool) -> dict[str, Any]:
    versions = runtime.engine.fleet.versions_of(name, new_sessions)
    return {"anyOf": [{"enum": versions}, {"type": "null"}]}


def classify_schema(runtime: Runtime) -> dict[str, Any]:
    """One alternative per model: the frames of every sequence have that model's width."""
    alternatives = []
    for model in runtime.engine.models.values():
        field, required = model_field(model, runtime)
        sequences = {
            "type": "array",
            "minItems": 1,
            "maxItems": runtime.limits.max_sequences_per_request,
            "items": frames_schema(model.entry.input_dim, runtime),
        }
        alternatives.append(
            {
                "title": f"ClassifyRequest ({model.name})",
                "type": "object",
                "additionalProperties": False,
                "required": ["sequences", *required],
                "properties": {
                    "model": field,
                    "version": version_field(runtime, model.name, new_sessions=False),
                    "sequences": sequences,
                },
            }
        )
    return {"title": "ClassifyRequest", "anyOf": alternatives}


def session_create_schema(runtime: Runtime) -> dict[str, Any]:
    names = sorted(runtime.engine.models)
    return {
        "title": "SessionCreateRequest",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "model": {"anyOf": [{"enum": names}, {"type": "null"}]},
            "version": {
                "anyOf": [{"enum": sorted({v for n in names for v in runtime.engine.fleet.versions_of(n, True)})}]
                + [{"type": "null"}],
                "description": "the model version the session runs on for its whole life; the newest when omitted",
            },
            "state": {
                "anyOf": [{"$ref": "#/components/schemas/SessionState"}, {"type": "null"}],
                "description": "a state from GET /v1/sessions/{id}/state: the new session continues from it",
            },
        },
    }


def step_schema(runtime: Runtime) -> dict[str, Any]:
    """The frame width is the session's model's: the schema allows each served width."""
    widths = sorted({model.entry.input_dim for model in runtime.engine.models.values()})
    return {
        "title": "StepRequest",
        "type": "object",
        "additionalProperties": False,
        "required": ["inputs"],
        "properties": {
            "inputs": {"anyOf": [frames_schema(width, runtime) for width in widths]},
            "seq": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}]},
            "return_steps": {"type": "boolean"},
        },
    }


def example_model(runtime: Runtime) -> LoadedModel | None:
    """The model the documents' examples show: the default, else any served one (the default's versions may
    all be unloaded), else none."""
    models = runtime.engine.models
    return models.get(runtime.engine.default_model) or next(iter(models.values()), None)


def default_example(runtime: Runtime) -> list[list[float]]:
    model = example_model(runtime)
    if model is None:
        return [[0.0]]
    example = model.entry.example
    return example["frames"] if example else [[0.0] * model.entry.input_dim]


def classify_example(runtime: Runtime) -> dict[str, Any]:
    return {"model": runtime.engine.default_model, "sequences": [default_example(runtime)]}


def step_example(runtime: Runtime) -> dict[str, Any]:
    return {"inputs": default_example(runtime)[:3], "seq": 0}
