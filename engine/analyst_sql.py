"""Analyst SQL: one read-only query against the idmesh database, for the admin (every workspace) or for one
workspace (only its rows). No HTTP here; api/sql_routes.py and api/sql_cli.py call `run_query`.

Read-only by construction, in layers that do not rely on each other:
1. engine/sql_guard.py: DuckDB's own parse tree shows exactly one SELECT reading only public views and its CTEs.
2. The query runs on its own connection (`cursor()`) inside `BEGIN TRANSACTION READ ONLY`, always rolled back:
   even a statement the check wrongly let through cannot write to the database.
3. That connection has Python replacement scans off (no name can read a Python object of this process, such as
   the writer's pending Arrow batch) and the instance has extension auto-install/auto-load off (a query naming an
   extension function downloads nothing). In file mode (no server) the database is also opened read-only with
   external access off and the configuration locked. The server's instance cannot have external access off:
   DuckDB then refuses the Python replacement scan the group-commit writer inserts with
   (`INSERT ... SELECT * FROM pending`); `disabled_filesystems` breaks checkpoints, and a locked configuration
   would stop each analyst connection from turning its replacement scans off. So on the server, files, URLs and
   other databases are kept out by layer 1 alone: statement kinds (COPY, ATTACH, ...) are refused twice, by the
   parsed statement type and by `json_serialize_sql`, and reads (table functions, strings in FROM) by kind.

A workspace caller's connection shadows each public view it reads with a TEMP view of the same name filtered to
the workspace: temporary objects belong to that connection and win over the database's names, and qualified
names are refused so the unfiltered view behind cannot be named. DuckDB may evaluate the caller's expressions
before that filter, so what they could reveal about other rows is closed too: errors raised while reading are
reported without their text, and stats() is refused (see sql_guard.DENIED_FUNCTIONS).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from engine.errors import BadRequest, IdmeshError
from engine.sql_guard import check_select

if TYPE_CHECKING:
    from engine.workspaces import Workspace

# The views (and the one table) analysts may query, each with the column that holds the workspace (or identity scope)
# of a row. Register new public names here; a name only becomes readable once it exists in the database's main
# schema and, for workspace callers, has that column.
PUBLIC_VIEWS: dict[str, str] = {
    "profiles": "scope",
    "identities": "scope",
    "hub_values": "scope",
    "identity_changes": "workspace_id",
    "aliases": "workspace_id",
    "events": "workspace_id",
    "batches": "workspace_id",
    "user_attributes": "workspace_id",
    "consent": "workspace_id",
    "consent_history": "workspace_id",
    "alias_effects": "workspace_id",  # a table: what alias processing and unalias did
    "calculated_attributes": "workspace_id",  # tables: definitions and current values
    "calculated_attribute_values": "workspace_id",
    "calculated_attribute_seeds": "workspace_id",
    "audiences": "workspace_id",
    "audience_members": "workspace_id",
    "audience_membership_history": "workspace_id",  # tables: every stay in an audience, size points
    "audience_sizes": "workspace_id",
    "audience_stats": "workspace_id",
    "connections": "workspace_id",  # delivery: connections without their sealed credentials (a view)
    "delivery_status": "workspace_id",
    "delivery_state": "workspace_id",  # tables: what destinations hold, pending changes, requests sent
    "delivery_outbox": "workspace_id",
    "delivery_attempts": "workspace_id",
}

# What a restriction column is compared with for a workspace caller.
_WORKSPACE_VALUES: dict[str, Callable[[Workspace], str]] = {
    "scope": lambda workspace: workspace.scope,
    "workspace_id": lambda workspace: workspace.id,
}

DEFAULT_LIMIT = 10_000
MAX_LIMIT = 100_000
DEFAULT_TIMEOUT_SECONDS = 30.0
MAX_TIMEOUT_SECONDS = 300.0

# Set on the whole instance: they only concern extensions, which the server never loads at run time (json, parquet
# and icu are built in), and a query naming an extension function must not download code.
_INSTANCE_SETTINGS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False,
                      "allow_community_extensions": False}
_FILE_CONFIG = {"enable_external_access": False, "python_enable_replacements": False, **_INSTANCE_SETTINGS,
                "lock_configuration": True}


# Types DuckDB hands to Arrow in its internal encoding (BIT, BIGNUM) or without their offset (TIMETZ): answered as
# DuckDB's own text; `QueryResult.types` still names the original type.
_AS_TEXT = frozenset({"BIT", "BIGNUM", "VARINT", "TIME WITH TIME ZONE"})


class QueryTimeout(IdmeshError):
    """The query ran past its statement timeout and was interrupted; nothing it did remains."""

    status = 400
    code = "QUERY_TIMEOUT"


@dataclass(frozen=True)
class QueryResult:
    table: pa.Table             # at most `limit` rows
    types: tuple[str, ...]      # DuckDB type of each column, e.g. BIGINT, JSON, TIMESTAMP WITH TIME ZONE
    truncated: bool             # the query had more rows than `limit`
    limit: int

    @property
    def row_count(self) -> int:
        return self.table.num_rows

    @property
    def columns(self) -> list[dict[str, str]]:
        return [{"name": name, "type": kind} for name, kind in zip(self.table.column_names, self.types)]


def open_read_only(path: str) -> duckdb.DuckDBPyConnection:
    """Open a database file for analyst queries when no server owns it: read-only, no file or network access,
    no extension loading, configuration locked."""
    return duckdb.connect(path, read_only=True, config=dict(_FILE_CONFIG))


def run_query(connection: duckdb.DuckDBPyConnection, sql: Any, workspace: Workspace | None = None,
              limit: Any = DEFAULT_LIMIT, timeout_seconds: Any = DEFAULT_TIMEOUT_SECONDS) -> QueryResult:
    """Check and run one analyst query. `workspace=None` reads every workspace (admin, or the file owner);
    otherwise only that workspace's rows are visible. Blocking: call it off the event loop."""
    limit = _checked_limit(limit)
    timeout_seconds = _checked_timeout(timeout_seconds)
    cursor = connection.cursor()  # its own DuckDB connection: temp views, settings and transaction stay here
    try:
        _harden(cursor)
        database = cursor.execute("SELECT current_database()").fetchall()[0][0]
        readable = _readable_views(cursor, database, restricted=workspace is not None)
        qualifiers = () if workspace is not None else ("main", database)
        checked = check_select(cursor, sql, readable, qualifiers)
        if workspace is not None:
            for view in sorted(checked.views):
                cursor.execute(_restricted_view(database, view, PUBLIC_VIEWS[view], workspace))
        cursor.execute("BEGIN TRANSACTION READ ONLY")
        return _execute(cursor, checked.statement, limit, timeout_seconds, restricted=workspace is not None)
    finally:
        cursor.close()  # drops the temp views and rolls back whatever is still open


