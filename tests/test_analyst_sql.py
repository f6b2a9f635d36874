"""Analyst SQL (POST /v1/sql) over real HTTP against a real DuckDB file: read-only by construction, one workspace's
credentials see only its rows, limits, timeouts and every answer format."""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
from live_server import ADMIN_TOKEN, IdSyncClient, LiveServer, WorkspaceCredentials

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class Tenant:
    credentials: WorkspaceCredentials
    mpids: list[int]

    @property
    def id(self) -> str:
        return self.credentials.id

    @property
    def auth(self) -> tuple[str, str]:
        return self.credentials.api_key, self.credentials.api_secret


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("analyst") / "idmesh.duckdb").start()
    yield server
    client = _clients.pop(server.port, None)
    if client is not None:
        client.close()
    server.stop()


def make_tenant(live: LiveServer, prefix: str, people: int) -> Tenant:
    credentials = live.create_workspace({"identity_priority": ["customerid", "email", "ios_idfv"]}, name=prefix)
    client = IdSyncClient(live, credentials)
    try:
        mpids = [int(client.identify({"customerid": f"{prefix}-{i}", "email": f"{prefix}{i}@example.com"})["mpid"])
                 for i in range(people)]
        batch = {"events": [{"event_type": "custom_event",
                             "data": {"event_name": "Played", "custom_event_type": "media",
                                      "custom_attributes": {"song": f"{prefix}-song", "plays": 3}}}],
                 "user_identities": {"customer_id": f"{prefix}-0"}, "user_attributes": {"tier": "gold"}}
        response = client.call("/v2/events", batch)
        assert response.status_code == 202, response.text
    finally:
        client.close()
    return Tenant(credentials, mpids)


@pytest.fixture(scope="module")
def tenants(live: LiveServer) -> tuple[Tenant, Tenant]:
    return make_tenant(live, "alpha", 6), make_tenant(live, "beta", 4)


_clients: dict[int, httpx.Client] = {}


def sql(live: LiveServer, query: str, *, auth: Any = None, headers: dict[str, str] | None = None,
        **body: Any) -> httpx.Response:
    """POST /v1/sql as the admin unless `auth` (Basic key, secret) or `headers` say otherwise."""
    if auth is None and headers is None:
        headers = ADMIN
    http = _clients.get(live.port)
    if http is None:  # one keep-alive client per server: a new connection per query would dominate the run time
        http = _clients[live.port] = live.client()
    return http.post("/v1/sql", json={"sql": query, **body}, auth=auth, headers=headers)


def rows_of(response: httpx.Response) -> list[list[Any]]:
    assert response.status_code == 200, response.text
    return response.json()["rows"]


def fingerprint(live: LiveServer) -> dict[str, Any]:
    """Everything a write could change: every table's rows (hashed), the catalog, and the instance settings that
    decide what queries may reach."""
    cursor = live.service.connection.cursor()
    try:
        catalog = cursor.execute(
            "SELECT database_name, schema_name, table_name, 'table' FROM duckdb_tables() "
            "UNION ALL SELECT database_name, schema_name, view_name, 'view' FROM duckdb_views() WHERE NOT internal "
            "UNION ALL SELECT database_name, schema_name, sequence_name, 'sequence' FROM duckdb_sequences() "
            "UNION ALL SELECT database_name, '', '', 'database' FROM duckdb_databases() "
            "UNION ALL SELECT database_name, schema_name, type_name, 'type' FROM duckdb_types() WHERE NOT internal "
            "UNION ALL SELECT database_name, schema_name, function_name, 'macro' FROM duckdb_functions() "
            "WHERE NOT internal ORDER BY ALL").fetchall()
        digest = "count(*), md5(coalesce(string_agg(t::VARCHAR, '|' ORDER BY t::VARCHAR), ''))"
        tables = {name: cursor.execute(f'SELECT {digest} FROM main."{name}" AS t').fetchall()[0]
                  for _, schema, name, kind in catalog if kind == "table" and schema == "main"}
        settings = cursor.execute("SELECT name, value FROM duckdb_settings() WHERE name IN ('enable_external_access', "
                                  "'lock_configuration', 'threads', 'memory_limit') ORDER BY name").fetchall()
    finally:
        cursor.close()
    files = sorted(str(p) for p in live.db_path.parent.rglob("*") if not p.name.startswith(live.db_path.name))
    return {"catalog": catalog, "tables": tables, "settings": settings, "files": files}


