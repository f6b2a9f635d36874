"""Calculated attributes' lifecycle (reference §3): draft -> activation -> active, kept in memory and written
through the group-commit writer like workspaces.

Edits change `draft_definition` only; activation copies the draft to `active_definition`, after which the
name is fixed (the description stays editable). A workspace holds at most `MAX_ACTIVE_PER_WORKSPACE` active
attributes. Values are computed elsewhere (engine/ca_compute.py); this module only says what is defined.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import duckdb

from engine.ca_definitions import Definition, parse_definition
from engine.errors import BadRequest, Conflict, NotFound
from engine.store import now_ms
from engine.writer import WriteBatch

MAX_ACTIVE_PER_WORKSPACE = 50
MAX_NAME = 128

@dataclass(frozen=True)
class CalculatedAttribute:
    id: int
    workspace_id: str
    name: str
    description: str | None
    draft_definition: dict[str, Any] | None
    active_definition: dict[str, Any] | None
    created_ms: int
    updated_ms: int
    activated_ms: int | None = None
    activated_by: str | None = None

    @property
    def is_active(self) -> bool:
        return self.active_definition is not None

    def active(self) -> Definition:
        return parse_definition(self.active_definition, "active_definition")

    def public_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "description": self.description,
                "draft_definition": self.draft_definition, "active_definition": self.active_definition,
                "status": "active" if self.is_active else "draft", "created_timestamp_ms": self.created_ms,
                "last_modified_timestamp_ms": self.updated_ms}


class CalculatedAttributeRegistry:
    def __init__(self) -> None:
        self._by_id: dict[int, CalculatedAttribute] = {}

    def load(self, connection: duckdb.DuckDBPyConnection) -> None:
        cursor = connection.cursor()
        try:
            rows = cursor.execute("SELECT id, workspace_id, name, description, draft_definition, active_definition, "
                                  "created_ms, updated_ms, activated_ms, activated_by FROM calculated_attributes"
                                  ).fetchall()
        finally:
            cursor.close()
        self._by_id = {row[0]: CalculatedAttribute(row[0], row[1], row[2], row[3], _loads(row[4]), _loads(row[5]),
                                                   *row[6:]) for row in rows}

    def list(self, workspace_id: str, name: str | None = None) -> list[CalculatedAttribute]:
        return sorted((ca for ca in self._by_id.values() if ca.workspace_id == workspace_id
                       and (name is None or ca.name == name)), key=lambda ca: ca.id)

    def all_active(self) -> list[CalculatedAttribute]:
        return sorted((ca for ca in self._by_id.values() if ca.is_active), key=lambda ca: ca.id)

    def active(self, workspace_id: str) -> list[CalculatedAttribute]:
        return [ca for ca in self.list(workspace_id) if ca.is_active]

    def get(self, workspace_id: str, ca_id: int) -> CalculatedAttribute:
        found = self._by_id.get(ca_id)
        if found is None or found.workspace_id != workspace_id:
            raise NotFound(f"no calculated attribute {ca_id} in this workspace")
        return found

    def remember(self, ca: CalculatedAttribute | None, forget_id: int | None = None) -> None:
        if forget_id is not None:
            self._by_id.pop(forget_id, None)
        if ca is not None:
            self._by_id[ca.id] = ca

    # --- plans: validate, build the new state and the batch that makes it durable -----------------------
    def plan_create(self, workspace_id: str, body: Any) -> tuple[CalculatedAttribute, WriteBatch]:
        if not isinstance(body, dict):
            raise BadRequest("the body must be an object with name and draft_definition", field="body")
        name = self._free_name(workspace_id, body.get("name"))
        draft = _definition_json(body.get("draft_definition", body.get("definition")), "draft_definition")
        stamp = now_ms()
        ca = CalculatedAttribute(max(self._by_id, default=0) + 1, workspace_id, name, _description(body), draft, None,
                                 stamp, stamp)
        return ca, self._upsert(ca)

    def plan_update(self, workspace_id: str, ca_id: int, body: Any) -> tuple[CalculatedAttribute, WriteBatch]:
        current = self.get(workspace_id, ca_id)
        if not isinstance(body, dict):
            raise BadRequest("the body must be an object", field="body")
        name = current.name
        if "name" in body and body["name"] != current.name:
            if current.activated_ms is not None:
                raise BadRequest("name cannot change after activation; only description and the draft can",
                                 field="name")
            name = self._free_name(workspace_id, body["name"])
        draft = current.draft_definition
        if "draft_definition" in body or "definition" in body:
            draft = _definition_json(body.get("draft_definition", body.get("definition")), "draft_definition")
        description = _description(body) if "description" in body else current.description
        updated = replace(current, name=name, description=description, draft_definition=draft, updated_ms=now_ms())
        return updated, self._upsert(updated)

    def plan_discard_draft(self, workspace_id: str, ca_id: int) -> tuple[CalculatedAttribute, WriteBatch]:
        current = self.get(workspace_id, ca_id)
        if current.draft_definition is None:
            raise NotFound(f"calculated attribute {ca_id} has no draft")
        if not current.is_active:
            raise BadRequest("a never-activated attribute has only its draft; delete the attribute instead",
                             field="draft_definition")
        updated = replace(current, draft_definition=None, updated_ms=now_ms())
        return updated, self._upsert(updated)

    def plan_activate(self, workspace_id: str, ca_id: int, by: str) -> tuple[CalculatedAttribute, WriteBatch]:
        current = self.get(workspace_id, ca_id)
        if current.draft_definition is None:
            raise BadRequest(f"calculated attribute {ca_id} has no draft to activate", field="draft_definition")
        if not current.is_active and len(self.active(workspace_id)) >= MAX_ACTIVE_PER_WORKSPACE:
            raise Conflict(f"this workspace already has {MAX_ACTIVE_PER_WORKSPACE} active calculated attributes")
        stamp = now_ms()
        updated = replace(current, active_definition=current.draft_definition, draft_definition=None,
                          activated_ms=stamp, activated_by=by, updated_ms=stamp)
        return updated, self._upsert(updated)

    def plan_delete(self, workspace_id: str, ca_id: int) -> WriteBatch:
        self.get(workspace_id, ca_id)
        batch = WriteBatch()
        batch.statements.append(lambda cur: cur.execute("DELETE FROM calculated_attributes WHERE id = ?", [ca_id]))
        return batch

    def _free_name(self, workspace_id: str, name: Any) -> str:
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
            raise BadRequest(f"name must be a non-empty string of at most {MAX_NAME} characters", field="name")
        if self.list(workspace_id, name):
            raise Conflict(f"a calculated attribute named {name!r} exists in this workspace")
        return name

    def _upsert(self, ca: CalculatedAttribute) -> WriteBatch:
        batch = WriteBatch()
        row = [ca.id, ca.workspace_id, ca.name, ca.description, _dumps(ca.draft_definition),
               _dumps(ca.active_definition), ca.created_ms, ca.updated_ms, ca.activated_ms, ca.activated_by]
        batch.statements.append(lambda cur: cur.execute(
            "INSERT OR REPLACE INTO calculated_attributes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row))
        return batch


def _definition_json(raw: Any, path: str) -> dict[str, Any]:
    parse_definition(raw, path)  # validates; the JSON as given is what is stored and shown
    return dict(raw)


def _description(body: dict[str, Any]) -> str | None:
    description = body.get("description")
    if description is not None and not isinstance(description, str):
        raise BadRequest("description must be a string", field="description")
    return description


def _dumps(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value)


def _loads(value: str | None) -> dict[str, Any] | None:
    return None if value is None else json.loads(value)
