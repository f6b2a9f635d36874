"""Audience evaluation: evaluate_audiences against a plain-Python oracle written from docs/audiences.md, one
profile at a time, over random profiles, events, attributes, calculated attribute values, identities and
consent and random criteria trees; and the issue's acceptance property, real-time (touched profiles only)
membership equal to full evaluation over random event streams.

Everything runs on one real DuckDB file made by engine.store.open_database. Each example writes into a
workspace of its own, part of its rows into the base tables and part into the write journal (so the views'
union of both is what is read), and leaves rows for the same MPIDs in another workspace beside them: an
evaluation that forgot which workspace it reads would disagree with the oracle.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiences.definitions import (
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
    parse_audience,
    parse_criteria,
    referenced_audiences,
    uses_time_windows,
)
from audiences.evaluate import evaluate_audiences
from engine import event_journal
from engine.journal import journal_table
from engine.store import open_database

HOUR = 3_600_000
AS_OF = 100 * HOUR
OTHER_WORKSPACE = "ws_elsewhere"


# --- the database ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    connection = open_database(str(tmp_path_factory.mktemp("audiences") / "idmesh.duckdb"))
    yield connection
    connection.close()


_workspaces = itertools.count(1)
_journal_seq = itertools.count(1)
_mpid_blocks = itertools.count(1)
_arrivals = itertools.count(1)


@dataclass
class Event:
    mpid: int
    ts: int
    type: str
    name: str | None
    attributes: dict[str, Any]        # custom attributes (absent keys are absent)
    level: str | None = None          # data.level


@dataclass
class Statement:
    regulation: str
    purpose: str                      # as sent (any case)
    consented: bool
    ts: int


@dataclass
class World:
    """Everything one workspace holds, as the oracle sees it."""

    profiles: dict[int, tuple[int, int, str]] = field(default_factory=dict)  # mpid -> first, last, status
    events: list[Event] = field(default_factory=list)
    attributes: dict[int, dict[str, Any]] = field(default_factory=dict)
    ca_values: dict[int, dict[int, Any]] = field(default_factory=dict)      # mpid -> ca id -> value
    identities: dict[int, set[str]] = field(default_factory=dict)
    consent: dict[int, list[Statement]] = field(default_factory=dict)


def _insert(cursor: Any, table: str, columns: dict[str, pa.Array]) -> None:
    rows = pa.table(columns)
    if rows.num_rows == 0:
        return
    cursor.register("incoming_rows", rows)
    try:
        cursor.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM incoming_rows")
    finally:
        cursor.unregister("incoming_rows")


def _journal(cursor: Any, rows: list[tuple[Any, tuple]]) -> None:
    if not rows:
        return
    first = next(_journal_seq)
    for _ in range(len(rows) - 1):
        next(_journal_seq)
    cursor.register("incoming_rows", journal_table(first, rows))
    try:
        cursor.execute("INSERT INTO write_journal SELECT * FROM incoming_rows")
    finally:
        cursor.unregister("incoming_rows")


def _event_data(event: Event) -> dict[str, Any]:
    data: dict[str, Any] = {"timestamp_unixtime_ms": event.ts}
    if event.name is not None:
        data["event_name"] = event.name
    if event.attributes:
        data["custom_attributes"] = event.attributes
    if event.level is not None:
        data["level"] = event.level
    return data


def write_events(cursor: Any, workspace: str, events: list[Event], via_journal: list[bool]) -> None:
    base = [e for e, journal in zip(events, via_journal) if not journal]
    _insert(cursor, "events_base", {
        "workspace_id": pa.array([workspace] * len(base)), "mpid": pa.array([e.mpid for e in base], pa.int64()),
        "batch_id": pa.array(["b"] * len(base)), "event_index": pa.array(range(len(base)), pa.int32()),
        "event_type": pa.array([e.type for e in base]), "event_name": pa.array([e.name for e in base], pa.string()),
        "timestamp_ms": pa.array([e.ts for e in base], pa.int64()), "received_ms": pa.array([0] * len(base), pa.int64()),
        "environment": pa.array(["production"] * len(base)),
        "custom_attributes": pa.array([orjson.dumps(e.attributes).decode() if e.attributes else None for e in base],
                                      pa.string()),
        "data": pa.array([orjson.dumps(_event_data(e)).decode() for e in base]),
        "arrival": pa.array([next(_arrivals) for _ in base], pa.int64())})
    journal = [e for e, journal in zip(events, via_journal) if journal]
    _journal(cursor, [(event_journal.EVENTS, (workspace, e.mpid, f"j{i}", 0, 0, "production",
                                              [{"event_type": e.type, "data": _event_data(e)}]))
                      for i, e in enumerate(journal)])


def write_world(cursor: Any, workspace: str, world: World, journal_bits: list[bool]) -> None:
    bits = itertools.cycle(journal_bits or [False])
    profiles = sorted(world.profiles.items())
    _insert(cursor, "profiles_base", {
        "scope": pa.array([workspace] * len(profiles)), "mpid": pa.array([m for m, _ in profiles], pa.int64()),
        "created_ms": pa.array([p[0] for _, p in profiles], pa.int64()),
        "first_seen_ms": pa.array([p[0] for _, p in profiles], pa.int64()),
        "last_seen_ms": pa.array([p[1] for _, p in profiles], pa.int64()),
        "status": pa.array([p[2] for _, p in profiles])})
    write_events(cursor, workspace, world.events, [next(bits) for _ in world.events])
    write_attributes(cursor, workspace, world.attributes, bits, 1)
    identities = [(m, t) for m, types in sorted(world.identities.items()) for t in sorted(types)]
    _insert(cursor, "identities_base", {
        "scope": pa.array([workspace] * len(identities)), "mpid": pa.array([m for m, _ in identities], pa.int64()),
        "identity_type": pa.array([t for _, t in identities]), "value": pa.array([f"{m}-{t}" for m, t in identities]),
        "raw_value": pa.array([f"{m}-{t}" for m, t in identities]), "added_ms": pa.array([0] * len(identities), pa.int64())})
    values = [(m, ca, v) for m, cas in sorted(world.ca_values.items()) for ca, v in sorted(cas.items())]
    _insert(cursor, "calculated_attribute_values", {
        "workspace_id": pa.array([workspace] * len(values)), "ca_id": pa.array([ca for _, ca, _ in values], pa.int64()),
        "mpid": pa.array([m for m, _, _ in values], pa.int64()),
        "value": pa.array([orjson.dumps(v).decode() for _, _, v in values]),
        "computed_ms": pa.array([0] * len(values), pa.int64()), "changes_at_ms": pa.array([None] * len(values), pa.int64())})
    write_consent(cursor, workspace, world.consent, bits)


def write_attributes(cursor: Any, workspace: str, attributes: dict[int, dict[str, Any]], bits: Iterator[bool],
                     updated_ms: int) -> None:
    base, journal = [], []
    for mpid, named in sorted(attributes.items()):
        for name, value in sorted(named.items()):
            (journal if next(bits) else base).append((mpid, name, value))
    _insert(cursor, "user_attributes_base", {
        "workspace_id": pa.array([workspace] * len(base)), "mpid": pa.array([m for m, _, _ in base], pa.int64()),
        "name": pa.array([n for _, n, _ in base]), "value": pa.array([orjson.dumps(v).decode() for _, _, v in base]),
        "updated_ms": pa.array([updated_ms] * len(base), pa.int64()), "deleted": pa.array([False] * len(base))})
    _journal(cursor, [(event_journal.ATTRIBUTES, (workspace, m, updated_ms, {n: v}, [])) for m, n, v in journal])


def write_consent(cursor: Any, workspace: str, consent: dict[int, list[Statement]], bits: Iterator[bool]) -> None:
    base, journal = [], []
    for mpid, statements in sorted(consent.items()):
        for s in statements:
            (journal if next(bits) else base).append((mpid, s))
    _insert(cursor, "consent_history_base", {
        "workspace_id": pa.array([workspace] * len(base)), "mpid": pa.array([m for m, _ in base], pa.int64()),
        "regulation": pa.array([s.regulation for _, s in base]), "purpose": pa.array([s.purpose for _, s in base]),
        "consented": pa.array([s.consented for _, s in base]), "document": pa.array([None] * len(base), pa.string()),
        "timestamp_ms": pa.array([s.ts for _, s in base], pa.int64()),
        "location": pa.array([None] * len(base), pa.string()), "hardware_id": pa.array([None] * len(base), pa.string()),
        "received_ms": pa.array([s.ts for _, s in base], pa.int64()), "batch_id": pa.array(["b"] * len(base))})
    _journal(cursor, [(event_journal.CONSENT, (workspace, m, "b", s.ts, {
        s.regulation: {s.purpose: {"consented": s.consented, "timestamp_unixtime_ms": s.ts}}})) for m, s in journal])


def write_noise(cursor: Any, world: World) -> None:
    """Rows for the same MPIDs in another workspace: every event type and attribute, all consented."""
    mpids = sorted(world.profiles)
    write_events(cursor, OTHER_WORKSPACE, [Event(m, AS_OF - HOUR, t, n, {"cat": "x", "amount": 10}, "gold")
                                           for m in mpids for t, n in (("custom_event", "A"), ("session_start", None))],
                 [False, True] * len(mpids))
    write_attributes(cursor, OTHER_WORKSPACE, {m: {"tier": "gold", "age": 33, "tags": ["a"], "vip": True}
                                               for m in mpids}, itertools.cycle([False, True]), 1)
    write_consent(cursor, OTHER_WORKSPACE, {m: [Statement("gdpr", "advertising", True, 5),
                                                Statement("ccpa", "data_sale_opt_out", True, 5)] for m in mpids},
                  itertools.cycle([False]))
    identities = [(m, t) for m in mpids for t in IDENTITY_TYPES]
    _insert(cursor, "identities_base", {
        "scope": pa.array([OTHER_WORKSPACE] * len(identities)), "mpid": pa.array([m for m, _ in identities], pa.int64()),
        "identity_type": pa.array([t for _, t in identities]), "value": pa.array([f"{m}-{t}" for m, t in identities]),
        "raw_value": pa.array([f"{m}-{t}" for m, t in identities]), "added_ms": pa.array([0] * len(identities), pa.int64())})
    values = [(m, ca) for m in mpids for ca in (1, 2)]
    _insert(cursor, "calculated_attribute_values", {
        "workspace_id": pa.array([OTHER_WORKSPACE] * len(values)), "ca_id": pa.array([c for _, c in values], pa.int64()),
        "mpid": pa.array([m for m, _ in values], pa.int64()), "value": pa.array(["10"] * len(values)),
        "computed_ms": pa.array([0] * len(values), pa.int64()), "changes_at_ms": pa.array([None] * len(values), pa.int64())})


# --- the oracle: one profile at a time, from docs/audiences.md ----------------------------------------------------

def text_of(value: Any) -> str | None:
    """A JSON scalar as text, the way a comparison sees it."""
    if value is None:
        return None
    if value is True or value is False:
        return "true" if value else "false"
    return str(value)


def number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def compares(operator: str, value_type: str, values: tuple[Any, ...], text: str | None) -> bool:
    if operator == "exists":
        return text is not None
    if text is None:
        return False
    if value_type == "boolean":
        wanted = "true" if values[0] else "false"
        return text == wanted if operator == "equals" else text != wanted
    if value_type == "number":
        n = number(text)
        if n is None:
            return False
        if operator == "between":
            return values[0] <= n <= values[1]
        if operator == "in":
            return any(n == float(v) for v in values)
        return {"equals": n == values[0], "not_equals": n != values[0], "greater_than": n > values[0],
                "greater_than_or_equal": n >= values[0], "less_than": n < values[0],
                "less_than_or_equal": n <= values[0]}[operator]
    return {"equals": text == values[0], "not_equals": text != values[0], "contains": values[0] in text,
            "starts_with": text.startswith(values[0]), "in": text in values}[operator]


def value_holds(leaf: UserAttributeLeaf | CalculatedAttributeLeaf, present: bool, value: Any) -> bool:
    if leaf.operator == "not_exists":
        return not present
    if not present:
        return False
    if leaf.operator == "exists":
        return True
    elements = value if isinstance(value, list) else [value]
    return any(compares(leaf.operator, leaf.value_type, leaf.values, text_of(e)) for e in elements)


def event_attribute(event: Event, name: str) -> str | None:
    if name == "data.level":
        return event.level
    return text_of(event.attributes.get(name))


def oracle_member(world: World, mpid: int, criteria: Criteria, as_of: int, members: dict[int, set[int]]) -> bool:
    def holds(node: Criteria) -> bool:
        if isinstance(node, AllOf):
            return all(holds(child) for child in node.children)
        if isinstance(node, AnyOf):
            return any(holds(child) for child in node.children)
        if isinstance(node, Not):
            return not holds(node.child)
        if isinstance(node, EventLeaf):
            start = node.time_period.start_ms(as_of)
            count = sum(1 for e in world.events if e.mpid == mpid and e.ts <= as_of
                        and (start is None or e.ts >= start)
                        and (node.event_type is None or e.type == node.event_type)
                        and (node.event_name is None or e.name == node.event_name)
                        and all(compares(c.operator, c.value_type, c.values, event_attribute(e, c.attribute_name))
                                for c in node.conditions))
            return node.count.low <= count and (node.count.high is None or count <= node.count.high)
        if isinstance(node, UserAttributeLeaf):
            named = world.attributes.get(mpid, {})
            return value_holds(node, node.name in named, named.get(node.name))
        if isinstance(node, CalculatedAttributeLeaf):
            values = world.ca_values.get(mpid, {})
            return value_holds(node, node.ca_id in values, values.get(node.ca_id))
        if isinstance(node, IdentityLeaf):
            return (node.identity_type in world.identities.get(mpid, set())) == node.present
        if isinstance(node, ProfileLeaf):
            first, last, _ = world.profiles[mpid]
            moment = first if node.field == "first_seen" else last
            return ((node.window_ms is None or as_of - node.window_ms <= moment <= as_of)
                    and (node.after_ms is None or moment >= node.after_ms)
                    and (node.before_ms is None or moment < node.before_ms))
        if isinstance(node, ConsentLeaf):
            current: dict[str, Statement] = {}
            for s in world.consent.get(mpid, []):
                if s.regulation == node.regulation and s.purpose.lower() == node.purpose:
                    if s.purpose not in current or s.ts > current[s.purpose].ts:
                        current[s.purpose] = s
            consented = any(s.consented for s in current.values())
            return consented == node.consented
        assert isinstance(node, AudienceLeaf)
        return (mpid in members[node.audience_id]) == node.member
    return holds(criteria)


def oracle(world: World, audiences: list[tuple[int, Criteria]], as_of: int,
           stored: dict[int, set[int]]) -> dict[int, list[int]]:
    members = dict(stored)
    for audience_id, criteria in audiences:  # generated in dependency order
        members[audience_id] = {m for m, (_, _, status) in world.profiles.items() if status == "active"
                                and oracle_member(world, m, criteria, as_of, members)}
    return {audience_id: sorted(members[audience_id]) for audience_id, _ in audiences}


# --- strategies --------------------------------------------------------------------------------------------------

EVENT_CONDITIONS = [
    {"attribute_name": "cat", "operator": "equals", "values": ["x"]},
    {"attribute_name": "cat", "operator": "not_equals", "values": ["x"]},
    {"attribute_name": "cat", "operator": "contains", "values": ["x"]},
    {"attribute_name": "cat", "operator": "starts_with", "values": ["x"]},
    {"attribute_name": "cat", "operator": "in", "values": ["x", "y"]},
    {"attribute_name": "cat", "operator": "exists"},
    {"attribute_name": "amount", "operator": "greater_than", "values": [2]},
    {"attribute_name": "amount", "operator": "less_than_or_equal", "values": [2.5]},
    {"attribute_name": "amount", "operator": "between", "values": [-3, 2.5]},
    {"attribute_name": "amount", "operator": "in", "values": [1, 10]},
    {"attribute_name": "flag", "operator": "equals", "values": [True]},
    {"attribute_name": "flag", "operator": "not_equals", "values": [False]},
    {"attribute_name": "data.level", "operator": "equals", "values": ["gold"]},
]
COMPARISONS = {  # user attribute name -> comparisons on it
    "tier": [("equals", ["gold"]), ("in", ["gold", "silver"]), ("not_equals", ["gold"]), ("contains", ["ol"]),
             ("starts_with", ["s"])],
    "age": [("greater_than", [30]), ("between", [20, 40]), ("equals", [33]), ("in", [33, 44])],
    "vip": [("equals", [True]), ("not_equals", [True])],
    "tags": [("equals", ["a"]), ("not_equals", ["a"]), ("in", ["b", "c"])],
}
ATTRIBUTE_VALUES = {"tier": ["gold", "silver", "bronze", None, 5], "age": [20, 33, 44.5, "33", "old"],
                    "vip": [True, False, "true"], "tags": [["a", "b"], ["b"], [], "a"]}
CA_COMPARISONS = {1: [("greater_than", [5]), ("equals", [2.5]), ("between", [1, 9])],
                  2: [("equals", ["shoes"]), ("in", ["bags", "hats"]), ("starts_with", ["sh"])]}
CA_VALUES = {1: [1, 10, 2.5], 2: ["shoes", ["shoes", "bags"], ["bags"], 3, []]}
IDENTITY_TYPES = ["email", "customerid", "ios_idfa"]
PURPOSES = ["advertising", "analytics"]
COUNTS = [None, {"operator": "at_least", "value": 2}, {"operator": "at_most", "value": 1},
          {"operator": "exactly", "value": 0}, {"operator": "exactly", "value": 1},
          {"operator": "more_than", "value": 1}, {"operator": "fewer_than", "value": 3},
          {"operator": "between", "values": [0, 2]}, {"operator": "between", "values": [1, 3]}]
PERIODS = [None, {"type": "within_last", "value": 10, "unit": "hours"}, {"type": "within_last", "value": 2, "unit": "days"},
           {"type": "since", "date": 90 * HOUR}, {"type": "all_time"}]


@st.composite
def event_leaves(draw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {}
    event_type = draw(st.sampled_from([None, "custom_event", "screen_view", "session_start"]))
    event_name = draw(st.sampled_from([None, "A", "B"]))
    if event_type is None and event_name is None:
        event_type = "custom_event"
    if event_type:
        body["event_type"] = event_type
    if event_name:
        body["event_name"] = event_name
    conditions = draw(st.lists(st.sampled_from(EVENT_CONDITIONS), max_size=2))
    if conditions:
        body["conditions"] = conditions
    period, count = draw(st.sampled_from(PERIODS)), draw(st.sampled_from(COUNTS))
    if period is not None:
        body["time_period"] = period
    if count is not None:
        body["count"] = count
    return {"event": body}


@st.composite
def attribute_leaves(draw: Any) -> dict[str, Any]:
    name = draw(st.sampled_from(sorted(COMPARISONS)))
    choice = draw(st.sampled_from([("exists", []), ("not_exists", [])] + COMPARISONS[name]))
    return {"user_attribute": {"name": name, "operator": choice[0], "values": choice[1]}}


@st.composite
def ca_leaves(draw: Any) -> dict[str, Any]:
    ca_id = draw(st.sampled_from([1, 2]))
    choice = draw(st.sampled_from([("exists", []), ("not_exists", [])] + CA_COMPARISONS[ca_id]))
    return {"calculated_attribute": {"id": ca_id, "operator": choice[0], "values": choice[1]}}


def profile_leaves() -> st.SearchStrategy[dict[str, Any]]:
    bounds = st.fixed_dictionaries({}, optional={
        "within_last": st.sampled_from([{"value": 20, "unit": "hours"}, {"value": 2, "unit": "days"}]),
        "after": st.sampled_from([30 * HOUR, 60 * HOUR]), "before": st.sampled_from([80 * HOUR, 99 * HOUR])})
    return st.builds(lambda field, b: {"profile": {"field": field, **(b or {"after": 50 * HOUR})}},
                     st.sampled_from(["first_seen", "last_seen"]), bounds)


def leaves_for(audience_ids: tuple[int, ...]) -> st.SearchStrategy[dict[str, Any]]:
    options = [
        event_leaves(), event_leaves(), attribute_leaves(), attribute_leaves(), ca_leaves(), profile_leaves(),
        st.builds(lambda t, p: {"identity": {"type": t, "present": p}}, st.sampled_from(IDENTITY_TYPES), st.booleans()),
        st.builds(lambda p, c: {"consent": {"gdpr_purpose": p, "consented": c}},
                  st.sampled_from(PURPOSES + ["Advertising"]), st.booleans()),
        st.builds(lambda o: {"consent": {"ccpa_data_sale_opt_out": o}}, st.booleans()),
    ]
    if audience_ids:
        options.append(st.builds(lambda a, m: {"audience": {"id": a, "member": m}}, st.sampled_from(audience_ids),
                                 st.booleans()))
    return st.one_of(options)


@functools.cache  # building a recursive strategy is costly: once per set of readable audiences
def criteria_trees(audience_ids: tuple[int, ...]) -> st.SearchStrategy[dict[str, Any]]:
    return st.recursive(leaves_for(audience_ids), lambda children: st.one_of(
        st.builds(lambda c: {"all": c}, st.lists(children, min_size=1, max_size=3)),
        st.builds(lambda c: {"any": c}, st.lists(children, min_size=1, max_size=3)),
        st.builds(lambda c: {"not": c}, children)), max_leaves=8)


STORED_AUDIENCE = 900  # read through stored_members: not evaluated in the call


@st.composite
def audience_lists(draw: Any, count: tuple[int, int] = (2, 5)) -> list[tuple[int, Criteria]]:
    audiences: list[tuple[int, Criteria]] = []
    for audience_id in range(1, draw(st.integers(*count)) + 1):
        readable = tuple(a for a, _ in audiences) + (STORED_AUDIENCE,)
        audiences.append((audience_id, parse_criteria(draw(criteria_trees(readable)))))
    return audiences


@st.composite
def worlds(draw: Any, mpids: list[int]) -> World:
    world = World()
    for mpid in mpids:
        first = draw(st.integers(0, 99)) * HOUR
        world.profiles[mpid] = (first, draw(st.integers(first // HOUR, 100)) * HOUR,
                                draw(st.sampled_from(["active"] * 5 + ["orphaned"])))
    stray = max(mpids) + 1  # events, attributes and consent of a profile that does not exist here
    everyone = mpids + [stray]
    world.events = draw(st.lists(events_of(everyone), max_size=30))
    for mpid in everyone:
        named = draw(st.sets(st.sampled_from(sorted(ATTRIBUTE_VALUES))))
        world.attributes[mpid] = {name: draw(st.sampled_from(ATTRIBUTE_VALUES[name])) for name in named}
        world.ca_values[mpid] = {ca: draw(st.sampled_from(CA_VALUES[ca]))
                                 for ca in draw(st.sets(st.sampled_from([1, 2])))}
        world.identities[mpid] = draw(st.sets(st.sampled_from(IDENTITY_TYPES)))
        world.consent[mpid] = draw(statements())
    return world


def events_of(mpids: list[int]) -> st.SearchStrategy[Event]:
    attributes = st.fixed_dictionaries({}, optional={
        "cat": st.sampled_from(["x", "y", "xy", 1, 2.5, True]), "amount": st.sampled_from([1, 2.5, -3, 10, "10", "z"]),
        "flag": st.booleans()})
    return st.builds(Event, st.sampled_from(mpids), st.integers(40, 110).map(lambda h: h * HOUR),
                     st.sampled_from(["custom_event", "screen_view", "session_start"]),
                     st.sampled_from([None, "A", "B"]), attributes, st.sampled_from([None, "gold", "silver"]))


@st.composite
def statements(draw: Any) -> list[Statement]:
    result = []
    for i, (regulation, purpose) in enumerate(draw(st.lists(st.sampled_from(
            [("gdpr", "advertising"), ("gdpr", "Advertising"), ("gdpr", "analytics"), ("ccpa", "data_sale_opt_out")]),
            max_size=3))):
        # distinct times: two answers at the same moment would leave the current one to arrival order
        result.append(Statement(regulation, purpose, draw(st.booleans()), 1 + i + 10 * draw(st.integers(0, 9))))
    return result


def new_workspace(mpids_per_block: int = 6) -> tuple[str, list[int]]:
    block = next(_mpid_blocks)
    return f"ws_test{next(_workspaces)}", [block * 1000 + i for i in range(1, mpids_per_block + 1)]


def listed(result: dict[int, pl.Series]) -> dict[int, list[int]]:
    for series in result.values():
        assert series.dtype == pl.Int64
        assert series.is_sorted() and series.n_unique() == len(series)
    return {audience_id: series.to_list() for audience_id, series in result.items()}


# --- properties --------------------------------------------------------------------------------------------------

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY
@given(data=st.data())
def test_evaluation_matches_the_oracle(db: Any, data: st.DataObject):
    workspace, mpids = new_workspace()
    world = data.draw(worlds(mpids))
    audiences = data.draw(audience_lists())
    stored = {STORED_AUDIENCE: set(data.draw(st.lists(st.sampled_from(mpids + [99_999]))))}
    cursor = db.cursor()
    try:
        write_world(cursor, workspace, world, data.draw(st.lists(st.booleans(), min_size=1, max_size=5)))
        write_noise(cursor, world)
        stored_series = pl.Series("mpid", sorted(stored[STORED_AUDIENCE]), pl.Int64)
        expected = oracle(world, audiences, AS_OF, stored)
        got = listed(evaluate_audiences(cursor, workspace, audiences, AS_OF,
                                        stored_members=lambda a: stored_series))
        assert got == expected, (audiences, got, expected)
        touched = data.draw(st.lists(st.sampled_from(mpids + [max(mpids) + 1, 99_999]), max_size=4))
        part = listed(evaluate_audiences(cursor, workspace, audiences, AS_OF, mpids=touched,
                                         stored_members=lambda a: stored_series))
        assert part == {a: [m for m in members if m in touched] for a, members in expected.items()}
    finally:
        cursor.close()


@dataclass
class Batch:
    events: list[Event]
    attributes: dict[int, dict[str, Any]]
    identities: dict[int, set[str]]
    consent: dict[int, list[Statement]]
    journal: bool

    def touched(self) -> set[int]:
        return {e.mpid for e in self.events} | set(self.attributes) | set(self.identities) | set(self.consent)


@st.composite
def batches(draw: Any, mpids: list[int], clock: int | None = None) -> Batch:
    """What one ingested batch changes. With `clock`, events happen before the batch arrives at `clock`."""
    events = draw(st.lists(events_of(mpids), max_size=6))
    if clock is not None:
        events = [Event(e.mpid, min(e.ts, clock), e.type, e.name, e.attributes, e.level) for e in events]
    who = st.sampled_from(mpids)
    attributes = draw(st.dictionaries(who, st.dictionaries(st.sampled_from(sorted(ATTRIBUTE_VALUES)), st.just(0),
                                                           max_size=2), max_size=2))
    attributes = {m: {n: draw(st.sampled_from(ATTRIBUTE_VALUES[n])) for n in named} for m, named in attributes.items()}
    identities = draw(st.dictionaries(who, st.sets(st.sampled_from(IDENTITY_TYPES), min_size=1, max_size=1),
                                      max_size=1))
    consent = draw(st.dictionaries(who, statements(), max_size=2))
    return Batch(events, attributes, identities, consent, draw(st.booleans()))


def apply_batch(cursor: Any, workspace: str, world: World, batch: Batch, clock: int, stamp: int) -> None:
    """Write what the batch changed, as ingest and IDSync would: new profiles, last seen, events, attributes
    (latest wins), identities, consent statements (timestamps after every earlier one)."""
    touched = batch.touched()
    new = sorted(m for m in touched if m not in world.profiles)
    for mpid in new:
        world.profiles[mpid] = (clock, clock, "active")
    _insert(cursor, "profiles_base", {
        "scope": pa.array([workspace] * len(new)), "mpid": pa.array(new, pa.int64()),
        "created_ms": pa.array([clock] * len(new), pa.int64()), "first_seen_ms": pa.array([clock] * len(new), pa.int64()),
        "last_seen_ms": pa.array([clock] * len(new), pa.int64()), "status": pa.array(["active"] * len(new))})
    for mpid in touched:
        first, _, status = world.profiles[mpid]
        world.profiles[mpid] = (first, clock, status)
    cursor.execute("UPDATE profiles_base SET last_seen_ms = ? WHERE scope = ? AND list_contains(?, mpid)",
                   [clock, workspace, sorted(touched)])
    world.events += batch.events
    write_events(cursor, workspace, batch.events, [batch.journal] * len(batch.events))
    for mpid, named in batch.attributes.items():
        world.attributes.setdefault(mpid, {}).update(named)
    write_attributes(cursor, workspace, batch.attributes, itertools.cycle([batch.journal]), stamp)
    for mpid, types in batch.identities.items():
        fresh = types - world.identities.setdefault(mpid, set())
        world.identities[mpid] |= fresh
        write_world_identities(cursor, workspace, mpid, fresh)
    consent = {m: [Statement(s.regulation, s.purpose, s.consented, stamp * 100_000 + s.ts) for s in statements]
               for m, statements in batch.consent.items()}
    for mpid, statements in consent.items():
        world.consent.setdefault(mpid, []).extend(statements)
    write_consent(cursor, workspace, consent, itertools.cycle([batch.journal]))


def write_world_identities(cursor: Any, workspace: str, mpid: int, types: set[str]) -> None:
    ordered = sorted(types)
    _insert(cursor, "identities_base", {
        "scope": pa.array([workspace] * len(ordered)), "mpid": pa.array([mpid] * len(ordered), pa.int64()),
        "identity_type": pa.array(ordered), "value": pa.array([f"{mpid}-{t}" for t in ordered]),
        "raw_value": pa.array([f"{mpid}-{t}" for t in ordered]), "added_ms": pa.array([0] * len(ordered), pa.int64())})


def merge(running: dict[int, pl.Series], touched: set[int], fresh: dict[int, pl.Series]) -> dict[int, pl.Series]:
    """Running membership with the touched profiles' answers replaced by the fresh ones."""
    touched_series = pl.Series(sorted(touched), dtype=pl.Int64)
    return {a: pl.concat([running[a].filter(~running[a].is_in(touched_series.implode())), fresh[a]]).sort()
            for a in running}


