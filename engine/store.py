"""The DuckDB file: opening it, migrating its schema, and the bulk reads done at start-up."""

from __future__ import annotations

import time
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from engine import journal
from engine.migrations import MIGRATIONS


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def open_database(path: str) -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect(path)
    migrate(connection)
    return connection


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


def fold_journal_at_start(connection: duckdb.DuckDBPyConnection) -> None:
    """Fold what the last run left in the journal, so the writer starts from an empty one."""
    connection.execute("BEGIN")
    journal.fold(connection)
    connection.execute("COMMIT")


@dataclass(frozen=True)
class GraphSnapshot:
    """Column-oriented copies of the tables the identity graph is built from."""

    profiles: pa.Table     # scope, mpid, created_ms, last_seen_ms, status
    identities: pa.Table   # scope, mpid, identity_type, value
    hub_values: pa.Table   # scope, identity_type, value


def read_graph_snapshot(connection: duckdb.DuckDBPyConnection) -> GraphSnapshot:
    profiles = connection.sql("SELECT scope, mpid, created_ms, last_seen_ms, status FROM profiles").to_arrow_table()
    identities = connection.sql(
        "SELECT scope, mpid, identity_type, value FROM identities ORDER BY mpid").to_arrow_table()
    hubs = connection.sql("SELECT scope, identity_type, value FROM hub_values").to_arrow_table()
    return GraphSnapshot(profiles, identities, hubs)
