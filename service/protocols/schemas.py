"""Request and response bodies. Strict: numbers must be JSON numbers, unknown fields are refused."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

Frame = list[float]


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ClassifyRequest(Request):
    model: str | None = Field(None, description="model name; the server's default when omitted")
    sequences: list[list[Frame]] = Field(..., min_length=1, description="N sequences of T_i frames of D numbers")


class SessionCreateRequest(Request):
    model: str | None = None


class StepRequest(Request):
    inputs: list[Frame] = Field(..., min_length=1, description="T new frames of D numbers")
    seq: int | None = Field(None, ge=0, description="frames the client believes the session has consumed")
    return_steps: bool = Field(False, description="also return one prediction per frame of this chunk")


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
    expires_at: float


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


class ModelInfo(BaseModel):
    name: str
    version: int
    labels: list[str]
    input_dim: int
    cell: str
    hidden_size: int | None
    num_layers: int | None
    state: list[str]
    metrics: dict
    execution_provider: str


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


# -- Open Inference Protocol (KServe v2) -------------------------------------------------------------
class InferInputTensor(Request):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict, description="binary_data_size for binary data")
    data: list[Any] | None = Field(None, description="row-major elements, flat or nested (service/tensors.py)")


class InferOutputRequest(Request):
    name: str
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="binary_data (bool), classification (top-k as BYTES)"
    )


class InferenceRequest(Request):
    id: str | None = None
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="sequence_id (int or string), sequence_start, sequence_end, binary_data_output",
    )
    inputs: list[InferInputTensor] = Field(..., min_length=1)
    outputs: list[InferOutputRequest] | None = Field(None, description="all outputs when omitted")


class InferOutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[InferOutputTensor]


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class OipError(BaseModel):
    error: str
