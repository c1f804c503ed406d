"""The server's WebSocket protocol (http/websocket_protocol.py) on the wire, with raw sockets: messages in
one frame or many, pipelined, split anywhere; pings both ways; every protocol error closed with its RFC 6455
code; the close handshake; refused handshakes. Against a real uvicorn server running an echo app, and
against lstm-serve itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import numpy as np
import pytest
import uvicorn

from lstm_serve.core.batcher import arrivals
from lstm_serve.http.websocket_protocol import MAX_FRAGMENTS, MAX_QUEUED, WebSocketProtocol, accept_key
from tests.conftest import free_port

MAX_SIZE = 4096
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


async def echo_app(scope, receive, send) -> None:
    """Echoes every message with its type; "close <code>" closes with that code, "return" returns open."""
    assert scope["type"] == "websocket"
    assert (await receive())["type"] == "websocket.connect"
    subprotocol = scope["subprotocols"][0] if scope["subprotocols"] else None
    if scope["path"] == "/refuse":
        await send({"type": "websocket.close"})
        return
    if scope["path"] == "/deny":
        await send({"type": "websocket.http.response.start", "status": 409, "headers": [(b"x-why", b"test")]})
        await send({"type": "websocket.http.response.body", "body": b"no, ", "more_body": True})
        await send({"type": "websocket.http.response.body", "body": b"thanks"})
        return
    await send({"type": "websocket.accept", "subprotocol": subprotocol, "headers": [(b"x-echo", b"1")]})
    if scope["path"] == "/stall":  # takes nothing for a second, then drains
        await asyncio.sleep(1.0)
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is not None and text.startswith("close "):
            await send({"type": "websocket.close", "code": int(text.split()[1]), "reason": "asked"})
            continue
        if text == "return":
            return
        await send({"type": "websocket.send", **{k: v for k, v in message.items() if k in ("text", "bytes")}})


class EchoServer:
    def __init__(self, ping_interval_s: float | None = 0.3) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            echo_app,
            host="127.0.0.1",
            port=self.port,
            ws=WebSocketProtocol,
            ws_max_size=MAX_SIZE,
            ws_ping_interval=ping_interval_s,
            ws_ping_timeout=0.3,
            lifespan="off",
            log_level="warning",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> EchoServer:
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            assert time.time() < deadline, "echo server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


def frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = True, rsv: int = 0) -> bytes:
    """A client frame; the length field as short as it can be."""
    n = len(payload)
    first = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if masked else 0
    if n < 126:
        header = bytes((first, mask_bit | n))
    elif n < 65536:
        header = bytes((first, mask_bit | 126)) + struct.pack("!H", n)
    else:
        header = bytes((first, mask_bit | 127)) + struct.pack("!Q", n)
    if not masked:
        return header + payload
    mask = os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawSocket:
    def __init__(self, port: int, path: str = "/", headers: str = "") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buffer = b""
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n".encode()
        )
        self.response = self.read_until(b"\r\n\r\n")

    def read_until(self, end: bytes) -> bytes:
        while end not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(end)
        return head

    def read_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            assert chunk, f"the server closed with {len(self.buffer)} of {n} bytes sent"
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def read_frame(self) -> tuple[int, bytes]:
        first, second = self.read_exact(2)
        assert not second & 0x80, "a server's frames are never masked"
        assert first & 0x80, "this server sends every message in one frame"
        n = second & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self.read_exact(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self.read_exact(8))
        return first & 0x0F, self.read_exact(n)

    def read_close(self) -> tuple[int, str]:
        opcode, payload = self.read_frame()
        while opcode == 0x9:  # a keepalive ping may come first
            opcode, payload = self.read_frame()
        assert opcode == 0x8, (opcode, payload)
        return (struct.unpack("!H", payload[:2])[0] if payload else 1005), payload[2:].decode()

    def closed_by_server(self) -> bool:
        """True once the server has closed the TCP connection (EOF or reset), within the socket timeout."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def opened(port: int, path: str = "/", headers: str = "") -> RawSocket:
    ws = RawSocket(port, path, headers)
    assert ws.response.startswith(b"HTTP/1.1 101 "), ws.response
    return ws


