"""CSV import (`idmesh import`): mParticle CSV layouts -> one Events API batch per row, into a real DuckDB file,
in-process and through the CLI both over HTTP (a live server owns the file) and directly (no server)."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest
from live_server import ADMIN_TOKEN, LiveServer, free_port

from engine.csv_import import CsvFileError, CsvImport, ImportSummary, RowError, ingestor_sink
from engine.idsync import IdSyncService
from engine.ingest import EventIngestor
from engine.workspaces import Workspace

REPO = Path(__file__).resolve().parents[1]
IDMESH = Path(sys.executable).parent / "idmesh"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


# --- helpers -------------------------------------------------------------------------------------------------

def write_csv(directory: Path, name: str, header: list[str], rows: list[list[str]]) -> Path:
    path = directory / name
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def create_workspace(db_path: Path, settings: dict[str, Any] | None = None, api_key: str | None = None) -> str:
    """A workspace in a DuckDB file no server holds, as `idmesh serve --config` makes them."""
    service = IdSyncService.open(str(db_path))
    try:
        created, batch = service.workspaces.plan_create("import test", settings or {"strategy": "profile_conversion"},
                                                        api_key=api_key)
        asyncio.run(service.commit(batch))
        service.workspaces.remember(created.workspace)
        return created.workspace.id
    finally:
        service.close()


@dataclass
class Store:
    """An open DuckDB file with one workspace, imported into in-process (as `idmesh import` does with no server)."""
    service: IdSyncService
    workspace: Workspace

    def import_file(self, path: Path, chunk: int = 500) -> tuple[ImportSummary, list[RowError]]:
        errors: list[RowError] = []
        with CsvImport(path) as job:
            # a fresh ingestor each time: replays are recognised from what the file holds, not from memory
            sink = ingestor_sink(EventIngestor(self.service), self.workspace)
            summary = asyncio.run(job.run(sink, chunk, on_error=errors.append))
        return summary, errors

    def rows(self, sql: str, *params: Any) -> list[tuple]:
        cursor = self.service.connection.cursor()
        try:
            return cursor.execute(sql, list(params)).fetchall()
        finally:
            cursor.close()

    def counts(self) -> tuple[int, ...]:
        return tuple(self.rows(f"SELECT count(*) FROM {view}")[0][0]
                     for view in ("batches", "events", "user_attributes", "identities", "profiles"))


@contextmanager
def open_store(db_path: Path, workspace_id: str) -> Iterator[Store]:
    service = IdSyncService.open(str(db_path))
    try:
        yield Store(service, service.workspaces.get(workspace_id))
    finally:
        service.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    db = tmp_path / "idmesh.duckdb"
    with open_store(db, create_workspace(db)) as opened:
        yield opened


def mpid_of(store: Store, identity_type: str, value: str) -> int | None:
    found = store.rows("SELECT mpid FROM identities WHERE identity_type = ? AND value = ?", identity_type, value)
    return found[0][0] if found else None


def run_cli(*args: str, token: str | None = ADMIN_TOKEN) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDMESH_")}
    if token is not None:
        env["IDMESH_ADMIN_TOKEN"] = token
    return subprocess.run([str(IDMESH), "import", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)


def read_errors(path: Path) -> list[tuple[int, str]]:
    with path.open(newline="") as report:
        return [(int(r["row"]), r["column"]) for r in csv.DictReader(report)]


def no_server_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # a port nothing listens on


# --- the four layouts and typed values -----------------------------------------------------------------------

def test_custom_event_rows_become_one_event_each_with_typed_values(store: Store, tmp_path: Path):
    path = write_csv(tmp_path, "shop-custom_event.csv",
                     ["environment", "user_identities.customer_id", "user_identities.email",
                      "events.data.timestamp_unixtime_ms", "events.data.event_name", "events.data.custom_event_type",
                      "events.data.custom_attributes.count", "user_attributes.age"],
                     [["development", "c-1", "Ada@Example.com", "1700000000000", "Search", "search", "42", "36"],
                      ["", "c-2", "", "1700000005000", "Share", "", "", ""]])
    summary, errors = store.import_file(path)
    assert (summary.rows, summary.stored, summary.duplicates, summary.rejected, errors) == (2, 2, 0, 0, [])
    assert summary.bytes_read == path.stat().st_size
    ada = mpid_of(store, "customerid", "c-1")
    assert mpid_of(store, "email", "ada@example.com") == ada is not None
    events = store.rows("""SELECT mpid, event_type, event_name, custom_event_type, timestamp_ms, environment,
                                  custom_attributes->>'count', json_type(custom_attributes->'count'),
                                  json_type(data->'timestamp_unixtime_ms')
                           FROM events ORDER BY timestamp_ms""")
    assert events[0] == (ada, "custom_event", "Search", "search", 1700000000000, "development", "42", "VARCHAR",
                         "UBIGINT")
    assert events[1][1:6] == ("custom_event", "Share", None, 1700000005000, "production")  # default environment
    batches = store.rows("SELECT source, event_count, timestamp_ms, source_request_id FROM batches ORDER BY timestamp_ms")
    assert [b[:3] for b in batches] == [("import", 1, 1700000000000), ("import", 1, 1700000005000)]
    assert all(b[3].startswith("csv-") for b in batches) and batches[0][3] != batches[1][3]
    # user attributes are strings, dated by the event (latest timestamp wins against live data)
    assert store.rows("SELECT mpid, name, value, updated_ms FROM user_attributes") == [
        (ada, "age", '"36"', 1700000000000)]


def test_commerce_event_holds_one_product_with_numeric_fields(store: Store, tmp_path: Path):
    path = write_csv(tmp_path, "orders-commerce_event.csv",
                     ["user_identities.customer_id", "events.data.timestamp_unixtime_ms", "events.data.currency_code",
                      "events.data.product_action.action", "events.data.product_action.transaction_id",
                      "events.data.product_action.total_amount", "events.data.product_action.checkout_step",
                      "events.data.product_action.products.id", "events.data.product_action.products.name",
                      "events.data.product_action.products.price", "events.data.product_action.products.quantity",
                      "events.data.product_action.products.attributes.colour",
                      "events.data.custom_attributes.channel"],
                     [["c-9", "1700000000000", "EUR", "purchase", "T-100", "39.98", "3", "0042", "Mug", "19.99", "2",
                       "blue", "web"],
                      ["c-9", "1700000001000", "", "add_to_cart", "", "", "", "7", "Cap", "5", "1.5", "", ""]])
    summary, errors = store.import_file(path)
    assert (summary.stored, errors) == (2, [])
    rows = store.rows("""SELECT event_type, data->>'currency_code', data->'product_action' FROM events
                         ORDER BY timestamp_ms""")
    assert rows[0][:2] == ("commerce_event", "EUR")
    assert json.loads(rows[0][2]) == {
        "action": "purchase", "transaction_id": "T-100", "total_amount": 39.98, "checkout_step": 3,
        "products": [{"id": "0042", "name": "Mug", "price": 19.99, "quantity": 2, "attributes": {"colour": "blue"}}]}
    assert json.loads(rows[1][2]) == {"action": "add_to_cart",
                                      "products": [{"id": "7", "name": "Cap", "price": 5, "quantity": 1.5}]}
    types = store.rows("""SELECT json_type(data->'product_action'->'products'->0->'price'),
                                 json_type(data->'product_action'->'products'->0->'id') FROM events
                          ORDER BY timestamp_ms LIMIT 1""")
    assert types == [("DOUBLE", "VARCHAR")]


def test_screen_view_rows_name_the_screen(store: Store, tmp_path: Path):
    path = write_csv(tmp_path, "app-screen_view.csv",
                     ["device_info.android_advertising_id", "events.data.screen_name",
                      "events.data.custom_attributes.referrer"],
                     [["38400000-8cf0-11bd-b23e-10b96e40000d", "Home", "push"]])
    summary, errors = store.import_file(path)
    assert (summary.stored, errors) == (1, [])
    mpid = mpid_of(store, "android_aaid", "38400000-8cf0-11bd-b23e-10b96e40000d")
    assert store.rows("SELECT mpid, event_type, event_name, custom_attributes->>'referrer' FROM events") == [
        (mpid, "screen_view", "Home", "push")]


def test_eventless_rows_set_identities_and_attributes_only(store: Store, tmp_path: Path):
    path = write_csv(tmp_path, "crm-eventless.csv",
                     ["user_identities.customerid", "user_identities.other2", "device_info.ios_idfv",
                      "user_attributes.$FirstName", "user_attributes.plan"],
                     [["c-1", "loyalty-7", "6F9619FF-8B86-D011-B42D-00C04FC964FF", "Ada", "gold"],
                      ["c-2", "", "", "Grace", ""]])
    summary, errors = store.import_file(path)
    assert (summary.stored, errors) == (2, [])
    ada = mpid_of(store, "customerid", "c-1")
    identities = store.rows("SELECT identity_type, value FROM identities WHERE mpid = ? ORDER BY 1", ada)
    # other2 is the IDSync spelling of the Events API's other_id_2 (mParticle's CSV documentation uses it)
    assert [t for t, _ in identities] == ["customerid", "ios_idfv", "other2"]
    assert store.rows("SELECT count(*) FROM events")[0][0] == 0
    assert store.rows("SELECT event_count, source FROM batches") == [(0, "import"), (0, "import")]
    attributes = store.rows("SELECT mpid, name, value FROM user_attributes ORDER BY mpid = ? DESC, name", ada)
    grace = mpid_of(store, "customerid", "c-2")
    assert attributes == [(ada, "$FirstName", '"Ada"'), (ada, "plan", '"gold"'), (grace, "$FirstName", '"Grace"')]


def test_spreadsheet_export_with_bom_and_crlf_reads_as_the_same_columns(store: Store, tmp_path: Path):
    path = tmp_path / "excel-screen_view.csv"
    path.write_bytes(b"\xef\xbb\xbfuser_identities.email,events.data.screen_name\r\nada@example.com,Home\r\n")
    summary, errors = store.import_file(path)
    assert (summary.stored, errors) == (1, [])
    assert store.rows("SELECT event_name FROM events") == [("Home",)]


def test_mpid_column_targets_an_existing_profile(store: Store, tmp_path: Path):
    store.import_file(write_csv(tmp_path, "seed-eventless.csv", ["user_identities.email"], [["ada@example.com"]]))
    ada = mpid_of(store, "email", "ada@example.com")
    path = write_csv(tmp_path, "by_mpid-screen_view.csv", ["mpid", "events.data.screen_name"],
                     [[str(ada), "Home"], ["12345", "Home"], ["not-a-number", "Home"]])
    summary, errors = store.import_file(path)
    assert (summary.stored, summary.rejected) == (1, 2)
    assert [(e.row, e.column) for e in errors] == [(3, "mpid"), (4, "mpid")]
    assert "12345 is not a profile" in errors[0].message
    assert store.rows("SELECT mpid, event_name FROM events") == [(ada, "Home")]
    assert store.rows("SELECT count(*) FROM profiles")[0][0] == 1


# --- bad rows ------------------------------------------------------------------------------------------------

def test_bad_rows_are_reported_by_row_and_column_and_write_nothing_while_good_rows_are_stored(
        store: Store, tmp_path: Path):
    header = ["environment", "user_identities.customer_id", "events.data.timestamp_unixtime_ms",
              "events.data.event_name", "user_attributes.note"]
    path = tmp_path / "mixed-custom_event.csv"
    lines = [
        ",".join(header),
        ",good-1,1700000000000,Open,",                    # 2
        ",bad-name,1700000000000,,note",                  # 3 no event name
        ",bad-time,yesterday,Open,",                      # 4 timestamp not a number
        ",bad-fields,1700000000000,Open",                 # 5 four fields for five columns
        "staging,bad-env,1700000000000,Open,",            # 6 not an environment
        ",,1700000000000,Open,orphan",                    # 7 no identity at all
        ",bad-big,1700000000000,Open," + "x" * (81 * 1024),  # 8 larger than 80 KB
        '"",bad-quote,1700000000000,"Op"en,',             # 9 not RFC 4180
        "",                                               # a blank line is skipped, not a row
        ',"good-2",1700000000001,"Close, then ""reopen""","two\nlines"',  # 11-12 quoted comma, quote and newline
        ",good-3,1700000000002,Open,",                    # 13
    ]
    raw = ("\n".join(lines) + "\n").encode() + b",bad-\xff-utf8,1700000000000,Open,\n"  # 14 not UTF-8
    path.write_bytes(raw)
    summary, errors = store.import_file(path)
    assert [(e.row, e.column) for e in errors] == [
        (3, "events.data.event_name"), (4, "events.data.timestamp_unixtime_ms"), (5, ""), (6, "environment"),
        (7, "user_identities"), (8, ""), (9, ""), (14, "")]
    assert "the row has 4 fields; the header has 5" in errors[2].message
    assert "80 KB" in errors[5].message and "UTF-8" in errors[7].message
    assert (summary.rows, summary.stored, summary.rejected) == (11, 3, 8)
    stored = store.rows("SELECT i.value, e.event_name FROM events AS e JOIN identities AS i USING (mpid) "
                        "ORDER BY e.timestamp_ms")
    assert stored == [("good-1", "Open"), ("good-2", 'Close, then "reopen"'), ("good-3", "Open")]
    # rejected rows made no profile, identity, batch or attribute
    assert store.counts() == (3, 3, 1, 3, 3)
    assert store.rows("SELECT value FROM user_attributes") == [('"two\\nlines"',)]


