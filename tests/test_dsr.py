"""OpenDSR v3 data subject requests over real HTTP into a real DuckDB file: erasure from every table, tombstones and
replays, access exports, the waiting period and cancelling, the group query, discovery, signed callbacks to a real
local receiver (with retries), authentication, restarts."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from audience_seed import apply_audience, seed_audience
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509.oid import NameOID
from delivery_seed import seed_delivery
from fakes.server import FakeServer
from live_server import IdSyncClient, LiveServer, WorkspaceCredentials

from api.ca_routes import background_idle
from api.sink_cli import Sink

DAY_MS = 86_400_000


def request_body(identities: dict[str, str], request_type: str = "erasure", **fields: Any) -> dict[str, Any]:
    return {"regulation": "gdpr", "subject_request_id": str(uuid.uuid4()), "subject_request_type": request_type,
            "submitted_time": "2026-11-20T10:00:00Z", "skip_waiting_period": True, "api_version": "3.0",
            "subject_identities": {t: {"value": v, "encoding": "raw"} for t, v in identities.items()}, **fields}


class Controller:
    """A workspace acting as the data controller: submits and follows requests with its key + secret."""

    def __init__(self, server: LiveServer, workspace: WorkspaceCredentials) -> None:
        self.server = server
        self.http = server.client()
        self.auth = (workspace.api_key, workspace.api_secret)

    def submit(self, body: dict[str, Any]) -> httpx.Response:
        return self.http.post("/v3/requests", json=body, auth=self.auth)

    def submitted(self, identities: dict[str, str], request_type: str = "erasure", **fields: Any) -> str:
        response = self.submit(request_body(identities, request_type, **fields))
        assert response.status_code == 202, response.text
        return response.json()["subject_request_id"]

    def status(self, request_id: str) -> dict[str, Any]:
        response = self.http.get(f"/v3/requests/{request_id}", auth=self.auth)
        assert response.status_code == 200, response.text
        return response.json()

    def cancel(self, request_id: str) -> httpx.Response:
        return self.http.delete(f"/v3/requests/{request_id}", auth=self.auth)

    def export(self, request_id: str) -> httpx.Response:
        return self.http.get(f"/v3/requests/{request_id}/export", auth=self.auth)

    def process(self, at_ms: int | None = None) -> int:
        """Run the scheduler's processing step now (on the server's loop) instead of waiting for it."""
        return on_server(self.server, self.server.app.state.dsr.process_due(at_ms))

    def deliver(self, at_ms: int | None = None) -> int:
        return on_server(self.server, self.server.app.state.dsr.callbacks.deliver_due(at_ms))


def on_server(server: LiveServer, coroutine: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(coroutine, server.loop).result()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def workspace(server: LiveServer) -> Iterator[tuple[IdSyncClient, Controller]]:
    credentials = server.create_workspace({"strategy": "profile_link"})
    client, controller = IdSyncClient(server, credentials), Controller(server, credentials)
    yield client, controller
    client.close()
    controller.http.close()


@pytest.fixture(scope="module")
def one_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Controller]]:
    """One server for the many requests that must change nothing."""
    server = LiveServer(tmp_path_factory.mktemp("dsr") / "idmesh.duckdb").start()
    controller = Controller(server, server.create_workspace())
    yield server, controller
    controller.http.close()
    server.stop()


def send(client: IdSyncClient, batch: dict[str, Any]) -> httpx.Response:
    return client.call("/v2/events", batch)


def stored(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    return response.json()


def text_hits(server: LiveServer, needles: list[str]) -> set[tuple[str, str]]:
    """(table or view, needle) for every table and view of the schema holding a needle as text in any column,
    JSON columns included: a row cast to text shows every value it holds."""
    objects = server.query("SELECT table_name FROM duckdb_tables() WHERE NOT internal "
                           "UNION ALL SELECT view_name FROM duckdb_views() WHERE NOT internal")
    hits = set()
    for (name,) in objects:
        for needle in needles:
            if server.query(f'SELECT count(*) FROM "{name}" AS x WHERE contains(CAST(x AS VARCHAR), ?)', needle)[0][0]:
                hits.add((name, needle))
    return hits


# --- erasure -------------------------------------------------------------------------------------------------------
def test_erasure_leaves_no_trace_in_any_table_or_view_and_keeps_everyone_else(server: LiveServer, workspace):
    client, controller = workspace
    now = now_ms()
    anonymous = client.identify({"ios_idfv": "ann-device"})["mpid"]
    stored(send(client, {"mpid": anonymous, "events": [
        {"event_type": "screen_view", "data": {"screen_name": "home", "timestamp_unixtime_ms": now - 3000}}]}))
    ann = client.login({"customerid": "ann-cust-77", "email": "Ann.Erased@Example.COM", "ios_idfv": "ann-device"})["mpid"]
    assert ann != anonymous  # profile_link: the known profile is new, the anonymous one is aliased into it
    assert client.modify(ann, [{"identity_type": "mobile_number", "old_value": None,
                                "new_value": "+44 7700 900123"}]).status_code == 200
    assert client.alias(anonymous, ann, start_unixtime_ms=now - 5000, end_unixtime_ms=now).status_code == 202
    stored(send(client, {
        "batch_id": "ann-batch-1", "source_request_id": "ann-req-1",
        "user_identities": {"customer_id": "ann-cust-77", "email": "Ann.Erased@Example.COM"},
        "user_attributes": {"$firstname": "Annabel-Erased"},
        "consent_state": {"gdpr": {"marketing": {"consented": True, "document": "ann-consent-doc",
                                                 "timestamp_unixtime_ms": now}}},
        "events": [{"event_type": "custom_event", "data": {"event_name": "ann-purchase", "custom_event_type": "other"}}]}))
    bob = client.login({"customerid": "bob-cust-1", "email": "bob@example.com"})["mpid"]
    # bob's own ledger names ann: her unique email was refused to his profile ("unique value held by profile ...")
    assert client.identify({"customerid": "bob-cust-1", "email": "ann.erased@example.com"})["mpid"] == bob
    stored(send(client, {"mpid": bob, "batch_id": "bob-batch-1", "user_attributes": {"$firstname": "Bob"},
                         "consent_state": {"gdpr": {"marketing": {"consented": False, "timestamp_unixtime_ms": now}}},
                         "events": [{"event_type": "custom_event", "data": {"event_name": "bob-visit"}}]}))
    base = f"/platform/v2/workspaces/{server.service.workspaces.by_api_key(controller.auth[0]).id}/calculatedattributes"
    created = client.http.post(base, json={"name": "custom events", "draft_definition": {
        "calculation_type": "count", "data_point": {"event_type": "custom_event"}}}, auth=client.auth)
    assert client.http.post(f"{base}/{created.json()['id']}/activation", auth=client.auth).status_code == 204
    on_server(server, background_idle(server.app.state.background_tasks))
    assert server.query("SELECT count(*) FROM calculated_attribute_values WHERE mpid = ?", int(ann)) == [(1,)]
    # she was in an audience, left it and came back: two stays of hers in its history
    workspace_id = server.service.workspaces.by_api_key(controller.auth[0]).id
    audience = seed_audience(server, workspace_id, "shoppers", [int(ann), int(bob)], now - 2000)
    apply_audience(server, workspace_id, audience, [int(bob)], now - 1000)
    apply_audience(server, workspace_id, audience, [int(ann), int(bob)], now)
    # a webhook destination holds her (identifiers as sent) and a change of hers is pending; bob's rows stay. The
    # connection is inactive until the erasure is checked, so no scheduled flush sends anything before that.
    printed = io.StringIO()
    sink = Sink("sink-secret", out=printed)
    receiver = FakeServer(sink.app()).start()
    server.app.state.audiences.load(server.service.connection)   # the seeded audience, as a start-up loads it
    connections = f"/platform/v2/workspaces/{workspace_id}/audiences/{audience}/connections"
    made = client.http.post(connections, auth=client.auth, json={
        "output": "webhook", "status": "inactive", "credentials": {"secret": "sink-secret"},
        "settings": {"identity_types": ["customer_id", "email"], "webhook": {"url": f"{receiver.base_url}/hook"}}})
    assert made.status_code == 201, made.text
    connection = made.json()["id"]
    ann_held = {"customer_id": "ann-cust-77", "email": "ann.erased@example.com", "mpid": str(ann)}
    seed_delivery(server, workspace_id, connection, int(ann), ann_held)
    seed_delivery(server, workspace_id, connection, int(bob), {"customer_id": "bob-cust-1", "mpid": str(bob)})
    access = controller.submitted({"email": "ann.erased@example.com"}, "access")
    assert controller.process() == 1 and controller.export(access).status_code == 200
    waiting = controller.submitted({"customer_id": "ann-cust-77"}, "portability", skip_waiting_period=False)

    needles = [ann, "ann-cust-77", "Ann.Erased@Example.COM", "ann.erased@example.com", "+44 7700 900123",
               "+447700900123", "Annabel-Erased", "ann-consent-doc", "ann-purchase", "ann-batch-1", "ann-req-1"]
    before = {name for name, _ in text_hits(server, needles)}
    assert {"profiles", "identities", "calculated_attribute_values", "identity_changes", "aliases", "events", "batches",
            "user_attributes", "consent_history", "consent", "dsr_exports", "dsr_requests",
            "audience_membership_history", "audience_members", "delivery_state", "delivery_outbox"} <= before

    erasure = controller.submitted({"email": "ann.erased@example.com", "controller_customer_id": "ann-cust-77"})
    assert controller.process() == 1
    status = controller.status(erasure)
    assert (status["request_status"], status["results_count"]) == ("completed", 1)
    # until the destination acknowledges it, one erasure remove per destination holding her is all that names her:
    # the identifiers held (and her MPID) in delivery_outbox, nothing anywhere else
    assert text_hits(server, needles) == {("delivery_outbox", str(ann)), ("delivery_outbox", "ann-cust-77"),
                                          ("delivery_outbox", "ann.erased@example.com")}
    [(op, ids, erasure_row, attempts)] = server.query(
        "SELECT op, identifiers, erasure, attempts FROM delivery_outbox WHERE mpid = ?", int(ann))
    assert (op, orjson.loads(ids), erasure_row, attempts) == ("remove", ann_held, True, 0)
    assert server.query("SELECT count(*) FROM delivery_state WHERE mpid = ?", int(ann)) == [(0,)]

    # everyone else is intact: bob entirely, and ann's anonymous profile with its own events and device id
    assert server.query("SELECT identity_type, raw_value FROM identities WHERE mpid = ? ORDER BY 1", int(bob)) == [
        ("customerid", "bob-cust-1"), ("email", "bob@example.com")]
    assert server.query("SELECT event_name FROM events WHERE mpid = ?", int(bob)) == [("bob-visit",)]
    assert server.query("SELECT value FROM user_attributes WHERE mpid = ?", int(bob)) == [('"Bob"',)]
    assert server.query("SELECT consented FROM consent WHERE mpid = ?", int(bob)) == [(False,)]
    assert server.query("SELECT count(*) FROM batches WHERE mpid = ?", int(bob)) == [(1,)]
    assert server.query("SELECT value FROM calculated_attribute_values WHERE mpid = ?", int(bob)) == [("1",)]
    assert server.query("SELECT audience_id, entered_ms FROM audience_members WHERE mpid = ?", int(bob)) == [
        (audience, now - 2000)]
    assert server.query("SELECT (SELECT count(*) FROM delivery_state WHERE mpid = $1), "
                        "(SELECT count(*) FROM delivery_outbox WHERE mpid = $1)", int(bob)) == [(1, 1)]
    # the normal flush sends the remove; once acknowledged nothing anywhere names her
    assert client.http.put(f"{connections}/{connection}", auth=client.auth,
                           json={"status": "active"}).status_code == 200
    try:
        on_server(server, server.app.state.delivery.run_once())
    finally:
        receiver.stop()
    removed = [line for line in printed.getvalue().splitlines() if line.startswith(f"- shoppers: mpid {ann} ")]
    assert removed == [f"- shoppers: mpid {ann} (customer_id=ann-cust-77, email=ann.erased@example.com) -> 0 members"]
    assert text_hits(server, needles) == set()
    assert server.query("SELECT change, value, reason FROM identity_changes WHERE mpid = ? AND change = 'skip'",
                        int(bob)) == [("skip", None, "unique value held by profile (erased)")]
    assert server.query("SELECT identity_type, value FROM identities WHERE mpid = ?", int(anonymous)) == [
        ("ios_idfv", "ann-device")]
    assert server.query("SELECT event_name, copied_from_mpid FROM events WHERE mpid = ?", int(anonymous)) == [
        ("home", None)]
    # the other requests about her lost her identities and MPID; her earlier export went with the rest
    assert controller.export(access).status_code == 404
    assert controller.process(now_ms() + 8 * DAY_MS) == 1
    assert controller.status(waiting)["results_count"] == 0
    assert orjson.loads(controller.export(waiting).content)["profile"] is None
    # the erasure's record: types and tombstone hashes only, and when removes were queued
    [(types, hashes, erased, forwarded)] = server.query(
        "SELECT identity_types, identity_hashes, erased_ms, forwarded_ms FROM erasure_events")
    assert orjson.loads(types) == ["customerid", "email", "mobile_number"] and len(orjson.loads(hashes)) == 3
    assert forwarded == erased


def test_erasing_an_alias_source_by_mpid_removes_the_copies_of_its_events(server: LiveServer, workspace):
    client, controller = workspace
    now = now_ms()
    anonymous = client.identify({"ios_idfv": "source-device"})["mpid"]
    stored(send(client, {"mpid": anonymous, "events": [
        {"event_type": "custom_event", "data": {"event_name": "anon-cart", "timestamp_unixtime_ms": now - 1000}}]}))
    known = client.login({"customerid": "dest-cust"})["mpid"]
    assert client.alias(anonymous, known, start_unixtime_ms=now - 5000, end_unixtime_ms=now).status_code == 202
    assert server.query("SELECT copied_from_mpid FROM events WHERE mpid = ?", int(known)) == [(int(anonymous),)]

    mpid_only = request_body({"mpid": anonymous, "email": "x@example.com"})
    rejected = controller.submit(mpid_only)
    assert rejected.status_code == 400 and rejected.json()["errors"][0]["field"] == "subject_identities.mpid"
    controller.submitted({"mpid": anonymous})
    assert controller.process() == 1
    assert server.query("SELECT count(*) FROM events WHERE mpid = ? OR copied_from_mpid = ?",
                        int(known), int(anonymous)) == [(0,)]
    assert server.query("SELECT count(*) FROM aliases") == server.query("SELECT count(*) FROM alias_effects") == [(0,)]
    assert server.query("SELECT mpid FROM profiles") == [(int(known),)]
    assert client.identify({"customerid": "dest-cust"})["mpid"] == known


def test_tombstoned_identities_are_ignored_and_replayed_batches_store_nothing_across_restarts(server: LiveServer,
                                                                                            workspace):
    client, controller = workspace
    batch = {"batch_id": "tomb-batch-1", "source_request_id": "tomb-src-1",
             "user_identities": {"customer_id": "tomb-cust", "email": "tomb@example.com"},
             "device_info": {"ios_idfv": "tomb-device"}, "user_attributes": {"plan": "gold"},
             "events": [{"event_type": "custom_event", "data": {"event_name": "tomb-event"}}]}
    erased = int(stored(send(client, batch))["mpid"])
    erasure = controller.submitted({"customer_id": "tomb-cust"})
    assert controller.process() == 1

    def rows() -> tuple:
        return tuple(server.query(f"SELECT count(*) FROM {view}")[0][0]
                     for view in ("profiles", "identities", "events", "batches", "user_attributes"))

    def check_tombstones() -> None:
        assert rows() == (0, 0, 0, 0, 0)
        # a replay, by batch_id or by source_request_id, is acknowledged and stores nothing
        assert stored(send(client, batch))["status"] == "duplicate"
        assert stored(send(client, dict(batch, batch_id="tomb-batch-2")))["status"] == "duplicate"
        # the same data under new ids: its identities are all tombstoned, so the batch names nobody
        fresh = dict(batch, batch_id="tomb-batch-3", source_request_id="tomb-src-3")
        rejected = send(client, fresh)
        assert (rejected.status_code, rejected.json()["errors"][0]["field"]) == (400, "user_identities")
        rejected = send(client, dict(fresh, mpid=str(erased)))
        assert (rejected.status_code, rejected.json()["errors"][0]["field"]) == (400, "mpid")
        assert client.raw("identify", {"email": "TOMB@example.com"}).status_code == 400
        assert client.raw("login", {"customerid": "tomb-cust"}).status_code == 400
        assert rows() == (0, 0, 0, 0, 0)
        assert controller.status(erasure)["request_status"] == "completed"

    check_tombstones()
    server.restart()
    check_tombstones()
    # the rest of a request proceeds: a new person with a new device, never holding the erased values
    mpid = client.identify({"email": "tomb@example.com", "ios_idfv": "new-device"})["mpid"]
    assert int(mpid) != erased
    assert server.query("SELECT identity_type, value FROM identities") == [("ios_idfv", "new-device")]
    refused = client.modify(mpid, [{"identity_type": "email", "old_value": None, "new_value": "tomb@example.com"}])
    assert (refused.status_code, refused.json()["errors"][0]["field"]) == (400, "identity_changes[0].new_value")


def test_a_quarantined_hub_value_is_erased_only_when_it_was_the_persons_alone(server: LiveServer):
    credentials = server.create_workspace({"hub_limit": 2})
    client, controller = IdSyncClient(server, credentials), Controller(server, credentials)
    mpids = [client.login({"customerid": f"hub-{n}", "ios_idfv": "shared-tablet"})["mpid"] for n in range(3)]
    assert server.query("SELECT value FROM hub_values") == [("shared-tablet",)]
    controller.submitted({"customer_id": "hub-0"})
    controller.process()
    assert server.query("SELECT value FROM hub_values") == [("shared-tablet",)]  # two others still hold it
    assert client.modify(mpids[2], [{"identity_type": "ios_idfv", "old_value": "shared-tablet",
                                     "new_value": None}]).status_code == 200
    controller.submitted({"customer_id": "hub-1"})  # now the only holder
    controller.process()
    assert server.query("SELECT count(*) FROM hub_values") == [(0,)]
    assert client.raw("identify", {"ios_idfv": "shared-tablet"}).status_code == 400  # tombstoned with the rest
    assert client.identify({"customerid": "hub-2"})["mpid"] == mpids[2]


# --- access and portability ------------------------------------------------------------------------------------------
def test_access_and_portability_export_everything_held_about_the_person(server: LiveServer, workspace):
    client, controller = workspace
    now = now_ms()
    mpid = stored(send(client, {
        "user_identities": {"customer_id": "exp-cust", "email": "exp@example.com"}, "batch_id": "exp-batch",
        "user_attributes": {"tier": "gold", "tags": ["a", "b"]},
        "consent_state": {"gdpr": {"marketing": {"consented": True, "timestamp_unixtime_ms": now - 10}}},
        "events": [{"event_type": "custom_event", "data": {"event_name": "exp-bought", "custom_attributes": {"sku": "s1"}}},
                   {"event_type": "screen_view", "data": {"screen_name": "exp-home"}}]}))["mpid"]
    stored(send(client, {"mpid": mpid, "consent_state": {"gdpr": {"marketing": {"consented": False,
                                                                               "timestamp_unixtime_ms": now}}}}))
    access = controller.submitted({"email": "EXP@example.com"}, "access", group_id="case-1")
    portability = controller.submitted({"customer_id": "exp-cust"}, "portability", regulation="ccpa")
    assert controller.export(access).status_code == 409  # not completed yet
    assert controller.process() == 2

    for request_id in (access, portability):
        status = controller.status(request_id)
        assert status["request_status"] == "completed" and status["results_url"].endswith(f"/{request_id}/export")
        export = orjson.loads(controller.export(request_id).content)
        assert export["mpid"] == mpid and export["profile"]["mpid"] == int(mpid)
        assert {(i["identity_type"], i["raw_value"]) for i in export["identities"]} == {
            ("customerid", "exp-cust"), ("email", "exp@example.com")}
        assert {a["name"]: a["value"] for a in export["user_attributes"]} == {"tier": "gold", "tags": ["a", "b"]}
        assert [e["event_name"] for e in export["events"]] == ["exp-bought", "exp-home"]
        assert export["events"][0]["data"]["custom_attributes"] == {"sku": "s1"}
        assert [c["consented"] for c in export["consent"]] == [False]
        assert sorted(c["consented"] for c in export["consent_history"]) == [False, True]
        assert len(export["batches"]) == 2 and export["batches"][0]["envelope"]["batch_id"] == "exp-batch"
        assert {c["change"] for c in export["identity_changes"]} >= {"create", "add"}
        assert status["results_count"] == sum(len(export[k]) for k in ("identities", "user_attributes", "consent",
                                                                       "consent_history", "events", "batches",
                                                                       "aliases", "identity_changes")) + 1
    assert controller.export(controller.submitted({"email": "exp@example.com"})).status_code == 404  # erasure: none


# --- lifecycle -------------------------------------------------------------------------------------------------------
def test_waiting_period_cancel_while_pending_only_and_requests_survive_restarts(server: LiveServer, workspace):
    client, controller = workspace
    client.login({"customerid": "wait-cust"})
    waiting = controller.submitted({"customer_id": "wait-cust"}, skip_waiting_period=False)
    to_cancel = controller.submitted({"customer_id": "wait-cust"}, "access", skip_waiting_period=False)
    status = controller.status(waiting)
    assert status["request_status"] == "pending"
    assert controller.process() == 0  # the waiting period (7 days by default) has not passed

    server.restart()
    assert controller.status(waiting) == status
    cancelled = controller.cancel(to_cancel)
    assert cancelled.status_code == 202 and cancelled.json()["subject_request_id"] == to_cancel
    assert controller.status(to_cancel)["request_status"] == "cancelled"
    again = controller.cancel(to_cancel)
    assert again.status_code == 409 and again.json()["errors"][0]["field"] == "subject_request_id"

    assert controller.process(now_ms() + 8 * DAY_MS) == 1  # only the erasure: the cancelled one stays cancelled
    assert controller.status(waiting)["request_status"] == "completed"
    assert controller.cancel(waiting).status_code == 409
    server.restart()
    assert controller.status(waiting)["request_status"] == "completed"
    assert controller.status(to_cancel)["request_status"] == "cancelled"
    assert server.query("SELECT subject_identities, mpid FROM dsr_requests") == [(None, None), (None, None)]
    assert client.raw("login", {"customerid": "wait-cust"}).status_code == 400


def test_scheduler_processes_due_requests_without_being_asked(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("IDMESH_DSR_POLL_SECONDS", "0.1")
    monkeypatch.setenv("IDMESH_DSR_WAITING_PERIOD_SECONDS", "0")
    server = LiveServer(tmp_path / "idmesh.duckdb").start()
    try:
        credentials = server.create_workspace()
        client, controller = IdSyncClient(server, credentials), Controller(server, credentials)
        client.login({"customerid": "sched-cust"})
        request_id = controller.submitted({"customer_id": "sched-cust"}, skip_waiting_period=False)
        while controller.status(request_id)["request_status"] != "completed":
            time.sleep(0.05)
        assert server.query("SELECT count(*) FROM profiles") == [(0,)]
    finally:
        server.stop()


def test_duplicate_ids_ambiguous_and_unknown_identities(server: LiveServer, workspace):
    client, controller = workspace
    body = request_body({"customer_id": "nobody"})
    assert controller.submit(body).status_code == 202
    duplicate = controller.submit(dict(body, subject_request_type="access"))
    assert (duplicate.status_code, duplicate.json()["errors"][0]["field"]) == (409, "subject_request_id")
    other = server.create_workspace()  # another controller may use the same id
    assert Controller(server, other).submit(body).status_code == 202
    # identities matching nobody are accepted and complete with nothing found
    assert controller.process() == 2  # both workspaces' requests were due
    assert controller.status(body["subject_request_id"])["results_count"] == 0

    first = client.login({"customerid": "amb-1", "email": "amb1@example.com", "ios_idfv": "family-ipad"})["mpid"]
    second = client.login({"customerid": "amb-2", "email": "amb2@example.com", "ios_idfv": "family-ipad"})["mpid"]
    assert first != second
    for identities, field in (({"ios_vendor_id": "family-ipad"}, "subject_identities.ios_vendor_id"),
                              ({"customer_id": "amb-1", "email": "amb2@example.com"}, "subject_identities.email")):
        rejected = controller.submit(request_body(identities))
        assert (rejected.status_code, rejected.json()["errors"][0]["field"]) == (400, field), rejected.text
    assert controller.submit(request_body({"customer_id": "amb-1", "email": "AMB1@example.com"})).status_code == 202


@pytest.mark.parametrize(("change", "field"), [
    ({"regulation": "hipaa"}, "regulation"),
    ({"subject_request_id": "not-a-uuid"}, "subject_request_id"),
    ({"subject_request_type": "rectification"}, "subject_request_type"),
    ({"submitted_time": None}, "submitted_time"),
    ({"submitted_time": "2026-11-20T10:00:00"}, "submitted_time"),
    ({"skip_waiting_period": "yes"}, "skip_waiting_period"),
    ({"api_version": "2.0"}, "api_version"),
    ({"subject_identities": {}}, "subject_identities"),
    ({"subject_identities": {f"other{n}": {"value": "x"} for n in range(2, 11)}
      | {f"t{n}": {"value": "x"} for n in range(45)}}, "subject_identities"),
    ({"subject_identities": {"favourite_colour": {"value": "red"}}}, "subject_identities.favourite_colour"),
    ({"subject_identities": {"email": {"value": "a@b.c", "encoding": "sha256"}}}, "subject_identities.email.encoding"),
    ({"subject_identities": {"email": {"value": "null"}}}, "subject_identities.email.value"),
    ({"subject_identities": {"email": "a@b.c"}}, "subject_identities.email"),
    ({"subject_identities": {"customer_id": {"value": "1"}, "controller_customer_id": {"value": "2"}}},
     "subject_identities.controller_customer_id"),
    ({"subject_identities": {"mpid": {"value": "zero"}}}, "subject_identities.mpid.value"),
    ({"status_callback_urls": ["ftp://example.com/cb"]}, "status_callback_urls[0]"),
    ({"status_callback_urls": "https://example.com/cb"}, "status_callback_urls"),
    ({"group_id": 7}, "group_id"),
    ({"extensions": []}, "extensions"),
])
def test_validation_errors_name_the_field_and_store_nothing(one_server: tuple[LiveServer, Controller], change, field):
    server, controller = one_server
    response = controller.submit({**request_body({"email": "v@example.com"}), **change})
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["field"] == field
    assert server.query("SELECT count(*) FROM dsr_requests") == [(0,)]


def test_bodies_that_are_not_requests(server: LiveServer, workspace):
    _, controller = workspace
    for content in (b"[]", b"{", b"x" * 70_000):
        response = controller.http.post("/v3/requests", content=content, auth=controller.auth)
        assert response.status_code in (400, 413) and response.json()["errors"][0]["field"] == "body"


def test_group_query_and_authentication(server: LiveServer, workspace):
    _, controller = workspace
    in_group = {controller.submitted({"email": f"g{n}@example.com"}, group_id="household-9") for n in range(2)}
    alone = controller.submitted({"email": "g3@example.com"}, skip_waiting_period=False)
    listed = controller.http.get("/v3/requests", params={"group_id": "household-9"}, auth=controller.auth)
    assert {r["subject_request_id"] for r in listed.json()} == in_group
    everything = controller.http.get("/v3/requests", auth=controller.auth).json()
    assert {r["subject_request_id"] for r in everything} == in_group | {alone}

    anonymous = server.client()
    assert anonymous.get(f"/v3/requests/{alone}").status_code == 401
    assert anonymous.post("/v3/requests", json=request_body({"email": "x@example.com"})).status_code == 401
    key_only = server.create_workspace({"key_only_auth": True})
    for call in (lambda h: anonymous.get("/v3/requests", headers=h),
                 lambda h: anonymous.post("/v3/requests", json=request_body({"email": "y@example.com"}), headers=h)):
        assert call({"x-mp-key": key_only.api_key}).status_code == 401
    assert anonymous.get(f"/v3/requests/{alone}", auth=(key_only.api_key, "wrong-secret")).status_code == 401
    stranger = Controller(server, server.create_workspace())
    assert stranger.http.get(f"/v3/requests/{alone}", auth=stranger.auth).status_code == 404
    assert stranger.cancel(alone).status_code == 404
    assert stranger.export(alone).status_code == 404
    assert stranger.http.get("/v3/requests", params={"group_id": "household-9"}, auth=stranger.auth).json() == []
    assert controller.status(alone)["request_status"] == "pending"
    anonymous.close()
    stranger.http.close()


# --- discovery and callbacks -----------------------------------------------------------------------------------------
class CallbackReceiver:
    """A controller's callback endpoint on a loopback port, in a thread: records every POST (headers and the raw
    body), answers with the queued status codes (202 once they run out), and can hold answers until released."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        self.open = threading.Event()
        self.open.set()
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.arrived:
                    receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 202
                    receiver.arrived.notify_all()
                receiver.open.wait()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/opendsr/callbacks"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def wait_for(self, count: int) -> list[tuple[dict[str, str], bytes]]:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.received) >= count)
            return list(self.received)

    def close(self) -> None:
        self.open.set()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    running = CallbackReceiver()
    yield running
    running.close()


