"""Status callbacks to controllers (OpenDSR §8.5-8.7): a durable outbox, signed POSTs, retries.

Every status change queues one callback per `status_callback_urls` entry, in the same transaction as the
change, so a callback is never lost and never sent for a change that did not commit. Delivery runs apart from
the requests (a task started after the commit, and the scheduler's regular run), so a slow or dead receiver
never delays an answer. The body is JSON, signed SHA256-RSA with the processor key (`X-OpenDSR-Signature`,
base64), with `X-OpenDSR-Processor-Domain`. Any 2xx answer counts as delivered (receivers answer 202).

A failed attempt is retried after 30 s, doubling up to 15 minutes between attempts (mParticle queues its
callbacks every 15 minutes), for 3 days; then the callback is given up and `last_error` says why. Callbacks of
one request to one URL go out in order: a later status waits until the earlier one was delivered.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import duckdb
import httpx
import orjson

from engine.dsr_keys import ProcessorKeys
from engine.dsr_model import DsrRecord
from engine.dsr_store import Statement
from engine.idsync import IdSyncService
from engine.store import now_ms
from engine.writer import WriteBatch

log = logging.getLogger("idmesh.dsr.callbacks")

FIRST_RETRY_SECONDS = 30
MAX_RETRY_SECONDS = 900
GIVE_UP_AFTER_MS = 3 * 86_400_000
TIMEOUT_SECONDS = 10.0
MAX_PER_RUN = 500


@dataclass(frozen=True)
class PendingCallback:
    seq: int
    subject_request_id: str
    url: str
    body: str
    created_ms: int
    attempts: int


class CallbackOutbox:
    def __init__(self, service: IdSyncService, keys: ProcessorKeys, processor_domain: str) -> None:
        self.service = service
        self.keys = keys
        self.processor_domain = processor_domain
        # strictly increasing across restarts too (nanosecond clock), so rows sort in the order they were queued
        self._seq = itertools.count(time.time_ns())
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

    def plan(self, record: DsrRecord, body: dict[str, Any], batch: WriteBatch) -> None:
        """Queue the callbacks of one status change in `batch` (one per callback URL)."""
        at = now_ms()
        rows = []
        for url in record.status_callback_urls:
            text = orjson.dumps({**body, "status_callback_url": url}).decode()
            rows.append([next(self._seq), record.workspace_id, record.subject_request_id, url, text, at, 0, at])
        if not rows:
            return

        def queue(cur: duckdb.DuckDBPyConnection) -> None:
            cur.executemany("INSERT INTO dsr_callbacks VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL)", rows)

        batch.statements.append(queue)

    def headers(self, body: bytes) -> dict[str, str]:
        return {"Content-Type": "application/json", "X-OpenDSR-Signature": self.keys.sign(body),
                "X-OpenDSR-Processor-Domain": self.processor_domain}

    def kick(self) -> None:
        """Deliver what is due soon, without anyone waiting for it."""
        task = asyncio.get_running_loop().create_task(self.deliver_due())
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def deliver_due(self, at_ms: int | None = None) -> int:
        """Try every callback due at `at_ms` (default now); returns how many were delivered. Runs one at a time,
        so two never send the same rows; each reads what is due when it starts."""
        async with self._lock:
            return await self._deliver_once(now_ms() if at_ms is None else at_ms)

    async def _deliver_once(self, at: int) -> int:
        due = await asyncio.to_thread(_read_due, self.service.connection, at)
        if not due:
            return 0
        chains: dict[tuple[str, str], list[PendingCallback]] = {}
        for callback in due:
            chains.setdefault((callback.subject_request_id, callback.url), []).append(callback)
        outcomes: list[tuple[PendingCallback, str | None]] = []
        async with httpx.AsyncClient(timeout=TIMEOUT_SECONDS, follow_redirects=False) as client:
            await asyncio.gather(*(self._send_chain(client, chain, outcomes) for chain in chains.values()))
        batch = WriteBatch()
        batch.statements.append(_record_outcomes(outcomes, at))
        try:
            await self.service.commit(batch)
        except Exception as exc:  # the receivers may see a callback twice; never lose one
            log.error("could not record callback deliveries: %s", exc)
            return 0
        return sum(1 for _, error in outcomes if error is None)

    async def _send_chain(self, client: httpx.AsyncClient, chain: list[PendingCallback],
                          outcomes: list[tuple[PendingCallback, str | None]]) -> None:
        for callback in chain:
            body = callback.body.encode()
            try:
                response = await client.post(callback.url, content=body, headers=self.headers(body))
                error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
            outcomes.append((callback, error))
            if error is not None:
                log.warning("OpenDSR callback for %s to %s failed: %s", callback.subject_request_id, callback.url,
                            error)
                return  # later statuses wait for this one


def _read_due(connection: duckdb.DuckDBPyConnection, at: int) -> list[PendingCallback]:
    cursor = connection.cursor()
    try:
        # a chain (one request, one URL) is due when its oldest undelivered callback is: the later ones follow it
        rows = cursor.execute("""
            WITH waiting AS (SELECT * FROM dsr_callbacks WHERE delivered_ms IS NULL AND given_up_ms IS NULL),
            heads AS (SELECT workspace_id, subject_request_id, url, arg_min(next_attempt_ms, seq) AS head_next_ms
                      FROM waiting GROUP BY ALL)
            SELECT w.seq, w.subject_request_id, w.url, w.body, w.created_ms, w.attempts
            FROM waiting AS w JOIN heads AS h USING (workspace_id, subject_request_id, url)
            WHERE h.head_next_ms <= ?
            ORDER BY w.seq LIMIT ?""", [at, MAX_PER_RUN]).fetchall()
    finally:
        cursor.close()
    return [PendingCallback(*row) for row in rows]


def _record_outcomes(outcomes: list[tuple[PendingCallback, str | None]], at: int) -> Statement:
    delivered = [c.seq for c, error in outcomes if error is None]
    failed = [(c, error) for c, error in outcomes if error is not None]

    def record(cur: duckdb.DuckDBPyConnection) -> None:
        if delivered:
            cur.execute("UPDATE dsr_callbacks SET delivered_ms = ?, attempts = attempts + 1, last_error = NULL "
                        "WHERE seq IN (SELECT unnest(?::BIGINT[]))", [at, delivered])
        for callback, error in failed:
            attempts = callback.attempts + 1
            delay_ms = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** (attempts - 1)) * 1000
            given_up = at if at - callback.created_ms >= GIVE_UP_AFTER_MS else None
            cur.execute("UPDATE dsr_callbacks SET attempts = ?, next_attempt_ms = ?, last_error = ?, given_up_ms = ? "
                        "WHERE seq = ?", [attempts, at + delay_ms, error, given_up, callback.seq])

    return record
