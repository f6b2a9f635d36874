"""Hypothesis fuzzers for the parsers behind the HTTP API: whatever a client sends, they accept it or raise the
domain error that becomes a 4xx naming the field, and what they accept can be written to the journal.

Inputs are JSON-like values as orjson hands them over (integers up to 2**64 - 1, finite floats, any text), and
valid requests with a few parts replaced, dropped or added, so the deeper checks are reached too. The parsers
are pure or in-memory: each example takes microseconds (the SQL guard's: one DuckDB parse), so the examples are
many and the file stays fast. Derandomized: every run tries the same examples.
"""

from __future__ import annotations

import asyncio
import copy
import csv
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.ratelimit import TokenBuckets
from engine.ca_definitions import CALCULATION_TYPES, EVENT_TYPES_FOR_CA, OPERATORS, parse_definition
from engine.ca_seeds import parse_seeds
from engine.csv_import import FILE_SUFFIXES, CsvFileError, CsvImport, EncodedBatch, plan_header
from engine.errors import BadRequest, IdmeshError, Throttled
from engine.event_batches import DEVICE_IDENTITY_KEYS, EVENT_TYPES, USER_IDENTITY_KEYS, parse_batch
from engine.identity_types import ALL_IDENTITY_TYPES
from engine.idsync import IdSyncService
from engine.ingest import BatchOutcome
from engine.settings import STRATEGIES, parse_settings
from engine.sql_guard import check_select
from engine.workspaces import Workspace
from engine.writer import WriteBatch
from strategies.model import Operation

FUZZ = settings(max_examples=200, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
INT64 = (-(1 << 63), (1 << 63) - 1)

# --- JSON-like values ------------------------------------------------------------------------------------------

# Words the parsers look for, so generated objects hit their branches and not only "unknown key".
VOCABULARY = sorted({
    "events", "event_type", "data", "mpid", "user_identities", "device_info", "user_attributes",
    "deleted_user_attributes", "consent_state", "environment", "batch_id", "source_request_id",
    "timestamp_unixtime_ms", "mp_deviceid", "event_name", "screen_name", "custom_event_type", "custom_attributes",
    "product_action", "action", "products", "user_attribute_name", "new", "deleted", "gdpr", "ccpa",
    "data_sale_opt_out", "consented", "known_identities", "identity_changes", "identity_type", "old_value",
    "new_value", "source_mpid", "destination_mpid", "start_unixtime_ms", "end_unixtime_ms", "scope", "alias_id",
    "production", "development", *EVENT_TYPES, *USER_IDENTITY_KEYS, *DEVICE_IDENTITY_KEYS, *ALL_IDENTITY_TYPES,
})
keys = st.sampled_from(VOCABULARY) | st.text(max_size=8)
# orjson reads integers up to 2**64 - 1 and turns larger ones into floats; it never yields NaN or infinity.
EDGES = [0, -1, 1 << 53, (1 << 53) + 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 1e19, 1e300, -1e300, 0.5, 5e-324]
numbers = st.sampled_from(EDGES) | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats(allow_nan=False, allow_infinity=False)
leaves = st.none() | st.booleans() | numbers | st.text(max_size=12) | st.sampled_from(VOCABULARY)
containers = st.lists(leaves, max_size=2) | st.dictionaries(keys, leaves, max_size=2)
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4),
                           max_leaves=10)


