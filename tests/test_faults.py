"""Fault tests (issue 7, part 5): the real `idmesh serve` killed while it starts up or folds its journal, writing
to a full disk, and losing write access to its database file.

What must hold every time: nothing acknowledged is lost, a write that cannot be made durable answers 503 with the
IDSync error body (never a 500, never a hang), and the database opens cleanly afterwards.

How the faults are made, without root and without mocks:
- SIGKILL at a phase of start-up: the server logs each phase (engine/store.py, engine/graph_loader.py); the test
  polls the log and kills as soon as the phase begins, then checks the phase had not ended.
- Disk full: once start-up is done the test lowers the running server's RLIMIT_FSIZE with prlimit(2). CPython
  ignores SIGXFSZ, so a write past the limit fails with EFBIG just as it would with ENOSPC on a full disk, and
  DuckDB reports it the same way ("Could not write file ...").
- Read-only: chmod. Root passes every permission check, so when the tests run as root the server is started
  without the capabilities that let it (dropped from its bounding set before exec): it then owns its files like
  any service account.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest
from live_server import free_port
from test_crash_recovery import ADMIN_TOKEN, REPO, Answer, Server, load_then_sigkill, profile_count

from engine.idsync import IdSyncService
from engine.store import open_database

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PR_CAPBSET_DROP = 24
CAP_SETPCAP = 8
FILE_CAPABILITIES = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
STAMP_MS = 1_700_000_000_000
MAX_WRITES = 5000              # bound on every write-until-refused loop, whatever happens
SMALL_CHECKPOINT = {"IDMESH_CHECKPOINT_THRESHOLD": "128KB"}  # a checkpoint every hundred writes or so


def _drop_file_capabilities() -> None:
    """preexec_fn: after exec, root holds only the capabilities left in its bounding set."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in FILE_CAPABILITIES:
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def permissions_bind_the_server() -> bool:
    if os.geteuid() != 0:
        return True
    effective = int(Path("/proc/self/status").read_text().split("CapEff:")[1].split()[0], 16)
    return bool(effective >> CAP_SETPCAP & 1)  # needed to drop capabilities from the bounding set


