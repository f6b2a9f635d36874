"""Calculated attribute definitions (reference §3): parsed from plain JSON into frozen dataclasses, every
problem a BadRequest naming the field (`definition.conditions[1].operator`).

A definition says which events count (`data_point`: event type and/or name, and the attribute to read),
which of them pass (`conditions` on event attributes, all must hold), over which time (`time_period`), and
how they are folded into one value per profile (`calculation_type`). Attribute names read the event's
`custom_attributes`; a name starting with `data.` is a dot path into the event's data instead (for example
`data.product_action.total_amount`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from engine.errors import BadRequest
from engine.event_batches import MAX_TIMESTAMP_MS

CALCULATION_TYPES = frozenset({
    "count", "sum", "min", "max", "average", "first_occurrence", "last_occurrence", "first_occurrence_timestamp",
    "last_occurrence_timestamp", "unique_list", "unique_values_count", "most_frequent",
})
NEEDS_ATTRIBUTE = CALCULATION_TYPES - {"count", "first_occurrence_timestamp", "last_occurrence_timestamp"}
NUMERIC_CALCULATIONS = frozenset({"sum", "min", "max", "average"})
UNIQUE_LIST_LIMIT = 100

# operator -> the value types it compares (the "operator-type support map")
OPERATORS: dict[str, frozenset[str]] = {
    "equals": frozenset({"string", "number", "boolean"}),
    "not_equals": frozenset({"string", "number", "boolean"}),
    "contains": frozenset({"string"}),
    "starts_with": frozenset({"string"}),
    "in": frozenset({"string", "number"}),
    "greater_than": frozenset({"number"}),
    "greater_than_or_equal": frozenset({"number"}),
    "less_than": frozenset({"number"}),
    "less_than_or_equal": frozenset({"number"}),
    "between": frozenset({"number"}),
    "exists": frozenset({"string", "number", "boolean"}),
}
_VALUE_COUNT = {"between": 2, "exists": 0}  # others: "in" one or more, the rest exactly one
EVENT_TYPES_FOR_CA = frozenset({"custom_event", "commerce_event", "screen_view", "session_start", "session_end",
                                "application_state_transition", "push_message", "push_registration", "crash_report",
                                "opt_out", "first_run", "breadcrumb", "network_performance", "media", "profile",
                                "uninstall", "user_attribute_change", "user_identity_change"})
_ATTRIBUTE = re.compile(r"^(data\.[A-Za-z0-9_$]+(\.[A-Za-z0-9_$]+)*|[^.\s][^\n]{0,255})$")
HOUR_MS = 3_600_000


@dataclass(frozen=True)
class DataPoint:
    event_type: str | None
    event_name: str | None
    attribute_name: str | None


@dataclass(frozen=True)
class Condition:
    attribute_name: str
    operator: str
    value_type: str            # string, number or boolean: how the attribute is compared
    values: tuple[Any, ...]


@dataclass(frozen=True)
class TimePeriod:
    kind: str                  # all_time, within_last or since
    window_ms: int | None = None
    since_ms: int | None = None

    def start_ms(self, as_of_ms: int) -> int | None:
        """The earliest event time that counts when evaluated at `as_of_ms` (None: no bound)."""
        if self.kind == "within_last":
            return as_of_ms - self.window_ms
        if self.kind == "since":
            return self.since_ms
        return None


@dataclass(frozen=True)
class Definition:
    calculation_type: str
    data_point: DataPoint
    conditions: tuple[Condition, ...]
    time_period: TimePeriod

    def attributes_read(self) -> tuple[str, ...]:
        """Every event attribute the computation needs, value attribute first."""
        names = [self.data_point.attribute_name] if self.data_point.attribute_name else []
        names += [c.attribute_name for c in self.conditions if c.attribute_name not in names]
        return tuple(names)


def parse_definition(raw: Any, path: str = "definition") -> Definition:
    if not isinstance(raw, Mapping):
        raise BadRequest(f"{path} must be an object", field=path)
    calculation = raw.get("calculation_type")
    if not isinstance(calculation, str) or calculation not in CALCULATION_TYPES:  # a list is unhashable
        raise BadRequest(f"{path}.calculation_type must be one of {', '.join(sorted(CALCULATION_TYPES))}",
                         field=f"{path}.calculation_type")
    data_point = parse_data_point(raw.get("data_point"), f"{path}.data_point")
    if calculation in NEEDS_ATTRIBUTE and data_point.attribute_name is None:
        raise BadRequest(f"{path}.data_point.attribute_name is required for {calculation}",
                         field=f"{path}.data_point.attribute_name")
    conditions = raw.get("conditions") or []
    if not isinstance(conditions, list):
        raise BadRequest(f"{path}.conditions must be a list", field=f"{path}.conditions")
    return Definition(calculation, data_point,
                      tuple(parse_condition(c, f"{path}.conditions[{i}]") for i, c in enumerate(conditions)),
                      parse_time_period(raw.get("time_period"), f"{path}.time_period"))


def _text(container: Mapping[str, Any], key: str, path: str, required: bool = False) -> str | None:
    value = container.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{path}.{key} must be a non-empty string", field=f"{path}.{key}")
    return value


def _attribute(container: Mapping[str, Any], key: str, path: str, required: bool = False) -> str | None:
    name = _text(container, key, path, required)
    if name is not None and not _ATTRIBUTE.match(name):
        raise BadRequest(f"{path}.{key} must be an attribute name (at most 256 characters) or data.<path>",
                         field=f"{path}.{key}")
    return name


def parse_data_point(raw: Any, path: str) -> DataPoint:
    if not isinstance(raw, Mapping):
        raise BadRequest(f"{path} must be an object with event_type and/or event_name", field=path)
    event_type = _text(raw, "event_type", path)
    if event_type is not None and event_type not in EVENT_TYPES_FOR_CA:
        raise BadRequest(f"{path}.event_type {event_type!r} is not an event type", field=f"{path}.event_type")
    event_name = _text(raw, "event_name", path)
    if event_type is None and event_name is None:
        raise BadRequest(f"{path} needs event_type, event_name or both", field=path)
    return DataPoint(event_type, event_name, _attribute(raw, "attribute_name", path))


def parse_condition(raw: Any, path: str) -> Condition:
    """One condition on an event attribute: `attribute_name` and a comparison (see parse_comparison)."""
    if not isinstance(raw, Mapping):
        raise BadRequest(f"{path} must be an object", field=path)
    attribute = _attribute(raw, "attribute_name", path, required=True)
    return Condition(attribute, *parse_comparison(raw, path))


def parse_comparison(raw: Mapping[str, Any], path: str) -> tuple[str, str, tuple[Any, ...]]:
    """`operator`, `values` and `value_type` (inferred from the values when absent) of a condition, checked
    against the operator-type support map: (operator, value_type, values). Audience criteria compare user and
    calculated attributes with it too."""
    operator = raw.get("operator")
    if not isinstance(operator, str) or operator not in OPERATORS:
        raise BadRequest(f"{path}.operator must be one of {', '.join(OPERATORS)}", field=f"{path}.operator")
    values = raw.get("values", [])
    if not isinstance(values, list):
        raise BadRequest(f"{path}.values must be a list", field=f"{path}.values")
    value_type = raw.get("value_type") or _infer_type(values)
    if not isinstance(value_type, str) or value_type not in OPERATORS[operator]:
        raise BadRequest(f"{path}: operator {operator} does not compare {value_type} values "
                         f"(it takes {', '.join(sorted(OPERATORS[operator]))})", field=f"{path}.operator")
    wanted = _VALUE_COUNT.get(operator)
    if (wanted is not None and len(values) != wanted) or (wanted is None and operator != "in" and len(values) != 1) \
            or (operator == "in" and not values):
        raise BadRequest(f"{path}.values has the wrong number of values for {operator}", field=f"{path}.values")
    for i, value in enumerate(values):
        if not _is_type(value, value_type):
            raise BadRequest(f"{path}.values[{i}] must be a {value_type}", field=f"{path}.values[{i}]")
    if operator == "between" and values[0] > values[1]:
        raise BadRequest(f"{path}.values: the lower bound comes first", field=f"{path}.values")
    return operator, value_type, tuple(values)


def _infer_type(values: list[Any]) -> str:
    if values and all(isinstance(v, bool) for v in values):
        return "boolean"
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "number"
    return "string"


def _is_type(value: Any, value_type: str) -> bool:
    if value_type == "boolean":
        return isinstance(value, bool)
    if value_type == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


def parse_time_period(raw: Any, path: str) -> TimePeriod:
    """`{"type": "all_time" | "within_last" (value, unit hours/days) | "since" (date)}`; absent: all time."""
    if raw is None:
        return TimePeriod("all_time")
    if not isinstance(raw, Mapping):
        raise BadRequest(f"{path} must be an object", field=path)
    kind = raw.get("type", "all_time")
    if kind == "all_time":
        return TimePeriod("all_time")
    if kind == "within_last":
        amount, unit = raw.get("value"), raw.get("unit", "days")
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= 10_000:
            raise BadRequest(f"{path}.value must be a whole number from 1 to 10000", field=f"{path}.value")
        if unit not in ("hours", "days"):
            raise BadRequest(f"{path}.unit must be hours or days", field=f"{path}.unit")
        return TimePeriod("within_last", window_ms=amount * HOUR_MS * (24 if unit == "days" else 1))
    if kind == "since":
        return TimePeriod("since", since_ms=date_ms(raw.get("date"), f"{path}.date"))
    raise BadRequest(f"{path}.type must be all_time, within_last or since", field=f"{path}.type")


def date_ms(value: Any, path: str) -> int:
    """A unix time in milliseconds, or an ISO 8601 date / date-time (UTC unless it says otherwise)."""
    # bounded: the seeds table stores it as BIGINT, and a larger one failed the commit (and its neighbours')
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TIMESTAMP_MS:
        return value
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return int(moment.timestamp() * 1000)
    raise BadRequest(f"{path} must be an ISO 8601 date or a unix time in milliseconds", field=path)
