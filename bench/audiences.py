"""Audiences benchmark: twenty audiences of mixed criteria evaluated over 1M profiles and 10M events by idmesh's
polars path, beside the same twenty written as DuckDB SQL in the same run; then the real-time update of 1,000
touched profiles and the full apply of the memberships.

    .venv/bin/python bench/audiences.py                # 1,000,000 profiles, 10,000,000 events, 5 rounds
    .venv/bin/python bench/audiences.py --quick        # 100,000 profiles, 1,000,000 events
    .venv/bin/python bench/audiences.py --tiny --rounds 1      # seconds: the smoke test
    .venv/bin/python bench/audiences.py --rebuild --show-sql

The events are bench/calculated.py's database (built and cached by its own code). A copy of it gets, in SQL,
what audiences read besides events, and is cached as bench/results/audiences-<profiles>-<events>.duckdb:
- each profile's opening event becomes its app install (custom_event `install`, at its earliest event time);
- `profiles_base`: first seen = the install, last seen = the latest event; 0.5% orphaned (never evaluated);
- `identities_base`: customer ids, emails (a few profiles with two), phone numbers, iOS and Android device ids,
  each for a share of the profiles;
- `user_attributes_base`: tier (a few deleted: tombstones), age (a number; some sent as text), push_enabled,
  interests (a list, sometimes empty), vip (a null-valued tag), city;
- `consent_history_base`: GDPR marketing (some changed later), advertising (some spelt `Advertising`),
  analytics, and the CCPA data-sale opt-out (some changed later);
- `calculated_attributes` + `calculated_attribute_values`: one calculated attribute, lifetime_revenue, with a
  value for most profiles and a pending (NULL) one for a few.

Measured, every run on a fresh copy of that file:
1. Full evaluation, several rounds, the two sides alternating which goes first:
   - polars: `audiences.evaluate.evaluate_audiences` for the twenty in one call (one read per source). Its
     cursor is wrapped to time each DuckDB read (`.sql(...).to_arrow_table()`); the rest of the call is
     polars (group-bys, joins, the twenty expressions);
   - SQL: what a SQL author with twenty audiences over the same sources writes, from docs/audiences.md: one
     temporary table per source holding a column per distinct leaf (an event count per selection with FILTER,
     attribute tests over the current values, identity types, consent answers), one table of features per
     profile joining them, then one `SELECT mpid ... WHERE <the criteria>` per audience (an audience leaf
     inlines the criteria of the audience it names).
   Memberships are compared for every profile; any difference fails the run.
2. Full apply: `apply_members` for the twenty in one transaction, first into empty history (every member an
   add), then again after full evaluations an hour later each (time windows moved: some adds and drops).
3. Real-time update, several rounds: a batch of new events for 1,000 profiles drawn by activity is stored
   (not timed, as ingest would have), then, as audiences/upkeep.py does, in one transaction:
   `evaluate_audiences(..., mpids=touched)` and `apply_members(..., universe=touched)` for the twenty, commit.
   After the last round the touched evaluation must equal a full evaluation restricted to those profiles, and
   so must the stored memberships.

Figures are medians over rounds; the polars/SQL ratio is the median of per-round ratios. Wall and CPU seconds
(every thread of this process) are both reported: the machine is shared. stdout gets the figures line, then
the result as JSON; the tables go to stderr; the full result goes to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as `python bench/audiences.py`, Python puts bench/ first on the path, where this file would shadow the
# `audiences` package: the project root must come first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402  (needs the path fixed for the project imports below)
import polars as pl  # noqa: E402

from audiences.definitions import (  # noqa: E402
    AllOf,
    AnyOf,
    AudienceLeaf,
    CalculatedAttributeLeaf,
    ConsentLeaf,
    Criteria,
    EventLeaf,
    IdentityLeaf,
    Not,
    ProfileLeaf,
    UserAttributeLeaf,
    leaves,
    parse_audience,
)
from audiences.evaluate import evaluate_audiences  # noqa: E402
from audiences.membership import apply_members, current_members  # noqa: E402
from bench.calculated import (  # noqa: E402
    AS_OF_MS,
    RESULTS,
    SIZES,
    WORKSPACE_ID,
    clock,
    copy_database,
    ensure_database,
    remove_database,
    since,
    touched_profiles,
)
from bench.calculated import DEFINITIONS as CA_DEFINITIONS  # noqa: E402
from bench.calculated import cache_paths as event_cache_paths  # noqa: E402
from engine.ca_definitions import Condition  # noqa: E402
from engine.event_journal import ARRIVAL_SPAN  # noqa: E402
from engine.store import open_database  # noqa: E402

SCHEMA_TAG = "audiences-v1"   # bump when the added data changes, so stale caches are rebuilt
GOAL_FULL_S = 5.0             # DESIGN.md: 20 audiences over 1M profiles
GOAL_REALTIME_MS = 50.0       # DESIGN.md: a real-time update for 1k touched profiles
HOUR_MS = 3_600_000
MINUTE_MS = 60_000
CA_ID = 1
CA_NAME = "lifetime_revenue"

# Twenty audiences as the Platform API takes them (POST .../audiences); ids are the keys.
AUDIENCES: dict[int, dict[str, Any]] = {
    1: {"name": "New and barely active", "description": "installed in the last 72 hours with fewer than three sessions",
        "criteria": {"all": [
            {"event": {"event_type": "custom_event", "event_name": "install",
                       "time_period": {"type": "within_last", "value": 72, "unit": "hours"}}},
            {"event": {"event_type": "session_start", "count": {"operator": "fewer_than", "value": 3}}},
            {"not": {"consent": {"ccpa_data_sale_opt_out": True}}}]}},
    2: {"name": "Purchased in the last 30 days",
        "criteria": {"event": {"event_type": "commerce_event",
                               "conditions": [{"attribute_name": "data.product_action.action", "operator": "equals",
                                               "values": ["purchase"]}],
                               "time_period": {"type": "within_last", "value": 30, "unit": "days"}}}},
    3: {"name": "Browsing heavily",
        "criteria": {"event": {"event_type": "custom_event", "event_name": "view_item",
                               "time_period": {"type": "within_last", "value": 14, "unit": "days"},
                               "count": {"operator": "at_least", "value": 5}}}},
    4: {"name": "Shoe lovers, gold or better",
        "criteria": {"all": [
            {"event": {"event_type": "custom_event", "event_name": "view_item",
                       "conditions": [{"attribute_name": "category", "operator": "equals", "values": ["shoes"]}],
                       "count": {"operator": "at_least", "value": 3}}},
            {"user_attribute": {"name": "tier", "operator": "in", "values": ["gold", "platinum"]}}]}},
    5: {"name": "Cart abandoners",
        "criteria": {"all": [
            {"any": [
                {"event": {"event_type": "screen_view", "event_name": "Cart",
                           "time_period": {"type": "within_last", "value": 7, "unit": "days"}}},
                {"event": {"event_name": "Checkout", "time_period": {"type": "within_last", "value": 7, "unit": "days"}}}]},
            {"not": {"event": {"event_type": "commerce_event",
                               "conditions": [{"attribute_name": "data.product_action.action", "operator": "equals",
                                               "values": ["purchase"]}],
                               "time_period": {"type": "within_last", "value": 7, "unit": "days"}}}}]}},
    6: {"name": "High lifetime value",
        "criteria": {"calculated_attribute": {"id": CA_ID, "operator": "greater_than", "values": [1500]}}},
    7: {"name": "Active, no revenue value yet",
        "criteria": {"all": [
            {"calculated_attribute": {"id": CA_ID, "operator": "not_exists"}},
            {"profile": {"field": "last_seen", "within_last": {"value": 30, "unit": "days"}}}]}},
    8: {"name": "Email marketing allowed",
        "criteria": {"all": [
            {"identity": {"type": "email"}},
            {"consent": {"gdpr_purpose": "marketing", "consented": True}}]}},
    9: {"name": "Known by a device only",
        "criteria": {"all": [
            {"identity": {"type": "customerid", "present": False}},
            {"identity": {"type": "email", "present": False}},
            {"any": [{"identity": {"type": "ios_idfv"}}, {"identity": {"type": "android_aaid"}}]}]}},
    10: {"name": "Lapsed", "type": "standard", "refresh_minutes": 1440,
         "criteria": {"all": [
             {"profile": {"field": "last_seen", "before": "2026-04-15"}},
             {"profile": {"field": "first_seen", "before": "2026-03-01"}}]}},
    11: {"name": "New this fortnight",
         "criteria": {"profile": {"field": "first_seen", "within_last": {"value": 14, "unit": "days"}}}},
    12: {"name": "Opted out of data sale (CCPA)", "criteria": {"consent": {"ccpa_data_sale_opt_out": True}}},
    13: {"name": "Advertising allowed and reachable",
         "criteria": {"all": [
             {"consent": {"gdpr_purpose": "advertising", "consented": True}},
             {"not": {"consent": {"ccpa_data_sale_opt_out": True}}},
             {"any": [{"user_attribute": {"name": "push_enabled", "operator": "equals", "values": [True]}},
                      {"identity": {"type": "ios_idfa"}}]}]}},
    14: {"name": "Deal seekers",
         "criteria": {"any": [
             {"event": {"event_type": "custom_event", "event_name": "add_to_wishlist",
                        "conditions": [{"attribute_name": "price", "operator": "greater_than", "values": [100]}],
                        "time_period": {"type": "within_last", "value": 30, "unit": "days"}}},
             {"event": {"event_type": "custom_event", "event_name": "coupon_applied",
                        "count": {"operator": "more_than", "value": 1}}},
             {"event": {"event_type": "custom_event", "event_name": "banner_click",
                        "conditions": [{"attribute_name": "source", "operator": "in", "values": ["ad", "push"]}],
                        "time_period": {"type": "since", "date": "2026-05-01"}}}]}},
    15: {"name": "Searching now and then",
         "criteria": {"event": {"event_type": "custom_event", "event_name": "search",
                                "time_period": {"type": "within_last", "value": 60, "unit": "days"},
                                "count": {"operator": "between", "values": [2, 5]}}}},
    16: {"name": "Aged 25 to 34",
         "criteria": {"user_attribute": {"name": "age", "operator": "between", "values": [25, 34]}}},
    17: {"name": "Runners or yogis in some cities",
         "criteria": {"all": [
             {"user_attribute": {"name": "interests", "operator": "in", "values": ["running", "yoga"]}},
             {"any": [{"user_attribute": {"name": "city", "operator": "starts_with", "values": ["San"]}},
                      {"user_attribute": {"name": "city", "operator": "in", "values": ["London", "Paris"]}}]}]}},
    18: {"name": "One session, VIP or platinum",
         "criteria": {"all": [
             {"event": {"event_type": "session_start", "count": {"operator": "exactly", "value": 1}}},
             {"any": [{"user_attribute": {"name": "vip", "operator": "exists"}},
                      {"user_attribute": {"name": "tier", "operator": "equals", "values": ["platinum"]}}]}]}},
    19: {"name": "Valuable, reachable, not opted out",
         "criteria": {"all": [
             {"audience": {"id": 6}},
             {"any": [{"identity": {"type": "email"}}, {"identity": {"type": "mobile_number"}}]},
             {"not": {"audience": {"id": 12}}}]}},
    20: {"name": "Product browsers who never bought, untiered or push-enabled",
         "criteria": {"all": [
             {"event": {"event_type": "screen_view", "event_name": "ProductDetail",
                        "time_period": {"type": "within_last", "value": 30, "unit": "days"},
                        "count": {"operator": "at_least", "value": 2}}},
             {"not": {"any": [
                 {"event": {"event_type": "commerce_event",
                            "conditions": [{"attribute_name": "data.product_action.action", "operator": "equals",
                                            "values": ["purchase"]}]}},
                 {"all": [{"user_attribute": {"name": "tier", "operator": "exists"}},
                          {"not": {"user_attribute": {"name": "push_enabled", "operator": "equals",
                                                      "values": [True]}}}]}]}},
             {"event": {"event_type": "custom_event", "event_name": "search",
                        "count": {"operator": "at_most", "value": 3}}}]}},
}


# --- the database ------------------------------------------------------------------------------------------

# What audiences read besides events, generated in SQL over the events database. Parameters: $ws, $end.
# hash(mpid, '<what>') % 100 picks a share of the profiles for each thing, independently of the others.
ADDITIONS: list[tuple[str, str]] = [
    ("installs: each profile's opening event, at its earliest time", """
