"""Calculated attributes benchmark: ten definitions computed in full over 10M events of 1M profiles by idmesh's
polars path, beside the same ten written as DuckDB SQL in the same run, plus the incremental refresh of 1,000
touched profiles.

    .venv/bin/python bench/calculated.py               # 1,000,000 profiles, 10,000,000 events, 3 rounds
    .venv/bin/python bench/calculated.py --quick       # 100,000 profiles, 1,000,000 events
    .venv/bin/python bench/calculated.py --tiny --rounds 1     # seconds: the smoke test
    .venv/bin/python bench/calculated.py --rebuild --show-sql

The events are generated in SQL straight into `events_base` of a database made by engine.store.open_database
(no API: the point is the computation, not ingest), and the file is cached in bench/results/ (gitignored)
keyed by its size and SCHEMA_TAG. Every profile has an opening event; the rest come in batches of 8 whose
profile is drawn with a heavy tail (a few profiles have hundreds of events) and whose time is spread over 120
days; rows are stored in arrival order, as ingest stores them.

Each round computes every definition both ways, on one DuckDB connection. Definitions of one event type share
one read, as idmesh reads them (engine.ca_read.plan_reads), and the two sides alternate which goes first per
shared read:
- polars: engine.ca_read.read_each (DuckDB -> Arrow -> polars, one read per event type, each definition handed
  its own rows) and engine.ca_compute.compute per definition, split into the read and the compute;
- SQL: the same shared read as a temporary table (the same extraction, from the same `events` view), then one
  GROUP BY query per definition over it at the same as_of, written here from the documented semantics:
  conditions and the period in WHERE, arg_min / arg_max on (time, arrival), list(... ORDER BY) over distinct
  values, count(DISTINCT), a most-events-then-latest arg_max for the mode.
Their results are compared for every profile (floats within 1e-9 relative) and any difference fails the run.
Wall and CPU seconds are both reported: the machine is shared, and CPU time (every thread of this process)
suffers less from neighbours than wall time.
Then, on a copy of the file, CalculatedAttributeEngine.compute_many fills the values table for the ten (timed
once, as start-up recomputes them) and 1,000 profiles sampled by activity are refreshed for all ten, several
rounds, one attribute at a time (`refresh`) and together (`refresh_many`); the refreshed values must equal the
full computation's.

Figures are medians over the rounds; the polars/SQL ratio is the median of per-round ratios. stdout gets the
figures line, then the result as JSON; the tables go to stderr; the full result goes to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/calculated.py`: make the project importable
    sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402  (needs ROOT on sys.path for the project imports below)
import orjson  # noqa: E402
import polars as pl  # noqa: E402

from engine.ca_compute import compute  # noqa: E402
from engine.ca_definitions import Condition, Definition, parse_definition  # noqa: E402
from engine.ca_engine import CalculatedAttributeEngine  # noqa: E402
from engine.ca_read import SharedRead, plan_reads, read_each  # noqa: E402
from engine.ca_registry import CalculatedAttribute  # noqa: E402
from engine.event_journal import ARRIVAL_SPAN  # noqa: E402
from engine.store import open_database  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SCHEMA_TAG = "calculated-v2"  # bump when the generated data changes, so stale caches are rebuilt
GOAL_FULL_S = 10.0            # DESIGN.md: 10 calculated attributes, 10M events, 1M profiles
GOAL_RATIO = 1.0              # DESIGN.md: the polars path no slower than the same logic in DuckDB SQL
FLOAT_TOLERANCE = 1e-9        # relative: the two sides add floats in different orders

SIZES = {"full": (1_000_000, 10_000_000), "quick": (100_000, 1_000_000), "tiny": (2_000, 20_000)}
WORKSPACE_ID = "ws_00000000bench0ca"
DAY_MS = 86_400_000
END_MS = 1_780_272_000_000           # 2026-06-01T00:00Z: every event is before it, and values are as of it
SPAN_MS = 120 * DAY_MS - 3_600_000   # batch times; the events of a batch follow within ~85 s
AS_OF_MS = END_MS
BATCH_EVENTS = 8
BUILD_CHUNK = 1_000_000

# Ten definitions as the Platform API takes them (POST .../calculatedattributes, `draft_definition`).
DEFINITIONS: dict[str, dict[str, Any]] = {
    "purchases_30d": {
        "calculation_type": "count",
        "data_point": {"event_type": "commerce_event"},
        "conditions": [{"attribute_name": "data.product_action.action", "operator": "equals", "values": ["purchase"]}],
        "time_period": {"type": "within_last", "value": 30, "unit": "days"}},
    "lifetime_revenue": {
        "calculation_type": "sum",
        "data_point": {"event_type": "commerce_event", "attribute_name": "data.product_action.total_amount"}},
    "avg_viewed_price_shoes_bags": {
        "calculation_type": "average",
        "data_point": {"event_type": "custom_event", "event_name": "view_item", "attribute_name": "price"},
        "conditions": [{"attribute_name": "category", "operator": "in", "values": ["shoes", "bags"]}]},
    "max_wishlist_price_7d": {
        "calculation_type": "max",
        "data_point": {"event_type": "custom_event", "event_name": "add_to_wishlist", "attribute_name": "price"},
        "time_period": {"type": "within_last", "value": 7, "unit": "days"}},
    "first_category": {
        "calculation_type": "first_occurrence",
        "data_point": {"event_type": "custom_event", "attribute_name": "category"}},
    "last_source_since_april": {
        "calculation_type": "last_occurrence",
        "data_point": {"event_type": "custom_event", "attribute_name": "source"},
        "time_period": {"type": "since", "date": "2026-04-15"}},
    "last_checkout_view": {
        "calculation_type": "last_occurrence_timestamp",
        "data_point": {"event_type": "screen_view", "event_name": "Checkout"}},
    "in_stock_categories_90d": {
        "calculation_type": "unique_list",
        "data_point": {"event_type": "custom_event", "attribute_name": "category"},
        "conditions": [{"attribute_name": "in_stock", "operator": "equals", "values": [True]},
                       {"attribute_name": "price", "operator": "greater_than", "values": [20]}],
        "time_period": {"type": "within_last", "value": 90, "unit": "days"}},
    "screens_seen": {
        "calculation_type": "unique_values_count",
        "data_point": {"event_type": "screen_view", "attribute_name": "data.screen_name"}},
    "favourite_category": {
        "calculation_type": "most_frequent",
        "data_point": {"event_type": "custom_event", "attribute_name": "category"},
        "conditions": [{"attribute_name": "source", "operator": "not_equals", "values": ["ad"]}]},
}


# --- the database ------------------------------------------------------------------------------------------

# One row per event, numbers only, in arrival order: event i < profiles is profile i's opening event (a batch of
# one), the rest form batches of 8 whose profile is floor(profiles * u^2), so low indexes are the heavy users.
# `k` numbers the rows in arrival order, so the JSON is built in chunks that append in that order; `batch_rank`
# stands for the journal seq ingest would have given the batch (events.arrival, engine/event_journal.py).
STAGE_SQL = f"""
CREATE TEMP TABLE stage AS
WITH e AS (
    SELECT i,
           CASE WHEN i < $profiles THEN i ELSE $profiles + (i - $profiles) // {BATCH_EVENTS} END AS g,
           CASE WHEN i < $profiles THEN 0 ELSE (i - $profiles) % {BATCH_EVENTS} END AS event_index
    FROM range($events) AS r(i)
), b AS (
    SELECT *,
           CASE WHEN g < $profiles THEN g
                ELSE least($profiles - 1, floor($profiles * pow((hash(g, 'who') % 1000000) / 1e6, 2)))::BIGINT
           END AS p,
           $start + (hash(g, 'when') % $span)::BIGINT AS batch_ms
    FROM e
)
SELECT row_number() OVER (ORDER BY received_ms, g, event_index) - 1 AS k,
       dense_rank() OVER (ORDER BY received_ms, g) AS batch_rank, * FROM (
    SELECT i, g, event_index, p, batch_ms,
           -- events of a batch are 10 s apart plus jitter, in whole seconds, so some share a timestamp
           (batch_ms + event_index * 10000 + (hash(i, 'gap') % 15000)::BIGINT) // 1000 * 1000 AS timestamp_ms,
           batch_ms + 100000 + (hash(g, 'recv') % 60000)::BIGINT AS received_ms
    FROM b)
