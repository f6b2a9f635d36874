"""Audiences Platform API (reference §4, §8; docs/audiences.md), `/platform/v2/workspaces/{workspace_id}/audiences`,
and the account-wide list `/platform/v2/audiences`.

Credentials: the admin bearer token, or the workspace's own key + secret; the account-wide list takes the admin
token only. Creating or changing an audience answers at once and evaluates it in the background
(audiences/upkeep.py); `GET .../{id}/calculation` says when that is done.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from api.auth import admin_or_own_workspace, check_admin
from api.body import body_schema
from api.connection_routes import delete_connections
from api.models import AudienceBody, AudiencePreviewBody
from api.responses import json_response, service_of
from audiences.definitions import parse_criteria
from audiences.membership import audience_stats, forget_audience, size_history
from audiences.registry import Audience, AudienceRegistry
from audiences.size_chart import size_chart_svg
from audiences.upkeep import AudienceUpkeep, members_preview
from engine.errors import BadRequest, Unauthorized
from engine.store import now_ms

router = APIRouter(prefix="/platform/v2", tags=["Audiences"])
WORKSPACE = "/workspaces/{workspace_id}/audiences"
PREVIEW_SAMPLE = 10
LATEST_MS = 1 << 53  # time bounds beyond this are no moment a chart could show (and would not fit the store)


def registry_of(request: Request) -> AudienceRegistry:
    return request.app.state.audiences


def upkeep_of(request: Request) -> AudienceUpkeep:
    return request.app.state.upkeep


async def _body(request: Request) -> Any:
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON", field="body") from None


def _audience_id(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise BadRequest("audience_id must be an integer", field="audience_id") from None


def _moment(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    try:
        moment = int(value)
    except ValueError:
        moment = -1
    if not 0 <= moment <= LATEST_MS:
        raise BadRequest(f"{name} must be a unix time in milliseconds", field=name)
    return moment


def _read(request: Request, read: Any, *args: Any) -> Any:
    """Run `read(cursor, *args)` on a cursor of its own (its own DuckDB connection: safe beside the writer)."""
    cursor = service_of(request).connection.cursor()
    try:
        return read(cursor, *args)
    finally:
        cursor.close()


async def _described(request: Request, audiences: list[Audience]) -> list[dict[str, Any]]:
    """The Platform API's JSON of audiences: the definition, the evaluation status, size and 24-hour stats."""
    by_workspace: dict[str, list[int]] = {}
    for audience in audiences:
        by_workspace.setdefault(audience.workspace_id, []).append(audience.id)
    at = now_ms()
    stats: dict[int, Any] = {}
    for workspace_id, ids in by_workspace.items():
        stats |= await asyncio.to_thread(_read, request, audience_stats, workspace_id, at, ids)
    answers = []
    for audience in audiences:
        found = stats.get(audience.id)
        status = upkeep_of(request).status_of(audience.id)
        answers.append({**audience.public_json(), "status": status.state,
                        "connected_outputs": [c.summary_json() for c in
                                              request.app.state.connections.list(audience.workspace_id, audience.id)],
                        "last_computed_timestamp_ms": status.completed_ms,
                        "size": found.size if found else 0,
                        "stats": {"adds_24h": found.adds_24h if found else 0, "drops_24h": found.drops_24h if found else 0,
                                  "volatility": found.volatility if found else None,
                                  "changed_timestamp_ms": found.changed_ms if found else None}})
    return answers


async def _one(request: Request, audience: Audience, status: int = 200) -> Response:
    return json_response((await _described(request, [audience]))[0], status=status)


@router.get(WORKSPACE)
async def list_audiences(request: Request, workspace_id: str, name: str | None = None) -> Response:
    workspace = await admin_or_own_workspace(request, workspace_id)
    return json_response({"data": await _described(request, registry_of(request).list(workspace.id, name))})


@router.post(WORKSPACE, status_code=201, openapi_extra=body_schema(AudienceBody))
async def create_audience(request: Request, workspace_id: str) -> Response:
    """201 with the audience (an integer `id`); its first evaluation runs in the background."""
    workspace = await admin_or_own_workspace(request, workspace_id)
    body = await _body(request)
    async with request.app.state.audience_changes:
        audience, batch = registry_of(request).plan_create(workspace.id, body)
        await service_of(request).commit(batch)
        registry_of(request).remember(audience)
    upkeep_of(request).evaluate_in_background(workspace.id, [audience.id])
    return await _one(request, audience, status=201)


@router.post(f"{WORKSPACE}/preview", openapi_extra=body_schema(AudiencePreviewBody))
async def preview_audience(request: Request, workspace_id: str) -> Response:
    """A dry run: how many profiles the criteria match now and up to ten of their MPIDs (the lowest, as strings).
    Nothing is stored."""
    workspace = await admin_or_own_workspace(request, workspace_id)
    body = await _body(request)
    if not isinstance(body, dict) or "criteria" not in body:
        raise BadRequest("the body must be an object with criteria", field="criteria")
    criteria = parse_criteria(body["criteria"])
    registry_of(request).check_references(workspace.id, criteria)
    at = now_ms()
    members = await asyncio.to_thread(members_preview, service_of(request).connection,
                                      service_of(request).computation_gate, workspace.id, criteria, at)
    return json_response({"size": len(members), "sample": [str(m) for m in members.head(PREVIEW_SAMPLE).to_list()],
                          "as_of_timestamp_ms": at})


