"""Delivery rows for tests that need some without delivering anything: what a destination holds for a profile, a
pending change and a request sent, written through a running server's group-commit writer the way the outbox
writes them (docs/delivery.md, "State and outbox")."""

from __future__ import annotations

import json
import time

import duckdb
from live_server import LiveServer

from engine.writer import WriteBatch


def seed_delivery(server: LiveServer, workspace_id: str, connection_id: int, mpid: int,
                  identifiers: dict[str, str], at_ms: int | None = None) -> None:
    """The connection's destination holds the profile with these identifiers, a remove of it is pending, and one
    request was sent (acknowledged, one lag)."""
    at = at_ms if at_ms is not None else time.time_ns() // 1_000_000
    text = json.dumps(identifiers, sort_keys=True, separators=(",", ":"))

    def write(cur: duckdb.DuckDBPyConnection) -> None:
        cur.execute("INSERT INTO delivery_state (workspace_id, connection_id, mpid, identifiers, acknowledged_ms) "
                    "VALUES (?, ?, ?, ?, ?)", [workspace_id, connection_id, mpid, text, at])
        seq = cur.execute("SELECT coalesce(max(seq), 0) + 1 FROM delivery_outbox WHERE connection_id = ?",
                          [connection_id]).fetchone()[0]
        cur.execute("INSERT INTO delivery_outbox (workspace_id, connection_id, seq, mpid, op, identifiers, attributes, "
                    "changed_ms, attempts, next_attempt_ms, last_error) "
                    "VALUES (?, ?, ?, ?, 'remove', ?, NULL, ?, 0, ?, NULL)",
                    [workspace_id, connection_id, seq, mpid, text, at, at])
        cur.execute("INSERT INTO delivery_attempts VALUES (?, ?, ?, 12, 1, 1, 0, 0, 200, NULL, [40])",
                    [workspace_id, connection_id, at])

    batch = WriteBatch()
    batch.statements.append(write)
    server.service.writer.submit(batch).result(timeout=30)
