"""uvicorn's HTTP protocol with a deadline on a request's headers, and a response in one write.

uvicorn closes idle keep-alive connections, but a client that sends its request line and headers one byte
at a time holds its connection (and a slot of max_connections) for as long as it likes. Here each request
must finish its headers within `header_timeout_s` of its first byte (of the connection, for the first
request); otherwise the answer is 408 and the connection closes. Nor does uvicorn's httptools parser bound
the headers' size: one endless header grows in memory until the deadline (~65 MB in 4 s from one client).
Here a request whose line and headers pass `max_header_bytes` gets 431 (414 when the request line is most
of it) and the connection closes. Each refusal counts in lstm_serve_rejected_requests_total, by its code.

The body has its own deadline, in the frame (http/frame.py), where the route that reads it can answer in
its protocol; a request whose body has all arrived says so in its scope (BODY_COMPLETE), and the frame
then reads it without a deadline. Answers have one too: a client that stops reading them (the write buffer
stays full) for body_timeout_s is reset.

uvicorn writes a response's head as soon as the app starts it and its body as a second write: two system
calls, and two TCP segments the client wakes up for. Here the response cycle writes through
`ResponseWriter`, which holds a write until the next one (the body follows the head in the same step of
the app) and sends both at once; a write nothing follows goes out on the event loop's next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
from typing import Any, ClassVar

import httptools
from prometheus_client import Counter
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

BODY_COMPLETE = "lstm_serve.body_complete"  # in a request's scope once all its body has arrived
TIMEOUT_BODY = b'{"error":{"code":"request_timeout","message":"the request headers did not arrive in time"}}'
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(TIMEOUT_BODY), TIMEOUT_BODY)
)
MALFORMED_BODY = (
    b'{"error":{"code":"malformed_request","message":"not a valid HTTP/1.1 request (its request line, a header, '
    b'or the framing of its body)"}}'
)
MALFORMED_RESPONSE = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(MALFORMED_BODY), MALFORMED_BODY)
)
TOO_LARGE_BODY = (
    b'{"error":{"code":"headers_too_large","message":"the request line and headers are over max_header_bytes"}}'
)
TOO_LARGE_RESPONSE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(TOO_LARGE_BODY), TOO_LARGE_BODY)
)
URI_TOO_LONG_BODY = b'{"error":{"code":"uri_too_long","message":"the request line takes most of max_header_bytes"}}'
URI_TOO_LONG_RESPONSE = (
    b"HTTP/1.1 414 URI Too Long\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(URI_TOO_LONG_BODY), URI_TOO_LONG_BODY)
)

RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: the kernel drops what is unsent and resets
DISCARD_LIMIT = 1 << 20  # of a body answered before it arrived, read and dropped; past it the connection closes
MAX_PIPELINED = 64  # requests read ahead of their answers on one connection; uvicorn queued as many as one read held
PIPELINED_BODY = (
    b'{"error":{"code":"too_many_pipelined","message":"more than %d requests were sent ahead of their answers on '
    b'one connection; the rest were not read: send them again"}}' % MAX_PIPELINED
)
PIPELINED_RESPONSE = (
    b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(PIPELINED_BODY), PIPELINED_BODY)
)


BUSY_BODY = (
    b'{"error":{"code":"too_many_connections","message":"the server holds its maximum of open connections '
    b'(max_connections); retry shortly"}}'
)


async def too_many_connections(scope: Any, receive: Any, send: Any) -> None:
    """What a request gets past max_connections (uvicorn's limit_concurrency): the error shape of every other
    refusal, a Retry-After, and a count in lstm_serve_rejected_requests_total; uvicorn's own answer is a
    plain-text 503 that no metric sees."""
    if HeaderDeadline.rejected is not None:
        HeaderDeadline.rejected.labels("too_many_connections").inc()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(BUSY_BODY)),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": BUSY_BODY, "more_body": False})


# uvicorn's HTTP protocol looks this name up in its module each time it refuses a request over the limit
httptools_impl.service_unavailable = too_many_connections


class ResponseWriter:
    """The transport as a request's response cycle sees it: each write is held until the next one joins it,
    or until the event loop's next turn."""

    __slots__ = ("transport", "loop", "held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport, self.loop = transport, loop
        self.held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self.held is None:
            self.held = data
            self.loop.call_soon(self.flush)
            return
        held, self.held = self.held, None
        if not self.transport.is_closing():  # uvloop raises on a closed transport; the client is gone
            self.transport.writelines((held, data))  # one system call (writev), no copy of a large body

    def flush(self) -> None:
        if self.held is not None:
            held, self.held = self.held, None
            if not self.transport.is_closing():
                self.transport.write(held)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class HeaderDeadline(HttpToolsProtocol):
    header_timeout_s: ClassVar[float] = 5.0  # set from the settings by create_app, in every worker process
    max_header_bytes: ClassVar[int] = 65536  # likewise
    send_timeout_s: ClassVar[float] = 15.0  # likewise (body_timeout_s): how long answers may wait unread
    rejected: ClassVar[Counter | None] = None  # lstm_serve_rejected_requests_total, by reason; likewise

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timer: asyncio.TimerHandle | None = None
        self.streamed_head_bytes = 0  # reads taken by the current request's head while it has not ended
        self.head_bytes = 0  # the current request's line and headers as parsed, in bytes
        self.target_bytes = 0  # of which its request target (the URL)
        self.ended_in_read = False  # a request's headers or message ended in the read being parsed
        self.head_refused = False  # a head over max_header_bytes was answered 431: the rest is not read
        self.refusal: bytes | None = None  # a 408 or 431 that waits for the answers to earlier requests
        self.half_closed = False  # the client shut its writing side after whole requests: answer them, then close
        self.in_head = False  # parsing a request's line and headers (header fields after them are trailers)
        self.trailer_bytes = 0  # of the current request's trailers, which are counted, never kept
        self.discard_timer: asyncio.TimerHandle | None = None  # the rest of a body answered early is coming
        self.discarded = 0  # bytes of it dropped so far

    def data_received(self, data: bytes) -> None:
        """A head that ends within the reads counts exactly (its parsed line and headers); one that has not
        ended yet counts by the reads it has taken, so an endless header is cut off while it streams in. A
        read in which a head began after another request ended (pipelining) is not counted that way: which
        of its bytes are the new head's is unknown, so that limit holds from the next read, one read late."""
        if self.head_refused:
            return
        self.ended_in_read = False
        self.parse(data)
        if not self.head_refused and self.header_timer is not None:  # inside a head that has not ended
            self.streamed_head_bytes = 0 if self.ended_in_read else self.streamed_head_bytes + len(data)
            if self.streamed_head_bytes > self.max_header_bytes:
                self.head_refused = True
                self.disarm_header_timer()
        if self.head_refused:
            too_long = self.target_bytes > self.max_header_bytes // 2
            self.refuse(
                *((URI_TOO_LONG_RESPONSE, "uri_too_long") if too_long else (TOO_LARGE_RESPONSE, "headers_too_large"))
            )

    def parse(self, data: bytes) -> None:
        """uvicorn's data_received, but for the bytes after an upgrade request's head: uvicorn dropped them, so
        frames a client sent with its handshake (or a body) vanished, unanswered; the WebSocket gets them."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade as upgrade:
            if not self._should_upgrade():
                self._unsupported_upgrade_warning()
                return
            self.handle_websocket_upgrade()
            rest = data[upgrade.args[0] :] if upgrade.args else b""
            protocol = self.transport.get_protocol()
            if rest and protocol is not self and not self.transport.is_closing():
                protocol.data_received(rest)  # type: ignore[attr-defined]

    def send_400_response(self, msg: str) -> None:
        """A request httptools cannot parse (Content-Length and Transfer-Encoding both, a bad chunk size, a
        control byte in a header): JSON like every other error, after the answers to earlier requests; uvicorn
        answered in plain text, at once."""
        self.answer(MALFORMED_RESPONSE)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.writer = ResponseWriter(transport, self.loop)
        self.send_deadline = SendDeadline(transport, self.send_timeout_s)
        self.arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head = True
        self.streamed_head_bytes = self.head_bytes = self.target_bytes = self.trailer_bytes = 0
        if self.header_timer is None:
            self.arm_header_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self.head_bytes += len(url)
        self.target_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:  # a trailer of a chunked body: uvicorn kept each, unbounded, where no app reads it
            self.trailer_bytes += len(name) + len(value) + 4
            if self.trailer_bytes > self.max_header_bytes and not self.head_refused:
                self.head_refused = True  # nothing more is read: the request is dropped with its connection
                if self.rejected is not None:
                    self.rejected.labels("headers_too_large").inc()
                self.transport.close()
            return
        super().on_header(name, value)
        self.head_bytes += len(name) + len(value) + 4  # ": " and CRLF

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.disarm_header_timer()
        self.ended_in_read = True
        if self.head_refused or self.head_bytes > self.max_header_bytes:
            self.head_refused = True  # no request starts; data_received answers 431 once the read is parsed
            return
        if len(self.pipeline) >= MAX_PIPELINED:  # the earlier ones are answered, then this 429 and a close
            self.head_refused = True
            self.refuse(PIPELINED_RESPONSE, "too_many_pipelined")
            return
        cycle = self.cycle
        super().on_headers_complete()
        if self.cycle is not cycle and self.cycle is not None:  # a new request's cycle (not an upgrade)
            self.cycle.transport = self.writer  # type: ignore[assignment]  # what the cycle uses of it

    def on_body(self, body: bytes) -> None:
        if self.discard_timer is not None:  # the rest of a body answered before it arrived: dropped
            self.discarded += len(body)
            if self.discarded > DISCARD_LIMIT:
                self.stop_discarding()
                self.writer.close()
            return
        if not self.head_refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self.ended_in_read = True
        if self.discard_timer is not None:  # all of it came: the connection serves the client's next request
            self.stop_discarding()
            return
        if self.head_refused:
            return
        super().on_message_complete()
        self.scope[BODY_COMPLETE] = True  # type: ignore[literal-required]  # the frame's body deadline reads it

    def _should_upgrade(self) -> bool:
        """Every Connection and Upgrade header counts, as the WebSocket's handshake reads them: uvicorn read the
        last Connection header only, so `Connection: Upgrade` followed by `Connection: keep-alive` got 426."""
        return asks_for_websocket(self.headers) and self._should_upgrade_to_ws()

    def handle_websocket_upgrade(self) -> None:
        """uvicorn's, but the request line keeps the client's HTTP version, which the handshake checks: uvicorn
        wrote HTTP/1.1 whatever it was, and an upgrade over HTTP/1.0 opened a WebSocket (RFC 6455 4.1)."""
        if self.head_refused:
            return
        self.send_deadline.disarm()  # the WebSocket keeps its own
        self.connections.discard(self)
        version = self.parser.get_http_version().encode("latin-1")
        head = b"%s %s HTTP/%s\r\n" % (self.scope["method"].encode("latin-1"), self.url, version)
        head += b"".join(b"%s: %s\r\n" % header for header in self.scope["headers"]) + b"\r\n"
        assert self.ws_protocol_class is not None  # _should_upgrade: the server speaks WebSocket
        protocol = self.ws_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.app_state
        )
        protocol.connection_made(self.transport)
        self.transport.set_protocol(protocol)
        protocol.data_received(head)

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm_header_timer()
        self.send_deadline.disarm()
        self.stop_discarding()
        super().connection_lost(exc)

    def discard_rest(self) -> None:
        """Answered before its body arrived (401, 404, 413, ...): the rest is read and dropped, so the connection
        serves the client's next request (clients send a body in writes of their own after its head: closing
        at once reset the next request of a client that reused the connection). A client whose rest passes
        DISCARD_LIMIT, or has not all come within body_timeout_s, is closed: a trickled body is no way to hold
        a connection."""
        self.discarded = 0
        self.discard_timer = self.loop.call_later(self.send_timeout_s, self.writer.close)

    def stop_discarding(self) -> None:
        if self.discard_timer is not None:
            self.discard_timer.cancel()
            self.discard_timer = None

    def pause_writing(self) -> None:
        """The client has stopped reading its answers: it gets send_timeout_s to read on. A client that never
        reads held its connection (a max_connections slot, its answers in the server and the kernel, the
        requests behind them) for good: a response waiting to be written is not idle, so keep-alive never
        ended it."""
        super().pause_writing()
        self.send_deadline.arm()

    def resume_writing(self) -> None:
        self.send_deadline.disarm()
        super().resume_writing()

    def arm_header_timer(self) -> None:
        self.header_timer = self.loop.call_later(self.header_timeout_s, self.headers_too_slow)

    def disarm_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def headers_too_slow(self) -> None:
        self.header_timer = None
        self.refuse(TIMEOUT_RESPONSE, "request_timeout")

    def refuse(self, response: bytes, reason: str) -> None:
        """Count the refusal, answer with `response` and close; after the answers to earlier pipelined
        requests, which a client matches to its requests in order."""
        if self.transport.is_closing() or self.refusal is not None:
            return
        if self.rejected is not None:
            self.rejected.labels(reason).inc()
        self.answer(response)

    def answer(self, response: bytes) -> None:
        if self.transport.is_closing():
            return
        if self.pipeline or (self.cycle is not None and not self.cycle.response_complete):
            self.refusal = response
            self.flow.pause_reading()
            return
        status_line, rest = response.split(b"\r\n", 1)
        defaults = b"".join(b"%s: %s\r\n" % header for header in self.server_state.default_headers)
        self.transport.write(b"%s\r\n%s%s" % (status_line, defaults, rest))  # date and server, as uvicorn's
        self.transport.close()

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio reads True: keep writing
        """A client that shuts its writing side once its request is sent (nc, some scripts) still gets the
        answer, then the connection closes; asyncio's default closed it at once, unanswered. A request cut
        off mid-body ends the connection as before (the app sees the disconnect)."""
        cycle = self.cycle
        unanswered = cycle is not None and not cycle.response_complete and not cycle.more_body
        if unanswered or self.pipeline:
            self.half_closed = True
            return True  # keep the transport open to write
        return None

    def on_response_complete(self) -> None:
        # with requests queued behind it, the one answered is not the newest (`self.cycle`), and its body has
        # all arrived: the next request's head came after it
        answered_newest = not self.pipeline
        super().on_response_complete()
        if self.refusal is not None:
            self.answer(self.refusal)
        elif self.half_closed and not self.pipeline and self.cycle.response_complete:  # the last one answered
            self.writer.close()  # the held write goes first
        elif answered_newest and self.cycle.more_body:  # answered before its body arrived (401, 404, 413, ...)
            self.discard_rest()


def asks_for_websocket(headers: list[tuple[bytes, bytes]]) -> bool:
    """`Connection: upgrade` and `Upgrade: websocket` among the tokens of every such header (names lowercase)."""

    def tokens(field: bytes) -> set[bytes]:
        return {token.strip().lower() for name, value in headers if name == field for token in value.split(b",")}

    return b"upgrade" in tokens(b"connection") and b"websocket" in tokens(b"upgrade")


class SendDeadline:
    """Armed while a connection's write buffer is over its high-water mark (its client reads slower than it is
    answered): the connection is reset once a whole `timeout_s` passes without the buffer draining at all. A
    slow reader keeps its connection however long a large answer takes; one that reads nothing is dropped."""

    def __init__(self, transport: asyncio.Transport, timeout_s: float) -> None:
        self.transport, self.timeout_s = transport, timeout_s
        self.timer: asyncio.TimerHandle | None = None
        self.waiting = 0  # bytes in the write buffer when the window began

    def arm(self) -> None:
        if self.timer is None and not self.transport.is_closing():
            self.waiting = self.unsent()
            self.timer = asyncio.get_running_loop().call_later(self.timeout_s, self.check)

    def unsent(self) -> int:
        """Bytes not yet taken by the client: the write buffer's, and the kernel's send queue (a slow reader
        drains the kernel's megabytes long before the buffer moves)."""
        queued = 0
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        return self.transport.get_write_buffer_size() + queued

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def check(self) -> None:
        self.timer = None
        if self.transport.is_closing() and self.transport.get_write_buffer_size() == 0:
            return
        if self.unsent() < self.waiting:  # the client took some: another window
            self.arm()
            return
        if HeaderDeadline.rejected is not None:
            HeaderDeadline.rejected.labels("send_timeout").inc()
        reset(self.transport)


def reset(transport: asyncio.Transport) -> None:
    """Drop a connection whose client reads nothing: reset, not closed, for a close would wait for the unread
    answers to drain, or leave them queued in the kernel for minutes."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
    transport.abort()
