"""OpenAPI entries for the hot routes, which are plain Starlette endpoints FastAPI does not document."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from service.api import HOT_ROUTE_DOCS
from service.schemas import ErrorResponse

REF = "#/components/schemas/{model}"


def schema_ref(model: type[BaseModel], components: dict) -> dict:
    schema = model.model_json_schema(ref_template=REF)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


def operation(summary, request, response, status, path, components) -> dict:
    op: dict = {"summary": summary, "tags": [path.split("/")[2]], "responses": {}}
    if "{session_id}" in path:
        op["parameters"] = [{"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    if request is not None:
        op["requestBody"] = {"required": request.__name__ != "SessionCreateRequest",
                             "content": {"application/json": {"schema": schema_ref(request, components)}}}
    ok = {"description": "OK"}
    if response is not None:
        ok["content"] = {"application/json": {"schema": schema_ref(response, components)}}
    op["responses"][str(status)] = ok
    error = {"description": "error", "content": {"application/json": {"schema": schema_ref(ErrorResponse,
                                                                                              components)}}}
    for code in ("400", "404", "409", "413", "422", "429", "503"):
        op["responses"][code] = error
    return op


def install(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for route, summary, request, response, status in HOT_ROUTE_DOCS:
                entry = operation(summary, request, response, status, route.path, components)
                schema["paths"].setdefault(route.path, {})[route.method.lower()] = entry
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
