"""Who is calling: API keys, and the caller a request is served for.

Keys are held as SHA-256 digests only, and a presented key is compared with every configured digest in
constant time, so neither the keys nor how much of one a guess got right can be learned from the server.
A key is named everywhere (logs, metrics, the session namespace) by its id: the first 8 hex digits of its
SHA-256, which says which key was used without being usable as one.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from lstm_serve.settings import Settings

HASHED = re.compile(r"sha256:([0-9a-fA-F]{64})")
PRESENTABLE = re.compile(r"[\x21-\x7e]+")  # what an Authorization: Bearer header carries: printable ASCII, no spaces
OPEN = "open"  # the owner of every session on a server without keys


class KeyFileError(ValueError):
    """A key list that cannot be used; the message says which line."""


def key_id(digest: bytes) -> str:
    return digest.hex()[:8]


@dataclass(frozen=True)
class Caller:
    """Whom a request is served for: a key (by id) or, on a server without keys, a client address. Sessions
    belong to `owner`; rate and session limits count per `quota_key`."""

    key_id: str | None
    address: str

    @property
    def owner(self) -> str:
        return self.key_id or OPEN

    @property
    def quota_key(self) -> str:
        return f"key:{self.key_id}" if self.key_id else f"addr:{self.address}"


@dataclass
class RequestContext:
    """What the frame learned about a request before its endpoint runs, and what the endpoint adds for the
    request's log line."""

    request_id: str
    caller: Caller
    subprotocol: str | None = None  # the WebSocket subprotocol to accept
    session_id: str | None = None  # the session it touched, for the log

    SCOPE_KEY = "lstm_serve.context"


class KeyRing:
    def __init__(self, digests: list[bytes]) -> None:
        self.digests = digests
        ids = [key_id(d) for d in digests]
        if len(set(ids)) != len(set(digests)):
            raise KeyFileError("two different API keys share a key id (the first 8 hex of their sha256); change one")

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        digests = [sha256(presentable(key, "api_keys")) for key in split_keys(settings.api_keys)]
        if settings.api_keys_file is not None:
            digests += read_key_file(settings.api_keys_file)
        return cls(list(dict.fromkeys(digests)))

    @classmethod
    def admin_from_settings(cls, settings: Settings) -> KeyRing:
        """The keys of the repository API (load, unload): plain keys or sha256:<hex>, comma-separated."""
        digests = []
        for key in split_keys(settings.admin_keys):
            hashed = HASHED.fullmatch(key)
            if key.startswith("sha256:") and not hashed:
                raise KeyFileError("admin_keys: sha256: must be followed by 64 hex digits")
            digests.append(bytes.fromhex(hashed[1]) if hashed else sha256(presentable(key, "admin_keys")))
        return cls(list(dict.fromkeys(digests)))

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def identify(self, presented: str) -> str | None:
        """The id of the key presented, or None. Every configured digest is compared, in constant time."""
        digest, found = sha256(presented), None
        for known in self.digests:
            if hmac.compare_digest(digest, known):
                found = known
        return None if found is None else key_id(found)


def sha256(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def split_keys(text: str) -> list[str]:
    return [key.strip() for key in text.split(",") if key.strip()]


def read_key_file(path: Path) -> list[bytes]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise KeyFileError(
            f"api_keys_file {path} does not exist: put your API keys there, one per line (or sha256:<hex>), "
            "or set LSTM_SERVE_API_KEYS_FILE to empty to run without keys"
        ) from None
    except OSError as error:
        raise KeyFileError(f"api_keys_file {path}: {error.strerror or error}") from None
    digests = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        hashed = HASHED.fullmatch(line)
        if line.startswith("sha256:") and not hashed:
            raise KeyFileError(f"api_keys_file {path} line {number}: sha256: must be followed by 64 hex digits")
        digests.append(
            bytes.fromhex(hashed[1]) if hashed else sha256(presentable(line, f"api_keys_file {path} line {number}"))
        )
    return digests


def presentable(key: str, where: str) -> str:
    """A key no client could present (a space inside it, a character outside printable ASCII, which a header
    carries as bytes of some encoding) would load and never match: refused at start instead."""
    if not PRESENTABLE.fullmatch(key):
        raise KeyFileError(
            f"{where}: an API key must be printable ASCII without spaces (an Authorization: Bearer token); "
            "use a random one, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return key
