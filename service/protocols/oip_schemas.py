"""Open Inference Protocol bodies (KServe v2 / Triton HTTP). Requests are strict: unknown fields are refused."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from lstm_serve.protocols.schemas import Request


class InferInputTensor(Request):
    name: str
    shape: list[int] = Field(fail_fast=True)
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
    model_name: str | None = Field(None, description="the path's model, if given (as in Triton's examples)")
    model_version: str | None = Field(None, description="the version the path runs, if given")
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="sequence_id (int or string), sequence_start, sequence_end, binary_data_output",
    )
    inputs: list[InferInputTensor] = Field(..., min_length=1, fail_fast=True)
    outputs: list[InferOutputRequest] | None = Field(None, fail_fast=True, description="all outputs when omitted")


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
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="description, feature_names (what each number of a frame is), labels, and example: a real "
        "sequence with its true label",
    )


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class OipError(BaseModel):
    error: str


class RepositoryIndexRequest(Request):
    ready: bool = Field(False, description="true: only the versions ready for inference")


class RepositoryLoadRequest(Request):
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="none are taken: the version policy and the repository decide"
    )


class UnloadParameters(Request):
    version: str | None = Field(None, description="unload this version only (lstm-serve); all versions if omitted")
    unload_dependents: bool = Field(False, description="Triton's; a model here has no dependents")


class RepositoryUnloadRequest(Request):
    parameters: UnloadParameters = Field(default_factory=UnloadParameters)


class RepositoryIndexEntry(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY, LOADING, UNLOADING (draining: its sessions continue) or UNAVAILABLE")
    reason: str = Field(description="why it is not READY")


class RepositoryChange(BaseModel):
    name: str
    versions: list[RepositoryIndexEntry]
