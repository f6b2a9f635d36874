"""Evaluating audiences with polars (docs/audiences.md, "Evaluation contract").

One call evaluates many audiences and shares its reads: each source (events, user attributes, calculated
attribute values, identities, consent, profile times) is read from DuckDB once, as Arrow, narrowed to what the
audiences' leaves ask about, and folded by polars into one row per profile with a column per distinct leaf
(how many events matched, whether an attribute compares true, ...). Each criteria tree then compiles to one
boolean polars expression over those columns; an audience leaf reads the column of an audience evaluated
earlier in the call, or the stored members. No Python runs per profile or per row.

A profile's membership depends only on its own rows, other audiences' memberships and `as_of_ms`, so
evaluating only the touched profiles (`mpids`) gives them what evaluating everyone would: that is the
real-time path, and the property tests hold the two equal.

Semantics where docs/audiences.md leaves room (written there too):
- the profiles are the workspace's active ones (`profiles.status = 'active'`; orphaned profiles lost their
  last identity and are never returned by IDSync again);
- an event counts when start <= timestamp <= as_of (start from the time period), like a calculated attribute's;
- attribute values compare as text, as calculated attribute conditions do (numbers and booleans by their JSON
  text); a list value compares element by element and is true when one element is; `exists` asks whether the
  attribute is set at all (a null-valued tag or an empty list exists, but no comparison on it is true).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from audiences.definitions import (
    AllOf,
    AnyOf,
    AudienceLeaf,
    CalculatedAttributeLeaf,
    ConsentLeaf,
    Criteria,
    EventLeaf,
    IdentityLeaf,
    Leaf,
    Not,
    ProfileLeaf,
    UserAttributeLeaf,
    dependency_order,
    leaves,
)
from engine.ca_compute import attribute_column, condition_expr
from engine.ca_definitions import Condition, TimePeriod
from engine.ca_engine import attribute_extractions

StoredMembers = Callable[[int], pl.Series]  # audience id -> its current members' MPIDs

_MPID = pl.Int64


def evaluate_audiences(cursor: duckdb.DuckDBPyConnection, workspace_id: str,
                       audiences: Sequence[tuple[int, Criteria]], as_of_ms: int, mpids: Sequence[int] | None = None,
                       stored_members: StoredMembers | None = None) -> dict[int, pl.Series]:
    """Per audience, the sorted unique MPIDs (`pl.Int64`) that match at `as_of_ms`, among the workspace's active
    profiles (`mpids` None) or among those of `mpids` that are active profiles of the workspace. An audience
    leaf naming an audience of `audiences` uses this call's result for it (the list is put in dependency order
    here); one naming any other audience asks `stored_members`."""
    criteria = dict(audiences)
    if len(criteria) != len(audiences):
        raise ValueError("each audience may appear once in an evaluation")
    plan = _Plan()
    for audience_criteria in criteria.values():
        for leaf in leaves(audience_criteria):
            plan.add(leaf)
    profiles = _read_profiles(cursor, workspace_id, mpids)
    if profiles.is_empty():  # nobody to evaluate (a batch of unknown profiles, an empty workspace)
        return {audience_id: pl.Series("mpid", [], _MPID) for audience_id in criteria}
    # the other reads need only the profiles that exist: an unknown or orphaned MPID among `mpids` drops out here
    wanted = None if mpids is None else profiles.get_column("mpid").to_list()
    # one lazy plan from here: polars runs the group-bys, joins and every audience's expression in one go
    # (an eager group-by over 3M events took ~4x as long as the same one in a lazy plan)
    frame = profiles.lazy()
    for columns in (_event_counts(cursor, workspace_id, plan, as_of_ms, wanted),
                    _attribute_flags(cursor, workspace_id, plan, wanted),
                    _calculated_attribute_flags(cursor, workspace_id, plan, wanted),
                    _identity_flags(cursor, workspace_id, plan, wanted),
                    _consent_flags(cursor, workspace_id, plan, wanted)):
        if columns is not None:
            frame = frame.join(columns, on="mpid", how="left")
    names = frame.collect_schema().names()
    frame = frame.with_columns(pl.col(c).fill_null(0 if c.startswith("count_") else False) for c in names
                               if c.startswith(("count_", "flag_")))
    compiler = _Compiler(plan, as_of_ms, stored_members)
    for audience_id in dependency_order(criteria):
        frame = frame.with_columns(compiler.compile(criteria[audience_id]).alias(_audience_column(audience_id)))
        compiler.evaluated.add(audience_id)
    # joins in a lazy plan need not keep the profiles' order: one sort, and every audience's MPIDs come sorted
    result = frame.select("mpid", *(_audience_column(a) for a in criteria)).sort("mpid").collect()
    return {audience_id: result.filter(pl.col(_audience_column(audience_id))).get_column("mpid")
            for audience_id in criteria}


def _audience_column(audience_id: int) -> str:
    return f"audience_{audience_id}"


# --- what the leaves ask for, deduplicated ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Selection:
    """The events an event leaf counts, without the count: leaves that differ only in count share one."""

    event_type: str | None
    event_name: str | None
    conditions: tuple[Condition, ...]
    time_period: TimePeriod

    @classmethod
    def of(cls, leaf: EventLeaf) -> _Selection:
        return cls(leaf.event_type, leaf.event_name, leaf.conditions, leaf.time_period)


@dataclass
class _Plan:
    """Every distinct thing the leaves read, numbered: the number names its column in the profile frame."""

    selections: dict[_Selection, int] = field(default_factory=dict)            # count_<i>
    attribute_tests: dict[UserAttributeLeaf, int] = field(default_factory=dict)  # flag_ua_<i>
    ca_tests: dict[CalculatedAttributeLeaf, int] = field(default_factory=dict)   # flag_ca_<i>
    identity_types: dict[str, int] = field(default_factory=dict)                 # flag_id_<i>
    consents: dict[tuple[str, str], int] = field(default_factory=dict)           # flag_consent_<i>

    def add(self, leaf: Leaf) -> None:
        if isinstance(leaf, EventLeaf):
            _number(self.selections, _Selection.of(leaf))
        elif isinstance(leaf, UserAttributeLeaf):
            _number(self.attribute_tests, _exists_form(leaf))
        elif isinstance(leaf, CalculatedAttributeLeaf):
            _number(self.ca_tests, _exists_form(leaf))
        elif isinstance(leaf, IdentityLeaf):
            _number(self.identity_types, leaf.identity_type)
        elif isinstance(leaf, ConsentLeaf):
            _number(self.consents, (leaf.regulation, leaf.purpose))


def _number(numbering: dict[Any, int], key: Any) -> None:
    numbering.setdefault(key, len(numbering))


def _exists_form(leaf: Any) -> Any:
    """`not_exists` is the negation of `exists`: both read one column."""
    if leaf.operator in ("exists", "not_exists"):
        return replace(leaf, operator="exists", value_type="string", values=())
    return leaf


# --- reads -------------------------------------------------------------------------------------------------------

def _only(mpids: list[int] | None, params: list[object]) -> str:
    """The MPID restriction of the real-time path. list_contains, not a semi-join on an unnested list: DuckDB
    pushes it below the window of the latest-wins views (user_attributes, consent), where a semi-join made it
    compute the window over every profile first (~0.6 s instead of ~40 ms at 1M profiles)."""
    if mpids is None:
        return ""
    params.append(mpids)
    return " AND list_contains(?, mpid)"


def _read_profiles(cursor: duckdb.DuckDBPyConnection, workspace_id: str, mpids: Sequence[int] | None) -> pl.DataFrame:
    # a workspace's identity scope is its id (engine/workspaces.py)
    params: list[object] = [workspace_id]
    only = _only(None if mpids is None else list(mpids), params)
    query = f"SELECT mpid, first_seen_ms, last_seen_ms FROM profiles WHERE scope = ? AND status = 'active'{only}"
    frame = pl.from_arrow(cursor.sql(query, params=params).to_arrow_table())
    return frame.cast({"mpid": _MPID, "first_seen_ms": pl.Int64, "last_seen_ms": pl.Int64}).sort("mpid")


def _event_counts(cursor: duckdb.DuckDBPyConnection, workspace_id: str, plan: _Plan, as_of_ms: int,
                  mpids: list[int] | None) -> pl.LazyFrame | None:
    """Per profile with a selected event, how many events each selection matches (`count_<i>`). One read for
    every selection: the events some selection takes (data point and period), a column per selection saying
    whether the event is in it, and each attribute a condition reads extracted as text."""
    if not plan.selections:
        return None
    names: list[str] = []
    for selection in plan.selections:
        names += [c.attribute_name for c in selection.conditions if c.attribute_name not in names]
    extracts, extract_params, picks = attribute_extractions(tuple(names))
    marks: list[str] = []
    mark_params: list[object] = []
    guards: dict[str, list[tuple[str, list[object]]]] = {}
    for selection, index in plan.selections.items():
        test, test_params = _selection_sql(selection, as_of_ms)
        marks.append(f"({test}) AS selected_{index}")
        mark_params += test_params
        for source in {_json_source(c.attribute_name) for c in selection.conditions}:
            guards.setdefault(source, []).append((test, test_params))
    # JSON is parsed only on the events of a selection that has conditions on it: most events read are only
    # counted (reading 3.2M of 10M events with conditions on some: 2.7 s -> 2.1 s)
    guarded, guard_params = [], []
    for source, tests in sorted(guards.items()):
        guarded.append(f"CASE WHEN {' OR '.join(f'({test})' for test, _ in tests)} THEN {source} END AS {source}")
        guard_params += [p for _, params in tests for p in params]
    where = ["workspace_id = ?", "timestamp_ms <= ?"]
    where_params: list[object] = [workspace_id, as_of_ms]
    starts = [s.time_period.start_ms(as_of_ms) for s in plan.selections]
    if None not in starts:  # a plain bound DuckDB can check against each row group's time range
        where.append("timestamp_ms >= ?")
        where_params.append(min(starts))
    # only events some selection takes: a selection of every custom event since May must not pull in the
    # custom events before May that another selection's data point names but its period leaves out
    tests = [_selection_sql(selection, as_of_ms) for selection in plan.selections]
    where.append("(" + " OR ".join(f"({test})" for test, _ in tests) + ")")
    where_params += [p for _, params in tests for p in params]
    if mpids is not None:
        # a semi-join here: the events view has no window to push below, and it was ~2x faster than list_contains
        where.append("mpid IN (SELECT unnest(?::BIGINT[]))")
        where_params.append(mpids)
    selected = [f"selected_{i}" for i in plan.selections.values()]
    read = ", ".join(["mpid", *marks, *guarded])
    query = (f"SELECT {', '.join(['mpid', *selected, *picks])} FROM ("
             f"SELECT {', '.join(['mpid', *selected, *extracts])} FROM ("
             f"SELECT {read} FROM events WHERE {' AND '.join(where)}))")
    params = extract_params + mark_params + guard_params + where_params
    events = pl.from_arrow(cursor.sql(query, params=params).to_arrow_table())
    counts = []
    for selection, index in plan.selections.items():
        matched = pl.col(f"selected_{index}")
        for condition in selection.conditions:
            matched &= condition_expr(condition, pl.col(attribute_column(names.index(condition.attribute_name))))
        counts.append(matched.fill_null(False).sum().cast(pl.Int64).alias(f"count_{index}"))
    return events.lazy().cast({"mpid": _MPID}).group_by("mpid").agg(counts)


def _json_source(attribute_name: str) -> str:
    """The events column an attribute is read from (engine/ca_engine.py: `data.` paths walk the event data)."""
    return "data" if attribute_name.startswith("data.") else "custom_attributes"


def _point_sql(event_type: str | None, event_name: str | None) -> tuple[str, list[object]]:
    tests, params = [], []
    for column, value in (("event_type", event_type), ("event_name", event_name)):
        if value is not None:
            tests.append(f"{column} = ?")
            params.append(value)
    return "(" + " AND ".join(tests or ["true"]) + ")", params


def _selection_sql(selection: _Selection, as_of_ms: int) -> tuple[str, list[object]]:
    """The data point and the period's start (conditions are polars' job: they reuse the calculated attribute
    comparisons on the extracted text)."""
    test, params = _point_sql(selection.event_type, selection.event_name)
    start = selection.time_period.start_ms(as_of_ms)
    if start is not None:
        test += " AND timestamp_ms >= ?"
        params.append(start)
    return test, params


# a JSON value as texts, one per element of a list (see the module docstring)
_TEXTS = ("CASE WHEN json_type(value) = 'ARRAY' THEN json_extract_string(value, '$[*]') "
          "ELSE [json_extract_string(value, '$')] END AS texts")


def _attribute_flags(cursor: duckdb.DuckDBPyConnection, workspace_id: str, plan: _Plan,
                     mpids: list[int] | None) -> pl.LazyFrame | None:
    if not plan.attribute_tests:
        return None
    names = sorted({test.name for test in plan.attribute_tests})
    params: list[object] = [workspace_id, names]
    query = (f"SELECT mpid, name AS key, {_TEXTS} FROM user_attributes WHERE workspace_id = ? "
             f"AND list_contains(?, name){_only(mpids, params)}")
    rows = cursor.sql(query, params=params).to_arrow_table()
    return _value_flags(rows, pl.String, {(t.name, t.condition()): i for t, i in plan.attribute_tests.items()}, "ua")


def _calculated_attribute_flags(cursor: duckdb.DuckDBPyConnection, workspace_id: str, plan: _Plan,
                                mpids: list[int] | None) -> pl.LazyFrame | None:
    if not plan.ca_tests:
        return None
    ids = sorted({test.ca_id for test in plan.ca_tests})
    params: list[object] = [workspace_id, ids]
    # a NULL value is a row saying when a value will come (changes_at_ms): the profile has none yet
    query = (f"SELECT mpid, ca_id AS key, {_TEXTS} FROM calculated_attribute_values WHERE workspace_id = ? "
             f"AND list_contains(?, ca_id) AND value IS NOT NULL{_only(mpids, params)}")
    rows = cursor.sql(query, params=params).to_arrow_table()
    return _value_flags(rows, pl.Int64, {(t.ca_id, t.condition()): i for t, i in plan.ca_tests.items()}, "ca")


def _value_flags(rows: pa.Table, key_type: pl.DataType, tests: dict[tuple[Any, Any], int], prefix: str) -> pl.LazyFrame:
    """Per profile, whether each test holds on its value (`flag_<prefix>_<i>`); `exists` asks for a row at all."""
    values = pl.from_arrow(rows).lazy().cast({"mpid": _MPID, "key": key_type, "texts": pl.List(pl.String)})
    # an empty list becomes one null text: the value exists, and nothing compares true on a null
    texts = values.explode("texts", empty_as_null=True).rename({"texts": "text"})
    flags = []
    for (key, condition), index in tests.items():
        if condition.operator == "exists":
            holds = pl.col("key") == key
        else:
            holds = (pl.col("key") == key) & condition_expr(condition, pl.col("text"))
        flags.append(holds.fill_null(False).any().alias(f"flag_{prefix}_{index}"))
    return texts.group_by("mpid").agg(flags)


def _identity_flags(cursor: duckdb.DuckDBPyConnection, workspace_id: str, plan: _Plan,
                    mpids: list[int] | None) -> pl.LazyFrame | None:
    if not plan.identity_types:
        return None
    params: list[object] = [workspace_id, sorted(plan.identity_types)]
    query = (f"SELECT DISTINCT mpid, identity_type FROM identities WHERE scope = ? "
             f"AND list_contains(?, identity_type){_only(mpids, params)}")
    rows = pl.from_arrow(cursor.sql(query, params=params).to_arrow_table()).lazy().cast({"mpid": _MPID})
    return rows.group_by("mpid").agg((pl.col("identity_type") == identity_type).any().alias(f"flag_id_{index}")
                                     for identity_type, index in plan.identity_types.items())


def _consent_flags(cursor: duckdb.DuckDBPyConnection, workspace_id: str, plan: _Plan,
                   mpids: list[int] | None) -> pl.LazyFrame | None:
    """Per profile and asked purpose, whether its current answer is "consented" (a CCPA data_sale_opt_out
    answer of consented means opted out). Purposes match without case (definitions lower-case theirs)."""
    if not plan.consents:
        return None
    regulations = sorted({regulation for regulation, _ in plan.consents})
    purposes = sorted({purpose for _, purpose in plan.consents})
    params: list[object] = [workspace_id, regulations, purposes]
    query = (f"SELECT mpid, regulation, lower(purpose) AS purpose, consented FROM consent WHERE workspace_id = ? "
             f"AND list_contains(?, regulation) AND list_contains(?, lower(purpose)){_only(mpids, params)}")
    rows = pl.from_arrow(cursor.sql(query, params=params).to_arrow_table()).lazy().cast({"mpid": _MPID})
    return rows.group_by("mpid").agg(
        ((pl.col("regulation") == regulation) & (pl.col("purpose") == purpose) & pl.col("consented"))
        .fill_null(False).any().alias(f"flag_consent_{index}")
        for (regulation, purpose), index in plan.consents.items())


# --- criteria -> polars expressions -----------------------------------------------------------------------------

class _Compiler:
    def __init__(self, plan: _Plan, as_of_ms: int, stored_members: StoredMembers | None) -> None:
        self._plan = plan
        self._as_of_ms = as_of_ms
        self._stored_members = stored_members
        self._stored: dict[int, pl.Series] = {}
        self.evaluated: set[int] = set()   # audiences whose column the frame holds already

    def compile(self, criteria: Criteria) -> pl.Expr:
        if isinstance(criteria, AllOf):
            return pl.all_horizontal(self.compile(child) for child in criteria.children)
        if isinstance(criteria, AnyOf):
            return pl.any_horizontal(self.compile(child) for child in criteria.children)
        if isinstance(criteria, Not):
            return ~self.compile(criteria.child)
        return self._leaf(criteria)

    def _leaf(self, leaf: Leaf) -> pl.Expr:
        plan = self._plan
        if isinstance(leaf, EventLeaf):
            count = pl.col(f"count_{plan.selections[_Selection.of(leaf)]}")
            return count.is_between(leaf.count.low, leaf.count.high) if leaf.count.high is not None \
                else count >= leaf.count.low
        if isinstance(leaf, UserAttributeLeaf):
            flag = pl.col(f"flag_ua_{plan.attribute_tests[_exists_form(leaf)]}")
            return ~flag if leaf.operator == "not_exists" else flag
        if isinstance(leaf, CalculatedAttributeLeaf):
            flag = pl.col(f"flag_ca_{plan.ca_tests[_exists_form(leaf)]}")
            return ~flag if leaf.operator == "not_exists" else flag
        if isinstance(leaf, IdentityLeaf):
            flag = pl.col(f"flag_id_{plan.identity_types[leaf.identity_type]}")
            return flag if leaf.present else ~flag
        if isinstance(leaf, ConsentLeaf):
            flag = pl.col(f"flag_consent_{plan.consents[(leaf.regulation, leaf.purpose)]}")
            return flag if leaf.consented else ~flag
        if isinstance(leaf, ProfileLeaf):
            return self._profile(leaf)
        return self._audience(leaf)

    def _profile(self, leaf: ProfileLeaf) -> pl.Expr:
        moment = pl.col(f"{leaf.field}_ms")
        holds = pl.lit(True)
        if leaf.window_ms is not None:
            holds &= moment.is_between(self._as_of_ms - leaf.window_ms, self._as_of_ms)
        if leaf.after_ms is not None:
            holds &= moment >= leaf.after_ms
        if leaf.before_ms is not None:
            holds &= moment < leaf.before_ms
        return holds

    def _audience(self, leaf: AudienceLeaf) -> pl.Expr:
        if leaf.audience_id in self.evaluated:
            member = pl.col(_audience_column(leaf.audience_id))
        else:
            if self._stored_members is None:
                raise ValueError(f"audience {leaf.audience_id} is read but neither evaluated in this call nor "
                                 f"given by stored_members")
            if leaf.audience_id not in self._stored:
                self._stored[leaf.audience_id] = self._stored_members(leaf.audience_id).cast(_MPID)
            member = pl.col("mpid").is_in(self._stored[leaf.audience_id].implode())
        return member if leaf.member else ~member
