"""Identifiers that must be unique but need not be secret: request ids and session incarnations.

`secrets.token_hex` is a system call per id, which showed as 2 % of a busy server's samples. A random
prefix drawn once per process and a counter are unique across processes and restarts (48 random bits
tell processes apart) at the cost of a string format. Session ids are secret and stay `secrets`' own.
"""

from __future__ import annotations

import itertools
import secrets

PREFIX = secrets.token_hex(6)
COUNTER = itertools.count()


def unique_id() -> str:
    return f"{PREFIX}{next(COUNTER):04x}"


def caller_id(session_key: str) -> str:
    """The id its caller knows a session by, from its store key (`<protocol>:<owner>:...:<id>`): what a
    reply shows, never the store's key with its owner."""
    return session_key.rsplit(":", 1)[-1]
