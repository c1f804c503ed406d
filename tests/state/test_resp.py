"""The lean Redis connection of the session hot path (state/resp.py), against a real redis-server and against
a server that misbehaves on purpose: replies in order, errors as redis-py's exceptions, a stuck or dropped
socket failing every command on it and the next call connecting again."""

import asyncio
import os
import signal

import numpy as np
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lstm_serve.state.resp import LeanRedis, pack


def test_commands_are_written_as_redis_py_writes_them():
    assert pack(("SET", b"k\r\n", 3, 0.25, np.float64(1e-7), np.int64(5))) == (
        b"*6\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n3\r\n$4\r\n0.25\r\n$5\r\n1e-07\r\n$1\r\n5\r\n"
    )


def test_a_turns_commands_share_one_write_and_each_gets_its_own_reply(redis_server):
    async def main():
        lean = LeanRedis(redis_server.url, timeout_s=2)
        await lean.call("PING")
        writes = []
        transport = lean.connection.transport
        write = transport.write
        transport.write = lambda data: (writes.append(data), write(data))
        values = [f"v{k}".encode() * k for k in range(50)]
        await asyncio.gather(*(lean.call("SET", f"k{k}", v) for k, v in enumerate(values)))
        got = await asyncio.gather(*(lean.call("GET", f"k{k}") for k in range(50)))
        error = await asyncio.gather(lean.call("INCR", "k3"), lean.call("EVALSHA", "0" * 40, 0), return_exceptions=True)
        await lean.close()
        return writes, got, values, error

    writes, got, values, error = asyncio.run(main())
    assert len(writes) == 3  # 50 SETs in one write, 50 GETs in another, then the two that fail
    assert got == values
    assert isinstance(error[0], ResponseError) and isinstance(error[1], NoScriptError)


def test_commands_sent_as_one_get_the_last_reply_or_the_first_error_and_the_next_command_its_own(redis_server):
    async def main():
        lean = LeanRedis(redis_server.url, timeout_s=2)
        transaction = pack(("MULTI",)) + pack(("SET", "t", "1")) + pack(("INCR", "t")) + pack(("EXEC",))
        refused = pack(("MULTI",)) + pack(("NOSUCHCOMMAND",)) + pack(("EXEC",))
        results = await asyncio.gather(
            lean.send(transaction, replies=4),
            lean.send(refused, replies=3),
            lean.call("GET", "t"),
            return_exceptions=True,
        )
        await lean.close()
        return results

    done, refused, after = asyncio.run(main())
    assert done == [b"OK", 2]  # EXEC's reply
    assert isinstance(refused, ResponseError) and "unknown command" in str(refused)  # not EXEC's EXECABORT
    assert after == b"2"


def test_a_database_and_a_password_in_the_url_are_used(redis_server):
    async def main():
        admin = LeanRedis(redis_server.url)
        await admin.call("CONFIG", "SET", "requirepass", "s3cret")
        await admin.call("AUTH", "s3cret")
        lean = LeanRedis(f"redis://:s3cret@127.0.0.1:{redis_server.port}/5")
        await lean.call("SET", "where", "db5")
        in_db5 = await admin.call("EVAL", "redis.call('SELECT', 5) return redis.call('GET', 'where')", 0)
        refused = await asyncio.gather(LeanRedis(redis_server.url).call("PING"), return_exceptions=True)
        await admin.call("CONFIG", "SET", "requirepass", "")
        for client in (admin, lean):
            await client.close()
        return in_db5, refused[0]

    in_db5, refused = asyncio.run(main())
    assert in_db5 == b"db5"
    assert isinstance(refused, ResponseError) and "NOAUTH" in str(refused)


def test_a_stuck_redis_times_out_every_waiting_command_and_the_next_call_reconnects(redis_server):
    async def main():
        lean = LeanRedis(redis_server.url, timeout_s=0.3)
        await lean.call("SET", "k", "before")
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            stuck = await asyncio.gather(lean.call("GET", "k"), lean.call("GET", "k"), return_exceptions=True)
            waited = loop.time() - started
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        after = await lean.call("GET", "k")
        await lean.close()
        return stuck, waited, after

    stuck, waited, after = asyncio.run(main())
    assert all(isinstance(result, RedisTimeoutError) for result in stuck)
    assert 0.3 <= waited < 1.5
    assert after == b"before"


def test_a_connection_dropped_by_redis_fails_its_commands_and_the_next_call_reconnects(redis_server):
    async def main():
        lean, admin = LeanRedis(redis_server.url), LeanRedis(redis_server.url)
        await lean.call("SET", "k", "v")
        waiting = asyncio.ensure_future(lean.call("BLPOP", "nothing", 5))  # in flight when the socket drops
        await asyncio.sleep(0.1)
        await admin.call("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        dropped = await asyncio.gather(waiting, return_exceptions=True)
        after = await lean.call("GET", "k")  # a new connection
        for client in (admin, lean):
            await client.close()
        return dropped[0], after

    dropped, after = asyncio.run(main())
    assert isinstance(dropped, RedisConnectionError)
    assert after == b"v"


def test_no_redis_at_the_address_is_a_connection_error():
    async def main():
        lean = LeanRedis("redis://127.0.0.1:1/0", timeout_s=1)
        return await asyncio.gather(lean.call("PING"), return_exceptions=True)

    (result,) = asyncio.run(main())
    assert isinstance(result, RedisConnectionError)


@pytest.mark.parametrize("reply", [b"+OK\r\n", b"?garbage\r\n"])
def test_a_reply_nobody_asked_for_or_cannot_be_read_drops_the_connection(reply):
    """Never hand one command's reply to another: a stray or unreadable reply fails what waits."""

    async def main():
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(100)
            writer.write(b"+PONG\r\n" + reply)  # the answer, then something else
            await writer.drain()
            await asyncio.sleep(1)
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        lean = LeanRedis(f"redis://127.0.0.1:{port}/0", timeout_s=2)
        first = await lean.call("PING")
        await asyncio.sleep(0.1)
        closed = lean.connection.closed
        server.close()
        return first, closed

    first, closed = asyncio.run(main())
    assert first == b"PONG" and closed
