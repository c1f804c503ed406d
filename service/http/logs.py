"""Logging: plain text or one JSON object per line, and one line per request.

Every request gets a line with its route template, status, latency, request id, key id and session id:
5xx at ERROR and 4xx at WARNING always, the rest at INFO when access_log is on. uvicorn's own access log is
off: this one says more, and says it once.
"""

from __future__ import annotations

import json
import logging
import logging.config
import time
from typing import Any

from lstm_serve.core.access import RequestContext

log = logging.getLogger("lstm_serve.access")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(log_format: str) -> dict[str, Any]:
    """Set up the root logger and return the logging config uvicorn should use (the same handler)."""
    formatter = {"()": JsonFormatter} if log_format == "json" else {"format": TEXT_FORMAT}
    config: dict[str, Any] = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
        },
        "root": {"handlers": ["default"], "level": "INFO"},
        "loggers": {
            "uvicorn": {"handlers": [], "level": "INFO", "propagate": True},
            "uvicorn.error": {"handlers": [], "level": "INFO", "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": True},
        },
    }
    logging.config.dictConfig(config)
    return config


def request_line(
    context: RequestContext, method: str, route: str, status: int, latency_s: float, access_log: bool
) -> None:
    # a 503 is a refusal the server chose (overloaded, draining, a version loading), not a failure
    level = logging.ERROR if status >= 500 and status != 503 else logging.WARNING if status >= 400 else logging.INFO
    if level == logging.INFO and not access_log:
        return
    caller = context.caller
    fields = {
        "request_id": context.request_id,
        "method": method,
        "route": route,
        "status": status,
        "latency_ms": round(latency_s * 1000, 3),
        "key_id": caller.key_id,
        "client": caller.address,
        "session_id": context.session_id,
    }
    extra = f" session={context.session_id}" if context.session_id else ""
    key = f" key={caller.key_id}" if caller.key_id else ""
    log.log(
        level,
        "%s %s %d %.1f ms id=%s client=%s%s%s",
        method,
        route,
        status,
        latency_s * 1000,
        context.request_id,
        caller.address,
        key,
        extra,
        extra={"fields": fields},
    )
