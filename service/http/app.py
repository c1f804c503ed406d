"""The application frame: create_app(settings), the lifespan, and one error handler for all."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from types import FrameType

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from lstm_serve.core.engine import Engine
from lstm_serve.core.metrics import Metrics
from lstm_serve.errors import InvalidInput, ServiceError
from lstm_serve.http import openapi
from lstm_serve.http.frontdoor import FrontDoor, rejected
from lstm_serve.protocols.http import JSON, error_response, internal_error
from lstm_serve.protocols.oip import OIP_ROUTES
from lstm_serve.protocols.v1 import HOT_ROUTES, router
from lstm_serve.settings import Settings
from lstm_serve.state.sessions import InMemorySessionStore, SessionStore
from starlette.exceptions import HTTPException

log = logging.getLogger("lstm_serve")


def make_store(settings: Settings, metrics: Metrics) -> SessionStore:
    if settings.redis_url:
        from lstm_serve.state.redis import RedisSessionStore

        return RedisSessionStore(
            settings.redis_url, settings.session_ttl_s, settings.max_sessions, on_expired=metrics.sessions_expired.inc
        )
    return InMemorySessionStore(settings.session_ttl_s, settings.max_sessions, on_expired=metrics.sessions_expired.inc)


def drain_on_sigterm(state, delay_s: float) -> Callable[[], None]:
    """SIGTERM marks the server as draining (readiness answers 503) and hands the signal to uvicorn only
    after `delay_s`: meanwhile it keeps accepting and serving, so a load balancer's readiness probe
    takes it out of rotation before its socket closes. A second SIGTERM shuts down at once. Returns
    what undoes this. Only where a server (uvicorn) handles SIGTERM: the handler wraps the server's."""
    server_handler = signal.getsignal(signal.SIGTERM)
    if not callable(server_handler) or threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if state.draining or delay_s <= 0:
            server_handler(signum, frame)
            return
        state.draining = True
        log.warning(
            "SIGTERM: draining for %g s (/readyz answers 503, requests are still served), then shutting down", delay_s
        )
        loop.call_soon_threadsafe(loop.call_later, delay_s, server_handler, signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, server_handler)


async def sweep_forever(store: SessionStore, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            await store.sweep()
        except ServiceError as error:  # e.g. Redis down: retried next round
            log.warning("session sweep skipped: %s", error.message)
        except Exception:  # a failed sweep is retried next round; it must not end the loop
            log.exception("session sweep failed")


def create_app(settings: Settings | None = None) -> FrontDoor:
    """The ASGI app: the front door (limits, metrics, hot routes) around the FastAPI app."""
    settings = settings or Settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = make_store(settings, metrics)
        engine = Engine(settings, store, metrics)
        app.state.engine, app.state.ready, app.state.draining = engine, False, False
        undo_drain = drain_on_sigterm(app.state, settings.drain_delay_s)
        await engine.start()  # load every model, create onnxruntime sessions, warm up
        sweeper = asyncio.create_task(sweep_forever(store, settings.sweep_interval_s))
        gc.collect()
        gc.freeze()  # start-up objects (models, modules) are never garbage: keep them out of every GC pass
        app.state.ready = True
        log.info("ready: %s", ", ".join(f"{m.name} v{m.version} ({m.runner.provider})" for m in engine.models.values()))
        try:
            yield
        finally:  # reverse order: stop answering ready, stop sweeping, finish queued work, close the store
            app.state.ready = False
            undo_drain()
            sweeper.cancel()
            await asyncio.gather(sweeper, return_exceptions=True)
            await engine.stop()
            await store.close()

    app = FastAPI(
        title="lstm-serve",
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=JSON,
        description="Sequence classification and stateful streaming sessions for recurrent models.",
        # /metrics is our telemetry; FastAPI's OpenTelemetry hooks cost ~6% per request
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings, app.state.metrics, app.state.ready, app.state.draining = settings, metrics, False, False
    app.include_router(router)
    openapi.install(app)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSON:
        rejected(metrics, error)
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(request: Request, error: RequestValidationError) -> JSON:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"])
        return error_response(InvalidInput(f"invalid request: {where}: {first['msg']}"))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSON:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSON(
            {"error": {"code": code, "message": str(error.detail)}},
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSON:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return internal_error()

    return FrontDoor(app, metrics, settings.max_body_bytes, HOT_ROUTES + OIP_ROUTES)


def app_from_env() -> FrontDoor:
    """For `uvicorn --factory` with several workers: each process reads LSTM_SERVE_* itself."""
    return create_app(Settings())
