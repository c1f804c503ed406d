"""The application: one route table of every protocol's routes, served by the frame, and the lifespan
that loads and warms the models, sweeps expired sessions, and drains on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import FrameType

from lstm_serve.core.access import KeyRing
from lstm_serve.core.engine import Engine
from lstm_serve.core.inputs import Limits
from lstm_serve.core.metrics import Metrics
from lstm_serve.core.runtime import Runtime
from lstm_serve.errors import ServiceError
from lstm_serve.http.buffers import buffers
from lstm_serve.http.connections import HeaderDeadline
from lstm_serve.http.docs import Documents
from lstm_serve.http.frame import Frame
from lstm_serve.http.table import RouteTable
from lstm_serve.http.websocket_protocol import WebSocketProtocol
from lstm_serve.protocols import health, oip, repository, v1, websocket
from lstm_serve.settings import Settings
from lstm_serve.state.directory import LocalDirectory, ModelDirectory
from lstm_serve.state.quotas import RateLimiter, TokenBuckets
from lstm_serve.state.sessions import InMemorySessionStore, SessionStore

log = logging.getLogger("lstm_serve")
SKIPPED_LOG_S = 5.0  # a background round that keeps failing is logged at most this often, with a count


def make_store(settings: Settings, metrics: Metrics) -> SessionStore:
    expired, per_key = metrics.sessions_expired.inc, settings.max_sessions_per_key
    if settings.redis_url:
        from lstm_serve.state.redis import RedisSessionStore

        return RedisSessionStore(
            settings.redis_url, settings.session_ttl_s, settings.max_sessions, expired, max_per_quota=per_key
        )
    return InMemorySessionStore(settings.session_ttl_s, settings.max_sessions, expired, max_per_quota=per_key)


def make_directory(settings: Settings, store: SessionStore) -> ModelDirectory:
    """Where replicas agree on the model versions: beside the sessions in Redis, else in this process."""
    if settings.redis_url:
        from lstm_serve.state.redis import RedisDirectory, RedisSessionStore

        assert isinstance(store, RedisSessionStore)
        return RedisDirectory(store)
    return LocalDirectory()


def make_limiter(settings: Settings, store: SessionStore) -> RateLimiter | None:
    """The request-rate limit: in Redis when sessions are (so it holds across replicas), else here."""
    if settings.rate is None:
        return None
    rate, burst = settings.rate
    if settings.redis_url:
        from lstm_serve.state.redis import RedisSessionStore, RedisTokenBuckets

        assert isinstance(store, RedisSessionStore)
        return RedisTokenBuckets(store, rate, burst)
    return TokenBuckets(rate, burst)


def announce_access(runtime: Runtime) -> None:
    settings = runtime.settings
    if runtime.keys.enabled:
        log.info("API keys: %d configured; every route but the health checks needs one", len(runtime.keys.digests))
    else:
        log.warning(
            "NO API KEYS ARE SET: anyone who can reach %s:%d can classify, and read, step and delete every "
            "session. Set LSTM_SERVE_API_KEYS or LSTM_SERVE_API_KEYS_FILE before exposing this server.",
            settings.host,
            settings.port,
        )
    if settings.origins:
        log.info("browser pages from %s may call this server (CORS)", ", ".join(sorted(settings.origins)))


def drain_on_sigterm(runtime: Runtime, delay_s: float) -> Callable[[], None]:
    """SIGTERM marks the server as draining (readiness answers 503) and hands the signal to uvicorn only
    after `delay_s`: meanwhile it keeps accepting and serving, so a load balancer's readiness probe
    takes it out of rotation before its socket closes. A second SIGTERM shuts down at once. Returns
    what undoes this. Only where a server (uvicorn) handles SIGTERM: the handler wraps the server's."""
    server_handler = signal.getsignal(signal.SIGTERM)
    if not callable(server_handler) or threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if runtime.draining or delay_s <= 0:
            server_handler(signum, frame)
            return
        runtime.draining = True
        log.warning(
            "SIGTERM: draining for %g s (/readyz answers 503, requests are still served), then shutting down", delay_s
        )
        loop.call_soon_threadsafe(loop.call_later, delay_s, server_handler, signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)

    def undo() -> None:
        signal.signal(signal.SIGTERM, server_handler)

    return undo


async def every(seconds: float, work: Callable[[], Awaitable[object]], what: str) -> None:
    """Run `work` every `seconds` until cancelled; a failed round is retried the next, and logged at most once
    per SKIPPED_LOG_S while the failures last (a sweep every second logged every second while Redis was down)."""
    logged_at, skipped = -math.inf, 0
    while True:
        await asyncio.sleep(seconds)
        try:
            await work()
        except ServiceError as error:  # e.g. Redis down: retried next round
            skipped += 1
            if time.monotonic() - logged_at >= SKIPPED_LOG_S:
                rounds = f" ({skipped} rounds since the last report)" if skipped > 1 else ""
                log.warning("%s skipped%s: %s", what, rounds, error.message)
                logged_at, skipped = time.monotonic(), 0
        except Exception:
            log.exception("%s failed", what)


async def sweep(engine: Engine) -> None:
    """Expired sessions out of the store; the model versions the replicas agree on in."""
    await engine.store.sweep()
    await engine.fleet.refresh()


def route_table(documents: Documents) -> RouteTable:
    """Every route, declared once, in the module of the protocol it belongs to."""
    return RouteTable(
        [*health.ROUTES, *v1.ROUTES, *websocket.ROUTES, *oip.ROUTES, *repository.ROUTES, *documents.routes()]
    )


def create_app(settings: Settings | None = None) -> Frame:
    settings = settings or Settings()
    HeaderDeadline.header_timeout_s = settings.header_timeout_s
    HeaderDeadline.max_header_bytes = settings.max_header_bytes
    HeaderDeadline.send_timeout_s = WebSocketProtocol.send_timeout_s = settings.body_timeout_s
    buffers.limit = settings.max_buffered_bytes
    metrics = Metrics()
    HeaderDeadline.rejected = metrics.rejected
    store = make_store(settings, metrics)
    runtime = Runtime(
        settings,
        Limits.from_settings(settings),
        metrics,
        Engine(settings, store, metrics, make_directory(settings, store)),
        keys=KeyRing.from_settings(settings),
        admin_keys=KeyRing.admin_from_settings(settings),
        limiter=make_limiter(settings, store),
    )
    documents = Documents(lambda: table)
    table = route_table(documents)

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        announce_access(runtime)
        undo_drain = drain_on_sigterm(runtime, settings.drain_delay_s)
        engine = runtime.engine
        await engine.start()  # load every model, create onnxruntime sessions, warm up
        await runtime.decoder.start()
        background = [asyncio.create_task(every(settings.sweep_interval_s, lambda: sweep(engine), "session sweep"))]
        if settings.repository_poll_s:
            poll = engine.fleet.poll
            background.append(asyncio.create_task(every(settings.repository_poll_s, poll, "repository poll")))
        gc.collect()
        gc.freeze()  # start-up objects (models, modules) are never garbage: keep them out of every GC pass
        runtime.ready = True
        loaded = engine.fleet.loaded.values()
        log.info("ready: %s", ", ".join(f"{m.name} v{m.version} ({m.runner.provider})" for m in loaded))
        try:
            yield
        finally:  # reverse order: stop answering ready, stop sweeping, finish queued work, close the store
            runtime.ready = False
            undo_drain()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await engine.stop()
            runtime.decoder.stop()
            await store.close()

    return Frame(table, runtime, lifespan)
