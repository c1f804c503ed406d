"""Run the application under uvicorn, as the settings say.

With workers > 1 each worker process listens on its own socket bound with SO_REUSEPORT, so the kernel
spreads new connections over the workers evenly. With one shared socket (uvicorn's own workers) the
first worker to wake accepts a whole burst of connections, and a load balancer's pool or a batch of
clients ends up on one worker while the other idles.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import time
from types import FrameType

import uvicorn

from lstm_serve.http import logs
from lstm_serve.http.app import create_app
from lstm_serve.http.connections import HeaderDeadline
from lstm_serve.http.websocket_protocol import WebSocketProtocol
from lstm_serve.settings import Settings

BACKLOG = 2048


def serve(settings: Settings) -> None:
    if settings.workers > 1:
        serve_workers(settings)
        return
    uvicorn.Server(config(settings)).run()


def config(settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        http=HeaderDeadline,
        ws=WebSocketProtocol,
        ws_max_size=2 * settings.max_body_bytes,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,  # type: ignore[arg-type]  # a float works
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]  # a float works
        limit_concurrency=settings.max_connections,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        backlog=BACKLOG,
        access_log=False,  # the frame logs every request itself (http/logs.py)
        log_config=logs.configure(settings.log_format),
        log_level="info",
    )


def reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def run_worker(settings: Settings) -> None:
    """One worker: its own listening socket on the shared port, its own app and event loop."""
    sock = reuse_port_socket(settings.host, settings.port)
    sock.listen(BACKLOG)
    uvicorn.Server(config(settings)).run(sockets=[sock])


def serve_workers(settings: Settings) -> None:
    """Start the workers and stay with them: SIGTERM or SIGINT is passed on (each worker drains and
    shuts down as one server would); if a worker dies on its own, the others are stopped and this
    process exits non-zero, for the supervisor (Kubernetes, compose) to restart the whole."""
    reserved = reuse_port_socket(settings.host, settings.port)  # never listens: it holds the port, takes nothing
    if settings.port == 0:
        settings = settings.model_copy(update={"port": reserved.getsockname()[1]})
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=run_worker, args=(settings,), name=f"worker-{k}") for k in range(settings.workers)]
    for worker in workers:
        worker.start()
    stopping: list[int] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.append(signum)
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping and all(worker.is_alive() for worker in workers):
        time.sleep(0.2)
    crashed = not stopping
    if crashed:
        dead = [w for w in workers if not w.is_alive()]
        print(f"lstm-serve: worker {dead[0].name} exited with {dead[0].exitcode}; stopping", file=sys.stderr)
        stop(signal.SIGTERM, None)
    deadline = time.monotonic() + settings.drain_delay_s + settings.shutdown_timeout_s + 10
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            worker.kill()
            worker.join()
    reserved.close()
    sys.exit(1 if crashed else 0)