# --- workspace isolation ---------------------------------------------------------------------------------------

def test_admin_sees_every_workspace(live: LiveServer, tenants: tuple[Tenant, Tenant]):
    alpha, beta = tenants
    got = rows_of(sql(live, f"SELECT scope, count(*) FROM profiles WHERE scope IN ('{alpha.id}', '{beta.id}') "
                            "GROUP BY scope ORDER BY 2 DESC"))
    assert got == [[alpha.id, 6], [beta.id, 4]]
    # qualified names are fine for the admin: nothing hides behind them
    assert rows_of(sql(live, f"SELECT count(*) FROM main.profiles WHERE scope = '{beta.id}'")) == [[4]]


def test_a_workspace_sees_only_its_own_rows(live: LiveServer, tenants: tuple[Tenant, Tenant]):
    alpha, beta = tenants
    ask = lambda query: rows_of(sql(live, query, auth=alpha.auth))  # noqa: E731
    assert ask("SELECT DISTINCT scope FROM profiles") == [[alpha.id]]
    assert sorted(r[0] for r in ask("SELECT mpid FROM profiles")) == sorted(alpha.mpids)
    assert ask("SELECT DISTINCT scope FROM identities") == [[alpha.id]]
    assert ask("SELECT DISTINCT workspace_id FROM identity_changes") == [[alpha.id]]
    for view in ("events", "batches", "user_attributes"):
        assert ask(f"SELECT DISTINCT workspace_id FROM {view}") == [[alpha.id]], view
    # Beta's people do not exist for Alpha, however the query reaches for them
    beta_list = ", ".join(str(m) for m in beta.mpids)
    for query in (f"SELECT count(*) FROM profiles WHERE mpid IN ({beta_list})",
                  f"SELECT count(*) FROM identities WHERE mpid IN ({beta_list}) OR value LIKE 'beta%'",
                  "SELECT count(*) FROM identities WHERE value LIKE 'beta%'",
                  "SELECT count(*) FROM (SELECT scope FROM profiles UNION ALL SELECT scope FROM identities) "
                  f"WHERE scope = '{beta.id}'",
                  f"WITH p AS (SELECT * FROM profiles) SELECT count(*) FROM p WHERE scope = '{beta.id}'",
                  "SELECT count(*) FROM events WHERE custom_attributes->>'song' = 'beta-song'",
                  f"SELECT count(*) FROM profiles WHERE EXISTS (SELECT 1 FROM identities WHERE mpid IN ({beta_list}))"):
        assert ask(query) == [[0]], query
    # and Beta sees only Beta
    assert rows_of(sql(live, "SELECT count(*), min(scope) FROM profiles", auth=beta.auth)) == [[4, beta.id]]


def test_summarize_and_describe_are_filtered_too(live: LiveServer, tenants: tuple[Tenant, Tenant]):
    alpha, _ = tenants
    summary = rows_of(sql(live, "SUMMARIZE SELECT scope FROM profiles", auth=alpha.auth))
    assert summary[0][0] == "scope" and summary[0][2] == alpha.id and summary[0][3] == alpha.id  # min, max
    described = rows_of(sql(live, "DESCRIBE profiles", auth=alpha.auth))
    assert [r[0] for r in described] == ["scope", "mpid", "created_ms", "first_seen_ms", "last_seen_ms", "status"]


def test_key_only_and_bad_credentials_are_refused(live: LiveServer, tenants: tuple[Tenant, Tenant]):
    alpha, _ = tenants
    with live.client() as http:
        # even a workspace that allows key-only auth for its SDKs: the client key is public
        keyed = live.create_workspace({"key_only_auth": True}, name="keyed")
        for headers in ({"x-mp-key": keyed.api_key}, {"x-mp-key": alpha.credentials.api_key}, {},
                        {"Authorization": "Bearer not-the-admin-token"}):
            response = http.post("/v1/sql", json={"sql": "SELECT 1"}, headers=headers)
            assert response.status_code == 401, (headers, response.text)
            assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
        response = http.post("/v1/sql", json={"sql": "SELECT 1"}, auth=(alpha.credentials.api_key, "wrong"))
        assert response.status_code == 401


