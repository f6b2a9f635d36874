"""Audiences over real HTTP (api/audience_routes.py, audiences/registry.py, audiences/upkeep.py): lifecycle,
validation, preview, real-time upkeep after ingest, standard audiences on demand, time-driven evaluation, the
account-wide list, the size chart, the Profile API's memberships, restarts and isolation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from live_server import ADMIN_TOKEN, IdSyncClient, LiveServer

from audiences.upkeep import background_idle

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
HOUR_MS = 3_600_000
PLAYED_TWICE = {"event": {"event_type": "custom_event", "event_name": "play",
                          "count": {"operator": "at_least", "value": 2}}}


def now_ms() -> int:
    return int(time.time() * 1000)


def play(customer: str, timestamp: int | None = None, **fields: Any) -> dict[str, Any]:
    data = {"event_name": "play", "custom_event_type": "other", "timestamp_unixtime_ms": timestamp or now_ms() - 1000}
    return {"user_identities": {"customer_id": customer},
            "events": [{"event_type": "custom_event", "data": data}], **fields}


def settle(server: LiveServer) -> None:
    """Wait for the evaluations and upkeep the server runs in the background."""
    asyncio.run_coroutine_threadsafe(background_idle(server.app.state.background_tasks), server.loop).result()


def on_server(server: LiveServer, coroutine: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(coroutine, server.loop).result()


def members(server: LiveServer, audience_id: int) -> set[int]:
    return {row[0] for row in server.query("SELECT mpid FROM audience_members WHERE audience_id = ?", audience_id)}


def eventually(condition: Callable[[], bool], what: str) -> None:
    """Poll until `condition` holds: background upkeep has no completion signal over HTTP. The limit only keeps
    a broken build from hanging; nothing is asserted about how long it took."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


class Workspace:
    """One workspace's client and its audiences path."""

    def __init__(self, server: LiveServer, client: IdSyncClient) -> None:
        self.server, self.client, self.http, self.auth = server, client, client.http, client.auth
        self.id = server.service.workspaces.by_api_key(client.auth[0]).id
        self.base = f"/platform/v2/workspaces/{self.id}/audiences"

    def ingest(self, batch: dict[str, Any]) -> None:
        response = self.client.call("/v2/events", batch)
        assert response.status_code == 202, response.text

    def mpid(self, customer: str) -> int:
        return int(self.client.identify({"customerid": customer})["mpid"])

    def create(self, body: dict[str, Any], expect: int = 201) -> dict[str, Any]:
        response = self.http.post(self.base, json=body, auth=self.auth)
        assert response.status_code == expect, response.text
        return response.json()

    def get(self, suffix: str = "", **params: Any) -> httpx.Response:
        return self.http.get(f"{self.base}{suffix}", params=params, auth=self.auth)

    def error(self, response: httpx.Response, status: int) -> dict[str, Any]:
        assert response.status_code == status, response.text
        return response.json()["errors"][0]

    def memberships(self, mpid: int) -> list[dict[str, Any]]:
        profile = self.http.get(f"/userprofile/v1/1/1/{self.id}/{mpid}", params={"fields": "audience_memberships"},
                                auth=self.auth)
        assert profile.status_code == 200, profile.text
        return profile.json()["audience_memberships"]


@pytest.fixture
def workspace(server: LiveServer, idsync: Callable[..., IdSyncClient]) -> Workspace:
    return Workspace(server, idsync())


