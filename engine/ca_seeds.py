"""Seeding calculated attributes (reference §3): a starting value per profile as of a date, for history that
happened before idmesh saw events. Events up to the seed's date are covered by the seed and ignored; later
events combine with it:

- count, sum: seed + the later events' value; min, max: the smaller / larger of both;
- average: weighted by the seed's `count` (required for average);
- first_occurrence(_timestamp): the seed (it is earlier than any later event);
- last_occurrence(_timestamp): the latest later event, else the seed;
- unique_list: the seed's values, then later values not among them (100 at most);
- unique_values_count: the seed's `values` list when given (exact), else seed + later distinct values
  (an upper bound: the values behind a bare number are unknown);
- most_frequent: the seed value counts `count` times (default 1) against the later events' values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl

from engine.ca_compute import attribute_column, compute, counted_events
from engine.ca_definitions import UNIQUE_LIST_LIMIT, Definition, date_ms
from engine.errors import BadRequest

MAX_SEEDS_PER_REQUEST = 10_000


@dataclass(frozen=True)
class Seed:
    mpid: int
    value: Any
    as_of_ms: int
    count: int | None = None
    values: tuple[str, ...] | None = None


def parse_seeds(body: Any, calculation_type: str) -> list[Seed]:
    """`{"seeds": [{"mpid", "value", "as_of", "count"?, "values"?}]}`, every mistake a 400 naming the field."""
    seeds = body.get("seeds") if isinstance(body, Mapping) else None
    if not isinstance(seeds, list) or not seeds or len(seeds) > MAX_SEEDS_PER_REQUEST:
        raise BadRequest(f"seeds must be a list of 1 to {MAX_SEEDS_PER_REQUEST} seeds", field="seeds")
    return [_seed(raw, f"seeds[{i}]", calculation_type) for i, raw in enumerate(seeds)]


def _seed(raw: Any, path: str, calculation: str) -> Seed:
    if not isinstance(raw, Mapping):
        raise BadRequest(f"{path} must be an object", field=path)
    try:
        mpid = int(raw.get("mpid"))
    except (TypeError, ValueError):
        raise BadRequest(f"{path}.mpid must be an MPID", field=f"{path}.mpid") from None
    value = raw.get("value")
    _check_value(value, calculation, f"{path}.value")
    count = raw.get("count")
    # below 2**63: the seeds table stores it as BIGINT, and a larger one failed the commit (and its neighbours')
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or not 1 <= count < 1 << 63):
        raise BadRequest(f"{path}.count must be a positive integer", field=f"{path}.count")
    if calculation == "average" and count is None:
        raise BadRequest(f"{path}.count is required to seed an average", field=f"{path}.count")
    values = raw.get("values")
    if values is not None and (not isinstance(values, list) or not all(isinstance(v, str) for v in values)):
        raise BadRequest(f"{path}.values must be a list of strings", field=f"{path}.values")
    return Seed(mpid, value, date_ms(raw.get("as_of"), f"{path}.as_of"), count,
                tuple(values) if values is not None else None)


def _check_value(value: Any, calculation: str, path: str) -> None:
    numeric = calculation in ("count", "sum", "min", "max", "average", "unique_values_count",
                              "first_occurrence_timestamp", "last_occurrence_timestamp")
    if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise BadRequest(f"{path} must be a number for {calculation}", field=path)
    if calculation == "unique_list" and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
        raise BadRequest(f"{path} must be a list of strings for unique_list", field=path)
    if calculation in ("first_occurrence", "last_occurrence", "most_frequent") and not isinstance(value, str):
        raise BadRequest(f"{path} must be a string for {calculation}", field=path)


def compute_seeded(definition: Definition, events: pl.DataFrame, as_of_ms: int, seeds: Mapping[int, Seed]
                   ) -> dict[int, Any]:
    """Values per profile: compute() for unseeded profiles, seed + later events for seeded ones."""
    if not seeds:
        return dict(compute(definition, events, as_of_ms).iter_rows())
    seed_frame = pl.DataFrame({"mpid": list(seeds), "seed_ms": [s.as_of_ms for s in seeds.values()]},
                              schema={"mpid": pl.Int64, "seed_ms": pl.Int64})
    # events the seed already covers are dropped; profiles without a seed keep all theirs
    later = events.join(seed_frame, on="mpid", how="left").filter(
        pl.col("seed_ms").is_null() | (pl.col("timestamp_ms") > pl.col("seed_ms"))).drop("seed_ms")
    values = dict(compute(definition, later, as_of_ms).iter_rows())
    start = definition.time_period.start_ms(as_of_ms)
    for mpid, seed in seeds.items():
        if seed.as_of_ms > as_of_ms or (start is not None and seed.as_of_ms < start):
            continue  # a seed from the future, or one the time period no longer reaches, adds nothing
        values[mpid] = _combine(definition, seed, values.get(mpid), later.filter(pl.col("mpid") == mpid), as_of_ms)
    return values


def _combine(definition: Definition, seed: Seed, after: Any, later: pl.DataFrame, as_of_ms: int) -> Any:
    calculation = definition.calculation_type
    if after is None and calculation not in ("unique_values_count",):
        return seed.value
    if calculation in ("count", "sum"):
        return seed.value + after
    if calculation == "min":
        return min(seed.value, after)
    if calculation == "max":
        return max(seed.value, after)
    if calculation == "average":
        counted = len(counted_events(definition, later, as_of_ms).filter(
            pl.col(attribute_column(0)).cast(pl.Float64, strict=False).is_not_null()))
        return (seed.value * seed.count + after * counted) / (seed.count + counted)
    if calculation in ("first_occurrence", "first_occurrence_timestamp"):
        return seed.value
    if calculation in ("last_occurrence", "last_occurrence_timestamp"):
        return after
    if calculation == "unique_list":
        return list(dict.fromkeys([*seed.value, *after]))[:UNIQUE_LIST_LIMIT]
    if calculation == "unique_values_count":
        # every new distinct value, not the 100 a unique_list keeps
        new_values = counted_events(definition, later, as_of_ms)[attribute_column(0)].drop_nulls().unique().to_list()
        if seed.values is not None:
            return len(set(seed.values) | set(new_values))
        return seed.value + len(new_values)
    return _most_frequent(definition, seed, later, as_of_ms)


def _most_frequent(definition: Definition, seed: Seed, later: pl.DataFrame, as_of_ms: int) -> str:
    counts = counted_events(definition, later, as_of_ms)[attribute_column(0)].value_counts(name="times")
    tally = dict(counts.iter_rows())
    seed_times = (seed.count or 1) + tally.get(seed.value, 0)
    best, best_times = max(tally.items(), key=lambda item: item[1], default=(None, 0))
    # the later events' mode wins ties: it was seen more recently than anything the seed stands for
    if best is not None and best != seed.value and best_times >= seed_times:
        return compute(definition, later, as_of_ms)["value"][0]
    return seed.value
