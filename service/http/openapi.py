"""The API documents, generated from the route table and what the server serves: OpenAPI 3.1 for the
HTTP routes, AsyncAPI 3.0 for the WebSocket. Request schemas and examples come from the loaded models
(their frame widths, a real test sequence), so the documents say exactly what the server accepts."""

from __future__ import annotations

import re
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from lstm_serve.core.runtime import Runtime
from lstm_serve.http.table import RouteTable
from lstm_serve.protocols import schemas
from lstm_serve.protocols.routing import Content, ErrorResponse, Reply, Route, Schema, built

REF = "#/components/schemas/{model}"
DESCRIPTION = """Sequence classification and stateful streaming sessions for recurrent models, on onnxruntime.

* **/v1**: classify whole sequences; stream frames into sessions whose LSTM state the server keeps.
  Errors are `{"error": {"code": ..., "message": ...}}`.
* **/v2**: the Open Inference Protocol (KServe v2, Triton HTTP), sequences included. Errors are
  `{"error": "..."}`.
* **WebSocket** `/v1/sessions/{session_id}/stream`: one chunk per message, one reply each; described in
  the AsyncAPI document at [/asyncapi.json](/asyncapi.json).
"""


class Components:
    """Collects the named schemas that operations refer to."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.schemas: dict[str, Any] = {}

    def schema(self, source: Schema, mode: JsonSchemaMode = "serialization") -> dict[str, Any]:
        """A schema, named in components (and referred to) when it has a title."""
        if built(source):
            schema = source(self.runtime)
        elif isinstance(source, dict):
            schema = source
        else:
            schema = TypeAdapter(source).json_schema(ref_template=REF, mode=mode)
            self.schemas.update(schema.pop("$defs", {}))
        title = schema.get("title")
        if not title or not title.isidentifier():
            return schema
        self.schemas[title] = schema
        return {"$ref": REF.format(model=title)}


def content(entries: tuple[Content, ...], components: Components, mode: JsonSchemaMode) -> dict[str, Any]:
    described = {}
    for entry in entries:
        media: dict[str, Any] = {}
        if entry.schema is not None:
            media["schema"] = components.schema(entry.schema, mode)
        if entry.example is not None:
            media["example"] = entry.example(components.runtime)
        described[entry.media_type] = media
    return described


def response(reply: Reply, components: Components) -> dict[str, Any]:
    described: dict[str, Any] = {"description": reply.description}
    if reply.content:
        described["content"] = content(reply.content, components, "serialization")
    if reply.headers:
        described["headers"] = {name: {"schema": {"type": "string"}} for name in reply.headers}
    return described


def frame_replies(route: Route, runtime: Runtime) -> list[Reply]:
    """What the frame answers before the endpoint runs (http/frame.py), as this server is configured."""
    protocol, settings = route.protocol, runtime.settings
    replies: list[Reply] = []
    if route.public:
        return replies
    if runtime.keys.enabled:
        replies.append(protocol.error(401, "`unauthorized`: no valid API key", ("WWW-Authenticate",)))
    replies.append(protocol.error(403, "`forbidden_origin`: sent from a page on an origin not in cors_origins"))
    if route.reads_body:
        replies.append(protocol.error(408, "`request_timeout`: the body did not arrive within body_timeout_s"))
    if settings.rate_limit is not None:
        replies.append(protocol.error(429, "`rate_limited`: over rate_limit for this key", ("Retry-After",)))
    return replies


def merged(replies: list[Reply]) -> dict[int, Reply]:
    """One reply per status; two for one status (429 for sessions and for rate) say both."""
    by_status: dict[int, Reply] = {}
    for reply in replies:
        known = by_status.get(reply.status)
        if known is None:
            by_status[reply.status] = reply
        else:
            headers = tuple(dict.fromkeys(known.headers + reply.headers))
            by_status[reply.status] = Reply(
                reply.status, f"{known.description}; or {reply.description}", known.content, headers
            )
    return dict(sorted(by_status.items()))


def operation(route: Route, components: Components) -> dict[str, Any]:
    replies = merged([*route.replies, *frame_replies(route, components.runtime)])
    described: dict[str, Any] = {
        "summary": route.summary,
        "operationId": route.method.lower() + "_" + re.sub(r"\W+", "_", route.path).strip("_"),
        "tags": [route.tag],
        "responses": {str(status): response(reply, components) for status, reply in replies.items()},
    }
    if components.runtime.keys.enabled and not route.public:
        described["security"] = [{"bearer": []}]
    if route.description:
        described["description"] = route.description
    if route.parameters:
        described["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": schema}
            for name, schema in route.parameters.items()
        ]
    if route.request:
        described["requestBody"] = {
            "required": route.body_required,
            "content": content(route.request, components, "validation"),
        }
    return described


def openapi_document(table: RouteTable, runtime: Runtime, version: str) -> dict[str, Any]:
    components = Components(runtime)
    paths: dict[str, dict[str, Any]] = {}
    for route in table.routes:
        if route.in_schema and route.method != "WEBSOCKET":
            paths.setdefault(route.path, {})[route.method.lower()] = operation(route, components)
    described: dict[str, Any] = {"schemas": components.schemas}
    if runtime.keys.enabled:
        described["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "lstm-serve", "version": version, "description": DESCRIPTION},
        "paths": paths,
        "components": described,
    }


def asyncapi_document(table: RouteTable, runtime: Runtime, version: str) -> dict[str, Any]:
    """Each WebSocket route with its message protocol: what the client sends, what the server replies."""
    components = Components(runtime)
    channels, operations = {}, {}
    for route in table.routes:
        if route.method != "WEBSOCKET" or route.channel is None:
            continue
        name = route.path.strip("/").replace("/", "_").replace("{", "").replace("}", "")
        channel = route.channel(runtime)
        channels[name] = channel
        messages = channel["messages"]
        operations[f"{name}_send"] = {
            "action": "receive",  # the server's point of view: it receives the chunks
            "channel": {"$ref": f"#/channels/{name}"},
            "messages": [{"$ref": f"#/channels/{name}/messages/{m}"} for m in messages if m.startswith("chunk")],
            "reply": {"messages": [{"$ref": f"#/channels/{name}/messages/{m}"} for m in ("reply", "error")]},
        }
    components.schemas["StepRequest"] = schemas.step_schema(runtime)
    components.schema(schemas.StepResponse)
    components.schema(ErrorResponse)
    return {
        "asyncapi": "3.0.0",
        "info": {"title": "lstm-serve WebSocket", "version": version, "description": DESCRIPTION},
        "channels": channels,
        "operations": operations,
        "components": {"schemas": components.schemas},
    }
