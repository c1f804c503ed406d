"""OpenAPI entries for the hot routes, which are plain Starlette endpoints FastAPI does not document."""

from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from lstm_serve.protocols.oip import OIP_ROUTE_DOCS
from lstm_serve.protocols.schemas import ErrorResponse, OipError
from lstm_serve.protocols.v1 import HOT_ROUTE_DOCS
from pydantic import BaseModel

REF = "#/components/schemas/{model}"


def schema_ref(model: type[BaseModel], components: dict) -> dict:
    schema = model.model_json_schema(ref_template=REF)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


def operation(summary, request, response, status, path, components) -> dict:
    oip = path.startswith("/v2")
    op: dict = {"summary": summary, "tags": ["open inference protocol" if oip else path.split("/")[2]], "responses": {}}
    params = re.findall(r"{(\w+)}", path)
    if params:
        op["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in params
        ]
    if request is not None:
        op["requestBody"] = {
            "required": request.__name__ != "SessionCreateRequest",
            "content": {"application/json": {"schema": schema_ref(request, components)}},
        }
    ok = {"description": "OK"}
    if response is not None:
        ok["content"] = {"application/json": {"schema": schema_ref(response, components)}}
    op["responses"][str(status)] = ok
    error_schema = schema_ref(OipError if oip else ErrorResponse, components)
    error = {"description": "error", "content": {"application/json": {"schema": error_schema}}}
    for code in ("400", "404", "409", "413", "422", "429", "503"):
        op["responses"][code] = error
    return op


def install(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for route, summary, request, response, status in HOT_ROUTE_DOCS + OIP_ROUTE_DOCS:
                entry = operation(summary, request, response, status, route.path, components)
                schema["paths"].setdefault(route.path, {})[route.method.lower()] = entry
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
