"""Calculated attributes over real HTTP: lifecycle, full computation at activation, incremental upkeep on
ingest, values in the Profile API and SQL."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from live_server import ADMIN_TOKEN, LiveServer

from api.ca_routes import background_idle, refresh_time_driven

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HOUR_MS = 3_600_000
SPEND = {"calculation_type": "sum", "data_point": {"event_type": "commerce_event",
                                                   "attribute_name": "data.product_action.total_amount"}}
FAVOURITE = {"calculation_type": "most_frequent",
             "data_point": {"event_type": "custom_event", "event_name": "Viewed", "attribute_name": "category"},
             "conditions": [{"attribute_name": "price", "operator": "greater_than", "values": [10]}]}


def purchase(customer: str, amount: float, timestamp: int) -> dict[str, Any]:
    return {"user_identities": {"customer_id": customer}, "events": [
        {"event_type": "commerce_event", "data": {"timestamp_unixtime_ms": timestamp,
                                                  "product_action": {"action": "purchase", "total_amount": amount}}}]}


def viewed(customer: str, category: str, price: float, timestamp: int) -> dict[str, Any]:
    return {"user_identities": {"customer_id": customer}, "events": [
        {"event_type": "custom_event", "data": {"event_name": "Viewed", "custom_event_type": "navigation",
                                                "timestamp_unixtime_ms": timestamp,
                                                "custom_attributes": {"category": category, "price": price}}}]}


def settle(server: LiveServer) -> None:
    """Wait for the computations the server started in the background (activation, incremental upkeep)."""
    tasks = server.app.state.background_tasks
    asyncio.run_coroutine_threadsafe(background_idle(tasks), server.loop).result()


def values(server: LiveServer, ca_id: int) -> dict[int, Any]:
    import json
    return {mpid: json.loads(v) for mpid, v in server.query(
        "SELECT mpid, value FROM calculated_attribute_values WHERE ca_id = ? AND value IS NOT NULL", ca_id)}


def other_workspace(idsync) -> tuple[str, str]:
    return idsync().auth


def test_lifecycle_computation_and_upkeep(server: LiveServer, idsync):
    client = idsync()
    ws = server.service.workspaces.by_api_key(client.auth[0]).id
    base = f"/platform/v2/workspaces/{ws}/calculatedattributes"
    http = client.http
    for batch in (purchase("a", 10, 1_000), purchase("a", 5.5, 2_000), purchase("b", 7, 3_000),
                  viewed("a", "shoes", 20, 1_000), viewed("a", "bags", 30, 2_000), viewed("a", "shoes", 5, 3_000),
                  viewed("a", "bags", 50, 4_000)):
        assert client.call("/v2/events", batch).status_code == 202
    mpid_a = int(client.identify({"customerid": "a"})["mpid"])
    mpid_b = int(client.identify({"customerid": "b"})["mpid"])

    assert http.head(base, auth=client.auth).status_code == 404
    created = http.post(base, json={"name": "lifetime spend", "draft_definition": SPEND}, auth=client.auth)
    assert created.status_code == 201, created.text
    spend = created.json()["id"]
    assert isinstance(spend, int)
    assert http.head(base, params={"name": "lifetime spend"}, auth=client.auth).status_code == 204
    assert http.head(base, params={"name": "other"}, auth=client.auth).status_code == 404
    assert http.get(f"{base}/{spend}/calculation", auth=client.auth).json()["status"] == "not_started"

    assert http.post(f"{base}/{spend}/activation", auth=client.auth).status_code == 204
    settle(server)
    assert http.get(f"{base}/{spend}/calculation", auth=client.auth).json()["status"] == "ready"
    assert values(server, spend) == {mpid_a: 15.5, mpid_b: 7.0}
    activation = http.get(f"{base}/{spend}/activation", auth=client.auth).json()
    assert activation["is_activated"] and activation["activated_by"].startswith("workspace:")

    # incremental: a new purchase changes only its profile's value
    assert client.call("/v2/bulkevents", [purchase("b", 3, 5_000)]).status_code == 202
    settle(server)
    assert values(server, spend) == {mpid_a: 15.5, mpid_b: 10.0}

    # name fixed after activation; draft edits do not touch the active definition until activated again
    renamed = http.put(f"{base}/{spend}", json={"name": "renamed"}, auth=client.auth)
    assert renamed.status_code == 400 and renamed.json()["errors"][0]["field"] == "name"
    assert http.put(f"{base}/{spend}", json={"description": "all purchases",
                                            "draft_definition": dict(SPEND, calculation_type="max")},
                    auth=client.auth).status_code == 204
    shown = http.get(f"{base}/{spend}", auth=client.auth).json()
    assert shown["active_definition"]["calculation_type"] == "sum"
    assert shown["draft_definition"]["calculation_type"] == "max" and shown["description"] == "all purchases"
    assert http.delete(f"{base}/{spend}/draft", auth=client.auth).status_code == 204
    assert http.get(f"{base}/{spend}", auth=client.auth).json()["draft_definition"] is None

    favourite = http.post(base, json={"name": "favourite category", "draft_definition": FAVOURITE},
                          headers=ADMIN).json()["id"]
    assert http.post(f"{base}/{favourite}/activation", headers=ADMIN).status_code == 204
    settle(server)
    assert values(server, favourite) == {mpid_a: "bags"}  # shoes at 5 does not pass price > 10

    profile = http.get(f"/userprofile/v1/1/2/{ws}/{mpid_a}", params={"fields": "user_attributes"}, auth=client.auth)
    assert profile.json()["user_attributes"] == {"lifetime spend": "15.5", "favourite category": "bags"}
    listed = http.get(base, auth=client.auth).json()["data"]
    assert [ca["name"] for ca in listed] == ["lifetime spend", "favourite category"]

    through_sql = http.post("/v1/sql", auth=client.auth, json={"sql": f"""
        SELECT c.name, v.value FROM calculated_attribute_values v JOIN calculated_attributes c ON c.id = v.ca_id
        WHERE v.mpid = {mpid_a} ORDER BY c.name"""})
    assert through_sql.status_code == 200, through_sql.text
    assert through_sql.json()["rows"] == [["favourite category", "bags"], ["lifetime spend", 15.5]]
    assert http.post("/v1/sql", auth=other_workspace(idsync), json={
        "sql": "SELECT count(*) FROM calculated_attribute_values"}).json()["rows"] == [[0]]

    server.restart()  # definitions and values are durable
    assert values(server, spend) == {mpid_a: 15.5, mpid_b: 10.0}
    assert http.delete(f"{base}/{favourite}", auth=client.auth).status_code == 204
    assert http.get(f"{base}/{favourite}", auth=client.auth).status_code == 404
    assert values(server, favourite) == {}


def test_windowed_values_change_when_time_passes(server: LiveServer, idsync):
    client = idsync()
    ws = server.service.workspaces.by_api_key(client.auth[0]).id
    base = f"/platform/v2/workspaces/{ws}/calculatedattributes"
    now = int(time.time() * 1000)
    for batch in (purchase("w", 4, now - 2 * HOUR_MS), purchase("w", 6, now - 30 * 60_000),
                  purchase("w", 100, now + HOUR_MS)):  # a clock ahead: counts once its time has come
        assert client.call("/v2/events", batch).status_code == 202
    mpid = int(client.identify({"customerid": "w"})["mpid"])
    recent = dict(SPEND, time_period={"type": "within_last", "value": 1, "unit": "hours"})
    ca = client.http.post(base, json={"name": "spend last hour", "draft_definition": recent}, auth=client.auth).json()
    assert client.http.post(f"{base}/{ca['id']}/activation", auth=client.auth).status_code == 204
    settle(server)
    assert values(server, ca["id"]) == {mpid: 6.0}

    def at(moment: int) -> int:
        return asyncio.run_coroutine_threadsafe(refresh_time_driven(server.app, moment), server.loop).result()

    assert at(now + 10 * 60_000) == 0  # nothing has changed yet
    assert at(now + 31 * 60_000) == 1 and values(server, ca["id"]) == {}  # the 6 left the window
    assert at(now + HOUR_MS) == 1 and values(server, ca["id"]) == {mpid: 100.0}  # the future purchase counts
    assert at(now + 2 * HOUR_MS + 1) == 1 and values(server, ca["id"]) == {}


def test_seeds_combine_with_later_events(server: LiveServer, idsync):
    client = idsync()
    ws = server.service.workspaces.by_api_key(client.auth[0]).id
    base = f"/platform/v2/workspaces/{ws}/calculatedattributes"
    for batch in (purchase("s", 40, 1_000), purchase("s", 2, 5_000)):
        assert client.call("/v2/events", batch).status_code == 202
    mpid = int(client.identify({"customerid": "s"})["mpid"])
    ca = client.http.post(base, json={"name": "spend", "draft_definition": SPEND}, auth=client.auth).json()["id"]
    assert client.http.post(f"{base}/{ca}/activation", auth=client.auth).status_code == 204
    settle(server)
    assert values(server, ca) == {mpid: 42.0}
    # the seed stands for everything up to its date (the purchase of 40 included); the later 2 adds to it
    seeded = client.http.post(f"{base}/{ca}/seeds", auth=client.auth,
                              json={"seeds": [{"mpid": str(mpid), "value": 500, "as_of": 2_000}]})
    assert seeded.status_code == 202, seeded.text
    assert values(server, ca) == {mpid: 502.0}
    assert client.call("/v2/events", purchase("s", 8, 6_000)).status_code == 202
    settle(server)
    assert values(server, ca) == {mpid: 510.0}
    bad = client.http.post(f"{base}/{ca}/seeds", auth=client.auth, json={"seeds": [{"mpid": mpid, "value": "lots",
                                                                                     "as_of": 2_000}]})
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "seeds[0].value"
    unknown = client.http.post(f"{base}/{ca}/seeds", auth=client.auth,
                               json={"seeds": [{"mpid": 12345, "value": 1, "as_of": 2_000}]})
    assert unknown.status_code == 400
    server.restart()
    assert client.http.post(f"{base}/{ca}/activation", auth=client.auth).status_code == 400  # no draft left
    assert values(server, ca) == {mpid: 510.0}


def test_validation_isolation_and_limits(server: LiveServer, idsync):
    client, other = idsync(), idsync()
    ws = server.service.workspaces.by_api_key(client.auth[0]).id
    base = f"/platform/v2/workspaces/{ws}/calculatedattributes"
    bad = client.http.post(base, json={"name": "x", "draft_definition": {"calculation_type": "sum",
                                                                          "data_point": {"event_name": "Buy"}}},
                           auth=client.auth)
    assert bad.status_code == 400
    assert bad.json()["errors"][0]["field"] == "draft_definition.data_point.attribute_name"
    assert client.http.post(base, json={"draft_definition": SPEND}, auth=client.auth).status_code == 400
    ok = client.http.post(base, json={"name": "spend", "draft_definition": SPEND}, auth=client.auth)
    assert client.http.post(base, json={"name": "spend", "draft_definition": SPEND},
                            auth=client.auth).status_code == 409
    assert client.http.get(base, auth=other.auth).status_code == 403
    assert client.http.get(base).status_code == 401
    assert client.http.get(base, headers={"x-mp-key": client.auth[0]}).status_code == 401
    other_ws = server.service.workspaces.by_api_key(other.auth[0]).id
    foreign = client.http.get(f"/platform/v2/workspaces/{other_ws}/calculatedattributes/{ok.json()['id']}",
                              auth=other.auth)
    assert foreign.status_code == 404
    assert server.query("SELECT count(*) FROM calculated_attributes") == [(1,)]