def _slots(value: Any) -> Iterator[tuple[Any, Any]]:
    """Every (container, key or index) of a JSON-like value, outermost first."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield value, key
            yield from _slots(child)
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield value, index
            yield from _slots(child)


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> Any:
    """A valid value with one to three members replaced by any JSON value, removed, or joined by a new one."""
    value = copy.deepcopy(draw(valid))
    for _ in range(draw(st.integers(1, 3))):
        slots = list(_slots(value))
        if not slots:
            return draw(json_values)
        container, key = draw(st.sampled_from(slots))
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "replace":  # a number at the edges, a wrong type, or a whole new subtree
            container[key] = draw(st.one_of(numbers, leaves, containers, json_values))
        elif action == "remove":
            del container[key]
        elif isinstance(container, dict):
            container[draw(keys)] = draw(json_values)
        else:
            container.append(draw(json_values))
    return value


def _assert_journal_rows_fit(batch: WriteBatch) -> None:
    """What the group-commit writer does with each row: orjson, then `::BIGINT` for the integer columns."""
    for kind, row in batch.rows:
        orjson.dumps(row)
        for (column, column_type), value in zip(kind.columns, row):
            if column_type == "i" and value is not None:
                assert isinstance(value, int) and INT64[0] <= value <= INT64[1], (kind.name, column, value)


# --- Events API batches ----------------------------------------------------------------------------------------

timestamps = st.integers(0, 2_000_000_000_000)
names = st.text(min_size=1, max_size=10).filter(lambda s: s.strip())
attribute_values = st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=10) | st.lists(
    st.text(max_size=5), max_size=3)
products = st.lists(st.fixed_dictionaries({"id": names, "price": st.floats(0, 100)}), max_size=2)
event_data = st.fixed_dictionaries({"timestamp_unixtime_ms": timestamps}, optional={
    "custom_attributes": st.dictionaries(names, st.text(max_size=5), max_size=2)})
# the fields each event type requires or checks, beside the common ones
EVENT_FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "custom_event": {"event_name": names, "custom_event_type": st.sampled_from(["other", "navigation"])},
    "screen_view": {"screen_name": names},
    "commerce_event": {"product_action": st.fixed_dictionaries(
        {"action": st.sampled_from(["purchase", "add_to_cart"]), "products": products})},
    "user_attribute_change": {"user_attribute_name": names, "new": attribute_values, "deleted": st.booleans()},
}
events = st.sampled_from(sorted(EVENT_TYPES)).flatmap(lambda event_type: st.fixed_dictionaries({
    "event_type": st.just(event_type),
    "data": st.tuples(event_data, st.fixed_dictionaries(EVENT_FIELDS.get(event_type, {}))).map(
        lambda parts: {**parts[0], **parts[1]})}))
consent = st.fixed_dictionaries({}, optional={
    "gdpr": st.dictionaries(names, st.fixed_dictionaries({"consented": st.booleans(), "timestamp_unixtime_ms": timestamps}),
                            max_size=2),
    "ccpa": st.fixed_dictionaries({"data_sale_opt_out": st.fixed_dictionaries(
        {"consented": st.booleans(), "timestamp_unixtime_ms": timestamps})})})
valid_batches = st.fixed_dictionaries(
    {"environment": st.sampled_from(["production", "development"]),
     "user_identities": st.dictionaries(st.sampled_from(sorted(USER_IDENTITY_KEYS)), names, min_size=1, max_size=3),
     "events": st.lists(events, max_size=3)},
    optional={"mpid": st.integers(*INT64).map(str), "batch_id": st.integers(1, 1 << 40),
              "source_request_id": names, "timestamp_unixtime_ms": timestamps,
              "user_attributes": st.dictionaries(names, attribute_values, max_size=3),
              "device_info": st.dictionaries(st.sampled_from(sorted(DEVICE_IDENTITY_KEYS)), names, max_size=2),
              "mp_deviceid": names, "consent_state": consent})


def _parse_batch_or_bad_request(batch: Any) -> None:
    try:
        parsed = parse_batch(batch)
    except BadRequest as exc:
        assert exc.field, exc.message
        return
    # the views cast timestamps through DOUBLE to BIGINT: accepted ones must survive both
    stamps = [parsed.timestamp_ms] + [change.timestamp_ms for change in parsed.attribute_changes]
    stamps += [event.get("data", {}).get("timestamp_unixtime_ms") for event in parsed.events
               if isinstance(event.get("data"), dict)]
    stamps += [answer.get("timestamp_unixtime_ms") for purposes in (parsed.consent_state or {}).values()
               for answer in (purposes or {}).values()]
    for stamp in stamps:
        assert stamp is None or 0 <= int(float(stamp)) <= INT64[1], stamp
    orjson.dumps(parsed.envelope)


@FUZZ
@given(json_values)
def test_parse_batch_takes_any_json_value(batch: Any) -> None:
    _parse_batch_or_bad_request(batch)


@settings(FUZZ, max_examples=100)
@given(st.dictionaries(keys, json_values, max_size=8))
def test_parse_batch_takes_any_json_object(batch: dict[str, Any]) -> None:
    _parse_batch_or_bad_request(batch)


@FUZZ
@given(mutated(valid_batches))
def test_parse_batch_takes_mutated_valid_batches(batch: Any) -> None:
    _parse_batch_or_bad_request(batch)


@settings(FUZZ, max_examples=50)
@given(valid_batches)
def test_valid_batches_parse(batch: dict[str, Any]) -> None:
    """The generator above is valid, so the mutations start from batches the parser accepts."""
    parse_batch(batch)


# --- IDSync: identities, modify, alias -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def service() -> Iterator[IdSyncService]:
    with tempfile.TemporaryDirectory() as directory:
        opened = IdSyncService.open(str(Path(directory) / "fuzz.duckdb"))
        try:
            yield opened
        finally:
            opened.close()


def _workspace(service: IdSyncService, settings_json: dict[str, Any]) -> tuple[Workspace, list[int]]:
    """An in-memory workspace with three profiles: parsing and planning read the graph, never the database."""
    created, _ = service.workspaces.plan_create("fuzz", settings_json)
    workspace = created.workspace
    service.workspaces.remember(workspace)
    mpids = [service.plan_resolve(workspace, Operation.LOGIN, {"customerid": f"c{n}", "email": f"e{n}@x.io"})[0].mpid
             for n in range(3)]
    return workspace, mpids


WORKSPACE_SETTINGS = [
    {}, {"strategy": "profile_link", "immutable_ids": ["customerid"]}, {"strategy": "best_match"},
    {"strategy": "profile_conversion", "login_ids": ["email"], "unique_ids": ["email"],
     "identity_priority": ["email", "customerid", "other"], "blocked_values": ["n/a"], "blocked_patterns": ["x+"]},
]
identity_types = st.sampled_from(sorted(ALL_IDENTITY_TYPES)) | st.text(max_size=8)
identity_values = leaves | st.sampled_from([" A@B.io ", "null", "-1", "0", "+1 (555) 010", "n/a", "xxx"])
known_identities = st.dictionaries(identity_types, identity_values, max_size=4) | json_values


@FUZZ
@given(st.sampled_from(range(len(WORKSPACE_SETTINGS))), known_identities, leaves, st.sampled_from(list(Operation)),
       st.booleans())
def test_identity_requests_answer_or_raise_a_client_error(service: IdSyncService, which: int, known: Any,
                                                          previous: Any, operation: Operation, read_only: bool) -> None:
    workspace, mpids = _workspace(service, WORKSPACE_SETTINGS[which])
    previous = mpids[0] if previous == "mpid" else previous
    try:
        parsed = service.parse_identities(workspace, known)
    except BadRequest as exc:
        assert exc.field
        return
    assert parsed.normalized and set(parsed.normalized) <= set(workspace.settings.identity_priority)
    try:
        _, batch = service.plan_resolve(workspace, operation, known, previous, read_only=read_only)
    except IdmeshError as exc:
        assert 400 <= exc.status < 500
        return
    _assert_journal_rows_fit(batch)


changes = st.lists(st.dictionaries(st.sampled_from(["identity_type", "old_value", "new_value"]) | keys,
                                   identity_types | identity_values | json_values, max_size=4), max_size=3) | json_values
valid_changes = st.lists(st.fixed_dictionaries({"identity_type": st.sampled_from(["customerid", "email", "other"]),
                                                "old_value": st.none() | st.sampled_from(["c0", "e0@x.io"]),
                                                "new_value": st.none() | names}), min_size=1, max_size=3)


@FUZZ
@given(st.sampled_from(range(len(WORKSPACE_SETTINGS))), st.sampled_from(["own", "other", "none"]) | leaves,
       changes | mutated(valid_changes))
def test_modify_answers_or_raises_a_client_error(service: IdSyncService, which: int, mpid: Any, body: Any) -> None:
    workspace, mpids = _workspace(service, WORKSPACE_SETTINGS[which])
    mpid = {"own": mpids[0], "other": str(mpids[1])}.get(mpid, mpid) if isinstance(mpid, str) else mpid
    try:
        _, batch = service.plan_modify(workspace, mpid, body)
    except IdmeshError as exc:
        assert 400 <= exc.status < 500 and exc.field
        return
    _assert_journal_rows_fit(batch)


alias_data = st.fixed_dictionaries({"source_mpid": st.just(0), "destination_mpid": st.just(1)}, optional={
    "start_unixtime_ms": numbers, "end_unixtime_ms": numbers, "scope": st.text(max_size=5)})
alias_bodies = st.fixed_dictionaries({"request_type": st.just("alias"), "environment": st.just("production"),
                                      "data": alias_data})


@FUZZ
@given(alias_bodies | mutated(alias_bodies) | json_values)
def test_alias_bodies_plan_or_raise_a_client_error(service: IdSyncService, body: Any) -> None:
    workspace, mpids = _workspace(service, {})
    data = body.get("data") if isinstance(body, dict) else None
    if isinstance(data, dict):  # 0 and 1 stand for two real profiles of the workspace
        for key in ("source_mpid", "destination_mpid"):
            if type(data.get(key)) is int and data[key] in (0, 1):
                data[key] = mpids[data[key]]
    try:
        _, batch = service.aliases.plan(workspace, body, lambda mpid: mpid in mpids)
    except BadRequest as exc:
        assert exc.field
        return
    _assert_journal_rows_fit(batch)


@FUZZ
@given(json_values | st.fixed_dictionaries({}, optional={"alias_id": leaves, "data": json_values}))
def test_unalias_bodies_find_or_raise_a_client_error(service: IdSyncService, body: Any) -> None:
    try:
        service.aliases.find_for_unalias("ws_fuzz", body)
    except IdmeshError as exc:
        assert 400 <= exc.status < 500


# --- workspace settings -----------------------------------------------------------------------------------------

valid_settings = st.fixed_dictionaries({}, optional={
    "strategy": st.sampled_from(STRATEGIES), "hub_limit": st.integers(2, 50), "key_only_auth": st.booleans(),
    "blocked_values": st.lists(names, max_size=2), "blocked_patterns": st.sampled_from([[], ["x+"], ["a{2,3}"]]),
    "normalization": st.sampled_from([{}, {"email": ["trim"]}, {"customerid": ["lowercase", "digits"]}]),
    "rate_limit": st.none() | st.fixed_dictionaries({  # rates near zero, bursts of a few
        "requests_per_second": st.sampled_from([5e-324, 1e-300, 1e-9, 1, 1e300]) | numbers,
        "burst": st.integers(1, 3) | numbers}),
    "alias": st.fixed_dictionaries({}, optional={"delay_seconds": st.integers(0, 9) | numbers,
                                                 "max_window_days": st.integers(1, 9) | numbers}),
})


@FUZZ
@given(valid_settings | mutated(valid_settings) | json_values)
def test_workspace_settings_parse_or_raise_a_client_error(raw: Any) -> None:
    try:
        parsed = parse_settings(raw if isinstance(raw, dict) else {"settings": raw})
    except BadRequest as exc:
        assert exc.field and exc.field.startswith("settings")
        return
    orjson.dumps(parsed.to_json())  # every answer showing the workspace serializes this
    # alias times derived from the settings go into BIGINT columns
    assert parsed.alias.delay_seconds * 1000 + (1 << 42) <= INT64[1]
    assert (1 << 42) - parsed.alias.max_window_days * 86_400_000 >= INT64[0]
    buckets = TokenBuckets()
    for _ in range(3):  # the third request at the latest finds a burst of 1 or 2 empty
        try:
            buckets.take("ws", parsed.rate_limit)
        except Throttled as exc:
            assert 1 <= exc.retry_after_s < 1 << 31


# --- calculated attributes: definitions and seeds -------------------------------------------------------------

ca_definitions = st.fixed_dictionaries({
    "calculation_type": st.sampled_from(sorted(CALCULATION_TYPES)),
    "data_point": st.fixed_dictionaries({"event_type": st.sampled_from(sorted(EVENT_TYPES_FOR_CA))}, optional={
        "event_name": names, "attribute_name": st.sampled_from(["amount", "data.product_action.total_amount"])}),
}, optional={
    "conditions": st.lists(st.fixed_dictionaries({"attribute_name": st.just("category"),
                                                  "operator": st.sampled_from(sorted(OPERATORS)),
                                                  "values": st.lists(names | numbers, max_size=2)}), max_size=2),
    "time_period": st.sampled_from([{"type": "all_time"}, {"type": "within_last", "value": 7, "unit": "days"},
                                    {"type": "since", "date": "2024-01-01"}, {"type": "since", "date": 0}]),
})
ca_seeds = st.fixed_dictionaries({"seeds": st.lists(st.fixed_dictionaries(
    {"mpid": st.integers(*INT64), "value": numbers | names | st.lists(names, max_size=2),
     "as_of": st.sampled_from([0, "2024-05-01T10:00:00+02:00"])},
    optional={"count": st.integers(1, 1000) | st.sampled_from([(1 << 63) - 1, 1 << 63, (1 << 64) - 1]),
              "values": st.lists(names, max_size=2)}), min_size=1, max_size=3)})


@FUZZ
@given(ca_definitions | mutated(ca_definitions) | json_values)
def test_calculated_attribute_definitions_parse_or_raise_a_client_error(raw: Any) -> None:
    try:
        definition = parse_definition(raw)
    except BadRequest as exc:
        assert exc.field
        return
    since = definition.time_period.since_ms
    assert since is None or INT64[0] <= since <= INT64[1]


@FUZZ
@given(ca_seeds | mutated(ca_seeds) | json_values, st.sampled_from(sorted(CALCULATION_TYPES)))
def test_calculated_attribute_seeds_parse_or_raise_a_client_error(body: Any, calculation: str) -> None:
    try:
        seeds = parse_seeds(body, calculation)
    except BadRequest as exc:
        assert exc.field
        return
    for seed in seeds:  # the seeds table's BIGINT columns
        assert INT64[0] <= seed.as_of_ms <= INT64[1] and (seed.count is None or seed.count <= INT64[1])


# --- the SQL guard ---------------------------------------------------------------------------------------------

SQL_WORDS = ["SELECT", "*", "FROM", "profiles", "events", "WHERE", "1", "=", "(", ")", ",", ";", "WITH", "x", "AS",
             "read_csv('a.csv')", "'/etc/passwd'", "JOIN", "UNION", "ALL", "VALUES", "PIVOT", "ON", "USING", "DESCRIBE",
             "SHOW", "ATTACH", "COPY", "INSERT", "INTO", "LIMIT", "nextval('s')", "main.profiles", "lambda", "->", "[",
             "]", "{", "}", ":", "\"", "'", "--", "/*", "*/", "$1", "?", "RECURSIVE", "SUMMARIZE", "\x00", "\\"]
sql_texts = st.text(max_size=60) | st.lists(st.sampled_from(SQL_WORDS) | st.text(max_size=4), max_size=14).map(" ".join)


@pytest.fixture(scope="module")
def sql_cursor() -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect()
    connection.execute("CREATE VIEW profiles AS SELECT 1 AS mpid; CREATE VIEW events AS SELECT 1 AS mpid")
    try:
        yield connection
    finally:
        connection.close()


@FUZZ
@given(sql_texts | leaves)
def test_sql_guard_accepts_or_refuses_any_text(sql_cursor: duckdb.DuckDBPyConnection, sql: Any) -> None:
    try:
        checked = check_select(sql_cursor, sql, ["profiles", "events"])
    except BadRequest as exc:
        assert exc.field == "sql"
        return
    assert checked.views <= {"profiles", "events"}


# --- the CSV importer --------------------------------------------------------------------------------------------

COMMON_COLUMNS = ["environment", "user_identities.email", "user_identities.customer_id", "user_identities.other2",
                  "device_info.ios_idfv", "user_attributes.tier"]
# per file suffix: the columns the file needs, and the others it may have
FILE_COLUMNS: dict[str, tuple[list[str], list[str]]] = {
    "-custom_event.csv": (["events.data.event_name"], [
        "events.data.timestamp_unixtime_ms", "events.data.custom_event_type", "events.data.custom_attributes.k"]),
    "-screen_view.csv": (["events.data.screen_name"], ["events.data.timestamp_unixtime_ms"]),
    "-commerce_event.csv": (["events.data.product_action.action"], [
        "events.data.timestamp_unixtime_ms", "events.data.currency_code", "events.data.product_action.total_amount",
        "events.data.product_action.checkout_step", "events.data.product_action.products.price",
        "events.data.product_action.products.position", "events.data.product_action.products.attributes.a"]),
    "-eventless.csv": ([], []),
}
CSV_COLUMNS = sorted({"mpid", *COMMON_COLUMNS, *(c for need, may in FILE_COLUMNS.values() for c in need + may)})
NUMERIC_COLUMNS = ("mpid", "timestamp_unixtime_ms", "total_amount", "checkout_step", "price", "position")
text_cells = st.text(max_size=8) | st.sampled_from(["", " ", "a@b.io", "null"])
numeric_cells = st.sampled_from(["", "1", "-1", "1.5", " 7 ", "1e999", "9" * 30, "-" + "9" * 25, "9" * 5000,
                                 str(1 << 53), str((1 << 53) + 1), str(1 << 63), "0x1f", "١٢"]) | st.integers().map(str) \
    | st.floats().map(repr) | st.text(max_size=4)


@st.composite
def csv_files(draw: st.DrawFn) -> tuple[str, list[str], list[list[str]]]:
    """A file name suffix, a header the importer accepts (in any order), and rows of mostly that width with
    cells that suit their column, or not."""
    suffix = draw(st.sampled_from(sorted(FILE_COLUMNS)))
    needed, optional = FILE_COLUMNS[suffix]
    identity = draw(st.sampled_from(["mpid", "user_identities.customer_id", "device_info.ios_idfv"]))
    extra = draw(st.lists(st.sampled_from(COMMON_COLUMNS + optional), unique=True, max_size=5))
    header = draw(st.permutations(list(dict.fromkeys([identity, *needed, *extra]))))
    row = st.tuples(*[numeric_cells if name.endswith(NUMERIC_COLUMNS) else text_cells for name in header]).map(list)
    odd_row = st.lists(text_cells, max_size=len(header) + 1)
    return suffix, header, draw(st.lists(row | odd_row, max_size=4))


@FUZZ
@given(st.lists(st.sampled_from(CSV_COLUMNS) | st.text(max_size=10), max_size=6),
       st.sampled_from(list(FILE_SUFFIXES.values())))
def test_csv_header_plans_or_lists_its_problems(names: list[str], event_type: str | None) -> None:
    try:
        columns = plan_header(names, event_type)
    except CsvFileError as exc:
        assert exc.errors and all(error.row == 1 for error in exc.errors)
        return
    assert [column.name for column in columns] == names


@settings(FUZZ, max_examples=150)
@given(csv_files())
def test_csv_rows_become_batches_or_row_errors(file: tuple[str, list[str], list[list[str]]]) -> None:
    """Whole files through the importer: each row is a batch parse_batch judges, or a RowError; nothing raises."""
    suffix, header, rows = file
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)

    async def sink(batches: list[EncodedBatch]) -> list[BatchOutcome]:
        outcomes = []
        for index, encoded in enumerate(batches):
            assert orjson.loads(encoded.json) == encoded.batch
            try:
                parse_batch(encoded.batch)
                outcomes.append(BatchOutcome(index, "accepted"))
            except BadRequest as exc:
                outcomes.append(BatchOutcome(index, "rejected", error=exc))
        return outcomes

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"fuzz{suffix}"
        path.write_text(text.getvalue(), encoding="utf-8")
        try:
            with CsvImport(path) as importer:
                summary = asyncio.run(importer.run(sink, max_batches=10))
        except CsvFileError as exc:
            assert exc.errors
            return
    assert summary.stored + summary.rejected == summary.rows


# --- regressions: each of these raised something other than the client error before its fix ------------------

def test_a_change_whose_identity_type_is_not_a_string_is_a_400(service: IdSyncService) -> None:
    """Before: TypeError (a list is unhashable) out of modify's validation, when called other than over HTTP."""
    workspace, mpids = _workspace(service, {})
    with pytest.raises(BadRequest) as caught:
        service.plan_modify(workspace, mpids[0], [{"identity_type": ["email"], "new_value": "x@y.io"}])
    assert caught.value.field == "identity_changes[0].identity_type"