# -- the handshake ---------------------------------------------------------------------------------------
def test_the_handshake_answers_the_key_and_the_subprotocol(echo):
    ws = opened(echo.port, headers="Sec-WebSocket-Protocol: chat, bearer.x\r\n")
    lines = ws.response.decode().lower().split("\r\n")
    assert f"sec-websocket-accept: {accept_key(KEY)}".lower() in lines
    assert accept_key(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455's own example
    assert "sec-websocket-protocol: chat" in lines
    assert "x-echo: 1" in lines
    ws.close()


@pytest.mark.parametrize(
    ("request_head", "status", "must_say"),
    [
        (
            "GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
            b"400",
            b"Sec-WebSocket-Key",
        ),
        (
            "GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: c2hvcnQ=\r\n"
            "Sec-WebSocket-Version: 13\r\n",
            b"400",
            b"16 bytes",
        ),
        (
            f"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
            "Sec-WebSocket-Version: 8\r\n",
            b"426",
            b"sec-websocket-version: 13",
        ),
        (
            f"POST / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
            "Sec-WebSocket-Version: 13\r\nContent-Length: 0\r\n",
            b"405",
            b"allow: GET",
        ),
    ],
)
def test_a_handshake_it_refuses_is_answered_and_closed(echo, request_head, status, must_say):
    with socket.create_connection(("127.0.0.1", echo.port), timeout=5) as sock:
        sock.sendall(request_head.encode() + b"\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert must_say.lower() in answer.lower(), answer


def test_an_app_that_closes_before_accepting_gives_403_and_one_that_denies_gives_its_response(echo):
    refused = RawSocket(echo.port, "/refuse")
    assert refused.response.startswith(b"HTTP/1.1 403 ")
    assert refused.closed_by_server()
    denied = RawSocket(echo.port, "/deny")
    assert denied.response.startswith(b"HTTP/1.1 409 ")
    assert b"x-why: test" in denied.response
    assert denied.read_exact(10) == b"no, thanks"
    assert denied.closed_by_server()


def test_frames_sent_before_the_handshake_answer_close_the_connection(echo):
    with socket.create_connection(("127.0.0.1", echo.port), timeout=5) as sock:
        # the request and a frame in one write: uvicorn hands over the request alone, and the frame, which
        # may only follow the server's 101, is never taken for a message
        sock.sendall(
            f"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            + frame(0x1, b"early")
        )
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 101 ")
        assert b"early" not in answer


# -- messages --------------------------------------------------------------------------------------------
def test_messages_in_one_frame_and_in_fragments_with_a_ping_between_them(echo):
    ws = opened(echo.port)
    ws.send(frame(0x2, b"\x00\x01binary"))
    assert ws.read_frame() == (0x2, b"\x00\x01binary")
    ws.send(frame(0x1, "héllo ".encode()[:3], fin=False))  # a character split across fragments
    ws.send(frame(0x9, b"ping!"))  # control frames may come between the fragments of a message
    ws.send(frame(0x0, "héllo ".encode()[3:], fin=False))
    ws.send(frame(0x0, "wörld".encode()))
    assert ws.read_frame() == (0xA, b"ping!")
    assert ws.read_frame() == (0x1, "héllo wörld".encode())
    ws.send(frame(0x1, b""))  # an empty message is a message
    assert ws.read_frame() == (0x1, b"")
    ws.close()


def test_a_message_may_come_in_up_to_max_fragments_frames_and_no_more(echo):
    """Fragments reach no app, so nothing paces them, and each costs a parse: a message in more frames than
    MAX_FRAGMENTS (empty ones too, which add nothing to its size) closes with 1009."""
    ws = opened(echo.port)
    parts = [bytes([k % 256]) for k in range(MAX_FRAGMENTS)]
    wire = [frame(0x0 if k else 0x2, part, fin=k == len(parts) - 1) for k, part in enumerate(parts)]
    ws.send(b"".join(wire))
    assert ws.read_frame() == (0x2, b"".join(parts))
    ws.send(frame(0x2, b"", fin=False) + frame(0x0, b"", fin=False) * MAX_FRAGMENTS)
    assert ws.read_close() == (1009, f"message in over {MAX_FRAGMENTS} frames")
    assert ws.closed_by_server()


def test_pipelined_messages_split_anywhere_are_answered_in_order(echo):
    ws = opened(echo.port)
    messages = [f"message {k} ".encode() * (k % 7 + 1) for k in range(40)]
    wire = b"".join(frame(0x1, m) for m in messages)
    for at in range(0, len(wire), 13):  # split across frame headers, masks and payloads
        ws.send(wire[at : at + 13])
        time.sleep(0.0005)
    assert [ws.read_frame() for _ in messages] == [(0x1, m) for m in messages]
    ws.send(b"".join(frame(0x2, bytes([k]) * 300) for k in range(50)))  # far more than MAX_QUEUED at once
    assert [ws.read_frame() for _ in range(50)] == [(0x2, bytes([k]) * 300) for k in range(50)]
    ws.close()


def test_lengths_at_the_edges_of_the_length_encodings(echo):
    ws = opened(echo.port)
    for n in (125, 126, 127, 65535 % MAX_SIZE, MAX_SIZE):
        payload = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
        ws.send(frame(0x2, payload))
        assert ws.read_frame() == (0x2, payload)
    ws.close()


# -- protocol errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (frame(0x2, b"x", masked=False), 1002),
        (frame(0x2, b"x", rsv=0x40), 1002),
        (frame(0x3, b"x"), 1002),
        (frame(0x0, b"x"), 1002),
        (frame(0x1, b"a", fin=False) + frame(0x1, b"b"), 1002),
        (frame(0x9, b"x" * 126), 1002),
        (frame(0x9, b"x", fin=False), 1002),
        (frame(0x1, b"\xff\xfe"), 1007),
        (frame(0x1, "é".encode()[:1]), 1007),
        (frame(0x2, b"x" * (MAX_SIZE + 1)), 1009),
        (frame(0x2, b"x" * MAX_SIZE, fin=False) + frame(0x0, b"y"), 1009),
        (bytes((0x82, 0x80 | 127)) + struct.pack("!Q", 1 << 63) + bytes(4), 1002),  # the length's top bit set
        (frame(0x8, b"\x03"), 1002),
        (frame(0x8, struct.pack("!H", 1005)), 1002),
        (frame(0x8, struct.pack("!H", 999)), 1002),
        (frame(0x8, struct.pack("!H", 1000) + b"\xff"), 1007),
    ],
)
def test_each_protocol_error_closes_with_its_code(echo, wire, code):
    ws = opened(echo.port)
    ws.send(wire)
    assert ws.read_close()[0] == code
    assert ws.closed_by_server()