def verifier(server: LiveServer) -> Any:
    """Check signatures as a controller does: with the certificate discovery points to, fetched without credentials."""
    with server.client() as anonymous:
        discovery = anonymous.get("/v3/discovery")
        assert discovery.status_code == 200
        certificate = x509.load_pem_x509_certificate(httpx.get(discovery.json()["processor_certificate"]).content)
    key = certificate.public_key()

    def verify(headers: Any, body: bytes) -> None:
        assert headers["x-opendsr-processor-domain"] == "localhost"
        key.verify(base64.b64decode(headers["x-opendsr-signature"]), body, padding.PKCS1v15(), hashes.SHA256())

    verify(discovery.headers, discovery.content)
    return verify


def test_discovery_names_what_is_supported_and_the_certificate(server: LiveServer):
    with server.client() as anonymous:
        discovery = anonymous.get("/v3/discovery").json()
        assert discovery["supported_subject_request_types"] == ["erasure", "access", "portability"]
        assert discovery["supported_api_versions"] == ["3.0"]
        types = {i["identity_type"] for i in discovery["supported_identities"]}
        assert {"email", "controller_customer_id", "customer_id", "mpid", "other", "other10", "mobile_number",
                "phone_number_2", "phone_number_3", "ios_advertising_id", "android_advertising_id"} <= types
        assert {i["identity_format"] for i in discovery["supported_identities"]} == {"raw"}
        pem = anonymous.get(discovery["processor_certificate"].removeprefix(server.base_url)).content
    certificate = x509.load_pem_x509_certificate(pem)
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"
    key_file = Path(str(server.db_path) + ".opendsr-key.pem")
    assert oct(key_file.stat().st_mode & 0o777) == "0o600" and b"PRIVATE KEY" not in pem
    server.restart()  # one key pair per deployment: the same certificate after a restart
    with server.client() as anonymous:
        assert anonymous.get("/v3/processor_certificate.pem").content == pem


