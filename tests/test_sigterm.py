"""SIGTERM, what a supervisor sends to stop a service: `idmesh serve` stops serving, lets the calculated attribute
computation it is running finish, closes the store with a checkpoint and exits. The WAL is gone, so the next
start replays nothing, and everything acknowledged is in the database file itself.

uvicorn re-raises the signal once its shutdown (the app's lifespan included) is over, so the process ends killed
by SIGTERM; only the lifespan's shutdown runs before that (api/app.py).
"""

from __future__ import annotations

import signal
from pathlib import Path

import duckdb
import httpx
from test_ca_crash import SPEND, SUM, oracle, purchase_batch, stored_values
from test_faults import FaultServer, create_workspace, identify

WAIT_S = 120


def test_sigterm_finishes_the_computation_checkpoints_and_keeps_everything(tmp_path: Path) -> None:
    db_path, log_path = tmp_path / "db.duckdb", tmp_path / "server.log"
    server = FaultServer(db_path, log_path)
    devices: dict[str, int] = {}
    try:
        server.wait_healthy()
        workspace = create_workspace(server)
        with httpx.Client(base_url=server.base_url, auth=workspace.auth, timeout=30) as http:
            for n in range(50):
                answer = identify(http, {"ios_idfv": f"device-{n}"})
                assert answer.status_code == 200, answer.text
                devices[f"device-{n}"] = int(answer.json()["mpid"])
            for start in range(0, 400, 20):  # 20 batches of 20 events: within the 256 KiB request limit
                batches = [purchase_batch(f"b-{n}", n % 200, n * 20, 20) for n in range(start, start + 20)]
                assert http.post("/v2/bulkevents", json=batches).status_code == 202
            base = f"/platform/v2/workspaces/{workspace.id}/calculatedattributes"
            ca_id = http.post(base, json={"name": "spend", "draft_definition": SPEND}).json()["id"]
            assert http.post(f"{base}/{ca_id}/activation").status_code == 204  # the computation starts
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=WAIT_S) == -signal.SIGTERM
    finally:
        server.stop()

    wal = Path(f"{db_path}.wal")
    assert not wal.exists() or wal.stat().st_size == 0, f"{wal.stat().st_size} bytes of WAL left to replay"
    log = log_path.read_text(errors="replace")
    assert "Traceback" not in log and "no checkpoint at close" not in log, log[-3000:]
    connection = duckdb.connect(str(db_path), read_only=True)
    try:
        held = dict(connection.execute("SELECT value, mpid FROM identities WHERE identity_type = 'ios_idfv'").fetchall())
        assert held == devices
        assert connection.execute("SELECT count(*), count(DISTINCT batch_id) FROM events").fetchone() == (8000, 400)
        assert stored_values(connection, ca_id) == oracle(connection, workspace.id, SUM, live=True)
        assert len(stored_values(connection, ca_id)) == 200
    finally:
        connection.close()
