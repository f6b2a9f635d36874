"""Every batch the Events API acknowledged (202) survives a SIGKILL in the middle of an ingest load, and
re-sending the batches afterwards (as a retrying client would) stores none of them twice."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
from test_crash_recovery import ADMIN_TOKEN, Server

from engine.store import open_database

THREADS = 6
BATCHES_PER_REQUEST = 10
EVENTS_PER_BATCH = 5
KILL_AFTER_ACKED_BATCHES = 600
LOAD_DEADLINE_S = 90


def make_batch(tag: str, n: int) -> dict:
    return {"batch_id": f"{tag}-{n}", "user_identities": {"customer_id": f"cust-{tag}-{n % 50}"},
            "timestamp_unixtime_ms": 1_700_000_000_000 + n,
            "user_attributes": {"last_batch": f"{tag}-{n}"},
            "events": [{"event_type": "custom_event", "data": {"event_name": f"e{i}", "custom_attributes": {"n": n}}}
                       for i in range(EVENTS_PER_BATCH)]}


class IngestLoad:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acknowledged: list[dict] = []
        self.sent: list[dict] = []
        self.in_flight = 0
        self.in_flight_at_kill = 0
        self.unexpected: list[str] = []
        self.killed = threading.Event()

    def drive(self, base_url: str, auth: tuple[str, str], tag: str, deadline: float) -> None:
        with httpx.Client(base_url=base_url, auth=auth, timeout=15) as http:
            n = 0
            while not self.killed.is_set() and time.monotonic() < deadline:
                batches = [make_batch(tag, n + i) for i in range(BATCHES_PER_REQUEST)]
                n += BATCHES_PER_REQUEST
                with self.lock:
                    self.in_flight += 1
                    self.sent += batches
                try:
                    response = http.post("/v2/bulkevents", json=batches)
                except httpx.TransportError as exc:
                    if not self.killed.is_set():
                        with self.lock:
                            self.unexpected.append(repr(exc))
                    return
                finally:
                    with self.lock:
                        self.in_flight -= 1
                with self.lock:
                    if response.status_code == 202:
                        self.acknowledged += batches
                    else:
                        self.unexpected.append(f"{response.status_code} {response.text[:300]}")


def test_acknowledged_batches_survive_sigkill_and_replays_store_nothing_twice(tmp_path: Path) -> None:
    db_path, log_path = tmp_path / "db.duckdb", tmp_path / "server.log"
    server = Server(db_path, log_path)
    restarted = None
    try:
        server.wait_healthy()
        with httpx.Client(base_url=server.base_url, timeout=15) as http:
            created = http.post("/platform/v2/workspaces", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                                json={"name": "ingest-crash", "settings": {}})
        assert created.status_code == 201, created.text
        auth = (created.json()["api_key"], created.json()["api_secret"])
        load = IngestLoad()
        deadline = time.monotonic() + LOAD_DEADLINE_S
        threads = [threading.Thread(target=load.drive, args=(server.base_url, auth, f"t{i}", deadline), daemon=True)
                   for i in range(THREADS)]
        for thread in threads:
            thread.start()
        while time.monotonic() < deadline:
            with load.lock:
                if len(load.acknowledged) >= KILL_AFTER_ACKED_BATCHES and load.in_flight > 0:
                    load.in_flight_at_kill = load.in_flight
                    load.killed.set()
                    break
            time.sleep(0.002)
        server.sigkill()
        load.killed.set()
        for thread in threads:
            thread.join(timeout=30)
        assert server.process.returncode == -signal.SIGKILL
        assert not load.unexpected, load.unexpected[:3]
        assert len(load.acknowledged) >= KILL_AFTER_ACKED_BATCHES and load.in_flight_at_kill > 0

        restarted = Server(db_path, log_path)
        restarted.wait_healthy()
        with httpx.Client(base_url=restarted.base_url, auth=auth, timeout=30) as http:
            for start in range(0, len(load.sent), 100):  # a client retrying everything it ever sent
                response = http.post("/v2/bulkevents", json=load.sent[start:start + 100])
                assert response.status_code == 202, response.text
                for result in response.json()["results"]:
                    if load.sent[start + result["index"]] in load.acknowledged:
                        assert result["status"] == "duplicate", result
        restarted.stop()
        restarted = None

        connection = open_database(str(db_path))
        try:
            per_batch = dict(connection.execute("SELECT batch_id, count(*) FROM events GROUP BY batch_id").fetchall())
            batches = connection.execute("SELECT count(*), count(DISTINCT batch_id) FROM batches").fetchone()
        finally:
            connection.close()
        acknowledged_ids = {b["batch_id"] for b in load.acknowledged}
        missing = [b for b in acknowledged_ids if per_batch.get(b) != EVENTS_PER_BATCH]
        assert not missing, f"{len(missing)} acknowledged batches lost or doubled, e.g. {missing[:5]}"
        assert set(per_batch.values()) == {EVENTS_PER_BATCH}  # nothing stored twice, acknowledged or not
        assert batches[0] == batches[1] == len({b["batch_id"] for b in load.sent})
    finally:
        server.stop()
        if restarted is not None:
            restarted.stop()