def test_hmac_signed_request_reads_its_workspace(live: LiveServer, tenants: tuple[Tenant, Tenant]):
    alpha, _ = tenants
    body = json.dumps({"sql": "SELECT DISTINCT scope FROM profiles"}).encode()
    date = formatdate(usegmt=True)
    signature = hmac.new(alpha.credentials.api_secret.encode(), f"POST\n{date}\n/v1/sql".encode() + body,
                         hashlib.sha256).hexdigest()
    with live.client() as http:
        response = http.post("/v1/sql", content=body, headers={
            "x-mp-key": alpha.credentials.api_key, "Date": date, "x-mp-signature": signature})
    assert rows_of(response) == [[alpha.id]]


# --- read-only by construction ---------------------------------------------------------------------------------

ESCAPES = [
    ("INSERT INTO profiles_base SELECT * FROM profiles_base", "INSERT"),
    ("UPDATE workspaces SET name = 'owned'", "UPDATE"),
    ("DELETE FROM identities_base", "DELETE"),
    ("CREATE TABLE stolen AS SELECT * FROM workspaces", "CREATE"),
    ("CREATE TEMP VIEW profiles AS SELECT * FROM main.profiles", "CREATE"),
    ("DROP VIEW profiles", "DROP"),
    ("ATTACH 'other.duckdb' AS other", "ATTACH"),
    ("INSTALL httpfs", "LOAD"),
    ("LOAD httpfs", "LOAD"),
    ("COPY profiles TO 'profiles.csv'", "COPY"),
    ("COPY (SELECT * FROM workspaces) TO 'secrets.parquet' (FORMAT parquet)", "COPY"),
    ("EXPORT DATABASE 'dump'", "EXPORT"),
    ("PRAGMA database_list", "PRAGMA"),
    ("SET enable_external_access = true", "SET"),
    ("CALL pragma_version()", "CALL"),
    ("CHECKPOINT", "CALL"),
    ("BEGIN TRANSACTION", "TRANSACTION"),
    ("EXPLAIN ANALYZE SELECT * FROM profiles", "EXPLAIN"),
    ("UPDATE EXTENSIONS", "refused"),
    ("SELECT * FROM read_csv('/etc/passwd')", "read_csv"),
    ("SELECT * FROM read_text('/etc/passwd')", "read_text"),
    ("SELECT * FROM read_parquet('secrets.parquet')", "read_parquet"),
    ("SELECT * FROM glob('/*')", "glob"),
    ("SELECT * FROM duckdb_settings()", "duckdb_settings"),
    ("SELECT * FROM query_table('workspaces')", "query_table"),
    ("SELECT * FROM query('SELECT * FROM workspaces')", "query"),
    ("SELECT * FROM range(3)", "range"),
    ("FROM '/etc/passwd'", "/etc/passwd"),
    ("SELECT * FROM 'https://example.com/data.csv'", "https://example.com/data.csv"),
    ("SELECT * FROM write_journal", "write_journal"),
    ("SELECT * FROM profiles_base", "profiles_base"),
    ("SELECT secret_hash FROM workspaces", "workspaces"),
    ("SELECT * FROM profiles WHERE mpid IN (SELECT mpid FROM profiles_base)", "profiles_base"),
    ("SELECT (SELECT max(secret_sealed) FROM workspaces)", "workspaces"),
    ("SELECT list_transform([1], x -> (SELECT count(*) FROM workspaces))", "workspaces"),
    ("SELECT 1; DROP TABLE workspaces", "one statement"),
    ("SELECT 1; SELECT 2", "one statement"),
    ("SHOW TABLES", "SHOW"),
    ("DESCRIBE workspaces", "workspaces"),
    ("SELECT * FROM information_schema.tables", "information_schema.tables"),
    ("SELECT nextval('any_sequence')", "nextval"),
    ("SELECT current_setting('temp_directory')", "current_setting"),
    ("SELECT pg_get_viewdef(1)", "pg_get_viewdef"),
    ("SELECT stats(scope) FROM profiles", "stats"),  # column statistics span every workspace
    # CTEs cannot smuggle a name: a later CTE does not cover an earlier body, nor a sibling subquery
    ("WITH a AS (SELECT * FROM workspaces), workspaces AS (SELECT 1) SELECT * FROM a", "workspaces"),
    ("SELECT * FROM (WITH workspaces AS (SELECT 1 AS x) SELECT * FROM workspaces), workspaces", "workspaces"),
    ("WITH RECURSIVE workspaces AS (SELECT * FROM workspaces) SELECT * FROM workspaces", "workspaces"),
    # DuckDB folds identifier case in ASCII only: a CTE spelled with the KELVIN SIGN does not cover `workspaces`
    ('WITH "wor\u212aspaces" AS (SELECT 1 AS x) SELECT * FROM workspaces', "workspaces is not a public view"),
]


