"""Where data subject requests live in DuckDB: the tables (migration 3) and the statements that write them.

The statements are run by the group-commit writer inside its transaction (`WriteBatch.statements`); each
captures the values it writes when it is planned, because the in-memory record may change before it runs.
DSR traffic is rare (a few requests a minute at most), so plain SQL statements cost nothing that matters.
"""

from __future__ import annotations

from collections.abc import Callable

import duckdb
import orjson

from engine.dsr_model import DsrRecord

Statement = Callable[[duckdb.DuckDBPyConnection], None]

TABLES_DDL = """
CREATE TABLE dsr_requests (
    workspace_id VARCHAR NOT NULL,
    subject_request_id VARCHAR NOT NULL,
    regulation VARCHAR NOT NULL,
    subject_request_type VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    group_id VARCHAR,
    submitted_ms BIGINT NOT NULL,
    received_ms BIGINT NOT NULL,
    process_after_ms BIGINT NOT NULL,
    subject_identities JSON,
    identity_types JSON NOT NULL,
    mpid BIGINT,
    status_callback_urls JSON NOT NULL,
    results_count BIGINT,
    updated_ms BIGINT NOT NULL,
    completed_ms BIGINT
);

CREATE TABLE dsr_exports (
    workspace_id VARCHAR NOT NULL,
    subject_request_id VARCHAR NOT NULL,
    mpid BIGINT,
    created_ms BIGINT NOT NULL,
    content JSON NOT NULL
);

CREATE TABLE dsr_callbacks (
    seq BIGINT NOT NULL,
    workspace_id VARCHAR NOT NULL,
    subject_request_id VARCHAR NOT NULL,
    url VARCHAR NOT NULL,
    body VARCHAR NOT NULL,
    created_ms BIGINT NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_ms BIGINT NOT NULL,
    delivered_ms BIGINT,
    given_up_ms BIGINT,
    last_error VARCHAR
);

CREATE TABLE erased_identities (
    scope VARCHAR NOT NULL,
    identity_hash VARCHAR NOT NULL,
    erased_ms BIGINT NOT NULL
);

CREATE TABLE erased_replay_keys (
    workspace_id VARCHAR NOT NULL,
    replay_key BIGINT NOT NULL
);

CREATE TABLE erasure_events (
    workspace_id VARCHAR NOT NULL,
    subject_request_id VARCHAR NOT NULL,
    erased_ms BIGINT NOT NULL,
    identity_types JSON NOT NULL,
    identity_hashes JSON NOT NULL,
    deleted_rows BIGINT NOT NULL,
    forwarded_ms BIGINT
);

COMMENT ON TABLE dsr_requests IS 'OpenDSR v3 data subject requests (POST /v3/requests) and their status';
COMMENT ON COLUMN dsr_requests.subject_identities IS
    'identities as received (type -> value); NULL once the request is completed or cancelled';
COMMENT ON COLUMN dsr_requests.mpid IS 'the profile the request concerns; NULL when none was found or it was erased';
COMMENT ON TABLE dsr_exports IS 'access / portability results: everything held about the person, as JSON';
COMMENT ON TABLE dsr_callbacks IS 'status callbacks to controllers: signed body, delivery attempts, retries';
COMMENT ON TABLE erased_identities IS
    'tombstones: keyed SHA-256 of scope, type and normalized value of every erased identity (engine/tombstones.py)';
COMMENT ON TABLE erased_replay_keys IS 'replay keys of batches an erasure deleted: replaying them stores nothing';
COMMENT ON TABLE erasure_events IS
    'one row per erasure, for destinations to forward (forwarded_ms stays NULL until a destination does)';
"""

_REQUEST_COLUMNS = ("workspace_id, subject_request_id, regulation, subject_request_type, status, group_id, submitted_ms, "
                    "received_ms, process_after_ms, subject_identities, identity_types, mpid, status_callback_urls, "
                    "results_count, updated_ms, completed_ms")


def _json(value: object) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def load_requests(connection: duckdb.DuckDBPyConnection) -> list[DsrRecord]:
    cursor = connection.cursor()
    try:
        rows = cursor.execute(f"SELECT {_REQUEST_COLUMNS} FROM dsr_requests ORDER BY received_ms").fetchall()
    finally:
        cursor.close()
    records = []
    for (workspace_id, request_id, regulation, request_type, status, group_id, submitted, received, after,
         identities, types, mpid, urls, count, updated, completed) in rows:
        records.append(DsrRecord(workspace_id, request_id, regulation, request_type, status, group_id, submitted,
                                 received, after, None if identities is None else orjson.loads(identities),
                                 orjson.loads(types), mpid, orjson.loads(urls), count, updated, completed))
    return records


def insert_request(record: DsrRecord) -> Statement:
    values = [record.workspace_id, record.subject_request_id, record.regulation, record.request_type, record.status,
              record.group_id, record.submitted_ms, record.received_ms, record.process_after_ms,
              _json(record.identities), _json(record.identity_types), record.mpid, _json(record.status_callback_urls),
              record.results_count, record.updated_ms, record.completed_ms]

    def insert(cur: duckdb.DuckDBPyConnection) -> None:
        cur.execute(f"INSERT INTO dsr_requests ({_REQUEST_COLUMNS}) VALUES ({', '.join('?' * 16)})", values)

    return insert


def update_request(record: DsrRecord) -> Statement:
    """Write the record's status and what it still holds."""
    values = [record.status, _json(record.identities), record.mpid, record.results_count, record.updated_ms,
              record.completed_ms, record.workspace_id, record.subject_request_id]

    def update(cur: duckdb.DuckDBPyConnection) -> None:
        cur.execute("UPDATE dsr_requests SET status = ?, subject_identities = ?, mpid = ?, results_count = ?, "
                    "updated_ms = ?, completed_ms = ? WHERE workspace_id = ? AND subject_request_id = ?", values)

    return update


def insert_export(record: DsrRecord, mpid: int | None, created_ms: int, content: bytes) -> Statement:
    values = [record.workspace_id, record.subject_request_id, mpid, created_ms, content.decode()]

    def insert(cur: duckdb.DuckDBPyConnection) -> None:
        cur.execute("INSERT INTO dsr_exports VALUES (?, ?, ?, ?, ?)", values)

    return insert


def read_export_content(connection: duckdb.DuckDBPyConnection, workspace_id: str, subject_request_id: str
                        ) -> bytes | None:
    cursor = connection.cursor()
    try:
        row = cursor.execute("SELECT content FROM dsr_exports WHERE workspace_id = ? AND subject_request_id = ?",
                             [workspace_id, subject_request_id]).fetchone()
    finally:
        cursor.close()
    return None if row is None else row[0].encode()


def database_path(connection: duckdb.DuckDBPyConnection) -> str | None:
    """The file the connection writes, or None for an in-memory database."""
    cursor = connection.cursor()
    try:
        row = cursor.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    finally:
        cursor.close()
    return row[0] if row and row[0] else None