STREAM = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@STREAM
@given(data=st.data())
def test_real_time_membership_equals_full_evaluation_for_random_event_streams(db: Any, data: st.DataObject):
    """The issue's acceptance property. Batches arrive while the evaluation time stays put (time passing
    alone changes windowed memberships, which is the scheduler's time-driven re-evaluation, not a batch's);
    after each batch only the touched profiles are evaluated and merged into the running membership, which
    must equal a full evaluation."""
    workspace, mpids = new_workspace(8)
    audiences = data.draw(audience_lists((1, 5)))
    world = World()
    cursor = db.cursor()
    try:
        stored_series = pl.Series("mpid", [mpids[0], mpids[3]], pl.Int64)
        stored = lambda a: stored_series  # noqa: E731
        running = evaluate_audiences(cursor, workspace, audiences, AS_OF, stored_members=stored)
        for step in range(data.draw(st.integers(1, 5))):
            batch = data.draw(batches(mpids))
            apply_batch(cursor, workspace, world, batch, AS_OF - HOUR, step + 2)
            touched = batch.touched()
            fresh = evaluate_audiences(cursor, workspace, audiences, AS_OF, mpids=sorted(touched),
                                       stored_members=stored)
            running = merge(running, touched, fresh)
            full = evaluate_audiences(cursor, workspace, audiences, AS_OF, stored_members=stored)
            assert listed(running) == listed(full), (step, audiences)
        assert listed(running) == oracle(world, audiences, AS_OF, {STORED_AUDIENCE: set(stored_series.to_list())})
    finally:
        cursor.close()


