"""Triton's model repository extension: list what the repository holds, load and unload without a restart.

    POST /v2/repository/index                       every version on disk or served, with its state
    POST /v2/repository/models/{name}/load          load as the version policy says (new versions serve,
                                                    versions the policy drops start draining)
    POST /v2/repository/models/{name}/unload        every serving version drains; {"parameters":
                                                    {"version": "1"}} drains one (an lstm-serve extension)

Only operators may call them (Route.admin): an admin key when LSTM_SERVE_ADMIN_KEYS is set; without
admin keys, a client on this machine of a server without API keys. A version that fails its sha256, its
contract checks or its warm-up is refused (400, saying which and why) while what served before serves on.
With Redis, every replica follows the change within a sweep interval.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from lstm_serve.core.repository import version_number
from lstm_serve.core.runtime import Runtime
from lstm_serve.errors import LoadRefused
from lstm_serve.protocols import oip_schemas as schemas
from lstm_serve.protocols.codec import JSON, parse, read_body
from lstm_serve.protocols.routing import OIP, Content, Reply, Route


def versions_of(runtime: Runtime, name: str) -> dict[str, Any]:
    return {"name": name, "versions": [row for row in runtime.engine.fleet.index() if row["name"] == name]}


async def index(request: Request, runtime: Runtime) -> Response:
    raw = await read_body(request)
    body = parse(schemas.RepositoryIndexRequest, raw) if raw else schemas.RepositoryIndexRequest()
    rows = runtime.engine.fleet.index()
    return JSON([row for row in rows if row["state"] == "READY"] if body.ready else rows)


async def load(request: Request, runtime: Runtime) -> Response:
    raw = await read_body(request)
    body = parse(schemas.RepositoryLoadRequest, raw) if raw else schemas.RepositoryLoadRequest()
    if body.parameters:
        raise LoadRefused(
            f"load parameters {sorted(body.parameters)[:4]} are not taken: the repository's files and the version "
            "policy say what loads"
        )
    name = request.path_params["model_name"]
    await runtime.engine.fleet.load(name)
    return JSON(versions_of(runtime, name))


async def unload(request: Request, runtime: Runtime) -> Response:
    raw = await read_body(request)
    body = parse(schemas.RepositoryUnloadRequest, raw) if raw else schemas.RepositoryUnloadRequest()
    name, wanted = request.path_params["model_name"], body.parameters.version
    version = None if wanted is None else version_number(wanted)
    if wanted is not None and version is None:
        raise LoadRefused(f"parameters.version {wanted[:20]!r} is not a version number")
    await runtime.engine.fleet.unload(name, version)
    return JSON(versions_of(runtime, name))


def body(schema: Any) -> tuple[Content, ...]:
    return (Content("application/json", schema),)


def ok(schema: Any) -> Reply:
    return Reply(200, "OK", (Content("application/json", schema),))


FORBIDDEN = (
    OIP.error(401, "an admin key is needed and none was sent", ("WWW-Authenticate",)),
    OIP.error(403, "not an admin key; or no admin keys are set and the caller is not on loopback"),
)
MALFORMED = (
    OIP.error(400, "the body is not valid JSON or not the request's shape; or the load was refused, saying why"),
    OIP.error(413, "the body is over max_body_bytes"),
    OIP.error(415, "the body is not application/json"),
)
MODEL = {"model_name": {"type": "string"}}
TAG = "model repository"

ROUTES = [
    Route(
        "POST",
        "/v2/repository/index",
        index,
        OIP,
        "Repository index",
        TAG,
        request=body(schemas.RepositoryIndexRequest),
        body_required=False,
        untyped_body=True,
        admin=True,
        replies=(ok(list[schemas.RepositoryIndexEntry]), *MALFORMED, *FORBIDDEN),
        description="Every version on disk or served, with its state: READY, LOADING, UNLOADING (draining: its "
        "sessions continue, no new ones start) or UNAVAILABLE, and why.",
    ),
    Route(
        "POST",
        "/v2/repository/models/{model_name}/load",
        load,
        OIP,
        "Load a model",
        TAG,
        request=body(schemas.RepositoryLoadRequest),
        body_required=False,
        untyped_body=True,
        admin=True,
        parameters=MODEL,
        replies=(ok(schemas.RepositoryChange), *MALFORMED, *FORBIDDEN),
        description="Loads the model's versions as LSTM_SERVE_VERSION_POLICY says: new versions serve new "
        "sessions, versions the policy no longer keeps start draining. Each new version must match its "
        "sha256, keep its contract and pass a warm-up; if one fails, nothing changes (400 saying why).",
    ),
    Route(
        "POST",
        "/v2/repository/models/{model_name}/unload",
        unload,
        OIP,
        "Unload a model (or one version)",
        TAG,
        request=body(schemas.RepositoryUnloadRequest),
        body_required=False,
        untyped_body=True,
        admin=True,
        parameters=MODEL,
        replies=(
            ok(schemas.RepositoryChange),
            *MALFORMED,
            *FORBIDDEN,
            OIP.error(404, "no such serving model or version"),
        ),
        description="The versions drain: their live sessions continue for version_drain_s, then answer 410 "
        "`model_version_retired` naming the version that replaced them; no new session starts on them.",
    ),
]
