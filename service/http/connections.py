"""uvicorn's HTTP protocol with a deadline on a request's headers.

uvicorn closes idle keep-alive connections, but a client that sends its request line and headers one byte
at a time holds its connection (and a slot of max_connections) for as long as it likes. Here each request
must finish its headers within `header_timeout_s` of its first byte (of the connection, for the first
request); otherwise the answer is 408 and the connection closes. The body has its own deadline, in the
frame (http/frame.py), where the route that reads it can answer in its protocol.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

TIMEOUT_BODY = b'{"error":{"code":"request_timeout","message":"the request headers did not arrive in time"}}'
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(TIMEOUT_BODY), TIMEOUT_BODY)
)


class HeaderDeadline(HttpToolsProtocol):
    header_timeout_s: ClassVar[float] = 5.0  # set from the settings by create_app, in every worker process

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.header_timer is None:
            self.arm_header_timer()

    def on_headers_complete(self) -> None:
        self.disarm_header_timer()
        super().on_headers_complete()

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
