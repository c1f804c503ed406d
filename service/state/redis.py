"""Sessions in Redis, shared by every replica.

Per session a hash `lstm-serve:s:<id>` holds the incarnation, a revision number, whose quota the session
counts against (field `owner`), and the record under a field named by the revision (`s:<revision>`): one blob
of the model and version, timestamps, frames consumed, the state tensors as float32 bytes, and what a retry of
the last chunk needs (its seq and digest, the probabilities after it, the state before it: when that is the
state of the record before, as for every step a replica makes from its own last commit, the record names that
revision (field `previous`), kept one step longer, instead of carrying the state again). A replica
remembers its last view of recent sessions and steps from it without reading the session first: if another
replica moved the session on, the commit finds out and the step starts again from what Redis holds. Commits
are a Lua compare-and-set on (incarnation, revision), the new record written beside the current one just
before it in the same MULTI, so two replicas stepping one session at the same moment both apply, in some
order, each exactly once, and a step never lands on a restarted session. A revision is a random number, not a
count: a Redis restarted from an older snapshot must not hand out again a revision some replica has seen with
another state (its stale view would pass the compare-and-set, and a chunk land on the wrong state).

Idle expiry is a Redis TTL on the hash; sorted sets count live sessions, in all and per quota (an API key,
or a client address without keys), and expired ones. A session's score there is an upper bound of its
last use, renewed by a commit only once the last bound has passed (each bound reaches INDEX_SLACK_S
ahead): rewriting the sorted sets on every step cost Redis more than the rest of the step (a small sorted
set is a flat list, rewritten in full). So a count may still include a session that expired within the
last INDEX_SLACK_S, and the sweep counts an expiry up to that late; a live session is never left out. The
hash's TTL is renewed with the score, to TTL + INDEX_SLACK_S: a session lives at least its TTL after its last
step and at most INDEX_SLACK_S longer.

Request-rate buckets per caller live here too, so limits hold across replicas. The commands of every
step (create, load, commit, delete) go over one pipelined connection (state/resp.py): the commits of one
event-loop turn (a batch's sessions) leave in one write, as one MULTI with one compare-and-set script call
for all of them; everything else uses redis-py.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import os
import random
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine
from functools import wraps
from typing import Any, ParamSpec, TypeVar, cast

import hiredis
import numpy as np
import orjson
import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lstm_serve.errors import SessionNotFound, StepUnconfirmed, StoreUnavailable
from lstm_serve.ids import caller_id
from lstm_serve.state.directory import TableChanged
from lstm_serve.state.resp import LeanRedis, NotSent, bulk, pack, reply_error
from lstm_serve.state.sessions import KeyedLocks, SessionRecord, quota_full, server_full

log = logging.getLogger("lstm_serve")
T = TypeVar("T")
P = ParamSpec("P")
PREFIX = "lstm-serve:"
INDEX = PREFIX + "sessions"  # sorted set: session id -> an upper bound of its last use (unix seconds)
MODELS = PREFIX + "models"  # hash: model name -> its version table (JSON), state/directory.py
WEIGHTS = PREFIX + "models:sha256"  # hash: model name -> {version: sha256 of the weights it serves}, never changed
GENERATION = PREFIX + "models:generation"  # moved on by a random step at every change of a table
COUNTS = PREFIX + "models:count"  # hash: model name -> how many times its table was written (only grows)
RECENT_SESSIONS = 1024  # sessions whose last state a replica keeps, to step them without reading it first
TAKE_TIMEOUT_S, OPEN_S = 0.5, 5.0  # a rate bucket's round trip, and how long the limit stays open after one fails
INDEX_SLACK_S = 1.0  # at most this far (and at most a tenth of the TTL) a session's index score runs ahead
MULTI, EXEC = pack(("MULTI",)), pack(("EXEC",))
# A replica's clock against Redis's, sampled by each sweep (TIME, and the round trip's midpoint), so that
# replicas agree within milliseconds on when a session was restarted and a step began; until the first
# sample, and if the best of the last CLOCK_SAMPLES is worse, a second either way
CLOCK_SAMPLES, CLOCK_MARGIN_S, CLOCK_UNKNOWN_S = 10, 0.01, 1.0
MAX_ABANDONED, ABANDONED_CHECKS = 10_000, 3  # creates whose answer was lost, looked for until deleted (abandon)

# KEYS[1] session hash, KEYS[2] index, KEYS[3] the quota's index; ARGV: now, ttl, max, max per quota, id,
# index slack, fields... -> 1 stored, -1 when the store is full, -2 when the quota's share is.
# A restart (the id exists) keeps its slot; the record's new incarnation tells it from the old one.
# The first write is a ZADD: a Redis over maxmemory (noeviction) refuses a script's first command that may
# grow memory, but lets every later one through once the script has written; when that first write was a
# removal (ZREMRANGEBYSCORE, DEL), a full Redis still took sessions, and imported states, each of a few KB.
CREATE = """
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local live = '(' .. (now - ttl)
local replacing = redis.call('EXISTS', KEYS[1]) == 1
if not replacing and redis.call('ZCOUNT', KEYS[2], live, '+inf') >= tonumber(ARGV[3]) then return -1 end
if not replacing and redis.call('ZCOUNT', KEYS[3], live, '+inf') >= tonumber(ARGV[4]) then return -2 end
local bound = now + tonumber(ARGV[6])
redis.call('ZADD', KEYS[2], bound, ARGV[5])
redis.call('ZADD', KEYS[3], bound, ARGV[5])
redis.call('EXPIRE', KEYS[3], math.ceil(ttl + tonumber(ARGV[6])))
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'indexed', bound, unpack(ARGV, 7))
redis.call('PEXPIRE', KEYS[1], math.ceil(1000 * (ttl + tonumber(ARGV[6]))))
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - ttl)
return 1
"""

# The commits of one event-loop turn (a batch's sessions): KEYS[1] the index, then per session its hash and its
# quota's index; ARGV[1] ttl, ARGV[2] index slack, then per session its expected incarnation, id, expected
# revision, now, new revision, and "1" when the new record's previous state is the current record's state (kept)
# -> per session 1 committed, 0 lost the race (moved on or replaced), -1 session gone.
# Runs in a MULTI right after each new record was written to its hash as field s:<new revision>: a record passed
# as a script argument costs Redis ~7 us per 6 KB (more than the rest of the commit), a plain HSET under 1 us; one
# script for the turn, not MULTI, EXPIRE, EVALSHA and EXEC per session (Redis ~4 % less CPU a step). The
# script makes each new field the record, or takes it back. A record whose previous state is the one before it
# does not carry it (half the bytes): that record is kept (field `previous` names it) until the next commit.
# Fields r:<revision> and `record` are earlier releases' records: a hash with `previous` has none left. The
# index scores and the hash's expiry are renewed only once the last bound (`indexed`) has passed, the expiry to
# ttl + slack: a session lives at least ttl after its last step, at most ttl + slack, as the index counts it.
# A step is then three calls (HMGET, HSET, HDEL) where it was six or seven: Redis CPU 20 -> 19 us a frame.
COMMIT = """
local ttl, slack = tonumber(ARGV[1]), tonumber(ARGV[2])
local results = {}
for i = 1, (#KEYS - 1) / 2 do
  local key, quota, a = KEYS[2 * i], KEYS[2 * i + 1], 6 * i - 3
  local expected, new = ARGV[a + 2], ARGV[a + 4]
  local stored = redis.call('HMGET', key, 'incarnation', 'revision', 'indexed', 'previous')
  if not stored[2] then
    redis.call('DEL', key)
    results[i] = -1
  elseif stored[1] ~= ARGV[a] or stored[2] ~= expected then
    redis.call('HDEL', key, 's:' .. new)
    results[i] = 0
  else
    local now = tonumber(ARGV[a + 3])
    local renew = not stored[3] or now > tonumber(stored[3])
    local bound = now + slack
    local kept = ARGV[a + 5] == '1'
    local fields = {'revision', new}
    if kept then table.insert(fields, 'previous'); table.insert(fields, expected) end
    if renew then table.insert(fields, 'indexed'); table.insert(fields, bound) end
    redis.call('HSET', key, unpack(fields))
    if kept and stored[4] then
      redis.call('HDEL', key, 's:' .. stored[4])
    elseif kept then
      redis.call('HDEL', key, 'r:' .. expected, 'record')
    else
      redis.call('HDEL', key, 'previous', 's:' .. (stored[4] or expected), 's:' .. expected, 'r:' .. expected, 'record')
    end
    if renew then
      redis.call('PEXPIRE', key, math.ceil(1000 * (ttl + slack)))
      redis.call('ZADD', KEYS[1], bound, ARGV[a + 1])
      redis.call('ZADD', quota, bound, ARGV[a + 1])
      redis.call('EXPIRE', quota, math.ceil(ttl + slack))
    end
    results[i] = 1
  end
end
return results
"""

# KEYS[1] session hash, KEYS[2] index; ARGV: id, the quota indexes' prefix -> 1 deleted, 0 no such session.
# The quota's index is named by the hash's owner field, read here: one round trip.
DELETE = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', ARGV[2] .. owner, ARGV[1])
return 1
"""

# KEYS[1] a caller's bucket; ARGV: rate (per second), burst -> "0" when a request was taken, else the
# seconds until one can be. Redis's clock, so replicas with skewed clocks share one bucket fairly.
TAKE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1e6
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local stored = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(stored[1]) or burst
local at = tonumber(stored[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens < 1 then wait = (1 - tokens) / rate else tokens = tokens - 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""

# KEYS[1] the tables' hash, KEYS[2] the generation, KEYS[3] the weights' hash, KEYS[4] the tables' counts; ARGV:
# model name, its table as last read ("" for none), the new table, a random step, the sha256 of its versions (JSON),
# the least count this write may take -> {the new generation, the table's new count}, or -1 when the table is no
# longer the one read or a version's sha256 would change (nothing written). The sha256 are kept apart from the
# table, which a release before them reads too. A table's count only grows: one that went back (Redis restored
# from an older snapshot) is one a replica has seen written since, and that replica writes it again.
WRITE_TABLE = """
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if (stored or '') ~= ARGV[2] then return -1 end
local weights = cjson.decode(redis.call('HGET', KEYS[3], ARGV[1]) or '{}')
for version, digest in pairs(cjson.decode(ARGV[5])) do
  if weights[version] ~= nil and weights[version] ~= digest then return -1 end
  weights[version] = digest
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if next(weights) ~= nil then redis.call('HSET', KEYS[3], ARGV[1], cjson.encode(weights)) end
local count = math.max(tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0') + 1, tonumber(ARGV[6]))
redis.call('HSET', KEYS[4], ARGV[1], count)
return {redis.call('INCRBY', KEYS[2], ARGV[4]), count}
"""


SHA1 = {script: hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest() for script in (CREATE, COMMIT, DELETE)}


def session_key(session_id: str) -> str:
    return f"{PREFIX}s:{session_id}"


def quota_index(quota: str) -> str:
    return f"{PREFIX}o:{quota}"


class OutageLog:
    """Logs what went wrong with Redis, at most once per `every_s` while it lasts, with a count."""

    def __init__(self, where: str, every_s: float = 5.0) -> None:
        self.where, self.every_s, self.last, self.suppressed = where, every_s, 0.0, 0

    def error(self, error: Exception) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            self.suppressed += 1
            return
        more = f" ({self.suppressed} more since the last report)" if self.suppressed else ""
        what = "refused a command" if isinstance(error, ResponseError) else "unreachable"  # full, read-only, ...
        log.error("session store (Redis at %s) %s: %s%s", self.where, what, error, more)
        self.last, self.suppressed = now, 0


def reachable(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Redis down or slow becomes a 503 that says so, never a 500. Its address and the driver's words go
    to the server log; the client learns only that the session store is unavailable."""

    @wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except (RedisError, OSError) as error:  # unreachable, slow, or refusing (full: OOM, READONLY, MISCONF)
            store = getattr(args[0], "store", args[0])  # a RedisSessionStore, or what shares its client
            assert isinstance(store, RedisSessionStore)
            store.outages.error(error)
            if isinstance(error, ResponseError):  # Redis is there and said no: out of memory, read-only, ...
                raise StoreUnavailable(
                    "the session store refused the command (full, read-only or not permitted): the operator must "
                    "see to it; retry later (stateless /v1/classify still works)",
                    headers={"Retry-After": "5"},
                ) from None
            raise StoreUnavailable(
                "the session store is unavailable; retry shortly (stateless /v1/classify still works)",
                headers={"Retry-After": "1"},
            ) from None

    return wrapper


UNSENT_STEP = "the session store is unavailable; this step was not applied: send it again shortly"
UNCONFIRMED_STEP = (
    "the session store did not confirm this step: it may have been applied. Send it again with the same seq "
    "(answered once, never applied twice); a step sent without seq should not be resent before GET "
    "/v1/sessions/{id} shows whether its frames were counted"
)


@functools.cache
def shapes_line(shapes: tuple[tuple[int, ...], ...]) -> bytes:
    return ";".join(",".join(map(str, shape)) for shape in shapes).encode() + b"\n"


FLOAT32 = np.dtype(np.float32)


def array_parts(arrays: tuple[np.ndarray, ...] | None) -> list[bytes]:
    """float32 arrays as one blob, in parts: a shapes line, then their bytes ([] for None = zeros). tobytes
    writes C order whatever the layout, so only another dtype needs a converted copy."""
    if arrays is None:
        return []
    parts = [shapes_line(tuple([a.shape for a in arrays]))]
    for a in arrays:
        parts.append(a.tobytes() if a.dtype is FLOAT32 else a.astype(FLOAT32).tobytes())
    return parts


def decode_arrays(blob: bytes) -> tuple[np.ndarray, ...] | None:
    if not blob:
        return None
    shapes, _, data = blob.partition(b"\n")
    arrays, offset = [], 0
    for spec in shapes.decode().split(";"):
        shape = tuple(int(n) for n in spec.split(","))
        count = math.prod(shape)
        arrays.append(np.frombuffer(data, np.float32, count, offset).reshape(shape).copy())
        offset += 4 * count
    return tuple(arrays)


def record_field(revision: int) -> bytes:
    """The hash field of the record at `revision`: a commit writes the next one beside the current (COMMIT). The
    release before wrote r:<revision>, with the previous state always inside; its replicas must not read a record
    that points to its previous state elsewhere (they would take it for zeros), so these are named apart."""
    return b"s:%d" % revision


def stored_record(fields: dict[bytes, bytes], revision: int) -> bytes | None:
    """The record at `revision` in a session's hash, as this release or an earlier one stored it."""
    return fields.get(record_field(revision)) or fields.get(b"r:%d" % revision) or fields.get(b"record")


def encode(record: SessionRecord) -> dict[str | bytes, bytes | str]:
    """The hash fields: what the Lua scripts compare (incarnation, revision), the quota holder (for its index on
    delete), and the rest of the record as one blob, under a field named by the revision: fewer arguments to
    build and fields to parse per step than a field per attribute."""
    # the hash field keeps its name "owner" (DELETE reads it), so sessions stored by an earlier release stay counted
    return {
        "incarnation": record.incarnation,
        "owner": record.quota,
        "revision": str(record.revision),
        record_field(record.revision): encode_blob(record),
    }


def encode_blob(record: SessionRecord) -> bytes:
    return b"".join(blob_parts(record))


def blob_parts(record: SessionRecord, previous_revision: int | None = None) -> list[bytes]:
    """The record's blob in parts (a commit sends them without joining them first). With `previous_revision`, the
    previous state is left out: it is the state of the record at that revision."""
    last = record.last_probabilities
    arrays = (
        array_parts(record.state),
        [] if last is None else array_parts((last,)),
        [] if previous_revision is not None else array_parts(record.previous_state),
    )
    meta = {
        "model": record.model,
        "version": record.version,
        "created_at": record.created_at,
        "last_used": record.last_used,
        "steps": record.steps,
        "last_seq": record.last_seq,
        "last_digest": record.last_digest,
        "sizes": [sum(map(len, parts)) for parts in arrays],
    }
    if previous_revision is not None:
        meta["previous_revision"] = previous_revision
    return [orjson.dumps(meta), b"\n", *arrays[0], *arrays[1], *arrays[2]]


def blob_arrays(blob: bytes) -> tuple[dict[str, Any], list[tuple[np.ndarray, ...] | None]]:
    """A record's metadata, and its state, last probabilities and previous state (as stored: [] when elsewhere)."""
    header, _, data = blob.partition(b"\n")
    meta = orjson.loads(header)
    parts, offset = [], 0
    for size in meta["sizes"]:
        parts.append(decode_arrays(data[offset : offset + size]))
        offset += size
    return meta, parts


def decode(session_id: str, fields: dict[bytes, bytes], blob: bytes) -> SessionRecord:
    meta, (state, last, previous) = blob_arrays(blob)
    if "previous_revision" in meta:  # the state of the record before it, kept beside it
        before = fields.get(record_field(meta["previous_revision"]))
        if before is None:  # only a Redis that lost part of a hash: never a state taken for zeros
            raise StoreUnavailable(
                f"session {caller_id(session_id)!r} is damaged in the session store (its state before the last chunk "
                "is missing); start a new session"
            )
        previous = blob_arrays(before)[1][0]
    return SessionRecord(
        session_id=session_id,
        model=meta["model"],
        version=meta["version"],
        incarnation=fields[b"incarnation"].decode(),
        created_at=meta["created_at"],
        last_used=meta["last_used"],
        steps=meta["steps"],
        state=state,
        last_seq=meta["last_seq"],
        last_digest=meta["last_digest"],
        last_probabilities=None if last is None else last[0],
        previous_state=previous,
        revision=int(fields[b"revision"]),
        quota=fields.get(b"owner", b"").decode(),
    )


REVISIONS = random.Random(secrets.randbits(256))
os.register_at_fork(after_in_child=lambda: REVISIONS.seed(secrets.randbits(256)))  # a forked child: its own numbers


def new_revision() -> int:
    """Never seen before, by any replica, whatever Redis forgot (2**-63 odds of a repeat). From a generator
    seeded by the system: `secrets` makes a system call per number, ~1.5 % of a busy worker's time; a
    revision needs to be unique, and never leaves Redis, so it need not be unpredictable."""
    return REVISIONS.getrandbits(63)


def flatten(fields: dict) -> list:
    return [item for pair in fields.items() for item in pair]


def last_of_exec(answer: list[Any]) -> Any:
    """The answer of a MULTI's last command, from EXEC's: an error there is a value, not an error reply."""
    if isinstance(answer[-1], hiredis.ReplyError):
        raise reply_error(answer[-1])
    return answer[-1]


def commit_outcome(read: Callable[[], list[int]]) -> tuple[list[int], BaseException | None]:
    """A turn's COMMIT results, or the error its commits fail with: what Redis or the socket said, and anything
    else as an unconfirmed step (it may have run), so that no commit of the turn is left waiting."""
    try:
        return read(), None
    except asyncio.CancelledError:
        return [], RedisConnectionError("the commits were cancelled")
    except (RedisError, OSError) as error:
        return [], error
    except Exception as unexpected:  # an answer of another shape
        return [], RedisConnectionError(f"an unreadable answer to the commits: {unexpected!r}")


class CommitTurn:
    """The commits of one event-loop turn: their parts, and a future per commit for its result from COMMIT's
    answer (in the order they joined), or the error that stopped the turn. A future each, not one shared: a
    caller cancelled while it waits cancels only its own."""

    __slots__ = ("writes", "keys", "args", "waiters")

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.keys: list[bytes] = []
        self.args: list[bytes] = []
        self.waiters: list[asyncio.Future[int]] = []

    def settle(self, results: list[int], error: BaseException | None = None) -> None:
        if error is None and len(results) != len(self.waiters):
            error = RedisConnectionError(f"COMMIT answered {len(results)} results for {len(self.waiters)} commits")
        for k, waiter in enumerate(self.waiters):
            if waiter.done():  # its caller gave up
                continue
            if error is None:
                waiter.set_result(results[k])
            else:
                waiter.set_exception(error)

    def settle_task(self, sent: asyncio.Future[list[int]]) -> None:
        self.settle(*commit_outcome(sent.result))


class RedisSessionStore:
    def __init__(
        self,
        url: str,
        ttl_s: float,
        max_sessions: int,
        on_expired: Callable[[int], None] = lambda n: None,
        timeout_s: float = 2.0,
        max_per_quota: int | None = None,
    ) -> None:
        self.ttl_s, self.max_sessions, self.on_expired = ttl_s, max_sessions, on_expired
        self.max_per_quota = max_per_quota or max_sessions
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=10
        )
        self.lean = LeanRedis(url, timeout_s)  # the commands of every step; the rest go through redis-py
        self.lock = KeyedLocks()  # order within this replica; the revision check orders across replicas
        self.recent: OrderedDict[str, SessionRecord] = OrderedDict()  # this replica's last view of sessions
        # of the recent sessions, the state this replica last committed: the next commit's record, whose previous
        # state (what a retry of a chunk recomputes its per-frame outputs from) it is, points to it in Redis
        self.sent_states: dict[str, tuple[np.ndarray, ...]] = {}
        self.index_slack_s = min(INDEX_SLACK_S, ttl_s / 10)
        self.commit_settings = b"".join(bulk(str(x).encode()) for x in (self.ttl_s, self.index_slack_s))
        # id -> (incarnation, the parts of its commit that are the same for every step (commit_head)): what RESP
        # encoding costs is then the new record's header and a few numbers
        self.commit_heads: OrderedDict[str, tuple[str, tuple[bytes, bytes, bytes]]] = OrderedDict()
        self.turn: CommitTurn | None = None  # the commits of this event-loop turn, sent together at its end
        options = self.client.connection_pool.connection_kwargs  # the address, never the password
        self.outages = OutageLog(options.get("path") or f"{options.get('host')}:{options.get('port')}")
        self.clock_samples: deque[tuple[float, float]] = deque(maxlen=CLOCK_SAMPLES)  # (offset, half round trip)
        self.clock_offset, self.clock_error_s = 0.0, CLOCK_UNKNOWN_S
        self.abandoned: dict[str, tuple[float, int]] = {}  # id -> (when abandoned, times Redis said it was absent)
        self.cleaner: asyncio.Task[None] | None = None

    def commit_head(self, record: SessionRecord) -> tuple[bytes, ...]:
        """The parts of a session's commit that every step repeats: the start of the HSET of its new record, and
        its keys and first two arguments in the turn's COMMIT, encoded (`commit` adds the rest)."""
        kept = self.commit_heads.get(record.session_id)
        if kept is not None and kept[0] == record.incarnation:
            return kept[1]
        key = session_key(record.session_id)
        keys = bulk(key.encode()) + bulk(quota_index(record.quota).encode())
        head = (
            pack(("HSET", key), extra=2),
            keys,
            bulk(record.incarnation.encode()) + bulk(record.session_id.encode()),
        )
        self.commit_heads[record.session_id] = (record.incarnation, head)
        if len(self.commit_heads) > RECENT_SESSIONS:
            self.commit_heads.popitem(last=False)
        return head

    def remember(self, record: SessionRecord) -> SessionRecord:
        self.recent[record.session_id] = record
        self.recent.move_to_end(record.session_id)
        if len(self.recent) > RECENT_SESSIONS:
            self.forget(next(iter(self.recent)))
        return record

    def forget(self, session_id: str) -> None:
        self.recent.pop(session_id, None)
        self.sent_states.pop(session_id, None)

    def recall(self, session_id: str) -> SessionRecord | None:
        """This replica's last view of a session, without a round trip; it may be stale (another replica
        stepped it since), which the commit's compare-and-set finds out."""
        return self.recent.get(session_id)

    async def run_script(self, script: str, keys: list[str], args: list[Any]) -> Any:
        return await self.run_packed(script, pack(("EVALSHA", SHA1[script], len(keys), *keys, *args)))

    async def run_packed(self, script: str, command: bytes | list[bytes], replies: int = 1) -> Any:
        """An EVALSHA of `script`, encoded; a Redis that lost its scripts (restarted, SCRIPT FLUSH) ran
        nothing and answered NOSCRIPT: load the script and send the call again. With `replies` > 1 the call
        is the last command of a MULTI (commit's): its answer is the last of EXEC's, and NOSCRIPT comes there,
        after the commands before it ran; sent again, they write the same again."""
        try:
            return await self.send_script(command, replies)
        except NoScriptError:
            await self.lean.call("SCRIPT", "LOAD", script)
            return await self.send_script(command, replies)

    async def send_script(self, command: bytes | list[bytes], replies: int) -> Any:
        answer = await self.lean.send(command, replies)
        return answer if replies == 1 else last_of_exec(answer)

    @reachable
    async def create(self, record: SessionRecord) -> SessionRecord:
        fields = encode(record)
        stored = await self.run_script(
            CREATE,
            [session_key(record.session_id), INDEX, quota_index(record.quota)],
            [
                record.last_used,
                self.ttl_s,
                self.max_sessions,
                self.max_per_quota,
                record.session_id,
                self.index_slack_s,
                *flatten(fields),
            ],
        )
        if stored == -1:
            raise server_full(self.max_sessions, self.ttl_s)
        if stored == -2:
            raise quota_full(self.max_per_quota, self.ttl_s)
        return self.remember(record)

    @reachable
    async def load(self, session_id: str) -> SessionRecord:
        flat = await self.lean.call("HGETALL", session_key(session_id))
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        if not fields:
            self.forget(session_id)
            raise SessionNotFound(f"no session {caller_id(session_id)!r} (never created, deleted, or expired)")
        # earlier releases kept the record in field "record", then r:<revision>; a commit here moves it to s:<revision>
        blob = stored_record(fields, int(fields.get(b"revision", 0)))
        if blob is None:  # written by a release before the one-blob layout
            raise SessionNotFound(
                f"session {caller_id(session_id)!r} was created by an earlier lstm-serve release whose session "
                "layout this one does not read; start a new session"
            )
        return self.remember(decode(session_id, fields, blob))

    @reachable
    async def commit(self, record: SessionRecord, expected: SessionRecord) -> bool:
        """Write `record` if the session is still at `expected`'s revision; False when another replica moved it
        on (or replaced it). The commits of one event-loop turn go to Redis as one MULTI (CommitTurn)."""
        revision = new_revision()
        write, keys, first_args = self.commit_head(expected)
        # the state this store last committed, at expected's revision: the new record points to it
        kept = record.previous_state is not None and record.previous_state is self.sent_states.get(record.session_id)
        blob = blob_parts(record, expected.revision if kept else None)
        turn = self.turn
        if turn is None:
            turn = self.turn = CommitTurn()
            asyncio.get_running_loop().call_soon(self.send_turn, turn)
        turn.writes += (write, bulk(record_field(revision)), b"$%d\r\n" % sum(map(len, blob)), *blob, b"\r\n")
        turn.keys.append(keys)
        turn.args += (
            first_args,
            bulk(b"%d" % expected.revision),
            bulk(repr(float(record.last_used)).encode()),
            bulk(b"%d" % revision),
            b"$1\r\n1\r\n" if kept else b"$1\r\n0\r\n",
        )
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        turn.waiters.append(waiter)
        try:
            result = await waiter
        except NotSent as error:  # no connection: the step never left, and is not applied
            self.outages.error(error)
            raise StoreUnavailable(UNSENT_STEP, headers={"Retry-After": "1"}) from None
        except (RedisConnectionError, RedisTimeoutError, OSError) as error:  # it may have reached Redis, and run
            self.forget(record.session_id)
            self.outages.error(error)
            raise StepUnconfirmed(UNCONFIRMED_STEP, headers={"Retry-After": "1"}) from None
        if result == -1:
            self.forget(record.session_id)
            self.commit_heads.pop(record.session_id, None)
            raise SessionNotFound(
                f"session {caller_id(record.session_id)!r} was deleted or expired while this chunk ran; "
                "the chunk was not applied"
            )
        if result == 1:
            self.remember(record.revised(revision))
            if record.state is not None:
                self.sent_states[record.session_id] = record.state
        return result == 1

    def send_turn(self, turn: CommitTurn) -> None:
        """At the end of the turn: its commits as one MULTI, each new record an HSET, then one COMMIT for all. On an
        open connection it leaves now, its answer handled in the reply's callback (turn_answered); a task (that
        connects first, or loads the script Redis lost) only when needed: each is one more event-loop turn
        between a batch and its replies."""
        self.turn = None
        sessions = len(turn.keys)
        evalsha = pack(("EVALSHA", SHA1[COMMIT], 1 + 2 * sessions, INDEX), extra=2 * sessions + 2 + 6 * sessions)
        command = [MULTI, *turn.writes, evalsha, *turn.keys, self.commit_settings, *turn.args, EXEC]
        replies = sessions + 3  # MULTI, the HSETs, EVALSHA, EXEC
        connection = self.lean.connection
        if connection is None or connection.closed:
            task = asyncio.ensure_future(self.run_packed(COMMIT, command, replies))
            task.add_done_callback(turn.settle_task)
            return
        try:
            answer = connection.send_now(command, replies)
        except Exception as error:  # a callback of the loop: whatever stops the write, every commit hears of it
            turn.settle([], error)
            return
        answer.add_done_callback(functools.partial(self.turn_answered, turn, command, replies))

    def turn_answered(self, turn: CommitTurn, command: list[bytes], replies: int, answer: asyncio.Future[Any]) -> None:
        results, error = commit_outcome(lambda: last_of_exec(answer.result()))
        if isinstance(error, NoScriptError):  # Redis lost its scripts: run_packed loads COMMIT and sends again
            task = asyncio.ensure_future(self.run_packed(COMMIT, command, replies))
            task.add_done_callback(turn.settle_task)
            return
        turn.settle(results, error)

    @reachable
    async def delete(self, session_id: str) -> None:
        if not await self.remove(session_id):
            raise SessionNotFound(f"no session {caller_id(session_id)!r} (never created, deleted, or expired)")

    async def remove(self, session_id: str) -> bool:
        """Delete the session wherever it is counted; False if there was none."""
        self.forget(session_id)
        self.commit_heads.pop(session_id, None)
        return bool(await self.run_script(DELETE, [session_key(session_id), INDEX], [session_id, quota_index("")]))

    def abandon(self, session_id: str) -> None:
        """A create whose answer was lost (Redis stalled past the timeout, or dropped the connection) may still
        land, and then count against the limits until it expired, with no one knowing its id: it is deleted
        once Redis answers again. The create may land after that first answer (it waited on a connection
        since closed), so an absent session is looked for again, ABANDONED_CHECKS times a second apart."""
        if len(self.abandoned) < MAX_ABANDONED:
            self.abandoned[session_id] = (time.monotonic(), 0)
        if self.cleaner is None or self.cleaner.done():
            self.cleaner = asyncio.get_running_loop().create_task(self.delete_abandoned())

    async def delete_abandoned(self) -> None:
        while self.abandoned:
            await asyncio.sleep(1.0)
            for session_id, (since, absent) in list(self.abandoned.items()):
                try:
                    deleted = await self.remove(session_id)
                except (RedisError, OSError):
                    break  # still out of reach: the next round
                if deleted or absent + 1 >= ABANDONED_CHECKS or time.monotonic() - since > self.ttl_s:
                    del self.abandoned[session_id]  # gone, never came, or expired by now anyway
                else:
                    self.abandoned[session_id] = (since, absent + 1)

    def now(self) -> float:
        """Unix seconds on Redis's clock, as this replica last measured it against its own."""
        return time.time() + self.clock_offset

    async def sync_clock(self) -> None:
        """Sample Redis's clock; the best sample of the last few sets the offset. Another replica's sample may
        be as far off as this one's, and each may be off by its half round trip: the error counts both,
        plus CLOCK_MARGIN_S for the time between samples."""
        before = time.time()
        seconds, micros = await self.client.time()
        after = time.time()
        self.clock_samples.append((seconds + micros / 1e6 - (before + after) / 2, (after - before) / 2))
        offset, half_trip = min(self.clock_samples, key=lambda sample: sample[1])
        self.clock_offset = offset
        self.clock_error_s = min(CLOCK_UNKNOWN_S, 2 * half_trip + CLOCK_MARGIN_S)

    @reachable
    async def sweep(self) -> int:
        """Redis expires the hashes itself; this drops them from the index and counts them (and samples its
        clock)."""
        await self.sync_clock()
        expired = await self.client.zremrangebyscore(INDEX, "-inf", time.time() - self.ttl_s)
        if expired:
            self.on_expired(expired)
        return expired

    @reachable
    async def count(self) -> int:
        return await self.client.zcount(INDEX, time.time() - self.ttl_s, "+inf")

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError) as error:  # unreachable, or refusing (NOAUTH, NOPERM): not usable
            self.outages.error(error)
            return False

    async def close(self) -> None:
        if self.cleaner is not None:
            self.cleaner.cancel()
        await self.lean.close()
        await self.client.aclose()


class RedisTokenBuckets:
    """The rate limit shared by every replica: one bucket per caller in Redis (state/quotas.py). It fails open:
    a Redis that is down, refusing, or slower than TAKE_TIMEOUT_S lets requests through, and is not asked
    again for OPEN_S, so a stalled Redis delays one request in that time, not every one."""

    def __init__(self, store: RedisSessionStore, rate: float, burst: int) -> None:
        self.store, self.rate, self.burst = store, rate, burst
        self._take = store.client.register_script(TAKE)
        self.open_until = 0.0  # monotonic: until then the limit is open without asking Redis

    async def take(self, key: str) -> float:
        if self.open_until and time.monotonic() < self.open_until:
            return 0.0
        try:
            taken = self._take(keys=[f"{PREFIX}r:{key}"], args=[self.rate, self.burst])
            return float(await asyncio.wait_for(taken, TAKE_TIMEOUT_S))
        except (RedisError, OSError, TimeoutError) as error:  # unreachable, stalled, or refusing the write
            stalled = isinstance(error, TimeoutError) and not str(error)
            self.store.outages.error(TimeoutError(f"a rate bucket took over {TAKE_TIMEOUT_S} s") if stalled else error)
            self.open_until = time.monotonic() + OPEN_S
            return 0.0


class RedisDirectory:
    """The model version tables every replica follows (state/directory.py), beside the sessions they give
    meaning to: the same client, the same outage rules."""

    def __init__(self, store: RedisSessionStore) -> None:
        self.store = store
        self.seen: dict[str, bytes] = {}  # each model's table as this replica last read or wrote it
        self.counts: dict[str, int] = {}  # each model's highest table count this replica has read or written
        self._write = store.client.register_script(WRITE_TABLE)

    @reachable
    async def generation(self) -> int:
        return int(cast(bytes | None, await self.store.client.get(GENERATION)) or 0)

    @reachable
    async def read(self) -> tuple[int, dict[str, dict[str, Any]]]:
        async with self.store.client.pipeline(transaction=True) as pipe:
            pipe.get(GENERATION)
            pipe.hgetall(MODELS)
            pipe.hgetall(WEIGHTS)
            pipe.hgetall(COUNTS)
            generation, tables, weights, counts = await pipe.execute()
        self.seen = {name.decode(): table for name, table in tables.items()}
        documents = {}
        for name, table in self.seen.items():
            count = int(counts.get(name.encode(), 0))
            if count < self.counts.get(name, 0):  # older than one this replica saw: left out, so it is written back
                log.warning("model version table of %s went back in Redis (restored from an older snapshot?)", name)
                continue
            self.counts[name] = count
            digests = orjson.loads(weights.get(name.encode(), b"{}"))
            document = orjson.loads(table)
            for version, state in document.items():
                if version in digests:
                    state["sha256"] = digests[version]
            documents[name] = document
        return int(generation or 0), documents

    @reachable
    async def write(self, name: str, table: dict[str, Any]) -> int:
        digests = {version: state["sha256"] for version, state in table.items() if state.get("sha256")}
        document = orjson.dumps({v: {k: x for k, x in state.items() if k != "sha256"} for v, state in table.items()})
        previous, step = self.seen.get(name, b""), 1 + secrets.randbits(40)  # a random step: no value comes twice
        least = self.counts.get(name, 0) + 1
        args: list[bytes | str | int] = [name, previous, document, step, orjson.dumps(digests), least]
        written = await self._write(keys=[MODELS, GENERATION, WEIGHTS, COUNTS], args=args)
        if written == -1:
            raise TableChanged(f"the version table of {name!r} changed since this replica read it")
        generation, self.counts[name] = int(written[0]), int(written[1])
        self.seen[name] = document
        return generation
