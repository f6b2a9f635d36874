"""Alias requests: validation, the rules of spec B§10, the alias ledger, and processing.

Rule violations are answered with a 400 at once instead of mParticle's silent drop after 24 h: an app
developer learns about the mistake while the request is in front of them. An alias is processed once
`settings.alias.delay_seconds` have passed (at once by default): the source's events inside the window are
copied to the destination (each copy names the alias, `events.alias_id`) and the source's first-seen
overwrites the destination's. Identities, attributes and consent are never copied (B§10). `unalias` (an
idmesh extension) deletes exactly those copies and puts the destination's first-seen back; an alias still
pending is simply cancelled. Both are recorded in `alias_effects`.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import duckdb

from engine import journal
from engine.errors import BadRequest, NotFound
from engine.event_batches import MAX_TIMESTAMP_MS
from engine.store import now_ms
from engine.workspaces import Workspace
from engine.writer import WriteBatch

DAY_MS = 86_400_000


@dataclass
class AliasRecord:
    alias_id: str
    workspace_id: str
    source_mpid: int
    destination_mpid: int
    start_ms: int
    end_ms: int
    process_after_ms: int
    status: str = "pending"


class AliasLedger:
    def __init__(self) -> None:
        self._records: list[AliasRecord] = []

    def load(self, connection: duckdb.DuckDBPyConnection) -> None:
        rows = connection.execute("SELECT alias_id, workspace_id, source_mpid, destination_mpid, start_ms, end_ms, "
                                  "process_after_ms, status FROM aliases ORDER BY received_ms").fetchall()
        self._records = [AliasRecord(*row) for row in rows]

    def for_workspace(self, workspace_id: str) -> list[AliasRecord]:
        return [r for r in self._records if r.workspace_id == workspace_id]

    def involving(self, workspace_id: str, mpid: int) -> list[AliasRecord]:
        return [r for r in self.for_workspace(workspace_id) if mpid in (r.source_mpid, r.destination_mpid)]

    def find_for_unalias(self, workspace_id: str, body: Any) -> list[AliasRecord]:
        """The aliases an unalias request names: `alias_id`, or every standing alias of a source/destination pair."""
        if not isinstance(body, Mapping):
            raise BadRequest("the body must be an object with alias_id or data.source_mpid/destination_mpid",
                             field="body")
        standing = [r for r in self.for_workspace(workspace_id) if r.status != "unaliased"]
        alias_id = body.get("alias_id")
        if alias_id is not None:
            found = [r for r in standing if r.alias_id == alias_id]
            if not found:
                raise NotFound(f"no standing alias {alias_id!r} in this workspace")
            return found
        data = body.get("data")
        if not isinstance(data, Mapping):
            raise BadRequest("give alias_id, or data with source_mpid and destination_mpid", field="data")
        source, destination = _mpid(data, "source_mpid"), _mpid(data, "destination_mpid")
        found = [r for r in standing if r.source_mpid == source and r.destination_mpid == destination]
        if not found:
            raise NotFound(f"no standing alias from {source} to {destination} in this workspace")
        return found

    def plan(self, workspace: Workspace, body: Any, profile_exists: Any, request_id: str | None = None
             ) -> tuple[AliasRecord, WriteBatch]:
        data = body.get("data") if isinstance(body, Mapping) else None
        if not isinstance(data, Mapping):
            raise BadRequest("data must be an object with source_mpid and destination_mpid", field="data")
        source = _mpid(data, "source_mpid")
        destination = _mpid(data, "destination_mpid")
        if source == destination:
            raise BadRequest("data.source_mpid and data.destination_mpid must differ", field="data.source_mpid")
        now = now_ms()
        window_start = now - workspace.settings.alias.max_window_days * DAY_MS
        start = _time(data, "start_unixtime_ms", window_start)
        end = _time(data, "end_unixtime_ms", now)
        if start > end:
            raise BadRequest("data.start_unixtime_ms must not be after data.end_unixtime_ms",
                             field="data.start_unixtime_ms")
        if end < window_start:
            raise BadRequest(f"the alias window ends before the {workspace.settings.alias.max_window_days}-day "
                             "limit", field="data.end_unixtime_ms")
        start = max(start, window_start)
        for field_name, mpid in (("data.source_mpid", source), ("data.destination_mpid", destination)):
            if not profile_exists(mpid):
                raise BadRequest(f"{field_name} {mpid} is not a profile of this workspace", field=field_name)
        self._check_rules(workspace.id, source, destination, start, end)
        record = AliasRecord("al_" + secrets.token_hex(8), workspace.id, source, destination, start, end,
                             now + workspace.settings.alias.delay_seconds * 1000)
        batch = WriteBatch()
        batch.add(journal.ALIAS, (record.alias_id, workspace.id, request_id, source, destination, start, end,
                              data.get("scope") if isinstance(data.get("scope"), str) else None,
                              body.get("environment") if isinstance(body.get("environment"), str) else None,
                              now, record.process_after_ms, "pending", None))
        return record, batch

    def due(self, at_ms: int) -> list[AliasRecord]:
        return [r for r in self._records if r.status == "pending" and r.process_after_ms <= at_ms]

    def remember(self, record: AliasRecord) -> None:
        self._records.append(record)

    def forget_profile(self, mpid: int) -> None:
        """Drop every alias naming `mpid` (its erasure deletes them), so none is processed afterwards."""
        self._records = [r for r in self._records if mpid not in (r.source_mpid, r.destination_mpid)]

    def _check_rules(self, workspace_id: str, source: int, destination: int, start: int, end: int) -> None:
        for earlier in self.for_workspace(workspace_id):
            if earlier.status == "unaliased":
                continue
            if earlier.source_mpid == source and earlier.start_ms <= end and start <= earlier.end_ms:
                raise BadRequest(f"profile {source} was already the source of an alias overlapping this window",
                                 field="data.start_unixtime_ms")
            if earlier.destination_mpid == source:
                raise BadRequest(f"profile {source} was the destination of an earlier alias and cannot be a source",
                                 field="data.source_mpid")
            if earlier.source_mpid == destination:
                raise BadRequest(f"profile {destination} was the source of an earlier alias and cannot be a "
                                 "destination", field="data.destination_mpid")


def _mpid(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key)
    try:
        mpid = int(value) if not isinstance(value, bool) and isinstance(value, (int, str)) else None
    except ValueError:
        mpid = None
    if not mpid or not -(1 << 63) <= mpid < (1 << 63):
        raise BadRequest(f"data.{key} must be a non-zero 64-bit MPID", field=f"data.{key}")
    return mpid


def _time(data: Mapping[str, Any], key: str, default: int) -> int:
    value = data.get(key)
    if value is None or value == 0:
        return default  # Android omits a zero time; both mean "use the default"
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TIMESTAMP_MS:
        raise BadRequest(f"data.{key} must be a unix time in milliseconds", field=f"data.{key}")
    return value


_COPY_COLUMNS = ("batch_id, event_index, event_type, event_name, custom_event_type, timestamp_ms, received_ms, "
                 "session_uuid, session_id, event_id, source_message_id, environment, custom_attributes, data, arrival")


def plan_processing(record: AliasRecord, batch: WriteBatch) -> None:
    """Add to `batch` what processing `record` writes; the caller marks it processed once committed."""
    processed_at = now_ms()

    def copy_events_and_first_seen(cur: duckdb.DuckDBPyConnection) -> None:
        # fold_first (below): the base tables hold every committed row when this runs
        before = cur.execute("SELECT first_seen_ms FROM profiles_base WHERE mpid = ?",
                             [record.destination_mpid]).fetchone()
        copied = cur.execute(f"""INSERT INTO events_base (workspace_id, mpid, {_COPY_COLUMNS}, copied_from_mpid, alias_id)
                                 SELECT workspace_id, ?, {_COPY_COLUMNS}, mpid, ? FROM events_base
                                 WHERE workspace_id = ? AND mpid = ? AND timestamp_ms BETWEEN ? AND ?""",
                             [record.destination_mpid, record.alias_id, record.workspace_id, record.source_mpid,
                              record.start_ms, record.end_ms]).fetchone()[0]
        cur.execute("""UPDATE profiles_base SET first_seen_ms = source.first_seen_ms
                       FROM (SELECT first_seen_ms FROM profiles_base WHERE mpid = ?) AS source
                       WHERE profiles_base.mpid = ?""", [record.source_mpid, record.destination_mpid])
        cur.execute("UPDATE aliases_base SET status = 'processed', processed_ms = ? WHERE alias_id = ?",
                    [processed_at, record.alias_id])
        _record_effect(cur, record, "processed", processed_at, copied, before[0] if before else None)

    batch.statements.append(copy_events_and_first_seen)
    batch.fold_first = True


def plan_unalias(record: AliasRecord, batch: WriteBatch) -> None:
    """Add to `batch` what undoing `record` writes; the caller marks it unaliased once committed."""
    at = now_ms()

    def remove_copies(cur: duckdb.DuckDBPyConnection) -> None:
        removed = cur.execute("DELETE FROM events_base WHERE alias_id = ? AND workspace_id = ?",
                              [record.alias_id, record.workspace_id]).fetchone()[0]
        cur.execute("""UPDATE profiles_base SET first_seen_ms = effect.destination_first_seen_before_ms
                       FROM (SELECT destination_first_seen_before_ms FROM alias_effects
                             WHERE alias_id = ? AND action = 'processed') AS effect
                       WHERE profiles_base.mpid = ? AND effect.destination_first_seen_before_ms IS NOT NULL""",
                    [record.alias_id, record.destination_mpid])
        cur.execute("UPDATE aliases_base SET status = 'unaliased', processed_ms = ? WHERE alias_id = ?",
                    [at, record.alias_id])
        _record_effect(cur, record, "unaliased", at, removed, None)

    batch.statements.append(remove_copies)
    batch.fold_first = True


def _record_effect(cur: duckdb.DuckDBPyConnection, record: AliasRecord, action: str, at: int, events: int,
                   first_seen_before: int | None) -> None:
    cur.execute("INSERT INTO alias_effects VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [record.alias_id, record.workspace_id, action, at, record.source_mpid, record.destination_mpid,
                 events, first_seen_before])