def _execute(cursor: duckdb.DuckDBPyConnection, statement: duckdb.Statement, limit: int, timeout_seconds: float,
             restricted: bool) -> QueryResult:
    finished = threading.Event()
    fired = threading.Event()

    def stop() -> None:
        if not finished.is_set():
            fired.set()
            cursor.interrupt()

    timer = threading.Timer(timeout_seconds, stop)
    timer.daemon = True
    timer.start()
    reading = False
    try:
        relation = cursor.sql(statement)  # binds only: no row is read yet
        types = tuple(str(t) for t in relation.types)
        if any(kind in _AS_TEXT for kind in types):
            relation = relation.project(", ".join(
                f"{_identifier(name)}::VARCHAR AS {_identifier(name)}" if kind in _AS_TEXT else _identifier(name)
                for name, kind in zip(relation.columns, types)))
        reading = True
        # limit + 1 rows tell a complete answer from a cut one without reading the rest
        table = relation.limit(limit + 1).to_arrow_table()
    except duckdb.InterruptException:
        if fired.is_set():
            raise QueryTimeout(f"the query ran longer than its {timeout_seconds:g} s timeout and was stopped",
                               field="timeout_seconds") from None
        raise BadRequest("the query was interrupted", field="sql") from None
    except duckdb.Error as exc:
        if restricted and reading:
            # DuckDB does not promise to apply the workspace filter before the caller's own expressions, and an
            # error raised while reading (a failed cast, error()) can quote the row it failed on.
            raise BadRequest(f"the query failed while reading rows ({type(exc).__name__}); the details are withheld from "
                             f"workspace credentials because they can quote rows outside the workspace",
                             field="sql") from None
        raise BadRequest(f"the query failed: {str(exc).strip()}", field="sql") from None
    finally:
        finished.set()
        timer.cancel()
        try:
            cursor.execute("ROLLBACK")
        except duckdb.Error:
            pass  # an interrupted or failed transaction; closing the connection discards it
    truncated = table.num_rows > limit
    return QueryResult(table.slice(0, limit) if truncated else table, types, truncated, limit)


def _harden(cursor: duckdb.DuckDBPyConnection) -> None:
    """Instance settings (extensions) and this connection's own (Python replacement scans off). Each is set only
    when it differs, so a read-only file connection, whose configuration is locked, is left as it is."""
    settings = [(name, value, "GLOBAL") for name, value in _INSTANCE_SETTINGS.items()]
    settings.append(("python_enable_replacements", False, "SESSION"))
    for name, value, scope in settings:
        if cursor.execute("SELECT current_setting(?)", [name]).fetchall()[0][0] != value:
            cursor.execute(f"SET {scope} {name} = {str(value).lower()}")


def _readable_views(cursor: duckdb.DuckDBPyConnection, database: str, restricted: bool) -> list[str]:
    """The registered names that exist in the database's main schema (temporary objects live in `temp`, never
    here); for a restricted caller, only those that have their restriction column (one without it cannot be
    filtered, so it is not reachable)."""
    rows = cursor.execute(
        "SELECT table_name, list(column_name) FROM duckdb_columns() "
        "WHERE database_name = ? AND schema_name = 'main' AND list_contains(?, table_name) GROUP BY table_name",
        [database, list(PUBLIC_VIEWS)]).fetchall()
    if not restricted:
        return [name for name, _ in rows]
    return [name for name, columns in rows if PUBLIC_VIEWS[name] in columns and PUBLIC_VIEWS[name] in _WORKSPACE_VALUES]


def _restricted_view(database: str, view: str, column: str, workspace: Workspace) -> str:
    # The database is named in full: inside a temp view, `main.<view>` would resolve to the temp view itself.
    value = _WORKSPACE_VALUES[column](workspace)
    return (f"CREATE TEMP VIEW {_identifier(view)} AS SELECT * FROM {_identifier(database)}.main.{_identifier(view)} "
            f"WHERE {_identifier(column)} = {_literal(value)}")


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    # Workspace ids are generated by us ("ws_" + hex), but quote as if they were not.
    return "'" + value.replace("'", "''") + "'"


def _checked_limit(limit: Any) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}", field="limit")
    return limit


def _checked_timeout(timeout_seconds: Any) -> float:
    if isinstance(timeout_seconds, bool) or not isinstance(timeout_seconds, int | float) \
            or not 0 < timeout_seconds <= MAX_TIMEOUT_SECONDS:
        raise BadRequest(f"timeout_seconds must be a number above 0 and at most {MAX_TIMEOUT_SECONDS:g}",
                         field="timeout_seconds")
    return float(timeout_seconds)
