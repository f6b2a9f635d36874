"""Events API over real HTTP into a real DuckDB file: storage, identity, attributes, consent, replays, limits."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import IdSyncClient, LiveServer

from engine.event_batches import EVENT_TYPES

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def python_sdk_batch() -> dict[str, Any]:
    return json.loads((FIXTURES / "python-sdk-0.16.1" / "01-events.json").read_text())["body"]


def counts(server: LiveServer) -> tuple[int, ...]:
    return tuple(server.query(f"SELECT count(*) FROM {view}")[0][0]
                 for view in ("events", "batches", "user_attributes", "consent_history", "profiles"))


def send(client: IdSyncClient, batch: Any) -> httpx.Response:
    return client.call("/v2/events", batch)


def test_python_sdk_batch_is_stored_with_every_field(server: LiveServer, idsync):
    client = idsync()
    response = send(client, python_sdk_batch())
    assert response.status_code == 202, response.text
    mpid = int(response.json()["mpid"])
    assert client.identify({"customerid": "cust-123"})["mpid"] == str(mpid)
    events = server.query("""SELECT event_type, event_name, custom_event_type, timestamp_ms, custom_attributes->>'sku',
                                    data->'product_action'->'products'->0->>'name'
                             FROM events WHERE mpid = ? ORDER BY event_index""", mpid)
    assert events == [("custom_event", "Added To Cart", "transaction", 1795330000000, "s1", None),
                      ("screen_view", "Home", None, 1795330001000, None, None),
                      ("commerce_event", None, None, 1795330002000, None, "Shoe")]
    attributes = dict(server.query("SELECT name, value FROM user_attributes WHERE mpid = ?", mpid))
    assert {k: json.loads(v) for k, v in attributes.items()} == {
        "tier": "gold", "$city": "Lisbon", "favourite_colours": ["red", "blue"]}
    consent = server.query("SELECT regulation, purpose, consented, document FROM consent WHERE mpid = ? ORDER BY 1",
                   mpid)
    assert consent == [("ccpa", "data_sale_opt_out", False, "ccpa_v1"), ("gdpr", "marketing", True, "marketing_v1")]
    identities = dict(server.query("SELECT identity_type, raw_value FROM identities WHERE mpid = ?", mpid))
    assert identities["other2"] == "loyalty-9" and identities["ios_idfv"].startswith("07d2ff8e")
    assert "ios_idfa" not in identities  # the all-zero IDFA is a blocked value


def test_every_event_type_is_accepted_and_unknown_fields_are_kept(server: LiveServer, idsync):
    client = idsync()
    events = []
    for event_type in sorted(EVENT_TYPES):
        data: dict[str, Any] = {"timestamp_unixtime_ms": 1_700_000_000_000, "vendor_field": {"kept": event_type}}
        if event_type == "custom_event":
            data.update(event_name="Played", custom_event_type="media")
        if event_type == "screen_view":
            data["screen_name"] = "Settings"
        if event_type == "user_attribute_change":
            data.update(user_attribute_name="plan", new="pro")
        events.append({"event_type": event_type, "data": data})
    batch = {"events": events, "user_identities": {"customer_id": "all-types"}, "unknown_envelope_field": [1, 2]}
    assert send(client, batch).status_code == 202
    stored = server.query("SELECT event_type, data->'vendor_field'->>'kept' FROM events ORDER BY event_index")
    assert stored == [(t, t) for t in sorted(EVENT_TYPES)]
    envelope = server.query("SELECT envelope->'unknown_envelope_field' FROM batches")[0][0]
    assert json.loads(envelope) == [1, 2]


def test_a_batch_with_mpid_must_name_an_existing_profile(server: LiveServer, idsync):
    client = idsync()
    known = client.identify({"email": "a@example.com"})["mpid"]
    assert send(client, {"mpid": known, "events": [{"event_type": "session_start", "data": {}}]}).status_code == 202
    other_workspace = idsync()
    foreign = other_workspace.identify({"email": "b@example.com"})["mpid"]
    before = counts(server)
    response = send(client, {"mpid": "123456789", "events": [{"event_type": "session_start", "data": {}}]})
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "mpid"
    assert send(client, {"mpid": foreign, "events": []}).status_code == 400  # another workspace's profile
    assert counts(server) == before


def test_events_api_identity_spellings_resolve_like_identify(server: LiveServer, idsync):
    client = idsync()
    mpid = client.identify({"customerid": "c-77", "other3": "x-3"})["mpid"]
    for identities in ({"customer_id": "c-77"}, {"customerid": "c-77"}, {"other_id_3": "x-3", "customer_id": "c-77"}):
        response = send(client, {"user_identities": identities, "events": []})
        assert response.json()["mpid"] == mpid, identities


def test_replayed_batch_id_or_source_request_id_stores_nothing_twice(server: LiveServer, idsync):
    client = idsync()
    batch = dict(python_sdk_batch(), batch_id=42)
    assert send(client, batch).json()["status"] == "accepted"
    once = counts(server)
    assert send(client, batch).json()["status"] == "duplicate"
    by_request_id = dict(python_sdk_batch(), source_request_id="req-1")
    assert send(client, by_request_id).json()["status"] == "accepted"
    twice = counts(server)
    server.restart()  # the replay keys survive a restart
    assert send(client, by_request_id).status_code == 202
    bulk = client.call("/v2/bulkevents", [batch, by_request_id, dict(python_sdk_batch(), batch_id=43),
                                          dict(python_sdk_batch(), batch_id=43)])
    assert [r["status"] for r in bulk.json()["results"]] == ["duplicate", "duplicate", "accepted", "duplicate"]
    assert counts(server)[0] == twice[0] + 3 and once[0] == 3


def attribute_batch(customer: str, timestamp: int, attributes: dict[str, Any] | None = None,
                    deleted: list[str] | None = None) -> dict[str, Any]:
    return {"user_identities": {"customer_id": customer}, "timestamp_unixtime_ms": timestamp,
            "user_attributes": attributes or {}, "deleted_user_attributes": deleted or []}


def current_attributes(server: LiveServer) -> dict[str, Any]:
    return {name: json.loads(value) for name, value in server.query("SELECT name, value FROM user_attributes")}


def test_user_attributes_latest_timestamp_wins_in_journal_and_after_folding(server: LiveServer, idsync):
    client = idsync()
    send(client, attribute_batch("c", 2000, {"tier": "gold", "score": 10, "vip": True, "tag": None}))
    send(client, attribute_batch("c", 1000, {"tier": "silver", "colour": "red"}))  # late and older: tier loses
    assert current_attributes(server) == {"tier": "gold", "score": 10, "vip": True, "tag": None, "colour": "red"}
    send(client, attribute_batch("c", 3000, deleted=["score"]))
    server.restart()  # folds the journal into the base tables
    assert current_attributes(server) == {"tier": "gold", "vip": True, "tag": None, "colour": "red"}
    send(client, attribute_batch("c", 2500, {"score": 99, "tier": "bronze"}))  # older than the deletion of score
    send(client, attribute_batch("c", 2000, {"vip": False}))  # same timestamp: the later arrival wins
    expected = {"tier": "bronze", "vip": False, "tag": None, "colour": "red"}
    assert current_attributes(server) == expected
    server.restart()
    assert current_attributes(server) == expected


def test_user_attribute_change_events_set_and_remove_attributes_like_the_web_sdk_sends_them(server: LiveServer, idsync):
    client = idsync()

    def change(name: str, timestamp: int, new: Any = None, deleted: bool = False) -> dict[str, Any]:
        return {"event_type": "user_attribute_change", "data": {
            "user_attribute_name": name, "new": new, "old": None, "deleted": deleted, "is_new_attribute": not deleted,
            "timestamp_unixtime_ms": timestamp}}

    first = dict(attribute_batch("w", 1000, {"plan": "free"}), events=[change("plan", 900, "free"),
                                                                       change("colours", 950, ["red"])])
    assert send(client, first).status_code == 202
    assert current_attributes(server) == {"plan": "free", "colours": ["red"]}
    removal = dict(attribute_batch("w", 2000, {"colours": ["red"]}), events=[change("plan", 1900, deleted=True)])
    assert send(client, removal).status_code == 202
    assert current_attributes(server) == {"colours": ["red"]}
    stale = dict(attribute_batch("w", 1500), events=[change("plan", 1500, "pro")])  # older than the removal
    assert send(client, stale).status_code == 202
    assert current_attributes(server) == {"colours": ["red"]}
    bad = dict(attribute_batch("w", 3000), events=[change("plan", 3000, {"nested": 1})])
    response = send(client, bad)
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "events[0].data.new"


def test_consent_history_keeps_changes_once_and_current_state_is_latest(server: LiveServer, idsync):
    client = idsync()

    def consent(consented: bool, timestamp: int) -> dict[str, Any]:
        return {"user_identities": {"customer_id": "cc"}, "consent_state": {
            "gdpr": {"analytics": {"consented": consented, "timestamp_unixtime_ms": timestamp, "document": "v1"}}}}

    for body in (consent(True, 100), consent(True, 100), consent(False, 200), consent(True, 150)):
        assert send(client, body).status_code == 202
    server.restart()
    assert send(client, consent(False, 200)).status_code == 202  # the same statement again, now after a fold
    history = server.query("SELECT consented, timestamp_ms FROM consent_history ORDER BY timestamp_ms")
    assert history == [(True, 100), (True, 150), (False, 200)]
    assert server.query("SELECT consented FROM consent") == [(False,)]


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda b: b["events"].append({"event_type": "made_up", "data": {}}), "events[3].event_type"),
    (lambda b: b["events"][0]["data"].pop("event_name"), "events[0].data.event_name"),
    (lambda b: b["events"][1]["data"].update(timestamp_unixtime_ms="yesterday"), "events[1].data.timestamp_unixtime_ms"),
    (lambda b: b["user_attributes"].update(nested={"a": 1}), "user_attributes.nested"),
    (lambda b: b["user_attributes"].update(big="x" * 5000), "user_attributes.big"),
    (lambda b: b["consent_state"]["gdpr"]["marketing"].pop("consented"), "consent_state.gdpr.marketing.consented"),
    (lambda b: b["consent_state"].update(lgpd={}), "consent_state.lgpd"),
    (lambda b: b["user_identities"].update(shoe_size="42"), "user_identities.shoe_size"),
    (lambda b: b.update(environment="staging"), "environment"),
    (lambda b: b.update(environment={"name": "prod"}), "environment"),
    (lambda b: b["events"].append({"event_type": ["x"], "data": {}}), "events[3].event_type"),
    (lambda b: b.update(deleted_user_attributes=["tier"]), "deleted_user_attributes[0]"),
    (lambda b: b.update(user_identities={}, device_info={}), "user_identities"),
])
def test_a_bad_batch_gets_400_naming_the_field_and_changes_nothing(server: LiveServer, idsync, mutate, field):
    client = idsync()
    batch = copy.deepcopy(python_sdk_batch())
    mutate(batch)
    before = counts(server)
    response = send(client, batch)
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["field"] == field
    assert counts(server) == before


def big_batch(size: int) -> dict[str, Any]:
    return {"user_identities": {"customer_id": "big"},
            "events": [{"event_type": "custom_event", "data": {"event_name": "x", "custom_attributes": {
                "blob": "y" * (size // 2)}}} for _ in range(2)]}


def test_size_and_count_limits(server: LiveServer, idsync):
    client = idsync()
    before = counts(server)
    too_big_batch = send(client, big_batch(130 * 1024))
    assert too_big_batch.status_code == 413 and too_big_batch.json()["errors"][0]["field"] == "batch"
    too_big_request = client.call("/v2/bulkevents", [big_batch(90 * 1024)] * 3)
    assert too_big_request.status_code == 413
    too_many = client.call("/v2/bulkevents", [attribute_batch("n", 1, {"a": 1})] * 101)
    assert too_many.status_code == 400 and "101 batches" in too_many.json()["errors"][0]["message"]
    assert counts(server) == before
    mixed = client.call("/v2/bulkevents", [big_batch(130 * 1024), attribute_batch("m", 1, {"ok": 1})])
    assert mixed.status_code == 207
    assert [r["status"] for r in mixed.json()["results"]] == ["rejected", "accepted"]
    assert mixed.json()["results"][0]["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert current_attributes(server) == {"ok": 1}
    assert server.query("SELECT count(*) FROM events")[0][0] == 0


def test_bulk_reports_each_batch_and_stores_only_the_good_ones(server: LiveServer, idsync):
    client = idsync()
    good = attribute_batch("g", 5, {"plan": "pro"})
    bad = dict(attribute_batch("b", 5), events=[{"event_type": "custom_event", "data": {}}])
    response = client.call("/v2/bulkevents", [good, bad])
    assert response.status_code == 207
    results = response.json()["results"]
    assert results[0]["status"] == "accepted" and results[0]["mpid"]
    assert results[1]["error"]["field"] == "events[0].data.event_name"
    all_bad = client.call("/v2/bulkevents", [bad, bad])
    assert all_bad.status_code == 400 and all_bad.json()["errors"][0]["field"] == "[0].events[0].data.event_name"
    assert current_attributes(server) == {"plan": "pro"} and counts(server)[1] == 1


def test_credentials(server: LiveServer, idsync):
    client = idsync()
    anonymous = server.client()
    assert anonymous.post("/v2/events", json=python_sdk_batch()).status_code == 401
    key_only = anonymous.post("/v2/events", json=python_sdk_batch(), headers={"x-mp-key": client.auth[0]})
    assert key_only.status_code == 401
    wrong_secret = anonymous.post("/v2/bulkevents", json=[python_sdk_batch()], auth=(client.auth[0], "nope"))
    assert wrong_secret.status_code == 401
    anonymous.close()
    assert counts(server)[1] == 0


def test_web_sdk_upload_path_with_the_captured_batch(server: LiveServer, idsync):
    client = idsync({"key_only_auth": True})
    captured = json.loads((FIXTURES / "web-sdk-2.68" / "06-events.json").read_text())
    mpid = client.identify({"customerid": "webcid-mz7d1xd3"})["mpid"]
    body = dict(captured["body"], mpid=mpid)
    with server.client() as browser:
        response = browser.post(f"/v3/JS/{client.auth[0]}/events", content=json.dumps(body),
                                headers={"content-type": "text/plain;charset=UTF-8"})
        assert response.status_code == 202, response.text
        assert browser.post("/v3/JS/not-a-key/events", content=json.dumps(body)).status_code == 401
    stored = server.query("SELECT mpid, event_type, event_name, session_uuid FROM events")
    event = captured["body"]["events"][0]
    assert stored == [(int(mpid), event["event_type"], event["data"]["event_name"], event["data"]["session_uuid"])]
    assert server.query("SELECT source, source_request_id FROM batches") == [
        ("web", captured["body"]["source_request_id"])]