class FaultServer(Server):
    """test_crash_recovery.Server with extra environment, optionally bound by file permissions even as root."""

    def __init__(self, db_path: Path, log_path: Path, env: dict[str, str] | None = None,
                 bound_by_permissions: bool = False) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        drop = _drop_file_capabilities if bound_by_permissions and os.geteuid() == 0 else None
        self.process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--db", str(db_path)],
            cwd=REPO, env=dict(os.environ, IDMESH_ADMIN_TOKEN=ADMIN_TOKEN, **(env or {})), stdout=self.log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=drop)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill_when_logged(self, line: str) -> None:
        """SIGKILL as soon as `line` is in the log; fails if start-up finishes or the server exits first."""
        while line not in (text := self.log_text()):
            assert self.process.poll() is None, f"exited with {self.process.returncode}: {text[-2000:]}"
            assert "idmesh serving" not in text, f"start-up finished before {line!r}: {text[-2000:]}"
            time.sleep(0.002)
        self.sigkill()
        assert self.process.returncode == -signal.SIGKILL

    def exit_status(self) -> int:
        return self.process.wait(timeout=60)

    def limit_file_size(self, limit: int) -> None:
        """Soft limit only: lifting it again needs no privilege."""
        resource.prlimit(self.process.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


@dataclass
class Workspace:
    id: str
    auth: tuple[str, str]


def create_workspace(server: Server, settings: dict[str, Any] | None = None) -> Workspace:
    with httpx.Client(base_url=server.base_url, timeout=15) as http:
        created = http.post("/platform/v2/workspaces", headers=ADMIN, json={"name": "faults", "settings": settings or {}})
    assert created.status_code == 201, created.text
    body = created.json()
    return Workspace(body["id"], (body["api_key"], body["api_secret"]))


def identify(http: httpx.Client, identities: dict[str, str]) -> httpx.Response:
    return http.post("/v1/identify", json={"environment": "production", "known_identities": identities})


def write_until_refused(http: httpx.Client, tag: str, acknowledged: list[Answer]) -> httpx.Response:
    """Identify fresh devices until one is refused; every answer that came back 200 is recorded."""
    for n in range(MAX_WRITES):
        identities = {"ios_idfv": f"{tag}-{n}"}
        response = identify(http, identities)
        if response.status_code != 200:
            return response
        acknowledged.append(Answer("identify", identities, response.json()["mpid"]))
    raise AssertionError(f"{MAX_WRITES} writes were all acknowledged")


def check_answers(server: Server, workspace: Workspace, acknowledged: list[Answer]) -> None:
    """Each identity of every acknowledged answer still finds the acknowledged MPID, and the server writes."""
    lost = []
    with httpx.Client(base_url=server.base_url, auth=workspace.auth, timeout=15) as http:
        for answer in acknowledged:
            for key, value in answer.identities.items():
                found = http.post("/v1/search", json={"known_identities": {key: value}})
                if found.status_code != 200 or found.json()["mpid"] != answer.mpid:
                    lost.append(f"{key}={value}: {found.status_code} {found.text} (acknowledged {answer.mpid})")
        assert not lost, f"{len(lost)} acknowledged identities lost, e.g. {lost[:5]}"
        assert identify(http, {"ios_idfv": "written-after-the-restart"}).status_code == 200
    assert profile_count(server, workspace.id) >= len({answer.mpid for answer in acknowledged})


def assert_unavailable(response: httpx.Response, message: str) -> None:
    """A 503 in the IDSync error body, whose message says why."""
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["ErrorCode"] == "SERVICE_UNAVAILABLE" and body["StatusCode"] == 503, body
    assert body["errors"] == body["Errors"] and message in body["errors"][0]["message"], body


def event_batches(tag: str, count: int) -> list[dict[str, Any]]:
    return [{"batch_id": f"{tag}-{n}", "environment": "production", "user_identities": {"customer_id": f"{tag}-{n}"},
             "events": [{"event_type": "custom_event", "data": {"event_name": "e", "custom_attributes": {"n": n}}}]}
            for n in range(count)]


def reopen_and_read_everything(db_path: Path) -> int:
    """Open the file as the server does, read every row of every table and checkpoint (a damaged file raises);
    returns the profile count."""
    connection = open_database(str(db_path))
    try:
        tables = [row[0] for row in connection.execute("SELECT table_name FROM duckdb_tables()").fetchall()]
        for table in tables:  # hashing the whole row reads every column of every row
            connection.execute(f'SELECT count(*), sum(hash(t)) FROM "{table}" AS t').fetchall()
        connection.execute("CHECKPOINT")
        return connection.execute("SELECT count(*) FROM profiles").fetchone()[0]
    finally:
        connection.close()


# --- SIGKILL during start-up and during the journal fold ----------------------------------------------------

FINGERPRINT = """SELECT (SELECT count(*) FROM profiles),
                        (SELECT sum(hash(scope, mpid, created_ms, first_seen_ms, status)) FROM profiles),
                        (SELECT count(*) FROM identities),
                        (SELECT sum(hash(scope, mpid, identity_type, value, raw_value, added_ms)) FROM identities)"""


def generate_population(db_path: Path, profiles: int, journaled: int, settings: dict[str, Any]
                        ) -> tuple[Workspace, tuple]:
    """A workspace made through the engine, then `profiles` profiles (customerid and email each) written straight
    into the base tables and `journaled` more (customerid only) left in the write journal, as a run killed before
    its fold leaves them: SQL makes a million rows in a second where the API would take minutes. MPIDs are
    1..profiles+journaled. The file is closed cleanly (no WAL). Returns the workspace and the fingerprint of
    every profile and identity."""
    service = IdSyncService.open(str(db_path))
    try:
        created, batch = service.workspaces.plan_create("faults", settings)
        asyncio.run(service.commit(batch))
    finally:
        service.close()
    scope = created.workspace.id
    connection = open_database(str(db_path))
    try:
        connection.execute("INSERT INTO profiles_base SELECT ?, i, ?, ?, ?, 'active' FROM range(1, ?) AS t(i)",
                           [scope, STAMP_MS, STAMP_MS, STAMP_MS, profiles + 1])
        connection.execute("""INSERT INTO identities_base
            SELECT ?, i, 'customerid', 'cust-' || i, 'cust-' || i, ? FROM range(1, ?) AS t(i) UNION ALL
            SELECT ?, i, 'email', 'user' || i || '@example.com', 'user' || i || '@example.com', ?
            FROM range(1, ?) AS t(i)""", [scope, STAMP_MS, profiles + 1, scope, STAMP_MS, profiles + 1])
        first, end = profiles + 1, profiles + journaled + 1
        connection.execute("""INSERT INTO write_journal
            SELECT 2 * i, 'profile', json_array(?, i, ?, ?, ?, 'active')::VARCHAR FROM range(?, ?) AS t(i) UNION ALL
            SELECT 2 * i + 1, 'identity_add', json_array(?, i, 'customerid', 'cust-' || i, 'cust-' || i, ?)::VARCHAR
            FROM range(?, ?) AS t(i)""", [scope, STAMP_MS, STAMP_MS, STAMP_MS, first, end, scope, STAMP_MS, first, end])
        population = connection.execute(FINGERPRINT).fetchone()
    finally:
        connection.close()
    return Workspace(scope, (created.workspace.api_key, created.api_secret)), population


def fingerprint(db_path: Path) -> tuple:
    connection = open_database(str(db_path))
    try:
        return connection.execute(FINGERPRINT).fetchone()
    finally:
        connection.close()


def check_generated_sample(server: Server, workspace: Workspace, profiles: int, journaled: int) -> None:
    """Identify and search answer the generated MPID for profiles spread over the base tables and the journal."""
    in_base = sorted({1, 2, profiles // 3, profiles // 2, profiles - 1, profiles} | set(range(7, profiles, profiles // 40)))
    in_journal = sorted({profiles + 1, profiles + journaled // 2, profiles + journaled}) if journaled else []
    with httpx.Client(base_url=server.base_url, auth=workspace.auth, timeout=15) as http:
        for i in in_base:
            answer = identify(http, {"customerid": f"cust-{i}", "email": f"user{i}@example.com"})
            assert answer.status_code == 200 and answer.json()["mpid"] == str(i), answer.text
            found = http.post("/v1/search", json={"known_identities": {"email": f"user{i}@example.com"}})
            assert found.status_code == 200 and found.json()["mpid"] == str(i), found.text
        for i in in_journal:
            answer = identify(http, {"customerid": f"cust-{i}"})
            assert answer.status_code == 200 and answer.json()["mpid"] == str(i), answer.text


def test_sigkill_during_startup_fold_and_graph_load_loses_nothing(tmp_path: Path) -> None:
    """Kill while start-up folds the journal a dead run left, then while it loads the identity graphs; the third
    start serves the generated profiles, and the file holds exactly the profiles and identities it held before."""
    db_path = tmp_path / "db.duckdb"
    profiles, journaled = 200_000, 60_000
    workspace, before = generate_population(db_path, profiles, journaled, {"strategy": "profile_conversion"})
    assert before[0] == profiles + journaled and before[2] == 2 * profiles + journaled

    folding = FaultServer(db_path, tmp_path / "folding.log")
    folding.kill_when_logged(f"folding {2 * journaled} write-journal rows")
    assert "folded the write journal" not in folding.log_text()  # killed inside the fold's transaction
    folding.stop()

    loading = FaultServer(db_path, tmp_path / "loading.log")
    loading.kill_when_logged("loading the identity graphs")
    assert "loaded the identity graphs" not in loading.log_text()
    loading.stop()

    server = FaultServer(db_path, tmp_path / "serving.log")
    try:
        server.wait_healthy()
        assert profile_count(server, workspace.id) == profiles + journaled
        check_generated_sample(server, workspace, profiles, journaled)
    finally:
        server.stop()
    assert fingerprint(db_path) == before  # identify touched last_seen_ms only, which the fingerprint leaves out


def ledger_rows(db_path: Path) -> tuple[int, int]:
    """(rows folded into identity_changes_base, rows in the identity_changes view), read without writing."""
    connection = duckdb.connect(str(db_path), read_only=True)  # replays the WAL in memory, changes no file
    try:
        return connection.execute("SELECT (SELECT count(*) FROM identity_changes_base), "
                                  "(SELECT count(*) FROM identity_changes)").fetchone()
    finally:
        connection.close()


def test_sigkill_during_journal_folds_loses_no_acknowledged_answer(tmp_path: Path) -> None:
    """IDMESH_FOLD_ROWS=1 makes a fold due after every commit, so under load the fold thread folds back to back
    and the SIGKILL most likely lands inside a fold (8 kills out of 8 did, traced once by hand; the test itself
    sees only that folds committed during each load). Load and kill twice (the second start replays and folds
    what the first kill left), then a server with the default threshold checks every acknowledged answer."""
    db_path, log_path = tmp_path / "db.duckdb", tmp_path / "server.log"
    workspace, _ = generate_population(db_path, 20_000, 0, {"strategy": "profile_conversion"})
    acknowledged: list[Answer] = []
    ledger_at_start = 0  # start-up folds the whole journal
    for round_no in range(2):
        loaded = FaultServer(db_path, log_path, {"IDMESH_FOLD_ROWS": "1"})
        try:
            loaded.wait_healthy()
            acknowledged += load_then_sigkill(loaded, workspace.auth, round_no).acknowledged
        finally:
            loaded.stop()
        folded, ledger = ledger_rows(db_path)
        assert folded > ledger_at_start, "no fold committed during the load"
        ledger_at_start = ledger
    checking = FaultServer(db_path, log_path)
    try:
        checking.wait_healthy()
        check_answers(checking, workspace, acknowledged)
    finally:
        checking.stop()
    log = log_path.read_text(errors="replace")
    for trouble in ("Traceback", "commit failed", "journal fold failed"):
        assert trouble not in log, log[-3000:]


# --- disk full --------------------------------------------------------------------------------------------------

def check_reads(http: httpx.Client, workspace: Workspace, acknowledged: list[Answer]) -> None:
    """Reads answer from memory and DuckDB while writes cannot be made durable."""
    for answer in acknowledged[:: max(1, len(acknowledged) // 20)]:
        found = http.post("/v1/search", json={"known_identities": answer.identities})
        assert found.status_code == 200 and found.json()["mpid"] == answer.mpid, found.text
    mpid = acknowledged[0].mpid
    profile = http.get(f"/userprofile/v1/1/1/{workspace.id}/{mpid}", params={"fields": "device_identities"})
    assert profile.status_code == 200 and profile.json()["device_identities"], profile.text
    counted = http.post("/v1/sql", json={"sql": "SELECT count(*) AS n FROM profiles"})
    assert counted.status_code == 200 and counted.json()["rows"] == [[len(acknowledged)]], counted.text
    assert http.get("/healthz").status_code == 200


def test_disk_full_answers_503_keeps_reads_and_loses_nothing(tmp_path: Path) -> None:
    """Writes past the file size limit fail in DuckDB's WAL append: the requests get 503, reads go on, and once
    space is back the same process writes again. After a SIGKILL and restart every acknowledged answer holds,
    the refused writes left nothing behind, and the file reads back whole."""
    db_path = tmp_path / "db.duckdb"
    server = FaultServer(db_path, tmp_path / "server.log")
    restarted: FaultServer | None = None
    acknowledged: list[Answer] = []
    try:
        server.wait_healthy()
        workspace = create_workspace(server)
        with httpx.Client(base_url=server.base_url, auth=workspace.auth, timeout=15) as http:
            for n in range(20):
                answer = identify(http, {"ios_idfv": f"before-{n}"})
                assert answer.status_code == 200, answer.text
                acknowledged.append(Answer("identify", {"ios_idfv": f"before-{n}"}, answer.json()["mpid"]))
            server.limit_file_size(Path(f"{db_path}.wal").stat().st_size + 64 * 1024)
            refused = write_until_refused(http, "full", acknowledged)
            assert_unavailable(refused, "the write could not be made durable")
            assert "File too large" in refused.text
            assert_unavailable(http.post("/v2/bulkevents", json=event_batches("full", 50)), "could not be made durable")
            check_reads(http, workspace, acknowledged)
            server.limit_file_size(resource.RLIM_INFINITY)
            again = identify(http, {"ios_idfv": "after-full"})
            assert again.status_code == 200, again.text
            acknowledged.append(Answer("identify", {"ios_idfv": "after-full"}, again.json()["mpid"]))
        server.sigkill()
        restarted = FaultServer(db_path, tmp_path / "server.log")
        restarted.wait_healthy()
        check_answers(restarted, workspace, acknowledged)
        restarted.stop()
        restarted = None
        # the refused identifies created nobody (check_answers identified one more device)
        assert reopen_and_read_everything(db_path) == len(acknowledged) + 1
        assert "Traceback" not in server.log_text()
    finally:
        server.stop()
        if restarted is not None:
            restarted.stop()


def test_checkpoint_on_a_full_disk_answers_503_until_restart(tmp_path: Path) -> None:
    """A checkpoint that cannot grow the file is fatal to DuckDB: it invalidates the database (the commit that
    triggered it is durable all the same). Every request then answers 503, /healthz too, so a supervisor
    restarts the server; after the restart every acknowledged answer holds."""
    db_path = tmp_path / "db.duckdb"
    server = FaultServer(db_path, tmp_path / "server.log", SMALL_CHECKPOINT)
    restarted: FaultServer | None = None
    acknowledged: list[Answer] = []
    try:
        server.wait_healthy()
        workspace = create_workspace(server)
        with httpx.Client(base_url=server.base_url, auth=workspace.auth, timeout=15) as http:
            server.limit_file_size(db_path.stat().st_size)  # the WAL stays below it; the database cannot grow
            refused = write_until_refused(http, "checkpoint", acknowledged)
            assert_unavailable(refused, "must be restarted")
            assert acknowledged, "the first write was already refused"
            found = http.post("/v1/search", json={"known_identities": acknowledged[0].identities})
            assert_unavailable(found, "must be restarted")  # the graph can no longer be reloaded from the file
            assert_unavailable(http.post("/v2/bulkevents", json=event_batches("checkpoint", 5)), "must be restarted")
            assert_unavailable(http.get("/healthz"), "must be restarted")
        assert "autocheckpoint failed" in server.log_text() and "Traceback" not in server.log_text()
        server.sigkill()
        restarted = FaultServer(db_path, tmp_path / "server.log")
        restarted.wait_healthy()
        check_answers(restarted, workspace, acknowledged)
        restarted.stop()
        restarted = None
        assert reopen_and_read_everything(db_path) >= len(acknowledged)
    finally:
        server.stop()
        if restarted is not None:
            restarted.stop()


# --- read-only database ------------------------------------------------------------------------------------------

def make_writable(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            path.chmod(0o755 if path.is_dir() else 0o644)


needs_permissions = pytest.mark.skipif(not permissions_bind_the_server(),
                                       reason="root without CAP_SETPCAP cannot give up its power over file permissions")


@needs_permissions
def test_read_only_database_stops_start_up_with_a_clear_message(tmp_path: Path) -> None:
    """A server that could not write would look healthy and refuse every write, so start-up stops instead: exit
    status 1 and one line naming the file or directory. With write access back it serves the same data."""
    data = tmp_path / "data"
    data.mkdir()
    db_path = data / "db.duckdb"
    workspace, _ = generate_population(db_path, 1000, 0, {})
    for target, mode, reason in ((db_path, 0o444, f"{db_path} cannot be read and written"),
                                 (data, 0o555, f"the directory {data} is not writable")):
        log_path = tmp_path / f"refused-{target.name}.log"
        target.chmod(mode)
        refused = FaultServer(db_path, log_path, bound_by_permissions=True)
        try:
            assert refused.exit_status() == 1
        finally:
            refused.stop()
            make_writable(target)
        log = log_path.read_text()
        assert f"idmesh: cannot serve {db_path}: {reason}" in log and "Traceback" not in log, log
    server = FaultServer(db_path, tmp_path / "server.log", bound_by_permissions=True)
    try:
        server.wait_healthy()
        check_generated_sample(server, workspace, 1000, 0)
    finally:
        server.stop()


@needs_permissions
def test_database_made_read_only_while_serving(tmp_path: Path) -> None:
    """chmod does not reach the files DuckDB already holds open. With no WAL open (a cleanly closed file), the
    next commit must create one and cannot: 503, and writes resume once the directory is writable again. With
    the WAL open, writes go on being acknowledged (they are durable) until a checkpoint must delete the WAL:
    that is fatal to DuckDB, and every request answers 503 until a restart. Nothing acknowledged is lost."""
    data = tmp_path / "data"
    data.mkdir()
    db_path, wal = data / "db.duckdb", data / "db.duckdb.wal"
    workspace, _ = generate_population(db_path, 1000, 0, {})
    server = FaultServer(db_path, tmp_path / "server.log", SMALL_CHECKPOINT, bound_by_permissions=True)
    restarted: FaultServer | None = None
    acknowledged: list[Answer] = []
    try:
        server.wait_healthy()
        assert not wal.exists(), "start-up wrote to a cleanly closed file"
        with httpx.Client(base_url=server.base_url, auth=workspace.auth, timeout=15) as http:
            data.chmod(0o555)
            assert_unavailable(identify(http, {"ios_idfv": "no-wal"}), "Permission denied")
            for i in (1, 500, 1000):  # reads answer; an identify would be a write (it touches last_seen)
                found = http.post("/v1/search", json={"known_identities": {"email": f"user{i}@example.com"}})
                assert found.status_code == 200 and found.json()["mpid"] == str(i), found.text
            assert http.get("/healthz").status_code == 200  # nothing to restart for
            make_writable(data)
            resumed = identify(http, {"ios_idfv": "resumed"})
            assert resumed.status_code == 200, resumed.text
            acknowledged.append(Answer("identify", {"ios_idfv": "resumed"}, resumed.json()["mpid"]))

            assert wal.exists()
            for path, mode in ((data, 0o555), (db_path, 0o444), (wal, 0o444)):
                path.chmod(mode)
            refused = write_until_refused(http, "read-only", acknowledged)
            assert_unavailable(refused, "must be restarted")
            assert len(acknowledged) > 1, "DuckDB stopped writing at the chmod"
            assert_unavailable(http.get("/healthz"), "must be restarted")
        assert "Could not remove file" in server.log_text()
        server.sigkill()
        make_writable(data, db_path, wal)
        restarted = FaultServer(db_path, tmp_path / "server.log")
        restarted.wait_healthy()
        check_answers(restarted, workspace, acknowledged)
        restarted.stop()
        restarted = None
        assert reopen_and_read_everything(db_path) >= 1000 + len(acknowledged)
    finally:
        make_writable(data, db_path, wal)
        server.stop()
        if restarted is not None:
            restarted.stop()
