"""Workspaces: their credentials and settings, kept in memory and written through the group-commit writer."""

from __future__ import annotations

import json
import secrets as stdlib_secrets
from dataclasses import dataclass, field
from typing import Any

import duckdb

from engine.errors import BadRequest, NotFound
from engine.normalize import IdentityNormalizer
from engine.secrets import MasterKey, hash_secret, new_api_key, new_api_secret, secret_matches
from engine.settings import WorkspaceSettings, parse_settings
from engine.store import now_ms
from engine.writer import WriteBatch
from strategies import strategy_for
from strategies.model import IdentityRules, Strategy


@dataclass
class Workspace:
    id: str
    name: str
    api_key: str
    secret_hash: str
    secret_sealed: str
    settings: WorkspaceSettings
    created_ms: int
    updated_ms: int
    normalizer: IdentityNormalizer = field(init=False, repr=False)
    rules: IdentityRules = field(init=False, repr=False)
    strategy: Strategy = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.apply_settings(self.settings)

    def apply_settings(self, settings: WorkspaceSettings) -> None:
        self.settings = settings
        self.normalizer = settings.normalizer()
        self.rules = IdentityRules(settings.identity_priority, frozenset(settings.login_ids),
                                   frozenset(settings.unique_ids), frozenset(settings.immutable_ids))
        self.strategy = strategy_for(settings.strategy)

    @property
    def scope(self) -> str:
        """The identity scope whose graph this workspace resolves against (G-DEF default: the workspace)."""
        return self.id

    def public_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "api_key": self.api_key, "settings": self.settings.to_json(),
                "created_ms": self.created_ms, "updated_ms": self.updated_ms}


@dataclass(frozen=True)
class NewWorkspace:
    workspace: Workspace
    api_secret: str  # shown once, never stored in clear


class WorkspaceRegistry:
    def __init__(self, master_key: MasterKey) -> None:
        self._master_key = master_key
        self._by_id: dict[str, Workspace] = {}
        self._by_key: dict[str, Workspace] = {}

    def load(self, connection: duckdb.DuckDBPyConnection) -> None:
        rows = connection.execute("SELECT id, name, api_key, secret_hash, secret_sealed, settings, created_ms, "
                                  "updated_ms FROM workspaces").fetchall()
        for wid, name, key, shash, sealed, settings, created, updated in rows:
            self.remember(Workspace(wid, name, key, shash, sealed, parse_settings(json.loads(settings)),
                                     created, updated))

    def all(self) -> list[Workspace]:
        return sorted(self._by_id.values(), key=lambda w: w.created_ms)

    def get(self, workspace_id: str) -> Workspace:
        workspace = self._by_id.get(workspace_id)
        if workspace is None:
            raise NotFound(f"workspace {workspace_id} not found", field="workspace_id")
        return workspace

    def by_api_key(self, api_key: str) -> Workspace | None:
        return self._by_key.get(api_key)

    def check_secret(self, workspace: Workspace, secret: str) -> bool:
        return secret_matches(secret, workspace.secret_hash)

    def hmac_secret(self, workspace: Workspace) -> str:
        return self._master_key.unseal(workspace.secret_sealed)

    def plan_create(self, name: Any, raw_settings: Any, *, api_key: str | None = None,
                    api_secret: str | None = None) -> tuple[NewWorkspace, WriteBatch]:
        """Validate and build a workspace; it becomes visible via `remember` once its batch is committed."""
        name = _valid_name(name)
        settings = parse_settings(_settings_object(raw_settings))
        api_key = api_key or new_api_key()
        if api_key in self._by_key:
            raise BadRequest(f"api_key {api_key} is taken", field="api_key")
        api_secret = api_secret or new_api_secret()
        stamp = now_ms()
        workspace = Workspace("ws_" + stdlib_secrets.token_hex(8), name, api_key, hash_secret(api_secret),
                              self._master_key.seal(api_secret), settings, stamp, stamp)
        batch = WriteBatch()
        batch.statements.append(lambda cur: cur.execute(
            "INSERT INTO workspaces VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [workspace.id, workspace.name, workspace.api_key, workspace.secret_hash, workspace.secret_sealed,
             json.dumps(settings.to_json()), stamp, stamp]))
        return NewWorkspace(workspace, api_secret), batch

    def plan_update(self, workspace_id: str, name: Any, raw_settings: Any) -> tuple[Workspace, WriteBatch]:
        current = self.get(workspace_id)
        new_name = current.name if name is None else _valid_name(name)
        settings = current.settings if raw_settings is None else parse_settings(_settings_object(raw_settings))
        stamp = now_ms()
        updated = Workspace(current.id, new_name, current.api_key, current.secret_hash, current.secret_sealed,
                            settings, current.created_ms, stamp)
        batch = WriteBatch()
        batch.statements.append(lambda cur: cur.execute(
            "UPDATE workspaces SET name = ?, settings = ?, updated_ms = ? WHERE id = ?",
            [new_name, json.dumps(settings.to_json()), stamp, workspace_id]))
        return updated, batch

    def remember(self, workspace: Workspace) -> None:
        """Make a committed workspace visible to requests."""
        self._by_id[workspace.id] = workspace
        self._by_key[workspace.api_key] = workspace


def _valid_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise BadRequest("name must be a non-empty string of at most 200 characters", field="name")
    return name.strip()


def _settings_object(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest("settings must be an object", field="settings")
    return raw
