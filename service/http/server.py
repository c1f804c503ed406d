"""`lstm-serve serve`: settings from flags (over LSTM_SERVE_* variables) -> uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import uvicorn
from pydantic import ValidationError

from lstm_serve.http.websocket_handshake import WebSocketHandshakeGuard
from lstm_serve.settings import Settings


def parse_settings(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser("lstm-serve serve", description="Serve the model repository over HTTP.")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"LSTM_SERVE_{name.upper()}"
        if field.annotation is bool:
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{field.description} [{env}]",
            )
        else:
            parser.add_argument(flag, dest=name, default=None, help=f"{field.description} [{env}]")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        sys.exit(f"lstm-serve serve: bad settings: {problems}")


def main(argv: Sequence[str] = ()) -> None:
    settings = parse_settings(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from lstm_serve.http.app import create_app

    options = dict(
        host=settings.host,
        port=settings.port,
        http="httptools",
        ws=WebSocketHandshakeGuard,
        ws_max_size=2 * settings.max_body_bytes,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        access_log=settings.access_log,
        log_level="info",
    )
    if settings.workers > 1:  # each worker process builds its app from the same LSTM_SERVE_* settings
        for name, value in settings.model_dump(exclude_unset=True).items():
            os.environ[f"LSTM_SERVE_{name.upper()}"] = str(value)
        uvicorn.run("lstm_serve.http.app:app_from_env", factory=True, workers=settings.workers, **options)
    else:
        uvicorn.run(create_app(settings), **options)