def test_rows_are_independent_across_chunks(store: Store, tmp_path: Path):
    rows = [[f"c-{n}", "" if n % 97 == 0 else "Open"] for n in range(1, 1201)]
    path = write_csv(tmp_path, "many-custom_event.csv", ["user_identities.customer_id", "events.data.event_name"], rows)
    summary, errors = store.import_file(path, chunk=250)
    bad_rows = [n + 1 for n in range(1, 1201) if n % 97 == 0]  # the header is row 1
    assert [e.row for e in errors] == bad_rows
    assert (summary.stored, summary.rejected) == (1200 - len(bad_rows), len(bad_rows))
    assert store.counts()[:2] == (summary.stored, summary.stored)


# --- header and file errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, header, column, words", [
    ("demo.csv", ["user_identities.email"], "", "file name must end with"),
    ("demo-purchase.csv", ["user_identities.email"], "", "file name must end with"),
    ("x-eventless.csv", ["user_identities.email", "user_identities.email"], "user_identities.email",
     "more than once"),
    ("x-eventless.csv", ["user_identities.email", "user_atributes.plan"], "user_atributes.plan", "unknown column"),
    ("x-eventless.csv", ["User_identities.email"], "User_identities.email", "unknown column"),
    ("x-eventless.csv", ["user_identities.email", "events.data.event_name"], "events.data.event_name",
     "identities and user attributes only"),
    ("x-custom_event.csv", ["mpid", "events.data.event_name", "events.data.screen_name"], "events.data.screen_name",
     "-screen_view.csv"),
    ("x-custom_event.csv", ["mpid", "events.data.event_name", "events.data.product_action.action"],
     "events.data.product_action.action", "-commerce_event.csv"),
    ("x-commerce_event.csv", ["mpid", "events.data.product_action.action", "events.data.product_action.products.sku"],
     "events.data.product_action.products.sku", "a product has"),
    ("x-custom_event.csv", ["mpid"], "events.data.event_name", "needs the column"),
    ("x-eventless.csv", ["user_attributes.plan"], "", "no identity column"),
    ("x-eventless.csv", ["user_identities.shoe_size"], "user_identities.shoe_size", "not a user identity type"),
    ("x-eventless.csv", ["device_info.ios_advertisng_id"], "device_info.ios_advertisng_id",
     "not a device identity type"),
    ("x-eventless.csv", ["user_identities.customer_id", "user_identities.customerid"], "user_identities.customerid",
     "same identity type"),
    ("x-eventless.csv", ["mpid"] + [f"user_attributes.a{n}" for n in range(49)], "", "fewer than 50"),
])
def test_header_errors_are_reported_before_any_row(tmp_path: Path, name: str, header: list[str], column: str,
                                                   words: str):
    path = write_csv(tmp_path, name, header, [["x"] * len(header)])
    with pytest.raises(CsvFileError) as raised:
        CsvImport(path)
    assert any(e.column == column and words in e.message for e in raised.value.errors), raised.value.errors
    assert all(e.row in (0, 1) for e in raised.value.errors)


