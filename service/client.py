"""The Python client for lstm-serve: classify sequences, and stream sessions exactly once.

    from lstm_serve.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as client:
        print(client.classify([frames])[0].label)            # frames: [T, D] array or nested lists
        with client.session() as session:                     # deleted on exit
            for chunk in chunks:
                prediction = session.step(chunk)              # tracks seq; retries are exactly once
        with client.session() as session:
            for prediction in session.stream(chunks):         # WebSocket, binary frames with seq
                ...

A step carries `seq`, the frames the session has consumed before it. After a dropped connection, a 503 or
a 429 (waiting `Retry-After`), the client sends the same chunk with the same `seq` again: if the server had
applied it, it answers without applying it twice. `session.stream` does the same over the WebSocket,
reconnecting and resending the chunk that was not acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

SEQ_MARK = b"\x53\x51\xc0\x7f"  # the binary seq header of protocols/websocket.py
Frames = np.ndarray | Sequence[Sequence[float]]


# -- results ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    label: str
    class_id: int
    probabilities: np.ndarray  # (C,) float

    @classmethod
    def of(cls, body: dict[str, Any]) -> Prediction:
        return cls(body["label"], int(body["class_id"]), np.asarray(body["probabilities"], np.float64))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    labels: list[str]
    input_dim: int
    feature_names: list[str]
    description: str
    example: dict[str, Any] | None  # {"label": ..., "frames": [[...], ...]}: a real sequence to try

    @classmethod
    def of(cls, body: dict[str, Any]) -> ModelInfo:
        return cls(
            body["name"],
            body["version"],
            body["labels"],
            body["input_dim"],
            body.get("feature_names") or [],
            body.get("description", ""),
            body.get("example"),
        )


# -- errors ----------------------------------------------------------------------------------------
class ServerError(Exception):
    """An error answer: its HTTP status, the server's code and message, and the request id to find it in
    the server's log."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None, **details: Any):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.request_id, self.details = status, code, message, request_id, details
        self.retry_after: float | None = None  # seconds, when the server said when to try again


class InvalidInput(ServerError): ...


class MalformedRequest(ServerError): ...


class Unauthorized(ServerError): ...


class ForbiddenOrigin(ServerError): ...


class NotFound(ServerError): ...


class ModelNotFound(NotFound): ...


class SessionNotFound(NotFound): ...


class SequenceConflict(ServerError):
    @property
    def expected_seq(self) -> int:
        return int(self.details["expected_seq"])


class SessionRestarted(ServerError): ...


class TooManySessions(ServerError): ...


class RateLimited(ServerError): ...


class Overloaded(ServerError): ...


class StoreUnavailable(ServerError): ...


class NotReady(ServerError): ...


class ModelLoading(ServerError): ...


ERRORS: dict[str, type[ServerError]] = {
    "invalid_input": InvalidInput,
    "malformed_request": MalformedRequest,
    "unauthorized": Unauthorized,
    "forbidden_origin": ForbiddenOrigin,
    "not_found": NotFound,
    "model_not_found": ModelNotFound,
    "session_not_found": SessionNotFound,
    "seq_conflict": SequenceConflict,
    "session_restarted": SessionRestarted,
    "too_many_sessions": TooManySessions,
    "too_many_websockets": TooManySessions,
    "rate_limited": RateLimited,
    "overloaded": Overloaded,
    "session_store_unavailable": StoreUnavailable,
    "not_ready": NotReady,
    "model_loading": ModelLoading,
}
RETRIED = (RateLimited, Overloaded, StoreUnavailable, NotReady, ModelLoading)
# a WebSocket error reply carries the code, not an HTTP status: the status the same error has over HTTP
STATUS_OF_CODE = {
    "invalid_input": 422,
    "malformed_request": 400,
    "load_refused": 400,
    "sequence_not_started": 400,
    "unauthorized": 401,
    "forbidden_origin": 403,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "model_not_found": 404,
    "session_not_found": 404,
    "seq_conflict": 409,
    "session_restarted": 409,
    "model_version_retired": 410,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "upgrade_required": 426,
    "too_many_sessions": 429,
    "too_many_websockets": 429,
    "rate_limited": 429,
    "overloaded": 503,
    "session_store_unavailable": 503,
    "not_ready": 503,
    "model_loading": 503,
    "client_closed_request": 499,
    "internal_error": 500,
}


