"""What every request passes before its endpoint, HTTP and WebSocket alike: its request id, the Origin
check, CORS, the API key, and the caller's request rate. The frame (http/frame.py) calls these in order;
nothing here touches a session.
"""

from __future__ import annotations

import ipaddress
import re

from starlette.responses import Response
from starlette.types import Scope

from lstm_serve.core.access import Caller
from lstm_serve.core.runtime import Runtime
from lstm_serve.errors import Forbidden, ForbiddenOrigin, Unauthorized
from lstm_serve.ids import unique_id
from lstm_serve.protocols.routing import Route

REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
BEARER = re.compile(r"bearer\s+(\S+)\s*", re.IGNORECASE)
SUBPROTOCOL, SUBPROTOCOL_KEY = "lstm-serve", "bearer."
ALLOWED_HEADERS = ("authorization", "content-type", "x-request-id", "inference-header-content-length")
EXPOSED_HEADERS = b"X-Request-ID, Retry-After, WWW-Authenticate, Inference-Header-Content-Length"
WWW_AUTHENTICATE = {"WWW-Authenticate": "Bearer"}


HEADERS = "lstm_serve.headers"  # in a request's scope: its headers by name, the first of each name


def header(scope: Scope, name: bytes) -> bytes | None:
    """A request header's first value (the server gives lowercase names). The headers are put in a dict on
    the first look and kept in the scope: a request looks up six or more, each a scan of the list."""
    by_name: dict[bytes, bytes] | None = scope.get(HEADERS)
    if by_name is None:
        by_name = scope[HEADERS] = dict(reversed(scope["headers"]))  # reversed: the first of a name wins
    return by_name.get(name)


def request_id(scope: Scope) -> str:
    """The client's X-Request-ID when it is short and printable, else a new one."""
    given = header(scope, b"x-request-id")
    if given is not None:
        text = given.decode("latin-1")
        if REQUEST_ID.fullmatch(text):
            return text
    return unique_id()


def is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