"""

# JSON built as text (cheaper than json_object, and absent attributes are simply left out, as SDKs send them)
EVENTS_SQL = """
INSERT INTO events_base
WITH s AS (
    SELECT *, hash(i, 'kind') % 100 AS kind, md5(g::VARCHAR) AS batch_hash,
           ((p + 1)::HUGEINT * 11400714819323198485 % 18446744073709551616 - 9223372036854775808)::BIGINT AS mpid,
           ['shoes', 'shoes', 'shoes', 'bags', 'bags', 'outerwear', 'beauty', 'home', 'kids']
               [1 + (hash(i, 'cat') % 9)::BIGINT] AS category,
           round(3 + (hash(i, 'price') % 24700) / 100.0, 2) AS price,
           ['push', 'email', 'organic', 'organic', 'deeplink', 'ad'][1 + (hash(i, 'src') % 6)::BIGINT] AS source,
           hash(i, 'has') AS has
    FROM stage WHERE k >= $lo AND k < $hi
), t AS (
    SELECT *,
           CASE WHEN kind < 58 THEN 'custom_event' WHEN kind < 88 THEN 'screen_view'
                WHEN kind < 98 THEN 'commerce_event' ELSE 'session_start' END AS event_type,
           CASE WHEN kind < 58 THEN ['view_item', 'view_item', 'view_item', 'search', 'search', 'add_to_wishlist',
                                     'share', 'video_play', 'coupon_applied', 'banner_click']
                                    [1 + (hash(i, 'name') % 10)::BIGINT]
                WHEN kind < 88 THEN ['Home', 'Home', 'Search', 'ProductDetail', 'ProductDetail', 'Cart', 'Checkout',
                                     'Profile', 'Settings', 'Category', 'Orders'][1 + (hash(i, 'screen') % 11)::BIGINT]
           END AS event_name,
           ['view_detail', 'view_detail', 'add_to_cart', 'add_to_cart', 'add_to_cart', 'purchase', 'purchase']
               [1 + (hash(i, 'action') % 7)::BIGINT] AS action,
           1 + hash(i, 'qty') % 3 AS quantity
    FROM s
), j AS (
    SELECT *,
           CASE WHEN event_type = 'custom_event' THEN '{' || concat_ws(',',
                    CASE WHEN has % 10 < 9 THEN '"category":"' || category || '"' END,
                    CASE WHEN has // 10 % 4 < 3 THEN '"price":' || price::VARCHAR END,
                    CASE WHEN has // 40 % 5 < 3 THEN '"in_stock":' || (has // 200 % 5 < 4)::VARCHAR END,
                    CASE WHEN has // 1000 % 2 = 0 THEN '"source":"' || source || '"' END,
                    CASE WHEN has // 2000 % 5 < 2 THEN '"position":' || (1 + has // 10000 % 40)::VARCHAR END)
                || '}'
                WHEN event_type = 'commerce_event' AND has % 2 = 0 THEN '{"category":"' || category || '"}'
           END AS attributes
    FROM t
)
SELECT $workspace, mpid, substr(batch_hash, 1, 8) || '-' || substr(batch_hash, 9, 4) || '-4' ||
       substr(batch_hash, 14, 3) || '-8' || substr(batch_hash, 18, 3) || '-' || substr(batch_hash, 21, 12),
       event_index, event_type, event_name,
       CASE WHEN event_type = 'custom_event' THEN ['navigation', 'search', 'transaction', 'other']
           [1 + (hash(i, 'cet') % 4)::BIGINT] END,
       timestamp_ms, received_ms, substr(md5(batch_hash), 1, 32), NULL, NULL, NULL, 'production',
       attributes::JSON,
       (CASE event_type
            WHEN 'custom_event' THEN '{"event_name":"' || event_name || '","custom_event_type":"other",'
                 || '"timestamp_unixtime_ms":' || timestamp_ms::VARCHAR || ',"custom_attributes":' || attributes || '}'
            WHEN 'screen_view' THEN '{"screen_name":"' || event_name || '","timestamp_unixtime_ms":'
                 || timestamp_ms::VARCHAR || '}'
            WHEN 'commerce_event' THEN '{"timestamp_unixtime_ms":' || timestamp_ms::VARCHAR
                 || ',"currency_code":"USD","product_action":{"action":"' || action || '"'
                 || CASE WHEN action = 'purchase' THEN ',"transaction_id":"T' || (hash(i, 'tx') % 1000000000)::VARCHAR
                         || '","total_amount":' || round(price * quantity, 2)::VARCHAR ELSE '' END
                 || ',"products":[{"id":"sku' || lpad((hash(i, 'sku') % 10000)::VARCHAR, 5, '0') || '","price":'
                 || price::VARCHAR || ',"quantity":' || quantity::VARCHAR || '}]}'
                 || CASE WHEN attributes IS NULL THEN '' ELSE ',"custom_attributes":' || attributes END || '}'
            ELSE '{"timestamp_unixtime_ms":' || timestamp_ms::VARCHAR || ',"session_uuid":"' || batch_hash || '"}'
        END)::JSON,
       NULL, NULL, batch_rank * $arrival_span + event_index
FROM j ORDER BY k
"""


def cache_paths(profiles: int, events: int) -> tuple[Path, Path]:
    stem = RESULTS / f"calculated-{profiles}-{events}"
    return stem.with_suffix(".duckdb"), stem.with_suffix(".json")


def db_companions(path: Path) -> list[Path]:
    return [path, Path(f"{path}.wal")]


def remove_database(path: Path) -> None:
    for companion in db_companions(path):
        companion.unlink(missing_ok=True)


def copy_database(source: Path, target: Path) -> None:
    remove_database(target)
    for src, dst in zip(db_companions(source), db_companions(target)):
        if src.exists():
            shutil.copyfile(src, dst)


def build_database(profiles: int, events: int, console: Any) -> dict[str, Any]:
    """A fresh file through open_database (so the schema is the real one), events generated in SQL in chunks."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    db_path, meta_path = cache_paths(profiles, events)
    building = db_path.with_name(f"{db_path.stem}.building-{os.getpid()}.duckdb")  # concurrent builds never clash
    remove_database(building)
    started = time.perf_counter()
    connection = open_database(str(building))
    try:
        connection.execute("SET enable_progress_bar = false")  # rich shows the progress
        columns = [TextColumn("[bold]build[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn()]
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(f"arrival order of {events:,} events", total=None)
            connection.execute(STAGE_SQL, {"profiles": profiles, "events": events, "start": END_MS - 120 * DAY_MS,
                                           "span": SPAN_MS})
            progress.update(task, description=f"{events:,} events of {profiles:,} profiles", total=events,
                            completed=0)
            for lo in range(0, events, BUILD_CHUNK):
                hi = min(events, lo + BUILD_CHUNK)
                connection.execute("BEGIN")
                connection.execute(EVENTS_SQL, {"lo": lo, "hi": hi, "workspace": WORKSPACE_ID,
                                                "arrival_span": ARRIVAL_SPAN})
                connection.execute("COMMIT")
                progress.update(task, completed=hi)
        connection.execute("DROP TABLE stage")
        connection.execute("CHECKPOINT")
        shape = describe_events(connection)
    except BaseException:
        connection.close()
        remove_database(building)
        raise
    connection.close()
    if shape["events"] != events or shape["profiles"] != profiles:
        raise SystemExit(f"bench: generated {shape['events']:,} events of {shape['profiles']:,} profiles, wanted "
                         f"{events:,} of {profiles:,}")
    for src, dst in zip(db_companions(building), db_companions(db_path)):
        if src.exists():
            src.replace(dst)
    meta = {"schema": SCHEMA_TAG, "profiles": profiles, "events": events, "workspace_id": WORKSPACE_ID,
            "build_s": round(time.perf_counter() - started, 1), "file_mb": round(db_path.stat().st_size / 2**20, 1),
            "shape": shape}
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


def describe_events(connection: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """What was generated, for the results: counts by type and the spread of events per profile."""
    total, mpids, first, last = connection.execute(
        "SELECT count(*), count(DISTINCT mpid), min(timestamp_ms), max(timestamp_ms) FROM events_base").fetchone()
    by_type = dict(connection.execute("SELECT event_type, count(*) FROM events_base GROUP BY ALL").fetchall())
    per_profile = connection.execute(
        "SELECT quantile_disc(n, [0.5, 0.9, 0.99]), max(n) FROM (SELECT count(*) AS n FROM events_base GROUP BY mpid)"
    ).fetchone()
    return {"events": total, "profiles": mpids, "first_ms": first, "last_ms": last, "by_type": by_type,
            "events_per_profile_p50_p90_p99": per_profile[0], "events_per_profile_max": per_profile[1]}


def ensure_database(profiles: int, events: int, rebuild: bool, console: Any) -> dict[str, Any]:
    db_path, meta_path = cache_paths(profiles, events)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not rebuild and db_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("schema") == SCHEMA_TAG:
            console.print(f"[dim]using cached database {db_path.relative_to(ROOT)} ({meta['file_mb']:,} MB, "
                          f"built in {meta['build_s']} s; --rebuild makes a new one)[/]")
            return meta
    return build_database(profiles, events, console)


# --- the same definitions as DuckDB SQL ----------------------------------------------------------------------

SHARED_TABLE = "shared_read"  # a temporary table: what one read of the events extracted for its definitions


@dataclass(frozen=True)
class SqlQuery:
    text: str
    params: list[Any]


@dataclass(frozen=True)
class SqlGroup:
    """The SQL side of one shared read: a temporary table made by one read of the events, then one GROUP BY per
    definition over it, the way a SQL author shares a costly extraction among queries."""

    label: str
    table: SqlQuery
    queries: dict[str, SqlQuery]


def json_path(name: str) -> str:
    """Where an attribute lives: `data.a.b` in the event data, any other name among the custom attributes."""
    if name.startswith("data."):
        return "$." + ".".join(f'"{part}"' for part in name[len("data."):].split("."))
    return '$."' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def condition_sql(condition: Condition, column: str, params: list[Any]) -> str:
    """A condition on the attribute text; NULL (attribute absent, or not a number) is false in WHERE."""
    operator, values = condition.operator, list(condition.values)
    if operator == "exists":
        return f"{column} IS NOT NULL"
    if condition.value_type == "boolean":
        params.append("true" if values[0] else "false")
        return f"{column} = ?" if operator == "equals" else f"{column} <> ?"
    subject = f"TRY_CAST({column} AS DOUBLE)" if condition.value_type == "number" else column
    if operator == "between":
        params.extend(values)
        return f"{subject} BETWEEN ? AND ?"
    if operator == "in":
        params.extend(values)
        return f"{subject} IN ({', '.join('?' * len(values))})"
    if operator in ("contains", "starts_with"):
        params.append(values[0])
        return f"{operator}({subject}, ?)"
    symbol = {"equals": "=", "not_equals": "<>", "greater_than": ">", "greater_than_or_equal": ">=",
              "less_than": "<", "less_than_or_equal": "<="}[operator]
    params.append(values[0])
    return f"{subject} {symbol} ?"


def attribute_alias(index: int) -> str:
    return f"a{index}"


def extraction_sql(names: tuple[str, ...], params: list[Any]) -> tuple[list[str], list[str]]:
    """Attribute texts: the JSON extractions of the inner select, one per JSON column (a multi-path extraction
    when it holds several attributes: one parse per document), and the names the outer select gives them."""
    by_source: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        by_source.setdefault("data" if name.startswith("data.") else "custom_attributes", []).append(index)
    extracts, picks = [], {}
    for source, indexes in by_source.items():
        if len(indexes) == 1:
            extracts.append(f"json_extract_string({source}, ?) AS {attribute_alias(indexes[0])}")
            params.append(json_path(names[indexes[0]]))
            picks[indexes[0]] = attribute_alias(indexes[0])
            continue
        extracts.append(f"json_extract_string({source}, ?::VARCHAR[]) AS {source}_texts")
        params.append([json_path(names[index]) for index in indexes])
        for position, index in enumerate(indexes, start=1):
            picks[index] = f"{source}_texts[{position}] AS {attribute_alias(index)}"
    return extracts, [picks[index] for index in range(len(names))]


def table_sql(shared: SharedRead, workspace_id: str) -> SqlQuery:
    """The one read: the events the group's definitions may count, with every attribute one of them reads as
    text, the arrival order, and the event name when they want different names."""
    params: list[Any] = []
    extracts, picks = extraction_sql(shared.attributes, params)
    narrowing = ["workspace_id = ?"]
    params.append(workspace_id)
    if shared.event_type is not None:
        narrowing.append("event_type = ?")
        params.append(shared.event_type)
    if shared.event_names:
        narrowing.append(f"event_name IN ({', '.join('?' * len(shared.event_names))})")
        params.extend(shared.event_names)
    if shared.start_ms is not None:
        narrowing.append("timestamp_ms >= ?")
        params.append(shared.start_ms)
    named = ["event_name"] if shared.flagged else []
    inner = ", ".join(["mpid", "timestamp_ms", "arrival", *named, *extracts])
    outer = ", ".join(["mpid", "timestamp_ms", "arrival", *named, *picks])
    return SqlQuery(f"CREATE OR REPLACE TEMP TABLE {SHARED_TABLE} AS SELECT {outer} FROM "
                    f"(SELECT {inner} FROM events WHERE {' AND '.join(narrowing)})", params)


def counted_sql(definition: Definition, shared: SharedRead, as_of_ms: int, params: list[Any]) -> str:
    """The events that count, with the value text as `v` and the order key (time, then arrival) as `k`."""
    column = {name: attribute_alias(shared.attributes.index(name)) for name in definition.attributes_read()}
    narrowing = ["timestamp_ms <= ?"]
    params.append(as_of_ms)
    start = definition.time_period.start_ms(as_of_ms)
    if start is not None:
        narrowing.append("timestamp_ms >= ?")
        params.append(start)
    if definition.data_point.event_name is not None and shared.flagged:
        narrowing.append("event_name = ?")
        params.append(definition.data_point.event_name)
    narrowing += [condition_sql(c, column[c.attribute_name], params) for c in definition.conditions]
    value = column.get(definition.data_point.attribute_name or "")
    if value is not None and definition.calculation_type != "count":
        narrowing.append(f"{value} IS NOT NULL")  # an event without the value adds nothing
    picked = f", {value} AS v" if value is not None else ""
    return (f"SELECT mpid, timestamp_ms, (timestamp_ms, arrival) AS k{picked} FROM {SHARED_TABLE} "
            f"WHERE {' AND '.join(narrowing)}")


def definition_sql(definition: Definition, shared: SharedRead, as_of_ms: int) -> SqlQuery:
    """One GROUP BY per definition, `mpid` and `value` sorted by mpid: the frame compute() returns."""
    params: list[Any] = []
    counted = counted_sql(definition, shared, as_of_ms, params)
    calculation = definition.calculation_type
    simple = {
        "count": "count(*)::BIGINT", "first_occurrence_timestamp": "min(timestamp_ms)",
        "last_occurrence_timestamp": "max(timestamp_ms)", "sum": "sum(n)", "min": "min(n)", "max": "max(n)",
        "average": "avg(n)", "first_occurrence": "arg_min(v, k)", "last_occurrence": "arg_max(v, k)",
        "unique_values_count": "count(DISTINCT v)::BIGINT",
    }
    if calculation in simple:
        # numeric calculations ignore values that are not numbers; a profile left with none has no value
        numbers = ", TRY_CAST(v AS DOUBLE) AS n" if calculation in ("sum", "min", "max", "average") else ""
        grouped = f"SELECT mpid, {simple[calculation]} AS value FROM (SELECT *{numbers} FROM ({counted})) GROUP BY mpid"
    elif calculation == "unique_list":
        # distinct values in the order first seen, the first 100
        grouped = (f"SELECT mpid, list(v ORDER BY first_k)[1:100] AS value FROM "
                   f"(SELECT mpid, v, min(k) AS first_k FROM ({counted}) GROUP BY mpid, v) GROUP BY mpid")
    else:  # most_frequent: most events, then seen most recently (two values never share their latest event)
        grouped = (f"SELECT mpid, arg_max(v, (times, last_k)) AS value FROM "
                   f"(SELECT mpid, v, count(*) AS times, max(k) AS last_k FROM ({counted}) GROUP BY mpid, v) "
                   f"GROUP BY mpid")
    return SqlQuery(f"SELECT mpid, value FROM ({grouped}) WHERE value IS NOT NULL ORDER BY mpid", params)


def read_label(shared: SharedRead) -> str:
    return shared.event_type or f"named {', '.join(shared.event_names)}"


def sql_groups(definitions: dict[str, Definition], as_of_ms: int) -> list[SqlGroup]:
    """The definitions grouped as idmesh reads them (engine.ca_read.plan_reads), written as SQL."""
    names = list(definitions)
    groups = []
    for shared in plan_reads(list(definitions.values()), as_of_ms):
        members = [names[position] for position in shared.members]
        groups.append(SqlGroup(read_label(shared), table_sql(shared, WORKSPACE_ID),
                               {name: definition_sql(definitions[name], shared, as_of_ms) for name in members}))
    return groups


# --- measuring -----------------------------------------------------------------------------------------------

Clocked = tuple[float, float]  # wall and CPU seconds


@dataclass
class Timings:
    """Seconds per key (a shared read or a definition) and round for one part of one side."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.seconds.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def round_totals(self) -> list[float]:
        rounds = len(next(iter(self.seconds.values())))
        return [sum(values[r] for values in self.seconds.values()) for r in range(rounds)]


def clock() -> Clocked:
    """Wall and CPU seconds. CPU time counts every thread of this process (DuckDB's and polars' workers), and a
    busy shared machine inflates it far less than wall time, so both are reported."""
    return time.perf_counter(), time.process_time()


def since(start: Clocked) -> Clocked:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def plus(a: Clocked, b: Clocked) -> Clocked:
    return a[0] + b[0], a[1] + b[1]


def run_polars(cursor: duckdb.DuckDBPyConnection, definitions: dict[str, Definition]
               ) -> tuple[dict[str, pl.DataFrame], Clocked, dict[str, Clocked]]:
    """What idmesh runs for a full computation of definitions sharing a read, without the chunking and writing:
    engine.ca_read.read_each (the read, and each definition's rows from it), then compute() for each."""
    names = list(definitions)
    values: dict[str, pl.DataFrame] = {}
    computed: dict[str, Clocked] = {}
    read: Clocked = (0.0, 0.0)
    started = clock()
    for position, events in read_each(cursor, WORKSPACE_ID, list(definitions.values()), AS_OF_MS):
        read = plus(read, since(started))
        started = clock()
        name = names[position]
        values[name] = compute(definitions[name], events, AS_OF_MS)
        computed[name] = since(started)
        del events
        started = clock()
    return values, plus(read, since(started)), computed


def run_sql(cursor: duckdb.DuckDBPyConnection, group: SqlGroup
            ) -> tuple[dict[str, pl.DataFrame], Clocked, dict[str, Clocked]]:
    """The SQL side ends where the polars side does: a polars frame of mpid, value per definition. Making and
    dropping the shared table counts as its read."""
    started = clock()
    cursor.execute(group.table.text, group.table.params).fetchall()
    made = since(started)
    values: dict[str, pl.DataFrame] = {}
    queried: dict[str, Clocked] = {}
    for name, query in group.queries.items():
        started = clock()
        values[name] = pl.from_arrow(cursor.sql(query.text, params=query.params).to_arrow_table())
        queried[name] = since(started)
    started = clock()
    cursor.execute(f"DROP TABLE {SHARED_TABLE}").fetchall()
    return values, plus(made, since(started)), queried


def compare_values(expected: pl.DataFrame, found: pl.DataFrame, limit: int = 5) -> dict[str, Any]:
    """Profile by profile: the same profiles, and values equal (floats within FLOAT_TOLERANCE relative)."""
    joined = expected.join(found, on="mpid", how="full", suffix="_other", coalesce=True)
    a, b = pl.col("value"), pl.col("value_other")
    if expected.schema["value"].is_float() or found.schema["value"].is_float():
        same = (a - b).abs() <= FLOAT_TOLERANCE * pl.max_horizontal(a.abs(), b.abs(), pl.lit(1.0))
    else:
        same = a == b
    differ = joined.filter(~(same.fill_null(False)) | a.is_null() | b.is_null())
    return {"profiles": expected.height, "other_profiles": found.height, "differ": differ.height,
            "dtypes": [str(expected.schema["value"]), str(found.schema["value"])],
            "examples": [{k: _plain(v) for k, v in row.items()} for row in differ.head(limit).to_dicts()]}


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, type(None))) else str(value)


def alternating_rounds(cursor: duckdb.DuckDBPyConnection, definitions: dict[str, Definition],
                       groups: list[SqlGroup], rounds: int, progress: Any
                       ) -> tuple[dict[str, Timings], dict[str, pl.DataFrame], dict[str, dict[str, Any]]]:
    """Every shared read and its definitions both ways in every round, the first side alternating by round and
    read, so neither always runs on a warmer cache. The first round's results are compared.
    Parts timed: `read` (polars side: per shared read), `compute` (polars side: per definition), `sql` (per
    shared table and per definition's query); each also as `<part>_cpu`."""
    timings = {f"{part}{kind}": Timings() for part in ("read", "compute", "sql") for kind in ("", "_cpu")}
    full: dict[str, pl.DataFrame] = {}
    checks: dict[str, dict[str, Any]] = {}

    def record(part: str, name: str, measured: Clocked) -> None:
        timings[part].add(name, measured[0])
        timings[f"{part}_cpu"].add(name, measured[1])

    task = progress.add_task("rounds: polars path and DuckDB SQL, alternating", total=rounds * len(groups) * 2)
    for r in range(rounds):
        for n, group in enumerate(groups):
            members = {name: definitions[name] for name in group.queries}
            sides = ["polars", "sql"] if (r + n) % 2 == 0 else ["sql", "polars"]
            for side in sides:
                progress.update(task, description=f"round {r + 1}/{rounds}: {group.label} ({side})")
                if side == "polars":
                    polars_values, read, computed = run_polars(cursor, members)
                    record("read", group.label, read)
                    for name, measured in computed.items():
                        record("compute", name, measured)
                else:
                    sql_values, made, queried = run_sql(cursor, group)
                    record("sql", group.label, made)
                    for name, measured in queried.items():
                        record("sql", name, measured)
                progress.advance(task)
            if r == 0:
                for name in members:
                    checks[name] = compare_values(polars_values[name], sql_values[name])
                    full[name] = polars_values[name]
            del polars_values, sql_values
    return timings, full, checks


def bench_attributes(definitions: dict[str, Definition]) -> list[CalculatedAttribute]:
    stamp = int(time.time() * 1000)
    return [CalculatedAttribute(i + 1, WORKSPACE_ID, name, None, None, DEFINITIONS[name], stamp, stamp, stamp, "bench")
            for i, name in enumerate(definitions)]


def touched_profiles(cursor: duckdb.DuckDBPyConnection, count: int, seed: int) -> list[int]:
    """Profiles as an ingest would touch them: drawn by event, so active profiles come up more often."""
    rows = cursor.execute(f"SELECT DISTINCT mpid FROM (SELECT mpid FROM events_base USING SAMPLE "
                          f"reservoir({count * 3} ROWS) REPEATABLE ({seed})) LIMIT {count}").fetchall()
    return sorted(row[0] for row in rows)


def recompute_and_refresh(source: Path, attributes: list[CalculatedAttribute], full: dict[str, pl.DataFrame],
                          args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    """On a copy of the file: compute_many for the ten (once, as start-up does), then refresh `args.touched`
    profiles for all ten, several rounds, one attribute at a time (`refresh`) and together (`refresh_many`);
    the refreshed values must equal the full ones."""
    copy = RESULTS / f"{source.stem}.incremental-{os.getpid()}.duckdb"
    copy_database(source, copy)
    connection = open_database(str(copy))
    try:
        engine = CalculatedAttributeEngine(connection)
        task = progress.add_task("start-up recompute: compute_many, values written", total=1)
        t0 = time.perf_counter()
        engine.compute_many(attributes, AS_OF_MS)
        recompute_s = time.perf_counter() - t0
        progress.advance(task)
        per_ca = Timings()
        one_by_one: list[float] = []
        together: list[float] = []
        task = progress.add_task("incremental: refresh", total=args.incremental_rounds)
        cursor = connection.cursor()
        for r in range(args.incremental_rounds):
            mpids = touched_profiles(cursor, args.touched, seed=1000 + r)
            t_round = time.perf_counter()
            for ca in attributes:
                t0 = time.perf_counter()
                engine.refresh(ca, mpids, AS_OF_MS)
                per_ca.add(ca.name, time.perf_counter() - t0)
            one_by_one.append(time.perf_counter() - t_round)
            t0 = time.perf_counter()
            engine.refresh_many(attributes, mpids, AS_OF_MS)
            together.append(time.perf_counter() - t0)
            progress.advance(task)
        check = compare_refreshed(cursor, attributes, mpids, full)
        cursor.close()
    finally:
        connection.close()
        remove_database(copy)
    names = [ca.name for ca in attributes]
    return {"recompute_s": recompute_s, "touched": len(mpids), "rounds": args.incremental_rounds,
            "round_s": one_by_one, "median_s": statistics.median(one_by_one), "together_s": together,
            "together_median_s": statistics.median(together),
            "per_ca_median_s": {n: per_ca.median(n) for n in names}, "check": check}


def compare_refreshed(cursor: duckdb.DuckDBPyConnection, attributes: list[CalculatedAttribute], mpids: list[int],
                      full: dict[str, pl.DataFrame]) -> dict[str, Any]:
    """The stored values of the last refreshed profiles against the full computation's, attribute by attribute."""
    differ: dict[str, dict[str, Any]] = {}
    for ca in attributes:
        rows = cursor.execute("SELECT mpid, value FROM calculated_attribute_values WHERE ca_id = ? AND "
                              "list_contains(?, mpid) AND value IS NOT NULL ORDER BY mpid", [ca.id, mpids]).fetchall()
        expected = full[ca.name].filter(pl.col("mpid").is_in(mpids))
        stored = pl.DataFrame({"mpid": [m for m, _ in rows], "value": [orjson.loads(v) for _, v in rows]},
                              schema={"mpid": pl.Int64, "value": expected.schema["value"]})
        found = compare_values(expected, stored)
        if found["differ"]:
            differ[ca.name] = found
    return {"profiles": len(mpids), "differ": differ}


# --- report --------------------------------------------------------------------------------------------------

def summarize(timings: dict[str, Timings], groups: list[SqlGroup]) -> dict[str, Any]:
    def total(part: str) -> list[float]:
        return timings[part].round_totals()

    polars = [a + b for a, b in zip(total("read"), total("compute"))]
    polars_cpu = [a + b for a, b in zip(total("read_cpu"), total("compute_cpu"))]
    sql, sql_cpu = total("sql"), total("sql_cpu")
    ratios = [p / s for p, s in zip(polars, sql)]
    cpu_ratios = [p / s for p, s in zip(polars_cpu, sql_cpu)]

    def side_by_side(polars_part: str, name: str) -> dict[str, float]:
        return {"polars": timings[polars_part].median(name), "sql": timings["sql"].median(name),
                "ratio": _ratio_median(timings[polars_part].seconds[name], timings["sql"].seconds[name]),
                "cpu_ratio": _ratio_median(timings[f"{polars_part}_cpu"].seconds[name],
                                           timings["sql_cpu"].seconds[name])}

    totals = {"polars": polars, "polars_cpu": polars_cpu, "read": total("read"), "read_cpu": total("read_cpu"),
              "compute": total("compute"), "compute_cpu": total("compute_cpu"), "sql": sql, "sql_cpu": sql_cpu}
    return {
        **{f"{side}_s": statistics.median(values) for side, values in totals.items()},
        "ratio": statistics.median(ratios), "per_round_ratio": [round(r, 3) for r in ratios],
        "cpu_ratio": statistics.median(cpu_ratios), "per_round_cpu_ratio": [round(r, 3) for r in cpu_ratios],
        "per_round_s": {side: [round(t, 3) for t in values] for side, values in totals.items()},
        "per_read": {group.label: side_by_side("read", group.label) | {"definitions": list(group.queries)}
                     for group in groups},
        "per_ca": {name: side_by_side("compute", name) for group in groups for name in group.queries},
    }


def _ratio_median(a: list[float], b: list[float]) -> float:
    """Median of per-round ratios: each pair ran side by side."""
    return statistics.median(x / y for x, y in zip(a, b))


def print_tables(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    s, w, incremental = result["summary"], result["workload"], result["incremental"]
    reads = Table(title=f"shared reads over {w['events']:,} events of {w['profiles']:,} profiles: median of "
                        f"{result['rounds']} round(s), seconds (polars: read_each; SQL: a temporary table)")
    for column in ("event type", "definitions", "polars read", "SQL table", "polars/SQL", "CPU ratio"):
        reads.add_column(column, justify="left" if column in ("event type", "definitions") else "right")
    for label, figures in s["per_read"].items():
        reads.add_row(label, ", ".join(figures["definitions"]), f"{figures['polars']:.3f}", f"{figures['sql']:.3f}",
                      _ratio(figures["ratio"]), _ratio(figures["cpu_ratio"]))
    console.print(reads)

    per_ca = Table(title=f"{len(result['definitions'])} calculated attributes, each over its shared read: median "
                         f"of {result['rounds']} round(s), seconds")
    for column in ("attribute", "calculation", "polars compute", "SQL query", "polars/SQL", "CPU ratio", "profiles",
                   "equal", "refresh"):
        per_ca.add_column(column, justify="left" if column in ("attribute", "calculation") else "right")
    for name, figures in s["per_ca"].items():
        check = result["checks"][name]
        per_ca.add_row(name, result["definitions"][name]["calculation_type"], f"{figures['polars']:.3f}",
                       f"{figures['sql']:.3f}", _ratio(figures["ratio"]), _ratio(figures["cpu_ratio"]),
                       f"{check['profiles']:,}",
                       "[green]yes[/]" if not check["differ"] else f"[red]NO ({check['differ']:,})[/]",
                       f"{incremental['per_ca_median_s'][name] * 1000:.0f} ms")
    per_ca.add_row("[bold]all ten, reads included[/]", "", f"[bold]{s['polars_s']:.2f}[/]", f"[bold]{s['sql_s']:.2f}[/]",
                   _ratio(s["ratio"]), _ratio(s["cpu_ratio"]), "", "", f"{incremental['median_s'] * 1000:.0f} ms")
    console.print(per_ca)

    goals = Table(title=f"goals ({result['machine']['cpus']} CPUs, DuckDB {result['machine']['duckdb']}, "
                        f"polars {result['machine']['polars']})")
    for column in ("measure", "result", "goal", "met"):
        goals.add_column(column, justify="left" if column == "measure" else "right")

    def row(measure: str, value: str, goal: str = "", met: bool | None = None) -> None:
        goals.add_row(measure, value, goal, "" if met is None else ("[green]yes[/]" if met else "[red]NO[/]"))

    row("full computation, polars path (read + compute)", f"{s['polars_s']:.2f} s", f"<= {GOAL_FULL_S:.0f} s",
        s["polars_s"] <= GOAL_FULL_S)
    row("  of which DuckDB read (read_each) | polars compute", f"{s['read_s']:.2f} | {s['compute_s']:.2f} s")
    row("same ten as DuckDB SQL, same run", f"{s['sql_s']:.2f} s")
    row("polars / SQL time (median of per-round ratios)", _ratio(s["ratio"]), f"<= {GOAL_RATIO:.1f}",
        s["ratio"] <= GOAL_RATIO)
    row("  per round", ", ".join(f"{r:.2f}" for r in s["per_round_ratio"]))
    row("CPU seconds (all threads): polars path | SQL; ratio", f"{s['polars_cpu_s']:.2f} | {s['sql_cpu_s']:.2f}; "
        f"{s['cpu_ratio']:.2f}")
    row("start-up recompute of the ten (compute_many: 16 chunks, values written)",
        f"{incremental['recompute_s']:.2f} s", "", None)
    row(f"refresh {incremental['touched']:,} touched profiles, ten one by one (median of {incremental['rounds']})",
        f"{incremental['median_s'] * 1000:.0f} ms", "", None)
    row("  the ten together (refresh_many)", f"{incremental['together_median_s'] * 1000:.0f} ms", "", None)
    row("values: polars = SQL for every profile", "equal" if result["equal"] else "DIFFERENT", "equal",
        result["equal"])
    row("values: refreshed = full", "equal" if not incremental["check"]["differ"] else "DIFFERENT", "equal",
        not incremental["check"]["differ"])
    console.print(goals)


def _ratio(value: float) -> str:
    return f"[green]{value:.2f}[/]" if value <= GOAL_RATIO else f"[red]{value:.2f}[/]"


def figures_line(result: dict[str, Any]) -> str:
    s, w, inc = result["summary"], result["workload"], result["incremental"]
    refreshed = not inc["check"]["differ"]
    return (f"calculated figures: {len(result['definitions'])} CAs, {w['events']:,} events, {w['profiles']:,} "
            f"profiles: polars {s['polars_s']:.2f} s (read {s['read_s']:.2f} + compute {s['compute_s']:.2f}) vs "
            f"DuckDB SQL {s['sql_s']:.2f} s, ratio {s['ratio']:.2f} (goal <= {GOAL_RATIO:.1f}; CPU time "
            f"{s['cpu_ratio']:.2f}); full <= {GOAL_FULL_S:.0f} s: {'yes' if s['polars_s'] <= GOAL_FULL_S else 'no'}; "
            f"start-up recompute {inc['recompute_s']:.2f} s; refresh {inc['touched']:,} profiles p50 "
            f"{inc['median_s'] * 1000:.0f} ms (together {inc['together_median_s'] * 1000:.0f} ms); values equal: "
            f"{'yes' if result['equal'] and refreshed else 'NO'}")


# --- main ----------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="100,000 profiles, 1,000,000 events")
    size.add_argument("--tiny", action="store_true", help="2,000 profiles, 20,000 events: the smoke test")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--touched", type=int, default=1000, help="profiles per incremental refresh (default 1,000)")
    parser.add_argument("--incremental-rounds", type=int, help="refresh rounds (default: --rounds, at least 5)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached database")
    parser.add_argument("--show-sql", action="store_true", help="print the SQL of each definition")
    args = parser.parse_args(argv)
    args.size = "quick" if args.quick else "tiny" if args.tiny else "full"
    args.profiles, args.events = SIZES[args.size]
    # the smoke run stays at seconds: as many refresh rounds as rounds, a tenth of its profiles touched
    args.incremental_rounds = args.incremental_rounds or (args.rounds if args.tiny else max(args.rounds, 5))
    args.touched = min(args.touched, args.profiles // 10)
    if args.rounds < 1 or args.touched < 1:
        parser.error("--rounds and --touched must be at least 1")
    return args


def measure(args: argparse.Namespace, console: Any, meta: dict[str, Any]) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    definitions = {name: parse_definition(raw) for name, raw in DEFINITIONS.items()}
    groups = sql_groups(definitions, AS_OF_MS)
    if args.show_sql:
        for group in groups:
            console.print(f"[bold]{group.label}[/] {group.table.text}\n  [dim]params {group.table.params}[/]")
            for name, query in group.queries.items():
                console.print(f"  [bold]{name}[/] {query.text}\n    [dim]params {query.params}[/]")
    source, _ = cache_paths(args.profiles, args.events)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:
        connection = open_database(str(source))
        try:
            timings, full, checks = alternating_rounds(connection.cursor(), definitions, groups, args.rounds,
                                                       progress)
        finally:
            connection.close()
        incremental = recompute_and_refresh(source, bench_attributes(definitions), full, args, progress)
    return {"summary": summarize(timings, groups), "checks": checks, "incremental": incremental,
            "sql": {group.label: {"table": {"text": group.table.text, "params": group.table.params},
                                  **{name: {"text": q.text, "params": q.params} for name, q in group.queries.items()}}
                    for group in groups},
            "runs": {part: t.seconds for part, t in timings.items()}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from rich.console import Console

    console = Console(stderr=True)  # stdout carries the figures line and the JSON
    if not console.is_terminal:
        console.width = 150
    started = time.perf_counter()
    console.rule(f"[bold]idmesh calculated attributes benchmark[/]: {len(DEFINITIONS)} definitions, "
                 f"{args.events:,} events, {args.profiles:,} profiles, {args.rounds} round(s)")
    meta = ensure_database(args.profiles, args.events, args.rebuild, console)
    measured = measure(args, console, meta)
    equal = not any(check["differ"] or check["profiles"] != check["other_profiles"]
                    for check in measured["checks"].values())
    result = {
        "bench": "calculated", "size": args.size, "rounds": args.rounds, "as_of_ms": AS_OF_MS,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "duckdb": duckdb.__version__, "polars": pl.__version__},
        "workload": {"profiles": args.profiles, "events": args.events, "database": meta},
        "definitions": DEFINITIONS, "goals": {"full_s": GOAL_FULL_S, "ratio": GOAL_RATIO},
        "equal": equal, **measured, "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print_tables(result, console)
    failures = [f"{name}: polars and SQL differ: {json.dumps(check)}" for name, check in result["checks"].items()
                if check["differ"] or check["profiles"] != check["other_profiles"]]
    failures += [f"{name}: refreshed values differ from the full computation: {json.dumps(check)}"
                 for name, check in result["incremental"]["check"]["differ"].items()]
    for failure in failures:
        console.print(f"[bold red]bench: {failure}[/]")
    out = RESULTS / f"calculated-{args.size}-{time.strftime('%Y%m%d-%H%M%S')}.result.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    console.print(f"[dim]full results: {out.relative_to(ROOT)}[/]")
    print(figures_line(result))
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "sql")}, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
