"""Data subject requests (OpenDSR v3, reference §7): accept, keep durably, process after a waiting period, report.

Lifecycle: `submit` validates the request, checks that its identities name at most one profile of the workspace
and stores it `pending`, to be processed once `process_after_ms` has passed: the waiting period (a server
setting, 7 days by default) is the controller's window to cancel, and `skip_waiting_period` makes the request
due at once (the next scheduler run, or a direct `process_due` call). Processing moves it to `in_progress`,
then erases the person (engine/erasure.py) or exports what is held about them (engine/dsr_export.py), and
completes it. Every status change is one writer transaction holding the new status and its callbacks
(engine/dsr_callbacks.py). Only a `pending` request can be cancelled.

Decisions where the sources are silent:
- Identities that match no profile are accepted: the request completes with nothing found (`results_count`
  0, an empty export). Identities matching two profiles, or two identities naming different profiles, are a
  400 naming the identity. The profile is the one found at submission; when there was none, it is looked
  up again at processing (data may have arrived during the waiting period).
- A `subject_request_id` already submitted to the workspace is a 409; GET shows the existing request. The
  same id in another workspace is another controller's request.
- Once a request is completed or cancelled its identities are dropped; only their types stay.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from engine.dsr_callbacks import CallbackOutbox
from engine.dsr_export import read_export
from engine.dsr_keys import ProcessorKeys
from engine.dsr_model import (
    ADVERTISED_TYPES,
    API_VERSION,
    CANCELLED,
    COMPLETED,
    FINAL_STATUSES,
    IN_PROGRESS,
    MPID,
    PENDING,
    REGULATIONS,
    REQUEST_TYPES,
    DsrRecord,
    SubjectIdentity,
    canonical_request_id,
    mpid_of,
    parse_request,
    rfc3339,
)
from engine.dsr_store import (
    database_path,
    insert_export,
    insert_request,
    load_requests,
    read_export_content,
    update_request,
)
from engine.erasure import plan_erasure, read_ledger_values
from engine.errors import BadRequest, Conflict, NotFound, StoreUnavailable
from engine.idsync import IdSyncService
from engine.store import now_ms
from engine.workspaces import Workspace
from engine.writer import WriteBatch
from strategies.model import IdentityKey

log = logging.getLogger("idmesh.dsr")


@dataclass(frozen=True)
class DsrSettings:
    """Server settings (environment): the waiting period, how often the scheduler looks for due work, and
    the URL controllers reach this server at (callbacks name it; its host is the processor domain)."""

    waiting_period_seconds: int = 7 * 86_400
    poll_seconds: float = 30.0
    public_url: str = "http://localhost:8080"

    @property
    def processor_domain(self) -> str:
        return urlsplit(self.public_url).hostname or "localhost"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> DsrSettings:
        defaults = cls()
        return cls(
            waiting_period_seconds=int(_number(environ, "IDMESH_DSR_WAITING_PERIOD_SECONDS",
                                               defaults.waiting_period_seconds)),
            poll_seconds=_number(environ, "IDMESH_DSR_POLL_SECONDS", defaults.poll_seconds),
            public_url=environ.get("IDMESH_PUBLIC_URL", defaults.public_url).rstrip("/"),
        )


def _number(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name} must be a number of seconds >= 0, not {raw!r}")
    return value


class DsrService:
    def __init__(self, service: IdSyncService, keys: ProcessorKeys, settings: DsrSettings) -> None:
        self.service = service
        self.keys = keys
        self.settings = settings
        self.callbacks = CallbackOutbox(service, keys, settings.processor_domain)
        self._requests: dict[tuple[str, str], DsrRecord] = {}
        self._processing = asyncio.Lock()
        self.load()

    @classmethod
    def open(cls, service: IdSyncService, settings: DsrSettings | None = None) -> DsrService:
        settings = settings or DsrSettings.from_env()
        keys = ProcessorKeys.beside(database_path(service.connection), settings.processor_domain)
        return cls(service, keys, settings)

    def load(self) -> None:
        self._requests = {(r.workspace_id, r.subject_request_id): r for r in load_requests(self.service.connection)}

    # --- the API --------------------------------------------------------------------------------------------
    async def submit(self, workspace: Workspace, body: Any) -> DsrRecord:
        new = parse_request(body)
        key = (workspace.id, new.subject_request_id)
        if key in self._requests:
            raise Conflict(f"subject_request_id {new.subject_request_id} was already submitted; GET "
                           f"/v3/requests/{new.subject_request_id} shows it", field="subject_request_id")
        mpid = self._find_profile(workspace, new.identities, strict=True)
        received = now_ms()
        wait_ms = 0 if new.skip_waiting_period else self.settings.waiting_period_seconds * 1000
        record = DsrRecord(workspace.id, new.subject_request_id, new.regulation, new.request_type, PENDING,
                           new.group_id, new.submitted_ms, received, received + wait_ms,
                           {i.dsr_type: i.value for i in new.identities}, [i.dsr_type for i in new.identities], mpid,
                           list(new.status_callback_urls), None, received, None)
        batch = WriteBatch()
        batch.statements.append(insert_request(record))
        self.callbacks.plan(record, self.status_json(record, self.settings.public_url), batch)
        self._requests[key] = record  # before the await: a concurrent duplicate sees it
        try:
            await self.service.commit(batch)
        except StoreUnavailable:
            self._requests.pop(key, None)
            raise
        self.callbacks.kick()
        return record

    async def read(self, workspace: Workspace, request_id: str) -> DsrRecord:
        """The request as it is durably: statuses change in memory just before their commit is awaited (so a
        cancel cannot slip in beside processing), so a reader waits for the commits already queued."""
        await self.service.commit(WriteBatch())
        return self.get(workspace, request_id)

    async def read_all(self, workspace: Workspace, group_id: str | None = None) -> list[DsrRecord]:
        await self.service.commit(WriteBatch())
        return self.in_workspace(workspace, group_id)

    def get(self, workspace: Workspace, request_id: str) -> DsrRecord:
        record = self._requests.get((workspace.id, canonical_request_id(request_id, "subject_request_id")))
        if record is None:
            raise NotFound("no such request in this workspace", field="subject_request_id")
        return record

    def in_workspace(self, workspace: Workspace, group_id: str | None = None) -> list[DsrRecord]:
        return [r for r in self._requests.values()
                if r.workspace_id == workspace.id and (group_id is None or r.group_id == group_id)]

    async def cancel(self, workspace: Workspace, request_id: str) -> DsrRecord:
        record = self.get(workspace, request_id)
        if record.status != PENDING:
            raise Conflict(f"only a pending request can be cancelled; this one is {record.status}",
                           field="subject_request_id")
        self._finish(record, CANCELLED)
        record.mpid = None
        await self._commit_change(record, WriteBatch())
        return record

    async def export(self, workspace: Workspace, request_id: str) -> bytes:
        record = await self.read(workspace, request_id)
        if record.request_type not in ("access", "portability"):
            raise NotFound(f"{record.request_type} requests have no export", field="subject_request_id")
        if record.status != COMPLETED:
            raise Conflict(f"the export is ready once the request is completed; it is {record.status}",
                           field="subject_request_id")
        content = await asyncio.to_thread(read_export_content, self.service.connection, workspace.id,
                                          record.subject_request_id)
        if content is None:
            raise NotFound("the export is gone: the person was erased since", field="subject_request_id")
        return content

    def status_json(self, record: DsrRecord, base_url: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "controller_id": record.workspace_id, "subject_request_id": record.subject_request_id,
            "request_status": record.status, "api_version": API_VERSION,
            "expected_completion_time": rfc3339(record.process_after_ms + int(self.settings.poll_seconds * 1000)),
            "received_time": rfc3339(record.received_ms), "submitted_time": rfc3339(record.submitted_ms),
            "regulation": record.regulation, "subject_request_type": record.request_type,
            "group_id": record.group_id, "subject_identity_types": record.identity_types,
        }
        if record.completed_ms is not None:
            body[f"{record.status}_time"] = rfc3339(record.completed_ms)
        if record.status == COMPLETED and record.request_type in ("access", "portability"):
            body["results_url"] = f"{base_url.rstrip('/')}/v3/requests/{record.subject_request_id}/export"
        if record.results_count is not None:
            body["results_count"] = record.results_count
        return body

    def discovery(self, base_url: str) -> dict[str, Any]:
        types = [MPID, *ADVERTISED_TYPES]
        return {"api_version": API_VERSION, "supported_api_versions": [API_VERSION],
                "supported_identities": [{"identity_type": t, "identity_format": "raw"} for t in types],
                "supported_subject_request_types": list(REQUEST_TYPES), "supported_regulations": list(REGULATIONS),
                "processor_certificate": f"{base_url.rstrip('/')}/v3/processor_certificate.pem"}

    # --- processing -----------------------------------------------------------------------------------------
    async def run_scheduled(self) -> None:
        """The scheduler's job: process due requests, then retry due callbacks."""
        await self.process_due()
        await self.callbacks.deliver_due()

    async def process_due(self, at_ms: int | None = None) -> int:
        """Process every request due at `at_ms` (default now), oldest first; returns how many completed. A
        request left `in_progress` (a failed commit, a crash) is taken up again: erasure and export are
        idempotent."""
        at = now_ms() if at_ms is None else at_ms
        async with self._processing:
            due = sorted((r for r in self._requests.values()
                          if r.status in (PENDING, IN_PROGRESS) and r.process_after_ms <= at),
                         key=lambda r: (r.received_ms, r.subject_request_id))
            done = 0
            for record in due:
                if record.status not in (PENDING, IN_PROGRESS):
                    continue  # cancelled meanwhile
                try:
                    await self._process(record)
                except StoreUnavailable as exc:  # the records were reloaded; the next run starts afresh
                    log.error("processing data subject request %s stopped: %s", record.subject_request_id, exc)
                    break
                except Exception:  # one broken request must not hold up the others; it is retried next run
                    log.exception("processing data subject request %s failed", record.subject_request_id)
                    continue
                done += 1
            return done

    async def _process(self, record: DsrRecord) -> None:
        workspace = self.service.workspaces.get(record.workspace_id)
        if record.status == PENDING:
            record.status, record.updated_ms = IN_PROGRESS, now_ms()
            await self._commit_change(record, WriteBatch())
        if record.request_type == "erasure":
            await self._erase(workspace, record)
        else:
            await self._export(workspace, record)

    async def _erase(self, workspace: Workspace, record: DsrRecord) -> None:
        # no calculated attribute computation runs from before the plan to after the commit: it would conflict
        # with the deletes or write a value for the erased MPID afterwards (engine/computation_gate.py)
        async with self.service.computation_gate.exclusive():
            await self._erase_now(workspace, record)

    async def _erase_now(self, workspace: Workspace, record: DsrRecord) -> None:
        mpid = self._target(workspace, record)
        ledger = [] if mpid is None else await asyncio.to_thread(read_ledger_values, self.service.connection, mpid)
        batch = WriteBatch()
        erased = mpid is not None and self.service.graph(workspace).get(mpid) is not None
        if erased:
            plan, batch = plan_erasure(self.service, workspace, mpid, self._identity_keys(workspace, record), ledger,
                                       record.subject_request_id)
            for other in self._requests.values():  # the person's identities or MPID in other requests go too
                if other is not record and (other.mpid == mpid or self._names_any(other, plan.scope, plan.erased)):
                    other.mpid, other.identities = None, None
                    batch.statements.append(update_request(other))
        self._finish(record, COMPLETED)
        record.mpid, record.results_count = None, int(erased)  # profiles erased: 1, or 0 when none was found
        await self._commit_change(record, batch, erasure=True)

    async def _export(self, workspace: Workspace, record: DsrRecord) -> None:
        mpid = self._target(workspace, record)
        export = await asyncio.to_thread(read_export, self.service.connection, workspace, record, mpid)
        self._finish(record, COMPLETED)
        record.mpid, record.results_count = mpid, export.results_count
        batch = WriteBatch()
        batch.statements.append(insert_export(record, mpid, record.completed_ms or now_ms(), export.content))
        await self._commit_change(record, batch)

    def _finish(self, record: DsrRecord, status: str) -> None:
        assert status in FINAL_STATUSES
        record.status = status
        record.updated_ms = record.completed_ms = now_ms()
        record.identities = None

    async def _commit_change(self, record: DsrRecord, batch: WriteBatch, erasure: bool = False) -> None:
        """Commit `record`'s new status with its callbacks. On failure memory is read back from the database."""
        batch.statements.append(update_request(record))
        self.callbacks.plan(record, self.status_json(record, self.settings.public_url), batch)
        try:
            await self.service.commit(batch)
        except StoreUnavailable:
            self.load()
            if erasure:  # the graphs were rebuilt by commit(); the rest of what plan_erasure changed is here
                self.service.aliases.load(self.service.connection)
                self.service.tombstones.load(self.service.connection)
            raise
        self.callbacks.kick()

    # --- which profile ----------------------------------------------------------------------------------------
    def _target(self, workspace: Workspace, record: DsrRecord) -> int | None:
        """The profile found at submission if it still exists; else a fresh look-up (None: nothing found)."""
        graph = self.service.graph(workspace)
        if record.mpid is not None:
            return record.mpid if graph.get(record.mpid) is not None else None
        return self._find_profile(workspace, record.subject_identities(), strict=False)

    def _find_profile(self, workspace: Workspace, identities: tuple[SubjectIdentity, ...], strict: bool
                      ) -> int | None:
        """The one profile the identities name, or None. `strict` (submission) makes every ambiguity a 400
        naming the identity; otherwise an ambiguous request finds nothing."""
        graph = self.service.graph(workspace)
        found: int | None = None
        for identity in identities:
            where = f"subject_identities.{identity.dsr_type}"
            if identity.wire_type is None:
                mpid = mpid_of(identity)
                holders: tuple[int, ...] = (mpid,) if graph.get(mpid) is not None else ()
            elif identity.wire_type not in workspace.settings.identity_priority:
                holders = ()  # the workspace never stores this type
            else:
                value = workspace.normalizer.normalize(identity.wire_type, identity.value)
                if value is None and strict:
                    raise BadRequest(f"{where}.value is empty or a blocked value", field=f"{where}.value")
                holders = graph.holders(identity.wire_type, value) if value is not None else ()
            if len(holders) > 1 or (holders and found is not None and holders[0] != found):
                if not strict:
                    return None
                what = f"matches {len(holders)} profiles" if len(holders) > 1 else \
                    "names another profile than the identities before it"
                raise BadRequest(f"{where} {what}: a request must name exactly one person", field=where)
            if holders:
                found = holders[0]
        return found

    def _identity_keys(self, workspace: Workspace, record: DsrRecord) -> set[IdentityKey]:
        keys = set()
        for identity in record.subject_identities():
            if identity.wire_type is not None:
                value = workspace.normalizer.normalize(identity.wire_type, identity.value)
                if value is not None:
                    keys.add((identity.wire_type, value))
        return keys

    def _names_any(self, record: DsrRecord, scope: str, keys: set[IdentityKey]) -> bool:
        if record.identities is None:
            return False
        workspace = self.service.workspaces.get(record.workspace_id)
        return workspace.scope == scope and not keys.isdisjoint(self._identity_keys(workspace, record))
