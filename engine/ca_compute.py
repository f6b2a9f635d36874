"""Computing calculated attributes with polars: one vectorised pass per definition, no per-row Python.

Input is an events frame with `mpid`, `timestamp_ms`, `event_type`, `event_name` and one text column per
attribute the definition reads (named by `attribute_column`), as DuckDB's `->>` extracts them: numbers and
booleans as their JSON text. The same function serves the full computation (every profile) and the
incremental one (only the touched profiles' events): a profile's value depends on its own events and the
evaluation time alone, which is what makes incremental equal to full.

Semantics where mParticle's documentation is silent (written into the README with the feature):
- a condition on an attribute the event lacks fails (except `exists`, which asks exactly that);
- numeric calculations ignore values that are not numbers; a profile with no counted event has no value;
- first/last occurrence ties on time go to the later event in the stream (`event_order`);
- unique_list keeps the first 100 distinct values in time order; most_frequent breaks ties by the value
  seen most recently, then by the smaller value.
"""

from __future__ import annotations

import polars as pl

from engine.ca_definitions import UNIQUE_LIST_LIMIT, Condition, Definition

EVENT_COLUMNS = ("mpid", "timestamp_ms", "event_order", "event_type", "event_name")


def attribute_column(index: int) -> str:
    return f"attribute_{index}"


def counted_events(definition: Definition, events: pl.DataFrame, as_of_ms: int) -> pl.DataFrame:
    """The events that count for `definition` when evaluated at `as_of_ms`."""
    return events.filter(_counted(definition, as_of_ms))


def compute(definition: Definition, events: pl.DataFrame, as_of_ms: int) -> pl.DataFrame:
    """One row per profile with at least one counted event: `mpid`, `value`."""
    counted = events.lazy().filter(_counted(definition, as_of_ms))
    calculation = definition.calculation_type
    if calculation == "most_frequent":
        values = _most_frequent(counted)
    elif calculation in ("first_occurrence", "last_occurrence"):
        values = _occurrence(counted, first=calculation == "first_occurrence")
    elif calculation == "unique_list":
        values = _unique_list(counted)
    else:
        values = counted.group_by("mpid").agg(_aggregate(definition))
    return values.drop_nulls("value").sort("mpid").collect()


def _counted(definition: Definition, as_of_ms: int) -> pl.Expr:
    keep = pl.col("timestamp_ms") <= as_of_ms
    start = definition.time_period.start_ms(as_of_ms)
    if start is not None:
        keep &= pl.col("timestamp_ms") >= start
    point = definition.data_point
    if point.event_type is not None:
        keep &= pl.col("event_type") == point.event_type
    if point.event_name is not None:
        keep &= pl.col("event_name") == point.event_name
    names = definition.attributes_read()
    for condition in definition.conditions:
        keep &= condition_expr(condition, pl.col(attribute_column(names.index(condition.attribute_name))))
    if point.attribute_name is not None and definition.calculation_type != "count":
        keep &= pl.col(attribute_column(0)).is_not_null()  # an event without the value adds nothing
    return keep.fill_null(False)


def condition_expr(condition: Condition, text: pl.Expr) -> pl.Expr:
    """Whether the attribute text (as DuckDB's `->>` extracts it) passes the condition; null when the text is
    null, except for `exists`."""
    operator, values = condition.operator, condition.values
    if operator == "exists":
        return text.is_not_null()
    if condition.value_type == "boolean":
        wanted = "true" if values[0] else "false"
        return (text == wanted) if operator == "equals" else (text.is_not_null() & (text != wanted))
    if condition.value_type == "number":
        number = text.cast(pl.Float64, strict=False)
        return _number_condition(operator, values, number)
    if operator == "equals":
        return text == values[0]
    if operator == "not_equals":
        return text.is_not_null() & (text != values[0])
    if operator == "contains":
        return text.str.contains(values[0], literal=True)
    if operator == "starts_with":
        return text.str.starts_with(values[0])
    return text.is_in(list(values))  # "in"


def _number_condition(operator: str, values: tuple, number: pl.Expr) -> pl.Expr:
    if operator == "between":
        return (number >= values[0]) & (number <= values[1])
    if operator == "in":
        return number.is_in([float(v) for v in values])
    comparisons = {
        "equals": number == values[0], "not_equals": number.is_not_null() & (number != values[0]),
        "greater_than": number > values[0], "greater_than_or_equal": number >= values[0],
        "less_than": number < values[0], "less_than_or_equal": number <= values[0],
    }
    return comparisons[operator]


def _aggregate(definition: Definition) -> pl.Expr:
    calculation = definition.calculation_type
    value = pl.col(attribute_column(0)) if definition.data_point.attribute_name else None
    if calculation == "count":
        return pl.len().cast(pl.Int64).alias("value")
    if calculation == "first_occurrence_timestamp":
        return pl.col("timestamp_ms").min().alias("value")
    if calculation == "last_occurrence_timestamp":
        return pl.col("timestamp_ms").max().alias("value")
    if calculation in ("sum", "min", "max", "average"):
        number = value.cast(pl.Float64, strict=False)
        folded = {"sum": number.sum(), "min": number.min(), "max": number.max(), "average": number.mean()}[calculation]
        # a profile whose values are all non-numeric has no value rather than 0
        return pl.when(number.count() > 0).then(folded).otherwise(None).alias("value")
    return value.n_unique().cast(pl.Int64).alias("value")  # unique_values_count


def _occurrence(counted: pl.LazyFrame, first: bool) -> pl.LazyFrame:
    """The value of the first (last) counted event. Only events at a profile's first (last) time can be it, so
    arrival order breaks the tie among those alone, instead of sorting every profile's events."""
    time = pl.col("timestamp_ms")
    at_edge = counted.filter(time == (time.min() if first else time.max()).over("mpid"))
    value = pl.col(attribute_column(0))
    pick = value.min_by("event_order") if first else value.max_by("event_order")
    return at_edge.group_by("mpid").agg(pick.alias("value"))


def _unique_list(counted: pl.LazyFrame) -> pl.LazyFrame:
    """Distinct values in the order first seen, the first UNIQUE_LIST_LIMIT. One sort of all counted events,
    then each profile's values as they come (group_by keeps the rows of a group in order), rather than one
    sort per profile."""
    in_time = counted.sort(["timestamp_ms", "event_order"])
    value = pl.col(attribute_column(0))
    return in_time.group_by("mpid").agg(value.unique(maintain_order=True).head(UNIQUE_LIST_LIMIT).alias("value"))


def _most_frequent(counted: pl.LazyFrame) -> pl.LazyFrame:
    """The value counted most often; ties: the one seen most recently, then the smaller value. One sort of the
    counted events in time order makes each value's latest event its last row (group_by keeps the rows of a
    group in order), cheaper than sorting within every (profile, value) group."""
    value = pl.col(attribute_column(0))
    per_value = counted.sort(["timestamp_ms", "event_order"]).group_by("mpid", attribute_column(0)).agg(
        pl.len().alias("times"), pl.col("timestamp_ms").last().alias("last_ms"),
        pl.col("event_order").last().alias("last_order"))
    return per_value.group_by("mpid").agg(value.sort_by(["times", "last_ms", "last_order", attribute_column(0)],
                                                        descending=[True, True, True, False]).first().alias("value"))
