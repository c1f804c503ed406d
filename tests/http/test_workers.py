"""Several worker processes (--workers N, sessions in Redis): each listens on its own SO_REUSEPORT socket,
so the kernel spreads connections over them; SIGTERM stops them all, and a worker that dies takes the
server down for its supervisor to restart."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import httpx


def workers_of(parent: int) -> list[int]:
    """The parent's worker processes (not multiprocessing's resource tracker)."""
    children = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    return [pid for pid in children if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]


def open_sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed since the listing (the worker's own traffic)
            count += os.readlink(fd).startswith("socket:")
    return count


def test_two_workers_share_the_port_and_each_gets_a_fair_part_of_the_connections(start_server, redis_server):
    server = start_server("--workers", "2", env={"LSTM_SERVE_REDIS_URL": redis_server.url})
    workers = workers_of(server.proc.pid)
    assert len(workers) == 2
    before = {pid: open_sockets(pid) for pid in workers}
    clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(64)]  # one burst
    for client in clients:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
    for client in clients:
        assert b"200 OK" in client.recv(4096)
    accepted = {pid: open_sockets(pid) - before[pid] for pid in workers}
    for client in clients:
        client.close()
    assert sum(accepted.values()) >= 60 and min(accepted.values()) >= 10, accepted  # ~32 each; a shared socket
    # lets the first worker to wake accept nearly all of a burst


def test_sigterm_stops_every_worker_and_a_dead_worker_stops_the_server(start_server, redis_server):
    env = {"LSTM_SERVE_REDIS_URL": redis_server.url}
    server = start_server("--workers", "2", env=env)
    workers = workers_of(server.proc.pid)
    session = httpx.post(f"{server.url}/v1/sessions", json={}).json()["session_id"]
    assert httpx.post(f"{server.url}/v1/sessions/{session}/steps", json={"inputs": [[0.0] * 12]}).status_code == 200
    assert server.stop() == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)

    crashing = start_server("--workers", "2", env=env)
    os.kill(workers_of(crashing.proc.pid)[0], signal.SIGKILL)
    deadline = time.time() + 30
    while crashing.proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert crashing.proc.returncode == 1
    assert "exited with -9; stopping" in crashing.output()