def error_of(status: int, body: dict[str, Any]) -> ServerError:
    error = body.get("error", {}) if isinstance(body, dict) else {}
    if not isinstance(error, dict):  # an /v2 error: {"error": "..."}
        return ServerError(status, "error", str(error), body.get("request_id"))
    fields = dict(error)
    code, message = fields.pop("code", "error"), fields.pop("message", "")
    return ERRORS.get(code, ServerError)(status, code, message, fields.pop("request_id", None), **fields)


# a WebSocket the server closes with one of these said why in an error reply first (the code it stands for
# when the reply was not read); closes with other codes, and dropped connections, are reconnected
CLOSES = {
    4401: "unauthorized",
    4404: "session_not_found",
    4429: "rate_limited",
    1008: "malformed_request",
    1013: "not_ready",
}


def stream_failure(failure: Exception, reply: Any) -> ServerError | None:
    """What a failed WebSocket stands for: the handshake's HTTP error, or the error reply the server sent
    before closing with one of CLOSES (`reply`: the one read last, or still unread); None for a drop."""
    response = getattr(failure, "response", None)  # InvalidStatus: the handshake was answered with an error
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        try:
            body = json.loads(response.body)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            body = {}
        return error_of(status, body if isinstance(body, dict) else {})
    code = getattr(getattr(failure, "rcvd", None), "code", None)
    if code not in CLOSES:
        return None
    if not (isinstance(reply, dict) and isinstance(reply.get("error"), dict)):
        reply = {"error": {"code": CLOSES[code], "message": f"the server closed the WebSocket with {code}"}}
    return error_of(STATUS_OF_CODE.get(str(reply["error"].get("code")), 400), reply)


def last_reply(socket: Any) -> Any:
    """What a closed socket still holds unread (the server's error reply before its close), or None."""
    try:
        return json.loads(socket.recv(timeout=0))
    except Exception:  # nothing left, or not JSON
        return None


async def async_last_reply(socket: Any) -> Any:
    try:
        return json.loads(await asyncio.wait_for(socket.recv(), 0.1))
    except Exception:
        return None


def websocket_url(url: str, path: str) -> str:
    scheme, found, rest = url.partition("://")
    if not found:
        raise ValueError(f"the client's url {url[:60]!r} must start with http:// or https://")
    return ("wss" if scheme.lower() == "https" else "ws") + "://" + rest + path


def resend_wait(reply: dict[str, Any], attempt: int, retries: int) -> float | None:
    """For a reply on the WebSocket: None when it answers the chunk; the seconds to wait before sending the
    chunk again (with its seq) after a 503 or a 429 error reply; any other error is raised as the typed
    exception, with the status the same error has over HTTP."""
    error = reply.get("error")
    if error is None:
        return None
    code = error.get("code") if isinstance(error, dict) else None
    failure = error_of(STATUS_OF_CODE.get(str(code), 400), reply)
    wait = retry_wait(True, attempt, retries, failure)
    if wait is None:
        raise failure
    return wait


def encoded(body: Any) -> tuple[bytes | None, dict[str, str]]:
    if body is None:
        return None, {}
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


def answer(reply: httpx.Response) -> Any:
    """The reply's JSON, or its error raised as the typed exception (with Retry-After when it has one)."""
    body = reply.json() if reply.content else None
    if reply.status_code < 400:
        return body
    error = error_of(reply.status_code, body or {})
    error.retry_after = float(reply.headers["Retry-After"]) if "Retry-After" in reply.headers else None
    raise error