def test_header_error_exits_2_and_writes_nothing(tmp_path: Path):
    db = tmp_path / "idmesh.duckdb"
    workspace_id = create_workspace(db)
    path = write_csv(tmp_path, "dup-eventless.csv", ["user_identities.email", "user_attributes.plan",
                                                     "user_attributes.plan"], [["a@example.com", "gold", "silver"]])
    errors = tmp_path / "errors.csv"
    result = run_cli(str(path), "--workspace", workspace_id, "--db", str(db), "--url", no_server_url(),
                     "--errors", str(errors))
    assert result.returncode == 2, result.stderr
    assert "nothing was written" in result.stderr and "more than once" in result.stderr
    assert read_errors(errors) == [(1, "user_attributes.plan")]
    with duckdb.connect(str(db)) as connection:
        assert connection.execute("SELECT (SELECT count(*) FROM batches) + (SELECT count(*) FROM identities)").fetchone() \
            == (0,)


# --- replays -------------------------------------------------------------------------------------------------

def test_reimporting_stores_nothing_twice_and_appended_rows_are_new(tmp_path: Path):
    db = tmp_path / "idmesh.duckdb"
    workspace_id = create_workspace(db)
    header = ["user_identities.customer_id", "events.data.event_name", "user_attributes.plan"]
    rows = [["c-1", "Open", "gold"], ["c-2", "Open", ""], ["c-1", "Open", ""], ["", "Open", ""]]  # last: rejected
    path = write_csv(tmp_path, "daily-custom_event.csv", header, rows)
    with open_store(db, workspace_id) as store:
        first, _ = store.import_file(path)
        counts = store.counts()
    assert (first.stored, first.duplicates, first.rejected) == (3, 0, 1)
    with open_store(db, workspace_id) as store:  # a new process: replay keys come from the file
        again, errors = store.import_file(path)
        assert (again.stored, again.duplicates, again.rejected) == (0, 3, 1)
        assert [e.row for e in errors] == [5]
        assert store.counts() == counts
        # the same rows under another name are the same rows; an appended one is new
        grown = write_csv(tmp_path, "renamed-custom_event.csv", header, rows + [["c-3", "Close", ""]])
        appended, _ = store.import_file(grown)
        assert (appended.stored, appended.duplicates) == (1, 3)
        assert store.rows("SELECT count(*), count(*) FILTER (WHERE event_name = 'Close') FROM events") == [(4, 1)]


