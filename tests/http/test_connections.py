"""A response leaves in one write (http/connections.py): the head uvicorn writes on its own waits for the
body; a write nothing follows still goes out, on the event loop's next turn."""

import asyncio
import contextlib
import json
import socket

import uvloop

from lstm_serve.http.connections import MAX_PIPELINED, ResponseWriter


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def writelines(self, parts: tuple[bytes, ...]) -> None:  # one writev: one write on the wire
        self.writes.append(b"".join(parts))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def test_a_head_and_its_body_go_out_in_one_write_and_a_lone_write_on_the_next_turn():
    async def main():
        transport = RecordingTransport()
        writer = ResponseWriter(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        held = list(transport.writes)
        writer.write(b"body")
        together = list(transport.writes)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # nothing follows it in this step
        before_turn = list(transport.writes)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        after_turn = list(transport.writes)
        writer.write(b"last words")
        writer.close()
        return held, together, before_turn, after_turn, transport

    held, together, before_turn, after_turn, transport = asyncio.run(main())
    assert held == [] and together == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    assert before_turn == together and after_turn[-1] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert transport.writes[-1] == b"last words" and transport.closed, "close() dropped a held write"


def test_writes_to_a_connection_the_client_has_closed_are_dropped_not_raised():
    """uvloop raises RuntimeError on a closed transport; a response (or a held head's flush on the next turn)
    whose client is gone must not surface as an error traceback in the log."""

    async def main():
        server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
        loop, port = asyncio.get_running_loop(), server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        failures: list[dict] = []
        loop.set_exception_handler(lambda _, context: failures.append(context))
        writer = ResponseWriter(transport, loop)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")  # held for the next turn
        transport.close()
        await asyncio.sleep(0.05)  # closed for good; the held write's flush ran after it
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        writer.write(b"body")
        writer.close()
        server.close()
        return failures

    assert uvloop.run(main()) == []


def test_a_client_that_waits_for_100_continue_gets_it_and_then_its_answer(server):
    """The one write of the server that no other follows: held for a turn, never for good."""
    body = json.dumps({"sequences": [[[0.5] * 12] * 3]}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        head = (
            f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
        )
        sock.sendall(head.encode())
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
        sock.sendall(body)
        answer = b""
        while b'"predictions"' not in answer or not answer.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]


def read_to_end(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def test_a_client_that_shuts_its_writing_side_after_its_requests_gets_their_answers_then_a_close(server):
    body = json.dumps({"sequences": [[[0.5] * 12] * 3]}).encode()
    head = "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    request = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request + request)  # two, pipelined
        sock.shutdown(socket.SHUT_WR)
        answer = read_to_end(sock)  # the server closes once both are answered
    assert answer.count(b"HTTP/1.1 200 OK") == 2 and answer.count(b'"predictions"') == 2, answer[:300]
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request[:-5])  # cut off in its body: nothing to answer
        sock.shutdown(socket.SHUT_WR)
        assert read_to_end(sock) == b""


def test_trailers_are_never_kept_and_too_many_end_the_connection(server):
    """A chunked body's trailers went into the request's headers, unbounded (20 MB of them grew the server by
    450 MB): they are counted against max_header_bytes (64 KiB here) and dropped."""
    head = (
        "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    body = json.dumps({"sequences": [[[0.5] * 12]]}).encode()
    chunk = b"%x\r\n%s\r\n" % (len(body), body)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head.encode() + chunk + b"0\r\nx-trailer: fine\r\n\r\n")
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head.encode() + chunk + b"0\r\n")
        with contextlib.suppress(OSError):  # the server may close while this is still sending
            for _ in range(40):  # 80 KB of trailers
                sock.sendall(b"x-t: " + b"y" * 2000 + b"\r\n")
        answer = b""
        with contextlib.suppress(ConnectionResetError):  # closed with the client's bytes unread: a reset
            answer = read_to_end(sock)
        assert b"200 OK" not in answer


def test_a_request_answered_before_its_body_arrived_keeps_its_connection_once_the_rest_comes(server):
    """Answered early (here 404), the rest of the body is read and dropped, and the connection serves the next
    request: clients send a body in writes of their own after its head, and closing at once reset the next
    request of a client that reused the connection (httpx's pool did)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
        sock.sendall(b'"a": 1}  \n' + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b'"alive"' not in answer:
            chunk = sock.recv(65536)
            assert chunk, "closed"
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_a_pipelined_request_whose_body_is_still_arriving_when_the_one_before_it_is_answered_is_answered(server):
    """The close above is for the request that was answered early. A pipelined request behind it, whose body
    was still on its way when the first was answered, was cut off with it (a reset, its answer never sent)."""
    body = json.dumps({"sequences": [[[0.5] * 12] * 3]}).encode()
    head = f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    head += "\r\n\r\n"
    request = head.encode() + body
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request + head.encode() + body[:10])  # the second's body cut short
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 OK"), first[:200]
        sock.sendall(body[10:])
        second = sock.recv(65536)
    assert second.startswith(b"HTTP/1.1 200 OK") and b'"predictions"' in second, second[:200]


def test_requests_sent_far_ahead_of_their_answers_are_answered_up_to_a_bound_then_429(server):
    """One read of 256 KB of pipelined requests queued ~7,700 of them (~70x their size in memory, for a client
    that need never read): past MAX_PIPELINED waiting, the earlier ones are answered, then a 429 and a close."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 1000)
        answer = read_to_end(sock)
    assert answer.count(b"HTTP/1.1 200 OK") == MAX_PIPELINED + 1, answer.count(b"HTTP/1.1 200 OK")
    assert answer.count(b"HTTP/1.1 429 Too Many Requests") == 1 and answer.endswith(b'send them again"}}')


def test_a_request_it_cannot_parse_gets_a_json_400_after_the_answers_before_it(server):
    """uvicorn answered in plain text, at once: ahead of the answer to a request pipelined before it."""
    body = json.dumps({"sequences": [[[0.5] * 12] * 3]}).encode()
    head = "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    good = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    for bad in (
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(good + bad)
            answer = read_to_end(sock)
        first, _, rest = answer.partition(b"HTTP/1.1 400 Bad Request")
        assert first.startswith(b"HTTP/1.1 200 OK") and b'"predictions"' in first, answer[:300]
        assert b"application/json" in rest and b'"code":"malformed_request"' in rest, rest
