"""Audience rows for tests that need some without evaluating anything: a definition row and its members, written
through a running server's group-commit writer, the way the registry and the upkeep write them."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable

import duckdb
import polars as pl
from live_server import LiveServer

from audiences.membership import apply_members
from engine.writer import WriteBatch

# far above the ids a registry gives out in a test, so a seeded audience never meets a created one
_ids = itertools.count(900_001)


def definition_row(audience_id: int, workspace_id: str, name: str, at_ms: int) -> list:
    definition = {"name": name, "criteria": {"identity": {"type": "email", "present": True}}}
    return [audience_id, workspace_id, name, name, None, "real_time", None, json.dumps(definition), at_ms, at_ms]


def seed_audience(server: LiveServer, workspace_id: str, name: str, members: list[int],
                  at_ms: int | None = None) -> int:
    """A new audience of the workspace with these members; its id."""
    audience_id = next(_ids)
    at = at_ms if at_ms is not None else time.time_ns() // 1_000_000

    def write(cur: duckdb.DuckDBPyConnection) -> None:
        cur.execute("INSERT INTO audience_definitions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    definition_row(audience_id, workspace_id, name, at))

    _commit(server, write)
    apply_audience(server, workspace_id, audience_id, members, at)
    return audience_id


def apply_audience(server: LiveServer, workspace_id: str, audience_id: int, members: list[int], at_ms: int) -> None:
    """Make these the audience's members (audiences.membership.apply_members, in a writer transaction)."""
    _commit(server, lambda cur: apply_members(cur, workspace_id, audience_id, pl.Series(members, dtype=pl.Int64),
                                              at_ms))


def _commit(server: LiveServer, statement: Callable[[duckdb.DuckDBPyConnection], None]) -> None:
    batch = WriteBatch()
    batch.statements.append(statement)
    server.service.writer.submit(batch).result(timeout=30)
