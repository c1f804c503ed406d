"""Every WebSocket handshake gets a prompt answer, even one too long or with too many headers to parse."""

import socket
import time
from urllib.parse import urlparse

import pytest

KEY_HEADERS = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n"
)


def handshake(url: str, path: str, extra_headers: str = "") -> tuple[bytes, float]:
    """Send an upgrade request on a raw socket: the first bytes of the answer and the time it took. Returns
    only once the server has closed the socket (one it leaves open times out here)."""
    address = urlparse(url)
    with socket.create_connection((address.hostname, address.port), timeout=5) as sock:
        started = time.perf_counter()
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n{KEY_HEADERS}{extra_headers}\r\n".encode())
        answer = sock.recv(65536)
        took = time.perf_counter() - started
        while sock.recv(65536):
            pass
        return answer, took


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/v1/sessions/" + "a" * 9000 + "/stream", "", b"414"),
        ("/v1/sessions/" + "a" * 70000 + "/stream", "", b"414"),
        ("/v1/sessions/abc/stream", "X-Filler: " + "b" * 9000 + "\r\n", b"431"),
        ("/v1/sessions/abc/stream", "".join(f"X-{i}: {i}\r\n" for i in range(200)), b"431"),
    ],
)
def test_an_unparsable_handshake_is_answered_and_closed(server, path, headers, status):
    answer, took = handshake(server.url, path, headers)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:100]
    assert took < 1.0


def test_a_handshake_it_can_parse_still_upgrades(server, client):
    sid = client.post("/v1/sessions", json={}).json()["session_id"]
    address = urlparse(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=5) as sock:
        sock.sendall(f"GET /v1/sessions/{sid}/stream HTTP/1.1\r\nHost: test\r\n{KEY_HEADERS}\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 101 Switching Protocols")


def test_the_answer_names_only_a_subprotocol_the_server_speaks(server, client):
    """RFC 6455 4.2.2: the first offered was echoed, whatever it was (`foo` came back as `foo`)."""
    sid = client.post("/v1/sessions", json={}).json()["session_id"]
    address = urlparse(server.url)
    for offered, answered in (("foo, lstm-serve", "lstm-serve"), ("foo", None), ("bearer.k, foo", "bearer.k")):
        with socket.create_connection((address.hostname, address.port), timeout=5) as sock:
            sock.sendall(
                f"GET /v1/sessions/{sid}/stream HTTP/1.1\r\nHost: test\r\n{KEY_HEADERS}"
                f"Sec-WebSocket-Protocol: {offered}\r\n\r\n".encode()
            )
            head = sock.recv(4096).split(b"\r\n\r\n")[0].decode().lower()
        assert head.startswith("http/1.1 101"), head
        names = [line.split(": ", 1)[1] for line in head.split("\r\n") if line.startswith("sec-websocket-protocol:")]
        assert names == ([answered] if answered else []), (offered, head)


def test_a_frame_sent_with_the_handshake_is_not_silently_dropped(server, client):
    """A client must wait for the 101 before it sends frames (RFC 6455 4.1). One that sent a frame in the same
    write as its handshake had the frame dropped, and waited for its answer for good: now the connection
    closes at once, as when the frame comes in a later read."""
    sid = client.post("/v1/sessions", json={}).json()["session_id"]
    address = urlparse(server.url)
    message = b'{"inputs": [[0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]]}'
    text_frame = bytes((0x81, 0x80 | len(message))) + bytes(4) + message  # masked with a zero key
    with socket.create_connection((address.hostname, address.port), timeout=3) as sock:
        head = f"GET /v1/sessions/{sid}/stream HTTP/1.1\r\nHost: test\r\n{KEY_HEADERS}\r\n".encode()
        sock.sendall(head + text_frame)
        received = b""
        while chunk := sock.recv(65536):  # a timeout here: the frame was dropped and the socket left open
            received += chunk
    assert b'"steps"' not in received, received[:300]
    assert client.get(f"/v1/sessions/{sid}").json()["steps"] == 0
    assert "Exception in ASGI application" not in server.output(), server.output()[-3000:]


def upgrade_answer(url: str, request: str) -> bytes:
    address = urlparse(url)
    with socket.create_connection((address.hostname, address.port), timeout=5) as sock:
        sock.sendall(request.encode())
        return sock.recv(4096)


def test_an_upgrade_over_http_1_0_or_without_one_host_is_refused(server, client):
    """RFC 6455 4.1: an HTTP/1.1 GET with a Host. uvicorn rewrote the request line to HTTP/1.1 before the
    WebSocket saw it, so an upgrade over HTTP/1.0 opened a WebSocket, as did one with no Host."""
    sid = client.post("/v1/sessions", json={}).json()["session_id"]
    path = f"/v1/sessions/{sid}/stream"
    for request, status in (
        (f"GET {path} HTTP/1.0\r\nHost: test\r\n{KEY_HEADERS}\r\n", b"505"),
        (f"GET {path} HTTP/1.1\r\n{KEY_HEADERS}\r\n", b"400"),
        (f"GET {path} HTTP/1.1\r\nHost: a\r\nHost: b\r\n{KEY_HEADERS}\r\n", b"400"),
    ):
        answer = upgrade_answer(server.url, request)
        assert answer.startswith(b"HTTP/1.1 " + status), (request, answer[:200])
    assert client.get(f"/v1/sessions/{sid}").status_code == 200  # the server serves on


def test_every_connection_header_counts_towards_an_upgrade(server, client):
    """uvicorn read only the last Connection header: `Connection: Upgrade` then `Connection: keep-alive`
    (proxies add one) was answered 426 "send Connection: Upgrade"."""
    sid = client.post("/v1/sessions", json={}).json()["session_id"]
    headers = KEY_HEADERS.replace("Connection: Upgrade\r\n", "")
    request = (
        f"GET /v1/sessions/{sid}/stream HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\n{headers}"
        "Connection: keep-alive\r\n\r\n"
    )
    answer = upgrade_answer(server.url, request)
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols"), answer[:200]
