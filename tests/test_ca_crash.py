"""SIGKILL of the real `idmesh serve` while a calculated attribute's full computation runs (issue 7, part 5).

What must hold: every batch acknowledged before the kill is stored; the killed computation left no trace (the
file holds exactly the value set committed before it, never part of a new one); start-up computes the active
definition again without being asked (api/ca_routes.py `recompute_after_start`), readers only ever see a whole
value set meanwhile, and the values it reaches equal an independent computation of the same definition in
plain SQL over the stored events, the batches acknowledged during the killed run included.

The population (about a million purchase events) is ingested in-process through the engine's own ingest path
and folded before the server starts, so the full computation takes long enough to be caught running: the test
polls its status, and kills once it is `calculating` while batches are being acknowledged.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import httpx
import orjson
from test_crash_recovery import ADMIN_TOKEN
from test_faults import FaultServer

from engine.idsync import IdSyncService
from engine.ingest import EventIngestor
from engine.writer import WriteBatch

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CUSTOMERS = 20_000
EVENTS = 1_200_000
EVENTS_PER_BATCH = 100
WAIT_S = 240          # generous bounds on polls; nothing is timed
LIVE_PREFIX = "live-"  # batch ids sent while the computation runs
DATA_POINT = {"event_type": "commerce_event", "attribute_name": "data.product_action.total_amount"}
SPEND = {"calculation_type": "sum", "data_point": DATA_POINT}
PURCHASES = {"calculation_type": "count", "data_point": DATA_POINT}


def purchase_batch(batch_id: str, customer: int, first: int, events: int) -> dict[str, Any]:
    """`events` purchases of whole amounts (sums of them are exact in floating point)."""
    return {"batch_id": batch_id, "environment": "production", "user_identities": {"customer_id": f"c{customer}"},
            "events": [{"event_type": "commerce_event", "data": {
                "timestamp_unixtime_ms": 1_700_000_000_000 + first + i,
                "product_action": {"action": "purchase", "total_amount": (first + i) % 97 + 1}}}
                for i in range(events)]}


def generate_purchases(db_path: Path) -> tuple[str, tuple[str, str]]:
    """A workspace and EVENTS purchases spread over CUSTOMERS customers, ingested and folded through the engine;
    the file is closed (checkpointed). Returns the workspace id and its key and secret."""
    service = IdSyncService.open(str(db_path))
    try:
        created, batch = service.workspaces.plan_create("ca-crash", {})
        asyncio.run(_generate(service, created.workspace, batch))
    finally:
        service.close()
    return created.workspace.id, (created.workspace.api_key, created.api_secret)


async def _generate(service: IdSyncService, workspace: Any, creation: WriteBatch) -> None:
    await service.commit(creation)
    service.workspaces.remember(workspace)
    ingestor = EventIngestor(service)
    batches = EVENTS // EVENTS_PER_BATCH
    for start in range(0, batches, 50):
        outcomes = await ingestor.ingest(workspace, [
            purchase_batch(f"gen-{n}", n % CUSTOMERS, n * EVENTS_PER_BATCH, EVENTS_PER_BATCH)
            for n in range(start, min(start + 50, batches))], "s2s")
        assert all(outcome.status == "accepted" for outcome in outcomes), outcomes[0]
    await service.commit(WriteBatch(fold_first=True))  # into the base tables, as a long-running server has them


@dataclass
class LiveLoad:
    """Bulk requests of purchases sent while the computation runs; `lock` guards the lists."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acknowledged: list[dict[str, Any]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    killed: threading.Event = field(default_factory=threading.Event)

    def drive(self, base_url: str, auth: tuple[str, str]) -> None:
        with httpx.Client(base_url=base_url, auth=auth, timeout=30) as http:
            n = 0
            while not self.killed.is_set():
                # existing customers, and new ones (numbered from CUSTOMERS up)
                batches = [purchase_batch(f"{LIVE_PREFIX}{k}", k * 7 % CUSTOMERS if k % 2 else CUSTOMERS + k, k, 5)
                           for k in range(n, n + 10)]
                n += 10
                try:
                    response = http.post("/v2/bulkevents", json=batches)
                except httpx.TransportError as exc:
                    if not self.killed.is_set():
                        with self.lock:
                            self.unexpected.append(repr(exc))
                    return
                with self.lock:
                    if response.status_code == 202:
                        self.acknowledged += batches
                    else:
                        self.unexpected.append(f"{response.status_code} {response.text[:300]}")

    def acknowledged_count(self) -> int:
        with self.lock:
            return len(self.acknowledged)


class CaClient:
    def __init__(self, server: FaultServer, workspace_id: str, auth: tuple[str, str]) -> None:
        self.http = httpx.Client(base_url=server.base_url, auth=auth, timeout=30)
        self.base = f"/platform/v2/workspaces/{workspace_id}/calculatedattributes"

    def calculation(self, ca_id: int) -> dict[str, Any]:
        response = self.http.get(f"{self.base}/{ca_id}/calculation")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_ready(self, ca_id: int, while_calculating: Any = None) -> None:
        deadline = time.monotonic() + WAIT_S
        while (state := self.calculation(ca_id))["status"] != "ready":
            assert state["status"] in ("not_started", "calculating"), state
            assert time.monotonic() < deadline, f"not ready after {WAIT_S} s: {state}"
            if while_calculating is not None and state["status"] == "calculating":
                while_calculating()
            time.sleep(0.05)

    def value_set(self, ca_id: int) -> tuple[int, int | None, int | None]:
        """(rows, first and last computed_ms) of the attribute's values: which computation wrote them."""
        answer = self.http.post("/v1/sql", json={"sql": "SELECT count(*), min(computed_ms), max(computed_ms) "
                                                        f"FROM calculated_attribute_values WHERE ca_id = {ca_id}"})
        assert answer.status_code == 200, answer.text
        return tuple(answer.json()["rows"][0])

    def close(self) -> None:
        self.http.close()