@STREAM
@given(data=st.data())
def test_real_time_membership_follows_the_clock_without_time_windows(db: Any, data: st.DataObject):
    """With the clock moving on at every batch and events never stamped after their arrival, audiences without
    `within_last` windows change only through batches: touched-only evaluation still equals the full one."""
    workspace, mpids = new_workspace(8)
    audiences = [(a, c) for a, c in data.draw(audience_lists((1, 5))) if not uses_time_windows(c)]
    kept = {a for a, _ in audiences}
    audiences = [(a, c) for a, c in audiences if referenced_audiences(c) <= kept | {STORED_AUDIENCE}]
    world = World()
    cursor = db.cursor()
    try:
        stored_series = pl.Series("mpid", [mpids[1]], pl.Int64)
        stored = lambda a: stored_series  # noqa: E731
        clock = 60 * HOUR
        running = evaluate_audiences(cursor, workspace, audiences, clock, stored_members=stored)
        for step in range(data.draw(st.integers(1, 5))):
            clock += data.draw(st.integers(0, 20)) * HOUR
            batch = data.draw(batches(mpids, clock))
            apply_batch(cursor, workspace, world, batch, clock, step + 2)
            touched = batch.touched()
            fresh = evaluate_audiences(cursor, workspace, audiences, clock, mpids=sorted(touched), stored_members=stored)
            running = merge(running, touched, fresh)
            full = evaluate_audiences(cursor, workspace, audiences, clock, stored_members=stored)
            assert listed(running) == listed(full), (step, clock, audiences)
    finally:
        cursor.close()