def addressed_by_ip_or_localhost(host: str) -> bool:
    """A Host header (name[:port]) that names the server by an IP address or as localhost."""
    name = host[1 : host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]  # [v6]:port
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.origins = runtime.settings.origins

    # -- Origin and CORS -------------------------------------------------------------------------------
    def allowed_origin(self, scope: Scope) -> str | None:
        """The request's Origin if it may call (listed in cors_origins, or the server's own), None if it
        has none; ForbiddenOrigin (403) for any other, before anything else happens."""
        given = header(scope, b"origin")
        if given is None:
            return None
        origin = given.decode("latin-1")
        if origin.rstrip("/").lower() in self.origins or self.same_origin(scope, origin):
            return origin
        raise ForbiddenOrigin(
            f"requests from pages on {origin[:100]!r} are not allowed; the server's cors_origins lists the "
            "origins that may call it"
        )

    @staticmethod
    def same_origin(scope: Scope, origin: str) -> bool:
        """A page this server served (/docs), whose browser sends Origin on every POST. Only where the server
        is addressed by an IP address or localhost: a page on any other name may have had its name's DNS
        answer turned to this server (DNS rebinding), and its browser then sends that name as both Host and
        Origin. A server reached by a domain name lists it in cors_origins instead."""
        host = header(scope, b"host")
        if host is None or sum(1 for name, _ in scope["headers"] if name in (b"origin", b"host")) > 2:
            return False  # a second Host or Origin: which one a proxy or the browser meant is anyone's guess
        named = host.decode("latin-1").lower()
        if not addressed_by_ip_or_localhost(named):
            return False
        scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        return origin.lower() == f"{scheme}://{named}"

    def cors_headers(self, origin: str | None) -> list[tuple[bytes, bytes]]:
        """Response headers that let a listed origin's page read the answer."""
        if origin is None or origin.rstrip("/").lower() not in self.origins:
            return []
        return [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-expose-headers", EXPOSED_HEADERS),
            (b"vary", b"Origin"),
        ]

    def preflight(self, scope: Scope, methods: tuple[str, ...]) -> Response | None:
        """The answer to a CORS preflight (OPTIONS with Access-Control-Request-Method), or None if this is
        not one. A listed origin learns what it may send; any other gets 403."""
        if scope["method"] != "OPTIONS" or header(scope, b"access-control-request-method") is None:
            return None
        origin = self.allowed_origin(scope)
        if origin is None or origin.rstrip("/").lower() not in self.origins:
            raise ForbiddenOrigin("a CORS preflight needs an Origin listed in the server's cors_origins")
        requested = (header(scope, b"access-control-request-headers") or b"").decode("latin-1")
        asked = [name.strip().lower() for name in requested.split(",") if name.strip()]
        headers = {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": ", ".join(methods),
            "Access-Control-Allow-Headers": ", ".join(name for name in asked if name in ALLOWED_HEADERS),
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        }
        return Response(status_code=204, headers=headers)

    # -- keys --------------------------------------------------------------------------------------------
    def authenticate(self, scope: Scope, route: Route, websocket: bool = False) -> Caller:
        """The caller a request is served for: its key's id when the server has keys (Unauthorized, 401,
        without a valid one), else its client address. Public routes (health) need no key."""
        address = client_address(scope)
        keys = self.runtime.keys
        if route.admin:
            return self.admin(scope, address)
        if route.public or not keys.enabled:
            return Caller(None, address)
        presented = self.presented_key(scope, websocket)
        if presented is None:
            raise Unauthorized(
                "this server needs an API key: send Authorization: Bearer <key>"
                + (f" or the WebSocket subprotocol {SUBPROTOCOL_KEY}<key>" if websocket else ""),
                headers=WWW_AUTHENTICATE,
            )
        found = keys.identify(presented)
        if found is None:
            raise Unauthorized("the API key is not valid", headers=WWW_AUTHENTICATE)
        return Caller(found, address)

    def admin(self, scope: Scope, address: str) -> Caller:
        """An operator of the repository API: an admin key when any is set; else, on a server without API
        keys, a client on this machine (loopback); else nobody (403 saying how to allow it)."""
        admin_keys = self.runtime.admin_keys
        if admin_keys.enabled:
            presented = self.presented_key(scope, websocket=False)
            if presented is None:
                raise Unauthorized(
                    "the repository API needs an admin key: Authorization: Bearer <admin key>", WWW_AUTHENTICATE
                )
            found = admin_keys.identify(presented)
            if found is None:
                raise Forbidden("this key may not use the repository API; it needs one of admin_keys")
            return Caller(found, address)
        if self.runtime.keys.enabled:
            raise Forbidden("the repository API is closed: with API keys set, it needs LSTM_SERVE_ADMIN_KEYS")
        if not (is_address(address) and ipaddress.ip_address(address).is_loopback):
            raise Forbidden("without admin keys, the repository API answers clients on this machine (loopback) only")
        return Caller(None, address)

    @staticmethod
    def presented_key(scope: Scope, websocket: bool) -> str | None:
        authorization = header(scope, b"authorization")
        if authorization is not None:
            if sum(name == b"authorization" for name, _ in scope["headers"]) > 1:  # which one a proxy passes on varies
                raise Unauthorized("send one Authorization header, not several", WWW_AUTHENTICATE)
            found = BEARER.fullmatch(authorization.decode("latin-1"))
            return found[1] if found else None
        if websocket:
            for offered in scope.get("subprotocols", []):
                if offered.startswith(SUBPROTOCOL_KEY):
                    return offered[len(SUBPROTOCOL_KEY) :]
        return None


def chosen_subprotocol(scope: Scope) -> str | None:
    """The subprotocol to accept: `lstm-serve` when offered, else a key entry (echoed to the browser that sent it:
    a browser fails a WebSocket whose answer names none of those it offered), else none. Never one the server
    does not speak (RFC 6455 4.2.2): the first offered was echoed, whatever it was."""
    offered = list(scope.get("subprotocols", []))
    if SUBPROTOCOL in offered:
        return SUBPROTOCOL
    return next((p for p in offered if p.startswith(SUBPROTOCOL_KEY)), None)
