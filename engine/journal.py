"""The write journal: every group commit appends one Arrow batch to one table, `write_journal`.

A DuckDB INSERT costs about 1.5 ms whatever its size, so writing each commit's rows to five tables would cost
five of them; one journal insert per commit keeps the durable-ack wait short. The writer folds the journal
into the base tables (`*_base`) now and then, in one transaction. The names analysts query (`profiles`,
`identities`, `identity_changes`, `aliases`, `hub_values`) are views over base + journal, so nobody ever
sees a write twice or misses one that was acknowledged.

A journal row is (seq, kind, payload): the payload is the row tuple as a JSON array in the kind's column order.
DuckDB's insert cost grows with the number of columns, so three narrow columns beat one per field.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import pyarrow as pa


@dataclass(frozen=True)
class RowKind:
    name: str
    table: str
    columns: tuple[tuple[str, str], ...]  # (column, "i" BIGINT, "s" VARCHAR or "j" JSON) in row-tuple order

    def select(self, exclude: tuple[str, ...] = ()) -> str:
        return ", ".join(f"{_extract(i, kind)} AS {column}" for i, (column, kind) in enumerate(self.columns)
                         if column not in exclude)


def _extract(index: int, kind: str) -> str:
    if kind == "j":
        return f"nullif(payload->{index}, 'null'::JSON)"
    return f"(payload->>{index})::{'BIGINT' if kind == 'i' else 'VARCHAR'}"


PROFILE = RowKind("profile", "profiles", (("scope", "s"), ("mpid", "i"), ("created_ms", "i"),
                                          ("first_seen_ms", "i"), ("last_seen_ms", "i"), ("status", "s")))
TOUCH = RowKind("touch", "profiles", (("mpid", "i"), ("last_seen_ms", "i")))
STATUS = RowKind("status", "profiles", (("mpid", "i"), ("status", "s")))
IDENTITY_ADD = RowKind("identity_add", "identities", (
    ("scope", "s"), ("mpid", "i"), ("identity_type", "s"), ("value", "s"), ("raw_value", "s"), ("added_ms", "i")))
IDENTITY_REMOVE = RowKind("identity_remove", "identities", (
    ("scope", "s"), ("mpid", "i"), ("identity_type", "s"), ("value", "s")))
CHANGE = RowKind("change", "identity_changes", (
    ("at_ms", "i"), ("scope", "s"), ("workspace_id", "s"), ("request_id", "s"), ("operation", "s"),
    ("strategy", "s"), ("mpid", "i"), ("change", "s"), ("identity_type", "s"), ("value", "s"), ("reason", "s"),
    ("other_mpid", "i")))
ALIAS = RowKind("alias", "aliases", (
    ("alias_id", "s"), ("workspace_id", "s"), ("request_id", "s"), ("source_mpid", "i"),
    ("destination_mpid", "i"), ("start_ms", "i"), ("end_ms", "i"), ("alias_scope", "s"), ("environment", "s"),
    ("received_ms", "i"), ("process_after_ms", "i"), ("status", "s"), ("processed_ms", "i")))
HUB = RowKind("hub", "hub_values", (("scope", "s"), ("identity_type", "s"), ("value", "s"),
                                    ("profile_count", "i"), ("quarantined_ms", "i")))

APPEND_ONLY = (CHANGE, ALIAS, HUB)

JOURNAL_SCHEMA = pa.schema([("seq", pa.int64()), ("kind", pa.string()), ("payload", pa.string())])
JOURNAL_DDL = ("CREATE TABLE write_journal (seq BIGINT NOT NULL, kind VARCHAR NOT NULL, payload VARCHAR NOT NULL);\n"
               "COMMENT ON TABLE write_journal IS 'group-commit journal, folded into the *_base tables; "
               "query the views instead';\n")


def journal_table(first_seq: int, rows: list[tuple[RowKind, tuple]]) -> pa.Table:
    """One Arrow table holding rows of any kind, in order, numbered from `first_seq`."""
    return pa.Table.from_arrays([
        pa.array(range(first_seq, first_seq + len(rows)), pa.int64()),
        pa.array([kind.name for kind, _ in rows], pa.string()),
        pa.array([orjson.dumps(row).decode() for _, row in rows], pa.string()),
    ], schema=JOURNAL_SCHEMA)


def _key_match(left: str, right: str) -> str:
    return (f"{left}.scope = {right}.scope AND {left}.mpid = {right}.mpid "
            f"AND {left}.identity_type = {right}.identity_type AND {left}.value = {right}.value")


_REMOVED = (f"SELECT {IDENTITY_REMOVE.select()}, max(seq) AS last_remove FROM write_journal "
            f"WHERE kind = 'identity_remove' GROUP BY ALL")
_ADDED = f"SELECT seq, {IDENTITY_ADD.select()} FROM write_journal WHERE kind = 'identity_add'"

# Adds still standing: no remove of the same key came after them.
_STANDING_ADDS = (f"SELECT a.scope, a.mpid, a.identity_type, a.value, a.raw_value, a.added_ms FROM ({_ADDED}) AS a "
                  f"WHERE NOT EXISTS (SELECT 1 FROM ({_REMOVED}) AS r WHERE {_key_match('r', 'a')} "
                  f"AND r.last_remove > a.seq)")
_TOUCHES = (f"SELECT mpid, max(last_seen_ms) AS last_seen_ms FROM (SELECT {TOUCH.select()} FROM write_journal "
            f"WHERE kind = 'touch') GROUP BY mpid")
_STATUSES = (f"SELECT mpid, arg_max(status, seq) AS status FROM (SELECT seq, {STATUS.select()} FROM write_journal "
             f"WHERE kind = 'status') GROUP BY mpid")


def view_statements() -> list[str]:
    """The public names, as views over base + journal."""
    profiles = f"""CREATE OR REPLACE VIEW profiles AS
        WITH p AS (SELECT scope, mpid, created_ms, first_seen_ms, last_seen_ms, status FROM profiles_base
                   UNION ALL SELECT {PROFILE.select()} FROM write_journal WHERE kind = 'profile')
        SELECT p.scope, p.mpid, p.created_ms, p.first_seen_ms,
               greatest(p.last_seen_ms, coalesce(t.last_seen_ms, p.last_seen_ms)) AS last_seen_ms,
               coalesce(s.status, p.status) AS status
        FROM p LEFT JOIN ({_TOUCHES}) AS t ON t.mpid = p.mpid LEFT JOIN ({_STATUSES}) AS s ON s.mpid = p.mpid"""
    identities = f"""CREATE OR REPLACE VIEW identities AS
        SELECT b.* FROM identities_base AS b
        WHERE NOT EXISTS (SELECT 1 FROM ({_REMOVED}) AS r WHERE {_key_match('r', 'b')})
        UNION ALL {_STANDING_ADDS}"""
    statements = [profiles, identities]
    for kind in APPEND_ONLY:
        statements.append(f"""CREATE OR REPLACE VIEW {kind.table} AS
            SELECT * FROM {kind.table}_base
            UNION ALL SELECT {kind.select()} FROM write_journal WHERE kind = '{kind.name}'""")
    return statements


def fold_statements() -> list[str]:
    """Move the identity rows of the journal into their base tables (engine/store.fold runs them all)."""
    statements = [
        f"INSERT INTO profiles_base SELECT {PROFILE.select()} FROM write_journal WHERE kind = 'profile'",
        f"""UPDATE profiles_base SET last_seen_ms = t.last_seen_ms FROM ({_TOUCHES}) AS t
            WHERE profiles_base.mpid = t.mpid AND t.last_seen_ms > profiles_base.last_seen_ms""",
        f"""UPDATE profiles_base SET status = s.status FROM ({_STATUSES}) AS s WHERE profiles_base.mpid = s.mpid""",
        f"""DELETE FROM identities_base USING ({_REMOVED}) AS r WHERE {_key_match('r', 'identities_base')}""",
        f"INSERT INTO identities_base {_STANDING_ADDS}",
    ]
    for kind in APPEND_ONLY:
        columns = ", ".join(column for column, _ in kind.columns)
        statements.append(f"INSERT INTO {kind.table}_base ({columns}) SELECT {kind.select()} FROM write_journal "
                          f"WHERE kind = '{kind.name}'")
    return statements
