"""A lean Redis connection for the session hot path: every command of one event-loop turn goes out in one
write on one socket, and replies are parsed in C (hiredis) and handed back in order.

redis-py's asyncio client spends tens of microseconds of Python per command (command objects, a
connection pool, a retry wrapper, a pipeline object per batch), which on a busy server is a large
share of a session step. The store sends its four hot commands (create, load, commit, delete) here and
keeps redis-py for everything else. Failures are redis-py's exceptions, so callers handle one family:
ConnectionError when the socket fails or closes, TimeoutError when the oldest command waits longer
than `timeout_s` (the socket is then dropped and every command on it fails), ResponseError (NoScriptError
for NOSCRIPT) for an error reply.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlparse

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

Arg = str | bytes | int | float


def pack(args: tuple[Arg, ...], extra: int = 0) -> bytes:
    """One command in RESP: an array of bulk strings (numbers as redis-py writes them). With `extra`, the
    start of a command whose last `extra` arguments the caller appends, each as `bulk` encodes it."""
    parts = [b"*%d\r\n" % (len(args) + extra)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, float):
            data = repr(float(arg)).encode()  # float(): a numpy scalar's repr is not a number
        else:
            data = str(arg).encode()
        parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(parts)


def bulk(data: bytes) -> bytes:
    """One argument of a command, in RESP."""
    return b"$%d\r\n%b\r\n" % (len(data), data)


def reply_error(reply: hiredis.ReplyError) -> ResponseError:
    message = str(reply)
    return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)


class Waiting:
    """A command sent and the replies it still waits for."""

    __slots__ = ("future", "left", "error")

    def __init__(self, future: asyncio.Future[Any], replies: int) -> None:
        self.future, self.left = future, replies
        self.error: hiredis.ReplyError | None = None


class Connection(asyncio.Protocol):
    """One socket: commands written in order, replies matched to them in order."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.waiting: deque[Waiting] = deque()
        self.outgoing: list[bytes] = []
        self.watchdog: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes

    def send(self, command: bytes | list[bytes], replies: int = 1) -> asyncio.Future[Any]:
        """`command`: one or more commands in RESP (in parts, as a list, to be joined only with the rest of the
        turn's) whose `replies` replies come back in order; the future gets the last, or the first error among
        them (a MULTI's queued commands answer QUEUED, or why they were refused)."""
        first = not self.outgoing  # the first of this turn: the turn's other commands join its write
        future = self.queue(command, replies)
        if first:
            asyncio.get_running_loop().call_soon(self.flush)
        return future

    def send_now(self, command: list[bytes], replies: int) -> asyncio.Future[Any]:
        """As `send`, written at once (with any command of this turn queued before it): for a caller whose
        commands of the turn are all there, so that they leave without waiting for the turn's end."""
        future = self.queue(command, replies)
        self.flush()
        return future

    def queue(self, command: bytes | list[bytes], replies: int) -> asyncio.Future[Any]:
        if self.closed or self.transport is None:
            raise RedisConnectionError("the Redis connection is closed")
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(Waiting(future, replies))
        if isinstance(command, list):
            self.outgoing += command
        else:
            self.outgoing.append(command)
        return future

    def flush(self) -> None:
        if self.closed or self.transport is None or not self.outgoing:
            return
        self.transport.write(b"".join(self.outgoing))
        self.outgoing.clear()
        if self.watchdog is None:
            self.arm()

    def arm(self) -> None:
        oldest = self.waiting[0] if self.waiting else None
        if oldest is None:
            self.watchdog = None
            return
        self.watchdog = asyncio.get_running_loop().call_later(self.timeout_s, self.check, oldest)

    def check(self, oldest: Waiting) -> None:
        """The command that was oldest `timeout_s` ago is still unanswered: Redis is stuck or gone."""
        self.watchdog = None
        if self.waiting and self.waiting[0] is oldest and not self.closed:
            self.fail(RedisTimeoutError(f"Redis did not answer within {self.timeout_s:g} s"))
            return
        self.arm()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as error:
                self.fail(RedisConnectionError(f"unreadable reply from Redis: {error}"))
                return
            if reply is False:
                return
            if not self.waiting:
                self.fail(RedisConnectionError("Redis sent a reply nobody asked for"))
                return
            waiting = self.waiting[0]
            waiting.left -= 1
            if isinstance(reply, hiredis.ReplyError) and waiting.error is None:
                waiting.error = reply
            if waiting.left:
                continue
            self.waiting.popleft()
            future = waiting.future
            if future.done():  # its caller gave up (cancelled); the reply is still this command's
                continue
            if waiting.error is not None:
                future.set_exception(reply_error(waiting.error))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"the Redis connection was lost: {exc or 'closed by Redis'}"))

    def fail(self, error: Exception) -> None:
        """Drop the socket; every command on it fails with `error` (none may take another's reply)."""
        self.closed = True
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        if self.transport is not None:
            self.transport.abort()
        while self.waiting:
            future = self.waiting.popleft().future
            if not future.done():
                future.set_exception(error)
        self.outgoing.clear()


