"""Event ingestion: Events API batches -> profile (MPID), events, user attributes and consent, durably.

Data flow (DESIGN §2): validate -> de-duplicate -> resolve the MPID (the batch's `mpid`, which must name a
profile, else an identify with the workspace strategy from its identities) -> journal rows -> group commit.
A bulk request plans every batch on its own (a bad batch is rejected alone and writes nothing) and commits
the accepted ones together; every answer waits for that commit, so 202 means durable.

Replays: a batch whose `batch_id` or `source_request_id` was seen before in the workspace is acknowledged and
stores nothing. The keys seen are kept in memory as 64-bit digests (about 60 bytes each) and reloaded from
the `batches` table at start-up.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

import orjson

from engine import event_journal, journal
from engine.errors import BadRequest, IdmeshError, PayloadTooLarge, StoreUnavailable
from engine.event_batches import ParsedBatch, parse_batch
from engine.idsync import IdSyncService
from engine.store import now_ms
from engine.workspaces import Workspace
from engine.writer import WriteBatch
from strategies.model import Operation

MAX_REQUEST_BYTES = 256 * 1024
MAX_BATCH_BYTES = 128 * 1024
MAX_BULK_BATCHES = 100


@dataclass(frozen=True)
class BatchOutcome:
    index: int
    status: str                      # accepted, duplicate or rejected
    batch_id: str | None = None
    mpid: int | None = None
    error: IdmeshError | None = None

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"index": self.index, "status": self.status}
        if self.batch_id is not None:
            body["batch_id"] = self.batch_id
        if self.mpid is not None:
            body["mpid"] = str(self.mpid)
        if self.error is not None:
            body["error"] = {"code": self.error.code, "message": self.error.message, "field": self.error.field}
        return body


def _replay_key(workspace_id: str, kind: str, value: str) -> int:
    digest = hashlib.blake2b(f"{workspace_id}\x00{kind}\x00{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)  # a BIGINT column holds it


class EventIngestor:
    def __init__(self, service: IdSyncService) -> None:
        self.service = service
        self._seen: set[int] = set()
        self.load_replay_keys()

    def load_replay_keys(self) -> None:
        """The batches carry their replay keys, so start-up reads two integer columns, not every id."""
        cursor = self.service.connection.cursor()
        try:
            # erased_replay_keys: the keys of batches an erasure deleted (engine/erasure.py), still replays
            table = cursor.sql("SELECT batch_key AS key FROM batches UNION ALL "
                               "SELECT request_key FROM batches WHERE request_key IS NOT NULL UNION ALL "
                               "SELECT replay_key FROM erased_replay_keys").to_arrow_table()
            self._seen = set(table.column("key").to_pylist())
        finally:
            cursor.close()

    async def ingest(self, workspace: Workspace, batches: list[Any], source: str,
                     sizes: list[int] | None = None) -> list[BatchOutcome]:
        """Store each batch or reject it alone; returns one outcome per batch, in order, once durable.
        `sizes` are the batches' byte sizes when the caller knows them (a single-batch request)."""
        received = now_ms()
        merged = WriteBatch()
        outcomes = []
        for index, raw in enumerate(batches):
            try:
                encoded = None if sizes else _encode(raw)
                size = sizes[index] if sizes else encoded.size
                if size > MAX_BATCH_BYTES:
                    raise PayloadTooLarge(f"the batch is {size} bytes; at most {MAX_BATCH_BYTES} are accepted",
                                          field="batch")
                outcome, rows = self._plan(workspace, index, raw, source, received, encoded)
            except IdmeshError as exc:
                outcomes.append(BatchOutcome(index, "rejected", error=exc))
                continue
            merged.extend(rows)
            outcomes.append(outcome)
        try:
            await self.service.commit(merged)  # also a barrier: a replay is answered only after its original
        except StoreUnavailable:
            self.load_replay_keys()
            raise
        return outcomes

    def _plan(self, workspace: Workspace, index: int, raw: Any, source: str, received: int,
              encoded: EncodedBatch | None) -> tuple[BatchOutcome, WriteBatch]:
        """All graph and replay-key changes happen here, synchronously, after every check has passed."""
        batch = parse_batch(raw)
        batch_key, request_key = self._replay_keys(workspace, batch)
        keys = [k for k in (batch_key, request_key) if k is not None]
        if any(key in self._seen for key in keys):
            return BatchOutcome(index, "duplicate", batch.batch_id), WriteBatch()
        encoded = encoded or _encode(raw)
        rows, mpid = self._resolve_profile(workspace, batch, received)
        batch_id = batch.batch_id or "b_" + secrets.token_hex(8)
        batch_key = batch_key if batch_key is not None else _replay_key(workspace.id, "batch", batch_id)
        self._seen.update(keys)
        self._add_rows(rows, workspace, batch, encoded, mpid, batch_id, (batch_key, request_key), source, received)
        return BatchOutcome(index, "accepted", batch_id, mpid), rows

    def _replay_keys(self, workspace: Workspace, batch: ParsedBatch) -> tuple[int | None, int | None]:
        batch_key = None if batch.batch_id is None else _replay_key(workspace.id, "batch", batch.batch_id)
        request_key = (None if batch.source_request_id is None
                       else _replay_key(workspace.id, "request", batch.source_request_id))
        return batch_key, request_key

    def _resolve_profile(self, workspace: Workspace, batch: ParsedBatch, received: int) -> tuple[WriteBatch, int]:
        graph = self.service.graph(workspace)
        if batch.mpid is not None:
            record = graph.get(batch.mpid)
            if record is None:
                raise BadRequest(f"mpid {batch.mpid} is not a profile of this workspace", field="mpid")
            rows = WriteBatch()
            record.last_seen_ms = max(record.last_seen_ms, received)
            rows.add(journal.TOUCH, (record.mpid, record.last_seen_ms))
            return rows, record.mpid
        if not batch.identities:
            raise BadRequest("a batch needs an mpid or at least one user or device identity", field="user_identities")
        answer, rows = self.service.plan_resolve(workspace, Operation.IDENTIFY, batch.identities,
                                                 request_id=batch.source_request_id or batch.batch_id,
                                                 identities_path="user_identities")
        return rows, answer.mpid

    def _add_rows(self, rows: WriteBatch, workspace: Workspace, batch: ParsedBatch, encoded: EncodedBatch,
                  mpid: int, batch_id: str, keys: tuple[int, int | None], source: str, received: int) -> None:
        batch_time = batch.timestamp_ms if batch.timestamp_ms is not None else received
        envelope = batch.envelope if encoded.envelope is None else encoded.envelope
        rows.add(event_journal.BATCH, (workspace.id, batch_id, batch.source_request_id, mpid, batch_time, received,
                                       batch.environment, source, len(batch.events), envelope, *keys))
        if batch.events:
            events = batch.events if encoded.events is None else encoded.events
            rows.add(event_journal.EVENTS, (workspace.id, mpid, batch_id, received, batch_time, batch.environment,
                                            events))
        for change in batch.attribute_changes:  # before the envelope's: at equal timestamps the envelope wins
            rows.add(event_journal.ATTRIBUTES, (
                workspace.id, mpid, batch_time if change.timestamp_ms is None else change.timestamp_ms,
                {} if change.deleted else {change.name: change.value}, [change.name] if change.deleted else []))
        if batch.user_attributes or batch.deleted_user_attributes:
            rows.add(event_journal.ATTRIBUTES, (workspace.id, mpid, batch_time, batch.user_attributes,
                                                batch.deleted_user_attributes))
        if batch.consent_state:
            rows.add(event_journal.CONSENT, (workspace.id, mpid, batch_id, received, batch.consent_state))


