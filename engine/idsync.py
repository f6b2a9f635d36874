"""The IDSync service: resolves identify/login/logout/search/modify against the in-memory graphs, applies the
strategy's decision, and makes it durable through group commit before anyone is answered.

Each public coroutine does all graph work synchronously (no await between reading and changing the graph, so
requests are atomic on the event loop) and then awaits the commit of its `WriteBatch`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import duckdb

from engine import journal
from engine.aliasing import AliasLedger, AliasRecord, plan_processing, plan_unalias
from engine.computation_gate import ComputationGate
from engine.errors import BadRequest, Forbidden, LookupFailed, NotFound, StoreUnavailable
from engine.graph import IdentityGraph, ProfileRecord
from engine.graph_loader import build_graphs
from engine.identity_types import ALL_IDENTITY_TYPES
from engine.secrets import MasterKey
from engine.store import fold_journal_at_start, now_ms, open_database, read_graph_snapshot
from engine.tombstones import TombstoneIndex
from engine.workspaces import Workspace, WorkspaceRegistry
from engine.writer import GroupCommitWriter, WriteBatch
from strategies.lookup import priority_walk
from strategies.model import Decision, IdentityKey, MissingLoginIdentity, Operation, ProfileView, ResolveInput

log = logging.getLogger("idmesh.idsync")


@dataclass(frozen=True)
class IdentityAnswer:
    mpid: int
    is_logged_in: bool
    matched_identities: dict[str, str]


@dataclass(frozen=True)
class ChangeResult:
    identity_type: str
    modified_mpid: int


@dataclass
class ParsedIdentities:
    normalized: dict[str, str] = field(default_factory=dict)
    raw: dict[str, str] = field(default_factory=dict)


class RequestContext:
    """Who asked what, for the ledger."""

    def __init__(self, workspace: Workspace, operation: str, request_id: str | None) -> None:
        self.workspace = workspace
        self.operation = operation
        self.request_id = request_id
        self.at_ms = now_ms()
        self.batch = WriteBatch()

    def ledger(self, mpid: int, change: str, reason: str, key: IdentityKey | None = None,
               other_mpid: int | None = None) -> None:
        identity_type, value = key if key else (None, None)
        self.batch.add(journal.CHANGE, (self.at_ms, self.workspace.scope, self.workspace.id, self.request_id,
                                   self.operation, self.workspace.settings.strategy, mpid, change, identity_type,
                                   value, reason, other_mpid))


class IdSyncService:
    def __init__(self, connection: duckdb.DuckDBPyConnection, master_key: MasterKey) -> None:
        self.connection = connection
        self.master_key = master_key  # seals stored secrets: API secrets here, output credentials in audiences
        self.writer = GroupCommitWriter(connection)
        self.workspaces = WorkspaceRegistry(master_key)
        self.workspaces.load(connection)
        self.graphs: dict[str, IdentityGraph] = {}
        self.reload_graphs()
        self.aliases = AliasLedger()
        self.aliases.load(connection)
        self.tombstones = TombstoneIndex(master_key.derive("erasure tombstones"))
        self.tombstones.load(connection)
        # computations writing per-profile rows outside the group commit share it; erasures hold it alone
        self.computation_gate = ComputationGate()
        self._closed = False

    @classmethod
    def open(cls, db_path: str) -> IdSyncService:
        connection = open_database(db_path)
        fold_journal_at_start(connection)
        return cls(connection, MasterKey.for_database(db_path))

    def close(self) -> None:
        """Commit what is queued, checkpoint and close; closing again does nothing. The explicit checkpoint
        empties the WAL even when something still holds the database open (an unread Arrow stream keeps
        DuckDB from checkpointing at close), so the next start has nothing to replay."""
        if self._closed:
            return
        self._closed = True
        self.writer.close()
        try:
            self.connection.execute("CHECKPOINT")
        except duckdb.Error as exc:  # e.g. a database DuckDB invalidated: the next start replays its WAL
            log.warning("no checkpoint at close: %s", exc)
        self.connection.close()
        gc.unfreeze()  # build_graphs froze the graph; let the collector have it back

    def reload_graphs(self) -> None:
        """Rebuild the graphs from what is committed (start-up, and after a failed commit)."""
        snapshot = read_graph_snapshot(self.connection)
        try:
            self.graphs = build_graphs(snapshot)
        finally:
            snapshot.close()

    def graph(self, workspace: Workspace) -> IdentityGraph:
        graph = self.graphs.get(workspace.scope)
        if graph is None:
            graph = self.graphs[workspace.scope] = IdentityGraph(workspace.scope)
        return graph

    async def commit(self, batch: WriteBatch) -> None:
        """Wait until `batch` is durable. On a failed commit the graphs are rebuilt from the database, so
        nothing unacknowledged survives in memory, and the caller gets a 503."""
        try:
            await asyncio.wrap_future(self.writer.submit(batch))
        except Exception as exc:
            if self.writer.failed is not None:
                self.reload_graphs()
                self.writer.recover()
            raise StoreUnavailable(f"the write could not be made durable: {exc}") from None

    # --- identify / login / logout -----------------------------------------------------------------------
    async def resolve(self, workspace: Workspace, operation: Operation, known_identities: Any,
                      previous_mpid: Any = None, request_id: str | None = None, read_only: bool = False
                      ) -> IdentityAnswer:
        answer, batch = self.plan_resolve(workspace, operation, known_identities, previous_mpid, request_id,
                                          read_only)
        await self.commit(batch)
        return answer

    def plan_resolve(self, workspace: Workspace, operation: Operation, known_identities: Any,
                     previous_mpid: Any = None, request_id: str | None = None, read_only: bool = False,
                     identities_path: str = "known_identities") -> tuple[IdentityAnswer, WriteBatch]:
        parsed = self.parse_identities(workspace, known_identities, identities_path)
        graph = self.graph(workspace)
        request = self._resolve_input(workspace, graph, operation, parsed, _parse_mpid(previous_mpid))
        try:
            decision = workspace.strategy.decide(request)
        except MissingLoginIdentity as exc:
            raise LookupFailed(str(exc), field="known_identities") from None
        context = RequestContext(workspace, operation.value, request_id)
        if read_only:
            if decision.mpid is None:
                raise NotFound("read_only: no existing profile matches; this request would create one")
            return self._answer(workspace, graph.profiles[decision.mpid], parsed), context.batch
        record = self._apply_decision(context, graph, decision, parsed)
        return self._answer(workspace, record, parsed, before=decision.add), context.batch

    def parse_identities(self, workspace: Workspace, known_identities: Any, path: str = "known_identities"
                         ) -> ParsedIdentities:
        if not isinstance(known_identities, Mapping):
            raise BadRequest(f"{path} must be an object of identity type -> value", field=path)
        parsed = ParsedIdentities()
        for identity_type, raw in known_identities.items():
            if identity_type not in ALL_IDENTITY_TYPES:
                raise BadRequest(f"{path}.{identity_type} is not an identity type", field=f"{path}.{identity_type}")
            if raw is not None and not isinstance(raw, (str, int)):
                raise BadRequest(f"{path}.{identity_type} must be a string", field=f"{path}.{identity_type}")
            if identity_type not in workspace.settings.identity_priority:
                continue  # B§8: profiles hold only the types of the workspace's identity hierarchy
            value = workspace.normalizer.normalize(identity_type, raw)
            if value is not None and self.tombstones.holds(workspace.scope, identity_type, value):
                continue  # erased by a data subject request: ignored like a blocked value (engine/tombstones.py)
            if value is not None:
                parsed.normalized[identity_type] = value
                parsed.raw[identity_type] = str(raw)
        if not parsed.normalized:
            raise BadRequest(f"{path} must include at least one identifier that is not empty or blocked",
                             field=path)
        return parsed

    def _resolve_input(self, workspace: Workspace, graph: IdentityGraph, operation: Operation,
                       parsed: ParsedIdentities, previous_mpid: int | None) -> ResolveInput:
        views: dict[int, ProfileView] = {}

        def view(mpid: int) -> ProfileView:
            found = views.get(mpid)
            if found is None:
                found = views[mpid] = graph.profiles[mpid].view()
            return found

        matches = {}
        for identity_type, value in parsed.normalized.items():
            if (identity_type, value) in graph.quarantined:
                continue
            holders = graph.holders(identity_type, value)
            if holders:
                matches[identity_type] = tuple(view(m) for m in holders)
        previous_record = graph.get(previous_mpid) if previous_mpid else None
        previous = view(previous_mpid) if previous_record and not previous_record.orphaned else None
        return ResolveInput(operation, parsed.normalized, matches, previous, workspace.rules)

    def _apply_decision(self, context: RequestContext, graph: IdentityGraph, decision: Decision,
                        parsed: ParsedIdentities) -> ProfileRecord:
        at = context.at_ms
        if decision.mpid is None:
            record = ProfileRecord(self._new_mpid(), at, at)
            graph.add_profile(record)
            context.batch.add(journal.PROFILE, (graph.scope, record.mpid, at, at, at, "active"))
            context.ledger(record.mpid, "create", decision.reason)
        else:
            record = graph.profiles[decision.mpid]
            record.last_seen_ms = max(record.last_seen_ms, at)
            context.batch.add(journal.TOUCH, (record.mpid, record.last_seen_ms))
        for key in decision.add:
            self._add_identity(context, graph, record, key, parsed.raw[key[0]], decision.reason)
        for key, why in decision.skipped:
            context.ledger(record.mpid, "skip", why, key)
        return record

    def _add_identity(self, context: RequestContext, graph: IdentityGraph, record: ProfileRecord,
                      key: IdentityKey, raw: str, reason: str) -> None:
        identity_type, value = key
        graph.add_identity(record.mpid, identity_type, value)
        context.batch.add(journal.IDENTITY_ADD, (graph.scope, record.mpid, identity_type, value, raw, context.at_ms))
        context.ledger(record.mpid, "add", reason, key)
        if record.orphaned:
            record.orphaned = False
            context.batch.add(journal.STATUS, (record.mpid, "active"))
        self._guard_hub(context, graph, key)

    def _guard_hub(self, context: RequestContext, graph: IdentityGraph, key: IdentityKey) -> None:
        """A2.14: a non-unique value shared by more profiles than the hub limit stops being used to match."""
        workspace = context.workspace
        if key[0] in workspace.rules.unique_ids or key in graph.quarantined:
            return
        count = graph.holder_count(*key)
        if count > workspace.settings.hub_limit:
            graph.quarantined.add(key)
            context.batch.add(journal.HUB, (graph.scope, key[0], key[1], count, context.at_ms))
            for mpid in graph.holders(*key):
                context.ledger(mpid, "quarantine", f"value shared by {count} profiles (hub limit "
                               f"{workspace.settings.hub_limit}): no longer used to match", key)

    def _remove_identity(self, context: RequestContext, graph: IdentityGraph, record: ProfileRecord,
                         key: IdentityKey, change: str, reason: str, other_mpid: int | None = None) -> None:
        graph.remove_identity(record.mpid, *key)
        context.batch.add(journal.IDENTITY_REMOVE, (graph.scope, record.mpid, key[0], key[1]))
        context.ledger(record.mpid, change, reason, key, other_mpid)

    def _new_mpid(self) -> int:
        while True:
            mpid = secrets.randbits(64) - (1 << 63)
            if mpid != 0 and not any(mpid in g.profiles for g in self.graphs.values()):
                return mpid

    def _answer(self, workspace: Workspace, record: ProfileRecord, parsed: ParsedIdentities,
                before: tuple[IdentityKey, ...] = ()) -> IdentityAnswer:
        held = set(record.identity_keys()) - set(before)
        matched = {t: parsed.raw[t] for t, v in parsed.normalized.items() if (t, v) in held}
        logged_in = any(t in workspace.rules.login_ids for t, _ in record.identity_keys())
        return IdentityAnswer(record.mpid, logged_in, matched)

    # --- search ------------------------------------------------------------------------------------------
    async def search(self, workspace: Workspace, known_identities: Any) -> IdentityAnswer:
        """A2.6: read-only priority lookup without the login-ID gate; never creates."""
        parsed = self.parse_identities(workspace, known_identities)
        graph = self.graph(workspace)
        request = self._resolve_input(workspace, graph, Operation.IDENTIFY, parsed, None)
        match = priority_walk(request, lambda profile: True)
        if match is None:
            raise NotFound("no profile matches these identities")
        answer = self._answer(workspace, graph.profiles[match.mpid], parsed)
        await self.commit(WriteBatch())  # answer only what is durable
        return answer

    # --- modify ------------------------------------------------------------------------------------------
    async def modify(self, workspace: Workspace, mpid: Any, changes: Any, request_id: str | None = None
                     ) -> list[ChangeResult]:
        results, batch = self.plan_modify(workspace, mpid, changes, request_id)
        await self.commit(batch)
        return results

    def plan_modify(self, workspace: Workspace, mpid: Any, changes: Any, request_id: str | None = None
                    ) -> tuple[list[ChangeResult], WriteBatch]:
        graph = self.graph(workspace)
        target_mpid = _parse_mpid(mpid)
        record = graph.get(target_mpid) if target_mpid else None
        if record is None:
            raise LookupFailed(f"no profile with mpid {mpid} in this workspace", field="mpid")
        planned = self._validate_changes(workspace, graph, record, changes)
        context = RequestContext(workspace, "modify", request_id)
        record.last_seen_ms = max(record.last_seen_ms, context.at_ms)
        context.batch.add(journal.TOUCH, (record.mpid, record.last_seen_ms))
        multi_valued = workspace.settings.strategy == "best_match"
        for identity_type, old, new, raw_new in planned:
            held = set(record.identity_keys())
            if old is not None and old != new and (identity_type, old) in held:
                self._remove_identity(context, graph, record, (identity_type, old), "remove",
                                      "modify: old value removed")
            if new is None or (identity_type, new) in held:
                continue
            if identity_type in workspace.rules.unique_ids:
                if not multi_valued:
                    for other_type, other_value in list(record.identity_keys()):
                        if other_type == identity_type:
                            self._remove_identity(context, graph, record, (other_type, other_value), "remove",
                                                  "modify: replaced by the new unique value")
                self._steal(context, graph, record, (identity_type, new))
            self._add_identity(context, graph, record, (identity_type, new), raw_new, "modify")
        return [ChangeResult(t, record.mpid) for t, _, _, _ in planned], context.batch

    def _steal(self, context: RequestContext, graph: IdentityGraph, winner: ProfileRecord, key: IdentityKey
               ) -> None:
        """B§8: modify takes a unique value from every other profile; one left with nothing is orphaned."""
        for loser_mpid in graph.holders(*key):
            if loser_mpid == winner.mpid:
                continue
            loser = graph.profiles[loser_mpid]
            self._remove_identity(context, graph, loser, key, "steal",
                                  f"unique {key[0]} taken by profile {winner.mpid} in modify", winner.mpid)
            if not loser.identities:
                loser.orphaned = True
                context.batch.add(journal.STATUS, (loser_mpid, "orphaned"))
                context.ledger(loser_mpid, "orphan", "lost its last identifier to a unique-id steal",
                               other_mpid=winner.mpid)

    def _validate_changes(self, workspace: Workspace, graph: IdentityGraph, record: ProfileRecord, changes: Any
                          ) -> list[tuple[str, str | None, str | None, str]]:
        """Check every change before applying any, so a bad request changes nothing."""
        if not isinstance(changes, list) or not changes:
            raise BadRequest("identity_changes must be a non-empty list", field="identity_changes")
        planned = []
        held_types = {t: v for t, v in record.identity_keys()}
        for i, change in enumerate(changes):
            path = f"identity_changes[{i}]"
            if not isinstance(change, Mapping):
                raise BadRequest(f"{path} must be an object", field=path)
            identity_type = change.get("identity_type")
            if not isinstance(identity_type, str) or identity_type not in ALL_IDENTITY_TYPES:  # a list is unhashable
                raise BadRequest(f"{path}.identity_type {identity_type!r} is not an identity type",
                                 field=f"{path}.identity_type")
            if identity_type not in workspace.settings.identity_priority:
                raise BadRequest(f"{path}.identity_type {identity_type} is not in this workspace's identity "
                                 "priority", field=f"{path}.identity_type")
            for side in ("old_value", "new_value"):
                value = change.get(side)
                if value is not None and not isinstance(value, (str, int)) or isinstance(value, bool):
                    raise BadRequest(f"{path}.{side} must be a string or null", field=f"{path}.{side}")
            old = workspace.normalizer.normalize(identity_type, change.get("old_value"))
            raw_new = change.get("new_value")
            new = workspace.normalizer.normalize(identity_type, raw_new)
            if new is not None and self.tombstones.holds(workspace.scope, identity_type, new):
                new = None  # erased by a data subject request: refused like a blocked value
            if raw_new is not None and new is None:
                raise BadRequest(f"{path}.new_value is empty or a blocked value", field=f"{path}.new_value")
            if identity_type in workspace.rules.immutable_ids and identity_type in held_types \
                    and new != held_types[identity_type]:
                raise BadRequest(f"{path}: {identity_type} is immutable and this profile already holds one",
                                 field=f"{path}.identity_type")
            if identity_type in workspace.rules.immutable_ids and new is not None \
                    and any(m != record.mpid for m in graph.holders(identity_type, new)):
                # taking it would modify the holder's immutable id
                raise BadRequest(f"{path}.new_value: this immutable {identity_type} belongs to another profile",
                                 field=f"{path}.new_value")
            planned.append((identity_type, old, new, "" if raw_new is None else str(raw_new)))
        return planned

    # --- alias -------------------------------------------------------------------------------------------
    async def alias(self, workspace: Workspace, body: Any) -> AliasRecord:
        if not workspace.strategy.allows_alias:
            raise Forbidden(f"aliasing is not allowed under the {workspace.settings.strategy} strategy")
        graph = self.graph(workspace)
        request_id = body.get("request_id") if isinstance(body, Mapping) else None
        record, batch = self.aliases.plan(workspace, body, lambda mpid: mpid in graph.profiles,
                                          request_id if isinstance(request_id, str) else None)
        due_now = record.process_after_ms <= now_ms()
        if due_now:
            plan_processing(record, batch)
        self.aliases.remember(record)  # before the await, so a concurrent alias sees it for the rules
        try:
            await self.commit(batch)
        except StoreUnavailable:
            self.aliases.load(self.connection)
            raise
        if due_now:
            record.status = "processed"
        return record

    async def unalias(self, workspace: Workspace, body: Any) -> list[AliasRecord]:
        """Undo aliases (idmesh extension): remove exactly the events they copied and restore first-seen."""
        records = self.aliases.find_for_unalias(workspace.id, body)
        batch = WriteBatch()
        for record in records:
            plan_unalias(record, batch)
        await self.commit(batch)
        for record in records:
            record.status = "unaliased"
        return records

    async def process_due_aliases(self) -> int:
        """Process the aliases whose delay has passed; run by the scheduler. Returns how many."""
        due = self.aliases.due(now_ms())
        if not due:
            return 0
        batch = WriteBatch()
        for record in due:
            plan_processing(record, batch)
        await self.commit(batch)
        for record in due:
            record.status = "processed"
        return len(due)


def _parse_mpid(value: Any) -> int | None:
    """MPIDs arrive as JSON numbers (Android) or strings (iOS, web); anything else is treated as absent."""
    if value is None or isinstance(value, bool):
        return None
    try:
        mpid = int(value)
    except (TypeError, ValueError):
        return None
    if mpid == 0 or not -(1 << 63) <= mpid < (1 << 63):
        return None
    return mpid
