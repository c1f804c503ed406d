"""max_buffered_bytes: what all unfinished request bodies and WebSocket messages may hold together. Clients
that send most of a large body and stall cannot pin the server's memory: past the budget a body's next chunk
is 503 (the connection closed), a WebSocket that grows its message is closed 1013, small requests are served
throughout, and what was held is given back when its holders go."""

import base64
import os
import socket
import struct
import time

import httpx
import pytest

MIB = 1024 * 1024
PART = 900 * 1024  # of a 1 MiB body: two such parts fit in 2 MiB, a third does not


@pytest.fixture
def small_budget(start_server):
    return start_server("--max-body-bytes", str(MIB), "--max-buffered-bytes", str(2 * MIB), "--body-timeout-s", "30")


def stalled_body(server, size: int = PART, last: bool = False) -> socket.socket:
    """A classify request that declares 1 MiB, sends `size` bytes of it and stalls (`last`: the connection's)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    close = "Connection: close\r\n" if last else ""
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: x\r\n{close}Content-Type: application/json\r\n"
        f"Content-Length: {MIB}\r\n\r\n"
    )
    sock.sendall(head.encode())
    sent = 0
    try:
        while sent < size:
            sent += sock.send(b" " * min(64 * 1024, size - sent))
    except OSError:  # the server answered and closed while this was still sending
        pass
    return sock


def answer_of(sock: socket.socket, wait_s: float) -> bytes:
    sock.settimeout(wait_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return received


def classify_ok(server, sequence) -> bool:
    answer = httpx.post(f"{server.url}/v1/classify", json={"sequences": [sequence.tolist()]}, timeout=10)
    return answer.status_code == 200


def test_stalled_bodies_past_the_budget_are_refused_and_small_requests_still_served(small_budget, test_sequences):
    first, second = stalled_body(small_budget), stalled_body(small_budget)
    time.sleep(0.5)  # both parts are read and held
    third = stalled_body(small_budget)
    refused = answer_of(third, 5)
    assert refused.startswith(b"HTTP/1.1 503"), refused[:300]
    assert b'"overloaded"' in refused and b"connection: close" in refused.lower()
    assert answer_of(first, 0.3) == b"" and answer_of(second, 0.3) == b"", "a body within the budget was refused"
    assert classify_ok(small_budget, test_sequences[0]), "a small request was refused for what others hold"
    first.close()
    second.close()
    time.sleep(0.5)
    again = stalled_body(small_budget, MIB, last=True)  # all of it: now read to its end and answered for what it is
    answer = answer_of(again, 5)
    assert answer.startswith(b"HTTP/1.1 4") and not answer.startswith(b"HTTP/1.1 413"), answer[:300]
    lines = httpx.get(f"{small_budget.url}/metrics").text.splitlines()
    assert any(line.startswith('lstm_serve_rejected_requests_total{reason="overloaded"} 1') for line in lines)


def websocket(server, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame (mask 0: the payload goes as it is)."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


def close_code(sock: socket.socket, wait_s: float = 5) -> int | None:
    received = answer_of(sock, wait_s)
    at = received.find(b"\x88")
    return struct.unpack("!H", received[at + 2 : at + 4])[0] if at >= 0 and len(received) >= at + 4 else None


def test_websocket_messages_held_past_the_budget_close_that_socket_and_the_others_go_on(small_budget, test_sequences):
    session = httpx.post(f"{small_budget.url}/v1/sessions", json={}).json()["session_id"]
    path = f"/v1/sessions/{session}/stream"
    holders = [websocket(small_budget, path) for _ in range(3)]
    for sock in holders[:2]:
        sock.sendall(frame(0x2, b"\0" * PART, fin=False))  # the start of a fragmented message, never ended
    time.sleep(0.5)
    holders[2].sendall(frame(0x2, b"\0" * PART, fin=False))
    assert close_code(holders[2]) == 1013
    assert close_code(holders[0], 0.3) is None, "a socket within the budget was closed"
    for sock in holders[:2]:
        sock.close()
    time.sleep(0.5)
    stepper = websocket(small_budget, path)
    stepper.sendall(frame(0x2, test_sequences[0][0].astype("<f4").tobytes()))
    reply = answer_of(stepper, 1)
    assert b'"steps":1' in reply.replace(b" ", b""), reply[:300]
    assert classify_ok(small_budget, test_sequences[0])


def test_the_budget_holds_at_least_the_largest_websocket_message(start_server):
    server = start_server("--max-body-bytes", str(MIB), "--max-buffered-bytes", str(MIB), wait=False)
    assert server.proc.wait(30) != 0 and "at least twice max_body_bytes" in server.output()