def retry_wait(retry: bool, attempt: int, retries: int, failure: Exception) -> float | None:
    """Seconds to wait before sending the same request again, or None when it must not be retried: only
    a dropped connection, or a 503 or a 429 (for its Retry-After), when retrying is allowed."""
    if not retry or attempt >= retries:
        return None
    backoff = min(2.0, 0.05 * 2 ** (attempt + 1))
    if isinstance(failure, httpx.TransportError):
        return backoff
    if isinstance(failure, RETRIED):
        return failure.retry_after if failure.retry_after is not None else backoff
    return None


def as_frames(frames: Frames, width: int | None = None) -> np.ndarray:
    """[T, D] float32; with `width`, D must be it: a WebSocket's binary frames carry no width, so the server
    would read [T, 2D] as [2T, D]."""
    array = np.asarray(frames, np.float32)
    if array.ndim != 2:
        raise ValueError(f"frames must be [T, D]; got shape {list(array.shape)}")
    if width is not None and array.shape[1] != width:
        raise ValueError(f"frames have {array.shape[1]} numbers each; the session's model takes {width}")
    return array


# -- the client ------------------------------------------------------------------------------------
class Client:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url, self.api_key, self.retries = url.rstrip("/"), api_key, retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, body: Any = None, retry: bool = False) -> Any:
        """One call; with `retry`, the same request again after a dropped connection, a 503 or a 429
        (after Retry-After), up to `retries` times. Only requests that are safe to repeat are retried."""
        content, headers = encoded(body)
        attempt = 0
        while True:
            try:
                return answer(self.http.request(method, path, content=content, headers=headers))
            except (httpx.TransportError, ServerError) as failure:
                wait = retry_wait(retry, attempt, self.retries, failure)
                if wait is None:
                    raise
            attempt += 1
            time.sleep(wait)

    def models(self) -> list[ModelInfo]:
        return [ModelInfo.of(body) for body in self.request("GET", "/v1/models", retry=True)]

    def model(self, name: str) -> ModelInfo:
        return ModelInfo.of(self.request("GET", f"/v1/models/{quote(name, safe='')}", retry=True))

    def classify(self, sequences: Iterable[Frames], model: str | None = None) -> list[Prediction]:
        """One prediction per sequence (each [T, D]), from zero state."""
        body: dict[str, Any] = {"sequences": [as_frames(s).tolist() for s in sequences]}
        if model is not None:
            body["model"] = model
        reply = self.request("POST", "/v1/classify", body, retry=True)  # stateless: safe to repeat
        return [Prediction.of(p) for p in reply["predictions"]]

    def session(self, model: str | None = None) -> Session:
        body = {} if model is None else {"model": model}
        return Session(self, self.request("POST", "/v1/sessions", body))

    def resume(self, state: dict[str, Any]) -> Session:
        """A new session that continues from `Session.state()`, exported here or on another server."""
        return Session(self, self.request("POST", "/v1/sessions", {"state": state}))


