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
import struct


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

    def _frame(self, opcode: int, payload: bytes) -> bytes:
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)
        repeated = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big") if n else b""
        return header + mask + masked

    def send_binary(self, payload: bytes) -> None:
        self.streams()[1].write(self._frame(0x2, payload))

    def send_text(self, text: str) -> None:
        self.streams()[1].write(self._frame(0x1, text.encode()))

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
                writer.write(self._frame(0xA, payload))
            elif opcode == 0x8:
                raise ConnectionError(f"server closed the WebSocket: {payload[:2].hex()} {payload[2:]!r}")
            elif opcode in (0x1, 0x2):
                return payload

    async def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.write(self._frame(0x8, struct.pack("!H", 1000)))
                self.writer.close()
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None
