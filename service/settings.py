"""One settings object, read from LSTM_SERVE_* environment variables (each also a CLI flag)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_repository() -> Path:
    """The shipped model repository: lstm_serve/models in an installed package, models/ beside service/ in
    the source tree (this file's real path: a development install links it from there)."""
    package = Path(__file__).resolve().parent
    installed = package / "models"
    return installed if installed.is_dir() else package.parent / "models"


DEFAULT_REPOSITORY = default_repository()
RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*")
PER_SECOND = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


def parse_rate(text: str) -> float:
    """'200/s', '6000/min', '10000/hour' as requests per second."""
    found = RATE.fullmatch(text)
    if not found or float(found[1]) <= 0:
        raise ValueError(f"rate_limit {text!r} is not like 200/s, 6000/min or 10000/hour")
    return float(found[1]) / PER_SECOND[found[2]]


VERSION_POLICY = re.compile(r"\s*(?:latest(?::([1-9]\d{0,3}))?|(all))\s*")


def parse_version_policy(text: str) -> int | None:
    """'latest' -> 1, 'latest:N' -> N, 'all' -> None: how many of the newest versions of a model to serve."""
    found = VERSION_POLICY.fullmatch(text)
    if not found:
        raise ValueError(f"version_policy {text!r} is not latest, latest:N (N >= 1) or all")
    return None if found[2] else int(found[1] or 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LSTM_SERVE_", extra="ignore")

    model_repository: Path = Field(DEFAULT_REPOSITORY, description="folder of <name>/<version>/ model entries")
    default_model: str = Field(
        "japanese-vowels",
        description="model used when a request names none; if not set "
        "and the repository lacks it, the repository's first model by name",
    )
    version_policy: str = Field(
        "latest", description="versions of each model served: latest (the newest), latest:N (the newest N) or all"
    )
    version_drain_s: float = Field(
        600.0,
        gt=0,
        le=7 * 24 * 3600,
        description="after a version is unloaded (or replaced), how long its live sessions are still served; "
        "then they answer 410 model_version_retired",
    )
    repository_poll_s: float | None = Field(
        None,
        gt=0,
        description="look for new model versions in the repository this often; none = only at start "
        "and on POST /v2/repository/models/{name}/load",
    )
    providers: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="onnxruntime execution: auto = CUDA if onnxruntime-gpu sees a GPU, else CPU"
    )
    intra_op_threads: int = Field(1, ge=1, le=256, description="onnxruntime threads per model")
    max_batch_size: int = Field(64, ge=1, le=4096, description="sequences or session steps per onnxruntime call")
    max_queue_delay_ms: float = Field(
        0.0, ge=0, le=1000, description="extra wait for a batch to fill; 0 batches only what is already queued"
    )
    max_queue_length: int = Field(2048, ge=1, description="queued sequences per model before 503")
    session_ttl_s: float = Field(600.0, gt=0, description="idle time after which a session expires")
    max_sessions: int = Field(10_000, ge=1, description="live sessions; more are refused with 429")
    max_sequence_length: int = Field(4096, ge=1, description="frames in one sequence or one streamed chunk")
    max_sequences_per_request: int = Field(256, ge=1, description="sequences in one classify request")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest request body or WebSocket message")
    max_buffered_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="request bodies and WebSocket messages held while they arrive, in all (each one's first 64 KiB "
        "free); past it, 503 (WebSocket: close 1013). At least twice max_body_bytes",
    )
    sweep_interval_s: float = Field(1.0, gt=0, description="how often expired sessions are removed")
    redis_url: str | None = Field(None, description="redis://host:port/db: sessions in Redis, shared by replicas")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind")
    workers: int = Field(1, ge=1, description="server processes; more than 1 needs redis_url")
    drain_delay_s: float = Field(
        3.0,
        ge=0,
        le=600,
        description="on SIGTERM, seconds /readyz answers 503 while the "
        "server keeps serving, so load balancers stop routing here before it stops accepting",
    )
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="after the drain delay, time in-flight requests get to finish"
    )
    access_log: bool = Field(False, description="log every request; 4xx and 5xx are logged always")
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line")
    # -- security: who may call, how much, from where ------------------------------------------------
    api_keys: str = Field(
        "",
        repr=False,
        description="comma-separated API keys; when any key is set (here or in api_keys_file) every route "
        "but the health checks needs Authorization: Bearer <key>, and sessions belong to their key",
    )
    api_keys_file: Path | None = Field(
        None, description="a file of API keys, one per line; a line sha256:<hex> holds a key's hash, not the key"
    )
    admin_keys: str = Field(
        "",
        repr=False,
        description="comma-separated keys (or sha256:<hex>) for the repository API (load, unload, index); "
        "without any, only loopback clients of a server without API keys may use it",
    )
    rate_limit: str | None = Field(
        None, description="requests per key (per client address without keys), e.g. 200/s or 6000/min; none = off"
    )
    rate_burst: int | None = Field(None, ge=1, description="requests a key may send at once; default: one second's")
    max_sessions_per_key: int | None = Field(
        None, ge=1, description="live sessions one key (or client address) may hold; default: max_sessions"
    )
    max_websockets_per_key: int = Field(
        1024, ge=1, description="open WebSockets one key (or client address) may hold, per server process"
    )
    cors_origins: str = Field(
        "",
        description="comma-separated origins (https://app.example) whose pages may call this server; a request "
        "with any other Origin (but the server's own) is refused with 403",
    )
    forwarded_allow_ips: str = Field(
        "127.0.0.1",
        description="proxies (comma-separated addresses, or *) whose X-Forwarded-For names the client, "
        "for limits per client address and the logs",
    )
    header_timeout_s: float = Field(5.0, gt=0, le=600, description="time a client gets to send a request's headers")
    max_header_bytes: int = Field(
        65536,
        ge=1024,
        le=16 * 1024 * 1024,
        description="largest request line and headers; over it, 431 (414 for a long request line) and close",
    )
    body_timeout_s: float = Field(
        15.0,
        gt=0,
        le=3600,
        description="time a client gets to send a request's body, and to read on once it stops reading its answers",
    )
    keep_alive_s: float = Field(5.0, gt=0, le=600, description="an idle keep-alive connection closes after this")
    max_connections: int = Field(2048, ge=1, description="open connections and requests in progress; beyond it, 503")

    @property
    def rate(self) -> tuple[float, int] | None:
        """rate_limit as (requests per second, burst), or None when there is none."""
        if self.rate_limit is None:
            return None
        per_second = parse_rate(self.rate_limit)
        return per_second, self.rate_burst or max(1, math.ceil(per_second))

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(o.strip().rstrip("/").lower() for o in self.cors_origins.split(",") if o.strip())

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("version_policy")
    @classmethod
    def version_policy_reads(cls, value: str) -> str:
        parse_version_policy(value)
        return value

    @field_validator("repository_poll_s", mode="before")
    @classmethod
    def empty_poll_is_none(cls, value: object) -> object:
        return None if value in ("", "0") else value

    @model_validator(mode="after")
    def buffers_hold_a_largest_message(self) -> Settings:
        if self.max_buffered_bytes < 2 * self.max_body_bytes:  # a WebSocket message may be 2 x max_body_bytes
            raise ValueError(
                f"max_buffered_bytes={self.max_buffered_bytes} must be at least twice max_body_bytes="
                f"{self.max_body_bytes} (the largest WebSocket message), or no such message could ever arrive"
            )
        return self

    @model_validator(mode="after")
    def rate_limit_reads(self) -> Settings:
        if self.rate_limit is not None:
            parse_rate(self.rate_limit)
        return self

    @model_validator(mode="after")
    def one_process_per_in_memory_store(self) -> Settings:
        if self.workers > 1 and not self.redis_url:
            raise ValueError(
                f"workers={self.workers} with the in-memory session store would split session state across "
                "processes (a session's steps could land where its h/c is not); run workers=1, or set "
                "LSTM_SERVE_REDIS_URL so that every process shares sessions through Redis"
            )
        return self