@router.get(f"{WORKSPACE}/{{audience_id}}")
async def get_audience(request: Request, workspace_id: str, audience_id: str) -> Response:
    workspace = await admin_or_own_workspace(request, workspace_id)
    return await _one(request, registry_of(request).get(workspace.id, _audience_id(audience_id)))


@router.put(f"{WORKSPACE}/{{audience_id}}", openapi_extra=body_schema(AudienceBody))
async def update_audience(request: Request, workspace_id: str, audience_id: str) -> Response:
    """The audience as changed; it (and the real-time audiences reading it) is evaluated again in the background."""
    workspace = await admin_or_own_workspace(request, workspace_id)
    number = _audience_id(audience_id)
    body = await _body(request)
    async with request.app.state.audience_changes:
        audience, batch = registry_of(request).plan_update(workspace.id, number, body)
        await service_of(request).commit(batch)
        registry_of(request).remember(audience)
    upkeep_of(request).evaluate_in_background(workspace.id, [audience.id])
    return await _one(request, audience)


@router.delete(f"{WORKSPACE}/{{audience_id}}", status_code=204)
async def delete_audience(request: Request, workspace_id: str, audience_id: str) -> Response:
    """204; the memberships, size history and connections (with what delivery kept for them) go with it, and the
    Facebook custom audiences of connections with `delete_on_audience_delete` (Braze attributes stay). 409 while
    another audience's criteria read it."""
    workspace = await admin_or_own_workspace(request, workspace_id)
    number = _audience_id(audience_id)
    async with request.app.state.audience_changes:
        batch = registry_of(request).plan_delete(workspace.id, number)
        batch.statements.append(lambda cur: forget_audience(cur, workspace.id, number))
        connection_ids, connections_gone = request.app.state.connections.plan_delete_audience(workspace.id, number)
        batch.extend(connections_gone)
        # an evaluation running for it writes the same membership rows in its own transaction: wait for it; the
        # connections' flushes stop and their locks are held too (api/connection_routes.delete_connections)
        await delete_connections(request, list(connection_ids), batch, held=upkeep_of(request).status_of(number).lock,
                                 then=lambda: registry_of(request).remember(None, forget_id=number))
    await request.app.state.delivery.forget(connection_ids)
    upkeep_of(request).forget(number)
    return Response(status_code=204)


@router.get(f"{WORKSPACE}/{{audience_id}}/size.svg", response_class=Response,
            responses={200: {"content": {"image/svg+xml": {"schema": {"type": "string"}}}}})
async def size_chart(request: Request, workspace_id: str, audience_id: str, since: str | None = None,
                     until: str | None = None) -> Response:
    """The audience's size over time as an SVG image, from `since` to `until` (unix milliseconds; default: its
    whole history up to now)."""
    workspace = await admin_or_own_workspace(request, workspace_id)
    audience = registry_of(request).get(workspace.id, _audience_id(audience_id))
    start, end = _moment(since, "since"), _moment(until, "until")
    if start is not None and end is not None and start > end:
        raise BadRequest("since must not come after until", field="since")
    points = await asyncio.to_thread(_read, request, size_history, workspace.id, audience.id, start, end)
    last = min(end, now_ms()) if end is not None else now_ms()
    if points and points[-1][0] < last:
        points.append((last, points[-1][1]))  # the line runs on to the present (or `until`) at its last height
    svg = size_chart_svg(points, f"{audience.name}: members over time")
    return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "no-store"})


@router.post(f"{WORKSPACE}/{{audience_id}}/calculation", status_code=202)
async def calculate(request: Request, workspace_id: str, audience_id: str) -> Response:
    """Evaluate now, whatever the schedule (meant for standard audiences; a real-time one is evaluated in full).
    202 with the status; poll `GET` for "ready"."""
    workspace = await admin_or_own_workspace(request, workspace_id)
    audience = registry_of(request).get(workspace.id, _audience_id(audience_id))
    upkeep_of(request).evaluate_in_background(workspace.id, [audience.id])
    return json_response(upkeep_of(request).status_of(audience.id).as_json(), status=202)


@router.get(f"{WORKSPACE}/{{audience_id}}/calculation")
async def calculation(request: Request, workspace_id: str, audience_id: str) -> Response:
    """not_started, calculating, ready or failed, with when the last full evaluation started and completed."""
    workspace = await admin_or_own_workspace(request, workspace_id)
    audience = registry_of(request).get(workspace.id, _audience_id(audience_id))
    return json_response(upkeep_of(request).status_of(audience.id).as_json())


@router.get("/audiences")
async def account_audiences(request: Request, account_id: str | None = Query(None, alias="accountId")) -> Response:
    """Every workspace's audiences (admin token only). One org per deployment means one account: `accountId` is
    accepted for mParticle clients that send it, and names nothing else to choose from."""
    if not check_admin(request, request.app.state.admin_token):
        raise Unauthorized("this endpoint needs the admin bearer token")
    return json_response({"data": await _described(request, registry_of(request).all())})
