"""Request and response bodies. Strict: numbers must be JSON numbers, unknown fields are refused."""

from __future__ import annotations

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
