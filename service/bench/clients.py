"""Lean HTTP/1.1 and WebSocket clients for load generation.

A general-purpose client (httpx, websockets) spends more CPU per request than the server under
test, and on a 2-core machine the load generator shares the cores with it. These clients send
pre-encoded bytes over keep-alive connections and parse only the status and Content-Length.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import struct
import time
from collections.abc import Callable
from typing import cast


class HttpConnection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> HttpConnection:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    def streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert self.reader is not None and self.writer is not None, "not connected"
        return self.reader, self.writer

    def encode(self, method: str, path: str, body: bytes = b"", content_type: str = "application/json") -> bytes:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body or method in ("POST", "PUT"):
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        return head.encode() + b"\r\n" + body

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        """Send one pre-encoded request; return (status, body). A keep-alive connection the server
        closed while idle is reopened once, as every HTTP client does."""
        if self.writer is None:
            await self.connect()
        reader, writer = self.streams()
        writer.write(raw)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionResetError) as error:
            if isinstance(error, asyncio.IncompleteReadError) and error.partial:
                raise
            await self.close()
            await self.connect()
            reader, writer = self.streams()
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at >= 0:
            end = lower.index(b"\r\n", at + 2)
            length = int(lower[at + 17 : end])
        body = await reader.readexactly(length) if length else b""
        if b"connection: close" in lower:
            await self.close()
        return status, body

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        return await self.send(self.encode(method, path, body))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


class WebSocketConnection:
    """RFC 6455 client: masked frames out, text or binary frames in, pings answered."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host, self.port, self.path = host, port, path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> WebSocketConnection:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        key = base64.b64encode(os.urandom(16)).decode()
        self.writer.write(
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        if int(head[9:12]) != 101:
            raise ConnectionError(f"WebSocket upgrade refused: {head[:40]!r}")
        return self

    def streams(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert self.reader is not None and self.writer is not None, "not connected"
        return self.reader, self.writer

    def send_binary(self, payload: bytes) -> None:
        self.streams()[1].write(masked_frame(payload))

    def send_text(self, text: str) -> None:
        self.streams()[1].write(masked_frame(text.encode(), 0x1))

    async def recv(self) -> bytes:
        reader, writer = self.streams()
        while True:
            first, second = await reader.readexactly(2)
            opcode, n = first & 0x0F, second & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await reader.readexactly(8))
            payload = await reader.readexactly(n) if n else b""
            if opcode == 0x9:  # ping
                writer.write(masked_frame(payload, 0xA))
            elif opcode == 0x8:
                raise ConnectionError(f"server closed the WebSocket: {payload[:2].hex()} {payload[2:]!r}")
            elif opcode in (0x1, 0x2):
                return payload

    async def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.write(masked_frame(struct.pack("!H", 1000), 0x8))
                self.writer.close()
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None


def masked_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """A client's frame of `payload`, masked with a random key. A load generator may encode its frames once and
    send them many times: the key protects proxies from a browser's scripts, not a server."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = random.getrandbits(32).to_bytes(4, "big")
    repeated = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big") if n else b""
    return header + mask + masked


class CallbackWebSocket(asyncio.Protocol):
    """A WebSocket that sends a list of pre-encoded frames one at a time, each as soon as the answer to the one
    before arrives, from the protocol's data_received: no coroutine resumed, no future resolved per frame (a
    StreamReader's readexactly and the task it wakes cost more CPU per frame than the server's parsing of it,
    and on a 2-core machine the load generator's CPU is taken from the servers')."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded: asyncio.Future[None] | None = None
        self.finished: asyncio.Future[None] | None = None
        self.frames: list[bytes] = []
        self.sent = 0
        self.sent_at = 0.0
        self.deadline = 0.0
        self.on_answer: Callable[[float, float, bytes], None] = lambda started, answered, payload: None

    async def connect(self, host: str, port: int, path: str) -> CallbackWebSocket:
        loop = asyncio.get_running_loop()
        self.upgraded = loop.create_future()
        await loop.create_connection(lambda: self, host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        self.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        await self.upgraded
        return self

    def write(self, data: bytes) -> None:
        assert self.transport is not None, "not connected"
        self.transport.write(data)

    async def exchange(
        self, frames: list[bytes], deadline: float, on_answer: Callable[[float, float, bytes], None]
    ) -> None:
        """Send `frames` in turn until the deadline, calling on_answer(sent at, answered at, answer) for each."""
        self.frames, self.sent, self.deadline, self.on_answer = frames, 0, deadline, on_answer
        self.finished = asyncio.get_running_loop().create_future()
        self.send_next(time.perf_counter())
        await self.finished

    def send_next(self, now: float) -> None:
        if self.sent < len(self.frames) and now < self.deadline:
            self.sent_at = now
            self.write(self.frames[self.sent])
            self.sent += 1
        elif self.finished is not None and not self.finished.done():
            self.finished.set_result(None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError(f"the server closed the connection: {exc}"))

    def fail(self, error: Exception) -> None:
        for waiter in (self.upgraded, self.finished):
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.upgraded is not None and not self.upgraded.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end])
            del self.buffer[: end + 4]
            if head[9:12] != b"101":
                self.fail(ConnectionError(f"WebSocket upgrade refused: {head[:40]!r}"))
                return
            self.upgraded.set_result(None)
        while (message := self.next_message()) is not None:
            now = time.perf_counter()
            self.on_answer(self.sent_at, now, message)
            self.send_next(now)

    def next_message(self) -> bytes | None:
        """The next text or binary message in the buffer (pings answered on the way); None until one is whole."""
        while len(self.buffer) >= 2:
            opcode, n, start = self.buffer[0] & 0x0F, self.buffer[1] & 0x7F, 2
            if n == 126:
                if len(self.buffer) < 4:
                    return None
                (n,), start = struct.unpack_from("!H", self.buffer, 2), 4
            elif n == 127:
                if len(self.buffer) < 10:
                    return None
                (n,), start = struct.unpack_from("!Q", self.buffer, 2), 10
            if len(self.buffer) < start + n:
                return None
            payload = bytes(self.buffer[start : start + n])
            del self.buffer[: start + n]
            if opcode == 0x9:
                self.write(masked_frame(payload, 0xA))
            elif opcode == 0x8:
                self.fail(ConnectionError(f"server closed the WebSocket: {payload[:2].hex()} {payload[2:]!r}"))
                return None
            elif opcode in (0x1, 0x2):
                return payload
        return None

    async def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(masked_frame(struct.pack("!H", 1000), 0x8))
            self.transport.close()
        self.transport = None
