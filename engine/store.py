"""The DuckDB file: opening it, migrating its schema, and the bulk reads done at start-up."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from engine import event_journal, journal
from engine.migrations import MIGRATIONS

log = logging.getLogger("idmesh.store")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def open_database(path: str) -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect(path)
    # DuckDB checkpoints when the WAL passes this size, inside the commit that crosses it; with the default
    # 16 MB, ingest at full speed paid a checkpoint every second or so on its commit path. Start-up replays
    # at most this much WAL. IDMESH_CHECKPOINT_THRESHOLD overrides it (the fault tests force checkpoints).
    threshold = os.environ.get("IDMESH_CHECKPOINT_THRESHOLD", "256MB")
    try:
        connection.execute("SET checkpoint_threshold = ?", [threshold])
    except duckdb.Error as exc:
        connection.close()
        raise ValueError(f"IDMESH_CHECKPOINT_THRESHOLD={threshold!r} is not a size such as 256MB: {exc}") from None
    migrate(connection)
    return connection


def unwritable_reason(path: str) -> str | None:
    """Why the server could not write the database at `path`, or None. DuckDB opens a read-only file with an
    error but a read-only directory without one, and fails only at the first commit, when it must create the
    WAL beside the file; so both are checked before anything is served."""
    database = Path(path)
    directory = database.parent
    if not directory.is_dir():
        return f"the directory {directory} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"the directory {directory} is not writable (DuckDB creates its write-ahead log there)"
    for file in (database, Path(path + ".wal")):
        if file.exists() and not os.access(file, os.R_OK | os.W_OK):
            return f"{file} cannot be read and written by this user"
    return None


def migrate(connection: duckdb.DuckDBPyConnection) -> None:
    connection.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                       "(version INTEGER PRIMARY KEY, name VARCHAR, applied_ms BIGINT)")
    applied = {row[0] for row in connection.execute("SELECT version FROM schema_migrations").fetchall()}
    for version, name, sql in MIGRATIONS:
        if version in applied:
            continue
        connection.execute("BEGIN")
        connection.execute(sql)
        connection.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", [version, name, now_ms()])
        connection.execute("COMMIT")


def fold(cur: duckdb.DuckDBPyConnection) -> None:
    """Move the journal rows this transaction sees into the base tables; the caller owns the transaction.
    Rows committed meanwhile by other transactions are not in its snapshot and stay for the next fold."""
    last_seq = cur.execute("SELECT max(seq) FROM write_journal").fetchone()[0]
    if last_seq is None:
        return
    for statement in journal.fold_statements() + event_journal.fold_statements():
        cur.execute(statement)
    cur.execute("DELETE FROM write_journal WHERE seq <= ?", [last_seq])


def next_journal_seq(connection: duckdb.DuckDBPyConnection) -> int:
    """The first seq for new journal rows: above every row in the journal and every seq an event's arrival
    holds, so arrival order (engine/event_journal.py) keeps rising across restarts, after folds emptied the
    journal. Other journal rows need seq only while they are in it, so reusing their numbers is harmless."""
    in_journal, in_events = connection.execute(
        "SELECT (SELECT coalesce(max(seq), 0) FROM write_journal), "
        "(SELECT coalesce(max(arrival), 0) FROM events_base)").fetchall()[0]
    return 1 + max(in_journal, in_events // event_journal.ARRIVAL_SPAN)


def fold_journal_at_start(connection: duckdb.DuckDBPyConnection) -> None:
    """Fold what the last run left in the journal, so the writer starts from an empty one."""
    left = connection.execute("SELECT count(*) FROM write_journal").fetchone()[0]
    if not left:
        return
    started = time.monotonic()
    log.info("folding %d write-journal rows left by the last run", left)
    connection.execute("BEGIN")
    fold(connection)
    connection.execute("COMMIT")
    log.info("folded the write journal in %.1f s", time.monotonic() - started)


BATCH_ROWS = 200_000


@dataclass(frozen=True)
class GraphSnapshot:
    """Streams of the rows the identity graph is built from; read in batches so start-up never holds a
    second full copy of the graph in Arrow form."""

    profiles: pa.RecordBatchReader     # scope, mpid, created_ms, last_seen_ms, status
    identities: pa.RecordBatchReader   # scope, mpid, identity_type, value; ordered by mpid
    hub_values: pa.RecordBatchReader   # scope, identity_type, value
    cursors: tuple[duckdb.DuckDBPyConnection, ...]

    def close(self) -> None:
        for cursor in self.cursors:
            cursor.close()


def read_graph_snapshot(connection: duckdb.DuckDBPyConnection) -> GraphSnapshot:
    cursors: list[duckdb.DuckDBPyConnection] = []

    def stream(query: str) -> pa.RecordBatchReader:
        # each stream needs its own cursor: a connection serves one open result at a time
        cursors.append(connection.cursor())
        return cursors[-1].sql(query).to_arrow_reader(BATCH_ROWS)

    return GraphSnapshot(
        stream("SELECT scope, mpid, created_ms, last_seen_ms, status FROM profiles"),
        stream("SELECT scope, mpid, identity_type, value FROM identities ORDER BY mpid"),
        stream("SELECT scope, identity_type, value FROM hub_values"),
        tuple(cursors),
    )
