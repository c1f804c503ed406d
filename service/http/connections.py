"""uvicorn's HTTP protocol with a deadline on a request's headers, and a response in one write.

uvicorn closes idle keep-alive connections, but a client that sends its request line and headers one byte
at a time holds its connection (and a slot of max_connections) for as long as it likes. Here each request
must finish its headers within `header_timeout_s` of its first byte (of the connection, for the first
request); otherwise the answer is 408 and the connection closes. The body has its own deadline, in the
frame (http/frame.py), where the route that reads it can answer in its protocol; a request whose body
has all arrived says so in its scope (BODY_COMPLETE), and the frame then reads it without a deadline.

uvicorn writes a response's head as soon as the app starts it and its body as a second write: two system
calls, and two TCP segments the client wakes up for. Here the response cycle writes through
`ResponseWriter`, which holds a write until the next one (the body follows the head in the same step of
the app) and sends both at once; a write nothing follows goes out on the event loop's next turn.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

BODY_COMPLETE = "lstm_serve.body_complete"  # in a request's scope once all its body has arrived
TIMEOUT_BODY = b'{"error":{"code":"request_timeout","message":"the request headers did not arrive in time"}}'
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(TIMEOUT_BODY), TIMEOUT_BODY)
)


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
        self.transport.writelines((held, data))  # one system call (writev), no copy of a large body

    def flush(self) -> None:
        if self.held is not None:
            held, self.held = self.held, None
            self.transport.write(held)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


class HeaderDeadline(HttpToolsProtocol):
    header_timeout_s: ClassVar[float] = 5.0  # set from the settings by create_app, in every worker process

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.writer = ResponseWriter(transport, self.loop)
        self.arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.header_timer is None:
            self.arm_header_timer()

    def on_headers_complete(self) -> None:
        self.disarm_header_timer()
        cycle = self.cycle
        super().on_headers_complete()
        if self.cycle is not cycle and self.cycle is not None:  # a new request's cycle (not an upgrade)
            self.cycle.transport = self.writer  # type: ignore[assignment]  # what the cycle uses of it

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.scope[BODY_COMPLETE] = True  # type: ignore[literal-required]  # the frame's body deadline reads it

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm_header_timer()
        super().connection_lost(exc)

    def arm_header_timer(self) -> None:
        self.header_timer = self.loop.call_later(self.header_timeout_s, self.headers_too_slow)

    def disarm_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def headers_too_slow(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing():
            self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()