def test_lifecycle_preview_real_time_upkeep_and_delete(server: LiveServer, workspace: Workspace):
    w = workspace
    for customer, plays in (("a", 3), ("b", 1), ("c", 2)):
        for n in range(plays):
            w.ingest(play(customer, now_ms() - 1000 * (n + 1)))
    a, b, c = w.mpid("a"), w.mpid("b"), w.mpid("c")
    body = {"name": "players", "description": "played at least twice", "criteria": PLAYED_TWICE}

    preview = w.http.post(f"{w.base}/preview", json=body, auth=w.auth)
    assert preview.status_code == 200, preview.text
    assert preview.json()["size"] == 2 and preview.json()["sample"] == [str(m) for m in sorted({a, c})]
    assert server.query("SELECT count(*) FROM audience_definitions") == [(0,)]  # a dry run stores nothing

    created = w.create(body)
    assert isinstance(created["id"], int) and created["workspaces"] == [w.id] and created["connected_outputs"] == []
    assert created["external_name"] == "players" and created["type"] == "real_time"
    audience = created["id"]
    settle(server)
    shown = w.get(f"/{audience}").json()
    assert shown["status"] == "ready" and shown["size"] == 2 and shown["stats"]["adds_24h"] == 2
    assert members(server, audience) == {a, c}  # what the preview said
    assert w.get(f"/{audience}/calculation").json()["status"] == "ready"
    assert [x["name"] for x in w.get(name="players").json()["data"]] == ["players"]
    assert w.get(name="nobody").json()["data"] == []

    # real time: b's second play makes it a member, seen through the Profile API
    assert w.memberships(b) == []
    w.ingest(play("b"))
    eventually(lambda: [m["audience_id"] for m in w.memberships(b)] == [audience], "b entered the audience")
    [membership] = w.memberships(b)
    assert membership["audience_name"] == "players" and membership["expiration_timestamp_ms"] is None

    # an update evaluates again: three plays now
    changed = w.http.put(f"{w.base}/{audience}", auth=w.auth, json={
        "criteria": {"event": {"event_name": "play", "count": {"operator": "at_least", "value": 3}}}})
    assert changed.status_code == 200, changed.text
    assert changed.json()["description"] == "played at least twice"  # left out, kept
    settle(server)
    assert members(server, audience) == {a}
    history = server.query("SELECT mpid, exited_ms IS NOT NULL FROM audience_membership_history "
                           "WHERE audience_id = ? ORDER BY mpid", audience)
    assert sorted(history) == sorted([(a, False), (b, True), (c, True)])

    chart = w.get(f"/{audience}/size.svg")
    assert chart.status_code == 200 and chart.headers["content-type"] == "image/svg+xml"
    assert chart.text.startswith("<svg") and "players" in chart.text

    assert w.http.delete(f"{w.base}/{audience}", auth=w.auth).status_code == 204
    assert w.get(f"/{audience}").status_code == 404
    assert server.query("SELECT count(*) FROM audience_membership_history WHERE audience_id = ?", audience) == [(0,)]
    assert server.query("SELECT count(*) FROM audience_sizes WHERE audience_id = ?", audience) == [(0,)]
    assert w.memberships(a) == []
    assert w.create(body)["id"] > audience  # ids are not handed out again


def test_standard_audiences_are_computed_on_demand_and_on_schedule(server: LiveServer, workspace: Workspace):
    w = workspace
    w.ingest(play("s", now_ms() - 2000))
    w.ingest(play("s", now_ms() - 1000))
    s = w.mpid("s")
    created = w.create({"name": "weekly players", "type": "standard", "refresh_minutes": 10080,
                        "criteria": PLAYED_TWICE})
    assert created["refresh_minutes"] == 10080
    audience = created["id"]
    settle(server)
    assert w.get(f"/{audience}/calculation").json()["status"] == "ready"
    assert members(server, audience) == {s}

    # ingest does not touch a standard audience; a calculation does
    w.ingest(play("t", now_ms() - 2000))
    w.ingest(play("t", now_ms() - 1000))
    t = w.mpid("t")
    settle(server)
    assert members(server, audience) == {s}
    asked = w.http.post(f"{w.base}/{audience}/calculation", auth=w.auth)
    assert asked.status_code == 202 and asked.json()["status"] in ("calculating", "ready")
    eventually(lambda: w.get(f"/{audience}/calculation").json()["status"] == "ready", "the calculation finished")
    settle(server)
    assert members(server, audience) == {s, t}
    computed = w.get(f"/{audience}/calculation").json()["completed_timestamp_ms"]
    assert w.get(f"/{audience}").json()["last_computed_timestamp_ms"] == computed

    upkeep = server.app.state.upkeep
    assert on_server(server, upkeep.evaluate_due_standard(computed + 60_000)) == []  # a week has not passed
    assert on_server(server, upkeep.evaluate_due_standard(computed + 7 * 24 * HOUR_MS)) == [audience]
    settle(server)
    assert w.get(f"/{audience}/calculation").json()["completed_timestamp_ms"] > computed


