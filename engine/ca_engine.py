"""Keeping calculated attribute values in DuckDB: the full computation at activation (with progress), the
incremental one for the profiles an ingested batch touched, and time-driven changes (windows expiring,
future-stamped events starting to count).

Events are read from DuckDB as Arrow, already narrowed to the definition's data point and period start, with
each attribute the definition reads extracted as text; polars does the rest (engine/ca_compute.py). Values
are derived data: they are written on their own cursor and transaction, never blocking the group-commit
writer, and a crash at worst leaves a computation to run again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import duckdb
import orjson
import polars as pl
import pyarrow as pa

from engine.ca_compute import attribute_column, counted_events
from engine.ca_definitions import Definition
from engine.ca_registry import CalculatedAttribute
from engine.ca_seeds import Seed, compute_seeded
from engine.computation_gate import ComputationGate
from engine.store import now_ms

CHUNKS = 16  # progress granularity of a full computation: profiles are split by mpid hash


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


def _attribute_path(name: str) -> str:
    """JSON path for an attribute: `data.a.b` walks the event data, any other name is a custom attribute."""
    if name.startswith("data."):
        return "$." + ".".join(f'"{part}"' for part in name[len("data."):].split("."))
    return '$."' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


# Calculations that look at arrival order (unique_values_count too: a seeded one goes on with the first values
# in order). The others get a NULL event_order: numbering costs a pass over every event read.
ORDERED_CALCULATIONS = frozenset({"first_occurrence", "last_occurrence", "unique_list", "unique_values_count",
                                  "most_frequent"})


def read_events(cursor: duckdb.DuckDBPyConnection, workspace_id: str, definition: Definition, as_of_ms: int,
                mpids: list[int] | None = None, chunk: int | None = None) -> pl.DataFrame:
    """The events that may count, in the frame layout compute() takes."""
    point = definition.data_point
    where, where_params = _narrowing(workspace_id, definition, as_of_ms, mpids, chunk)
    extracts, extract_params, picks = attribute_extractions(definition.attributes_read())
    # an event type or name the data point fixes is the same on every row read: polars adds it as a constant
    # rather than DuckDB exporting it millions of times
    fixed = {"event_type": point.event_type, "event_name": point.event_name}
    passed = [column for column, value in fixed.items() if value is None]
    outer = ", ".join(["mpid", "timestamp_ms", "event_order", *passed, *picks])
    if definition.calculation_type in ORDERED_CALCULATIONS:
        inner = ", ".join(["mpid", "timestamp_ms", "received_ms", "batch_id", "event_index", *passed, *extracts])
        # Arrival order, (received_ms, batch_id, event_index), breaks ties at equal times. Numbering every
        # event with one window sorted the whole read, payload included, and was most of its time; ranking
        # the distinct batches sorts a fraction of the rows, and batch rank then event index is the same order
        # (event_index is an INTEGER: it fits the low 32 bits). Only the order matters (within a profile), so a
        # profile's events order alike in every read. LEFT JOIN: no event is ever dropped.
        query = f"""
            WITH selected AS MATERIALIZED (SELECT {inner} FROM events WHERE {where}),
            batches AS (
                SELECT received_ms, batch_id, row_number() OVER (ORDER BY received_ms, batch_id) AS batch_rank
                FROM (SELECT DISTINCT received_ms, batch_id FROM selected))
            SELECT {outer} FROM (
                SELECT *, batch_rank * 4294967296 + (event_index::BIGINT + 2147483648) AS event_order
                FROM selected LEFT JOIN batches USING (received_ms, batch_id))"""
    else:
        inner = ", ".join(["mpid", "timestamp_ms", "NULL::BIGINT AS event_order", *passed, *extracts])
        query = f"SELECT {outer} FROM (SELECT {inner} FROM events WHERE {where})"
    frame = pl.from_arrow(cursor.sql(query, params=extract_params + where_params).to_arrow_table())
    constants = [pl.lit(value, pl.String).alias(column) for column, value in fixed.items() if value is not None]
    layout = ["mpid", "timestamp_ms", "event_order", "event_type", "event_name",
              *(attribute_column(index) for index in range(len(picks)))]
    return frame.with_columns(constants).select(layout)


def _narrowing(workspace_id: str, definition: Definition, as_of_ms: int, mpids: list[int] | None,
               chunk: int | None) -> tuple[str, list[object]]:
    """The WHERE clause: the data point, the period's start, and the profiles asked for."""
    point = definition.data_point
    where = ["workspace_id = ?"]
    params: list[object] = [workspace_id]
    if point.event_type is not None:
        where.append("event_type = ?")
        params.append(point.event_type)
    if point.event_name is not None:
        where.append("event_name = ?")
        params.append(point.event_name)
    start = definition.time_period.start_ms(as_of_ms)
    if start is not None:
        # events before the period never count at this as_of, nor date a change (window expiry comes from
        # counted events, coming changes from events after as_of); each evaluation reads its own events
        where.append("timestamp_ms >= ?")
        params.append(start)
    if mpids is not None:
        where.append("list_contains(?, mpid)")
        params.append(mpids)
    if chunk is not None:
        where.append(f"hash(mpid) % {CHUNKS} = ?")
        params.append(chunk)
    return " AND ".join(where), params