def test_callbacks_on_every_status_change_are_signed_with_the_served_certificate(server: LiveServer, workspace,
                                                                                   receiver: CallbackReceiver):
    client, controller = workspace
    verify = verifier(server)
    client.login({"customerid": "cb-cust"})
    submitted = controller.submit(request_body({"customer_id": "cb-cust"}, status_callback_urls=[receiver.url]))
    verify(submitted.headers, submitted.content)  # answers are signed too
    request_id = submitted.json()["subject_request_id"]
    controller.process()
    calls = receiver.wait_for(3)
    for headers, body in calls:
        verify(headers, body)
        assert headers["content-type"] == "application/json"
    bodies = [orjson.loads(body) for _, body in calls]
    assert [b["request_status"] for b in bodies] == ["pending", "in_progress", "completed"]
    assert {(b["subject_request_id"], b["status_callback_url"], b["controller_id"]) for b in bodies} == {
        (request_id, receiver.url, controller.status(request_id)["controller_id"])}
    cancelled = controller.submitted({"email": "cb@example.com"}, skip_waiting_period=False,
                                     status_callback_urls=[receiver.url])
    controller.cancel(cancelled)
    assert [orjson.loads(body)["request_status"] for _, body in receiver.wait_for(5)[3:]] == ["pending", "cancelled"]