@pytest.mark.parametrize("caller", ["admin", "workspace"])
def test_every_escape_is_refused_and_nothing_changes(live: LiveServer, tenants: tuple[Tenant, Tenant], caller: str):
    alpha, _ = tenants
    auth = alpha.auth if caller == "workspace" else None
    before = fingerprint(live)
    for query, named in ESCAPES:
        response = sql(live, query, auth=auth)
        assert response.status_code == 400, (query, response.text)
        error = response.json()["errors"][0]
        assert error["code"] == "BAD_REQUEST" and error["field"] == "sql", (query, error)
        assert named in error["message"], (query, error["message"])
    assert fingerprint(live) == before


def test_a_workspace_cannot_name_the_unfiltered_views(live: LiveServer, tenants: tuple[Tenant, Tenant]):
    alpha, _ = tenants
    database = live.db_path.stem
    before = fingerprint(live)
    for query in ("SELECT * FROM main.profiles", f"SELECT * FROM {database}.main.profiles",
                  f"SELECT * FROM {database}.profiles", "SELECT * FROM temp.profiles",
                  "WITH profiles AS (SELECT * FROM main.profiles) SELECT * FROM profiles",
                  "SELECT * FROM profiles JOIN main.identities USING (mpid)"):
        response = sql(live, query, auth=alpha.auth)
        assert response.status_code == 400, (query, response.text)
        assert "qualified name" in response.json()["errors"][0]["message"]
    # a CTE named like a public view is only that CTE, and reads what its body reads
    shadow = "WITH identities AS (SELECT scope FROM profiles) SELECT DISTINCT scope FROM identities"
    assert rows_of(sql(live, shadow, auth=alpha.auth)) == [[alpha.id]]
    assert fingerprint(live) == before


def test_writes_after_queries_still_work(live: LiveServer):
    """The analyst connection's settings and temp views never reach the server's writer."""
    gamma = make_tenant(live, "gamma", 2)
    assert rows_of(sql(live, "SELECT count(*) FROM profiles", auth=gamma.auth)) == [[2]]
    client = IdSyncClient(live, gamma.credentials)
    try:
        mpid = client.identify({"customerid": "gamma-late"})["mpid"]
    finally:
        client.close()
    assert rows_of(sql(live, f"SELECT count(*) FROM profiles WHERE mpid = {mpid}", auth=gamma.auth)) == [[1]]
    cursor = live.service.connection.cursor()
    try:
        assert cursor.execute("SELECT count(*) FROM duckdb_views() WHERE temporary AND NOT internal").fetchall() == [(0,)]
        assert cursor.execute("SELECT current_setting('autoinstall_known_extensions')").fetchall() == [(False,)]
    finally:
        cursor.close()


# --- limits, timeouts, errors ----------------------------------------------------------------------------------

def test_limit_and_truncated(live: LiveServer, tenants: tuple[Tenant, Tenant]):
    alpha, _ = tenants
    cut = sql(live, "SELECT mpid FROM profiles ORDER BY mpid", auth=alpha.auth, limit=2).json()
    assert cut["row_count"] == 2 and cut["truncated"] is True and len(cut["rows"]) == 2
    assert [r[0] for r in cut["rows"]] == sorted(alpha.mpids)[:2]
    whole = sql(live, "SELECT mpid FROM profiles WHERE mpid IN ({})".format(", ".join(map(str, alpha.mpids))),
                auth=alpha.auth, limit=6).json()
    assert whole["row_count"] == 6 and whole["truncated"] is False
    for body, field in (({"limit": 0}, "limit"), ({"limit": 100_001}, "limit"), ({"limit": "many"}, "limit"),
                        ({"timeout_seconds": 0}, "timeout_seconds"), ({"timeout_seconds": 301}, "timeout_seconds"),
                        ({"format": "xml"}, "format"), ({"unknown": 1}, "unknown")):
        response = sql(live, "SELECT 1", **body)
        assert response.status_code == 400 and response.json()["errors"][0]["field"] == field, (body, response.text)