# --- the HTTP endpoint ---------------------------------------------------------------------------------------

def test_import_endpoint_is_admin_only_per_workspace_and_answers_per_batch(server: LiveServer):
    workspace = server.create_workspace({"strategy": "profile_conversion"})
    path = f"/platform/v2/workspaces/{workspace.id}/events"
    good = {"user_identities": {"customer_id": "c-1"}, "source_request_id": "r-1",
            "events": [{"event_type": "custom_event", "data": {"event_name": "Open"}}]}
    bad = {"events": [{"event_type": "custom_event", "data": {"event_name": "Open"}}]}
    with server.client() as http:
        assert http.post(path, json=[good]).status_code == 401
        assert http.post(path, json=[good], auth=(workspace.api_key, workspace.api_secret)).status_code == 401
        assert http.post("/platform/v2/workspaces/ws_nope/events", json=[good], headers=ADMIN).status_code == 404
        assert http.post(path, json=[good] * 101, headers=ADMIN).status_code == 400
        mixed = http.post(path, json=[good, bad], headers=ADMIN)
        replay = http.post(path, json=[good], headers=ADMIN)
        all_bad = http.post(path, json=[bad], headers=ADMIN)
    assert mixed.status_code == 207, mixed.text
    assert [r["status"] for r in mixed.json()["results"]] == ["accepted", "rejected"]
    assert mixed.json()["results"][1]["error"]["field"] == "user_identities"
    assert replay.status_code == 202 and replay.json()["results"][0]["status"] == "duplicate"
    assert all_bad.status_code == 400 and all_bad.json()["results"][0]["status"] == "rejected"
    cursor = server.service.connection.cursor()
    assert cursor.execute("SELECT workspace_id, source, source_request_id FROM batches").fetchall() == [
        (workspace.id, "import", "r-1")]


