"""Profile API (spec B§11): one person's identities, attributes, memberships and attribution.

One org per deployment: the `{org_id}` and `{account_id}` path segments are accepted as given; the workspace
segment is the idmesh workspace id. Credentials: the admin bearer token, or the workspace's key + secret.

`audience_memberships` lists the audiences the profile is a member of now, in spec B§11's shape
(`audience_id`, `audience_name`, `expiration_timestamp_ms`: memberships do not expire, so always null) plus
`added_timestamp_ms`, when the current stay began (idmesh's own field; mParticle's example shows none).
"""

from __future__ import annotations

import asyncio
from typing import Any

import duckdb
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response

from api.auth import admin_or_own_workspace
from api.body import body_schema, parse_body
from api.responses import json_response, service_of
from audiences.membership import memberships_of
from engine.errors import BadRequest
from engine.profiles import parse_fields, profile_value, read_profile, resolve_immutable

router = APIRouter(prefix="/userprofile/v1", tags=["Profiles"])


class ResolveBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    environment_type: str | None = None
    identity: dict[str, Any]


async def _profile(request: Request, workspace_id: str, mpid: int, fields: str | None) -> Response:
    workspace = await admin_or_own_workspace(request, workspace_id)
    wanted = parse_fields(fields)
    service = service_of(request)
    graph = service.graph(workspace)
    # DuckDB reads block for a few milliseconds: keep them off the event loop
    body = await asyncio.to_thread(read_profile, service.connection, workspace, graph, mpid, wanted)
    if "audience_memberships" in wanted:
        body["audience_memberships"] = await asyncio.to_thread(_audience_memberships, service.connection,
                                                               workspace.id, mpid)
    if "user_attributes" in wanted:
        # calculated attributes show among the user attributes, under their names, as mParticle's profile does
        names = {ca.id: ca.name for ca in request.app.state.calculated.active(workspace.id)}
        values = await asyncio.to_thread(request.app.state.calculation.values, workspace.id, mpid)
        body["user_attributes"].update({names[i]: profile_value(v) for i, v in values.items() if i in names})
    return json_response(body)


def _audience_memberships(connection: duckdb.DuckDBPyConnection, workspace_id: str, mpid: int) -> list[dict[str, Any]]:
    cursor = connection.cursor()  # its own connection: safe beside the writer thread
    try:
        return [{"audience_id": m.audience_id, "audience_name": m.audience_name, "expiration_timestamp_ms": None,
                 "added_timestamp_ms": m.entered_ms} for m in memberships_of(cursor, workspace_id, mpid)]
    finally:
        cursor.close()


@router.get("/{org_id}/{account_id}/{workspace_id}/{mpid}")
async def get_profile(request: Request, org_id: str, account_id: str, workspace_id: str, mpid: str,
                      fields: str | None = None) -> Response:
    try:
        number = int(mpid)
    except ValueError:
        raise BadRequest("mpid must be an integer", field="mpid") from None
    return await _profile(request, workspace_id, number, fields)


@router.post("/resolve/{org_id}/{account_id}/{workspace_id}", openapi_extra=body_schema(ResolveBody))
async def resolve_profile(request: Request, org_id: str, account_id: str, workspace_id: str,
                          fields: str | None = None) -> Response:
    """Look a profile up by an immutable identity: {"identity": {"type": "customer_id", "value": "..."}}."""
    workspace = await admin_or_own_workspace(request, workspace_id)
    body = await parse_body(request, ResolveBody)
    mpid = resolve_immutable(workspace, service_of(request).graph(workspace), body.identity)
    return await _profile(request, workspace_id, mpid, fields)
