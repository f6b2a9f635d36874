"""POST /v1/sql: analyst SQL over HTTP. The admin token reads every workspace; a workspace's own credentials
(Basic key:secret or an HMAC signature, never the public key alone) read only that workspace's rows."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import duckdb
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from api.auth import authenticate_workspace, check_admin
from api.body import body_schema, parse_body
from api.responses import service_of
from engine import analyst_sql
from engine.analyst_sql import QueryResult
from engine.sql_formats import MEDIA_TYPES, serialize
from engine.workspaces import Workspace

router = APIRouter(tags=["Analyst SQL"])

# Queries block a thread for up to their timeout; a pool of their own keeps them from starving the default
# executor, and bounds how many run at once (each may use every DuckDB thread).
_EXECUTOR = ThreadPoolExecutor(max_workers=4, thread_name_prefix="idmesh-sql")

_ACCEPTED = {"text/csv": "csv", "application/vnd.apache.parquet": "parquet", "application/x-parquet": "parquet",
             "application/json": "json"}


class SqlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sql: str = Field(description="one SELECT over the public views (profiles, identities, identity_changes, ...)")
    format: Literal["json", "csv", "parquet"] | None = Field(
        None, description="answer format; default from the Accept header, else json")
    limit: int = Field(analyst_sql.DEFAULT_LIMIT, ge=1, le=analyst_sql.MAX_LIMIT,
                       description="rows returned at most; a longer answer is cut and marked truncated")
    timeout_seconds: float = Field(analyst_sql.DEFAULT_TIMEOUT_SECONDS, gt=0, le=analyst_sql.MAX_TIMEOUT_SECONDS,
                                   description="statement timeout; the query is interrupted after it")


@router.post("/v1/sql", openapi_extra=body_schema(SqlRequest))
async def post_sql(request: Request) -> Response:
    """Run one read-only analyst query; answers JSON `{columns, rows, row_count, truncated}`, CSV or Parquet
    (CSV and Parquet carry `X-Idmesh-Row-Count` and `X-Idmesh-Truncated` headers)."""
    workspace = await _caller(request)
    body = await parse_body(request, SqlRequest)
    answer_format = body.format or _format_from_accept(request.headers.get("accept", ""))
    connection = service_of(request).connection
    payload, result = await asyncio.get_running_loop().run_in_executor(_EXECUTOR, functools.partial(
        _run, connection, body.sql, workspace, body.limit, body.timeout_seconds, answer_format))
    headers = {"X-Idmesh-Row-Count": str(result.row_count), "X-Idmesh-Truncated": str(result.truncated).lower()}
    return Response(payload, media_type=MEDIA_TYPES[answer_format], headers=headers)


async def _caller(request: Request) -> Workspace | None:
    """None for the admin (every workspace), else the authenticated workspace."""
    if check_admin(request, request.app.state.admin_token):
        return None
    return await authenticate_workspace(request, service_of(request), allow_key_only=False)


def _run(connection: duckdb.DuckDBPyConnection, sql: str, workspace: Workspace | None, limit: int,
         timeout_seconds: float, answer_format: str) -> tuple[bytes, QueryResult]:
    """In a worker thread: the query and its serialization (100,000 rows take a while to encode)."""
    result = analyst_sql.run_query(connection, sql, workspace, limit, timeout_seconds)
    return serialize(result, answer_format), result


def _format_from_accept(accept: str) -> str:
    for part in accept.split(","):
        media_type = part.split(";")[0].strip().lower()
        if media_type in _ACCEPTED:
            return _ACCEPTED[media_type]
    return "json"