CREATE TEMP TABLE openings AS
SELECT o.batch_id, f.first_ms,
       ['organic', 'organic', 'ad', 'push', 'deeplink'][1 + (hash(o.batch_id, 'src') % 5)::BIGINT] AS source
FROM (SELECT batch_id, any_value(mpid) AS mpid FROM events_base GROUP BY batch_id HAVING count(*) = 1) AS o
JOIN (SELECT mpid, min(timestamp_ms) AS first_ms FROM events_base GROUP BY mpid) AS f USING (mpid);
UPDATE events_base SET event_type = 'custom_event', event_name = 'install', custom_event_type = 'other',
    timestamp_ms = o.first_ms,
    custom_attributes = ('{"source":"' || o.source || '"}')::JSON,
    data = ('{"event_name":"install","custom_event_type":"other","timestamp_unixtime_ms":' || o.first_ms::VARCHAR
            || ',"custom_attributes":{"source":"' || o.source || '"}}')::JSON
FROM openings AS o WHERE events_base.batch_id = o.batch_id;
DROP TABLE openings"""),
    ("profiles: first and last seen, status", """
INSERT INTO profiles_base
SELECT $ws, mpid, min(timestamp_ms), min(timestamp_ms), max(timestamp_ms),
       CASE WHEN hash(mpid, 'status') % 1000 < 5 THEN 'orphaned' ELSE 'active' END
FROM events_base WHERE workspace_id = $ws GROUP BY mpid"""),
    ("identities: customer ids, emails, phones, device ids", """
INSERT INTO identities_base
SELECT $ws, mpid, identity_type, value, value, first_seen_ms FROM (
    SELECT mpid, first_seen_ms, 'customerid' AS identity_type, 'C' || (hash(mpid, 'cid') % 10000000000)::VARCHAR AS value
        FROM profiles_base WHERE hash(mpid, 'has customerid') % 100 < 40
    UNION ALL SELECT mpid, first_seen_ms, 'email', 'u' || (hash(mpid, 'email') % 10000000000)::VARCHAR || '@example.com'
        FROM profiles_base WHERE hash(mpid, 'has email') % 100 < 55
    UNION ALL SELECT mpid, first_seen_ms, 'email', 'w' || (hash(mpid, 'work') % 10000000000)::VARCHAR || '@example.org'
        FROM profiles_base WHERE hash(mpid, 'has email') % 100 < 3
    UNION ALL SELECT mpid, first_seen_ms, 'mobile_number', '+1555' || lpad((hash(mpid, 'phone') % 10000000)::VARCHAR, 7, '0')
        FROM profiles_base WHERE hash(mpid, 'has phone') % 100 < 12
    UNION ALL SELECT mpid, first_seen_ms, 'ios_idfv', md5(mpid::VARCHAR || 'idfv')
        FROM profiles_base WHERE hash(mpid, 'os') % 100 < 45
    UNION ALL SELECT mpid, first_seen_ms, 'ios_idfa', md5(mpid::VARCHAR || 'idfa')
        FROM profiles_base WHERE hash(mpid, 'os') % 100 < 20
    UNION ALL SELECT mpid, first_seen_ms, 'android_aaid', md5(mpid::VARCHAR || 'aaid')
        FROM profiles_base WHERE hash(mpid, 'os') % 100 BETWEEN 55 AND 94)"""),
    ("user attributes: tier, age, push_enabled, interests, vip, city", """