class Session:
    """A streaming session; use it as a context manager to delete it on exit."""

    def __init__(self, client: Client, created: dict[str, Any]) -> None:
        self.client, self.id = client, created["session_id"]
        self.model, self.version, self.steps = created["model"], created["version"], created.get("steps", 0)
        self.input_dim: int | None = created.get("input_dim")  # None from a server that does not say it

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def step(self, frames: Frames) -> Prediction:
        """Feed the next frames; the prediction after them. Exactly once, whatever is retried."""
        body = {"inputs": as_frames(frames).tolist(), "seq": self.steps}
        reply = self.client.request("POST", f"/v1/sessions/{self.id}/steps", body, retry=True)
        self.steps = reply["steps"]
        return Prediction.of(reply["prediction"])

    def state(self) -> dict[str, Any]:
        """The session's recurrent state, for `Client.resume` here or on another server."""
        exported: dict[str, Any] = self.client.request("GET", f"/v1/sessions/{self.id}/state", retry=True)
        return exported

    def delete(self) -> None:
        with contextlib.suppress(SessionNotFound):  # already gone: a retry got through first, or it expired
            self.client.request("DELETE", f"/v1/sessions/{self.id}", retry=True)

    def stream(self, chunks: Iterable[Frames], reconnects: int = 5) -> Iterator[Prediction]:
        """Each chunk over the WebSocket as binary float32 frames with its seq; a prediction per chunk. A
        dropped socket is reopened (up to `reconnects` times) and the unacknowledged chunk sent again; so is
        a chunk answered with a 503 or a 429 error (up to the client's `retries` times): applied once either
        way: `reconnects` drops in a row, each chunk answered starts the count again. A session the server
        refuses (unknown, deleted or expired, another key's, a key it does not take) is raised at once. Any
        other error reply is raised, with the status the same error has over HTTP."""
        from websockets.exceptions import ConnectionClosed, InvalidHandshake
        from websockets.sync.client import ClientConnection, connect

        url = websocket_url(self.client.url, f"/v1/sessions/{self.id}/stream")
        headers = {"Authorization": f"Bearer {self.client.api_key}"} if self.client.api_key else {}
        socket: ClientConnection | None = None
        dropped, answered = 0, None  # answered: the last error reply read on this socket
        try:
            for chunk in chunks:
                frames = as_frames(chunk, self.input_dim)
                message = SEQ_MARK + self.steps.to_bytes(8, "little") + frames.astype("<f4").tobytes()
                attempt = 0
                while True:
                    try:
                        if socket is None:  # entered (what websockets asks of a socket it opens), closed below
                            socket = connect(url, additional_headers=headers, max_size=None).__enter__()
                        socket.send(message)
                        reply = json.loads(socket.recv())
                    except (ConnectionClosed, InvalidHandshake, OSError) as failure:
                        error = stream_failure(failure, answered or (socket and last_reply(socket)))
                        if error is not None and not isinstance(error, RETRIED):
                            raise error from None
                        if socket is not None:
                            socket.close()
                        socket, answered, dropped = None, None, dropped + 1
                        if dropped > reconnects:
                            if error is not None:
                                raise error from None
                            raise
                        time.sleep(min(2.0, 0.05 * 2**dropped))
                        continue
                    wait = resend_wait(reply, attempt, self.client.retries)
                    if wait is None:
                        break
                    answered, attempt = reply, attempt + 1
                    time.sleep(wait)
                self.steps, dropped, answered = reply["steps"], 0, None
                yield Prediction.of(reply["prediction"])
        finally:
            if socket is not None:
                socket.close()