# --- examples ----------------------------------------------------------------------------------------------------

def test_installed_in_the_last_72_hours_with_fewer_than_three_sessions(db: Any):
    definition = parse_audience({
        "name": "New and barely active", "external_name": "new_low_sessions",
        "description": "installed in the last 72 hours with fewer than three sessions", "type": "real_time",
        "criteria": {"all": [
            {"event": {"event_type": "custom_event", "event_name": "install",
                       "time_period": {"type": "within_last", "value": 72, "unit": "hours"}}},
            {"event": {"event_type": "session_start", "count": {"operator": "fewer_than", "value": 3}}},
            {"not": {"consent": {"ccpa_data_sale_opt_out": True}}}]}})
    workspace, (fresh, busy, old, opted_out, sessionless, never) = new_workspace()
    now = 1_780_000_000_000
    world = World(profiles={m: (now - 100 * HOUR, now, "active") for m in (fresh, busy, old, opted_out, sessionless,
                                                                         never)})
    install = lambda mpid, hours_ago: Event(mpid, now - hours_ago * HOUR, "custom_event", "install", {})  # noqa: E731
    session = lambda mpid, hours_ago: Event(mpid, now - hours_ago * HOUR, "session_start", None, {})  # noqa: E731
    world.events = [install(fresh, 5), session(fresh, 4), session(fresh, 1),
                    install(busy, 10), session(busy, 9), session(busy, 8), session(busy, 2),
                    install(old, 73), session(old, 70),
                    install(opted_out, 1), install(sessionless, 71)]
    world.consent = {opted_out: [Statement("ccpa", "data_sale_opt_out", True, 1)]}
    cursor = db.cursor()
    try:
        write_world(cursor, workspace, world, [False, True])
        result = evaluate_audiences(cursor, workspace, [(1, definition.criteria)], now)
    finally:
        cursor.close()
    assert result[1].to_list() == [fresh, sessionless]