INSERT INTO user_attributes_base
WITH p AS (SELECT mpid, last_seen_ms, hash(mpid, 'attributes') AS h FROM profiles_base)
SELECT $ws, mpid, name, value::JSON, last_seen_ms, value IS NULL FROM (
    SELECT mpid, last_seen_ms, 'tier' AS name,
           CASE WHEN h % 100 < 80 THEN '"' || ['bronze', 'bronze', 'silver', 'silver', 'gold', 'platinum']
                                              [1 + (hash(mpid, 'tier') % 6)::BIGINT] || '"' END AS value
        FROM p WHERE h % 100 < 83
    UNION ALL SELECT mpid, last_seen_ms, 'age',
           CASE WHEN h // 100 % 100 < 60 THEN (18 + hash(mpid, 'age') % 63)::VARCHAR
                ELSE '"' || (18 + hash(mpid, 'age') % 63)::VARCHAR || '"' END
        FROM p WHERE h // 100 % 100 < 65
    UNION ALL SELECT mpid, last_seen_ms, 'push_enabled', (hash(mpid, 'push') % 3 < 2)::VARCHAR
        FROM p WHERE h // 10000 % 100 < 70
    UNION ALL SELECT mpid, last_seen_ms, 'interests', '[' || concat_ws(',',
               CASE WHEN hash(mpid, 'running') % 4 = 0 THEN '"running"' END,
               CASE WHEN hash(mpid, 'yoga') % 5 = 0 THEN '"yoga"' END,
               CASE WHEN hash(mpid, 'cooking') % 3 = 0 THEN '"cooking"' END,
               CASE WHEN hash(mpid, 'travel') % 3 = 0 THEN '"travel"' END,
               CASE WHEN hash(mpid, 'gaming') % 4 = 0 THEN '"gaming"' END) || ']'
        FROM p WHERE h // 1000000 % 100 < 40
    UNION ALL SELECT mpid, last_seen_ms, 'vip', 'null' FROM p WHERE h // 100000000 % 100 < 3
    UNION ALL SELECT mpid, last_seen_ms, 'city',
           '"' || ['San Francisco', 'San Diego', 'Santiago', 'London', 'Paris', 'Berlin', 'Austin', 'Tokyo']
                  [1 + (hash(mpid, 'city') % 8)::BIGINT] || '"'
        FROM p WHERE h // 10000000000 % 100 < 50)"""),
    ("consent: GDPR marketing, advertising, analytics; CCPA data sale opt-out", """
INSERT INTO consent_history_base
WITH p AS (SELECT mpid, first_seen_ms, last_seen_ms, hash(mpid, 'consent') AS h FROM profiles_base)
SELECT $ws, mpid, regulation, purpose, consented, 'v1', at_ms, NULL, NULL, at_ms + 1000, 'consent-' || mpid::VARCHAR
FROM (
    SELECT mpid, 'gdpr' AS regulation, 'marketing' AS purpose, hash(mpid, 'marketing') % 4 <> 0 AS consented,
           first_seen_ms AS at_ms FROM p WHERE h % 100 < 50
    UNION ALL SELECT mpid, 'gdpr', 'marketing', hash(mpid, 'marketing') % 4 = 0, last_seen_ms + 1
        FROM p WHERE h % 100 < 10
    UNION ALL SELECT mpid, 'gdpr', CASE WHEN hash(mpid, 'spelling') % 10 = 0 THEN 'Advertising' ELSE 'advertising' END,
           hash(mpid, 'advertising') % 3 <> 0, first_seen_ms FROM p WHERE h // 100 % 100 < 40
    UNION ALL SELECT mpid, 'gdpr', 'analytics', true, first_seen_ms FROM p WHERE h // 10000 % 100 < 30
    UNION ALL SELECT mpid, 'ccpa', 'data_sale_opt_out', hash(mpid, 'sale') % 3 = 0, first_seen_ms
        FROM p WHERE h // 1000000 % 100 < 30
    UNION ALL SELECT mpid, 'ccpa', 'data_sale_opt_out', hash(mpid, 'sale') % 3 <> 0, last_seen_ms + 1
        FROM p WHERE h // 1000000 % 100 < 5)"""),
    ("calculated attribute: lifetime_revenue values", f"""
INSERT INTO calculated_attributes VALUES ({CA_ID}, $ws, '{CA_NAME}', 'bench: revenue per profile', $definition::JSON,
    $definition::JSON, $end, $end, $end, 'bench');
INSERT INTO calculated_attribute_values
SELECT $ws, {CA_ID}, mpid,
       CASE WHEN hash(mpid, 'revenue') % 100 < 70
            THEN (CASE WHEN hash(mpid, 'cents') % 4 = 0 THEN (hash(mpid, 'amount') % 2000)::VARCHAR
                       ELSE round((hash(mpid, 'amount') % 200000) / 100.0, 2)::VARCHAR END)::JSON END,
       $end, CASE WHEN hash(mpid, 'revenue') % 100 >= 70 THEN $end + 86400000 END
FROM profiles_base WHERE hash(mpid, 'revenue') % 100 < 72"""),
]


def cache_paths(profiles: int, events: int) -> tuple[Path, Path]:
    stem = RESULTS / f"audiences-{profiles}-{events}"
    return stem.with_suffix(".duckdb"), stem.with_suffix(".json")


def ensure_audience_database(profiles: int, events: int, rebuild: bool, console: Any) -> dict[str, Any]:
    """The events database (bench/calculated.py builds and caches it), then a copy of it with what audiences read
    besides events, cached too; rebuilt when either layer's generated data changed."""
    events_meta = json.loads(json.dumps(ensure_database(profiles, events, False, console)))
    db_path, meta_path = cache_paths(profiles, events)
    if not rebuild and db_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("schema") == SCHEMA_TAG and meta.get("events") == events_meta:
            console.print(f"[dim]using cached database {db_path.relative_to(ROOT)} ({meta['file_mb']:,} MB, "
                          f"built in {meta['build_s']} s; --rebuild makes a new one)[/]")
            return meta
    return build_audience_database(profiles, events, events_meta, console)


