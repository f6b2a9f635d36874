"""Audiences' lifecycle (docs/audiences.md): create, update, delete and list definitions, kept in memory and
written through the group-commit writer like calculated attributes (engine/ca_registry.py).

A plan validates against what is known now (the workspace's active calculated attributes, its other
audiences, no circles) and returns the new state with the batch that makes it durable; the caller commits the
batch and then `remember`s the state, so memory never holds what a failed commit did not store. Plans must not
interleave with commits (api/audience_routes.py holds a lock), or two creates could both take a name that was
free when each looked. Memberships are derived data kept elsewhere (audiences/membership.py, audiences/upkeep.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import duckdb

from audiences.definitions import (
    AudienceDefinition,
    Criteria,
    check_references,
    dependency_order,
    parse_audience,
    referenced_audiences,
    referenced_calculated_attributes,
    uses_time_windows,
)
from engine.errors import BadRequest, Conflict, NotFound
from engine.store import now_ms
from engine.writer import WriteBatch

# What a definition holds; other keys of a body (an `id` sent back, `size`) are read-only or unknown and not stored.
DEFINITION_KEYS = ("name", "external_name", "description", "type", "refresh_minutes", "criteria")
_COLUMNS = "id, workspace_id, name, external_name, description, type, refresh_minutes, definition, created_ms, updated_ms"


@dataclass(frozen=True)
class Audience:
    id: int
    workspace_id: str
    definition: dict[str, Any]     # as accepted: the keys of DEFINITION_KEYS the client sent
    parsed: AudienceDefinition
    created_ms: int
    updated_ms: int

    @property
    def name(self) -> str:
        return self.parsed.name

    @property
    def criteria(self) -> Criteria:
        return self.parsed.criteria

    @property
    def is_real_time(self) -> bool:
        return self.parsed.type == "real_time"

    def reads_audiences(self) -> frozenset[int]:
        return referenced_audiences(self.parsed.criteria)

    def reads_calculated_attributes(self) -> frozenset[int]:
        return referenced_calculated_attributes(self.parsed.criteria)

    def changes_with_time(self) -> bool:
        return uses_time_windows(self.parsed.criteria)

    def public_json(self) -> dict[str, Any]:
        """The definition's part of the Platform API answer; the API adds status, size and stats."""
        d = self.parsed
        return {"id": self.id, "name": d.name, "external_name": d.external_name, "description": d.description,
                "type": d.type, "refresh_minutes": d.refresh_minutes, "definition": self.definition,
                # one org per deployment and single-workspace audiences: the list mParticle's API has holds one id
                "workspaces": [self.workspace_id], "connected_outputs": [],
                "created_timestamp_ms": self.created_ms, "last_modified_timestamp_ms": self.updated_ms}


