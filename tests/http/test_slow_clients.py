"""Slow and idle clients cannot hold the server: headers and bodies have deadlines (408, then the connection
closes), idle keep-alive connections close, and while many clients trickle, others are served."""

import contextlib
import json
import socket
import struct
import threading
import time

import httpx
import pytest

DEADLINES = ("--header-timeout-s", "1", "--body-timeout-s", "1.5", "--keep-alive-s", "1")


@pytest.fixture
def strict(start_server):
    return start_server(*DEADLINES)


def connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed it."""
    started, received = time.perf_counter(), b""
    sock.settimeout(limit_s)
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return received, float("inf")
        except ConnectionResetError:  # closed with bytes of ours still unread (a trickler's): a reset is a close too
            return received, time.perf_counter() - started
        if not chunk:
            return received, time.perf_counter() - started
        received += chunk


def test_a_client_trickling_its_headers_gets_408_and_is_cut_off(strict):
    sock = connect(strict)
    started = time.perf_counter()
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
    for byte in b"X-Slow: 1234567890":
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(0.2)
        if time.perf_counter() - started > 3:
            break
    answer, _ = read_until_closed(sock, 5)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    head = answer.split(b"\r\n\r\n")[0].lower()
    assert b"\r\ndate: " in head and b"\r\nserver: uvicorn" in head, "not the headers of every other answer"
    assert time.perf_counter() - started < 3.5, "the header deadline (1 s) was not kept"
    assert rejections(strict) == {"request_timeout": 1.0}


def rejections(server) -> dict[str, float]:
    """lstm_serve_rejected_requests_total by reason, where counted."""
    lines = httpx.get(f"{server.url}/metrics").text.splitlines()
    counted = [line for line in lines if line.startswith("lstm_serve_rejected_requests_total{")]
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in counted if float(line.rsplit(" ", 1)[1])}


def test_a_client_that_connects_and_sends_nothing_is_closed(strict):
    sock = connect(strict)
    answer, closed_after = read_until_closed(sock, 5)
    assert closed_after < 3 and (answer == b"" or answer.startswith(b"HTTP/1.1 408")), answer[:200]


def test_a_client_trickling_its_body_gets_408_in_its_protocol_and_is_cut_off(strict):
    for path, shape in (
        ("/v1/classify", b'"code":"request_timeout"'),
        ("/v2/models/japanese-vowels/infer", b'"error"'),
    ):
        sock = connect(strict)
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        sock.sendall(head.encode() + b'{"sequences": [[[')
        started = time.perf_counter()
        answer, closed_after = b"", float("inf")
        while time.perf_counter() - started < 5:
            try:
                sock.sendall(b"0")
            except OSError:
                break
            sock.settimeout(0.25)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            answer += chunk
            if not chunk or b"request_timeout" in answer or b"did not arrive" in answer:
                break
        rest, closed_after = read_until_closed(sock, 3)
        answer += rest
        assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
        assert shape in answer and b"body_timeout_s" in answer, answer[:300]
        assert closed_after < 3, "the connection stayed open after the 408"
        assert time.perf_counter() - started < 4.5


def test_an_idle_keep_alive_connection_closes(strict):
    sock = connect(strict)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    first = b""
    while not first.endswith(b'{"status":"alive"}'):  # the headers and the body may come in separate reads
        first += sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    rest, closed_after = read_until_closed(sock, 5)
    assert rest == b"" and closed_after < 3


def test_a_body_answered_before_it_arrived_is_dropped_and_its_connection_closes_if_it_trickles_or_floods(strict):
    """The rest of a body answered early (here 404) is read and dropped while it comes; one that has not all
    come within body_timeout_s (1.5 s here), or is over a MiB, ends the connection."""
    for length, rest in ((100_000, b""), (4 << 20, b" " * (2 << 20))):
        with socket.create_connection(("127.0.0.1", strict.port), timeout=5) as sock:
            sock.sendall(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n{" % length)
            started = time.perf_counter()
            with contextlib.suppress(OSError):  # closed while this still sends
                sock.sendall(rest)
            answer, closed_after = read_until_closed(sock, 5)
        assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
        assert time.perf_counter() - started < 3.5, "the connection stayed open"


def test_a_client_that_reads_none_of_its_answers_is_dropped_after_the_body_deadline(strict):
    """Its answers filled the kernel's buffers and then the server's, and the connection stayed open for good
    (a response waiting to be written is not idle, so keep-alive never ended it): now it is dropped once its
    answers have waited body_timeout_s (1.5 s here) unread."""
    session = httpx.post(f"{strict.url}/v1/sessions", json={}).json()["session_id"]
    body = json.dumps({"inputs": [[0.5] * 12] * 2000, "return_steps": True}).encode()  # a ~350 KB answer
    head = f"POST /v1/sessions/{session}/steps HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    request = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    sock = small_window(strict)
    send_and_never_read(strict, sock, request * 24)


def test_a_client_that_reads_its_answers_slowly_keeps_its_connection_however_long_they_take(strict):
    """The deadline is for a client that reads nothing. One reading ~80 KB/s of 5.6 MB of answers drains the
    kernel's send queue long before the server's write buffer moves: judged by the buffer alone, it was reset
    after one body_timeout_s (1.5 s here); judged by both, it reads on."""
    session = httpx.post(f"{strict.url}/v1/sessions", json={}).json()["session_id"]
    body = json.dumps({"inputs": [[0.5] * 12] * 2000, "return_steps": True}).encode()  # a ~350 KB answer
    head = f"POST /v1/sessions/{session}/steps HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    request = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    sock = small_window(strict)
    threading.Thread(target=lambda: sock.sendall(request * 16), daemon=True).start()
    received, started = 0, time.perf_counter()
    sock.settimeout(10)
    while time.perf_counter() - started < 5:  # over three windows
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            raise AssertionError(f"reset after {received} bytes: {rejections(strict)}") from None
        assert chunk, f"closed after {received} bytes: {rejections(strict)}"
        received += len(chunk)
        time.sleep(0.05)  # a few KB a read (its window is small)
    sock.close()
    assert 100_000 < received < 1_000_000, received  # it did read, slowly
    assert "send_timeout" not in rejections(strict)


def test_a_websocket_client_that_reads_none_of_its_replies_is_dropped_after_the_body_deadline(strict):
    """Its replies filled the kernel's buffers and then the server's (~12 MB a socket); its keepalive ping and
    close frame queued behind them, and the close waited for them to drain: the socket, its memory and its app
    task stayed until the client went."""
    session = httpx.post(f"{strict.url}/v1/sessions", json={}).json()["session_id"]
    message = json.dumps({"inputs": [[0.5] * 12] * 4096, "return_steps": True})  # a ~700 KB reply
    sock = small_window(strict)
    sock.sendall(
        f"GET /v1/sessions/{session}/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    text_frame = b"\x81\xff" + struct.pack("!Q", len(message)) + b"\0\0\0\0" + message.encode()  # a zero mask
    send_and_never_read(strict, sock, text_frame * 16)


def small_window(server) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    sock.connect(("127.0.0.1", server.port))
    return sock


def send_and_never_read(server, sock: socket.socket, data: bytes) -> None:
    """Send `data` (from a thread: it blocks once the server stops reading) and read nothing, until the server
    counts a send_timeout; the connection must then be reset, its unsent answers dropped."""

    def send() -> None:
        with contextlib.suppress(OSError):  # dropped before all is sent
            sock.sendall(data)

    started = time.perf_counter()
    threading.Thread(target=send, daemon=True).start()
    while "send_timeout" not in rejections(server) and time.perf_counter() - started < 30:
        time.sleep(0.2)
    assert rejections(server).get("send_timeout") == 1.0, "the connection was not dropped"
    sock.settimeout(5)
    with pytest.raises(ConnectionResetError):
        while sock.recv(1 << 20):
            pass
    sock.close()
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_while_many_clients_trickle_others_are_served_and_the_tricklers_are_dropped(strict):
    tricklers = []
    for _ in range(200):
        sock = connect(strict)
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        tricklers.append(sock)
    try:
        with httpx.Client(base_url=strict.url, timeout=5) as c:
            body = {"sequences": [[[0.1] * 12] * 20]}
            for _ in range(20):
                assert c.post("/v1/classify", json=body).status_code == 200
        time.sleep(2.5)  # past the header deadline
        still_open = 0
        for sock in tricklers:
            sock.settimeout(0.5)
            try:
                data = sock.recv(65536)
                still_open += 0 if (data == b"" or data.startswith(b"HTTP/1.1 408")) else 1
            except TimeoutError:
                still_open += 1
            except ConnectionResetError:
                pass
        assert still_open == 0, f"{still_open} of 200 trickling clients were still held after the deadline"
    finally:
        for sock in tricklers:
            sock.close()


def test_a_client_that_closes_before_its_whole_body_is_counted_499_and_logs_no_traceback(strict):
    """Half a body, then the connection closes: nobody reads an answer, so the request is counted and logged
    as 499 (client closed request), never as an internal error with a traceback, whatever the route."""
    for path in ("/v1/classify", "/v1/sessions", "/v2/models/japanese-vowels/infer"):
        sock = connect(strict)
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        sock.sendall(head.encode() + b'{"sequences": [[[0.1, ')
        time.sleep(0.2)  # the server is waiting for the rest of the body
        sock.close()
    deadline = time.time() + 5
    while time.time() < deadline and strict.output().count(" 499 ") < 3:
        time.sleep(0.1)
    output = strict.output()
    assert output.count(" 499 ") == 3, output[-2000:]
    assert "Traceback" not in output and "unhandled error" not in output, output[-2000:]
    metrics = httpx.get(f"{strict.url}/metrics").text
    counted = 'lstm_serve_requests_total{method="POST",route="/v1/classify",status="499"} 1.0'
    assert counted in metrics, [m for m in metrics.splitlines() if "499" in m]
    assert httpx.post(f"{strict.url}/v1/classify", json={"sequences": [[[0.1] * 12] * 5]}).status_code == 200


@pytest.fixture
def small_heads(start_server):
    return start_server("--max-header-bytes", "4096")


def test_headers_over_max_header_bytes_get_431_and_the_connection_closes_however_they_arrive(small_heads):
    big = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 6000 + b"\r\n\r\n"
    for piece in (len(big), 1000, 100):  # in one write, and in pieces the server reads one at a time
        sock = connect(small_heads)
        for at in range(0, len(big), piece):
            try:
                sock.sendall(big[at : at + piece])
            except OSError:
                break
            if piece < len(big):
                time.sleep(0.01)
        answer, closed_after = read_until_closed(sock, 5)
        assert answer.startswith(b"HTTP/1.1 431"), (piece, answer[:200])
        assert b'"code":"headers_too_large"' in answer and closed_after < 3
    sock = connect(small_heads)  # a request line over half the allowance is the target's fault: 414
    sock.sendall(b"GET /v1/models/" + b"m" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    answer, _ = read_until_closed(sock, 5)
    assert answer.startswith(b"HTTP/1.1 414") and b'"code":"uri_too_long"' in answer, answer[:200]
    assert b"\r\ndate: " in answer.split(b"\r\n\r\n")[0].lower()
    assert rejections(small_heads) == {"headers_too_large": 3.0, "uri_too_long": 1.0}


def test_an_endless_header_is_cut_off_at_max_header_bytes_not_at_the_header_deadline(small_heads):
    sock = connect(small_heads)
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Endless: ")
    started, answer = time.perf_counter(), b""
    sock.settimeout(0.05)
    while time.perf_counter() - started < 4:
        try:
            sock.sendall(b"a" * 65536)
        except OSError:  # the server closed: what it sent before is in the receive buffer
            break
        try:
            answer += sock.recv(65536)
        except TimeoutError:
            continue
        if answer:
            break
    answer += read_until_closed(sock, 3)[0]
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert time.perf_counter() - started < 2, "cut off by the header deadline, not by the size limit"


def test_heads_under_max_header_bytes_are_served_with_a_big_body_or_many_pipelined_requests(small_heads):
    body = json.dumps({"sequences": [[[0.1] * 12] * 300]}).encode()  # ~16 KB, over the head limit
    head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Pad: " + b"p" * 3000
    sock = connect(small_heads)
    sock.sendall(head + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))  # head and body in one write
    sock.settimeout(5)
    assert sock.recv(65536).startswith(b"HTTP/1.1 200"), "a head under the limit with a big body was refused"
    sock.close()
    pipelined = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 500 + b"\r\n\r\n"
    sock = connect(small_heads)
    sock.sendall(pipelined * 40)  # ~22 KB of heads in one write, each under the limit
    received = b""
    sock.settimeout(5)
    while received.count(b"HTTP/1.1 200") < 40:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {received.count(b'HTTP/1.1 200')} of 40 answers: {received[-300:]!r}"
        assert b"HTTP/1.1 431" not in chunk
        received += chunk
    sock.close()


def test_a_head_over_the_limit_after_a_pipelined_request_is_refused_after_that_request_is_answered(small_heads):
    body = json.dumps({"sequences": [[[0.1] * 12] * 20]}).encode()
    first = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    oversized = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 6000 + b"\r\n\r\n"
    sock = connect(small_heads)
    sock.sendall(first % (len(body), body) + oversized)  # one write: both heads are parsed in one read
    answer, closed_after = read_until_closed(sock, 5)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]  # the first request's answer comes first
    assert answer.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 431" in answer and closed_after < 3, answer[-300:]


def test_a_websocket_upgrade_with_a_head_over_the_limit_gets_431_not_a_websocket(small_heads):
    sock = connect(small_heads)
    sock.sendall(
        b"GET /v1/sessions/x/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Big: "
        + b"a" * 6000
        + b"\r\n\r\n"
    )
    answer, _ = read_until_closed(sock, 5)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]


def test_bytes_before_any_request_line_count_against_max_header_bytes(small_heads):
    """Empty lines ahead of a request line (which the parser skips) are bytes of the head too: a flood of
    them is answered 431 like a long header, not dropped by an error in the server."""
    sock = connect(small_heads)
    for _ in range(5):
        try:
            sock.sendall(b"\r\n" * 2000)
        except OSError:
            break
        time.sleep(0.05)
    answer, _ = read_until_closed(sock, 5)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert "Traceback" not in small_heads.output(), small_heads.output()[-2000:]