def test_audience_leaves_use_this_calls_results_in_dependency_order(db: Any):
    workspace, mpids = new_workspace()
    world = World(profiles={m: (0, 0, "active") for m in mpids},
                  identities={mpids[0]: {"email"}, mpids[1]: {"email"}, mpids[2]: {"customerid"}})
    cursor = db.cursor()
    try:
        write_world(cursor, workspace, world, [False])
        email = parse_criteria({"identity": {"type": "email"}})
        without = parse_criteria({"all": [{"not": {"audience": {"id": 7}}}, {"identity": {"type": "ios_idfa",
                                                                                         "present": False}}]})
        # listed before the audience it reads: the evaluation orders them itself
        result = evaluate_audiences(cursor, workspace, [(8, without), (7, email)], AS_OF)
        assert result[7].to_list() == mpids[:2]
        assert result[8].to_list() == mpids[2:]
        with pytest.raises(ValueError, match="stored_members"):
            evaluate_audiences(cursor, workspace, [(8, without)], AS_OF)
        stored = evaluate_audiences(cursor, workspace, [(8, without)], AS_OF,
                                    stored_members=lambda a: pl.Series([mpids[5]], dtype=pl.Int64))
        assert stored[8].to_list() == mpids[:5]
    finally:
        cursor.close()


