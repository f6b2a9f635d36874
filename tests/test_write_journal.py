"""The journal views show exactly what folding writes into the base tables."""

from __future__ import annotations

import duckdb

from engine import journal
from engine.store import migrate
from engine.writer import GroupCommitWriter, WriteBatch

VIEWS = {"profiles": "scope, mpid, created_ms, first_seen_ms, last_seen_ms, status",
         "identities": "scope, mpid, identity_type, value, raw_value, added_ms",
         "identity_changes": "*", "aliases": "*", "hub_values": "*"}


def view_state(connection: duckdb.DuckDBPyConnection) -> dict[str, list]:
    return {view: sorted(connection.execute(f"SELECT {cols} FROM {view}").fetchall(), key=repr)
            for view, cols in VIEWS.items()}


def test_views_before_a_fold_equal_the_base_tables_after_it(tmp_path):
    connection = duckdb.connect(str(tmp_path / "j.duckdb"))
    migrate(connection)
    writer = GroupCommitWriter(connection, fold_rows=10**9, fold_seconds=10**9)
    first, second = WriteBatch(), WriteBatch()
    first.add(journal.PROFILE, ("ws", 7, 1, 1, 1, "active"))
    first.add(journal.PROFILE, ("ws", 8, 1, 1, 1, "active"))
    first.add(journal.IDENTITY_ADD, ("ws", 7, "email", "a@x", "A@x", 1))
    first.add(journal.IDENTITY_ADD, ("ws", 7, "ios_idfv", "d", "D", 1))
    first.add(journal.IDENTITY_ADD, ("ws", 8, "email", "gone@x", "gone@x", 1))
    writer.submit(first).result()
    # remove then re-add, add then remove, a touch, a status change, a ledger row, a hub
    second.add(journal.IDENTITY_REMOVE, ("ws", 7, "email", "a@x"))
    second.add(journal.IDENTITY_ADD, ("ws", 7, "email", "a@x", "a@X", 2))
    second.add(journal.IDENTITY_REMOVE, ("ws", 8, "email", "gone@x"))
    second.add(journal.TOUCH, (7, 50))
    second.add(journal.STATUS, (8, "orphaned"))
    second.add(journal.CHANGE, (2, "ws", "ws", "r1", "modify", "default", 8, "orphan", None, None, "why", 7))
    second.add(journal.HUB, ("ws", "ios_idfv", "d", 11, 2))
    writer.submit(second).result()
    before = view_state(connection)
    assert before["identities"] == [("ws", 7, "email", "a@x", "a@X", 2), ("ws", 7, "ios_idfv", "d", "D", 1)]
    assert ("ws", 7, 1, 1, 50, "active") in before["profiles"] and ("ws", 8, 1, 1, 1, "orphaned") in before["profiles"]
    fold = WriteBatch(fold_first=True)
    writer.submit(fold).result()
    assert connection.execute("SELECT count(*) FROM write_journal").fetchone()[0] == 0
    assert view_state(connection) == before
    writer.close()


def test_a_cancelled_waiter_does_not_stop_the_writer(tmp_path):
    """A request task cancelled while it waits (shutdown, a client gone) leaves a cancelled future behind."""
    connection = duckdb.connect(str(tmp_path / "c.duckdb"))
    migrate(connection)
    writer = GroupCommitWriter(connection)
    try:
        abandoned = WriteBatch()
        abandoned.add(journal.PROFILE, ("ws", 1, 1, 1, 1, "active"))
        writer.submit(abandoned).cancel()
        later = WriteBatch()
        later.add(journal.PROFILE, ("ws", 2, 1, 1, 1, "active"))
        writer.submit(later).result(timeout=30)
        assert sorted(r[0] for r in connection.cursor().execute("SELECT mpid FROM profiles").fetchall()) == [1, 2]
    finally:
        writer.close()
        connection.close()
