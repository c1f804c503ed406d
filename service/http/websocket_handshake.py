"""uvicorn's websockets-sansio protocol, answering every handshake it cannot parse.

On a request line over 8 KB, or headers over websockets' limits, the websockets library prepares a
414/431 response, but uvicorn (0.54) looks only for parsed requests and protocol errors, so nothing
is sent and the connection stays open forever. Here such a handshake gets its answer (or a 400 when
the request is not HTTP at all) and the connection is closed at once.
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

BAD_REQUEST_BODY = b"Failed to open a WebSocket connection: not a valid HTTP request.\n"
BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BAD_REQUEST_BODY), BAD_REQUEST_BODY)
)


class WebSocketHandshakeGuard(WebSocketsSansIOProtocol):
    def data_received(self, data: bytes) -> None:
        if self.handshake_initiated:
            super().data_received(data)
            return
        self.conn.receive_data(data)
        if self.conn.handshake_exc is None:
            self.handle_events()
            return
        # the handshake could not be parsed: send what websockets prepared, or a 400, then close
        response = b"".join(self.conn.data_to_send())
        self.handshake_initiated = self.handshake_complete = self.close_sent = True
        self.transport.write(response or BAD_REQUEST)
        self.transport.close()