def build_audience_database(profiles: int, events: int, events_meta: dict[str, Any], console: Any) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    db_path, meta_path = cache_paths(profiles, events)
    building = db_path.with_name(f"{db_path.stem}.building-{os.getpid()}.duckdb")  # concurrent builds never clash
    started = time.perf_counter()
    copy_database(event_cache_paths(profiles, events)[0], building)
    connection = open_database(str(building))
    try:
        connection.execute("SET enable_progress_bar = false")  # rich shows the progress
        params = {"ws": WORKSPACE_ID, "end": AS_OF_MS, "definition": json.dumps(CA_DEFINITIONS[CA_NAME])}
        columns = [TextColumn("[bold]build[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn()]
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("audience data", total=len(ADDITIONS))
            for label, script in ADDITIONS:
                progress.update(task, description=label)
                connection.execute("BEGIN")
                for statement in filter(str.strip, script.split(";\n")):
                    used = {name: value for name, value in params.items() if f"${name}" in statement}
                    connection.execute(statement, used)
                connection.execute("COMMIT")
                progress.advance(task)
        connection.execute("CHECKPOINT")
        shape = describe_additions(connection)
    except BaseException:
        connection.close()
        remove_database(building)
        raise
    connection.close()
    for companion, target in ((building, db_path), (Path(f"{building}.wal"), Path(f"{db_path}.wal"))):
        if companion.exists():
            companion.replace(target)
        else:
            target.unlink(missing_ok=True)
    meta = {"schema": SCHEMA_TAG, "profiles": profiles, "events": events_meta,
            "build_s": round(time.perf_counter() - started, 1), "file_mb": round(db_path.stat().st_size / 2**20, 1),
            "shape": shape}
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


def describe_additions(connection: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    def rows(query: str) -> dict[str, int]:
        return {str(key): count for key, count in connection.execute(query).fetchall()}

    return {
        "profiles_by_status": rows("SELECT status, count(*) FROM profiles_base GROUP BY ALL ORDER BY ALL"),
        "installs": connection.execute("SELECT count(*) FROM events_base WHERE event_name = 'install'").fetchall()[0][0],
        "identities_by_type": rows("SELECT identity_type, count(*) FROM identities_base GROUP BY ALL ORDER BY ALL"),
        "user_attributes_by_name": rows("SELECT name, count(*) FROM user_attributes_base GROUP BY ALL ORDER BY ALL"),
        "consent_statements": rows("SELECT regulation || ' ' || purpose, count(*) FROM consent_history_base "
                                   "GROUP BY ALL ORDER BY ALL"),
        "ca_values": rows("SELECT value IS NOT NULL, count(*) FROM calculated_attribute_values GROUP BY ALL"),
    }


# --- the same audiences as DuckDB SQL --------------------------------------------------------------------------

class Params:
    """Named parameters of one statement: `add` binds a value and returns its name in the SQL."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def add(self, value: Any) -> str:
        name = f"p{len(self.values)}"
        self.values[name] = value
        return f"${name}"


@dataclass(frozen=True)
class Statement:
    label: str
    text: str
    params: dict[str, Any]


def json_path(attribute_name: str) -> str:
    """`data.a.b` walks the event data; any other name is a custom attribute."""
    if attribute_name.startswith("data."):
        return "$." + ".".join(f'"{part}"' for part in attribute_name[len("data."):].split("."))
    return '$."' + attribute_name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def json_column(attribute_name: str) -> str:
    return "data" if attribute_name.startswith("data.") else "custom_attributes"


def text_test(condition: Condition, text: str, params: Params) -> str:
    """Whether an attribute text passes a comparison; NULL (no text, or not a number) counts as false."""
    operator, values = condition.operator, condition.values
    if operator == "exists":
        return f"{text} IS NOT NULL"
    if condition.value_type == "boolean":
        wanted = params.add("true" if values[0] else "false")
        return f"{text} = {wanted}" if operator == "equals" else f"{text} <> {wanted}"
    subject = f"TRY_CAST({text} AS DOUBLE)" if condition.value_type == "number" else text
    if operator == "between":
        return f"{subject} BETWEEN {params.add(values[0])} AND {params.add(values[1])}"
    if operator == "in":
        return f"{subject} IN ({', '.join(params.add(v) for v in values)})"
    if operator in ("contains", "starts_with"):
        return f"{operator}({subject}, {params.add(values[0])})"
    symbol = {"equals": "=", "not_equals": "<>", "greater_than": ">", "greater_than_or_equal": ">=",
              "less_than": "<", "less_than_or_equal": "<="}[operator]
    return f"{subject} {symbol} {params.add(values[0])}"


EventKey = tuple[Any, ...]   # what an event leaf selects, its count aside


def event_key(leaf: EventLeaf) -> EventKey:
    return leaf.event_type, leaf.event_name, leaf.conditions, leaf.time_period


def value_key(leaf: UserAttributeLeaf | CalculatedAttributeLeaf) -> tuple[Any, ...]:
    """`exists` and `not_exists` ask the same question, one of them negated."""
    subject = leaf.name if isinstance(leaf, UserAttributeLeaf) else leaf.ca_id
    if leaf.operator in ("exists", "not_exists"):
        return subject, "exists"
    return subject, leaf.condition()


class SqlPeer:
    """The twenty audiences as DuckDB SQL: a temporary table per source with a column per distinct leaf, a
    features table joining them to the active profiles, and one query per audience over it."""

    def __init__(self, criteria: dict[int, Criteria], workspace_id: str, as_of_ms: int) -> None:
        self.criteria = criteria
        self.workspace_id = workspace_id
        self.as_of_ms = as_of_ms
        self.events: dict[EventKey, str] = {}
        self.user_attributes: dict[tuple[Any, ...], str] = {}
        self.calculated: dict[tuple[Any, ...], str] = {}
        self.identities: dict[str, str] = {}
        self.consents: dict[tuple[str, str], str] = {}
        for tree in criteria.values():
            for leaf in leaves(tree):
                self._name(leaf)

    def _name(self, leaf: Any) -> None:
        if isinstance(leaf, EventLeaf):
            self.events.setdefault(event_key(leaf), f"e{len(self.events)}")
        elif isinstance(leaf, UserAttributeLeaf):
            self.user_attributes.setdefault(value_key(leaf), f"u{len(self.user_attributes)}")
        elif isinstance(leaf, CalculatedAttributeLeaf):
            self.calculated.setdefault(value_key(leaf), f"c{len(self.calculated)}")
        elif isinstance(leaf, IdentityLeaf):
            self.identities.setdefault(leaf.identity_type, f"i{len(self.identities)}")
        elif isinstance(leaf, ConsentLeaf):
            self.consents.setdefault((leaf.regulation, leaf.purpose), f"k{len(self.consents)}")

    # the shared part: one statement per source, then the features
    def tables(self) -> list[Statement]:
        made = [self._profiles()]
        for columns, build in ((self.events, self._events), (self.user_attributes, self._user_attributes),
                               (self.calculated, self._calculated), (self.identities, self._identities),
                               (self.consents, self._consent)):
            if columns:
                made.append(build())
        made.append(self._features([statement.label for statement in made[1:]]))
        return made

    def table_names(self) -> list[str]:
        return [f"peer_{statement.label}" for statement in self.tables()]

    def _profiles(self) -> Statement:
        params = Params()
        return Statement("profiles", f"CREATE OR REPLACE TEMP TABLE peer_profiles AS "
                                     f"SELECT mpid, first_seen_ms, last_seen_ms FROM profiles "
                                     f"WHERE scope = {params.add(self.workspace_id)} AND status = 'active'",
                         params.values)

    def _point(self, event_type: str | None, event_name: str | None, params: Params) -> str:
        tests = []
        if event_type is not None:
            tests.append(f"event_type = {params.add(event_type)}")
        if event_name is not None:
            tests.append(f"event_name = {params.add(event_name)}")
        return "(" + " AND ".join(tests) + ")"

    def _selected(self, key: EventKey, params: Params) -> str:
        event_type, event_name, _, period = key
        test = self._point(event_type, event_name, params)
        start = period.start_ms(self.as_of_ms)
        return test if start is None else f"({test} AND timestamp_ms >= {params.add(start)})"

    def _events(self) -> Statement:
        """One pass over the events: the ones any leaf may count, JSON attributes extracted (one parse per
        document and column) only from events of a selection with conditions on them, a FILTERed count per
        selection."""
        params = Params()
        names: dict[str, list[str]] = {}   # JSON column -> attribute names read from it
        for _, _, conditions, _ in self.events:
            for condition in conditions:
                attributes = names.setdefault(json_column(condition.attribute_name), [])
                if condition.attribute_name not in attributes:
                    attributes.append(condition.attribute_name)
        extracts = []
        for column, attributes in names.items():
            guard = " OR ".join(self._selected(key, params) for key in self.events
                                if any(json_column(c.attribute_name) == column for c in key[2]))
            paths = params.add([json_path(name) for name in attributes])
            extracts.append(f"CASE WHEN {guard} THEN json_extract_string({column}, {paths}::VARCHAR[]) END "
                            f"AS {column}_texts")

        def text(name: str) -> str:
            column = json_column(name)
            return f"{column}_texts[{names[column].index(name) + 1}]"

        counts = []
        for key, alias in self.events.items():
            tests = [self._selected(key, params)] + [text_test(c, text(c.attribute_name), params) for c in key[2]]
            counts.append(f"count(*) FILTER (WHERE {' AND '.join(tests)}) AS {alias}")
        where = [f"workspace_id = {params.add(self.workspace_id)}", f"timestamp_ms <= {params.add(self.as_of_ms)}"]
        starts = [key[3].start_ms(self.as_of_ms) for key in self.events]
        if None not in starts:
            where.append(f"timestamp_ms >= {params.add(min(starts))}")
        points = sorted({(key[0], key[1]) for key in self.events}, key=str)
        where.append("(" + " OR ".join(self._point(t, n, params) for t, n in points) + ")")
        inner = ", ".join(["mpid", "event_type", "event_name", "timestamp_ms", *extracts])
        return Statement("events", f"CREATE OR REPLACE TEMP TABLE peer_events AS SELECT mpid, {', '.join(counts)} "
                                   f"FROM (SELECT {inner} FROM events WHERE {' AND '.join(where)}) GROUP BY mpid",
                         params.values)

    def _value_tests(self, tests: dict[tuple[Any, ...], str], key_column: str, params: Params) -> list[str]:
        flags = []
        for (subject, condition), alias in tests.items():
            same = f"{key_column} = {params.add(subject)}"
            if condition == "exists":   # a row at all: a null-valued tag or an empty list exists too
                flags.append(f"bool_or({same}) AS {alias}")
            else:                       # a list value: true when one of its elements is
                element = text_test(condition, "t", params)
                flags.append(f"bool_or({same} AND len(list_filter(texts, lambda t: {element})) > 0) AS {alias}")
        return flags

    # a JSON value's texts: one per element of a list, else the value's own (NULL for a JSON null)
    TEXTS = ("CASE WHEN json_type(value) = 'ARRAY' THEN json_extract_string(value, '$[*]') "
             "ELSE [json_extract_string(value, '$')] END AS texts")

    def _user_attributes(self) -> Statement:
        params = Params()
        flags = self._value_tests(self.user_attributes, "name", params)
        names = sorted({subject for subject, _ in self.user_attributes})
        return Statement("user_attributes",
                         f"CREATE OR REPLACE TEMP TABLE peer_user_attributes AS SELECT mpid, {', '.join(flags)} "
                         f"FROM (SELECT mpid, name, {self.TEXTS} FROM user_attributes "
                         f"WHERE workspace_id = {params.add(self.workspace_id)} AND name IN "
                         f"({', '.join(params.add(n) for n in names)})) GROUP BY mpid", params.values)

    def _calculated(self) -> Statement:
        params = Params()
        flags = self._value_tests(self.calculated, "ca_id", params)
        ids = sorted({subject for subject, _ in self.calculated})
        # a NULL value is a pending one (changes_at_ms): no value yet
        return Statement("calculated_attribute_values",
                         f"CREATE OR REPLACE TEMP TABLE peer_calculated_attribute_values AS "
                         f"SELECT mpid, {', '.join(flags)} FROM (SELECT mpid, ca_id, {self.TEXTS} "
                         f"FROM calculated_attribute_values WHERE workspace_id = {params.add(self.workspace_id)} "
                         f"AND value IS NOT NULL AND ca_id IN ({', '.join(params.add(i) for i in ids)})) "
                         f"GROUP BY mpid", params.values)

    def _identities(self) -> Statement:
        params = Params()
        flags = [f"bool_or(identity_type = {params.add(t)}) AS {alias}" for t, alias in self.identities.items()]
        return Statement("identities",
                         f"CREATE OR REPLACE TEMP TABLE peer_identities AS SELECT mpid, {', '.join(flags)} "
                         f"FROM identities WHERE scope = {params.add(self.workspace_id)} AND identity_type IN "
                         f"({', '.join(params.add(t) for t in self.identities)}) GROUP BY mpid", params.values)

    def _consent(self) -> Statement:
        """The current answer per purpose is the `consent` view's; definitions name purposes in lower case and
        match any spelling."""
        params = Params()
        flags = [f"bool_or(regulation = {params.add(r)} AND lower(purpose) = {params.add(p)} AND consented) AS {alias}"
                 for (r, p), alias in self.consents.items()]
        purposes = sorted({p for _, p in self.consents})
        return Statement("consent",
                         f"CREATE OR REPLACE TEMP TABLE peer_consent AS SELECT mpid, {', '.join(flags)} "
                         f"FROM consent WHERE workspace_id = {params.add(self.workspace_id)} AND lower(purpose) IN "
                         f"({', '.join(params.add(p) for p in purposes)}) GROUP BY mpid", params.values)

    def _features(self, sources: list[str]) -> Statement:
        columns = ["p.mpid", "p.first_seen_ms", "p.last_seen_ms"]
        joins = []
        for source, tests, default in (("events", self.events, "0"), ("user_attributes", self.user_attributes, "false"),
                                       ("calculated_attribute_values", self.calculated, "false"),
                                       ("identities", self.identities, "false"), ("consent", self.consents, "false")):
            if source not in sources:
                continue
            joins.append(f"LEFT JOIN peer_{source} USING (mpid)")
            columns += [f"coalesce({alias}, {default}) AS {alias}" for alias in tests.values()]
        return Statement("features", f"CREATE OR REPLACE TEMP TABLE peer_features AS SELECT {', '.join(columns)} "
                                     f"FROM peer_profiles AS p {' '.join(joins)}", {})

    # one query per audience
    def query(self, audience_id: int) -> Statement:
        params = Params()
        where = self.condition(self.criteria[audience_id], params)
        return Statement(str(audience_id), f"SELECT mpid FROM peer_features WHERE {where} ORDER BY mpid",
                         params.values)

    def condition(self, criteria: Criteria, params: Params) -> str:
        if isinstance(criteria, (AllOf, AnyOf)):
            joiner = " AND " if isinstance(criteria, AllOf) else " OR "
            return "(" + joiner.join(self.condition(child, params) for child in criteria.children) + ")"
        if isinstance(criteria, Not):
            return f"(NOT {self.condition(criteria.child, params)})"
        if isinstance(criteria, EventLeaf):
            column, count = self.events[event_key(criteria)], criteria.count
            if count.high is None:
                return f"{column} >= {params.add(count.low)}"
            return f"{column} BETWEEN {params.add(count.low)} AND {params.add(count.high)}"
        if isinstance(criteria, (UserAttributeLeaf, CalculatedAttributeLeaf)):
            tests = self.user_attributes if isinstance(criteria, UserAttributeLeaf) else self.calculated
            column = tests[value_key(criteria)]
            return f"(NOT {column})" if criteria.operator == "not_exists" else column
        if isinstance(criteria, IdentityLeaf):
            column = self.identities[criteria.identity_type]
            return column if criteria.present else f"(NOT {column})"
        if isinstance(criteria, ConsentLeaf):
            column = self.consents[(criteria.regulation, criteria.purpose)]
            return column if criteria.consented else f"(NOT {column})"
        if isinstance(criteria, ProfileLeaf):
            moment = f"{criteria.field}_ms"
            tests = []
            if criteria.window_ms is not None:
                tests.append(f"{moment} BETWEEN {params.add(self.as_of_ms - criteria.window_ms)} AND "
                             f"{params.add(self.as_of_ms)}")
            if criteria.after_ms is not None:
                tests.append(f"{moment} >= {params.add(criteria.after_ms)}")
            if criteria.before_ms is not None:
                tests.append(f"{moment} < {params.add(criteria.before_ms)}")
            return "(" + " AND ".join(tests) + ")"
        assert isinstance(criteria, AudienceLeaf)
        inlined = self.condition(self.criteria[criteria.audience_id], params)
        return inlined if criteria.member else f"(NOT {inlined})"


# --- measuring -------------------------------------------------------------------------------------------------

Clocked = tuple[float, float]  # wall and CPU seconds

_SOURCE = re.compile(r"\bFROM\s+([a-z_]+)")


class TimedCursor:
    """A cursor that times each DuckDB read evaluate_audiences makes (`sql(...).to_arrow_table()`), by the
    table or view it reads; everything else passes through."""

    def __init__(self, cursor: duckdb.DuckDBPyConnection) -> None:
        self._cursor = cursor
        self.reads: dict[str, Clocked] = {}

    def sql(self, query: str, *args: Any, **kwargs: Any) -> TimedRelation:
        found = _SOURCE.search(query)
        return TimedRelation(self, found.group(1) if found else "other", clock(),
                             self._cursor.sql(query, *args, **kwargs))

    def record(self, source: str, measured: Clocked) -> None:
        wall, cpu = self.reads.get(source, (0.0, 0.0))
        self.reads[source] = (wall + measured[0], cpu + measured[1])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class TimedRelation:
    def __init__(self, owner: TimedCursor, source: str, started: Clocked, relation: Any) -> None:
        self._owner, self._source, self._started, self._relation = owner, source, started, relation

    def to_arrow_table(self, *args: Any, **kwargs: Any) -> Any:
        table = self._relation.to_arrow_table(*args, **kwargs)
        self._owner.record(self._source, since(self._started))
        return table

    def __getattr__(self, name: str) -> Any:
        return getattr(self._relation, name)


@dataclass
class Series:
    """Seconds (wall and CPU) per part and round."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)

    def add(self, part: str, measured: Clocked) -> None:
        self.wall.setdefault(part, []).append(measured[0])
        self.cpu.setdefault(part, []).append(measured[1])

    def median(self, part: str, cpu: bool = False) -> float:
        return statistics.median((self.cpu if cpu else self.wall)[part])


def audience_list(criteria: dict[int, Criteria]) -> list[tuple[int, Criteria]]:
    return list(criteria.items())


def run_polars(cursor: duckdb.DuckDBPyConnection, criteria: dict[int, Criteria], as_of_ms: int,
               mpids: list[int] | None = None) -> tuple[dict[int, pl.Series], Clocked, dict[str, Clocked]]:
    timed = TimedCursor(cursor)
    started = clock()
    found = evaluate_audiences(timed, WORKSPACE_ID, audience_list(criteria), as_of_ms, mpids,  # type: ignore[arg-type]
                               stored_members=lambda other: current_members(cursor, WORKSPACE_ID, other))
    return found, since(started), timed.reads


def run_sql(cursor: duckdb.DuckDBPyConnection, peer: SqlPeer
            ) -> tuple[dict[int, pl.Series], Clocked, dict[str, Clocked], dict[int, Clocked]]:
    """The shared tables, then each audience's query into a polars Series (where the polars side ends); the
    temporary tables are dropped at the end, inside the time."""
    started = clock()
    tables: dict[str, Clocked] = {}
    for statement in peer.tables():
        t0 = clock()
        cursor.execute(statement.text, statement.params).fetchall()
        tables[statement.label] = since(t0)
    found: dict[int, pl.Series] = {}
    queries: dict[int, Clocked] = {}
    for audience_id in peer.criteria:
        statement = peer.query(audience_id)
        t0 = clock()
        table = cursor.sql(statement.text, params=statement.params).to_arrow_table()
        found[audience_id] = pl.from_arrow(table)["mpid"].cast(pl.Int64)
        queries[audience_id] = since(t0)
    for name in peer.table_names():
        cursor.execute(f"DROP TABLE IF EXISTS {name}").fetchall()
    return found, since(started), tables, queries


def compare_members(expected: pl.Series, found: pl.Series, limit: int = 5) -> dict[str, Any]:
    """Profile by profile: members only one side has. The polars side must also keep its contract (sorted,
    unique MPIDs)."""
    expected, found = expected.cast(pl.Int64), found.cast(pl.Int64)
    only_expected = expected.filter(~expected.is_in(found.implode()))
    only_found = found.filter(~found.is_in(expected.implode()))
    return {"members": len(expected), "other_members": len(found), "only_first": len(only_expected),
            "only_second": len(only_found), "sorted_unique": bool(expected.is_sorted() and expected.is_unique().all()),
            "examples": {"only_first": only_expected.head(limit).to_list(),
                         "only_second": only_found.head(limit).to_list()}}


def differs(check: dict[str, Any]) -> bool:
    return bool(check["only_first"] or check["only_second"] or not check["sorted_unique"])


def full_rounds(cursor: duckdb.DuckDBPyConnection, criteria: dict[int, Criteria], peer: SqlPeer, rounds: int,
                progress: Any) -> tuple[dict[str, Any], dict[int, pl.Series], dict[int, dict[str, Any]]]:
    """Both sides every round, the first alternating by round so neither always runs on a warmer cache. Every
    round's memberships are compared."""
    polars, sql = Series(), Series()
    checks: dict[int, dict[str, Any]] = {}
    first: dict[int, pl.Series] = {}
    task = progress.add_task("full evaluation: polars path and DuckDB SQL, alternating", total=rounds * 2)
    for r in range(rounds):
        for side in (["polars", "sql"] if r % 2 == 0 else ["sql", "polars"]):
            progress.update(task, description=f"full evaluation, round {r + 1}/{rounds} ({side})")
            if side == "polars":
                polars_found, total, reads = run_polars(cursor, criteria, AS_OF_MS)
                polars.add("total", total)
                for source, measured in reads.items():
                    polars.add(f"read {source}", measured)
                polars.add("polars", (total[0] - sum(m[0] for m in reads.values()),
                                      total[1] - sum(m[1] for m in reads.values())))
            else:
                sql_found, total, tables, queries = run_sql(cursor, peer)
                sql.add("total", total)
                for label, measured in tables.items():
                    sql.add(f"table {label}", measured)
                sql.add("queries", (sum(m[0] for m in queries.values()), sum(m[1] for m in queries.values())))
                for audience_id, measured in queries.items():
                    sql.add(f"query {audience_id}", measured)
            progress.advance(task)
        for audience_id in criteria:
            check = compare_members(polars_found[audience_id], sql_found[audience_id])
            if r == 0 or differs(check):
                checks[audience_id] = check | {"round": r}
        if r == 0:
            first = polars_found
        del polars_found, sql_found
    ratios = [p / s for p, s in zip(polars.wall["total"], sql.wall["total"])]
    cpu_ratios = [p / s for p, s in zip(polars.cpu["total"], sql.cpu["total"])]
    summary = {
        "polars_s": polars.median("total"), "sql_s": sql.median("total"),
        "polars_cpu_s": polars.median("total", cpu=True), "sql_cpu_s": sql.median("total", cpu=True),
        "ratio": statistics.median(ratios), "cpu_ratio": statistics.median(cpu_ratios),
        "per_round_ratio": [round(x, 3) for x in ratios], "per_round_cpu_ratio": [round(x, 3) for x in cpu_ratios],
        "polars_parts_s": {part: polars.median(part) for part in polars.wall if part != "total"},
        "sql_parts_s": {part: sql.median(part) for part in sql.wall if part != "total"},
        "runs": {"polars": polars.wall, "sql": sql.wall, "polars_cpu": polars.cpu, "sql_cpu": sql.cpu},
    }
    return summary, first, checks


def apply_all(cursor: duckdb.DuckDBPyConnection, found: dict[int, pl.Series], at_ms: int,
              universe: list[int] | None = None) -> tuple[Clocked, Clocked, dict[int, Any]]:
    """apply_members for every audience in one transaction, as upkeep does; (apply, commit) times."""
    changes: dict[int, Any] = {}
    started = clock()
    cursor.begin()
    try:
        for audience_id, members in found.items():
            changes[audience_id] = apply_members(cursor, WORKSPACE_ID, audience_id, members, at_ms, universe=universe)
    except BaseException:
        cursor.rollback()
        raise
    applied = since(started)
    started = clock()
    cursor.commit()
    return applied, since(started), changes


def full_applies(cursor: duckdb.DuckDBPyConnection, criteria: dict[int, Criteria], first: dict[int, pl.Series],
                 rounds: int, progress: Any) -> dict[str, Any]:
    """The first apply into empty history (every member an add), then `rounds` full evaluations an hour apart,
    each applied in full."""
    task = progress.add_task("full apply: into empty history, then re-applied an hour later each", total=rounds + 1)
    applied, committed, changes = apply_all(cursor, first, AS_OF_MS)
    progress.advance(task)
    result: dict[str, Any] = {"first": {"apply_s": applied[0], "commit_s": committed[0], "cpu_s": applied[1] + committed[1],
                                        "adds": sum(c.adds for c in changes.values()),
                                        "members": sum(c.size for c in changes.values())}}
    again = Series()
    moved = []
    for r in range(rounds):
        at = AS_OF_MS + (r + 1) * HOUR_MS
        found, evaluated, _ = run_polars(cursor, criteria, at)
        applied, committed, changes = apply_all(cursor, found, at)
        again.add("evaluate", evaluated)
        again.add("apply", applied)
        again.add("commit", committed)
        moved.append({"adds": sum(c.adds for c in changes.values()), "drops": sum(c.drops for c in changes.values())})
        progress.advance(task)
    result["again"] = {"rounds": rounds, "evaluate_s": again.median("evaluate"), "apply_s": again.median("apply"),
                       "commit_s": again.median("commit"), "changes": moved, "runs": again.wall}
    result["last_as_of_ms"] = AS_OF_MS + rounds * HOUR_MS
    return result


NEW_EVENTS_SQL = f"""
INSERT INTO events_base
WITH t AS (SELECT unnest($mpids::BIGINT[]) AS mpid),
kinds AS (SELECT * FROM (VALUES
    (0, 'session_start', NULL, NULL),
    (1, 'custom_event', 'view_item', '{{"category":"shoes","price":120.0,"source":"push"}}'),
    (2, 'screen_view', 'Cart', NULL),
    (3, 'commerce_event', NULL, NULL),
    (4, 'custom_event', 'add_to_wishlist', '{{"category":"bags","price":180.0}}'))
    AS k(k, event_type, event_name, attributes)),
e AS (SELECT t.mpid, kinds.*, $at - 20000 + kinds.k * 1000 AS ts,
             'rt' || $round::VARCHAR || '-' || t.mpid::VARCHAR AS batch_id, row_number() OVER (ORDER BY t.mpid, kinds.k) AS n
      FROM t, kinds WHERE kinds.k < 2 OR hash(t.mpid, $round, kinds.k) % 3 = 0)
SELECT $ws, mpid, batch_id, k, event_type, event_name, CASE WHEN event_type = 'custom_event' THEN 'other' END, ts,
       $at - 5000, NULL, NULL, NULL, NULL, 'production', attributes::JSON,
       (CASE event_type
            WHEN 'custom_event' THEN '{{"event_name":"' || event_name || '","custom_event_type":"other",'
                 || '"timestamp_unixtime_ms":' || ts::VARCHAR || ',"custom_attributes":' || attributes || '}}'
            WHEN 'screen_view' THEN '{{"screen_name":"' || event_name || '","timestamp_unixtime_ms":' || ts::VARCHAR || '}}'
            WHEN 'commerce_event' THEN '{{"timestamp_unixtime_ms":' || ts::VARCHAR || ',"currency_code":"USD",'
                 || '"product_action":{{"action":"purchase","total_amount":99.5}}}}'
            ELSE '{{"timestamp_unixtime_ms":' || ts::VARCHAR || ',"session_uuid":"' || batch_id || '"}}'
        END)::JSON,
       NULL, NULL, (SELECT max(arrival) FROM events_base) + n * {ARRIVAL_SPAN}
FROM e;
UPDATE profiles_base SET last_seen_ms = greatest(last_seen_ms, $at - 16000) WHERE list_contains($mpids, mpid)
"""


def store_new_events(cursor: duckdb.DuckDBPyConnection, mpids: list[int], at_ms: int, round_number: int) -> int:
    """What an ingest of one batch per touched profile would have stored before upkeep runs: a session, a
    product view, and for some a cart view, a purchase or a wishlist add, just before `at_ms`."""
    cursor.begin()
    before = cursor.execute("SELECT count(*) FROM events_base").fetchall()[0][0]
    params = {"mpids": mpids, "at": at_ms, "round": round_number, "ws": WORKSPACE_ID}
    for statement in filter(str.strip, NEW_EVENTS_SQL.split(";\n")):
        cursor.execute(statement, {k: v for k, v in params.items() if f"${k}" in statement}).fetchall()
    after = cursor.execute("SELECT count(*) FROM events_base").fetchall()[0][0]
    cursor.commit()
    return after - before


def realtime_rounds(cursor: duckdb.DuckDBPyConnection, criteria: dict[int, Criteria], start_ms: int,
                    args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    """Each round: new events for `args.touched` profiles (not timed), then the upkeep of the twenty real-time
    for them in one transaction: evaluate, apply each, commit. The last round is checked against a full
    evaluation."""
    parts = Series()
    per_audience = Series()
    task = progress.add_task("real-time: touched profiles evaluated and applied", total=args.realtime_rounds + 1)
    moved, stored = [], []
    touched: list[int] = []
    found: dict[int, pl.Series] = {}
    at = start_ms
    for r in range(args.realtime_rounds):
        at = start_ms + (r + 1) * MINUTE_MS
        touched = touched_profiles(cursor, args.touched, seed=2000 + r)
        stored.append(store_new_events(cursor, touched, at, r))
        started = clock()
        cursor.begin()
        try:
            timed = TimedCursor(cursor)
            t0 = clock()
            found = evaluate_audiences(timed, WORKSPACE_ID, audience_list(criteria), at, touched,  # type: ignore[arg-type]
                                       stored_members=lambda other: current_members(cursor, WORKSPACE_ID, other))
            evaluated = since(t0)
            changes = {}
            t0 = clock()
            for audience_id, members in found.items():
                t1 = clock()
                changes[audience_id] = apply_members(cursor, WORKSPACE_ID, audience_id, members, at, universe=touched)
                per_audience.add(str(audience_id), since(t1))
            applied = since(t0)
            t0 = clock()
            cursor.commit()
            committed = since(t0)
        except BaseException:
            cursor.rollback()
            raise
        parts.add("total", since(started))
        parts.add("evaluate", evaluated)
        parts.add("apply", applied)
        parts.add("commit", committed)
        for source, measured in timed.reads.items():
            parts.add(f"read {source}", measured)
        parts.add("evaluate polars", (evaluated[0] - sum(m[0] for m in timed.reads.values()),
                                      evaluated[1] - sum(m[1] for m in timed.reads.values())))
        moved.append({"touched": len(touched), "adds": sum(c.adds for c in changes.values()),
                      "drops": sum(c.drops for c in changes.values())})
        progress.advance(task)
    progress.update(task, description="real-time: the last round against a full evaluation")
    check = check_touched(cursor, criteria, found, touched, at)
    progress.advance(task)
    return {"rounds": args.realtime_rounds, "touched": args.touched, "events_stored_per_round": stored,
            "changes": moved, **{f"{part}_ms": parts.median(part) * 1000 for part in parts.wall},
            "apply_per_audience_ms": {a: per_audience.median(a) * 1000 for a in per_audience.wall},
            "check": check, "runs": parts.wall}


def check_touched(cursor: duckdb.DuckDBPyConnection, criteria: dict[int, Criteria], found: dict[int, pl.Series],
                  touched: list[int], at_ms: int) -> dict[str, Any]:
    """The touched evaluation and the stored memberships of the touched profiles, against a full evaluation at
    the same time restricted to them."""
    full = evaluate_audiences(cursor, WORKSPACE_ID, audience_list(criteria), at_ms)
    universe = pl.Series("mpid", touched, dtype=pl.Int64).implode()
    evaluated, stored = {}, {}
    for audience_id in criteria:
        expected = full[audience_id].filter(full[audience_id].is_in(universe))
        evaluated[audience_id] = compare_members(expected, found[audience_id])
        members = current_members(cursor, WORKSPACE_ID, audience_id)
        stored[audience_id] = compare_members(expected, members.filter(members.is_in(universe)))
    return {"profiles": len(touched),
            "evaluated_differ": {a: c for a, c in evaluated.items() if differs(c)},
            "stored_differ": {a: c for a, c in stored.items() if differs(c)},
            "members_among_touched": sum(c["members"] for c in evaluated.values())}


# --- report ----------------------------------------------------------------------------------------------------

def leaf_kinds(criteria: Criteria) -> str:
    kinds = {EventLeaf: "event", UserAttributeLeaf: "attribute", CalculatedAttributeLeaf: "calculated",
             IdentityLeaf: "identity", ProfileLeaf: "profile", ConsentLeaf: "consent", AudienceLeaf: "audience"}
    counted: dict[str, int] = {}
    for leaf in leaves(criteria):
        counted[kinds[type(leaf)]] = counted.get(kinds[type(leaf)], 0) + 1
    shape = " ".join(f"{kind}x{n}" if n > 1 else kind for kind, n in counted.items())
    nesting = [word for word, kind in (("not", Not), ("or", AnyOf)) if _has(criteria, kind)]
    return shape + (f" ({', '.join(nesting)})" if nesting else "")


def _has(criteria: Criteria, kind: type) -> bool:
    if isinstance(criteria, kind):
        return True
    if isinstance(criteria, (AllOf, AnyOf)):
        return any(_has(child, kind) for child in criteria.children)
    return isinstance(criteria, Not) and _has(criteria.child, kind)


def print_tables(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    full, apply, rt, w = result["full"], result["apply"], result["realtime"], result["workload"]
    active = w["active_profiles"]
    table = Table(title=f"{len(AUDIENCES)} audiences over {w['profiles']:,} profiles ({active:,} active) and "
                        f"{w['events']:,} events: members, polars = SQL, SQL query and real-time apply medians")
    for column in ("id", "audience", "leaves", "members", "share", "equal", "SQL query", "real-time apply"):
        table.add_column(column, justify="left" if column in ("audience", "leaves") else "right")
    for audience_id, raw in AUDIENCES.items():
        check = result["checks"][str(audience_id)]
        table.add_row(str(audience_id), raw["name"], result["leaf_kinds"][str(audience_id)], f"{check['members']:,}",
                      f"{check['members'] / max(active, 1):.1%}",
                      "[green]yes[/]" if not differs(check) else
                      f"[red]NO ({check['only_first']:,} / {check['only_second']:,})[/]",
                      f"{full['sql_parts_s'][f'query {audience_id}'] * 1000:.0f} ms",
                      f"{rt['apply_per_audience_ms'][str(audience_id)]:.1f} ms")
    console.print(table)

    parts = Table(title=f"where the time goes: medians of {result['rounds']} round(s) (full) and "
                        f"{rt['rounds']} (real-time), seconds")
    for column in ("part", "full: polars path", "full: DuckDB SQL", "real-time"):
        parts.add_column(column, justify="left" if column == "part" else "right")
    sources = ["profiles", "events", "user_attributes", "calculated_attribute_values", "identities", "consent"]
    for source in sources:
        parts.add_row(f"read / table: {source}", _seconds(full["polars_parts_s"].get(f"read {source}")),
                      _seconds(full["sql_parts_s"].get(f"table {source}")),
                      _seconds(_ms_to_s(rt.get(f"read {source}_ms"))))
    parts.add_row("polars (group-bys, joins, 20 expressions) | SQL features table",
                  _seconds(full["polars_parts_s"]["polars"]), _seconds(full["sql_parts_s"].get("table features")),
                  _seconds(_ms_to_s(rt["evaluate polars_ms"])))
    parts.add_row("SQL: the 20 audience queries", "", _seconds(full["sql_parts_s"]["queries"]), "")
    parts.add_row("[bold]evaluation[/]", f"[bold]{full['polars_s']:.3f}[/]", f"[bold]{full['sql_s']:.3f}[/]",
                  f"[bold]{rt['evaluate_ms'] / 1000:.3f}[/]")
    parts.add_row("apply_members x20 | commit", f"{apply['again']['apply_s']:.3f} | {apply['again']['commit_s']:.3f}",
                  "", f"{rt['apply_ms'] / 1000:.3f} | {rt['commit_ms'] / 1000:.3f}")
    console.print(parts)

    goals = Table(title=f"goals ({result['machine']['cpus']} CPUs, DuckDB {result['machine']['duckdb']}, "
                        f"polars {result['machine']['polars']})")
    for column in ("measure", "result", "goal", "met"):
        goals.add_column(column, justify="left" if column == "measure" else "right")

    def row(measure: str, value: str, goal: str = "", met: bool | None = None) -> None:
        goals.add_row(measure, value, goal, "" if met is None else ("[green]yes[/]" if met else "[red]NO[/]"))

    row("full evaluation of 20, polars path (evaluate_audiences, one call)", f"{full['polars_s']:.2f} s",
        f"<= {GOAL_FULL_S:.0f} s", full["polars_s"] <= GOAL_FULL_S)
    row("same 20 as DuckDB SQL, same run", f"{full['sql_s']:.2f} s")
    row("polars / SQL time (median of per-round ratios)", f"{full['ratio']:.2f}", "<= 1.0", full["ratio"] <= 1.0)
    row("  per round", ", ".join(f"{x:.2f}" for x in full["per_round_ratio"]))
    row("CPU seconds (all threads): polars | SQL; ratio",
        f"{full['polars_cpu_s']:.2f} | {full['sql_cpu_s']:.2f}; {full['cpu_ratio']:.2f}")
    first = apply["first"]
    row(f"full apply x20 into empty history ({first['members']:,} adds), commit included",
        f"{first['apply_s'] + first['commit_s']:.2f} s")
    changed = ", ".join(f"+{c['adds']:,}/-{c['drops']:,}" for c in apply["again"]["changes"])
    row(f"full apply x20 an hour later ({changed}), commit included",
        f"{apply['again']['apply_s'] + apply['again']['commit_s']:.2f} s")
    row(f"real-time, {rt['touched']:,} touched profiles: evaluate (mpids=)", f"{rt['evaluate_ms']:.0f} ms")
    row("  apply_members x20 (universe=) | commit", f"{rt['apply_ms']:.0f} | {rt['commit_ms']:.0f} ms")
    row("  total, one transaction", f"{rt['total_ms']:.0f} ms", f"<= {GOAL_REALTIME_MS:.0f} ms",
        rt["total_ms"] <= GOAL_REALTIME_MS)
    row("memberships: polars = SQL for every profile", "equal" if result["equal"] else "DIFFERENT", "equal",
        result["equal"])
    touched_ok = not rt["check"]["evaluated_differ"] and not rt["check"]["stored_differ"]
    row("touched evaluation and stored memberships = full evaluation", "equal" if touched_ok else "DIFFERENT",
        "equal", touched_ok)
    console.print(goals)


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _ms_to_s(value: float | None) -> float | None:
    return None if value is None else value / 1000


def figures_line(result: dict[str, Any]) -> str:
    full, apply, rt, w = result["full"], result["apply"], result["realtime"], result["workload"]
    reads = sum(v for k, v in full["polars_parts_s"].items() if k.startswith("read "))
    touched_ok = not rt["check"]["evaluated_differ"] and not rt["check"]["stored_differ"]
    return (f"audiences figures: {len(AUDIENCES)} audiences, {w['events']:,} events, {w['profiles']:,} profiles: "
            f"full evaluation polars {full['polars_s']:.2f} s (DuckDB reads {reads:.2f} + polars "
            f"{full['polars_parts_s']['polars']:.2f}) vs DuckDB SQL {full['sql_s']:.2f} s, ratio {full['ratio']:.2f} "
            f"(CPU time {full['cpu_ratio']:.2f}); full <= {GOAL_FULL_S:.0f} s: "
            f"{'yes' if full['polars_s'] <= GOAL_FULL_S else 'no'}; full apply x20: first "
            f"{apply['first']['apply_s'] + apply['first']['commit_s']:.2f} s, an hour later "
            f"{apply['again']['apply_s'] + apply['again']['commit_s']:.2f} s; real-time {rt['touched']:,} touched: "
            f"evaluate {rt['evaluate_ms']:.0f} + apply {rt['apply_ms']:.0f} + commit {rt['commit_ms']:.0f} = "
            f"{rt['total_ms']:.0f} ms (goal <= {GOAL_REALTIME_MS:.0f} ms: "
            f"{'yes' if rt['total_ms'] <= GOAL_REALTIME_MS else 'no'}); memberships equal: "
            f"{'yes' if result['equal'] and touched_ok else 'NO'}")


# --- main ------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="100,000 profiles, 1,000,000 events")
    size.add_argument("--tiny", action="store_true", help="2,000 profiles, 20,000 events: the smoke test")
    parser.add_argument("--rounds", type=int, default=5, help="alternating full-evaluation rounds (default 5)")
    parser.add_argument("--apply-rounds", type=int, help="full re-applies an hour apart (default 3; tiny: --rounds)")
    parser.add_argument("--touched", type=int, default=1000, help="profiles per real-time update (default 1,000)")
    parser.add_argument("--realtime-rounds", type=int, help="real-time updates (default 10; tiny: --rounds)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached audience database")
    parser.add_argument("--show-sql", action="store_true", help="print the SQL side's statements")
    args = parser.parse_args(argv)
    args.size = "quick" if args.quick else "tiny" if args.tiny else "full"
    args.profiles, args.events = SIZES[args.size]
    args.apply_rounds = args.apply_rounds or (args.rounds if args.tiny else 3)
    args.realtime_rounds = args.realtime_rounds or (args.rounds if args.tiny else 10)
    args.touched = min(args.touched, args.profiles // 10)
    if min(args.rounds, args.apply_rounds, args.realtime_rounds, args.touched) < 1:
        parser.error("rounds and --touched must be at least 1")
    return args


def parsed_audiences() -> dict[int, Criteria]:
    return {audience_id: parse_audience(raw).criteria for audience_id, raw in AUDIENCES.items()}


def show_sql(peer: SqlPeer, console: Any) -> None:
    for statement in [*peer.tables(), *(peer.query(a) for a in peer.criteria)]:
        console.print(f"[bold]{statement.label}[/] {statement.text}\n  [dim]params {statement.params}[/]")


def measure(args: argparse.Namespace, console: Any, source: Path) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    criteria = parsed_audiences()
    peer = SqlPeer(criteria, WORKSPACE_ID, AS_OF_MS)
    if args.show_sql:
        show_sql(peer, console)
    # a fresh copy: the applies write memberships and the real-time rounds store events
    work = RESULTS / f"{source.stem}.run-{os.getpid()}.duckdb"
    copy_database(source, work)
    connection = open_database(str(work))
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    try:
        cursor = connection.cursor()
        active = cursor.execute("SELECT count(*) FROM profiles WHERE scope = ? AND status = 'active'",
                                [WORKSPACE_ID]).fetchall()[0][0]
        with Progress(*columns, console=console) as progress:
            full, first, checks = full_rounds(cursor, criteria, peer, args.rounds, progress)
            apply = full_applies(cursor, criteria, first, args.apply_rounds, progress)
            realtime = realtime_rounds(cursor, criteria, apply["last_as_of_ms"], args, progress)
        cursor.close()
    finally:
        connection.close()
        remove_database(work)
    return {"full": full, "checks": {str(a): c for a, c in checks.items()}, "apply": apply, "realtime": realtime,
            "active_profiles": active, "leaf_kinds": {str(a): leaf_kinds(c) for a, c in criteria.items()},
            "sql": {s.label: {"text": s.text, "params": s.params}
                    for s in [*peer.tables(), *(peer.query(a) for a in criteria)]}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from rich.console import Console

    console = Console(stderr=True)  # stdout carries the figures line and the JSON
    if not console.is_terminal:
        console.width = 150
    started = time.perf_counter()
    console.rule(f"[bold]idmesh audiences benchmark[/]: {len(AUDIENCES)} audiences, {args.events:,} events, "
                 f"{args.profiles:,} profiles, {args.rounds} round(s)")
    meta = ensure_audience_database(args.profiles, args.events, args.rebuild, console)
    measured = measure(args, console, cache_paths(args.profiles, args.events)[0])
    equal = not any(differs(check) for check in measured["checks"].values())
    result = {
        "bench": "audiences", "size": args.size, "rounds": args.rounds, "as_of_ms": AS_OF_MS,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "duckdb": duckdb.__version__, "polars": pl.__version__},
        "workload": {"profiles": args.profiles, "events": args.events, "active_profiles": measured.pop("active_profiles"),
                     "database": meta},
        "definitions": AUDIENCES, "goals": {"full_s": GOAL_FULL_S, "realtime_ms": GOAL_REALTIME_MS},
        "equal": equal, **measured, "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print_tables(result, console)
    failures = [f"audience {a}: polars and SQL differ: {json.dumps(c)}" for a, c in result["checks"].items()
                if differs(c)]
    check = result["realtime"]["check"]
    failures += [f"audience {a}: the touched evaluation differs from the full one: {json.dumps(c)}"
                 for a, c in check["evaluated_differ"].items()]
    failures += [f"audience {a}: stored memberships of touched profiles differ from the full evaluation: "
                 f"{json.dumps(c)}" for a, c in check["stored_differ"].items()]
    for failure in failures:
        console.print(f"[bold red]bench: {failure}[/]")
    out = RESULTS / f"audiences-{args.size}-{time.strftime('%Y%m%d-%H%M%S')}.result.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    console.print(f"[dim]full results: {out.relative_to(ROOT)}[/]")
    print(figures_line(result))
    print(json.dumps(_without(result, ("sql", "runs")), default=str))
    return 1 if failures else 0


def _without(value: Any, keys: Iterable[str]) -> Any:
    """The result without its bulky parts (the SQL text, every round's seconds), for stdout."""
    keys = tuple(keys)
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    return value


if __name__ == "__main__":
    raise SystemExit(main())
