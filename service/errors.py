"""Domain errors: each carries its HTTP status and a stable code; each protocol renders them its way."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.details = details

    def __reduce__(self) -> tuple[Any, ...]:
        """Raised in a decode process, it arrives whole: message, headers and details."""
        return (rebuild, (type(self), self.message, self.headers, self.details))


def rebuild(kind: type[ServiceError], message: str, headers: dict[str, str], details: dict[str, Any]) -> ServiceError:
    return kind(message, headers, **details)


class InvalidInput(ServiceError):
    status, code = 422, "invalid_input"


class MalformedRequest(ServiceError):
    status, code = 400, "malformed_request"


class BodyTooLarge(ServiceError):
    status, code = 413, "body_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class ForbiddenOrigin(ServiceError):
    status, code = 403, "forbidden_origin"


class RequestTimeout(ServiceError):
    status, code = 408, "request_timeout"


class ClientClosedRequest(ServiceError):
    """Nobody reads the answer; the status (nginx's 499) is what the request is counted and logged with."""

    status, code = 499, "client_closed_request"


class RateLimited(ServiceError):
    status, code = 429, "rate_limited"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class MethodNotAllowed(ServiceError):
    status, code = 405, "method_not_allowed"


class UpgradeRequired(ServiceError):
    status, code = 426, "upgrade_required"


class ModelNotFound(ServiceError):
    status, code = 404, "model_not_found"


class SessionNotFound(ServiceError):
    status, code = 404, "session_not_found"


class SequenceConflict(ServiceError):
    status, code = 409, "seq_conflict"


class SessionRestarted(ServiceError):
    status, code = 409, "session_restarted"


class TooManySessions(ServiceError):
    status, code = 429, "too_many_sessions"


class TooManyWebSockets(TooManySessions):
    code = "too_many_websockets"  # the caller's max_websockets_per_key, not its sessions


class Overloaded(ServiceError):
    status, code = 503, "overloaded"


class NotReady(ServiceError):
    status, code = 503, "not_ready"


class StoreUnavailable(ServiceError):
    status, code = 503, "session_store_unavailable"


class StepUnconfirmed(StoreUnavailable):
    """The store did not answer a step's commit, which may have run: its message says how to resend it."""


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class ModelVersionRetired(ServiceError):
    status, code = 410, "model_version_retired"


class ModelLoading(ServiceError):
    status, code = 503, "model_loading"


class LoadRefused(ServiceError):
    status, code = 400, "load_refused"


# refusals that protect the server, counted by reason in lstm_serve_rejected_requests_total
REJECTIONS = (
    Overloaded,
    TooManySessions,
    BodyTooLarge,
    RateLimited,
    Unauthorized,
    Forbidden,
    ForbiddenOrigin,
    RequestTimeout,
)