# --- the CLI, both ways --------------------------------------------------------------------------------------

def test_cli_imports_over_http_while_a_server_owns_the_file(server: LiveServer, tmp_path: Path):
    workspace = server.create_workspace({"strategy": "profile_conversion"})
    # ~60 KB rows: five of them exceed one request's 256 KB, so the client must pack requests by size
    rows = [[f"c-{n}", "Open", "1700000000000", "x" * 60_000] for n in range(5)]
    rows += [[f"c-{n}", "Open", str(1700000000000 + n), ""] for n in range(5, 250)]
    rows.insert(3, ["c-bad", "", "1700000000000", ""])  # row 5: no event name
    path = write_csv(tmp_path, "web-custom_event.csv",
                     ["user_identities.customer_id", "events.data.event_name", "events.data.timestamp_unixtime_ms",
                      "events.data.custom_attributes.blob"], rows)
    errors = tmp_path / "errors.csv"
    missing_db = tmp_path / "not-used.duckdb"  # a direct write would fail: the server must get the rows
    result = run_cli(str(path), "--workspace", workspace.id, "--url", server.base_url, "--db", str(missing_db),
                     "--errors", str(errors))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"over {server.base_url}" in result.stdout and "250 stored" in result.stdout
    assert "1 rejected" in result.stdout and "row 5, events.data.event_name" in result.stderr
    assert read_errors(errors) == [(5, "events.data.event_name")]
    cursor = server.service.connection.cursor()
    assert cursor.execute("SELECT count(*), count(DISTINCT mpid) FROM events").fetchone() == (250, 250)
    assert cursor.execute("SELECT DISTINCT source FROM batches").fetchall() == [("import",)]
    assert cursor.execute("SELECT count(*) FROM identities WHERE value = 'c-bad'").fetchone() == (0,)
    assert not missing_db.exists()

    again = run_cli(str(path), "--workspace", workspace.id, "--url", server.base_url)
    assert again.returncode == 1 and "0 stored, 250 already imported, 1 rejected" in again.stdout
    assert cursor.execute("SELECT count(*) FROM batches").fetchone() == (250,)

    refused = run_cli(str(path), "--workspace", workspace.id, "--url", server.base_url, token="wrong")
    assert refused.returncode == 2 and "refused the admin token" in refused.stderr
    unknown = run_cli(str(path), "--workspace", "ws_nope", "--url", server.base_url)
    assert unknown.returncode == 2 and "no workspace ws_nope" in unknown.stderr