class NotSent(RedisConnectionError):
    """No connection to Redis could be made: the command never left, so it did not run."""


class LeanRedis:
    """The commands the session store sends on every step, over one pipelined connection, opened on first
    use and again after a failure. Takes the URLs redis-py takes: redis://[user:password@]host[:port][/db],
    rediss:// (TLS, the system's CAs), unix:///path[?db=N]."""

    def __init__(self, url: str, timeout_s: float = 2.0) -> None:
        self.url, self.timeout_s = urlparse(url), timeout_s
        self.connection: Connection | None = None
        self.connecting: asyncio.Lock | None = None

    async def call(self, *args: Arg) -> Any:
        return await self.send(pack(args))

    async def send(self, command: bytes | list[bytes], replies: int = 1) -> Any:
        """A command already in RESP (`pack`), or several with `replies` replies in all (Connection.send)."""
        connection = self.connection
        if connection is None or connection.closed:
            connection = await self.connect()
        return await connection.send(command, replies)

    async def connect(self) -> Connection:
        if self.connecting is None:
            self.connecting = asyncio.Lock()
        async with self.connecting:  # callers arriving together share one new connection
            if self.connection is not None and not self.connection.closed:
                return self.connection
            try:
                connection = await asyncio.wait_for(self.open(), self.timeout_s)
            except TimeoutError:
                raise NotSent(f"no connection to Redis within {self.timeout_s:g} s") from None
            except OSError as error:
                raise NotSent(f"cannot connect to Redis: {error}") from None
            try:
                await self.hello(connection)
            except BaseException:
                connection.fail(RedisConnectionError("the Redis connection was set up wrongly"))
                raise
            self.connection = connection
            return connection

    async def open(self) -> Connection:
        loop = asyncio.get_running_loop()
        u = self.url
        connection = Connection(self.timeout_s)
        if u.scheme == "unix":
            await loop.create_unix_connection(lambda: connection, u.path)
        else:
            tls = ssl.create_default_context() if u.scheme == "rediss" else None
            await loop.create_connection(lambda: connection, u.hostname or "localhost", u.port or 6379, ssl=tls)
        return connection

    async def hello(self, connection: Connection) -> None:
        """AUTH and SELECT as the URL says (the connection's watchdog bounds their wait, as any command's)."""
        u = self.url
        if u.password is not None:
            user = (unquote(u.username),) if u.username else ()
            await connection.send(pack(("AUTH", *user, unquote(u.password))))
        db = parse_qs(u.query).get("db", [""])[0] or (u.path.strip("/") if u.scheme != "unix" else "")
        if db and db != "0":
            await connection.send(pack(("SELECT", db)))

    async def close(self) -> None:
        if self.connection is not None and self.connection.transport is not None:
            self.connection.closed = True
            self.connection.transport.close()
        self.connection = None