def test_time_windows_and_calculated_attributes(server: LiveServer, workspace: Workspace):
    w = workspace
    moment = now_ms()
    w.ingest(play("recent", moment - HOUR_MS))
    recent = w.mpid("recent")
    lately = w.create({"name": "played lately", "criteria": {"event": {
        "event_name": "play", "time_period": {"type": "within_last", "value": 2, "unit": "hours"}}}})["id"]
    settle(server)
    assert members(server, lately) == {recent}
    upkeep = server.app.state.upkeep
    assert on_server(server, upkeep.evaluate_time_driven(moment + 30 * 60_000)) == [lately]
    assert members(server, lately) == {recent}
    on_server(server, upkeep.evaluate_time_driven(moment + 2 * HOUR_MS))  # the play left the window
    assert members(server, lately) == set()

    # a calculated attribute read by a real-time audience: refreshed first, then the audience
    ca_base = f"/platform/v2/workspaces/{w.id}/calculatedattributes"
    plays = w.http.post(ca_base, auth=w.auth, json={"name": "plays", "draft_definition": {
        "calculation_type": "count", "data_point": {"event_type": "custom_event", "event_name": "play"}}}).json()["id"]
    not_active = w.create({"name": "fans", "criteria": {"calculated_attribute": {
        "id": plays, "operator": "greater_than_or_equal", "values": [2]}}}, expect=400)
    assert not_active["errors"][0]["field"] == "criteria.calculated_attribute.id"
    assert w.http.post(f"{ca_base}/{plays}/activation", auth=w.auth).status_code == 204
    fans = w.create({"name": "fans", "criteria": {"calculated_attribute": {
        "id": plays, "operator": "greater_than_or_equal", "values": [2]}}})["id"]
    settle(server)
    assert members(server, fans) == set()
    w.ingest(play("recent"))
    eventually(lambda: members(server, fans) == {recent}, "the calculated attribute reached 2 and the audience")
    refused = w.error(w.http.delete(f"{ca_base}/{plays}", auth=w.auth), 409)
    assert f"audience {fans} ('fans')" in refused["message"]
    assert w.http.delete(f"{w.base}/{fans}", auth=w.auth).status_code == 204
    assert w.http.delete(f"{ca_base}/{plays}", auth=w.auth).status_code == 204


def test_audiences_of_audiences_and_restart(server: LiveServer, workspace: Workspace):
    w = workspace
    w.client.login({"customerid": "m", "email": "m@example.com"})
    w.ingest(play("m"))
    w.ingest(play("n"))
    m, n = w.mpid("m"), w.mpid("n")
    emailed = w.create({"name": "emailed", "criteria": {"identity": {"type": "email"}}})["id"]
    played = w.create({"name": "played", "criteria": {"event": {"event_name": "play"}}})["id"]
    both = w.create({"name": "emailed players", "criteria": {"all": [
        {"audience": {"id": emailed}}, {"audience": {"id": played}}]}})["id"]
    settle(server)
    assert members(server, both) == {m}

    circle = w.error(w.http.put(f"{w.base}/{emailed}", auth=w.auth,
                                json={"criteria": {"audience": {"id": both}}}), 400)
    assert circle["field"] == "criteria.audience.id" and "circle" in circle["message"]
    refused = w.error(w.http.delete(f"{w.base}/{played}", auth=w.auth), 409)
    assert f"audience {both} ('emailed players')" in refused["message"]

    # changing what it reads re-evaluates the real-time reader too
    assert w.http.put(f"{w.base}/{emailed}", auth=w.auth,
                      json={"criteria": {"identity": {"type": "email", "present": False}}}).status_code == 200
    settle(server)
    assert members(server, emailed) == {n} and members(server, both) == {n}

    server.restart()  # definitions are durable; start-up evaluates every audience again
    settle(server)
    listed = w.get().json()["data"]
    assert [(x["id"], x["status"]) for x in listed] == [(emailed, "ready"), (played, "ready"), (both, "ready")]
    assert members(server, both) == {n}
    w.ingest(play("o"))
    o = w.mpid("o")
    settle(server)
    assert members(server, played) == {m, n, o} and members(server, both) == {n, o}


