"""JSON request bodies parsed after authentication, whatever the Content-Type (SDKs send application/json,
text/plain or nothing), with errors that name the field; and their schemas for the OpenAPI document."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError

from engine.errors import BadRequest

Model = TypeVar("Model", bound=BaseModel)

_SHARED_SCHEMAS: dict[str, Any] = {}


async def parse_body(request: Request, model: type[Model]) -> Model:
    raw = await request.body()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON", field="body") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadRequest(f"{field}: {first['msg']}", field=field) from None


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route whose body `parse_body` reads."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    _SHARED_SCHEMAS.update(schema.pop("$defs", {}))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def add_body_schemas(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi
            document = get_openapi(title=app.title, version=app.version, description=app.description,
                                   routes=app.routes)
            document.setdefault("components", {}).setdefault("schemas", {}).update(_SHARED_SCHEMAS)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