def test_a_message_announced_over_the_limit_is_refused_before_its_bytes_arrive(echo):
    ws = opened(echo.port)
    ws.send(bytes((0x82, 0x80 | 127)) + struct.pack("!Q", 1 << 40) + os.urandom(4))  # a 1 TB header, no payload
    assert ws.read_close()[0] == 1009
    assert ws.closed_by_server()


# -- closing ---------------------------------------------------------------------------------------------
def test_a_client_close_is_echoed_and_the_server_closes_the_connection(echo):
    ws = opened(echo.port)
    ws.send(frame(0x8, struct.pack("!H", 4321) + b"done"))
    assert ws.read_close()[0] == 4321
    assert ws.closed_by_server()
    empty = opened(echo.port)
    empty.send(frame(0x8, b""))
    assert empty.read_close()[0] == 1005  # no code in, no code out
    assert empty.closed_by_server()


def test_an_app_close_waits_for_the_clients_answer_and_drops_messages_meanwhile(echo):
    ws = opened(echo.port)
    ws.send(frame(0x1, b"close 4000"))
    assert ws.read_close() == (4000, "asked")
    ws.send(frame(0x1, b"after the close"))  # no answer: the app is done
    assert not ws.closed_by_server()  # waiting for our close frame
    ws.send(frame(0x8, struct.pack("!H", 4000)))
    assert ws.closed_by_server()
    assert ws.buffer == b""


def test_an_app_that_returns_with_the_socket_open_closes_it_with_1000(echo):
    ws = opened(echo.port)
    ws.send(frame(0x1, b"return"))
    assert ws.read_close()[0] == 1000


def test_a_client_that_answers_no_ping_is_dropped_and_one_that_does_stays(echo):
    silent = opened(echo.port)
    opcode, _ = silent.read_frame()
    assert opcode == 0x9
    assert silent.read_close()[0] == 1011  # no pong within ws_ping_timeout
    assert silent.closed_by_server()
    lively = opened(echo.port)
    deadline = time.time() + 1.5  # several ping intervals
    while time.time() < deadline:
        opcode, payload = lively.read_frame()
        assert opcode == 0x9
        lively.send(frame(0xA, payload))
    lively.send(frame(0x1, b"still here"))
    opcode, payload = lively.read_frame()
    while opcode == 0x9:
        opcode, payload = lively.read_frame()
    assert (opcode, payload) == (0x1, b"still here")
    lively.close()