def attribute_extractions(names: tuple[str, ...]) -> tuple[list[str], list[object], list[str]]:
    """SQL reading the attributes as text: what the inner select extracts (with its parameters), and what the
    outer select names `attribute_<i>`. Several attributes of one JSON column come from one multi-path
    extraction, which parses the document once instead of once per attribute."""
    by_source: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        by_source.setdefault("data" if name.startswith("data.") else "custom_attributes", []).append(index)
    extracts: list[str] = []
    params: list[object] = []
    picks: dict[int, str] = {}
    for source, indexes in by_source.items():
        if len(indexes) == 1:
            extracts.append(f"json_extract_string({source}, ?) AS {attribute_column(indexes[0])}")
            params.append(_attribute_path(names[indexes[0]]))
            picks[indexes[0]] = attribute_column(indexes[0])
            continue
        extracts.append(f"json_extract_string({source}, ?::VARCHAR[]) AS {source}_texts")
        params.append([_attribute_path(names[index]) for index in indexes])
        for position, index in enumerate(indexes, start=1):
            picks[index] = f"{source}_texts[{position}] AS {attribute_column(index)}"
    return extracts, params, [picks[index] for index in range(len(names))]


def value_rows(definition: Definition, events: pl.DataFrame, as_of_ms: int, mpids: list[int] | None,
               workspace_id: str, ca_id: int, seeds: dict[int, Seed] | None = None) -> pa.Table:
    """Rows for calculated_attribute_values: every profile with a value or a coming change."""
    values = compute_seeded(definition, events, as_of_ms, seeds or {})
    changes = _changes_at(definition, events, as_of_ms)
    wanted = sorted(set(values) | set(changes)) if mpids is None else sorted(set(mpids) & (set(values) | set(changes)))
    stamp = now_ms()
    return pa.table({
        "workspace_id": [workspace_id] * len(wanted), "ca_id": pa.array([ca_id] * len(wanted), pa.int64()),
        "mpid": pa.array(wanted, pa.int64()),
        "value": [orjson.dumps(values[m]).decode() if m in values else None for m in wanted],
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
        status = self.status_of(ca.id)
        with status.lock, self._gate.computing():
            status.state, status.progress, status.started_ms, status.finished_ms, status.error = (
                "calculating", 0.0, now_ms(), None, None)
            definition = ca.active()
            as_of = as_of_ms or now_ms()
            cursor = self._connection.cursor()
            try:
                cursor.begin()
                cursor.execute("DELETE FROM calculated_attribute_values WHERE ca_id = ?", [ca.id])
                for chunk in range(CHUNKS):
                    events = read_events(cursor, ca.workspace_id, definition, as_of, chunk=chunk)
                    seeds = read_seeds(cursor, ca.id, chunk=chunk)
                    rows = value_rows(definition, events, as_of, None, ca.workspace_id, ca.id, seeds)  # noqa: F841
                    cursor.execute("INSERT INTO calculated_attribute_values SELECT * FROM rows")
                    status.progress = (chunk + 1) / CHUNKS
                cursor.commit()
                status.state, status.finished_ms = "ready", now_ms()
            except Exception as exc:
                cursor.rollback()
                status.state, status.error = "failed", str(exc)
                raise
            finally:
                cursor.close()

    def refresh(self, ca: CalculatedAttribute, mpids: list[int], as_of_ms: int | None = None) -> None:
        """Incremental: recompute these profiles only (an ingested batch touched them, or time changed them)."""
        if not mpids:
            return
        definition, as_of = ca.active(), as_of_ms or now_ms()
        cursor = self._connection.cursor()
        # a running full computation holds the lock: waiting for it keeps the two from writing the same rows,
        # and this refresh then sees the events that arrived meanwhile
        with self.status_of(ca.id).lock, self._gate.computing():
            self._refresh(cursor, ca, definition, mpids, as_of)

    def _refresh(self, cursor: duckdb.DuckDBPyConnection, ca: CalculatedAttribute, definition: Definition,
                 mpids: list[int], as_of: int) -> None:
        try:
            events = read_events(cursor, ca.workspace_id, definition, as_of, mpids=mpids)
            seeds = read_seeds(cursor, ca.id, mpids=mpids)
            rows = value_rows(definition, events, as_of, mpids, ca.workspace_id, ca.id, seeds)  # noqa: F841
            cursor.begin()
            cursor.execute("DELETE FROM calculated_attribute_values WHERE ca_id = ? AND list_contains(?, mpid)",
                           [ca.id, mpids])
            cursor.execute("INSERT INTO calculated_attribute_values SELECT * FROM rows")
            cursor.commit()
        finally:
            cursor.close()

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
