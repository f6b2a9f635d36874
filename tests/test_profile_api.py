"""Profile API (spec B§11) over real HTTP: only the requested fields, Profile API names, lookup by immutable id."""

from __future__ import annotations

from live_server import ADMIN_TOKEN, LiveServer

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def seed(client) -> str:
    batch = {
        "user_identities": {"customer_id": "Cust-9", "email": "Nine@Example.com", "other_id_2": "loyal-9"},
        "device_info": {"android_uuid": "a1b2c3", "android_advertising_id": "gaid-1"},
        "user_attributes": {"ltv": 342.1, "$city": "New York", "recs": ["123849", 294933], "vip": True, "tag": None},
        "events": [{"event_type": "custom_event", "data": {
            "event_name": "attribution", "custom_event_type": "attribution", "timestamp_unixtime_ms": 1_700_000_000_000,
            "custom_attributes": {"publisher": "adnet", "campaign": "spring"}}}],
    }
    response = client.call("/v2/events", batch)
    assert response.status_code == 202, response.text
    return response.json()["mpid"]


def test_profile_has_only_the_requested_fields_in_profile_api_shape(server: LiveServer, idsync):
    client = idsync()
    mpid = seed(client)
    workspace_id = server.service.workspaces.by_api_key(client.auth[0]).id
    url = f"/userprofile/v1/1/2/{workspace_id}/{mpid}"
    everything = client.http.get(url, params={"fields": "device_identities,user_identities,user_attributes,"
                                                         "audience_memberships,attribution"}, auth=client.auth)
    assert everything.status_code == 200, everything.text
    body = everything.json()
    assert body["mpid"] == int(mpid) and isinstance(body["mpid"], int)
    assert body["created_timestamp_ms"] <= body["last_stored_timestamp_ms"]
    assert body["user_identities"] == [
        {"type": "customer_id", "encoding": "none", "value": "Cust-9"},
        {"type": "email", "encoding": "none", "value": "Nine@Example.com"},
        {"type": "other_id_2", "encoding": "none", "value": "loyal-9"}]
    assert body["device_identities"] == [
        {"type": "google_advertising_id", "encoding": "none", "value": "gaid-1"},
        {"type": "android_id", "encoding": "none", "value": "a1b2c3"}]
    assert body["user_attributes"] == {"$city": "New York", "ltv": "342.1", "recs": ["123849", "294933"],
                                       "tag": None, "vip": "true"}
    assert body["audience_memberships"] == []
    assert body["attribution"] == {"publisher": "adnet", "campaign": "spring", "timestamp_ms": 1_700_000_000_000}
    assert body["is_opted_out"] is False

    only_attributes = client.http.get(url, params={"fields": "user_attributes"}, auth=client.auth).json()
    assert "user_attributes" in only_attributes
    assert not {"user_identities", "device_identities", "audience_memberships", "attribution"} & set(only_attributes)
    assert client.http.get(url, params={"fields": "user_attributes"}, headers=ADMIN).json() == only_attributes


def test_lookup_by_immutable_id(server: LiveServer, idsync):
    client = idsync()
    mpid = seed(client)
    workspace_id = server.service.workspaces.by_api_key(client.auth[0]).id
    url = f"/userprofile/v1/resolve/1/2/{workspace_id}"
    found = client.http.post(url, params={"fields": "user_identities"}, auth=client.auth,
                             json={"environment_type": "production", "identity": {"type": "customer_id", "value": "Cust-9"}})
    assert found.status_code == 200, found.text
    assert found.json()["mpid"] == int(mpid)
    missing = client.http.post(url, params={"fields": "user_identities"}, auth=client.auth,
                               json={"identity": {"type": "customer_id", "value": "nobody"}})
    assert missing.status_code == 404
    not_immutable = client.http.post(url, params={"fields": "user_identities"}, auth=client.auth,
                                     json={"identity": {"type": "email", "value": "Nine@Example.com"}})
    assert not_immutable.status_code == 400 and not_immutable.json()["errors"][0]["field"] == "identity.type"


def test_errors_and_isolation(server: LiveServer, idsync):
    client, other = idsync(), idsync()
    mpid = seed(client)
    workspace_id = server.service.workspaces.by_api_key(client.auth[0]).id
    url = f"/userprofile/v1/1/2/{workspace_id}/{mpid}"
    missing_fields = client.http.get(url, auth=client.auth)
    assert missing_fields.status_code == 400 and missing_fields.json()["errors"][0]["field"] == "fields"
    assert client.http.get(url, params={"fields": "shoe_size"}, auth=client.auth).status_code == 400
    assert client.http.get(f"/userprofile/v1/1/2/{workspace_id}/12345", params={"fields": "user_attributes"},
                           auth=client.auth).status_code == 404
    assert client.http.get(url, params={"fields": "user_attributes"}).status_code == 401
    key_only = client.http.get(url, params={"fields": "user_attributes"}, headers={"x-mp-key": client.auth[0]})
    assert key_only.status_code == 401
    assert client.http.get(url, params={"fields": "user_attributes"}, auth=other.auth).status_code == 403
    other_id = server.service.workspaces.by_api_key(other.auth[0]).id
    crossing = other.http.get(f"/userprofile/v1/1/2/{other_id}/{mpid}", params={"fields": "user_attributes"},
                              auth=other.auth)
    assert crossing.status_code == 404  # the MPID is not a profile of the caller's workspace
