"""Keeping calculated attribute values in DuckDB: the full computation at activation (with progress), the
incremental one for the profiles an ingested batch touched, and time-driven changes (windows expiring,
future-stamped events starting to count).

Events are read from DuckDB as Arrow, already narrowed to the definition's data point and period start, with
each attribute the definition reads extracted as text (engine/ca_read.py; attributes of one workspace computed
together share their reads); polars does the rest (engine/ca_compute.py). Values are derived data: they are
written on their own cursor and transaction, never blocking the group-commit writer, and a crash at worst
leaves a computation to run again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import duckdb
import orjson
import polars as pl
import pyarrow as pa

from engine.ca_compute import counted_events
from engine.ca_definitions import Definition
from engine.ca_read import CHUNKS, read_each
from engine.ca_read import attribute_extractions as attribute_extractions  # audiences/evaluate.py reads through it
from engine.ca_registry import CalculatedAttribute
from engine.ca_seeds import Seed, compute_seeded
from engine.computation_gate import ComputationGate
from engine.store import now_ms


@dataclass
class CalculationStatus:
    state: str = "not_started"        # not_started, calculating, ready, failed
    progress: float = 0.0
    started_ms: int | None = None
    finished_ms: int | None = None
    error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_json(self) -> dict[str, object]:
        estimate = None
        if self.state == "calculating" and self.progress > 0 and self.started_ms is not None:
            elapsed = now_ms() - self.started_ms
            estimate = self.started_ms + int(elapsed / self.progress)
        return {"status": self.state, "progress": round(self.progress, 4), "started_timestamp_ms": self.started_ms,
                "completed_timestamp_ms": self.finished_ms, "estimated_completion_timestamp_ms": estimate,
                "error": self.error}


def value_rows(definition: Definition, events: pl.DataFrame, as_of_ms: int, mpids: list[int] | None,
               workspace_id: str, ca_id: int, seeds: dict[int, Seed] | None = None) -> pa.Table:
    """Rows for calculated_attribute_values: every profile with a value or a coming change."""
    values = compute_seeded(definition, events, as_of_ms, seeds or {})
    changes = _changes_at(definition, events, as_of_ms)
    wanted = sorted(set(values) | set(changes)) if mpids is None else sorted(set(mpids) & (set(values) | set(changes)))
    stamp = now_ms()
    return pa.table({
        "workspace_id": pa.array([workspace_id] * len(wanted), pa.string()),
        "ca_id": pa.array([ca_id] * len(wanted), pa.int64()), "mpid": pa.array(wanted, pa.int64()),
        # typed even when every value is missing: several attributes' rows are concatenated (refresh_many)
        "value": pa.array([orjson.dumps(values[m]).decode() if m in values else None for m in wanted], pa.string()),
        "computed_ms": pa.array([stamp] * len(wanted), pa.int64()),
        "changes_at_ms": pa.array([changes.get(m) for m in wanted], pa.int64()),
    })


def read_seeds(cursor: duckdb.DuckDBPyConnection, ca_id: int, mpids: list[int] | None = None,
               chunk: int | None = None) -> dict[int, Seed]:
    query = "SELECT mpid, value, as_of_ms, seed_count, seed_values FROM calculated_attribute_seeds WHERE ca_id = ?"
    params: list[object] = [ca_id]
    if mpids is not None:
        query += " AND list_contains(?, mpid)"
        params.append(mpids)
    if chunk is not None:
        query += f" AND hash(mpid) % {CHUNKS} = ?"
        params.append(chunk)
    return {mpid: Seed(mpid, orjson.loads(value), as_of, count, tuple(orjson.loads(values)) if values else None)
            for mpid, value, as_of, count, values in cursor.execute(query, params).fetchall()}


def seed_statement(workspace_id: str, ca_id: int, seeds: list[Seed]) -> Callable[[duckdb.DuckDBPyConnection], None]:
    """A writer statement storing seeds (a later seed for the same profile replaces the earlier one)."""
    rows = [[workspace_id, ca_id, s.mpid, orjson.dumps(s.value).decode(), s.as_of_ms, s.count,
             orjson.dumps(list(s.values)).decode() if s.values is not None else None] for s in seeds]

    def store(cur: duckdb.DuckDBPyConnection) -> None:
        cur.executemany("INSERT OR REPLACE INTO calculated_attribute_seeds VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    return store


def _changes_at(definition: Definition, events: pl.DataFrame, as_of_ms: int) -> dict[int, int]:
    frames = [events.filter(pl.col("timestamp_ms") > as_of_ms).group_by("mpid").agg(
        pl.col("timestamp_ms").min().alias("at"))]
    window = definition.time_period.window_ms
    if window is not None:
        frames.append(counted_events(definition, events, as_of_ms).group_by("mpid").agg(
            (pl.col("timestamp_ms").min() + window + 1).alias("at")))
    return dict(pl.concat(frames).group_by("mpid").agg(pl.col("at").min()).iter_rows())


class CalculatedAttributeEngine:
    def __init__(self, connection: duckdb.DuckDBPyConnection, gate: ComputationGate | None = None) -> None:
        self._connection = connection
        self.status: dict[int, CalculationStatus] = {}
        # an erasure deletes value rows too: computations share this gate with it (engine/computation_gate.py)
        self._gate = gate or ComputationGate()

    def status_of(self, ca_id: int) -> CalculationStatus:
        return self.status.setdefault(ca_id, CalculationStatus())

    def compute_all(self, ca: CalculatedAttribute, as_of_ms: int | None = None) -> None:
        """Full computation (activation, backfill): replaces every value of `ca`, reporting progress."""
        self.compute_many([ca], as_of_ms)

    def compute_many(self, attributes: Sequence[CalculatedAttribute], as_of_ms: int | None = None) -> None:
        """Full computation of attributes of one workspace (start-up computes every active one): replaces all
        their values in one transaction, reporting progress on each. Definitions of one event type share every
        read, which is most of the work."""
        if not attributes:
            return
        with self._computing(attributes) as ordered:
            statuses = [self.status_of(ca.id) for ca in ordered]
            started = now_ms()
            for status in statuses:
                status.state, status.progress, status.started_ms, status.finished_ms, status.error = (
                    "calculating", 0.0, started, None, None)
            definitions = [ca.active() for ca in ordered]
            as_of = as_of_ms or now_ms()
            cursor = self._connection.cursor()
            try:
                cursor.begin()
                cursor.execute("DELETE FROM calculated_attribute_values WHERE list_contains(?, ca_id)",
                               [[ca.id for ca in ordered]])
                for chunk in range(CHUNKS):
                    for position, events in read_each(cursor, ordered[0].workspace_id, definitions, as_of,
                                                      chunk=chunk):
                        ca = ordered[position]
                        seeds = read_seeds(cursor, ca.id, chunk=chunk)
                        rows = value_rows(definitions[position], events, as_of, None, ca.workspace_id,  # noqa: F841
                                          ca.id, seeds)
                        cursor.execute("INSERT INTO calculated_attribute_values SELECT * FROM rows")
                    for status in statuses:
                        status.progress = (chunk + 1) / CHUNKS
                cursor.commit()
                finished = now_ms()
                for status in statuses:
                    status.state, status.finished_ms = "ready", finished
            except Exception as exc:
                cursor.rollback()
                for status in statuses:
                    status.state, status.error = "failed", str(exc)
                raise
            finally:
                cursor.close()

    def refresh(self, ca: CalculatedAttribute, mpids: list[int], as_of_ms: int | None = None) -> None:
        """Incremental: recompute these profiles only (an ingested batch touched them, or time changed them)."""
        self.refresh_many([ca], mpids, as_of_ms)

    def refresh_many(self, attributes: Sequence[CalculatedAttribute], mpids: list[int],
                     as_of_ms: int | None = None) -> None:
        """Incremental for attributes of one workspace: these profiles only, definitions of one event type
        sharing each read, all values replaced in one transaction."""
        if not mpids or not attributes:
            return
        as_of = as_of_ms or now_ms()
        # a running full computation holds its attribute's lock: waiting for it keeps the two from writing the
        # same rows, and this refresh then sees the events that arrived meanwhile
        with self._computing(attributes) as ordered:
            definitions = [ca.active() for ca in ordered]
            cursor = self._connection.cursor()
            try:
                frames = []
                for position, events in read_each(cursor, ordered[0].workspace_id, definitions, as_of, mpids=mpids):
                    ca = ordered[position]
                    seeds = read_seeds(cursor, ca.id, mpids=mpids)
                    frames.append(value_rows(definitions[position], events, as_of, mpids, ca.workspace_id, ca.id,
                                             seeds))
                rows = pa.concat_tables(frames)  # noqa: F841 (read by the INSERT below)
                cursor.begin()
                cursor.execute("DELETE FROM calculated_attribute_values WHERE list_contains(?, ca_id) "
                               "AND list_contains(?, mpid)", [[ca.id for ca in ordered], mpids])
                cursor.execute("INSERT INTO calculated_attribute_values SELECT * FROM rows")
                cursor.commit()
            finally:
                cursor.close()

    @contextmanager
    def _computing(self, attributes: Sequence[CalculatedAttribute]) -> Iterator[list[CalculatedAttribute]]:
        """Holds the attributes' locks (taken in id order, so two computations never wait on each other crosswise)
        and the computation gate; yields the attributes in that order."""
        if len({ca.workspace_id for ca in attributes}) != 1:
            raise ValueError("attributes computed together belong to one workspace")
        ordered = sorted(attributes, key=lambda ca: ca.id)
        with ExitStack() as held:
            for ca in ordered:
                held.enter_context(self.status_of(ca.id).lock)
            held.enter_context(self._gate.computing())
            yield ordered

    def due(self, ca: CalculatedAttribute, as_of_ms: int) -> list[int]:
        """Profiles whose value time alone has changed by `as_of_ms`."""
        cursor = self._connection.cursor()
        try:
            rows = cursor.execute("SELECT mpid FROM calculated_attribute_values WHERE ca_id = ? AND changes_at_ms <= ?",
                                  [ca.id, as_of_ms]).fetchall()
        finally:
            cursor.close()
        return [row[0] for row in rows]

    def values(self, workspace_id: str, mpid: int) -> dict[int, object]:
        cursor = self._connection.cursor()
        try:
            rows = cursor.execute("SELECT ca_id, value FROM calculated_attribute_values WHERE workspace_id = ? "
                                  "AND mpid = ? AND value IS NOT NULL", [workspace_id, mpid]).fetchall()
        finally:
            cursor.close()
        return {ca_id: orjson.loads(value) for ca_id, value in rows}