@dataclass(frozen=True)
class EncodedBatch:
    """A batch serialized once, as its envelope and its events array. Their lengths give the batch size the
    limit applies to, and the journal rows embed them as they are: the group-commit writer, the thread every
    request waits for, would otherwise serialize the same events again while holding the GIL."""

    size: int
    envelope: orjson.Fragment | None   # None: not a plain JSON object; the rows fall back to the parsed values
    events: orjson.Fragment | None


_EVENTS_KEY = len(b'"events":')


def _encode(raw: Any) -> EncodedBatch:
    """`size` is exactly len(orjson.dumps(raw)): orjson writes no whitespace, so the whole batch is the
    envelope, `"events":`, the array, and a comma when the envelope has other members."""
    if type(raw) is not dict:
        return EncodedBatch(len(orjson.dumps(raw)), None, None)
    if "events" not in raw:
        envelope = orjson.dumps(raw)
        return EncodedBatch(len(envelope), orjson.Fragment(envelope), None)
    envelope = orjson.dumps({k: v for k, v in raw.items() if k != "events"})
    events = orjson.dumps(raw["events"])
    size = len(envelope) + _EVENTS_KEY + len(events) + (len(raw) > 1)
    return EncodedBatch(size, orjson.Fragment(envelope), orjson.Fragment(events))


def check_request_size(size: int) -> None:
    if size > MAX_REQUEST_BYTES:
        raise PayloadTooLarge(f"the request is {size} bytes; at most {MAX_REQUEST_BYTES} are accepted", field="body")


def check_bulk_count(batches: Any) -> list[Any]:
    if not isinstance(batches, list) or not batches:
        raise BadRequest("the body must be a non-empty JSON array of batches", field="body")
    if len(batches) > MAX_BULK_BATCHES:
        raise BadRequest(f"{len(batches)} batches in one request; at most {MAX_BULK_BATCHES} are accepted",
                         field="body")
    return batches