def _import_rows(directory: Path, header: list[str], row: list[str]) -> tuple[list[dict[str, Any]], list[Any]]:
    path = directory / "regression-commerce_event.csv"
    with path.open("w", newline="", encoding="utf-8") as out:
        csv.writer(out, lineterminator="\n").writerows([header, row])
    stored: list[dict[str, Any]] = []
    errors: list[Any] = []

    async def sink(batches: list[EncodedBatch]) -> list[BatchOutcome]:
        stored.extend(b.batch for b in batches)
        return [BatchOutcome(index, "accepted") for index in range(len(batches))]

    with CsvImport(path) as importer:
        asyncio.run(importer.run(sink, max_batches=10, on_error=errors.append))
    return stored, errors


@pytest.mark.parametrize("column", ["events.data.timestamp_unixtime_ms", "events.data.product_action.checkout_step"])
def test_a_csv_integer_past_64_bits_is_a_row_error(tmp_path: Path, column: str) -> None:
    """Before: orjson's TypeError (Integer exceeds 64-bit range) stopped the whole import at that row."""
    header = ["mpid", "events.data.product_action.action", column]
    stored, errors = _import_rows(tmp_path, header, ["1", "purchase", "9" * 30])
    assert stored == [] and [(e.row, e.column) for e in errors] == [(2, column)]


def test_a_csv_amount_past_64_bits_becomes_a_float_as_in_json(tmp_path: Path) -> None:
    header = ["mpid", "events.data.product_action.action", "events.data.product_action.total_amount"]
    stored, errors = _import_rows(tmp_path, header, ["1", "purchase", "9" * 30])
    assert errors == [] and stored[0]["events"][0]["data"]["product_action"]["total_amount"] == 1e30
