"""The read-only check for analyst SQL, made on DuckDB's own parse tree.

A query is accepted only when DuckDB parses it as exactly one SELECT (`json_serialize_sql` serializes nothing
else) and every relation the tree reads is either a common table expression in scope or one of the allowed
views. Everything else that can read data is refused by kind, not by name: table functions (read_csv, glob,
query_table, pragma_*, duckdb_* ...), strings in FROM (replacement scans of files and URLs), SHOW, and any
table-reference kind this module does not know (a newer DuckDB may add one: it is refused until reviewed).
Scalar functions are catalog-free except the few listed in DENIED_FUNCTIONS.

The tree is walked generically (every dict and list), so a reference inside a subquery in WHERE, a lambda, a
LIMIT expression, a PIVOT source or a DESCRIBE is seen wherever the serializer puts it.
"""

from __future__ import annotations

import json
import string
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import duckdb

from engine.errors import BadRequest

MAX_SQL_CHARS = 100_000

# Scalar functions that reach beyond the rows read: sequences (nextval writes), server settings, the log, the
# optimizer's column statistics (stats() reports min/max of the stored column, so through a view filtered to one
# workspace it would show another workspace's values), and DuckDB's built-in macros whose bodies read catalog table
# functions (view definitions, constraints, sizes).
DENIED_FUNCTIONS = frozenset({
    "nextval", "currval", "setval", "current_setting", "write_log", "stats",
    "pg_get_viewdef", "pg_get_constraintdef", "format_type", "get_block_size",
})

# Table references that only combine or produce rows from what they contain; their children are checked.
_COMBINING_REFS = frozenset({"JOIN", "SUBQUERY", "EMPTY", "EXPRESSION_LIST", "PIVOT"})
_KNOWN_REFS = _COMBINING_REFS | {"BASE_TABLE", "TABLE_FUNCTION", "SHOW_REF"}

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _fold(name: str) -> str:
    """An identifier as DuckDB compares it: case-insensitive in ASCII only. Python's lower() also folds other
    letters (KELVIN SIGN to k), which would let a CTE name match here that DuckDB binds to a real table."""
    return name.translate(_ASCII_LOWER)


@dataclass(frozen=True)
class CheckedQuery:
    statement: duckdb.Statement
    views: frozenset[str]  # the allowed views the query reads (lower case)


def check_select(cursor: duckdb.DuckDBPyConnection, sql: Any, allowed_views: Collection[str],
                 allowed_qualifiers: Collection[str] = ()) -> CheckedQuery:
    """Parse `sql` with DuckDB and accept it only if it is one SELECT reading `allowed_views` (and its own CTEs).

    `allowed_qualifiers` are the schema/catalog names a table reference may carry (empty: none at all, so a
    caller restricted by temporary views cannot name the database's own objects behind them). Raises BadRequest
    (field "sql") naming everything refused."""
    if not isinstance(sql, str) or not sql.strip():
        raise BadRequest("sql must be a non-empty string holding one SELECT query", field="sql")
    if len(sql) > MAX_SQL_CHARS:
        raise BadRequest(f"sql is longer than {MAX_SQL_CHARS} characters", field="sql")
    try:
        sql.encode("utf-8")
    except UnicodeEncodeError:  # JSON can carry a lone surrogate (\ud800); DuckDB takes UTF-8 only
        raise BadRequest("sql must be valid Unicode text", field="sql") from None
    statement = _single_select(cursor, sql)
    tree = _parse_tree(cursor, sql)
    walker = _TreeCheck({_fold(v) for v in allowed_views}, {_fold(q) for q in allowed_qualifiers})
    walker.walk(tree["statements"][0]["node"])
    if walker.refused:
        allowed = ", ".join(sorted(allowed_views)) or "none"
        raise BadRequest(f"query refused: {'; '.join(walker.refused)}. Analyst SQL is one read-only SELECT over "
                         f"the public views ({allowed})", field="sql")
    return CheckedQuery(statement, frozenset(walker.views))


def _single_select(cursor: duckdb.DuckDBPyConnection, sql: str) -> duckdb.Statement:
    try:
        statements = cursor.extract_statements(sql)
    except duckdb.Error as exc:
        raise BadRequest(f"the query does not parse: {_first_line(exc)}", field="sql") from None
    if len(statements) != 1:
        raise BadRequest(f"exactly one statement is allowed, found {len(statements)}", field="sql")
    try:
        kind = statements[0].type.name
    except ValueError:  # a statement kind the Python API has no name for (UPDATE EXTENSIONS, say)
        kind = "this kind of"
    if kind != "SELECT":
        raise BadRequest(f"{kind} statements are refused: analyst SQL is one read-only SELECT", field="sql")
    return statements[0]


def _parse_tree(cursor: duckdb.DuckDBPyConnection, sql: str) -> dict[str, Any]:
    serialized = cursor.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0]
    try:
        tree = json.loads(serialized)
    except RecursionError:
        raise BadRequest("the query is nested too deeply", field="sql") from None
    if tree.get("error"):
        # json_serialize_sql refuses every statement that is not a SELECT
        raise BadRequest(f"query refused: {tree.get('error_message', 'not a SELECT')}", field="sql")
    if len(tree.get("statements", ())) != 1:
        raise BadRequest("exactly one statement is allowed", field="sql")
    return tree


