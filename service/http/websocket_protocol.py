"""The WebSocket protocol (RFC 6455, server side) for uvicorn: the opening handshake, frames in and out, and
the ASGI `websocket` interface the frame (http/frame.py) runs on.

uvicorn's websockets-sansio protocol spends more on each message than the model step it carries: a
generator-based frame parser, a response object per handshake, an asyncio.Queue per connection, and a pause
and a resume of the socket's reading (two epoll calls) around every message. Here a message is parsed where
its bytes arrive and handed straight to the waiting `receive()`; reading pauses only when a client sends
ahead of its replies (MAX_QUEUED messages waiting) or stops reading them (the write buffer past its
high-water mark, pongs included), which bounds what one connection can make the server hold.

What the protocol checks, each answered as RFC 6455 says: a handshake that is not GET (405), lacks the
upgrade headers (426), or has no valid Sec-WebSocket-Key or version 13 (400, 426); a request line or a
header over MAX_LINE bytes or more than MAX_HEADERS headers (414, 431), always answered and closed, never
left hanging. After it, a client frame that is not masked, sets reserved bits, has an unknown opcode, is a
fragmented or oversized control frame, continues no message or starts one inside another (close 1002), a
message over `ws_max_size` (1009, as soon as its header says so) or in over MAX_FRAGMENTS frames (1009),
text that is not UTF-8 (1007), or a close frame with a code no endpoint may send (1002). Pings are
answered; the server pings every `ws_ping_interval` and drops a client that does not answer within
`ws_ping_timeout`, and resets one that leaves its replies unread for `send_timeout_s` (body_timeout_s). No
extensions are negotiated (replies are a few hundred bytes: compressing them costs more than it saves).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import hashlib
import logging
import os
from collections import deque
from http import HTTPStatus
from typing import Any, ClassVar, cast
from urllib.parse import unquote

from uvicorn.config import Config
from uvicorn.protocols.utils import ClientDisconnected, get_local_addr, get_remote_addr, is_ssl
from uvicorn.server import ServerState

from lstm_serve.core.batcher import arrivals
from lstm_serve.http.buffers import Holding
from lstm_serve.http.connections import SendDeadline, asks_for_websocket


def unmask_in_python(data: bytes | bytearray | memoryview, mask: bytes | bytearray) -> bytes:
    n = len(data)
    repeated = (bytes(mask) * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


try:
    from websockets.speedups import apply_mask  # C; websockets is a dependency of ours
except ImportError:  # pragma: no cover - a websockets build without its C extension
    apply_mask = unmask_in_python


log = logging.getLogger("uvicorn.error")

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_LINE = 8190  # bytes of a request line or a header line, as uvicorn's websockets protocol allowed
MAX_HEADERS = 128
MAX_QUEUED = 4  # messages waiting for the app before reading pauses
YIELD_EVERY = 16  # messages taken without waiting before the connection's handler lets the others run
# frames one message may arrive in: fragments reach no app (so nothing paces them) and each costs a parse; 4,096
# fragments of a ws_max_size message are 4 KiB each at the default 16 MiB
MAX_FRAGMENTS = 4096
CLOSE_TIMEOUT_S = 10.0  # after our close frame, how long the client has to answer it before the socket closes

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
DATA_OPCODES = {CONT, TEXT, BINARY}
CONTROL_OPCODES = {CLOSE, PING, PONG}
PROTOCOL_ERROR, INVALID_DATA, TOO_BIG, GOING_AWAY_RESTART, TRY_AGAIN_LATER = 1002, 1007, 1009, 1012, 1013
NO_STATUS, ABNORMAL = 1005, 1006
# close codes a client may send (RFC 6455 7.4 and the IANA registry); 3000-4999 belong to libraries and apps
SENDABLE_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}


class HandshakeError(Exception):
    def __init__(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(reason)
        self.status, self.headers = status, headers


class ProtocolError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def message_size(message: dict[str, Any]) -> int:
    return len(message.get("bytes") or message.get("text") or "")


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def frame_header(opcode: int, length: int) -> bytes:
    """The header of a final, unmasked frame (a server never masks)."""
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length < 65536:
        return bytes((0x80 | opcode, 126)) + length.to_bytes(2, "big")
    return bytes((0x80 | opcode, 127)) + length.to_bytes(8, "big")


def close_payload(code: int, reason: str) -> bytes:
    """A close frame's body: the code and as much of the reason as fits a control frame (125 bytes)."""
    encoded = reason.encode()[:123]
    while encoded:  # never cut a character in two
        try:
            encoded.decode()
            break
        except UnicodeDecodeError:
            encoded = encoded[:-1]
    return code.to_bytes(2, "big") + encoded


