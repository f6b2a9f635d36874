"""Calculated attributes Platform API (reference §3), `/platform/v2/workspaces/{workspace_id}/calculatedattributes`.

Credentials: the admin bearer token, or the workspace's own key + secret. Activation answers at once; the
full computation runs in the background and `GET .../{id}/calculation` reports its progress.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from api.auth import admin_or_own_workspace, check_admin
from api.body import body_schema
from api.models import CalculatedAttributeBody, CaSeedsBody
from api.responses import json_response, service_of
from audiences.upkeep import background_idle as background_idle  # tests and api/app.py wait with it
from audiences.upkeep import lock_held
from engine.ca_engine import CalculatedAttributeEngine, seed_statement
from engine.ca_registry import CalculatedAttribute, CalculatedAttributeRegistry
from engine.ca_seeds import parse_seeds
from engine.errors import BadRequest, Conflict
from engine.writer import WriteBatch

router = APIRouter(prefix="/platform/v2/workspaces/{workspace_id}/calculatedattributes", tags=["Calculated attributes"])


def registry_of(request: Request) -> CalculatedAttributeRegistry:
    return request.app.state.calculated


def engine_of(request: Request) -> CalculatedAttributeEngine:
    return request.app.state.calculation


async def _body(request: Request) -> Any:
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON", field="body") from None


def _ca_id(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise BadRequest("id must be an integer", field="id") from None


async def _commit(request: Request, plan: tuple[CalculatedAttribute, Any]) -> CalculatedAttribute:
    ca, batch = plan
    await service_of(request).commit(batch)
    registry_of(request).remember(ca)
    return ca


@router.get("")
async def list_calculated_attributes(request: Request, workspace_id: str, name: str | None = None) -> Response:
    workspace = await admin_or_own_workspace(request, workspace_id)
    return json_response({"data": [ca.public_json() for ca in registry_of(request).list(workspace.id, name)]})


@router.head("")
async def any_calculated_attribute(request: Request, workspace_id: str, name: str | None = None) -> Response:
    """204 when at least one matches (by `name` when given), else 404; no body either way."""
    workspace = await admin_or_own_workspace(request, workspace_id)
    return Response(status_code=204 if registry_of(request).list(workspace.id, name) else 404)


@router.post("", status_code=201, openapi_extra=body_schema(CalculatedAttributeBody))
async def create_calculated_attribute(request: Request, workspace_id: str) -> Response:
    workspace = await admin_or_own_workspace(request, workspace_id)
    ca = await _commit(request, registry_of(request).plan_create(workspace.id, await _body(request)))
    return json_response({"id": ca.id, **ca.public_json()}, status=201)


@router.get("/{ca_id}")
async def get_calculated_attribute(request: Request, workspace_id: str, ca_id: str) -> Response:
    workspace = await admin_or_own_workspace(request, workspace_id)
    return json_response(registry_of(request).get(workspace.id, _ca_id(ca_id)).public_json())


@router.put("/{ca_id}", status_code=204, openapi_extra=body_schema(CalculatedAttributeBody))
async def update_calculated_attribute(request: Request, workspace_id: str, ca_id: str) -> Response:
    """Changes the draft (and the name before the first activation, the description always)."""
    workspace = await admin_or_own_workspace(request, workspace_id)
    await _commit(request, registry_of(request).plan_update(workspace.id, _ca_id(ca_id), await _body(request)))
    return Response(status_code=204)


@router.delete("/{ca_id}", status_code=204)
async def delete_calculated_attribute(request: Request, workspace_id: str, ca_id: str) -> Response:
    workspace = await admin_or_own_workspace(request, workspace_id)
    number = _ca_id(ca_id)
    batch = registry_of(request).plan_delete(workspace.id, number)
    for table in ("calculated_attribute_values", "calculated_attribute_seeds"):
        batch.statements.append(lambda cur, table=table: cur.execute(f"DELETE FROM {table} WHERE ca_id = ?", [number]))
    # audiences compare its value: deleting it would leave their criteria reading nothing. Checked under the lock
    # audience changes take, so no audience starts reading it between the check and the commit.
    async with request.app.state.audience_changes:
        readers = request.app.state.audiences.readers_of_calculated_attribute(workspace.id, number)
        if readers:
            named = ", ".join(f"{a.id} ({a.name!r})" for a in readers)
            raise Conflict(f"calculated attribute {number} is part of the criteria of audience {named}: change or "
                           "delete that first")
        # a running computation writes the same value rows in its own transaction: wait for it, or the two conflict
        async with lock_held(engine_of(request).status_of(number).lock):
            await service_of(request).commit(batch)
            registry_of(request).remember(None, forget_id=number)
    return Response(status_code=204)


@router.delete("/{ca_id}/draft", status_code=204)
async def discard_draft(request: Request, workspace_id: str, ca_id: str) -> Response:
    workspace = await admin_or_own_workspace(request, workspace_id)
    await _commit(request, registry_of(request).plan_discard_draft(workspace.id, _ca_id(ca_id)))
    return Response(status_code=204)


@router.post("/{ca_id}/activation", status_code=204)
async def activate(request: Request, workspace_id: str, ca_id: str) -> Response:
    """The draft becomes the active definition; a full computation of every profile starts in the background."""
    workspace = await admin_or_own_workspace(request, workspace_id)
    who = "admin" if check_admin(request, request.app.state.admin_token) else f"workspace:{workspace.api_key}"
    ca = await _commit(request, registry_of(request).plan_activate(workspace.id, _ca_id(ca_id), who))
    start_full_computation(request.app, ca)
    return Response(status_code=204)


@router.get("/{ca_id}/activation")
async def activation(request: Request, workspace_id: str, ca_id: str) -> Response:
    workspace = await admin_or_own_workspace(request, workspace_id)
    ca = registry_of(request).get(workspace.id, _ca_id(ca_id))
    return json_response({"is_activated": ca.is_active, "activated_timestamp_ms": ca.activated_ms,
                          "activated_by": ca.activated_by})


@router.post("/{ca_id}/seeds", status_code=202, openapi_extra=body_schema(CaSeedsBody))
async def seed(request: Request, workspace_id: str, ca_id: str) -> Response:
    """Starting values as of a date, `{"seeds": [{"mpid", "value", "as_of", "count"?, "values"?}]}`: events up to
    `as_of` are covered by the seed; later ones combine with it (engine/ca_seeds.py)."""
    workspace = await admin_or_own_workspace(request, workspace_id)
    ca = registry_of(request).get(workspace.id, _ca_id(ca_id))
    definition = ca.active_definition or ca.draft_definition
    seeds = parse_seeds(await _body(request), definition["calculation_type"])
    unknown = [s.mpid for s in seeds if service_of(request).graph(workspace).get(s.mpid) is None]
    if unknown:
        raise BadRequest(f"seeds name MPIDs that are not profiles of this workspace: {unknown[:5]}", field="seeds")
    batch = WriteBatch()
    batch.statements.append(seed_statement(workspace.id, ca.id, seeds))
    await service_of(request).commit(batch)
    if ca.is_active:
        await asyncio.to_thread(engine_of(request).refresh, ca, sorted({s.mpid for s in seeds}))
    return json_response({"accepted": len(seeds)}, status=202)


@router.get("/{ca_id}/calculation")
async def calculation(request: Request, workspace_id: str, ca_id: str) -> Response:
    workspace = await admin_or_own_workspace(request, workspace_id)
    ca = registry_of(request).get(workspace.id, _ca_id(ca_id))
    return json_response(engine_of(request).status_of(ca.id).as_json())


def start_full_computation(app: FastAPI, ca: CalculatedAttribute) -> asyncio.Task[None]:
    return app.state.upkeep.start(asyncio.to_thread(app.state.calculation.compute_all, ca),
                                  f"computing calculated attribute {ca.id}")


def recompute_after_start(app: FastAPI) -> list[asyncio.Task[None]]:
    """Values are derived data written outside the group commit: a full computation a crash cut short left the
    previous values (its transaction rolled back), so start-up computes every active attribute again, those of
    one workspace together: they share their reads of the events, most of the work (engine/ca_read.py)."""
    by_workspace: dict[str, list[CalculatedAttribute]] = {}
    for ca in app.state.calculated.all_active():
        by_workspace.setdefault(ca.workspace_id, []).append(ca)
    return [app.state.upkeep.start(asyncio.to_thread(_compute_together, app.state.calculation, attributes),
                                   f"computing the calculated attributes of workspace {workspace_id}")
            for workspace_id, attributes in by_workspace.items()]


def _compute_together(engine: CalculatedAttributeEngine, attributes: list[CalculatedAttribute]) -> None:
    """compute_many, all or nothing; should it fail, each attribute alone, so one that cannot be computed does
    not leave the others' values stale (its status says failed)."""
    try:
        engine.compute_many(attributes)
    except Exception:
        if len(attributes) == 1:
            raise
        failed = []
        for ca in attributes:
            try:
                engine.compute_all(ca)
            except Exception as exc:
                failed.append(f"{ca.id}: {exc}")
        if failed:
            raise RuntimeError("; ".join(failed)) from None


async def refresh_time_driven(app: FastAPI, as_of_ms: int | None = None) -> int:
    """Scheduler job: recompute the values time alone has changed (windows, future-stamped events), and the
    real-time audiences of those profiles (audiences/upkeep.py). Returns how many profile values were recomputed."""
    return await app.state.upkeep.refresh_time_driven_attributes(as_of_ms)