def test_cli_writes_the_file_directly_when_no_server_answers(tmp_path: Path):
    db = tmp_path / "idmesh.duckdb"
    workspace_id = create_workspace(db)
    path = write_csv(tmp_path, "orders-commerce_event.csv",
                     ["user_identities.email", "events.data.product_action.action",
                      "events.data.product_action.products.id", "events.data.product_action.products.price",
                      "events.data.product_action.products.quantity", "user_attributes.segment"],
                     [["ada@example.com", "purchase", "sku-1", "19.99", "2", "vip"],
                      ["grace@example.com", "refund", "sku-2", "5", "1", ""]])
    result = run_cli(str(path), "--workspace", workspace_id, "--db", str(db), "--url", no_server_url(), token=None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"into {db}" in result.stdout and "2 stored" in result.stdout
    with duckdb.connect(str(db)) as connection:
        events = connection.execute("""SELECT i.value, e.event_type, e.data->'product_action'->>'action',
                                          (e.data->'product_action'->'products'->0->>'price')::DOUBLE,
                                          json_array_length(e.data->'product_action'->'products')
                                   FROM events AS e JOIN identities AS i USING (mpid) ORDER BY 1""").fetchall()
        assert events == [("ada@example.com", "commerce_event", "purchase", 19.99, 1),
                          ("grace@example.com", "commerce_event", "refund", 5.0, 1)]
        assert connection.execute("SELECT DISTINCT source FROM batches").fetchall() == [("import",)]
        assert connection.execute("SELECT name, value FROM user_attributes").fetchall() == [("segment", '"vip"')]

    unknown = run_cli(str(path), "--workspace", "ws_nope", "--db", str(db), "--url", no_server_url())
    assert unknown.returncode == 2 and "ws_nope not found" in unknown.stderr
    no_db = run_cli(str(path), "--workspace", workspace_id, "--db", str(tmp_path / "none.duckdb"),
                    "--url", no_server_url())
    assert no_db.returncode == 2 and "no database" in no_db.stderr


def test_sample_files_import_cleanly_into_the_demo_workspace(tmp_path: Path):
    demo = json.loads((REPO / "data" / "demo.json").read_text())["workspaces"][0]
    db = tmp_path / "idmesh.duckdb"
    workspace_id = create_workspace(db, demo["settings"], api_key=demo["api_key"])
    samples = sorted((REPO / "data" / "samples").glob("*.csv"), key=lambda p: "eventless" not in p.name)
    assert len(samples) >= 2
    with open_store(db, workspace_id) as store:
        for sample in samples:
            summary, errors = store.import_file(sample)
            assert errors == [] and summary.stored == summary.rows > 0, sample.name


def test_http_and_direct_imports_store_the_same_rows(server: LiveServer, tmp_path: Path):
    """Both ways go through the same ingestor: the same file gives the same events and attributes."""
    sample = REPO / "data" / "samples" / "demo-custom_event.csv"
    workspace = server.create_workspace({"strategy": "profile_conversion"})
    over_http = run_cli(str(sample), "--workspace", workspace.id, "--url", server.base_url)
    assert over_http.returncode == 0, over_http.stderr
    db = tmp_path / "direct.duckdb"
    direct_id = create_workspace(db)
    direct = run_cli(str(sample), "--workspace", direct_id, "--db", str(db), "--url", no_server_url())
    assert direct.returncode == 0, direct.stderr
    query = """SELECT e.event_name, e.timestamp_ms, e.environment, e.custom_attributes::VARCHAR, a.value::VARCHAR
               FROM events AS e LEFT JOIN user_attributes AS a ON a.mpid = e.mpid AND a.name = 'plan'
               ORDER BY e.timestamp_ms"""
    from_http = server.service.connection.cursor().execute(query).fetchall()
    with duckdb.connect(str(db)) as connection:
        assert connection.execute(query).fetchall() == from_http
    assert len(from_http) == 5

