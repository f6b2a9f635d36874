"""`idmesh sql "SELECT ..."`: analyst SQL from a terminal.

It asks the running server (POST /v1/sql with the admin token), because the server process owns the DuckDB file.
When nothing listens at --url (connection refused), it opens the file itself, read-only, with the same checks
(engine/analyst_sql.py). Either way the answer goes through the same JSON/CSV/Parquet serializers.
"""

from __future__ import annotations

import argparse
import decimal
import json
import os
import sys
from pathlib import Path
from typing import Any

import duckdb
import httpx

from engine import analyst_sql
from engine.errors import IdmeshError
from engine.sql_formats import render_text, serialize

DEFAULT_URL = "http://127.0.0.1:8080"


def add_sql_command(subparsers: Any) -> None:  # noqa: ANN401 (argparse's subparsers action has no public type)
    sql = subparsers.add_parser("sql", help="run one read-only SQL query over the public views",
                                description="Run one read-only SELECT over the public views (profiles, identities, "
                                            "identity_changes, aliases, hub_values, events, ...). Asks the server "
                                            "at --url; when none answers, reads the --db file directly.")
    sql.add_argument("query", help="one SELECT statement")
    sql.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    sql.add_argument("--output", "-o", help="write the answer to this file (required for parquet)")
    sql.add_argument("--limit", type=int, default=analyst_sql.DEFAULT_LIMIT,
                     help=f"rows at most (1..{analyst_sql.MAX_LIMIT}, default {analyst_sql.DEFAULT_LIMIT})")
    sql.add_argument("--timeout", type=float, default=analyst_sql.DEFAULT_TIMEOUT_SECONDS,
                     help="statement timeout in seconds (default 30)")
    sql.add_argument("--url", default=os.environ.get("IDMESH_URL", DEFAULT_URL),
                     help="server to ask (default $IDMESH_URL or http://127.0.0.1:8080); admin token from "
                          "$IDMESH_ADMIN_TOKEN")
    sql.add_argument("--db", default=None, help="DuckDB file read when no server answers (default as idmesh serve)")


def sql_command(args: argparse.Namespace) -> int:
    if args.format == "parquet" and not args.output:
        print("idmesh sql: parquet is binary; give --output FILE", file=sys.stderr)
        return 2
    try:
        args.query.encode("utf-8")
    except UnicodeEncodeError:  # bytes the locale could not decode arrive as lone surrogates
        print("idmesh sql: the query is not valid UTF-8 text", file=sys.stderr)
        return 1
    wire_format = "json" if args.format == "table" else args.format
    try:
        payload, truncated = _from_server(args, wire_format)
    except httpx.ConnectError:
        print(f"idmesh sql: no server at {args.url}; reading {_db_path(args)} directly (read-only)", file=sys.stderr)
        try:
            payload, truncated = _from_file(args, wire_format)
        except _Failed as failure:
            print(f"idmesh sql: {failure}", file=sys.stderr)
            return 1
    except _Failed as failure:
        print(f"idmesh sql: {failure}", file=sys.stderr)
        return 1
    if args.format == "table":
        # exact numbers: a HUGEINT or DECIMAL must not pass through a float on its way to the screen
        document = json.loads(payload, parse_float=decimal.Decimal)
        payload = render_text(document, width=None if args.output else _terminal_width()).encode()
    elif truncated:
        print(f"idmesh sql: the answer was cut at --limit {args.limit} rows", file=sys.stderr)
    if args.output:
        Path(args.output).write_bytes(payload)
    else:
        sys.stdout.buffer.write(payload)
        sys.stdout.buffer.flush()
    return 0


class _Failed(Exception):
    """A refusal or failure to report in one line."""


def _from_server(args: argparse.Namespace, wire_format: str) -> tuple[bytes, bool]:
    token = os.environ.get("IDMESH_ADMIN_TOKEN", "")
    body = {"sql": args.query, "format": wire_format, "limit": args.limit, "timeout_seconds": args.timeout}
    with httpx.Client(base_url=args.url, timeout=args.timeout + 30) as client:
        response = client.post("/v1/sql", json=body, headers={"Authorization": f"Bearer {token}"})
    if response.status_code != 200:
        raise _Failed(_server_error(response, token))
    return response.content, response.headers.get("x-idmesh-truncated") == "true"


def _server_error(response: httpx.Response, token: str) -> str:
    try:
        error = response.json()["errors"][0]
        message = f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, IndexError, TypeError):
        message = f"HTTP {response.status_code}: {response.text[:500]}"
    if response.status_code == 401 and not token:
        message += " (set IDMESH_ADMIN_TOKEN to the server's admin token)"
    return message


def _from_file(args: argparse.Namespace, wire_format: str) -> tuple[bytes, bool]:
    path = _db_path(args)
    if not Path(path).exists():
        raise _Failed(f"no database at {path}")
    try:
        connection = analyst_sql.open_read_only(path)
    except duckdb.Error as exc:  # most often: a running server holds the file's lock
        raise _Failed(f"cannot open {path} ({str(exc).strip().splitlines()[0]}); if a server holds it, ask that "
                      f"server instead (--url)") from None
    try:
        result = analyst_sql.run_query(connection, args.query, None, args.limit, args.timeout)
        return serialize(result, wire_format), result.truncated
    except IdmeshError as exc:
        raise _Failed(f"{exc.code}: {exc.message}") from None
    finally:
        connection.close()


def _db_path(args: argparse.Namespace) -> str:
    if args.db:
        return args.db
    from api.cli import DEFAULT_DB  # here, not at import: api.cli imports this module
    return os.environ.get("IDMESH_DB", DEFAULT_DB)


def _terminal_width() -> int | None:
    return os.get_terminal_size().columns if sys.stdout.isatty() else None