def test_failed_callbacks_are_retried_later_in_order_and_never_hold_up_a_request(server: LiveServer, workspace,
                                                                                 receiver: CallbackReceiver):
    client, controller = workspace
    verify = verifier(server)
    client.login({"customerid": "retry-cust"})
    receiver.statuses = [500]
    controller.submitted({"customer_id": "retry-cust"}, status_callback_urls=[receiver.url])
    receiver.wait_for(1)
    controller.process()  # in_progress and completed queue behind the failed pending callback
    assert controller.deliver() == 0
    assert len(receiver.received) == 1
    assert controller.deliver(now_ms() + 60_000) == 3  # the retry is due after 30 s
    calls = receiver.wait_for(4)
    assert [orjson.loads(body)["request_status"] for _, body in calls] == ["pending", "pending", "in_progress",
                                                                           "completed"]
    for headers, body in calls:
        verify(headers, body)
    assert server.query("SELECT attempts, delivered_ms IS NOT NULL FROM dsr_callbacks ORDER BY seq") == [
        (2, True), (1, True), (1, True)]

    # a receiver that does not answer holds up nothing: the request is answered and processed meanwhile
    receiver.open.clear()
    client.login({"customerid": "slow-cust"})
    slow = controller.submitted({"customer_id": "slow-cust"}, status_callback_urls=[receiver.url])
    receiver.wait_for(5)  # the pending callback is being delivered, and left waiting
    assert controller.process() == 1
    assert controller.status(slow)["request_status"] == "completed"
    receiver.open.set()
    controller.deliver()
    assert [orjson.loads(body)["request_status"] for _, body in receiver.wait_for(7)[4:]] == [
        "pending", "in_progress", "completed"]
