"""Group commit: one writer thread turns many requests' pending rows into one DuckDB transaction.

A request hands its `WriteBatch` to `GroupCommitWriter.submit` and answers only when the returned future
resolves, i.e. after the transaction holding its rows committed. Batches commit in submission order, so an
answer never depends on state that a crash could take back.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa

log = logging.getLogger("idmesh.writer")

PROFILE_COLUMNS = ("scope", "mpid", "created_ms", "first_seen_ms", "last_seen_ms", "status")
IDENTITY_COLUMNS = ("scope", "mpid", "identity_type", "value", "raw_value", "added_ms")
CHANGE_COLUMNS = ("at_ms", "scope", "workspace_id", "request_id", "operation", "strategy", "mpid", "change",
                  "identity_type", "value", "reason", "other_mpid")
ALIAS_COLUMNS = ("alias_id", "workspace_id", "request_id", "source_mpid", "destination_mpid", "start_ms",
                 "end_ms", "alias_scope", "environment", "received_ms", "process_after_ms", "status", "processed_ms")
HUB_COLUMNS = ("scope", "identity_type", "value", "profile_count", "quarantined_ms")


@dataclass
class WriteBatch:
    """Rows one request wants durable. Identity adds and removes keep their order (see `_identity_ops`)."""

    new_profiles: list[tuple] = field(default_factory=list)
    touches: list[tuple[int, int]] = field(default_factory=list)
    identity_ops: list[tuple[str, tuple]] = field(default_factory=list)  # ("add", row) / ("remove", key)
    status_changes: list[tuple[int, str]] = field(default_factory=list)
    changes: list[tuple] = field(default_factory=list)
    aliases: list[tuple] = field(default_factory=list)
    hub_values: list[tuple] = field(default_factory=list)
    statements: list[Callable[[duckdb.DuckDBPyConnection], None]] = field(default_factory=list)

    def extend(self, other: WriteBatch) -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name))

    def is_empty(self) -> bool:
        return not any(getattr(self, name) for name in self.__dataclass_fields__)


class GroupCommitWriter:
    def __init__(self, connection: duckdb.DuckDBPyConnection, max_batches: int = 2000) -> None:
        self._cursor = connection.cursor()
        self._queue: queue.Queue[tuple[WriteBatch, concurrent.futures.Future[None], int] | None] = queue.Queue()
        self._max_batches = max_batches
        # After a failed commit every queued batch was planned on state that is not durable: reject them
        # until the owner has rebuilt its state and called recover(), which starts a new epoch.
        self.failed: Exception | None = None
        self._epoch = 0
        self._thread = threading.Thread(target=self._run, name="idmesh-writer", daemon=True)
        self.commits = 0
        self._thread.start()

    def submit(self, batch: WriteBatch) -> concurrent.futures.Future[None]:
        """Queue rows; the future resolves once they are committed (an empty batch is a barrier)."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put((batch, future, self._epoch))
        return future

    def recover(self) -> None:
        self.failed = None
        self._epoch += 1

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._cursor.close()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            group = [item]
            stopping = False
            while len(group) < self._max_batches:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                group.append(more)
            self._commit_group(group)
            if stopping:
                return

    def _commit_group(self, group: list[tuple[WriteBatch, concurrent.futures.Future[None], int]]) -> None:
        merged = WriteBatch()
        accepted = []
        for batch, future, epoch in group:
            if self.failed is not None or epoch != self._epoch:
                future.set_exception(RuntimeError("an earlier write failed; state is being rebuilt"))
                continue
            merged.extend(batch)
            accepted.append((batch, future, epoch))
        group = accepted
        try:
            if not merged.is_empty():
                self._write(merged)
                self.commits += 1
        except Exception as exc:  # the whole group failed: none of it is acknowledged
            log.error("group commit failed: %s", exc)
            self.failed = exc
            try:
                self._cursor.rollback()
            except duckdb.Error:
                pass
            for _, future, _ in group:
                future.set_exception(exc)
            return
        for _, future, _ in group:
            future.set_result(None)

    def _write(self, batch: WriteBatch) -> None:
        cur = self._cursor
        cur.begin()
        self._insert(cur, "profiles", PROFILE_COLUMNS, batch.new_profiles)
        self._insert(cur, "profile_touches", ("mpid", "last_seen_ms"), batch.touches)
        removed_keys, added_rows = _identity_ops(batch.identity_ops)
        if removed_keys:
            self._register(cur, "pending_removed", ("scope", "mpid", "identity_type", "value"), removed_keys)
            cur.execute("""DELETE FROM identities USING pending_removed AS r
                WHERE identities.scope = r.scope AND identities.mpid = r.mpid
                  AND identities.identity_type = r.identity_type AND identities.value = r.value""")
            cur.unregister("pending_removed")
        self._insert(cur, "identities", IDENTITY_COLUMNS, added_rows)
        for mpid, status in batch.status_changes:
            cur.execute("UPDATE profiles SET status = ? WHERE mpid = ?", [status, mpid])
        self._insert(cur, "identity_changes", CHANGE_COLUMNS, batch.changes)
        self._insert(cur, "aliases", ALIAS_COLUMNS, batch.aliases)
        self._insert(cur, "hub_values", HUB_COLUMNS, batch.hub_values)
        for statement in batch.statements:
            statement(cur)
        cur.commit()

    @staticmethod
    def _register(cur: duckdb.DuckDBPyConnection, name: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
        data = {c: list(values) for c, values in zip(columns, zip(*rows))}
        cur.register(name, pa.table(data))

    def _insert(self, cur: duckdb.DuckDBPyConnection, table: str, columns: tuple[str, ...], rows: list[tuple]
                ) -> None:
        if not rows:
            return
        self._register(cur, "pending_rows", columns, rows)
        cur.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(columns)} FROM pending_rows")
        cur.unregister("pending_rows")


def _identity_ops(ops: list[tuple[str, tuple]]) -> tuple[list[tuple], list[tuple]]:
    """Net effect of ordered adds/removes: every key removed at any point is deleted from the table, then the
    keys whose last operation is an add are inserted. A key only ever added is new (the graph knew it absent)."""
    last: dict[tuple, tuple[str, tuple]] = {}
    removed: set[tuple] = set()
    for kind, row in ops:
        key = row[:4]
        if kind == "remove":
            removed.add(key)
        last[key] = (kind, row)
    added_rows = [row for kind, row in last.values() if kind == "add"]
    return sorted(removed), added_rows
