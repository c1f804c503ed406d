"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from lstm_serve.core.runtime import Runtime
from lstm_serve.protocols import schemas
from lstm_serve.protocols.codec import JSON
from lstm_serve.protocols.routing import V1, Content, Reply, Route

PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


async def healthz(request: Request, runtime: Runtime) -> Response:
    return JSON({"status": "alive"})


async def readyz(request: Request, runtime: Runtime) -> Response:
    await runtime.check_ready()
    return JSON({"status": "ready", "models": sorted(runtime.engine.models)})


async def metrics(request: Request, runtime: Runtime) -> Response:
    for name, model in runtime.engine.models.items():
        runtime.metrics.queue_length.labels(name).set(model.batcher.queued)
    sessions = await runtime.active_sessions()
    if sessions is not None:  # the store is down or stalled: /readyz says so; the rest still matters
        runtime.metrics.active_sessions.set(sessions)
    return Response(runtime.metrics.render(), media_type=PROMETHEUS)


ROUTES = [
    Route(
        "GET",
        "/healthz",
        healthz,
        V1,
        "Liveness: the process answers",
        "health",
        public=True,
        replies=(Reply(200, "alive", (Content("application/json", schemas.Health),)),),
    ),
    Route(
        "GET",
        "/readyz",
        readyz,
        V1,
        "Readiness: models warm, not draining, session store reachable",
        "health",
        public=True,
        replies=(
            Reply(200, "ready", (Content("application/json", schemas.Ready),)),
            V1.error(503, "`not_ready`: loading, draining after SIGTERM, or the session store is down"),
        ),
    ),
    Route(
        "GET",
        "/metrics",
        metrics,
        V1,
        "Prometheus metrics",
        "health",
        replies=(Reply(200, "Prometheus text exposition format", (Content("text/plain", {"type": "string"}),)),),
    ),
]
