"""The one route table: every route of every protocol, matched by method and path."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lstm_serve.protocols.routing import OIP, V1, Protocol, Route

PARAMETER = re.compile(r"{(\w+)}")


@dataclass(frozen=True)
class Match:
    route: Route | None
    params: dict[str, str] = field(default_factory=dict)
    allowed: tuple[str, ...] = ()  # the methods the path takes, when the method asked for is not one of them
    template: str | None = None  # the matched path template: the metric label, never the raw path
    websocket: bool = False  # the path is a WebSocket's: a plain request there needs to upgrade


class RouteTable:
    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes
        self.static: dict[str, dict[str, Route]] = {}
        self.dynamic: list[tuple[re.Pattern[str], str, dict[str, Route]]] = []
        patterns: dict[str, dict[str, Route]] = {}
        for route in routes:
            methods = patterns.setdefault(route.path, {})
            if route.method in methods:
                raise ValueError(f"{route.method} {route.path} is declared twice")
            methods[route.method] = route
        for path, methods in patterns.items():
            if PARAMETER.search(path):
                regex = re.compile("^" + PARAMETER.sub(r"(?P<\1>[^/]+)", path) + "$")
                self.dynamic.append((regex, path, methods))
            else:
                self.static[path] = methods

    def match(self, method: str, path: str) -> Match:
        """The route for a method (WEBSOCKET for an upgrade) and a path; HEAD is served by GET."""
        methods, params, template = self.static.get(path), {}, path
        if methods is None:
            for regex, pattern, candidates in self.dynamic:
                found = regex.match(path)
                if found:
                    methods, params, template = candidates, found.groupdict(), pattern
                    break
            else:
                return Match(None)
        route = methods.get(method) or (methods.get("GET") if method == "HEAD" else None)
        if route is None:
            served = {m for m in methods if m != "WEBSOCKET"} | ({"HEAD"} if "GET" in methods else set())
            allowed = tuple(sorted(served))
            return Match(None, params, allowed, template, "WEBSOCKET" in methods)
        return Match(route, params, (), template)

    @staticmethod
    def protocol_for(path: str) -> Protocol:
        """Which protocol answers a path that no route serves, so even a 404 has the right shape."""
        return OIP if path == "/v2" or path.startswith("/v2/") else V1
