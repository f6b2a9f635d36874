"""Audience definitions: the documented shapes parse into the dataclasses evaluation compiles, every mistake
is a BadRequest naming its field, and the workspace checks (calculated attributes, other audiences, circles)
work through the lookups the registry passes in."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from audiences.definitions import (
    MAX_DEPTH,
    MAX_LEAVES,
    AllOf,
    AnyOf,
    AudienceLeaf,
    CalculatedAttributeLeaf,
    ConsentLeaf,
    Count,
    EventLeaf,
    IdentityLeaf,
    Not,
    ProfileLeaf,
    UserAttributeLeaf,
    check_references,
    dependency_order,
    leaves_with_paths,
    parse_audience,
    parse_criteria,
    referenced_audiences,
    referenced_calculated_attributes,
    uses_time_windows,
)
from engine.ca_definitions import Condition, TimePeriod
from engine.errors import BadRequest

HOUR = 3_600_000

# docs/audiences.md's example, word for word
EXAMPLE: dict[str, Any] = {
    "name": "New and barely active",
    "external_name": "new_low_sessions",
    "description": "installed in the last 72 hours with fewer than three sessions",
    "type": "real_time",
    "criteria": {"all": [
        {"event": {"event_type": "custom_event", "event_name": "install",
                   "time_period": {"type": "within_last", "value": 72, "unit": "hours"}}},
        {"event": {"event_type": "session_start", "count": {"operator": "fewer_than", "value": 3}}},
        {"not": {"consent": {"ccpa_data_sale_opt_out": True}}},
    ]},
}


def test_the_documented_example_parses():
    definition = parse_audience(EXAMPLE)
    assert (definition.name, definition.external_name, definition.type, definition.refresh_minutes) == (
        "New and barely active", "new_low_sessions", "real_time", None)
    assert definition.description == "installed in the last 72 hours with fewer than three sessions"
    install, sessions, no_sale = definition.criteria.children
    assert install == EventLeaf("custom_event", "install", (), TimePeriod("within_last", window_ms=72 * HOUR),
                                Count("at_least", (1,), 1, None))
    assert sessions.count == Count("fewer_than", (3,), 0, 2)
    assert sessions.count.admits(0) and sessions.count.admits(2) and not sessions.count.admits(3)
    assert no_sale == Not(ConsentLeaf("ccpa", "data_sale_opt_out", True))
    assert uses_time_windows(definition.criteria)


def test_defaults_and_every_leaf():
    definition = parse_audience({"name": "  Loyal  ", "type": "standard", "id": 12, "connected_outputs": [],
                                 "criteria": {"any": [
        {"user_attribute": {"name": "tier", "operator": "in", "values": ["gold", "silver"]}},
        {"user_attribute": {"name": "age", "operator": "not_exists"}},
        {"calculated_attribute": {"id": 4, "operator": "greater_than", "values": [100]}},
        {"identity": {"type": "email", "present": False}},
        {"profile": {"field": "last_seen", "within_last": {"value": 7, "unit": "days"}, "after": "2026-01-01"}},
        {"consent": {"gdpr_purpose": "Advertising"}},
        {"audience": {"id": 3, "member": False}},
        {"event": {"event_name": "purchase", "conditions": [
            {"attribute_name": "data.product_action.total_amount", "operator": "between", "values": [10, 99.5]}],
            "time_period": {"type": "since", "date": "2026-03-01"}, "count": {"operator": "between", "values": [2, 4]}}},
    ]}})
    assert (definition.name, definition.external_name, definition.refresh_minutes) == ("Loyal", "Loyal", 60)
    assert definition.criteria == AnyOf((
        UserAttributeLeaf("tier", "in", "string", ("gold", "silver")),
        UserAttributeLeaf("age", "not_exists", "string", ()),
        CalculatedAttributeLeaf(4, "greater_than", "number", (100,)),
        IdentityLeaf("email", False),
        ProfileLeaf("last_seen", window_ms=7 * 24 * HOUR, after_ms=1767225600000),
        ConsentLeaf("gdpr", "advertising", True),   # purposes match without case
        AudienceLeaf(3, False),
        EventLeaf(None, "purchase", (Condition("data.product_action.total_amount", "between", "number", (10, 99.5)),),
                  TimePeriod("since", since_ms=1772323200000), Count("between", (2, 4), 2, 4)),
    ))
    assert referenced_audiences(definition.criteria) == {3}
    assert referenced_calculated_attributes(definition.criteria) == {4}
    assert uses_time_windows(definition.criteria)  # the profile leaf's within_last
    assert not uses_time_windows(parse_criteria({"event": {"event_name": "x"}}))
    paths = [path for _, path in leaves_with_paths(definition.criteria)]
    assert paths[0] == "criteria.any[0].user_attribute" and paths[-1] == "criteria.any[7].event"


@pytest.mark.parametrize(("operator", "value", "low", "high"), [
    ("at_least", 3, 3, None), ("at_most", 3, 0, 3), ("exactly", 0, 0, 0), ("more_than", 3, 4, None),
    ("fewer_than", 1, 0, 0),
])
def test_count_operators_are_ranges(operator: str, value: int, low: int, high: int | None):
    leaf = parse_criteria({"event": {"event_type": "session_start", "count": {"operator": operator, "value": value}}})
    assert (leaf.count.low, leaf.count.high) == (low, high)


def with_criteria(criteria: Any) -> dict[str, Any]:
    return {"name": "x", "criteria": criteria}


def nested(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"identity": {"type": "email"}}
    for _ in range(depth - 1):
        node = {"not": node}
    return node


EVENT = {"event": {"event_type": "session_start"}}


@pytest.mark.parametrize(("definition", "field"), [
    ([], "definition"),
    ({"criteria": EVENT}, "name"),
    ({"name": "", "criteria": EVENT}, "name"),
    ({"name": "x" * 129, "criteria": EVENT}, "name"),
    ({"name": "x", "external_name": 5, "criteria": EVENT}, "external_name"),
    ({"name": "x", "description": ["no"], "criteria": EVENT}, "description"),
    ({"name": "x", "type": "batch", "criteria": EVENT}, "type"),
    ({"name": "x", "refresh_minutes": 30, "criteria": EVENT}, "refresh_minutes"),
    ({"name": "x", "type": "standard", "refresh_minutes": 4, "criteria": EVENT}, "refresh_minutes"),
    ({"name": "x", "type": "standard", "refresh_minutes": 10_081, "criteria": EVENT}, "refresh_minutes"),
    ({"name": "x", "type": "standard", "refresh_minutes": True, "criteria": EVENT}, "refresh_minutes"),
    ({"name": "x"}, "criteria"),
    (with_criteria(None), "criteria"),
    (with_criteria({}), "criteria"),
    (with_criteria({"all": [EVENT], "any": [EVENT]}), "criteria"),
    (with_criteria({"and": [EVENT]}), "criteria.and"),
    (with_criteria({"all": []}), "criteria.all"),
    (with_criteria({"any": EVENT}), "criteria.any"),
    (with_criteria({"all": [EVENT, {"not": "x"}]}), "criteria.all[1].not"),
    (with_criteria(nested(MAX_DEPTH + 1)), "criteria" + ".not" * MAX_DEPTH),
    (with_criteria({"any": [EVENT] * (MAX_LEAVES + 1)}), f"criteria.any[{MAX_LEAVES}]"),
    (with_criteria({"event": {}}), "criteria.event"),
    (with_criteria({"event": {"event_type": "made_up"}}), "criteria.event.event_type"),
    (with_criteria({"event": {"event_name": "x", "attribute_name": "y"}}), "criteria.event.attribute_name"),
    (with_criteria({"event": {"event_name": "x", "time_window": {}}}), "criteria.event.time_window"),
    (with_criteria({"event": {"event_name": "x", "conditions": {}}}), "criteria.event.conditions"),
    (with_criteria({"all": [EVENT, {"event": {"event_name": "x", "conditions": [
        {"attribute_name": "a", "operator": "greater_than", "values": ["x"]}]}}]}),
     "criteria.all[1].event.conditions[0].operator"),
    (with_criteria({"event": {"event_name": "x", "time_period": {"type": "within_last", "value": 0}}}),
     "criteria.event.time_period.value"),
    (with_criteria({"event": {"event_name": "x", "time_period": {"type": "since", "date": "soon"}}}),
     "criteria.event.time_period.date"),
    (with_criteria({"all": [EVENT, {"event": {"event_name": "x", "count": {"operator": "at_least", "value": -1}}}]}),
     "criteria.all[1].event.count.value"),
    (with_criteria({"event": {"event_name": "x", "count": {"operator": "at_least", "value": 2.5}}}),
     "criteria.event.count.value"),
    (with_criteria({"event": {"event_name": "x", "count": {"operator": "fewer_than", "value": 0}}}),
     "criteria.event.count.value"),
    (with_criteria({"event": {"event_name": "x", "count": {"operator": "around", "value": 1}}}),
     "criteria.event.count.operator"),
    (with_criteria({"event": {"event_name": "x", "count": {"operator": "between", "value": 1}}}),
     "criteria.event.count.values"),
    (with_criteria({"event": {"event_name": "x", "count": {"operator": "between", "values": [3, 1]}}}),
     "criteria.event.count.values"),
    (with_criteria({"event": {"event_name": "x", "count": {"operator": "between", "values": [0, "2"]}}}),
     "criteria.event.count.values[1]"),
    (with_criteria({"event": {"event_name": "x", "count": {"operator": "at_least", "values": [1]}}}),
     "criteria.event.count.values"),
    (with_criteria({"user_attribute": {"operator": "exists"}}), "criteria.user_attribute.name"),
    (with_criteria({"user_attribute": {"name": "a", "operator": "like", "values": ["x"]}}),
     "criteria.user_attribute.operator"),
    (with_criteria({"user_attribute": {"name": "a", "operator": "in", "values": []}}), "criteria.user_attribute.values"),
    (with_criteria({"user_attribute": {"name": "a", "operator": "not_exists", "values": ["x"]}}),
     "criteria.user_attribute.values"),
    (with_criteria({"user_attribute": {"name": "a", "operator": "equals", "values": [1], "value_type": "string"}}),
     "criteria.user_attribute.values[0]"),
    (with_criteria({"calculated_attribute": {"id": "4", "operator": "exists"}}), "criteria.calculated_attribute.id"),
    (with_criteria({"calculated_attribute": {"id": 4, "operator": "contains", "values": [3]}}),
     "criteria.calculated_attribute.operator"),
    (with_criteria({"identity": {"type": "passport"}}), "criteria.identity.type"),
    (with_criteria({"identity": {"type": "email", "present": "yes"}}), "criteria.identity.present"),
    (with_criteria({"profile": {"field": "created"}}), "criteria.profile.field"),
    (with_criteria({"profile": {"field": "first_seen"}}), "criteria.profile"),
    (with_criteria({"profile": {"field": "first_seen", "within_last": {"value": 3, "unit": "weeks"}}}),
     "criteria.profile.within_last.unit"),
    (with_criteria({"profile": {"field": "first_seen", "within_last": {"type": "since"}}}),
     "criteria.profile.within_last.type"),
    (with_criteria({"profile": {"field": "first_seen", "before": "yesterday"}}), "criteria.profile.before"),
    (with_criteria({"profile": {"field": "first_seen", "after": "2026-02-01", "before": "2026-01-01"}}),
     "criteria.profile.before"),
    (with_criteria({"consent": {}}), "criteria.consent.gdpr_purpose"),
    (with_criteria({"consent": {"gdpr_purpose": "ads", "consented": "yes"}}), "criteria.consent.consented"),
    (with_criteria({"consent": {"ccpa_data_sale_opt_out": 1}}), "criteria.consent.ccpa_data_sale_opt_out"),
    (with_criteria({"consent": {"ccpa_data_sale_opt_out": True, "gdpr_purpose": "ads"}}), "criteria.consent"),
    (with_criteria({"audience": {"id": 0}}), "criteria.audience.id"),
    (with_criteria({"audience": {"id": 3, "member": None}}), "criteria.audience.member"),
])
def test_every_mistake_names_its_field(definition: Any, field: str):
    with pytest.raises(BadRequest) as error:
        parse_audience(definition)
    assert error.value.field == field, error.value.message
    assert error.value.message


def test_limits_hold_exactly_at_the_edge():
    parse_audience(with_criteria(nested(MAX_DEPTH)))
    parse_audience(with_criteria({"any": [EVENT] * MAX_LEAVES}))
    parse_audience({"name": "x" * 128, "type": "standard", "refresh_minutes": 10_080, "criteria": EVENT})


def test_parsing_does_not_change_its_input():
    raw = copy.deepcopy(EXAMPLE)
    parse_audience(raw)
    assert raw == EXAMPLE


# --- references --------------------------------------------------------------------------------------------------

def lookups(definitions: dict[int, dict[str, Any]], active_cas: set[int]) -> tuple[Any, Any]:
    parsed = {a: parse_criteria(raw) for a, raw in definitions.items()}
    return (lambda ca_id: ca_id in active_cas), parsed.get


def test_references_to_what_exists_pass():
    ca_exists, audience_criteria = lookups({1: {"identity": {"type": "email"}}, 2: {"audience": {"id": 1}}}, {7})
    criteria = parse_criteria({"all": [{"audience": {"id": 2}}, {"calculated_attribute": {"id": 7, "operator": "exists"}}]})
    check_references(criteria, ca_exists, audience_criteria)                  # a new audience
    check_references(criteria, ca_exists, audience_criteria, audience_id=3)   # an update of audience 3


@pytest.mark.parametrize(("criteria", "audience_id", "field", "says"), [
    ({"all": [EVENT, {"calculated_attribute": {"id": 8, "operator": "exists"}}]}, None,
     "criteria.all[1].calculated_attribute.id", "no active calculated attribute 8"),
    ({"not": {"audience": {"id": 99}}}, None, "criteria.not.audience.id", "no audience 99"),
    ({"audience": {"id": 1}}, 1, "criteria.audience.id", "itself"),
    ({"any": [EVENT, {"audience": {"id": 2}}]}, 1, "criteria.any[1].audience.id", "circle (1 -> 2 -> 1)"),
    ({"audience": {"id": 3}}, 1, "criteria.audience.id", "circle (1 -> 3 -> 2 -> 1)"),
])
def test_reference_problems_name_the_leaf(criteria: dict[str, Any], audience_id: int | None, field: str, says: str):
    ca_exists, audience_criteria = lookups({1: EVENT, 2: {"audience": {"id": 1}}, 3: {"audience": {"id": 2}}}, {7})
    with pytest.raises(BadRequest) as error:
        check_references(parse_criteria(criteria), ca_exists, audience_criteria, audience_id=audience_id)
    assert error.value.field == field
    assert says in error.value.message


def test_dependency_order_puts_what_is_read_first():
    definitions = {a: parse_criteria(raw) for a, raw in {
        5: {"all": [{"audience": {"id": 3}}, {"audience": {"id": 4}}]}, 4: {"audience": {"id": 1}},
        3: EVENT, 1: {"not": {"audience": {"id": 42}}},  # 42 is not evaluated here: taken as stored
    }.items()}
    order = dependency_order(definitions)
    assert sorted(order) == [1, 3, 4, 5]
    assert order.index(1) < order.index(4) < order.index(5) and order.index(3) < order.index(5)
    with pytest.raises(ValueError, match="circle"):
        dependency_order({1: parse_criteria({"audience": {"id": 2}}), 2: parse_criteria({"audience": {"id": 1}})})


def test_trees_compare_by_value():
    raw = {"all": [EVENT, {"not": {"identity": {"type": "email"}}}]}
    assert parse_criteria(raw) == parse_criteria(copy.deepcopy(raw))
    assert isinstance(parse_criteria(raw), AllOf)
    assert hash(parse_criteria(raw)) == hash(parse_criteria(raw))
