"""Connections Platform API (docs/delivery.md, "Connection"):
`/platform/v2/workspaces/{workspace_id}/audiences/{audience_id}/connections`.

Credentials: the admin bearer token, or the workspace's own key + secret, as for audiences. A connection's
credentials are written once and never answered (`{"api_key": "set"}`). Each answer carries the connection's
delivery status (the `delivery_status` view's row: pending changes, last success, lag, last error).

Changes take the audiences' lock (`app.state.audience_changes`): a connection is never created for an audience
that a concurrent delete is removing, and deleting the audience takes its connections in the same transaction.
Deleting a connection stops its flushes and commits under its delivery lock (`delete_connections`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from api.auth import admin_or_own_workspace
from api.body import body_schema
from api.models import ConnectionBody
from api.responses import json_response, service_of
from audiences.connections import Connection, ConnectionRegistry
from audiences.delivery import DeliveryService
from audiences.registry import AudienceRegistry
from audiences.upkeep import lock_held
from engine.errors import BadRequest, Conflict
from engine.writer import WriteBatch

router = APIRouter(prefix="/platform/v2", tags=["Audience connections"])
CONNECTIONS = "/workspaces/{workspace_id}/audiences/{audience_id}/connections"
CONNECTION = CONNECTIONS + "/{connection_id}"
_MAX_ID = (1 << 63) - 1

_STATUS_COLUMNS = ("pending_adds", "pending_removes", "retrying", "oldest_pending_ms", "held", "last_attempt_ms",
                   "last_success_ms", "lag_p50_ms", "lag_max_ms", "requests_24h", "retried_24h", "rejected_24h",
                   "last_error", "last_error_ms")


def connections_of(request: Request) -> ConnectionRegistry:
    return request.app.state.connections


def _audiences(request: Request) -> AudienceRegistry:
    return request.app.state.audiences


def _number(value: str, name: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 < number <= _MAX_ID:
        raise BadRequest(f"{name} must be a positive integer", field=name)
    return number


async def _body(request: Request) -> Any:
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON", field="body") from None


def _known_ca(request: Request, workspace_id: str) -> Any:
    active = {ca.id for ca in request.app.state.calculated.active(workspace_id)}
    return lambda ca_id: ca_id in active


def _read_status(request: Request, workspace_id: str, ids: list[int]) -> dict[int, dict[str, Any]]:
    cursor = service_of(request).connection.cursor()  # its own DuckDB connection: safe beside the writer
    try:
        rows = cursor.execute(f"SELECT connection_id, {', '.join(_STATUS_COLUMNS)} FROM delivery_status "
                              "WHERE workspace_id = ? AND list_contains(?, connection_id)", [workspace_id, ids]).fetchall()
    finally:
        cursor.close()
    return {row[0]: dict(zip(_STATUS_COLUMNS, row[1:])) for row in rows}


async def _described(request: Request, workspace_id: str, connections: list[Connection]) -> list[dict[str, Any]]:
    if not connections:
        return []
    status = await asyncio.to_thread(_read_status, request, workspace_id, [c.id for c in connections])
    return [{**c.public_json(), "delivery": status.get(c.id)} for c in connections]


@router.get(CONNECTIONS)
async def list_connections(request: Request, workspace_id: str, audience_id: str) -> Response:
    """The audience's connections, oldest first."""
    workspace = await admin_or_own_workspace(request, workspace_id)
    audience = _audiences(request).get(workspace.id, _number(audience_id, "audience_id"))
    found = connections_of(request).list(workspace.id, audience.id)
    return json_response({"data": await _described(request, workspace.id, found)})


@router.post(CONNECTIONS, status_code=201, openapi_extra=body_schema(ConnectionBody))
async def create_connection(request: Request, workspace_id: str, audience_id: str) -> Response:
    """201 with the connection (an integer `id`); an active one is delivered from the next flush on."""
    workspace = await admin_or_own_workspace(request, workspace_id)
    number = _number(audience_id, "audience_id")
    body = await _body(request)
    async with request.app.state.audience_changes:
        audience = _audiences(request).get(workspace.id, number)
        created, batch = connections_of(request).plan_create(workspace.id, audience.id, body,
                                                             _known_ca(request, workspace.id))
        await service_of(request).commit(batch)
        connections_of(request).remember(created)
    return json_response((await _described(request, workspace.id, [created]))[0], status=201)


