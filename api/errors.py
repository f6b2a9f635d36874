"""Error bodies in the shape every mParticle SDK reads: both `errors` and `Errors`, plus ErrorCode,
StatusCode and RequestId (spec A1). The platform API uses the same body."""

from __future__ import annotations

import uuid
from typing import Any

import duckdb
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from engine.errors import IdmeshError, Throttled

_CODES_BY_STATUS = {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND_ERROR",
                    405: "BAD_REQUEST", 413: "BAD_REQUEST", 415: "BAD_REQUEST", 429: "THROTTLED",
                    503: "SERVICE_UNAVAILABLE"}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    item: dict[str, Any] = {"code": code, "message": message}
    if field:
        item["field"] = field
    body = {"errors": [item], "Errors": [item], "ErrorCode": code, "StatusCode": status,
            "RequestId": str(uuid.uuid4())}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _field_of(location: tuple[Any, ...]) -> str:
    parts = [str(p) for p in location if p not in ("body", "query", "path", "header")]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or "body"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(IdmeshError)
    async def domain_error(_: Request, exc: IdmeshError) -> Response:
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Throttled) else None
        return error_response(exc.status, exc.code, exc.message, exc.field, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request"}
        field = _field_of(tuple(first.get("loc", ("body",))))
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, field = "the body is not valid JSON", "body"
        return error_response(400, "BAD_REQUEST", f"{field}: {message}", field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = _CODES_BY_STATUS.get(exc.status_code, "BAD_REQUEST")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(duckdb.FatalException)
    async def database_failed(_: Request, exc: duckdb.FatalException) -> Response:
        # DuckDB invalidates the database after a fatal error (a checkpoint that could not write the file or
        # remove the WAL: disk full, read-only directory) and only a restart reopens it; /healthz fails too, so
        # a supervisor restarts the server. The cause is in the server log (the writer logs the failed commit).
        return error_response(503, "SERVICE_UNAVAILABLE", "the database failed and idmesh must be restarted; "
                              "nothing is acknowledged until then")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        return error_response(500, "INTERNAL_ERROR", "An unknown error was encountered.")