def test_a_slow_query_is_interrupted_at_its_timeout(live: LiveServer, tenants: tuple[Tenant, Tenant]):
    alpha, _ = tenants
    # ~20 ledger rows to the 8th power: far more work than any timeout here allows
    views = ", ".join(f"identity_changes AS c{i}" for i in range(8))
    slow = f"SELECT sum(c0.at_ms + c1.at_ms + c7.at_ms) FROM {views}"
    before = fingerprint(live)
    response = sql(live, slow, auth=alpha.auth, timeout_seconds=0.2)
    assert response.status_code == 400, response.text
    error = response.json()["errors"][0]
    assert error["code"] == "QUERY_TIMEOUT" and error["field"] == "timeout_seconds"
    assert "0.2 s timeout" in error["message"]
    assert rows_of(sql(live, "SELECT count(*) FROM profiles", auth=alpha.auth)) == [[len(alpha.mpids)]]
    assert fingerprint(live) == before


def test_query_errors_are_400_with_duckdb_message(live: LiveServer, tenants: tuple[Tenant, Tenant]):
    alpha, _ = tenants
    response = sql(live, "SELECT no_such_column FROM profiles", auth=alpha.auth)
    assert response.status_code == 400
    assert "no_such_column" in response.json()["errors"][0]["message"]
    response = sql(live, "SELEC 1")
    assert response.status_code == 400 and "syntax error" in response.json()["errors"][0]["message"]
    for blank_or_broken in ("   ", "--", "SELECT 1 /*"):
        response = sql(live, blank_or_broken)
        assert response.status_code == 400 and response.json()["errors"][0]["field"] == "sql", blank_or_broken
    with live.client() as http:  # a lone surrogate is not text DuckDB (UTF-8) could take
        response = http.post("/v1/sql", content=b'{"sql": "SELECT \'\\ud800\'"}', headers=ADMIN)
    assert response.status_code == 400, response.text
    # An error raised while reading rows can quote the row; DuckDB does not promise to filter by workspace
    # before evaluating the caller's expressions, so workspace credentials get the kind of error only.
    failing = "SELECT value::INTEGER FROM identities WHERE identity_type = 'customerid'"
    admin = sql(live, failing).json()["errors"][0]["message"]
    assert "Conversion Error" in admin and "Could not convert string" in admin
    withheld = sql(live, failing, auth=alpha.auth).json()["errors"][0]["message"]
    assert "ConversionException" in withheld and "withheld" in withheld and "alpha" not in withheld


# --- formats ---------------------------------------------------------------------------------------------------

TYPED = """SELECT mpid, 170141183460469231731687303715884105727::HUGEINT AS huge, 12.50::DECIMAL(10, 2) AS price,
                  TIMESTAMPTZ '2024-01-02 03:04:05.5+00' AS at, DATE '2024-01-02' AS day, INTERVAL 90 MINUTE AS took,
                  '{"a": [1, 2]}'::JSON AS doc, [1, 2] AS list, {'k': 'v'} AS struct, NULL AS nothing
           FROM profiles WHERE mpid = ?"""


def test_json_keeps_values_exact(live: LiveServer, tenants: tuple[Tenant, Tenant]):
    alpha, _ = tenants
    mpid = alpha.mpids[0]
    document = sql(live, TYPED.replace("?", str(mpid)), auth=alpha.auth).json()
    assert [c["type"] for c in document["columns"]] == [
        "BIGINT", "HUGEINT", "DECIMAL(10,2)", "TIMESTAMP WITH TIME ZONE", "DATE", "INTERVAL", "JSON", "INTEGER[]",
        "STRUCT(k VARCHAR)", '"NULL"']
    assert document["rows"] == [[mpid, 170141183460469231731687303715884105727, 12.5, "2024-01-02T03:04:05.500000+00:00",
                                 "2024-01-02", "PT5400S", {"a": [1, 2]}, [1, 2], {"k": "v"}, None]]
    assert document["row_count"] == 1 and document["truncated"] is False
    events = sql(live, "SELECT custom_attributes FROM events", auth=alpha.auth).json()
    assert events["rows"] == [[{"song": "alpha-song", "plays": 3}]]