def read_only(db_path: Path) -> duckdb.DuckDBPyConnection:
    """The file as a restarted server would find it: DuckDB replays the WAL in memory and writes nothing."""
    return duckdb.connect(str(db_path), read_only=True)


def stored_values(connection: duckdb.DuckDBPyConnection, ca_id: int) -> dict[int, Any]:
    return {mpid: orjson.loads(value) for mpid, value in connection.execute(
        "SELECT mpid, value FROM calculated_attribute_values WHERE ca_id = ? AND value IS NOT NULL", [ca_id]).fetchall()}


def value_set(connection: duckdb.DuckDBPyConnection, ca_id: int) -> tuple[int, int | None, int | None]:
    return connection.execute("SELECT count(*), min(computed_ms), max(computed_ms) FROM calculated_attribute_values "
                              "WHERE ca_id = ?", [ca_id]).fetchone()


def oracle(connection: duckdb.DuckDBPyConnection, workspace_id: str, aggregate: str, live: bool) -> dict[int, Any]:
    """The attribute computed in plain SQL over the stored purchases (with the live batches or without)."""
    where = "" if live else f"AND NOT starts_with(batch_id, '{LIVE_PREFIX}')"
    return dict(connection.execute(f"""
        SELECT mpid, {aggregate} FROM events
        WHERE workspace_id = ? AND event_type = 'commerce_event' {where} GROUP BY mpid""", [workspace_id]).fetchall())


SUM = "sum(CAST(json_extract_string(data, '$.product_action.total_amount') AS DOUBLE))"
COUNT = "count(*)"


def test_sigkill_during_a_full_computation_loses_nothing_and_start_up_computes_it_again(tmp_path: Path) -> None:
    db_path = tmp_path / "db.duckdb"
    workspace_id, auth = generate_purchases(db_path)

    server = FaultServer(db_path, tmp_path / "killed.log")
    load = LiveLoad()
    try:
        server.wait_healthy()
        client = CaClient(server, workspace_id, auth)
        created = client.http.post(client.base, json={"name": "purchases", "draft_definition": SPEND})
        assert created.status_code == 201, created.text
        ca_id = created.json()["id"]
        assert client.http.post(f"{client.base}/{ca_id}/activation").status_code == 204
        client.wait_ready(ca_id)
        committed = client.value_set(ca_id)
        assert committed[0] > 0

        # a new definition: activation answers at once and the full computation starts in the background
        assert client.http.put(f"{client.base}/{ca_id}", json={"draft_definition": PURCHASES}).status_code == 204
        assert client.http.post(f"{client.base}/{ca_id}/activation").status_code == 204
        driver = threading.Thread(target=load.drive, args=(server.base_url, auth), daemon=True)
        driver.start()
        deadline = time.monotonic() + WAIT_S
        while not (client.calculation(ca_id)["status"] == "calculating" and load.acknowledged_count() >= 10):
            assert client.calculation(ca_id)["status"] != "ready", "the computation ended before the kill: raise EVENTS"
            assert time.monotonic() < deadline and driver.is_alive(), load.unexpected[:3]
            time.sleep(0.005)
        load.killed.set()
        server.sigkill()
        driver.join(timeout=WAIT_S)
        client.close()
    finally:
        load.killed.set()
        server.stop()
    assert server.process.returncode == -signal.SIGKILL
    assert not load.unexpected, load.unexpected[:3]

    # the kill landed inside the computation: the file holds the previous value set, whole and untouched, and
    # the new active definition (its activation was acknowledged)
    connection = read_only(db_path)
    try:
        assert value_set(connection, ca_id) == committed
        assert stored_values(connection, ca_id) == oracle(connection, workspace_id, SUM, live=False)
        [(active,)] = connection.execute("SELECT active_definition FROM calculated_attributes WHERE id = ?",
                                         [ca_id]).fetchall()
        assert orjson.loads(active)["calculation_type"] == "count"
    finally:
        connection.close()

    restarted = FaultServer(db_path, tmp_path / "restarted.log")
    seen: set[tuple[int, int | None, int | None]] = set()
    try:
        restarted.wait_healthy()
        client = CaClient(restarted, workspace_id, auth)
        client.wait_ready(ca_id, while_calculating=lambda: seen.add(client.value_set(ca_id)))
        recomputed = client.value_set(ca_id)
        client.close()
    finally:
        restarted.stop()
    assert recomputed != committed
    assert seen <= {committed, recomputed}, "a reader saw a value set that was neither the old nor the new one"

    connection = read_only(db_path)
    try:
        per_batch = dict(connection.execute(
            f"SELECT batch_id, count(*) FROM events WHERE starts_with(batch_id, '{LIVE_PREFIX}') GROUP BY batch_id"
        ).fetchall())
        lost = [batch["batch_id"] for batch in load.acknowledged if per_batch.get(batch["batch_id"]) != 5]
        assert not lost, f"{len(lost)} acknowledged batches lost or incomplete, e.g. {lost[:5]}"
        assert value_set(connection, ca_id) == recomputed
        expected = oracle(connection, workspace_id, COUNT, live=True)
        assert stored_values(connection, ca_id) == expected
        live_customers = {batch["user_identities"]["customer_id"] for batch in load.acknowledged}
        assert any(int(customer[1:]) >= CUSTOMERS for customer in live_customers)  # new profiles counted too
    finally:
        connection.close()
    log = (tmp_path / "restarted.log").read_text(errors="replace")
    assert "Traceback" not in log and "failed" not in log, log[-3000:]