# -- the async flavour -----------------------------------------------------------------------------
class AsyncClient:
    """`Client` for asyncio: the same calls, awaited; sessions are async context managers.

    async with AsyncClient(url) as client, await client.session() as session:
        prediction = await session.step(frames)
        async for prediction in session.stream(chunks): ...
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url, self.api_key, self.retries = url.rstrip("/"), api_key, retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=headers, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def request(self, method: str, path: str, body: Any = None, retry: bool = False) -> Any:
        """As Client.request."""
        import asyncio

        content, headers = encoded(body)
        attempt = 0
        while True:
            try:
                return answer(await self.http.request(method, path, content=content, headers=headers))
            except (httpx.TransportError, ServerError) as failure:
                wait = retry_wait(retry, attempt, self.retries, failure)
                if wait is None:
                    raise
            attempt += 1
            await asyncio.sleep(wait)

    async def models(self) -> list[ModelInfo]:
        return [ModelInfo.of(body) for body in await self.request("GET", "/v1/models", retry=True)]

    async def model(self, name: str) -> ModelInfo:
        return ModelInfo.of(await self.request("GET", f"/v1/models/{quote(name, safe='')}", retry=True))

    async def classify(self, sequences: Iterable[Frames], model: str | None = None) -> list[Prediction]:
        body: dict[str, Any] = {"sequences": [as_frames(s).tolist() for s in sequences]}
        if model is not None:
            body["model"] = model
        reply = await self.request("POST", "/v1/classify", body, retry=True)
        return [Prediction.of(p) for p in reply["predictions"]]

    async def session(self, model: str | None = None) -> AsyncSession:
        body = {} if model is None else {"model": model}
        return AsyncSession(self, await self.request("POST", "/v1/sessions", body))

    async def resume(self, state: dict[str, Any]) -> AsyncSession:
        return AsyncSession(self, await self.request("POST", "/v1/sessions", {"state": state}))


class AsyncSession:
    def __init__(self, client: AsyncClient, created: dict[str, Any]) -> None:
        self.client, self.id = client, created["session_id"]
        self.model, self.version, self.steps = created["model"], created["version"], created.get("steps", 0)
        self.input_dim: int | None = created.get("input_dim")  # None from a server that does not say it

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.delete()

    async def step(self, frames: Frames) -> Prediction:
        body = {"inputs": as_frames(frames).tolist(), "seq": self.steps}
        reply = await self.client.request("POST", f"/v1/sessions/{self.id}/steps", body, retry=True)
        self.steps = reply["steps"]
        return Prediction.of(reply["prediction"])

    async def state(self) -> dict[str, Any]:
        exported: dict[str, Any] = await self.client.request("GET", f"/v1/sessions/{self.id}/state", retry=True)
        return exported

    async def delete(self) -> None:
        with contextlib.suppress(SessionNotFound):
            await self.client.request("DELETE", f"/v1/sessions/{self.id}", retry=True)

    async def stream(self, chunks: Iterable[Frames], reconnects: int = 5) -> AsyncIterator[Prediction]:
        """As Session.stream: binary frames with seq, reconnecting and resending the unacknowledged chunk, and
        resending a chunk answered with a 503 or a 429 error. Leaving it early, wrap it in
        `contextlib.aclosing(...)` so its socket closes then, not when the generator is collected."""
        from websockets.asyncio.client import ClientConnection, connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        url = websocket_url(self.client.url, f"/v1/sessions/{self.id}/stream")
        headers = {"Authorization": f"Bearer {self.client.api_key}"} if self.client.api_key else {}
        socket: ClientConnection | None = None
        dropped, answered = 0, None  # answered: the last error reply read on this socket
        try:
            for chunk in chunks:
                frames = as_frames(chunk, self.input_dim)
                message = SEQ_MARK + self.steps.to_bytes(8, "little") + frames.astype("<f4").tobytes()
                attempt = 0
                while True:
                    try:
                        if socket is None:
                            socket = await connect(url, additional_headers=headers, max_size=None)
                        await socket.send(message)
                        reply = json.loads(await socket.recv())
                    except (ConnectionClosed, InvalidHandshake, OSError) as failure:
                        unread = await async_last_reply(socket) if socket is not None and answered is None else None
                        error = stream_failure(failure, answered or unread)
                        if error is not None and not isinstance(error, RETRIED):
                            raise error from None
                        if socket is not None:
                            await socket.close()
                        socket, answered, dropped = None, None, dropped + 1
                        if dropped > reconnects:
                            if error is not None:
                                raise error from None
                            raise
                        await asyncio.sleep(min(2.0, 0.05 * 2**dropped))
                        continue
                    wait = resend_wait(reply, attempt, self.client.retries)
                    if wait is None:
                        break
                    answered, attempt = reply, attempt + 1
                    await asyncio.sleep(wait)
                self.steps, dropped, answered = reply["steps"], 0, None
                yield Prediction.of(reply["prediction"])
        finally:
            if socket is not None:
                await socket.close()
