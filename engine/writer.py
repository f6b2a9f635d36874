"""Group commit: one writer thread turns many requests' pending rows into one DuckDB transaction.

A request hands its `WriteBatch` to `GroupCommitWriter.submit` and answers only when the returned future
resolves, i.e. after the transaction holding its rows committed. Batches commit in submission order, so an
answer never depends on state that a crash could take back. A commit is one insert into the write journal.
When the journal has grown or aged, a second thread folds it into the base tables (engine/journal.py) in its
own transaction, so commits go on meanwhile: the fold reads only the journal rows of its snapshot and
deletes exactly those, while the writer only appends newer ones. DuckDB runs the fold without the GIL, so on
two cores it costs the commit path little. A batch that must see every row in the base tables
(`fold_first`) waits for a running fold and folds inline.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import duckdb

from engine import journal, store
from engine.journal import journal_table

log = logging.getLogger("idmesh.writer")

# Journal rows that make a fold due; IDMESH_FOLD_ROWS overrides it (the fault tests fold all the time).
FOLD_ROWS = int(os.environ.get("IDMESH_FOLD_ROWS", "50000"))


@dataclass
class WriteBatch:
    """What one request wants durable: journal rows in order (see engine/journal.py for the row kinds), and
    rare SQL statements run in the same transaction. A statement that updates rows of a journaled table sets
    `fold_first`, so the rows it updates have reached the base tables."""

    rows: list[tuple[journal.RowKind, tuple]] = field(default_factory=list)
    statements: list[Callable[[duckdb.DuckDBPyConnection], None]] = field(default_factory=list)
    fold_first: bool = False

    def add(self, kind: journal.RowKind, row: tuple) -> None:
        self.rows.append((kind, row))

    def extend(self, other: WriteBatch) -> None:
        self.rows.extend(other.rows)
        self.statements.extend(other.statements)
        self.fold_first = self.fold_first or other.fold_first

    def is_empty(self) -> bool:
        return not self.rows and not self.statements and not self.fold_first


class GroupCommitWriter:
    def __init__(self, connection: duckdb.DuckDBPyConnection, max_batches: int = 2000,
                 fold_rows: int = FOLD_ROWS, fold_seconds: float = 10.0) -> None:
        self._cursor = connection.cursor()
        self._next_seq = store.next_journal_seq(connection)
        self._fold_rows = fold_rows
        self._fold_seconds = fold_seconds
        self._journal_rows = 0
        self._oldest_unfolded: float | None = None
        self._queue: queue.Queue[tuple[WriteBatch, concurrent.futures.Future[None], int] | None] = queue.Queue()
        self._max_batches = max_batches
        # After a failed commit every queued batch was planned on state that is not durable: reject them
        # until the owner has rebuilt its state and called recover(), which starts a new epoch.
        self.failed: Exception | None = None
        self._epoch = 0
        # A thread waiting for the GIL gets it only every switch interval (5 ms by default) while the event loop
        # is busy; the commit wait is on every request's path, so hand the GIL over sooner.
        sys.setswitchinterval(0.0005)
        self._folder = JournalFolder(connection)
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
        self._folder.close()
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
                _settle(future, RuntimeError("an earlier write failed; state is being rebuilt"))
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
                _settle(future, exc)
            return
        for _, future, _ in group:
            _settle(future, None)

    def _write(self, batch: WriteBatch) -> None:
        cur = self._cursor
        pending = journal_table(self._next_seq, batch.rows)  # noqa: F841 (read by the INSERTs below)
        if not batch.fold_first and not batch.statements:
            # the common case in one round trip into DuckDB
            cur.execute("BEGIN; INSERT INTO write_journal SELECT * FROM pending; COMMIT")
        else:
            with self._folder.exclusive():
                cur.begin()
                if batch.rows:
                    cur.execute("INSERT INTO write_journal SELECT * FROM pending")
                if batch.fold_first:
                    store.fold(cur)
                for statement in batch.statements:
                    statement(cur)
                cur.commit()
        self._next_seq += len(batch.rows)
        if batch.fold_first:
            self._journal_rows, self._oldest_unfolded = 0, None
        elif batch.rows:
            self._journal_rows += len(batch.rows)
            self._oldest_unfolded = self._oldest_unfolded or time.monotonic()
            if self._fold_due():
                self._folder.request()
                self._journal_rows, self._oldest_unfolded = 0, None

    def _fold_due(self) -> bool:
        if self._journal_rows >= self._fold_rows:
            return True
        return self._oldest_unfolded is not None and time.monotonic() - self._oldest_unfolded > self._fold_seconds


def _settle(future: concurrent.futures.Future[None], error: Exception | None) -> None:
    """Resolve a waiter's future; one its waiter cancelled (a task cancelled at shutdown) must not kill the writer."""
    try:
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass


class JournalFolder:
    """Folds the write journal on its own thread and cursor when asked; `exclusive()` keeps a fold from
    running beside a transaction that updates base tables itself."""

    def __init__(self, connection: duckdb.DuckDBPyConnection) -> None:
        self._cursor = connection.cursor()
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._stopping = False
        self.folds = 0
        self._thread = threading.Thread(target=self._run, name="idmesh-journal-fold", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wanted.set()

    def exclusive(self) -> threading.Lock:
        return self._lock

    def close(self) -> None:
        self._stopping = True
        self._wanted.set()
        self._thread.join()
        self._cursor.close()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stopping:
                return
            with self._lock:
                try:
                    self._cursor.begin()
                    store.fold(self._cursor)
                    self._cursor.commit()
                    self.folds += 1
                except duckdb.Error as exc:  # the rows stay in the journal; the next request folds them
                    log.error("journal fold failed: %s", exc)
                    try:
                        self._cursor.rollback()
                    except duckdb.Error:
                        pass
