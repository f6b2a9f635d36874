"""Reading events for calculated attributes from DuckDB (engine/ca_read.py): one definition read alone computes
what the plain-Python oracle says for events stored in `events_base` (arrival order from the stored column),
definitions sharing a read compute what each computes alone, and compute_many / refresh_many store what
compute_all / refresh store one attribute at a time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ca_compute import definitions, event_streams, oracle, same

from api.ca_routes import _compute_together
from engine.ca_compute import compute
from engine.ca_definitions import Definition, parse_definition
from engine.ca_engine import CalculatedAttributeEngine
from engine.ca_read import ORDERED_CALCULATIONS, plan_reads, read_each, read_events
from engine.ca_registry import CalculatedAttribute
from engine.store import migrate

WORKSPACE = "ws_shared_reads"


@pytest.fixture(scope="module")
def connection() -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect()
    migrate(connection)
    yield connection
    connection.close()


def store(connection: duckdb.DuckDBPyConnection, events: list[dict[str, Any]], workspace_id: str = WORKSPACE) -> None:
    """The oracle's events as ingest stores them: attribute texts as JSON strings (extracted back as the same
    text), arrival in stream order, and a neighbour workspace's copy that no read may see."""
    connection.execute("DELETE FROM events_base")
    rows = [{"workspace_id": workspace, "mpid": e["mpid"], "batch_id": f"b{i}", "event_index": 0,
             "event_type": e["type"], "event_name": e["name"], "timestamp_ms": e["ts"], "received_ms": 0,
             "environment": "production", "data": "{}", "arrival": e["order"],
             "custom_attributes": orjson.dumps({k: v for k, v in e["attributes"].items() if v is not None}).decode()}
            for workspace in (workspace_id, "ws_neighbour") for i, e in enumerate(events)]
    stored = pa.Table.from_pylist(rows) if rows else None  # noqa: F841 (read by the INSERT)
    if rows:
        connection.execute("INSERT INTO events_base BY NAME SELECT * FROM stored")


def values_alone(connection: duckdb.DuckDBPyConnection, definition: Definition, as_of: int) -> dict[int, Any]:
    return dict(compute(definition, read_events(connection, WORKSPACE, definition, as_of), as_of).iter_rows())


READ_SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@READ_SETTINGS
@given(definitions(), event_streams(), st.integers(0, 120))
def test_a_definition_read_alone_computes_the_oracle_value(connection, definition: Definition,
                                                           events: list[dict[str, Any]], as_of: int):
    store(connection, events)
    found = values_alone(connection, definition, as_of)
    assert same(found, oracle(definition, events, as_of)), (found, oracle(definition, events, as_of))


