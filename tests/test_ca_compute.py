"""Calculated attributes: the polars computation against a plain-Python oracle written from the documented
semantics, and incremental upkeep against full recomputation, over random event streams (hypothesis)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.ca_compute import attribute_column, compute
from engine.ca_definitions import (
    CALCULATION_TYPES,
    NEEDS_ATTRIBUTE,
    UNIQUE_LIST_LIMIT,
    Condition,
    DataPoint,
    Definition,
    TimePeriod,
    parse_definition,
)
from engine.ca_incremental import IncrementalValues
from engine.ca_seeds import Seed, compute_seeded
from engine.errors import BadRequest

ATTRIBUTE_VALUES = [None, "x", "y", "z", "1", "2.5", "-3", "10", "true", "false"]


def frame(events: list[dict[str, Any]], definition: Definition) -> pl.DataFrame:
    names = definition.attributes_read()
    columns: dict[str, list[Any]] = {
        "mpid": [e["mpid"] for e in events], "timestamp_ms": [e["ts"] for e in events],
        "event_order": [e["order"] for e in events], "event_type": [e["type"] for e in events],
        "event_name": [e["name"] for e in events]}
    for i, name in enumerate(names):
        columns[attribute_column(i)] = [e["attributes"].get(name) for e in events]
    schema = {"mpid": pl.Int64, "timestamp_ms": pl.Int64, "event_order": pl.Int64, "event_type": pl.String,
              "event_name": pl.String, **{attribute_column(i): pl.String for i in range(len(names))}}
    return pl.DataFrame(columns, schema=schema)


# --- the oracle: one profile at a time, straight from the rules in engine/ca_compute.py's docstring ---------
def number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def passes(condition: Condition, text: str | None) -> bool:
    op, values = condition.operator, condition.values
    if op == "exists":
        return text is not None
    if text is None:
        return False
    if condition.value_type == "boolean":
        wanted = "true" if values[0] else "false"
        return text == wanted if op == "equals" else text != wanted
    if condition.value_type == "number":
        n = number(text)
        if n is None:
            return False
        if op == "between":
            return values[0] <= n <= values[1]
        if op == "in":
            return n in [float(v) for v in values]
        return {"equals": n == values[0], "not_equals": n != values[0], "greater_than": n > values[0],
                "greater_than_or_equal": n >= values[0], "less_than": n < values[0],
                "less_than_or_equal": n <= values[0]}[op]
    return {"equals": text == values[0], "not_equals": text != values[0], "contains": values[0] in text,
            "starts_with": text.startswith(values[0]), "in": text in values}[op]


def oracle(definition: Definition, events: list[dict[str, Any]], as_of: int) -> dict[int, Any]:
    point, start = definition.data_point, definition.time_period.start_ms(as_of)
    results = {}
    for mpid in sorted({e["mpid"] for e in events}):
        counted = [e for e in events if e["mpid"] == mpid and e["ts"] <= as_of and (start is None or e["ts"] >= start)
                   and (point.event_type is None or e["type"] == point.event_type)
                   and (point.event_name is None or e["name"] == point.event_name)
                   and all(passes(c, e["attributes"].get(c.attribute_name)) for c in definition.conditions)]
        if point.attribute_name and definition.calculation_type != "count":
            counted = [e for e in counted if e["attributes"].get(point.attribute_name) is not None]
        counted.sort(key=lambda e: (e["ts"], e["order"]))
        value = fold(definition, counted)
        if value is not None:
            results[mpid] = value
    return results


def fold(definition: Definition, counted: list[dict[str, Any]]) -> Any:
    calculation = definition.calculation_type
    if not counted:
        return None
    texts = [e["attributes"].get(definition.data_point.attribute_name) for e in counted]
    if calculation == "count":
        return len(counted)
    if calculation == "first_occurrence_timestamp":
        return counted[0]["ts"]
    if calculation == "last_occurrence_timestamp":
        return counted[-1]["ts"]
    if calculation in ("sum", "min", "max", "average"):
        numbers = [n for n in map(number, texts) if n is not None]
        if not numbers:
            return None
        return {"sum": sum(numbers), "min": min(numbers), "max": max(numbers),
                "average": sum(numbers) / len(numbers)}[calculation]
    if calculation == "first_occurrence":
        return texts[0]
    if calculation == "last_occurrence":
        return texts[-1]
    if calculation == "unique_list":
        return list(dict.fromkeys(texts))[:UNIQUE_LIST_LIMIT]
    if calculation == "unique_values_count":
        return len(set(texts))
    times = Counter(texts)
    last_seen = {t: i for i, t in enumerate(texts)}
    return min(times, key=lambda t: (-times[t], -last_seen[t], t))


def same(a: dict[int, Any], b: dict[int, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9) if isinstance(x, float) else x == y
               for x, y in ((a[k], b[k]) for k in a))


# --- strategies ----------------------------------------------------------------------------------------------
conditions = st.one_of(
    st.builds(Condition, st.just("cat"), st.sampled_from(["equals", "not_equals", "in", "contains", "starts_with"]),
              st.just("string"), st.lists(st.sampled_from(["x", "y", "1"]), min_size=1, max_size=1).map(tuple)),
    st.builds(Condition, st.just("cat"), st.just("exists"), st.just("string"), st.just(())),
    st.builds(Condition, st.just("amount"), st.sampled_from(["greater_than", "less_than_or_equal", "equals"]),
              st.just("number"), st.tuples(st.sampled_from([0, 1, 2.5]))),
    st.builds(Condition, st.just("amount"), st.just("between"), st.just("number"), st.just((-3, 2.5))),
    st.builds(Condition, st.just("flag"), st.sampled_from(["equals", "not_equals"]), st.just("boolean"),
              st.tuples(st.booleans())),
)
periods = st.one_of(st.just(TimePeriod("all_time")), st.builds(lambda w: TimePeriod("within_last", window_ms=w),
                                                                 st.integers(1, 40)),
                    st.builds(lambda s: TimePeriod("since", since_ms=s), st.integers(0, 60)))


@st.composite
def definitions(draw: Any) -> Definition:
    calculation = draw(st.sampled_from(sorted(CALCULATION_TYPES)))
    attribute = "amount" if calculation in NEEDS_ATTRIBUTE or draw(st.booleans()) else None
    point = DataPoint(draw(st.sampled_from([None, "custom_event"])), draw(st.sampled_from([None, "A", "B"])), attribute)
    if point.event_type is None and point.event_name is None:
        point = DataPoint("custom_event", None, attribute)
    return Definition(calculation, point, tuple(draw(st.lists(conditions, max_size=2))), draw(periods))


@st.composite
def event_streams(draw: Any) -> list[dict[str, Any]]:
    count = draw(st.integers(0, 40))
    return [{"mpid": draw(st.integers(1, 4)), "ts": draw(st.integers(0, 100)), "order": i,
             "type": draw(st.sampled_from(["custom_event", "screen_view"])), "name": draw(st.sampled_from(["A", "B"])),
             "attributes": {"amount": draw(st.sampled_from(ATTRIBUTE_VALUES)),
                            "cat": draw(st.sampled_from(ATTRIBUTE_VALUES)),
                            "flag": draw(st.sampled_from([None, "true", "false"]))}}
            for i in range(count)]


PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(definitions(), event_streams(), st.integers(0, 120))
def test_polars_computation_matches_the_oracle(definition: Definition, events: list[dict[str, Any]], as_of: int):
    computed = dict(compute(definition, frame(events, definition), as_of).iter_rows())
    assert same(computed, oracle(definition, events, as_of)), (computed, oracle(definition, events, as_of))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(definitions(), event_streams(), st.lists(st.integers(0, 12), min_size=1, max_size=6))
def test_incremental_upkeep_equals_full_recomputation(definition: Definition, events: list[dict[str, Any]],
                                                      steps: list[int]):
    """Events arrive in batches while time moves on one millisecond at a time; at every moment the kept values
    equal a full computation (windows expire and future-stamped events start counting without a batch)."""
    arrived: list[dict[str, Any]] = []
    values = IncrementalValues(definition, lambda mpids: frame([e for e in arrived if e["mpid"] in mpids], definition))

    def check(as_of: int) -> None:
        full = dict(compute(definition, frame(arrived, definition), as_of).iter_rows())
        assert same(values.values, full), (as_of, values.values, full)

    batches = [events[i::len(steps)] for i in range(len(steps))]
    as_of = 0
    for step, batch in zip(steps, batches):
        for moment in range(as_of + 1, as_of + step + 1):
            values.advance(moment)
            check(moment)
        as_of += step
        arrived += batch
        values.refresh({e["mpid"] for e in batch}, as_of)
        check(as_of)
    for later in range(as_of + 1, 150):
        values.advance(later)
        check(later)


SEEDABLE = sorted(CALCULATION_TYPES - {"most_frequent"})  # a mode cannot be rebuilt from one value and a count


@PROPERTY_SETTINGS
@given(definitions(), event_streams(), st.integers(0, 100), st.integers(100, 120))
def test_seeding_with_the_true_history_reproduces_the_full_value(definition: Definition,
                                                                  events: list[dict[str, Any]], cut: int, as_of: int):
    """Seed each profile with what its events up to `cut` compute to; seed + later events must equal the value
    computed from all events (all_time: a window would cut the seed's history in two)."""
    if definition.calculation_type not in SEEDABLE:
        definition = replace(definition, calculation_type="sum", data_point=replace(definition.data_point,
                                                                                      attribute_name="amount"))
    definition = replace(definition, time_period=TimePeriod("all_time"))
    history = [e for e in events if e["ts"] <= cut]
    seeds = {}
    for mpid, value in oracle(definition, history, cut).items():
        counted = oracle(replace(definition, calculation_type="count"), history, cut).get(mpid)
        values = oracle(replace(definition, calculation_type="unique_list"), history, cut).get(mpid)
        seeds[mpid] = Seed(mpid, value, cut, count=counted if definition.calculation_type == "average" else None,
                           values=tuple(values) if definition.calculation_type == "unique_values_count" else None)
    if definition.calculation_type == "average":  # the weight is the number of numeric values behind the mean
        for mpid, seed in list(seeds.items()):
            numbers = [e for e in history if e["mpid"] == mpid and number(e["attributes"].get("amount")) is not None
                       and all(passes(c, e["attributes"].get(c.attribute_name)) for c in definition.conditions)
                       and (definition.data_point.event_type is None or e["type"] == definition.data_point.event_type)
                       and (definition.data_point.event_name is None or e["name"] == definition.data_point.event_name)]
            seeds[mpid] = replace(seed, count=len(numbers))
    seeded = compute_seeded(definition, frame(events, definition), as_of, seeds)
    expected = oracle(definition, events, as_of)
    assert same(seeded, expected), (seeds, seeded, expected)


def test_parse_definition_accepts_the_documented_shape():
    definition = parse_definition({
        "calculation_type": "sum",
        "data_point": {"event_type": "commerce_event", "attribute_name": "data.product_action.total_amount"},
        "conditions": [{"attribute_name": "category", "operator": "in", "values": ["shoes", "bags"]},
                       {"attribute_name": "price", "operator": "between", "values": [10, 99.5]}],
        "time_period": {"type": "within_last", "value": 30, "unit": "days"}})
    assert definition.time_period.window_ms == 30 * 86_400_000
    assert definition.attributes_read() == ("data.product_action.total_amount", "category", "price")
    assert parse_definition({"calculation_type": "count", "data_point": {"event_name": "Login"},
                             "time_period": {"type": "since", "date": "2026-01-01"}}).time_period.since_ms == 1767225600000


@pytest.mark.parametrize(("definition", "field"), [
    ({"calculation_type": "median", "data_point": {"event_name": "x"}}, "definition.calculation_type"),
    ({"calculation_type": "count"}, "definition.data_point"),
    ({"calculation_type": "count", "data_point": {}}, "definition.data_point"),
    ({"calculation_type": "sum", "data_point": {"event_name": "x"}}, "definition.data_point.attribute_name"),
    ({"calculation_type": "count", "data_point": {"event_type": "made_up"}}, "definition.data_point.event_type"),
    ({"calculation_type": "count", "data_point": {"event_name": "x"},
      "conditions": [{"attribute_name": "a", "operator": "greater_than", "values": ["x"]}]},
     "definition.conditions[0].operator"),
    ({"calculation_type": "count", "data_point": {"event_name": "x"},
      "conditions": [{"attribute_name": "a", "operator": "between", "values": [5, 1]}]}, "definition.conditions[0].values"),
    ({"calculation_type": "count", "data_point": {"event_name": "x"},
      "conditions": [{"attribute_name": "a", "operator": "equals", "values": []}]}, "definition.conditions[0].values"),
    ({"calculation_type": "count", "data_point": {"event_name": "x"},
      "time_period": {"type": "within_last", "value": 0}}, "definition.time_period.value"),
    ({"calculation_type": "count", "data_point": {"event_name": "x"},
      "time_period": {"type": "since", "date": "last tuesday"}}, "definition.time_period.date"),
])
def test_invalid_definitions_name_the_field(definition: dict[str, Any], field: str):
    with pytest.raises(BadRequest) as error:
        parse_definition(definition)
    assert error.value.field == field