class AudienceRegistry:
    def __init__(self, ca_is_active: Callable[[str, int], bool]) -> None:
        """`ca_is_active(workspace_id, ca_id)`: whether the workspace has that calculated attribute, active."""
        self._by_id: dict[int, Audience] = {}
        self._ca_is_active = ca_is_active
        # ids are never handed out twice in a process: a deleted audience's id could otherwise name a new one
        # while something (a queued evaluation, a client) still means the old
        self._last_id = 0

    def load(self, connection: duckdb.DuckDBPyConnection) -> None:
        cursor = connection.cursor()
        try:
            rows = cursor.execute(f"SELECT {_COLUMNS} FROM audience_definitions").fetchall()
        finally:
            cursor.close()
        loaded = {}
        for row in rows:
            definition = json.loads(row[7])
            loaded[row[0]] = Audience(row[0], row[1], definition, parse_audience(definition), row[8], row[9])
        self._by_id = loaded
        self._last_id = max(self._last_id, *loaded, 0)

    # --- reading ---------------------------------------------------------------------------------------------
    def list(self, workspace_id: str, name: str | None = None) -> list[Audience]:
        return sorted((a for a in self._by_id.values() if a.workspace_id == workspace_id
                       and (name is None or a.name == name)), key=lambda a: a.id)

    def all(self) -> list[Audience]:
        return sorted(self._by_id.values(), key=lambda a: a.id)

    def workspaces(self) -> list[str]:
        return sorted({a.workspace_id for a in self._by_id.values()})

    def get(self, workspace_id: str, audience_id: int) -> Audience:
        found = self._by_id.get(audience_id)
        if found is None or found.workspace_id != workspace_id:
            raise NotFound(f"no audience {audience_id} in this workspace")
        return found

    def find(self, audience_id: int) -> Audience | None:
        return self._by_id.get(audience_id)

    def has_real_time(self, workspace_id: str) -> bool:
        return any(a.workspace_id == workspace_id and a.is_real_time for a in self._by_id.values())

    def real_time(self, workspace_id: str) -> list[Audience]:
        """The workspace's real-time audiences, each after the audiences it reads."""
        return self.in_dependency_order([a for a in self.list(workspace_id) if a.is_real_time])

    def in_dependency_order(self, audiences: list[Audience]) -> list[Audience]:
        by_id = {a.id: a for a in audiences}
        return [by_id[i] for i in dependency_order({a.id: a.criteria for a in audiences})]

    def real_time_dependents(self, workspace_id: str, audience_ids: set[int]) -> set[int]:
        """Real-time audiences reading any of these, directly or through other real-time ones: their membership
        follows the stored membership of what they read, so they are evaluated again when it changes. (A
        standard audience reading them waits for its own schedule, as standard audiences do.)"""
        found: set[int] = set()
        frontier = set(audience_ids)
        while frontier:
            frontier = {a.id for a in self.list(workspace_id) if a.is_real_time and a.id not in found
                        and a.reads_audiences() & frontier}
            found |= frontier
        return found

    def readers_of_audience(self, workspace_id: str, audience_id: int) -> list[Audience]:
        return [a for a in self.list(workspace_id) if audience_id in a.reads_audiences()]

    def readers_of_calculated_attribute(self, workspace_id: str, ca_id: int) -> list[Audience]:
        return [a for a in self.list(workspace_id) if ca_id in a.reads_calculated_attributes()]

    def remember(self, audience: Audience | None, forget_id: int | None = None) -> None:
        if forget_id is not None:
            self._by_id.pop(forget_id, None)
        if audience is not None:
            self._by_id[audience.id] = audience

    # --- plans: validate, build the new state and the batch that makes it durable ---------------------------
    def check(self, workspace_id: str, body: Any, audience_id: int | None = None) -> AudienceDefinition:
        """Parse a definition and check it against the workspace: what a create or update accepts. Names are the
        caller's to check."""
        parsed = parse_audience(body)
        self.check_references(workspace_id, parsed.criteria, audience_id)
        return parsed

    def check_references(self, workspace_id: str, criteria: Criteria, audience_id: int | None = None) -> None:
        """Calculated attributes active in the workspace, audiences of the workspace, no circle (the preview
        checks its criteria alone with this)."""
        check_references(criteria, lambda ca_id: self._ca_is_active(workspace_id, ca_id),
                         lambda other: self._criteria_in(workspace_id, other), audience_id)

    def plan_create(self, workspace_id: str, body: Any) -> tuple[Audience, WriteBatch]:
        definition = _accepted(body)
        parsed = self.check(workspace_id, definition)
        self._check_name_free(workspace_id, parsed.name)
        stamp = now_ms()
        self._last_id = max(self._last_id, *self._by_id, 0) + 1  # taken now: a failed commit only skips it
        audience = Audience(self._last_id, workspace_id, definition, parsed, stamp, stamp)
        return audience, self._upsert(audience)

    def plan_update(self, workspace_id: str, audience_id: int, body: Any) -> tuple[Audience, WriteBatch]:
        """PUT takes what POST takes; keys it leaves out keep their values (send `"refresh_minutes": null` to
        drop one when turning a standard audience into a real-time one)."""
        current = self.get(workspace_id, audience_id)
        changes = _accepted(body, partial=True)
        definition = {k: v for k, v in {**current.definition, **changes}.items() if v is not None}
        parsed = self.check(workspace_id, definition, audience_id)
        if parsed.name != current.name:
            self._check_name_free(workspace_id, parsed.name)
        updated = replace(current, definition=definition, parsed=parsed, updated_ms=now_ms())
        return updated, self._upsert(updated)

    def plan_delete(self, workspace_id: str, audience_id: int) -> WriteBatch:
        """The definition row only; the caller adds forgetting the memberships to the batch."""
        self.get(workspace_id, audience_id)
        readers = self.readers_of_audience(workspace_id, audience_id)
        if readers:
            named = ", ".join(f"{a.id} ({a.name!r})" for a in readers)
            raise Conflict(f"audience {audience_id} is part of the criteria of audience {named}: change or delete "
                           "that first")
        batch = WriteBatch()
        batch.statements.append(lambda cur: cur.execute("DELETE FROM audience_definitions WHERE id = ?",
                                                        [audience_id]))
        return batch

    def _criteria_in(self, workspace_id: str, audience_id: int) -> Criteria | None:
        found = self._by_id.get(audience_id)
        return found.criteria if found is not None and found.workspace_id == workspace_id else None

    def _check_name_free(self, workspace_id: str, name: str) -> None:
        if self.list(workspace_id, name):
            raise Conflict(f"an audience named {name!r} exists in this workspace")

    def _upsert(self, audience: Audience) -> WriteBatch:
        d = audience.parsed
        row = [audience.id, audience.workspace_id, d.name, d.external_name, d.description, d.type, d.refresh_minutes,
               json.dumps(audience.definition), audience.created_ms, audience.updated_ms]
        batch = WriteBatch()
        batch.statements.append(lambda cur: cur.execute(
            f"INSERT OR REPLACE INTO audience_definitions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row))
        return batch


def _accepted(body: Any, partial: bool = False) -> dict[str, Any]:
    """The definition keys of a body. On a create, a key sent as null is as good as left out."""
    if not isinstance(body, Mapping):
        raise BadRequest("the body must be an object with name and criteria (docs/audiences.md)", field="body")
    return {k: body[k] for k in DEFINITION_KEYS if k in body and (partial or body[k] is not None)}