class _TreeCheck:
    """Walks the serialized tree with an explicit stack (no recursion limit), carrying the CTE names in scope."""

    def __init__(self, allowed_views: set[str], allowed_qualifiers: set[str]) -> None:
        self.allowed_views = allowed_views
        self.allowed_qualifiers = allowed_qualifiers
        self.views: set[str] = set()
        self.refused: list[str] = []

    def refuse(self, reason: str) -> None:
        if reason not in self.refused:
            self.refused.append(reason)

    def walk(self, root: Any) -> None:
        # (node, CTE names visible at this node, name of the recursive CTE whose body this node is)
        stack: list[tuple[Any, frozenset[str], str | None]] = [(root, frozenset(), None)]
        while stack:
            node, ctes, recursive_name = stack.pop()
            if isinstance(node, list):
                stack.extend((item, ctes, None) for item in node)
            elif isinstance(node, dict):
                stack.extend(self._children(node, ctes, recursive_name))

    def _children(self, node: dict[str, Any], ctes: frozenset[str], recursive_name: str | None
                  ) -> list[tuple[Any, frozenset[str], str | None]]:
        kind = node.get("type")
        if not isinstance(kind, str):  # a plain container, or a type descriptor ({"id": "DOUBLE"})
            return [(value, ctes, None) for value in node.values()]
        if "cte_map" in node:
            return self._query_node(node, ctes, recursive_name)
        if "class" in node:
            self._expression(node)
            return [(value, ctes, None) for value in node.values()]
        if kind in _KNOWN_REFS or ("alias" in node and "sample" in node):
            return self._table_ref(node, kind, ctes)
        if "table_name" in node or "function_name" in node:
            # names a relation in a shape this module does not know: refuse rather than guess
            self.refuse(f"{kind} nodes")
        return [(value, ctes, None) for value in node.values()]

    def _query_node(self, node: dict[str, Any], ctes: frozenset[str], recursive_name: str | None
                    ) -> list[tuple[Any, frozenset[str], str | None]]:
        children: list[tuple[Any, frozenset[str], str | None]] = []
        scope = ctes
        # A CTE body sees the CTEs defined before it, never later ones: treating a later name as a CTE would
        # accept a reference DuckDB might bind to a real table of that name.
        for entry in node["cte_map"].get("map", []):
            name = _fold(str(entry["key"]))
            for key, value in entry["value"].items():
                body_of = name if key == "query_node" else None
                children.append((value, scope, body_of))
            scope = scope | {name}
        recursive = node["type"] == "RECURSIVE_CTE_NODE" and recursive_name is not None \
            and _fold(str(node.get("cte_name", ""))) == recursive_name
        for key, value in node.items():
            if key == "cte_map":
                continue
            # only the recursive part of WITH RECURSIVE may name its own CTE
            children.append((value, scope | {recursive_name} if recursive and key == "right" else scope, None))
        return children

    def _expression(self, node: dict[str, Any]) -> None:
        if node.get("class") == "FUNCTION":
            name = _fold(str(node.get("function_name", "")))
            if name in DENIED_FUNCTIONS:
                self.refuse(f"function {name}() is not available to analyst SQL")

    def _table_ref(self, node: dict[str, Any], kind: str, ctes: frozenset[str]
                   ) -> list[tuple[Any, frozenset[str], str | None]]:
        children = [(value, ctes, None) for value in node.values()]
        if kind == "BASE_TABLE":
            self._base_table(node, ctes)
        elif kind == "TABLE_FUNCTION":
            function = node.get("function") or {}
            name = function.get("function_name", "?") if isinstance(function, dict) else "?"
            self.refuse(f"table function {name}() (table functions can read files, URLs and the catalog)")
        elif kind == "SHOW_REF":
            if node.get("query") is None:
                self.refuse("SHOW (it lists the whole catalog); use DESCRIBE <view> or SUMMARIZE <view>")
            # DESCRIBE/SUMMARIZE bind their query on their own: an outer CTE name is not trusted inside.
            return [(node.get("query"), frozenset(), None)]
        elif kind not in _COMBINING_REFS:
            self.refuse(f"{kind} table references")
        return children

    def _base_table(self, node: dict[str, Any], ctes: frozenset[str]) -> None:
        name = str(node.get("table_name", ""))
        qualifiers = [str(q) for q in (node.get("catalog_name"), node.get("schema_name")) if q]
        if not qualifiers and _fold(name) in ctes:
            return
        shown = ".".join(qualifiers + [name])
        if any(_fold(q) not in self.allowed_qualifiers for q in qualifiers):
            self.refuse(f"qualified name {shown} (name the public views without a schema or catalog)")
        elif _fold(name) in self.allowed_views:
            self.views.add(_fold(name))
        elif any(c in name for c in "./:\\"):
            self.refuse(f"reading the file or URL '{name}'")
        else:
            self.refuse(f"{shown} is not a public view")


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
