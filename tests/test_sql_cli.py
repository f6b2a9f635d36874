"""`idmesh sql` as a user runs it: a subprocess asking a live server, or reading the DuckDB file when no server
answers. Independent invocations run side by side: each one pays the interpreter's start-up."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from live_server import ADMIN_TOKEN, IdSyncClient, LiveServer, free_port

from api.cli import main

IDMESH = str(Path(sys.executable).parent / "idmesh")


def run_all(*invocations: list[str], token: str = ADMIN_TOKEN) -> list[subprocess.CompletedProcess[str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("IDMESH_URL", "IDMESH_DB")}
    env["IDMESH_ADMIN_TOKEN"] = token
    with ThreadPoolExecutor(len(invocations)) as pool:
        return list(pool.map(lambda argv: subprocess.run([IDMESH, "sql", *argv], capture_output=True, text=True,
                                                         env=env, timeout=120), invocations))


def populate(server: LiveServer) -> tuple[str, list[str]]:
    workspace = server.create_workspace(name="cli")
    client = IdSyncClient(server, workspace)
    try:
        mpids = [client.identify({"customerid": f"cli-{i}"})["mpid"] for i in range(3)]
    finally:
        client.close()
    return workspace.id, mpids


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, str, list[str]]]:
    server = LiveServer(tmp_path_factory.mktemp("cli-live") / "idmesh.duckdb").start()
    workspace_id, mpids = populate(server)
    yield server, workspace_id, mpids
    server.stop()


def test_asks_the_running_server(live: tuple[LiveServer, str, list[str]], tmp_path: Path):
    server, workspace_id, mpids = live
    query = f"SELECT mpid, identity_type, value FROM identities WHERE scope = '{workspace_id}' ORDER BY value"
    parquet_file = tmp_path / "out.parquet"
    nobody = f"http://127.0.0.1:{free_port()}"
    as_json, as_parquet, held = run_all(
        [query, "--url", server.base_url, "--format", "json"],
        [query, "--url", server.base_url, "--format", "parquet", "--output", str(parquet_file)],
        # no server at that address, and the file is the live server's: its lock keeps other processes out
        ["SELECT 1", "--url", nobody, "--db", str(server.db_path)])
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert [row[2] for row in document["rows"]] == ["cli-0", "cli-1", "cli-2"]
    assert sorted(str(row[0]) for row in document["rows"]) == sorted(mpids)  # 64-bit ids arrive exact
    assert as_parquet.returncode == 0 and as_parquet.stdout == "", as_parquet.stderr
    assert pq.read_table(parquet_file).column("value").to_pylist() == ["cli-0", "cli-1", "cli-2"]
    assert held.returncode == 1 and "cannot open" in held.stderr and "--url" in held.stderr, held.stderr


def test_table_csv_and_errors(live: tuple[LiveServer, str, list[str]], capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch):
    """The same command in-process (a subprocess per case would cost seconds each)."""
    server, workspace_id, _ = live
    monkeypatch.setenv("IDMESH_ADMIN_TOKEN", ADMIN_TOKEN)
    query = f"SELECT identity_type, value FROM identities WHERE scope = '{workspace_id}' ORDER BY value"
    assert main(["sql", query, "--url", server.base_url]) == 0
    table = capsys.readouterr().out
    assert "identity_type" in table and "cli-2" in table and "3 rows" in table
    assert main(["sql", query, "--url", server.base_url, "--format", "csv", "--limit", "2"]) == 0
    out, err = capsys.readouterr()
    assert list(csv.reader(io.StringIO(out))) == [["identity_type", "value"], ["customerid", "cli-0"],
                                                 ["customerid", "cli-1"]]
    assert "cut at --limit 2" in err

    assert main(["sql", "SELECT 1", "--url", server.base_url, "--format", "parquet"]) == 2
    assert "--output" in capsys.readouterr().err
    assert main(["sql", "SELECT * FROM read_text('/etc/passwd')", "--url", server.base_url]) == 1
    out, err = capsys.readouterr()
    assert "read_text" in err and out == ""
    assert main(["sql", "UPDATE workspaces SET name = 'x'", "--url", server.base_url]) == 1
    assert "UPDATE statements are refused" in capsys.readouterr().err
    # an argument holding bytes the locale cannot decode (\xff) arrives as a lone surrogate
    assert main(["sql", "SELECT '\udcff'", "--url", server.base_url]) == 1
    assert "not valid UTF-8" in capsys.readouterr().err
    monkeypatch.setenv("IDMESH_ADMIN_TOKEN", "wrong")
    assert main(["sql", "SELECT 1", "--url", server.base_url]) == 1
    assert "UNAUTHORIZED" in capsys.readouterr().err


def test_reads_the_file_when_no_server_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    server = LiveServer(tmp_path / "idmesh.duckdb").start()
    workspace_id, mpids = populate(server)
    server.stop()
    db = str(server.db_path)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    nobody = f"http://127.0.0.1:{free_port()}"
    (answer,) = run_all(["SELECT count(*) AS n, min(scope) AS scope FROM profiles", "--url", nobody, "--db", db,
                         "--format", "json"])
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["rows"] == [[len(mpids), workspace_id]]
    assert "reading" in answer.stderr and "read-only" in answer.stderr
    # the same checks apply to the file (in-process here: no server holds it)
    assert main(["sql", "COPY (SELECT * FROM workspaces) TO 'stolen.csv'", "--url", nobody, "--db", db]) == 1
    assert "COPY statements are refused" in capsys.readouterr().err
    assert main(["sql", "SELECT * FROM 'stolen.csv'", "--url", nobody, "--db", db]) == 1
    assert "stolen.csv" in capsys.readouterr().err
    assert main(["sql", "SELECT * FROM workspaces", "--url", nobody, "--db", db]) == 1
    assert "workspaces is not a public view" in capsys.readouterr().err
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    assert after == before