@router.get(CONNECTION)
async def get_connection(request: Request, workspace_id: str, audience_id: str, connection_id: str) -> Response:
    workspace = await admin_or_own_workspace(request, workspace_id)
    audience = _audiences(request).get(workspace.id, _number(audience_id, "audience_id"))
    found = connections_of(request).get(workspace.id, audience.id, _number(connection_id, "connection_id"))
    return json_response((await _described(request, workspace.id, [found]))[0])


@router.put(CONNECTION, openapi_extra=body_schema(ConnectionBody))
async def update_connection(request: Request, workspace_id: str, audience_id: str, connection_id: str) -> Response:
    """The connection as changed. Keys left out keep their values; `settings`, when sent, is taken whole;
    credentials left out (or sent back as "set") are kept. `output` cannot change."""
    workspace = await admin_or_own_workspace(request, workspace_id)
    number, connection = _number(audience_id, "audience_id"), _number(connection_id, "connection_id")
    body = await _body(request)
    async with request.app.state.audience_changes:
        audience = _audiences(request).get(workspace.id, number)
        updated, batch = connections_of(request).plan_update(workspace.id, audience.id, connection, body,
                                                             _known_ca(request, workspace.id))
        await service_of(request).commit(batch)
        connections_of(request).remember(updated)
    return json_response((await _described(request, workspace.id, [updated]))[0])


@router.delete(CONNECTION, status_code=204)
async def delete_connection(request: Request, workspace_id: str, audience_id: str, connection_id: str) -> Response:
    """204; what delivery kept for the connection (state, pending changes, attempts) goes with it. A Facebook
    connection with `delete_on_audience_delete` deletes its custom audiences; other destinations keep what they
    were sent (Braze attributes stay)."""
    workspace = await admin_or_own_workspace(request, workspace_id)
    number, connection = _number(audience_id, "audience_id"), _number(connection_id, "connection_id")
    delivery = delivery_of(request)
    async with request.app.state.audience_changes:
        audience = _audiences(request).get(workspace.id, number)
        batch = connections_of(request).plan_delete(workspace.id, audience.id, connection)
        await delete_connections(request, [connection], batch)
    await delivery.forget([connection])
    return Response(status_code=204)


@router.post(CONNECTION + "/resync")
async def resync_connection(request: Request, workspace_id: str, audience_id: str, connection_id: str) -> Response:
    """A full resync: the destination is made to hold the current membership again. Facebook replaces every
    downstream audience's users (/usersreplace) while the connection's flushes wait, then answers what the
    destination holds (`completed`, `acknowledged`); other outputs queue an add for every member and flush now
    (`queued`). 409 for an inactive Facebook connection (a replace sends at once); an inactive connection of
    another output gets its adds queued, sent once it is active. A replace that did not complete answers
    `completed: false` with the reason; nothing in idmesh's records changed then, so it can simply be run again."""
    workspace = await admin_or_own_workspace(request, workspace_id)
    number, connection = _number(audience_id, "audience_id"), _number(connection_id, "connection_id")
    audience = _audiences(request).get(workspace.id, number)
    found = connections_of(request).get(workspace.id, audience.id, connection)
    if found.output == "facebook" and not found.is_active:
        raise Conflict("the connection is inactive: activate it to replace its Facebook audiences", field="status")
    result = await delivery_of(request).resync(found)
    return json_response(result.as_json())


def delivery_of(request: Request) -> DeliveryService:
    return request.app.state.delivery


async def delete_connections(request: Request, connection_ids: list[int], batch: WriteBatch,
                             held: threading.Lock | None = None, then: Callable[[], None] | None = None) -> None:
    """Commit `batch`, which deletes these connections and their delivery rows, then delete what they created
    downstream. Their flushes stop first, and the commit holds their delivery locks (and `held`, when given), so
    it never meets a diff's or acknowledgement's rewrite of the same rows; `then` runs after the commit, inside
    the locks. The caller holds audience_changes."""
    delivery = delivery_of(request)
    async with delivery.paused(connection_ids):
        # read after the flushes stopped: what the destination created is recorded by then
        gone = [c for cid in connection_ids if (c := connections_of(request).find(cid)) is not None]
        async with AsyncExitStack() as stack:
            if held is not None:
                await stack.enter_async_context(lock_held(held))
            await stack.enter_async_context(delivery.locks_held(connection_ids))
            await service_of(request).commit(batch)
            if then is not None:
                then()
            connections_of(request).remember(None, forget_ids=tuple(connection_ids))
        await delivery.delete_downstream(gone)