def test_csv_and_parquet_answers(live: LiveServer, tenants: tuple[Tenant, Tenant]):
    alpha, _ = tenants
    mpid = alpha.mpids[0]
    query = TYPED.replace("?", str(mpid))
    response = sql(live, query, auth=alpha.auth, format="csv")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    assert response.headers["x-idmesh-row-count"] == "1" and response.headers["x-idmesh-truncated"] == "false"
    header, row = list(csv.reader(io.StringIO(response.text)))
    assert header == ["mpid", "huge", "price", "at", "day", "took", "doc", "list", "struct", "nothing"]
    assert row == [str(mpid), "170141183460469231731687303715884105727", "12.50", "2024-01-02T03:04:05.500000+00:00",
                   "2024-01-02", "PT5400S", '{"a": [1, 2]}', "[1,2]", '{"k":"v"}', ""]

    response = sql(live, "SELECT mpid, identity_type, value FROM identities ORDER BY mpid, identity_type",
                   auth=alpha.auth, format="parquet", limit=3)
    assert response.headers["content-type"] == "application/vnd.apache.parquet"
    table = pq.read_table(io.BytesIO(response.content))
    assert table.column_names == ["mpid", "identity_type", "value"] and table.num_rows == 3
    assert table.column("mpid").to_pylist()[0] == min(alpha.mpids)
    assert table.schema.metadata[b"idmesh.truncated"] == b"true"


def test_values_python_cannot_hold_are_answered_as_text(live: LiveServer):
    query = """SELECT 'infinity'::TIMESTAMP AS inf, '-infinity'::DATE AS ninf, '294247-01-10'::DATE AS far,
                      TIMESTAMP_NS '2024-01-01 00:00:00.123456789' AS ns, '101'::BIT AS bits, '12:00:00+02'::TIMETZ AS tz,
                      123456789012345678901234567890123456789012::BIGNUM AS big"""
    expected = ["infinity", "-infinity", "294247-01-10", "2024-01-01T00:00:00.123456789", "101", "12:00:00+02",
                "123456789012345678901234567890123456789012"]
    document = sql(live, query).json()
    assert document["rows"] == [expected]
    assert [c["type"] for c in document["columns"]][-3:] == ["BIT", "TIME WITH TIME ZONE", "BIGNUM"]
    assert list(csv.reader(io.StringIO(sql(live, query, format="csv").text)))[1] == expected
    # a value Parquet cannot hold is a clear 400, not a crash
    response = sql(live, "SELECT MAP {} AS nothing", format="parquet")
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "format"


def test_accept_header_chooses_the_format(live: LiveServer):
    with live.client() as http:
        as_csv = http.post("/v1/sql", json={"sql": "SELECT 1 AS one"}, headers={**ADMIN, "Accept": "text/csv"})
        assert as_csv.text == "one\n1\n"
        as_parquet = http.post("/v1/sql", json={"sql": "SELECT 1 AS one"},
                               headers={**ADMIN, "Accept": "application/vnd.apache.parquet"})
        assert pq.read_table(io.BytesIO(as_parquet.content)).to_pylist() == [{"one": 1}]
        # the body's format wins over Accept
        as_json = http.post("/v1/sql", json={"sql": "SELECT 1 AS one", "format": "json"},
                            headers={**ADMIN, "Accept": "text/csv"})
        assert as_json.json()["rows"] == [[1]]


def test_openapi_documents_the_endpoint(live: LiveServer):
    with live.client() as http:
        document = http.get("/openapi.json").json()
    schema = document["paths"]["/v1/sql"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["properties"]) == {"sql", "format", "limit", "timeout_seconds"}


def test_no_file_was_written_beside_the_database(live: LiveServer):
    written = [p.name for p in Path(live.db_path.parent).iterdir() if not p.name.startswith(live.db_path.name)]
    assert written == []