@READ_SETTINGS
@given(st.lists(definitions(), min_size=2, max_size=5), event_streams(), st.integers(0, 120),
       st.none() | st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_definitions_sharing_a_read_compute_what_each_computes_alone(connection, chosen: list[Definition],
                                                                     events: list[dict[str, Any]], as_of: int,
                                                                     mpids: list[int] | None):
    store(connection, events)
    shared = {position: frame for position, frame in read_each(connection, WORKSPACE, chosen, as_of, mpids=mpids)}
    assert sorted(shared) == list(range(len(chosen)))
    for position, definition in enumerate(chosen):
        alone = read_events(connection, WORKSPACE, definition, as_of, mpids=mpids)
        # arrival order is read only when a calculation of the read looks at it
        compared = [c for c in alone.columns if c != "event_order" or definition.calculation_type in ORDERED_CALCULATIONS]
        assert shared[position].select(compared).sort(compared).equals(alone.select(compared).sort(compared)), definition
        assert same(dict(compute(definition, shared[position], as_of).iter_rows()),
                    dict(compute(definition, alone, as_of).iter_rows()))


def test_plan_shares_one_read_per_event_type():
    raw = [{"calculation_type": "count", "data_point": {"event_type": "custom_event", "event_name": "a"}},
           {"calculation_type": "first_occurrence", "data_point": {"event_type": "custom_event", "attribute_name": "x"},
            "time_period": {"type": "within_last", "value": 2, "unit": "days"}},
           {"calculation_type": "count", "data_point": {"event_type": "screen_view", "event_name": "Home"}},
           {"calculation_type": "count", "data_point": {"event_name": "a"},
            "conditions": [{"attribute_name": "y", "operator": "exists"}]}]
    reads = plan_reads([parse_definition(r) for r in raw], as_of_ms=10 * 86_400_000)
    assert [(r.event_type, r.event_names, r.flagged, r.start_ms, r.attributes, r.ordered, r.members) for r in reads] == [
        ("custom_event", (), ("a",), None, ("x",), True, (0, 1)),
        ("screen_view", ("Home",), (), None, (), False, (2,)),
        (None, ("a",), (), None, ("y",), False, (3,))]


ENGINE_DEFINITIONS = [
    {"calculation_type": "sum", "data_point": {"event_type": "custom_event", "event_name": "A", "attribute_name": "amount"}},
    {"calculation_type": "most_frequent", "data_point": {"event_type": "custom_event", "attribute_name": "cat"},
     "time_period": {"type": "within_last", "value": 1, "unit": "hours"}},
    {"calculation_type": "unique_list", "data_point": {"event_type": "custom_event", "attribute_name": "cat"},
     "conditions": [{"attribute_name": "flag", "operator": "equals", "values": [True]}]},
    {"calculation_type": "last_occurrence_timestamp", "data_point": {"event_type": "screen_view", "event_name": "B"}},
]


def stored_values(connection: duckdb.DuckDBPyConnection) -> list[tuple]:
    return connection.execute("SELECT ca_id, mpid, value, changes_at_ms FROM calculated_attribute_values "
                              "ORDER BY ALL").fetchall()


def test_compute_many_and_refresh_many_store_what_one_at_a_time_stores(connection):
    events = [{"mpid": 1 + i % 5, "ts": 3_000_000 + 10_000 * i, "order": i, "type": ["custom_event", "screen_view"][i % 2],
               "name": "AB"[i // 2 % 2], "attributes": {"amount": str(i % 7), "cat": "xyz"[i % 3],
                                                         "flag": ["true", "false", None][i % 3]}} for i in range(300)]
    store(connection, events)
    attributes = [CalculatedAttribute(i + 1, WORKSPACE, f"ca{i}", None, None, raw, 0, 0, 0, "test")
                  for i, raw in enumerate(ENGINE_DEFINITIONS)]
    engine = CalculatedAttributeEngine(connection)
    as_of = max(e["ts"] for e in events) - 1_000_000  # some events are stamped after it: changes are due
    for ca in attributes:
        engine.compute_all(ca, as_of)
    one_at_a_time = stored_values(connection)
    assert {row[0] for row in one_at_a_time} == {1, 2, 3, 4}
    connection.execute("DELETE FROM calculated_attribute_values")
    engine.compute_many(attributes, as_of)
    assert stored_values(connection) == one_at_a_time
    assert all(engine.status_of(ca.id).state == "ready" and engine.status_of(ca.id).progress == 1 for ca in attributes)
    engine.refresh_many(attributes, [2, 3], as_of)
    assert stored_values(connection) == one_at_a_time
    with pytest.raises(ValueError, match="one workspace"):
        engine.compute_many([attributes[0], CalculatedAttribute(9, "other", "x", None, None, ENGINE_DEFINITIONS[0],
                                                                0, 0)])


def test_start_up_computes_each_attribute_alone_when_computing_them_together_fails():
    computed: list[int] = []

    class Engine:
        def compute_many(self, attributes: list[CalculatedAttribute]) -> None:
            raise RuntimeError("together")

        def compute_all(self, ca: CalculatedAttribute) -> None:
            if ca.id == 2:
                raise ValueError("cannot")
            computed.append(ca.id)

    attributes = [CalculatedAttribute(i, WORKSPACE, f"ca{i}", None, None, ENGINE_DEFINITIONS[0], 0, 0) for i in (1, 2, 3)]
    with pytest.raises(RuntimeError, match="2: cannot"):
        _compute_together(Engine(), attributes)  # type: ignore[arg-type]
    assert computed == [1, 3]
