"""Arrival order (`events.arrival`): stored when the journal is folded, shown by the view before that, rising
across restarts, and given to events stored before the column existed (migration 6) in their old order."""

from __future__ import annotations

import duckdb
import orjson

from engine import event_journal
from engine.journal import journal_table
from engine.store import fold_journal_at_start, migrate
from engine.writer import GroupCommitWriter, WriteBatch


def events_batch(batch_id: str, received_ms: int, names: list[str]) -> WriteBatch:
    batch = WriteBatch()
    events = [{"event_type": "custom_event", "data": {"event_name": name, "timestamp_unixtime_ms": 1000}}
              for name in names]
    batch.add(event_journal.EVENTS, ("ws", 7, batch_id, received_ms, 1000, "production", orjson.Fragment(
        orjson.dumps(events))))
    return batch


def names_in_arrival_order(connection: duckdb.DuckDBPyConnection) -> list[str]:
    return [row[0] for row in connection.execute("SELECT event_name FROM events ORDER BY arrival").fetchall()]


def test_arrival_follows_commits_across_folds_and_restarts(tmp_path):
    path = str(tmp_path / "a.duckdb")
    connection = duckdb.connect(path)
    migrate(connection)
    writer = GroupCommitWriter(connection, fold_rows=10**9, fold_seconds=10**9)
    # received_ms and batch_id order disagree with the commit order on purpose: arrival is the commit order
    writer.submit(events_batch("z", 50, ["a1", "a2"])).result()
    writer.submit(events_batch("a", 10, ["b1"])).result()
    unfolded = connection.execute("SELECT event_name, arrival FROM events ORDER BY arrival").fetchall()
    writer.submit(WriteBatch(fold_first=True)).result()
    assert connection.execute("SELECT count(*) FROM write_journal").fetchone()[0] == 0
    assert connection.execute("SELECT event_name, arrival FROM events_base ORDER BY arrival").fetchall() == unfolded
    writer.close()
    connection.close()

    # a restart finds the journal empty: the writer numbers on after the arrivals already stored
    connection = duckdb.connect(path)
    fold_journal_at_start(connection)
    writer = GroupCommitWriter(connection, fold_rows=10**9, fold_seconds=10**9)
    writer.submit(events_batch("y", 1, ["c1", "c2"])).result()
    assert names_in_arrival_order(connection) == ["a1", "a2", "b1", "c1", "c2"]
    writer.close()
    connection.close()


def test_migration_numbers_older_events_in_their_old_order_below_journal_events(tmp_path):
    connection = duckdb.connect(str(tmp_path / "m.duckdb"))
    migrate(connection)
    # the database as it was before migration 6: no arrival column
    connection.execute("ALTER TABLE events_base DROP COLUMN arrival")
    connection.execute("DELETE FROM schema_migrations WHERE version = 6")
    stored = [("late", 30, "b", 0), ("tie-b", 20, "b", 0), ("tie-a1", 20, "a", 0), ("tie-a2", 20, "a", 1),
              ("early", 10, "z", 0), ("early-2", 10, "z", 1)]
    for name, received_ms, batch_id, index in stored:
        connection.execute("""INSERT INTO events_base (workspace_id, mpid, batch_id, event_index, event_type, event_name,
                                  timestamp_ms, received_ms, environment, data)
                              VALUES ('ws', 7, ?, ?, 'custom_event', ?, 1000, ?, 'production', '{}')""",
                           [batch_id, index, name, received_ms])
    # an unfolded journal row, left by the last run of the older version
    leftover = journal_table(1, events_batch("j", 5, ["journal"]).rows)  # noqa: F841 (read by the INSERT)
    connection.execute("INSERT INTO write_journal SELECT * FROM leftover")

    migrate(connection)
    assert names_in_arrival_order(connection) == ["early", "early-2", "tie-a1", "tie-a2", "tie-b", "late", "journal"]
    assert connection.execute("SELECT max(arrival) < 0 FROM events_base").fetchone()[0]
    assert connection.execute("SELECT comment FROM duckdb_columns() WHERE table_name = 'events' "
                              "AND column_name = 'arrival'").fetchone()[0].startswith("arrival order")
    # and folding the journal afterwards keeps it last
    fold_journal_at_start(connection)
    assert names_in_arrival_order(connection)[-1] == "journal"
    connection.close()