def test_a_client_that_floods_pings_and_reads_nothing_is_no_longer_read_and_recovers_when_it_reads():
    """Each ping asks for a pong; a client that never reads them must not grow the server's write buffer
    without bound (before: every pong queued, ~300 MB for 200 MB of pings). Reading pauses at the buffer's
    high-water mark and resumes, losing nothing, once the client reads."""
    ping = frame(0x9, b"p" * 125)  # its pong: 127 bytes
    chunk, cap = ping * 8192, 64 * 2**20
    with EchoServer(ping_interval_s=None) as echo:  # no keepalive: it would drop the client that reads nothing
        ws = opened(echo.port)
        sent = [0]

        def flood() -> None:
            with contextlib.suppress(OSError):
                while sent[0] < cap:
                    ws.sock.sendall(chunk)
                    sent[0] += len(chunk)

        ws.sock.settimeout(30)
        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        last = -1
        while sent[0] != last and sent[0] < cap:  # until the sender is stuck or done
            last = sent[0]
            time.sleep(0.5)
        (protocol,) = [c for c in echo.server.server_state.connections if isinstance(c, WebSocketProtocol)]
        buffered = protocol.transport.get_write_buffer_size()
        assert sent[0] < cap, "the server read every ping while the client read nothing"
        assert buffered < 2 * 2**20, f"{buffered} bytes of pongs queued in the server"
        received, expected = 0, None
        while expected is None or received < expected:  # read, and the server reads on
            received += len(ws.sock.recv(1 << 20))
            if expected is None and not sender.is_alive():
                expected = sent[0] // len(ping) * 127
        assert received == expected, "a pong lost or doubled"
        ws.send(frame(0x1, b"after the flood"))
        assert ws.read_frame() == (0x1, b"after the flood")
        ws.close()


# -- lstm-serve on this protocol --------------------------------------------------------------------------
def test_fragmented_and_pipelined_chunks_on_lstm_serve_equal_classify(server, client, test_sequences):
    """A session's binary chunks sent as fragments and all at once, each with its seq, step exactly as
    classify over the whole sequence does."""
    frames = test_sequences[3].astype("<f4")
    sid = client.post("/v1/sessions", json={}).json()["session_id"]
    ws = opened(urlparse(server.url).port or 0, f"/v1/sessions/{sid}/stream")
    wire = b""
    for t in range(len(frames)):
        chunk = b"\x53\x51\xc0\x7f" + struct.pack("<Q", t) + frames[t].tobytes()
        wire += frame(0x2, chunk[:5], fin=False) + frame(0x0, chunk[5:])
    ws.send(wire)
    replies = [json.loads(ws.read_frame()[1]) for _ in range(len(frames))]
    assert [r["steps"] for r in replies] == list(range(1, len(frames) + 1))
    expected = client.post("/v1/classify", json={"sequences": [frames.tolist()]}).json()["predictions"][0]
    np.testing.assert_allclose(replies[-1]["prediction"]["probabilities"], expected["probabilities"], atol=2e-6)
    ws.send(frame(0x8, struct.pack("!H", 1000)))
    assert ws.read_close()[0] == 1000


def test_the_python_unmasking_equals_the_c_one():
    from websockets.speedups import apply_mask

    from lstm_serve.http.websocket_protocol import unmask_in_python

    rng = np.random.default_rng(0)
    for n in (0, 1, 3, 4, 5, 125, 4097):
        data, mask = rng.bytes(n), rng.bytes(4)
        assert unmask_in_python(memoryview(data), mask) == apply_mask(data, mask)


def eventually(condition, timeout_s: float = 3.0) -> bool:
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_messages_read_and_not_yet_taken_count_as_arrivals_until_taken_or_their_connection_is_gone(echo):
    """What lets a lone message skip its turn of the event loop (core/batcher.py): the count must neither
    miss a message waiting for its handler nor keep one whose connection is gone."""
    before = arrivals.waiting
    ws = opened(echo.port, "/stall")
    ws.send(b"".join(frame(0x2, bytes([k]) * 10) for k in range(3)))
    assert eventually(lambda: arrivals.waiting == before + 3), arrivals.waiting
    ws.close()  # gone before the app took them
    assert eventually(lambda: arrivals.waiting == before), arrivals.waiting
    taken = opened(echo.port)
    taken.send(b"".join(frame(0x1, b"x%d" % k) for k in range(10)))
    assert [taken.read_frame() for _ in range(10)] == [(0x1, b"x%d" % k) for k in range(10)]
    taken.close()
    time.sleep(1.2)  # the stalled app has drained what was left of the closed connection
    assert arrivals.waiting == before


def test_one_read_of_thousands_of_tiny_messages_queues_no_more_than_max_queued():
    """Reading pauses at MAX_QUEUED messages waiting for the app, and so does parsing what one read already
    holds (it queued 43,690 empty messages from one 256 KB write): the rest is parsed as the app takes them,
    every one answered in order."""
    with EchoServer(ping_interval_s=None) as quiet:  # this raw client answers no keepalive ping
        before = arrivals.waiting
        ws = opened(quiet.port, "/stall")  # the app takes nothing for a second
        ws.send(b"".join(frame(0x1, b"%d" % k) for k in range(5000)))
        time.sleep(0.5)
        queued = arrivals.waiting - before
        assert queued <= MAX_QUEUED, f"{queued} messages queued for an app that takes none"
        assert [ws.read_frame() for _ in range(5000)] == [(0x1, b"%d" % k) for k in range(5000)]
        ws.close()