def test_an_empty_workspace_and_unknown_touched_profiles_give_empty_memberships(db: Any):
    cursor = db.cursor()
    try:
        criteria = parse_criteria({"not": {"event": {"event_name": "A"}}})
        assert evaluate_audiences(cursor, "ws_nobody", [(1, criteria)], AS_OF)[1].to_list() == []
        assert evaluate_audiences(cursor, "ws_nobody", [(1, criteria)], AS_OF, mpids=[1, 2])[1].to_list() == []
        assert evaluate_audiences(cursor, "ws_nobody", [(1, criteria)], AS_OF, mpids=[])[1].to_list() == []
        assert evaluate_audiences(cursor, "ws_nobody", [], AS_OF) == {}
    finally:
        cursor.close()


def test_attribute_values_compare_as_documented(db: Any):
    """Tags and empty lists exist but compare true to nothing; a list is true when one element is; numbers
    stored as text compare as numbers; a calculated attribute's list value compares element by element."""
    workspace, (tag, empty, listed_, text_number, number, unset) = new_workspace()
    world = World(profiles={m: (0, 0, "active") for m in (tag, empty, listed_, text_number, number, unset)},
                  attributes={tag: {"tier": None}, empty: {"tier": []}, listed_: {"tier": ["gold", "silver"]},
                              text_number: {"tier": "33"}, number: {"tier": 33.5}},
                  ca_values={listed_: {2: ["shoes", "bags"]}, number: {2: "bags"}, empty: {2: []}})
    cursor = db.cursor()
    try:
        write_world(cursor, workspace, world, [False, True])

        def members(raw: dict[str, Any]) -> list[int]:
            return evaluate_audiences(cursor, workspace, [(1, parse_criteria(raw))], AS_OF)[1].to_list()

        def tier(operator: str, *values: Any) -> list[int]:
            return members({"user_attribute": {"name": "tier", "operator": operator, "values": list(values)}})

        assert tier("exists") == [tag, empty, listed_, text_number, number]
        assert tier("not_exists") == [unset]
        assert tier("equals", "silver") == [listed_]
        assert tier("not_equals", "gold") == [listed_, text_number, number]  # silver differs from gold
        assert members({"not": {"user_attribute": {"name": "tier", "operator": "equals", "values": ["gold"]}}}) == [
            tag, empty, text_number, number, unset]
        assert tier("greater_than", 30) == [text_number, number]
        assert tier("equals", 33) == [text_number]
        assert tier("in", "33", "gold") == [listed_, text_number]
        ca = {"calculated_attribute": {"id": 2, "operator": "equals", "values": ["bags"]}}
        assert members(ca) == [listed_, number]
        assert members({"calculated_attribute": {"id": 2, "operator": "exists"}}) == [empty, listed_, number]
    finally:
        cursor.close()