def test_validation_names_fields(server: LiveServer, workspace: Workspace):
    w = workspace
    valid = {"name": "valid", "criteria": PLAYED_TWICE}
    cases = [
        ([], "body"),
        ({"criteria": PLAYED_TWICE}, "name"),
        ({"name": "x"}, "criteria"),
        ({"name": "x", "type": "sometimes", "criteria": PLAYED_TWICE}, "type"),
        ({"name": "x", "type": "standard", "refresh_minutes": 1, "criteria": PLAYED_TWICE}, "refresh_minutes"),
        ({"name": "x", "criteria": {"all": [PLAYED_TWICE, {"event": {
            "event_name": "play", "count": {"operator": "at_least", "value": -1}}}]}}, "criteria.all[1].event.count.value"),
        ({"name": "x", "criteria": {"audience": {"id": 999}}}, "criteria.audience.id"),
        ({"name": "x", "criteria": {"identity": {"type": "shoe size"}}}, "criteria.identity.type"),
    ]
    for body, field in cases:
        assert w.error(w.http.post(w.base, json=body, auth=w.auth), 400)["field"] == field, body
        if isinstance(body, dict) and "criteria" in body and field.startswith("criteria"):
            preview = w.http.post(f"{w.base}/preview", json=body, auth=w.auth)
            assert w.error(preview, 400)["field"] == field
    assert w.error(w.http.post(w.base, content=b"{not json", auth=w.auth), 400)["field"] == "body"
    assert w.error(w.http.post(f"{w.base}/preview", json={"name": "no criteria"}, auth=w.auth), 400)["field"] == "criteria"
    audience = w.create(valid)["id"]
    assert "exists" in w.error(w.http.post(w.base, json=valid, auth=w.auth), 409)["message"]
    other = w.create({"name": "other", "criteria": PLAYED_TWICE})["id"]
    assert w.error(w.http.put(f"{w.base}/{other}", json={"name": "valid"}, auth=w.auth), 409)
    assert w.error(w.http.put(f"{w.base}/{other}", json={"refresh_minutes": 30}, auth=w.auth), 400)["field"] == \
        "refresh_minutes"  # a real-time audience has no refresh interval
    assert w.error(w.get("/abc"), 400)["field"] == "audience_id"
    for suffix in ("/12345", "/12345/calculation", "/12345/size.svg"):
        w.error(w.get(suffix), 404)
    w.error(w.http.put(f"{w.base}/12345", json=valid, auth=w.auth), 404)
    w.error(w.http.delete(f"{w.base}/12345", auth=w.auth), 404)
    w.error(w.http.post(f"{w.base}/12345/calculation", auth=w.auth), 404)
    assert w.error(w.get(f"/{audience}/size.svg", since="yesterday"), 400)["field"] == "since"
    assert w.error(w.get(f"/{audience}/size.svg", since=str(1 << 63)), 400)["field"] == "since"
    assert w.get(f"/{audience}/size.svg", since="0", until=str(now_ms())).status_code == 200
    settle(server)


def test_account_listing_and_isolation(server: LiveServer, idsync: Callable[..., IdSyncClient]):
    mine, theirs = Workspace(server, idsync()), Workspace(server, idsync())
    own = mine.create({"name": "mine", "criteria": PLAYED_TWICE})["id"]
    foreign = theirs.create({"name": "theirs", "criteria": PLAYED_TWICE})["id"]
    settle(server)

    listed = mine.http.get("/platform/v2/audiences", params={"accountId": "1"}, headers=ADMIN)
    assert listed.status_code == 200, listed.text
    assert {(x["id"], x["workspaces"][0]) for x in listed.json()["data"]} == {(own, mine.id), (foreign, theirs.id)}
    assert mine.http.get("/platform/v2/audiences", headers=ADMIN).status_code == 200  # accountId names nothing more
    assert mine.http.get("/platform/v2/audiences", auth=mine.auth).status_code == 401  # workspace keys: no
    assert mine.http.get("/platform/v2/audiences").status_code == 401
    assert mine.http.get(f"{theirs.base}/{foreign}", headers=ADMIN).json()["name"] == "theirs"

    # the other workspace's path: 403, whatever follows; its audience under one's own path: 404, as a made-up id
    body = {"name": "x", "criteria": PLAYED_TWICE}
    for method, suffix, sent in [("GET", "", None), ("POST", "", body), ("POST", "/preview", body),
                                 ("GET", f"/{foreign}", None), ("PUT", f"/{foreign}", body), ("DELETE", f"/{foreign}", None),
                                 ("GET", f"/{foreign}/size.svg", None), ("GET", f"/{foreign}/calculation", None),
                                 ("POST", f"/{foreign}/calculation", None)]:
        crossed = mine.http.request(method, f"{theirs.base}{suffix}", json=sent, auth=mine.auth)
        assert crossed.status_code == 403, (method, suffix, crossed.text)
        assert mine.http.request(method, f"{theirs.base}{suffix}", json=sent).status_code == 401
        if suffix.startswith(f"/{foreign}"):
            under_own = mine.http.request(method, f"{mine.base}{suffix}", json=sent, auth=mine.auth)
            assert under_own.status_code == 404, (method, suffix, under_own.text)
    # another workspace's audience cannot be read through criteria either
    assert mine.error(mine.http.post(f"{mine.base}/preview", auth=mine.auth,
                                     json={"criteria": {"audience": {"id": foreign}}}), 400)["field"] == \
        "criteria.audience.id"
    assert [x["id"] for x in mine.get().json()["data"]] == [own]
