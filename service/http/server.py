"""Run the application under uvicorn, as the settings say."""

from __future__ import annotations

import os

import uvicorn

from lstm_serve.http import logs
from lstm_serve.http.app import create_app
from lstm_serve.http.connections import HeaderDeadline
from lstm_serve.http.frame import Frame
from lstm_serve.http.websocket_handshake import WebSocketHandshakeGuard
from lstm_serve.settings import Settings


def serve(settings: Settings) -> None:
    log_config = logs.configure(settings.log_format)
    if settings.workers > 1:  # each worker process builds its app from the same LSTM_SERVE_* settings
        for name, value in settings.model_dump(exclude_unset=True).items():
            os.environ[f"LSTM_SERVE_{name.upper()}"] = str(value)
        app: str | Frame = "lstm_serve.http.app:app_from_env"
    else:
        app = create_app(settings)
    uvicorn.run(
        app,
        factory=settings.workers > 1,
        workers=settings.workers,
        host=settings.host,
        port=settings.port,
        http=HeaderDeadline,
        ws=WebSocketHandshakeGuard,
        ws_max_size=2 * settings.max_body_bytes,
        ws_per_message_deflate=False,  # replies are a few hundred bytes: compressing each costs more than it saves
        timeout_graceful_shutdown=settings.shutdown_timeout_s,  # type: ignore[arg-type]  # a float works
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]  # a float works
        limit_concurrency=settings.max_connections,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        access_log=False,  # the frame logs every request itself (http/logs.py)
        log_config=log_config,
        log_level="info",
    )
