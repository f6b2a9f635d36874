"""`idmesh sync --once` on a database file: evaluates, diffs and flushes to a real webhook receiver, exits 0 when
everything was acknowledged and 3 when deltas wait for a retry; refuses a file a server holds open."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from test_delivery_webhook import Receiver, World, as_text, serve

from api.cli import main

ROOT = Path(__file__).parent.parent


def _state(path: Path) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as db:
        return db.execute("SELECT connection_id, mpid FROM delivery_state ORDER BY ALL").fetchall()


def test_sync_once_delivers_and_a_second_run_sends_nothing(tmp_path: Path, receivers):
    path = tmp_path / "sync.duckdb"
    receiver = Receiver()
    world = World(path)
    audience = world.audience("emails")
    connection = world.connect(audience, serve(receivers, receiver), identity_types=["email"])
    world.emails([1, 2, 3])
    world.members(audience, [1, 2])   # stored memberships; the evaluation finds 1, 2 and 3 (all have an email)
    world.service.connection.execute(
        "INSERT INTO profiles_base SELECT scope, mpid, 0, 0, 0, 'active' FROM identities_base")
    world.close()

    assert main(["sync", "--once", "--db", str(path)]) == 0
    assert receiver.members == {audience.id: as_text([1, 2, 3])}
    assert _state(path) == [(connection.id, 1), (connection.id, 2), (connection.id, 3)]
    requests = receiver.requests
    assert main(["sync", "--once", "--no-evaluate", "--db", str(path)]) == 0
    assert receiver.requests == requests


def test_sync_once_says_when_deltas_wait_for_a_retry(tmp_path: Path, receivers):
    path = tmp_path / "retry.duckdb"
    receiver = Receiver(fail_first=100)
    world = World(path)
    audience = world.audience("failing")
    world.connect(audience, serve(receivers, receiver))
    world.members(audience, [1])
    world.close()
    assert main(["sync", "--once", "--no-evaluate", "--db", str(path)]) == 3
    assert receiver.requests == 1 and _state(path) == []


def test_sync_refuses_a_database_a_server_holds(tmp_path: Path):
    path = tmp_path / "held.duckdb"
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; db = duckdb.connect(sys.argv[1]); "
                               "print('ready', flush=True); time.sleep(60)", str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        done = subprocess.run([sys.executable, "-m", "api.cli", "sync", "--once", "--db", str(path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1
        assert "a running server delivers by itself" in done.stderr
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture
def receivers():
    started = []
    yield started
    for _, server in started:
        server.stop()