def parse_close(payload: bytes) -> tuple[int, str]:
    if not payload:
        return NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError(PROTOCOL_ERROR, "a close frame's body is a 2-byte code and a reason")
    code = int.from_bytes(payload[:2], "big")
    if code not in SENDABLE_CODES and not 3000 <= code <= 4999:
        raise ProtocolError(PROTOCOL_ERROR, f"close code {code} may not be sent")
    try:
        return code, payload[2:].decode()
    except UnicodeDecodeError:
        raise ProtocolError(INVALID_DATA, "the close reason is not UTF-8") from None


def http_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
    lines = [f"HTTP/1.1 {status} {phrase}".encode()]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class Handshake:
    """The upgrade request, parsed and checked."""

    def __init__(self, raw: bytes) -> None:
        request_line, *header_lines = raw.split(b"\r\n")
        if len(request_line) > MAX_LINE:
            raise HandshakeError(414, "the request line is too long")
        if len(header_lines) > MAX_HEADERS:
            raise HandshakeError(431, f"more than {MAX_HEADERS} headers")
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            raise HandshakeError(400, "not a valid HTTP request line")
        method, target, version = parts
        self.headers: list[tuple[bytes, bytes]] = []
        for line in header_lines:
            if len(line) > MAX_LINE:
                raise HandshakeError(431, "a header line is too long")
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise HandshakeError(400, "not a valid header line")
            self.headers.append((name.lower(), value.strip()))
        self.target = target.decode("latin-1")
        if method != b"GET":
            raise HandshakeError(405, "a WebSocket opens with GET", (("Allow", "GET"),))
        if version != b"HTTP/1.1":
            raise HandshakeError(505, "a WebSocket opens over HTTP/1.1")
        self.check_upgrade()
        if sum(name == b"host" for name, _ in self.headers) != 1:
            raise HandshakeError(400, "a WebSocket handshake names its Host, once")
        self.key = self.header_value(b"sec-websocket-key")
        try:
            valid_key = self.key is not None and len(base64.b64decode(self.key, validate=True)) == 16
        except binascii.Error:
            valid_key = False
        if not valid_key:
            raise HandshakeError(400, "Sec-WebSocket-Key is missing or not 16 bytes in base64")
        if self.header_value(b"sec-websocket-version") != "13":
            raise HandshakeError(426, "only Sec-WebSocket-Version 13 is spoken", (("Sec-WebSocket-Version", "13"),))
        self.subprotocols = [
            token.strip()
            for name, value in self.headers
            if name == b"sec-websocket-protocol"
            for token in value.decode("latin-1").split(",")
            if token.strip()
        ]

    def header_value(self, name: bytes) -> str | None:
        values = [value for key, value in self.headers if key == name]
        return values[0].decode("latin-1") if len(values) == 1 else None

    def check_upgrade(self) -> None:
        if not asks_for_websocket(self.headers):
            raise HandshakeError(
                426,
                "this is a WebSocket endpoint: send Connection: Upgrade and Upgrade: websocket",
                (("Upgrade", "websocket"),),
            )


