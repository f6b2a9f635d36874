"""Platform API: workspaces, a profile's identity graph and the hub report."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from api.auth import admin_or_own_workspace, check_admin
from api.body import body_schema, parse_body
from api.models import WorkspaceCreate, WorkspaceUpdate
from api.responses import json_response, service_of
from engine.errors import BadRequest, Unauthorized
from engine.graph_views import hub_report, profile_graph, profile_graph_json, profile_graph_svg

router = APIRouter(prefix="/platform/v2", tags=["Platform"])


def _require_admin(request: Request) -> None:
    if not check_admin(request, request.app.state.admin_token):
        raise Unauthorized("this endpoint needs the admin bearer token")


@router.post("/workspaces", status_code=201, openapi_extra=body_schema(WorkspaceCreate))
async def create_workspace(request: Request) -> Response:
    _require_admin(request)
    body = await parse_body(request, WorkspaceCreate)
    service = service_of(request)
    created, batch = service.workspaces.plan_create(body.name, body.settings)
    await service.commit(batch)
    service.workspaces.remember(created.workspace)
    return json_response(dict(created.workspace.public_json(), api_secret=created.api_secret), 201)


@router.get("/workspaces")
async def list_workspaces(request: Request) -> Response:
    _require_admin(request)
    return json_response({"workspaces": [w.public_json() for w in service_of(request).workspaces.all()]})


@router.get("/workspaces/{workspace_id}")
async def get_workspace(request: Request, workspace_id: str) -> Response:
    workspace = await admin_or_own_workspace(request, workspace_id)
    return json_response(workspace.public_json())


@router.put("/workspaces/{workspace_id}", openapi_extra=body_schema(WorkspaceUpdate))
async def update_workspace(request: Request, workspace_id: str) -> Response:
    _require_admin(request)
    body = await parse_body(request, WorkspaceUpdate)
    service = service_of(request)
    updated, batch = service.workspaces.plan_update(workspace_id, body.name, body.settings)
    await service.commit(batch)
    service.workspaces.remember(updated)
    return json_response(updated.public_json())


@router.get("/workspaces/{workspace_id}/profiles/{mpid}/graph")
async def get_profile_graph(request: Request, workspace_id: str, mpid: str, format: str = "json") -> Response:
    workspace = await admin_or_own_workspace(request, workspace_id)
    try:
        mpid_value = int(mpid)
    except ValueError:
        raise BadRequest("mpid must be a 64-bit integer", field="mpid") from None
    service = service_of(request)
    g = profile_graph(service.graph(workspace), mpid_value, service.aliases.involving(workspace.id, mpid_value))
    if format == "svg":
        return Response(profile_graph_svg(g, mpid_value), media_type="image/svg+xml")
    if format != "json":
        raise BadRequest("format must be json or svg", field="format")
    return json_response(profile_graph_json(g, mpid_value))


@router.get("/workspaces/{workspace_id}/identity/hubs")
async def get_hub_report(request: Request, workspace_id: str) -> Response:
    workspace = await admin_or_own_workspace(request, workspace_id)
    return json_response(hub_report(service_of(request).graph(workspace)))
