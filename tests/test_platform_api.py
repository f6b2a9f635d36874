"""Platform API: workspaces (secrets shown once, stored hashed), settings validation, graph views."""

from __future__ import annotations

import pytest
from live_server import ADMIN_TOKEN, IdSyncClient, LiveServer

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_create_returns_secret_once_and_stores_only_hash_and_sealed_copy(server: LiveServer):
    ws = server.create_workspace({"strategy": "profile_link"}, name="shop")
    with server.client() as http:
        got = http.get(f"/platform/v2/workspaces/{ws.id}", headers=ADMIN).json()
    assert "api_secret" not in got and got["api_key"] == ws.api_key
    row = server.service.connection.cursor().execute(
        "SELECT * FROM workspaces WHERE id = ?", [ws.id]).fetchone()
    assert not any(ws.api_secret in str(column) for column in row)
    db_bytes = server.db_path.read_bytes() + server.db_path.with_suffix(".duckdb.wal").read_bytes() \
        if server.db_path.with_suffix(".duckdb.wal").exists() else server.db_path.read_bytes()
    assert ws.api_secret.encode() not in db_bytes


@pytest.mark.parametrize("strategy, login_ids", [
    ("default", ["customerid"]), ("profile_conversion", ["customerid"]),
    ("profile_link", ["customerid", "email"]), ("profile_isolation", ["customerid", "email"]),
    ("best_match", []),
])
def test_strategy_defaults_follow_the_spec_table(server: LiveServer, strategy: str, login_ids: list[str]):
    ws = server.create_workspace({"strategy": strategy})
    with server.client() as http:
        settings = http.get(f"/platform/v2/workspaces/{ws.id}", headers=ADMIN).json()["settings"]
    assert settings["login_ids"] == login_ids and settings["unique_ids"] == login_ids
    assert settings["key_only_auth"] is False and settings["hub_limit"] == 10


@pytest.mark.parametrize("settings, field", [
    ({"strategy": "magic"}, "settings.strategy"),
    ({"login_ids": ["not_a_type"]}, "settings.login_ids"),
    ({"strategy": "default", "login_ids": ["email"]}, "settings.login_ids"),
    ({"strategy": "best_match", "login_ids": ["email"]}, "settings.login_ids"),
    ({"strategy": "profile_conversion", "immutable_ids": ["email"]}, "settings.immutable_ids"),
    ({"hub_limit": 1}, "settings.hub_limit"),
    ({"blocked_patterns": ["("]}, "settings.blocked_patterns"),
    ({"normalization": {"email": ["shout"]}}, "settings.normalization.email"),
    ({"rate_limit": {"requests_per_second": -1}}, "settings.rate_limit.requests_per_second"),
    ({"colour": "blue"}, "settings.colour"),
])
def test_invalid_settings_get_400_naming_the_field_and_create_nothing(server: LiveServer, settings, field):
    with server.client() as http:
        response = http.post("/platform/v2/workspaces", json={"name": "x", "settings": settings}, headers=ADMIN)
        listed = http.get("/platform/v2/workspaces", headers=ADMIN).json()["workspaces"]
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["field"] == field
    assert listed == []


def test_update_changes_settings_and_survives_restart_and_bad_update_changes_nothing(server: LiveServer):
    ws = server.create_workspace({"strategy": "profile_conversion"})
    with server.client() as http:
        updated = http.put(f"/platform/v2/workspaces/{ws.id}", headers=ADMIN,
                           json={"name": "renamed", "settings": {"strategy": "profile_isolation"}})
        bad = http.put(f"/platform/v2/workspaces/{ws.id}", headers=ADMIN, json={"settings": {"hub_limit": "x"}})
    assert updated.status_code == 200 and bad.status_code == 400
    server.restart()
    with server.client() as http:
        got = http.get(f"/platform/v2/workspaces/{ws.id}", headers=ADMIN).json()
    assert got["name"] == "renamed" and got["settings"]["strategy"] == "profile_isolation"
    assert got["settings"]["login_ids"] == ["customerid", "email"]


def test_platform_needs_admin_and_workspace_credentials_see_only_their_own(server: LiveServer):
    mine, other = server.create_workspace(name="mine"), server.create_workspace(name="other")
    with server.client() as http:
        assert http.post("/platform/v2/workspaces", json={"name": "x"}).status_code == 401
        assert http.get("/platform/v2/workspaces", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get(f"/platform/v2/workspaces/{mine.id}", auth=(mine.api_key, mine.api_secret)).status_code == 200
        assert http.get(f"/platform/v2/workspaces/{other.id}",
                        auth=(mine.api_key, mine.api_secret)).status_code == 403
        assert http.put(f"/platform/v2/workspaces/{mine.id}", json={"name": "y"},
                        auth=(mine.api_key, mine.api_secret)).status_code == 401


def test_workspaces_do_not_share_identities(server: LiveServer):
    first = IdSyncClient(server, server.create_workspace())
    second = IdSyncClient(server, server.create_workspace())
    a = first.identify({"email": "same@example.com"})
    b = second.identify({"email": "same@example.com"})
    assert a["mpid"] != b["mpid"]
    assert second.search({"customerid": "only-in-first"}).status_code == 404
    first.close()
    second.close()


def test_profile_graph_json_and_svg_show_identities_neighbours_and_aliases(server: LiveServer):
    ws = server.create_workspace({"strategy": "profile_link"})
    client = IdSyncClient(server, ws)
    anonymous = client.identify({"ios_idfv": "shared-device"})["mpid"]
    known = client.login({"customerid": "c1", "ios_idfv": "shared-device"})["mpid"]
    assert client.alias(anonymous, known).status_code == 202
    with server.client() as http:
        graph = http.get(f"/platform/v2/workspaces/{ws.id}/profiles/{known}/graph", headers=ADMIN).json()
        svg = http.get(f"/platform/v2/workspaces/{ws.id}/profiles/{known}/graph?format=svg", headers=ADMIN)
        missing = http.get(f"/platform/v2/workspaces/{ws.id}/profiles/12345/graph", headers=ADMIN)
    assert {(i["type"], i["value"]) for i in graph["identities"]} == {("customerid", "c1"),
                                                                     ("ios_idfv", "shared-device")}
    assert graph["neighbours"] == [{"mpid": anonymous,
                                    "shared_identities": [{"type": "ios_idfv", "value": "shared-device"}]}]
    assert graph["aliases"][0]["source_mpid"] == anonymous and graph["aliases"][0]["destination_mpid"] == known
    assert svg.headers["content-type"].startswith("image/svg+xml") and f"MPID {anonymous}" in svg.text
    assert missing.status_code == 404
    client.close()