class WebSocketProtocol(asyncio.Protocol):
    send_timeout_s: ClassVar[float] = 15.0  # set by create_app (body_timeout_s): how long replies may wait unread

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()  # pragma: no cover
        self.config, self.app, self.app_state = config, config.loaded_app, app_state
        self.loop = _loop or asyncio.get_event_loop()
        self.connections, self.tasks = server_state.connections, server_state.tasks
        self.default_headers = server_state.default_headers
        self.max_size = config.ws_max_size
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.scope: dict[str, Any] = {}
        self.handshake: Handshake | None = None
        # where the connection is: handshake sent (accepted), close frame sent, a denial response under way
        self.accepted = self.close_sent = self.disconnected = False
        self.denial: tuple[int, list[tuple[bytes, bytes]], list[bytes]] | None = None
        # incoming bytes not yet a whole frame, and the message whose fragments are arriving
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.needed = 0
        self.fragments = bytearray()  # joined as they arrive: a list of many small ones weighs far more
        self.fragments_count = 0
        self.fragments_opcode: int | None = None
        # messages for the app: handed to a waiting receive(), else queued
        self.inbox: deque[dict[str, Any]] = deque()
        self.inbox_bytes = 0
        self.held = Holding()  # pending + fragments + inbox, counted against max_buffered_bytes (http/buffers.py)
        self.waiter: asyncio.Future[dict[str, Any]] | None = None
        self.disconnect_message: dict[str, Any] | None = None
        self.read_paused = False
        self.taken_at_once = 0  # messages receive() returned from the inbox without waiting, in a row
        self.counted = 0  # this connection's messages in `arrivals` (delivered, not yet received by the app)
        self.writable = asyncio.Event()
        self.writable.set()
        self.close_timer: asyncio.TimerHandle | None = None
        self.ping_timer: asyncio.TimerHandle | None = None
        self.pong_timer: asyncio.TimerHandle | None = None
        self.ping_payload: bytes | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # its replies, pings and close frame wait unread behind each other: the socket held its memory, its
        # max_connections slot and its app task until the client went
        self.send_deadline = SendDeadline(self.transport, self.send_timeout_s)
        self.connections.add(self)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.disconnected = True
        self.uncount()
        self.held.release()
        self.stop_timers()
        self.deliver_disconnect(ABNORMAL)
        self.writable.set()  # a send() waiting for the buffer to drain learns the client is gone
        if exc is None:
            self.transport.close()

    def eof_received(self) -> None:
        return None  # the transport closes; connection_lost follows

    def pause_writing(self) -> None:
        """The client does not read what we send: stop reading it too, or the pongs its pings ask for would
        pile up in the write buffer without bound (the app's own replies already wait in send())."""
        self.writable.clear()
        self.send_deadline.arm()  # a close would wait on a client that reads nothing for good
        if not self.read_paused and not self.close_sent and not self.transport.is_closing():
            self.read_paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.send_deadline.disarm()
        self.writable.set()
        self.resume_reading_if_caught_up()

    def resume_reading_if_caught_up(self) -> None:
        """Read on once the client reads again and the app has taken most of what waits for it."""
        if (
            self.read_paused
            and self.writable.is_set()
            and len(self.inbox) < MAX_QUEUED // 2
            and not self.transport.is_closing()
        ):
            self.read_on()

    def read_on(self) -> None:
        """Resume reading, starting with the frames already read that parsing stopped before."""
        self.read_paused = False
        self.transport.resume_reading()
        if self.pending:
            self.parse_pending()

    def data_received(self, data: bytes) -> None:
        if self.handshake is None:
            self.receive_handshake(data)
            return
        if not self.accepted and self.denial is None and not self.close_sent:
            # a client sends frames only after the server's 101 (RFC 6455 4.1); this one did not wait
            self.deliver_disconnect(PROTOCOL_ERROR, "frames before the handshake's answer")
            self.close_sent = True
            self.transport.close()
            return
        if self.pending:  # the rest of a frame: parse once it is all here
            self.pending.append(data)
            self.pending_size += len(data)
            self.parse_pending()
        else:
            self.parse_or_fail(data)
        self.count_held()

    def count_held(self) -> None:
        """What this connection holds of messages not yet taken by the app, against max_buffered_bytes: past
        it, the connection closes (1013, try again later)."""
        size = self.pending_size + len(self.fragments) + self.inbox_bytes
        if not self.held.hold(size) and not self.close_sent:
            self.fail(TRY_AGAIN_LATER, "the server holds too many messages still arriving; try again later")

    def parse_pending(self) -> None:
        """The bytes held back (a frame's start, or frames read before reading paused), once whole."""
        if self.pending_size >= self.needed:
            data = b"".join(self.pending)
            self.pending, self.pending_size = [], 0
            self.parse_or_fail(data)

    def parse_or_fail(self, data: bytes) -> None:
        try:
            self.parse(data)
        except ProtocolError as error:
            self.fail(error.code, str(error))

    def shutdown(self) -> None:
        """The server is stopping: close every WebSocket with 1012 (service restart)."""
        self.stop_timers()
        if self.close_sent or self.transport.is_closing():
            self.transport.close()
            return
        if self.accepted:
            self.deliver_disconnect(GOING_AWAY_RESTART)
            self.write_frame(CLOSE, close_payload(GOING_AWAY_RESTART, "server shutting down"))
            self.close_sent = True
        else:
            self.write_http_error(500, "Internal Server Error")
        self.transport.close()

    # -- the opening handshake ---------------------------------------------------------------------
    def receive_handshake(self, data: bytes) -> None:
        """uvicorn's HTTP protocol hands over the whole upgrade request, re-encoded, in one call."""
        head = data.split(b"\r\n\r\n", 1)[0]
        try:
            self.handshake = Handshake(head)
        except HandshakeError as error:
            self.write_http_error(error.status, f"Failed to open a WebSocket connection: {error}.\n", error.headers)
            self.close_sent = True
            self.transport.close()
            return
        self.scope = self.make_scope(self.handshake)
        self.deliver({"type": "websocket.connect"})
        task = self.loop.create_task(self.run_asgi())
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def make_scope(self, handshake: Handshake) -> dict[str, Any]:
        raw_path, _, query = handshake.target.partition("?")
        root = self.config.root_path
        return {
            "type": "websocket",
            "asgi": {"version": self.config.asgi_version, "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "wss" if is_ssl(self.transport) else "ws",
            "server": get_local_addr(self.transport),
            "client": get_remote_addr(self.transport),
            "root_path": root,
            "path": root + unquote(raw_path),
            "raw_path": root.encode("ascii") + raw_path.encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "headers": handshake.headers,
            "subprotocols": handshake.subprotocols,
            "state": self.app_state.copy(),
            "extensions": {"websocket.http.response": {}},
        }

    async def run_asgi(self) -> None:
        try:
            await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            log.exception("Exception in ASGI application\n")
            if not self.accepted and self.denial is None:
                self.write_http_error(500, "Internal Server Error")
        else:
            if not self.accepted and self.denial is None and not self.close_sent:
                log.error("ASGI callable returned without completing handshake.")
                self.write_http_error(500, "Internal Server Error")
        if self.accepted and not self.close_sent and not self.transport.is_closing():
            self.write_frame(CLOSE, close_payload(1000, ""))  # the app returned without closing: close politely
            self.close_sent = True
        if self.close_timer is None:  # else the client has CLOSE_TIMEOUT_S to answer our close frame
            self.transport.close()

    def write_http_error(self, status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        body = text.encode()
        fields = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        fields += [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *self.default_headers,
        ]
        self.transport.write(http_response(status, fields, body))

    # -- frames in ------------------------------------------------------------------------------------
    def parse(self, data: bytes) -> None:
        """Every whole frame in `data` until reading pauses (MAX_QUEUED messages wait for the app: one read may
        hold tens of thousands of tiny ones); the rest waits in `pending`, for the bytes it lacks or for
        reading to resume."""
        end, at = len(data), 0
        view = memoryview(data)
        while end - at >= 2 and not self.read_paused and not self.transport.is_closing():
            first, second = data[at], data[at + 1]
            length, head = second & 0x7F, 2
            if length == 126:
                if end - at < 4:
                    break
                length, head = int.from_bytes(data[at + 2 : at + 4], "big"), 4
            elif length == 127:
                if end - at < 10:
                    break
                length, head = int.from_bytes(data[at + 2 : at + 10], "big"), 10
            self.check_frame(first, second, length)
            size = head + 4 + length
            if end - at < size:
                break
            mask = data[at + head : at + head + 4]
            payload = apply_mask(view[at + head + 4 : at + size], mask) if length else b""
            at += size
            self.handle_frame(first & 0x80, first & 0x0F, payload)
        if at < end and not self.transport.is_closing():
            rest = data[at:]
            self.pending, self.pending_size = [rest], len(rest)
            self.needed = self.frame_size(rest)

    @staticmethod
    def frame_size(start: bytes) -> int:
        """How many bytes the frame that `start` begins takes, as far as its header tells (at least more)."""
        if len(start) < 2:
            return 2
        length = start[1] & 0x7F
        if length == 126:
            return 8 + int.from_bytes(start[2:4], "big") if len(start) >= 4 else 4
        if length == 127:
            return 14 + int.from_bytes(start[2:10], "big") if len(start) >= 10 else 10
        return 6 + length

    def check_frame(self, first: int, second: int, length: int) -> None:
        opcode = first & 0x0F
        if first & 0x70:
            raise ProtocolError(PROTOCOL_ERROR, "reserved bits set (no extension was negotiated)")
        if not second & 0x80:
            raise ProtocolError(PROTOCOL_ERROR, "a client's frames must be masked")
        if opcode in CONTROL_OPCODES:
            if not first & 0x80 or length > 125:
                raise ProtocolError(PROTOCOL_ERROR, "a control frame is one frame of at most 125 bytes")
            return
        if opcode not in DATA_OPCODES:
            raise ProtocolError(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        if opcode == CONT and self.fragments_opcode is None:
            raise ProtocolError(PROTOCOL_ERROR, "a continuation frame with no message to continue")
        if opcode != CONT and self.fragments_opcode is not None:
            raise ProtocolError(PROTOCOL_ERROR, "a new message started before the last one ended")
        if length >= 1 << 63:
            raise ProtocolError(PROTOCOL_ERROR, "a 64-bit payload length must have its top bit 0")
        if len(self.fragments) + length > self.max_size:
            raise ProtocolError(TOO_BIG, f"message over {self.max_size} bytes")
        if (opcode == CONT or not first & 0x80) and self.fragments_count >= MAX_FRAGMENTS:
            raise ProtocolError(TOO_BIG, f"message in over {MAX_FRAGMENTS} frames")

    def handle_frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode == PING:
            if not self.close_sent:
                self.write_frame(PONG, payload)
        elif opcode == PONG:
            self.handle_pong(payload)
        elif opcode == CLOSE:
            self.handle_close(payload)
        elif fin and opcode != CONT:  # a whole message in one frame: the common case
            self.message(opcode, payload)
        else:
            if opcode != CONT:
                self.fragments_opcode = opcode
            self.fragments += payload
            self.fragments_count += 1
            if fin:
                whole, opcode = bytes(self.fragments), cast(int, self.fragments_opcode)
                self.fragments, self.fragments_count, self.fragments_opcode = bytearray(), 0, None
                self.message(opcode, whole)

    def message(self, opcode: int, payload: bytes) -> None:
        if self.close_sent:  # the app has closed: what still arrives is dropped, the close echo awaited
            return
        if opcode == BINARY:
            message = {"type": "websocket.receive", "bytes": payload}
        else:
            try:
                message = {"type": "websocket.receive", "text": payload.decode()}
            except UnicodeDecodeError:
                raise ProtocolError(INVALID_DATA, "a text message that is not UTF-8") from None
        self.counted += 1
        arrivals.waiting += 1
        self.deliver(message)

    def handle_close(self, payload: bytes) -> None:
        if self.close_sent:  # the client answered our close frame: the closing handshake is done
            if self.close_timer is not None:
                self.close_timer.cancel()
                self.close_timer = None
            self.transport.close()
            return
        code, reason = parse_close(payload)
        self.deliver_disconnect(code, reason)
        self.write_frame(CLOSE, payload[:2])  # echo the code, as RFC 6455 5.5.1 asks
        self.close_sent = True
        self.transport.close()

    def fail(self, code: int, reason: str) -> None:
        """A protocol error: say why in a close frame, tell the app, close the connection."""
        log.debug("WebSocket protocol error %d: %s", code, reason)
        self.deliver_disconnect(code, reason)
        if not self.close_sent:
            self.write_frame(CLOSE, close_payload(code, reason))
            self.close_sent = True
        self.transport.close()

    # -- messages to the app ---------------------------------------------------------------------
    def deliver(self, message: dict[str, Any]) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            self.waiter = None
            waiter.set_result(message)
            return
        self.inbox.append(message)
        self.inbox_bytes += message_size(message)
        if len(self.inbox) >= MAX_QUEUED and not self.read_paused and not self.transport.is_closing():
            self.read_paused = True
            self.transport.pause_reading()

    def deliver_disconnect(self, code: int, reason: str = "") -> None:
        if self.disconnect_message is None:
            self.disconnect_message = {"type": "websocket.disconnect", "code": code, "reason": reason}
            self.deliver(self.disconnect_message)

    async def receive(self) -> dict[str, Any]:
        if self.inbox:
            message = self.inbox.popleft()
            self.inbox_bytes -= message_size(message)
            self.resume_reading_if_caught_up()
            self.count_held()
            self.taken_at_once += 1
            if self.taken_at_once >= YIELD_EVERY:  # a client that keeps the inbox full gets no more than its turn
                self.taken_at_once = 0
                await asyncio.sleep(0)
        elif self.disconnect_message is not None:  # already told once; a receive after it gets it again
            return self.disconnect_message
        else:
            self.taken_at_once = 0
            self.waiter = self.loop.create_future()
            message = await self.waiter
        if self.counted and message["type"] == "websocket.receive":
            self.counted -= 1
            arrivals.waiting -= 1
        return message

    def uncount(self) -> None:
        """Messages the app will never take (the connection is gone) leave the count of arrivals."""
        arrivals.waiting -= self.counted
        self.counted = 0

    # -- the app's messages out -------------------------------------------------------------------
    async def send(self, message: dict[str, Any]) -> None:
        if not self.writable.is_set():
            await self.writable.wait()
        if self.disconnected:
            raise ClientDisconnected()
        kind = message["type"]
        if self.accepted and not self.close_sent:
            if kind == "websocket.send":
                self.send_data(message)
            elif kind == "websocket.close":
                self.send_close(message.get("code", 1000), message.get("reason") or "")
            else:
                raise RuntimeError(f"Expected ASGI message 'websocket.send' or 'websocket.close', but got {kind!r}.")
        elif self.denial is not None:
            self.send_denial_body(message)
        elif not self.accepted and not self.close_sent:
            self.send_handshake_reply(message)
        elif self.close_sent and kind in ("websocket.accept", "websocket.send", "websocket.close"):
            raise ClientDisconnected()  # the close handshake has begun: nothing more goes out
        else:
            raise RuntimeError(f"Unexpected ASGI message {kind!r} after the WebSocket closed.")

    def send_data(self, message: dict[str, Any]) -> None:
        data = message.get("bytes")
        if data is not None:
            self.write_frame(BINARY, data)
            return
        text = message.get("text")
        if text is None:
            raise RuntimeError("a websocket.send message carries 'bytes' or 'text'")
        self.write_frame(TEXT, text.encode())

    def write_frame(self, opcode: int, payload: bytes) -> None:
        if len(payload) < 16384:
            self.transport.write(frame_header(opcode, len(payload)) + payload)
        else:  # no copy of a large payload
            self.transport.writelines([frame_header(opcode, len(payload)), payload])

    def send_close(self, code: int, reason: str) -> None:
        self.deliver_disconnect(code, reason)
        self.write_frame(CLOSE, close_payload(code, reason))
        self.close_sent = True
        self.stop_keepalive()
        if self.read_paused:  # read on, for the client's answer to the close
            self.read_on()
        self.close_timer = self.loop.call_later(CLOSE_TIMEOUT_S, self.close_unanswered)

    def close_unanswered(self) -> None:
        """The client has not answered our close frame: close; what it has not read yet still goes out, while
        it drains (a client that reads nothing is reset by the send deadline)."""
        self.close_timer = None
        if self.transport.get_write_buffer_size():
            self.send_deadline.arm()
        self.transport.close()

    def send_handshake_reply(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            self.send_accept(message)
        elif kind == "websocket.close":  # refused before the upgrade: a plain 403
            self.deliver_disconnect(ABNORMAL)
            self.close_sent = True
            self.transport.write(
                http_response(403, [(b"content-length", b"0"), (b"connection", b"close"), *self.default_headers])
            )
            self.transport.close()
        elif kind == "websocket.http.response.start":
            status = message["status"]
            if not 100 <= status < 600:
                raise RuntimeError(f"Invalid HTTP status code '{status}' in response.")
            self.denial = (status, list(message.get("headers", [])), [])
        else:
            raise RuntimeError(
                "Expected ASGI message 'websocket.accept', 'websocket.close' or 'websocket.http.response.start' "
                f"but got {kind!r}."
            )

    def send_accept(self, message: dict[str, Any]) -> None:
        assert self.handshake is not None and self.handshake.key is not None
        headers = [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", accept_key(self.handshake.key).encode()),
        ]
        if message.get("subprotocol"):
            headers.append((b"sec-websocket-protocol", message["subprotocol"].encode("latin-1")))
        headers += [*self.default_headers, *message.get("headers", [])]
        if self.transport.is_closing():
            return
        self.accepted = True
        self.transport.write(http_response(101, headers))
        self.start_keepalive()

    def send_denial_body(self, message: dict[str, Any]) -> None:
        if message["type"] != "websocket.http.response.body":
            raise RuntimeError(f"Expected ASGI message 'websocket.http.response.body' but got {message['type']!r}.")
        assert self.denial is not None
        status, headers, body = self.denial
        body.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        content = b"".join(body)
        names = {name.lower() for name, _ in headers}
        defaults = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(content)).encode()),
            (b"connection", b"close"),
            (b"date", email.utils.formatdate(usegmt=True).encode()),
        ]
        headers += [(name, value) for name, value in defaults if name not in names]
        self.deliver_disconnect(ABNORMAL)
        self.close_sent = True
        self.transport.write(http_response(status, headers, content))
        self.transport.close()

    # -- keepalive ------------------------------------------------------------------------------------
    def start_keepalive(self) -> None:
        interval = self.config.ws_ping_interval
        if interval is not None and interval > 0:
            self.ping_timer = self.loop.call_later(interval, self.send_ping)

    def send_ping(self) -> None:
        self.ping_timer = None
        if self.close_sent or self.transport.is_closing():
            return
        self.ping_payload = os.urandom(4)
        self.write_frame(PING, self.ping_payload)
        timeout = self.config.ws_ping_timeout
        if timeout is not None:
            self.pong_timer = self.loop.call_later(timeout, self.ping_timed_out)
        else:
            self.start_keepalive()

    def handle_pong(self, payload: bytes) -> None:
        if self.ping_payload is None or payload != self.ping_payload:
            return  # unsolicited, or an answer to an earlier ping
        self.ping_payload = None
        if self.pong_timer is not None:
            self.pong_timer.cancel()
            self.pong_timer = None
            self.start_keepalive()

    def ping_timed_out(self) -> None:
        self.pong_timer = None
        if not self.close_sent and not self.transport.is_closing():
            self.fail(1011, "keepalive ping timeout")

    def stop_keepalive(self) -> None:
        for timer in (self.ping_timer, self.pong_timer):
            if timer is not None:
                timer.cancel()
        self.ping_timer = self.pong_timer = None
        self.ping_payload = None

    def stop_timers(self) -> None:
        self.stop_keepalive()
        self.send_deadline.disarm()
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
