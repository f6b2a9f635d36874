"""Reading events for calculated attributes: DuckDB -> Arrow -> polars, narrowed to the events a definition can
count, with each attribute it reads extracted as text, in the frame layout engine/ca_compute.compute takes.

Definitions of one event type share a read. Extracting attributes from the JSON columns and handing the rows
to polars is most of a computation's time, and reading every custom_event for four definitions costs little
more than reading them for one: DuckDB decompresses and parses the same documents either way. So `read_each`
reads once per event type (the union of the attributes, names and periods its definitions want) and gives
each definition only its own rows, exactly those it would have read alone.

Arrival order comes from the stored `arrival` column (engine/event_journal.py), so no read ranks events.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import duckdb
import polars as pl

from engine.ca_compute import attribute_column
from engine.ca_definitions import Definition

CHUNKS = 16  # progress granularity of a full computation: profiles are split by mpid hash
# calculations that look at arrival order (engine/ca_compute.py breaks ties at equal times with it)
ORDERED_CALCULATIONS = frozenset({"first_occurrence", "last_occurrence", "unique_list", "most_frequent"})


@dataclass(frozen=True)
class SharedRead:
    """One DuckDB read serving several definitions: `members` are their positions in the planned sequence."""

    event_type: str | None
    event_names: tuple[str, ...]   # the names to read, empty when a member takes every name
    flagged: tuple[str, ...]       # names each row gets a flag for: members want different names
    start_ms: int | None           # the earliest period start among the members (None: one has no start)
    attributes: tuple[str, ...]    # every attribute a member reads, once, read as `attribute_<i>`
    ordered: bool                  # a member looks at arrival order; the others are spared reading it
    members: tuple[int, ...]


def plan_reads(definitions: Sequence[Definition], as_of_ms: int) -> list[SharedRead]:
    """One read per event type the definitions name (definitions naming only an event name share one too)."""
    by_type: dict[str | None, list[int]] = {}
    for position, definition in enumerate(definitions):
        by_type.setdefault(definition.data_point.event_type, []).append(position)
    reads = []
    for event_type, members in by_type.items():
        chosen = [definitions[position] for position in members]
        names = {d.data_point.event_name for d in chosen}
        starts = [d.time_period.start_ms(as_of_ms) for d in chosen]
        attributes = tuple(dict.fromkeys(name for d in chosen for name in d.attributes_read()))
        named = tuple(sorted(name for name in names if name is not None))
        ordered = any(d.calculation_type in ORDERED_CALCULATIONS for d in chosen)
        reads.append(SharedRead(event_type, () if None in names else named, named if len(names) > 1 else (),
                                None if None in starts else min(starts), attributes, ordered, tuple(members)))
    return reads


def read_each(cursor: duckdb.DuckDBPyConnection, workspace_id: str, definitions: Sequence[Definition],
              as_of_ms: int, mpids: list[int] | None = None, chunk: int | None = None
              ) -> Iterator[tuple[int, pl.DataFrame]]:
    """(position, events) for every definition, one DuckDB read per shared read; a read's members follow it, so
    one read's rows are held at a time."""
    for shared in plan_reads(definitions, as_of_ms):
        frame = _read(cursor, workspace_id, shared, mpids, chunk)
        for position in shared.members:
            yield position, _narrowed(frame, shared, definitions[position], as_of_ms)


def read_events(cursor: duckdb.DuckDBPyConnection, workspace_id: str, definition: Definition, as_of_ms: int,
                mpids: list[int] | None = None, chunk: int | None = None) -> pl.DataFrame:
    """The events that may count for one definition, in the frame layout compute() takes."""
    return next(read_each(cursor, workspace_id, [definition], as_of_ms, mpids, chunk))[1]


def _read(cursor: duckdb.DuckDBPyConnection, workspace_id: str, shared: SharedRead, mpids: list[int] | None,
          chunk: int | None) -> pl.DataFrame:
    where, where_params = _narrowing(workspace_id, shared, mpids, chunk)
    extracts, extract_params, picks = attribute_extractions(shared.attributes)
    # a boolean per name rather than the names themselves: far cheaper to hand over than millions of strings
    flags = [f"event_name = ? AS {_flag(index)}" for index in range(len(shared.flagged))]
    arrival = "arrival" if shared.ordered else "NULL::BIGINT AS arrival"
    inner = ", ".join(["mpid", "timestamp_ms", arrival, *flags, *extracts])
    outer = ", ".join(["mpid", "timestamp_ms", "arrival AS event_order",
                       *(_flag(index) for index in range(len(shared.flagged))), *picks])
    query = f"SELECT {outer} FROM (SELECT {inner} FROM events WHERE {where})"
    params = [*shared.flagged, *extract_params, *where_params]
    return pl.from_arrow(cursor.sql(query, params=params).to_arrow_table())


def _flag(index: int) -> str:
    return f"is_name_{index}"


def _narrowed(frame: pl.DataFrame, shared: SharedRead, definition: Definition, as_of_ms: int) -> pl.DataFrame:
    """A member's rows of a shared read, with its attributes renamed to the positions it reads them at."""
    point = definition.data_point
    keep = []
    if point.event_name is not None and shared.flagged:
        keep.append(pl.col(_flag(shared.flagged.index(point.event_name))))
    start = definition.time_period.start_ms(as_of_ms)
    if start is not None and start != shared.start_ms:
        keep.append(pl.col("timestamp_ms") >= start)
    # the event type and name a member fixes are the same on every row it keeps; one it does not fix is never
    # looked at (compute() filters on fixed ones only), so neither is handed over per row. Lazy, so that the
    # filter copies only the member's columns.
    rows = frame.lazy().filter(*keep) if keep else frame.lazy()
    return rows.select(
        "mpid", "timestamp_ms", "event_order", pl.lit(point.event_type, pl.String).alias("event_type"),
        pl.lit(point.event_name, pl.String).alias("event_name"),
        *(pl.col(attribute_column(shared.attributes.index(name))).alias(attribute_column(index))
          for index, name in enumerate(definition.attributes_read()))).collect()


def _narrowing(workspace_id: str, shared: SharedRead, mpids: list[int] | None,
               chunk: int | None) -> tuple[str, list[object]]:
    """The WHERE clause: the event type, names and period start, and the profiles asked for."""
    where = ["workspace_id = ?"]
    params: list[object] = [workspace_id]
    if shared.event_type is not None:
        where.append("event_type = ?")
        params.append(shared.event_type)
    if shared.event_names:
        where.append(f"event_name IN ({', '.join('?' * len(shared.event_names))})")
        params.extend(shared.event_names)
    if shared.start_ms is not None:
        # events before the period never count at this as_of, nor date a change (window expiry comes from
        # counted events, coming changes from events after as_of)
        where.append("timestamp_ms >= ?")
        params.append(shared.start_ms)
    if mpids is not None:
        where.append("list_contains(?, mpid)")
        params.append(mpids)
    if chunk is not None:
        where.append(f"hash(mpid) % {CHUNKS} = ?")
        params.append(chunk)
    return " AND ".join(where), params


def _attribute_path(name: str) -> str:
    """JSON path for an attribute: `data.a.b` walks the event data, any other name is a custom attribute."""
    if name.startswith("data."):
        return "$." + ".".join(f'"{part}"' for part in name[len("data."):].split("."))
    return '$."' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


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
