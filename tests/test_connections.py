"""Connections (audiences/connections.py, api/connection_routes.py, engine/delivery_schema.py): the Platform API
over real HTTP into a real DuckDB file, settings validation naming the field, credentials sealed and never
answered, printed or stored in clear, restarts, the audience's connected_outputs, deletion with the audience,
the analyst views and the delivery_status view."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import duckdb
import httpx
import pytest
from cryptography.exceptions import InvalidTag
from fakes import FakeFacebook
from live_server import ADMIN_TOKEN, IdSyncClient, LiveServer

from api.ca_routes import background_idle
from audiences.connections import (
    BRAZE_SEGMENT_MODES,
    ConnectionRegistry,
    Credentials,
    check_settings,
)
from engine import delivery_schema
from engine.errors import BadRequest
from engine.secrets import MasterKey

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BRAZE_KEY = "braze-secret-key-7d1f0c"
FB_TOKEN = "EAAB-facebook-token-93be11"
BRAZE = {"output": "braze", "name": "braze us", "credentials": {"api_key": BRAZE_KEY},
         "settings": {"base_url": "http://127.0.0.1:9100", "identity_types": ["customer_id", "email"],
                      "forward_attributes": {"user": ["tier"]},
                      "consent": {"require_gdpr_purpose": "Advertising"},
                      "braze": {"send_segments_as": "single_array"}}}


class Workspace:
    def __init__(self, server: LiveServer, client: IdSyncClient) -> None:
        self.server, self.http, self.auth = server, client.http, client.auth
        self.id = server.service.workspaces.by_api_key(client.auth[0]).id
        self.audiences = f"/platform/v2/workspaces/{self.id}/audiences"

    def audience(self, name: str = "buyers") -> int:
        response = self.http.post(self.audiences, json={"name": name, "criteria": {"identity": {"type": "email"}}},
                                  auth=self.auth)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def base(self, audience_id: int) -> str:
        return f"{self.audiences}/{audience_id}/connections"

    def create(self, audience_id: int, body: dict[str, Any], expect: int = 201) -> dict[str, Any]:
        response = self.http.post(self.base(audience_id), json=body, auth=self.auth)
        assert response.status_code == expect, response.text
        return response.json()


@pytest.fixture
def workspace(server: LiveServer, idsync: Callable[..., IdSyncClient]) -> Workspace:
    return Workspace(server, idsync())


def test_lifecycle_over_http_with_sealed_credentials_and_restart(server: LiveServer, workspace: Workspace,
                                                                 caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    w = workspace
    audience = w.audience()
    created = w.create(audience, BRAZE)
    assert isinstance(created["id"], int) and created["audience_id"] == audience
    assert created["credentials"] == {"api_key": "set"} and created["status"] == "active"
    settings = created["settings"]
    assert settings["identity_types"] == ["customer_id", "email"]
    assert settings["consent"] == {"exclude_ccpa_data_sale_opt_out": True, "require_gdpr_purpose": "advertising"}
    assert settings["sampling_percent"] == 100 and settings["upload"] == {"max_age_seconds": 60, "max_queued": 75}
    assert settings["braze"] == {"batch_size": 75, "send_segments_as": "single_array", "external_id_type": "customer_id",
                                 "string_attribute": "SegmentMembership", "array_attribute": "SegmentMembershipArray",
                                 "array_cap": 25, "update_existing_only": False}
    assert created["delivery"]["pending_adds"] == 0 and created["delivery"]["last_success_ms"] is None
    facebook = w.create(audience, {"output": "facebook", "credentials": {"access_token": FB_TOKEN},
                                   "settings": {"facebook": {"ad_account_id": "1234"}}})
    assert facebook["settings"]["facebook"]["ad_account_id"] == "act_1234"
    assert facebook["settings"]["upload"] == {"max_age_seconds": 10800, "max_queued": 75000}

    listed = w.http.get(w.base(audience), auth=w.auth).json()["data"]
    assert [c["id"] for c in listed] == [created["id"], facebook["id"]]
    answer = w.http.get(f"{w.audiences}/{audience}", auth=w.auth).json()
    assert answer["connected_outputs"] == [
        {"id": created["id"], "output": "braze", "name": "braze us", "status": "active"},
        {"id": facebook["id"], "output": "facebook", "name": "facebook", "status": "active"}]

    # an update that sends the answer back keeps the credential ("set"); settings are taken whole
    one = f"{w.base(audience)}/{created['id']}"
    changed = {**created, "status": "inactive", "settings": {**BRAZE["settings"], "sampling_percent": 20}}
    response = w.http.put(one, json=changed, auth=w.auth)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "inactive" and response.json()["settings"]["sampling_percent"] == 20
    assert response.json()["last_modified_timestamp_ms"] > created["last_modified_timestamp_ms"]
    assert server.app.state.connections.find(created["id"]).credentials["api_key"] == BRAZE_KEY

    # the credential is nowhere in clear: answers, the database, logs, reprs
    texts = [json.dumps(listed), w.http.get(one, auth=w.auth).text, caplog.text,
             repr(server.app.state.connections.all())]
    texts += [str(row) for row in server.query("SELECT * FROM delivery_connections")]
    assert not [t for t in texts if BRAZE_KEY in t or FB_TOKEN in t]

    server.restart()
    http = server.client()
    again = http.get(one, auth=w.auth)
    assert again.status_code == 200 and again.json()["status"] == "inactive", again.text
    restored = server.app.state.connections.find(created["id"])
    assert restored.credentials["api_key"] == BRAZE_KEY and restored.settings == response.json()["settings"]
    rotated = http.put(one, json={"credentials": {"api_key": "rotated-key"}}, auth=w.auth)
    assert rotated.status_code == 200 and rotated.json()["settings"]["sampling_percent"] == 20
    assert server.app.state.connections.find(created["id"]).credentials["api_key"] == "rotated-key"

    assert http.delete(one, auth=w.auth).status_code == 204
    assert http.get(one, auth=w.auth).status_code == 404
    assert http.delete(one, auth=w.auth).status_code == 404
    # the audience goes with its other connection and what delivery kept for it
    server.query("INSERT INTO delivery_state (workspace_id, connection_id, mpid, identifiers, acknowledged_ms) "
                 "VALUES (?, ?, 7, '{}', 1)", w.id, facebook["id"])
    assert http.delete(f"{w.audiences}/{audience}", auth=w.auth).status_code == 204
    assert server.query("SELECT count(*) FROM delivery_connections") == [(0,)]
    assert server.query("SELECT count(*) FROM delivery_state") == [(0,)]
    assert server.app.state.connections.all() == []
    http.close()


def test_every_mistake_is_a_400_naming_its_field(workspace: Workspace):
    w = workspace
    audience = w.audience()
    braze = BRAZE["settings"]
    cases: list[tuple[Any, str]] = [
        ([], "body"),
        ({"output": "snapchat", "credentials": {}}, "output"),
        ({**BRAZE, "credentials": {}}, "credentials.api_key"),
        ({**BRAZE, "credentials": {"api_key": 5}}, "credentials.api_key"),
        ({**BRAZE, "credentials": {"api_key": "k", "password": "p"}}, "credentials.password"),
        ({**BRAZE, "settings": {**braze, "base_url": None}}, "settings.base_url"),
        ({**BRAZE, "settings": {**braze, "base_url": "ftp://x"}}, "settings.base_url"),
        ({**BRAZE, "settings": {**braze, "base_url": "http://user:pw@host"}}, "settings.base_url"),
        ({**BRAZE, "settings": {**braze, "colour": 1}}, "settings.colour"),
        ({**BRAZE, "settings": {**braze, "identity_types": ["shoe_size"]}}, "settings.identity_types[0]"),
        ({**BRAZE, "settings": {**braze, "identity_types": ["ios_idfv"]}}, "settings.identity_types"),
        ({**BRAZE, "settings": {**braze, "identity_types": ["email", "email"]}}, "settings.identity_types[1]"),
        ({**BRAZE, "settings": {**braze, "sampling_percent": 0}}, "settings.sampling_percent"),
        ({**BRAZE, "settings": {**braze, "sampling_percent": 50.5}}, "settings.sampling_percent"),
        ({**BRAZE, "settings": {**braze, "upload": {"max_queued": 0}}}, "settings.upload.max_queued"),
        ({**BRAZE, "settings": {**braze, "consent": {"exclude_ccpa_data_sale_opt_out": False}}},
         "settings.consent.exclude_ccpa_data_sale_opt_out"),
        ({**BRAZE, "settings": {**braze, "forward_attributes": {"calculated": [999]}}},
         "settings.forward_attributes.calculated[0]"),
        ({**BRAZE, "settings": {**braze, "braze": {"send_segments_as": "smoke"}}}, "settings.braze.send_segments_as"),
        ({**BRAZE, "settings": {**braze, "braze": {"batch_size": 76}}}, "settings.braze.batch_size"),
        ({**BRAZE, "settings": {**braze, "braze": {"external_id_type": "ios_idfa"}}},
         "settings.braze.external_id_type"),
        ({"output": "facebook", "credentials": {"access_token": "t"}}, "settings.facebook.ad_account_id"),
        ({"output": "facebook", "credentials": {"access_token": "t"},
          "settings": {"identity_types": ["customer_id", "other"], "facebook": {"ad_account_id": "1"}}},
         "settings.identity_types"),
        ({"output": "facebook", "credentials": {"access_token": "t"},
          "settings": {"facebook": {"ad_account_id": "1", "match_user_attributes": ["FN"]}}},
         "settings.facebook.match_user_attributes"),
        ({"output": "facebook", "credentials": {"access_token": "t"},
          "settings": {"facebook": {"ad_account_id": "1", "value_based": {"allow_zero": True}}}},
         "settings.facebook.value_based"),
        ({"output": "webhook", "credentials": {"secret": "s"}}, "settings.webhook.url"),
        ({"output": "webhook", "credentials": {"secret": "s"},
          "settings": {"base_url": "http://x", "webhook": {"url": "http://x"}}}, "settings.base_url"),
        ({"output": "kafka", "settings": {"kafka": {"bootstrap_servers": "localhost", "topic": "t"}}},
         "settings.kafka.bootstrap_servers"),
        ({"output": "kafka", "settings": {"kafka": {"bootstrap_servers": "h:9092", "topic": "a b"}}},
         "settings.kafka.topic"),
        ({"output": "kafka", "settings": {"kafka": {"bootstrap_servers": "h:9092", "topic": "t",
                                                    "security_protocol": "SASL_SSL"}}}, "credentials.username"),
    ]
    for body, field in cases:
        response = w.http.post(w.base(audience), json=body, auth=w.auth)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["errors"][0]["field"] == field, (body, response.text)
    assert w.server.query("SELECT count(*) FROM delivery_connections") == [(0,)]

    made = w.create(audience, BRAZE)
    one = f"{w.base(audience)}/{made['id']}"
    for body, field in [({"output": "facebook"}, "output"), ({"status": "paused"}, "status"),
                        ({"name": ""}, "name"), ({"settings": {"sampling_percent": 101}}, "settings.base_url")]:
        response = w.http.put(one, json=body, auth=w.auth)
        assert response.status_code == 400 and response.json()["errors"][0]["field"] == field, response.text
    assert w.http.get(one, auth=w.auth).json()["settings"] == made["settings"]
    for path, status in [(f"{w.base(audience)}/x", 400), (f"{w.base(audience)}/0", 400),
                         (f"{w.base(audience)}/{made['id'] + 1}", 404), (f"{w.base(audience + 1)}/{made['id']}", 404),
                         (f"{w.audiences}/x/connections", 400)]:
        assert w.http.get(path, auth=w.auth).status_code == status, path


def test_credentials_and_workspaces_are_checked(server: LiveServer, idsync: Callable[..., IdSyncClient]):
    owner, other = Workspace(server, idsync()), Workspace(server, idsync())
    audience = owner.audience()
    made = owner.create(audience, BRAZE)
    one = f"{owner.base(audience)}/{made['id']}"
    with server.client() as http:
        assert http.get(one).status_code == 401
        assert http.get(one, auth=(owner.auth[0], "wrong")).status_code == 401
        assert http.get(one, auth=other.auth).status_code == 403
        assert http.put(one, json={"status": "inactive"}, auth=other.auth).status_code == 403
        assert http.delete(one, auth=other.auth).status_code == 403
        # the owner's ids under the other workspace name nothing there
        assert http.get(one.replace(owner.id, other.id), auth=other.auth).status_code == 404
        assert http.post(other.base(audience), json=BRAZE, auth=other.auth).status_code == 404
        assert http.get(one, headers=ADMIN).status_code == 200
    assert server.app.state.connections.find(made["id"]).status == "active"


def test_analyst_sql_shows_connections_without_credentials(server: LiveServer, workspace: Workspace):
    w = workspace
    w.create(w.audience(), BRAZE)
    answer = w.http.post("/v1/sql", json={"sql": "SELECT * FROM connections"}, auth=w.auth)
    assert answer.status_code == 200, answer.text
    assert "credentials_sealed" not in answer.text and BRAZE_KEY not in answer.text
    assert len(answer.json()["rows"]) == 1
    for query in ("SELECT * FROM delivery_connections", "SELECT credentials_sealed FROM connections"):
        refused = w.http.post("/v1/sql", json={"sql": query}, headers=ADMIN)
        assert refused.status_code == 400, refused.text
    status = w.http.post("/v1/sql", json={"sql": "SELECT output, pending_adds, held FROM delivery_status"},
                         auth=w.auth)
    assert status.json()["rows"] == [["braze", 0, 0]], status.text


# --- units ----------------------------------------------------------------------------------------------------------
def test_credentials_never_print_and_stay_sealed_at_rest():
    credentials = Credentials({"api_key": BRAZE_KEY})
    assert BRAZE_KEY not in repr(credentials) and BRAZE_KEY not in f"{credentials}" and "api_key=set" in repr(credentials)
    registry = ConnectionRegistry(MasterKey(b"k" * 32))
    connection, batch = registry.plan_create("ws", 1, BRAZE)
    assert BRAZE_KEY not in repr(connection) and connection.credentials == {"api_key": BRAZE_KEY}
    database = duckdb.connect()
    database.execute(delivery_schema.TABLES_DDL)
    for statement in batch.statements:
        statement(database)
    [(sealed,)] = database.execute("SELECT credentials_sealed FROM delivery_connections").fetchall()
    assert BRAZE_KEY not in sealed
    loaded = ConnectionRegistry(MasterKey(b"k" * 32))
    loaded.load(database)
    assert loaded.find(connection.id) == connection and loaded.find(connection.id).credentials["api_key"] == BRAZE_KEY
    with pytest.raises(InvalidTag):  # another deployment's key cannot open them
        ConnectionRegistry(MasterKey(b"x" * 32)).load(database)


def test_settings_accessors_and_defaults():
    registry = ConnectionRegistry(MasterKey(b"k" * 32))
    facebook, _ = registry.plan_create("ws", 1, {
        "output": "facebook", "credentials": {"access_token": "t"},
        "settings": {"identity_types": ["email", "ios_advertising_id", "other_id_2"], "sampling_percent": 10,
                     "forward_attributes": {"user": ["tier"], "calculated": [3]},
                     "facebook": {"ad_account_id": "act_9", "value_based": {"calculated_attribute_id": 4}}}},
        known_ca=lambda ca_id: ca_id in (3, 4))
    assert facebook.identity_types == ("email", "ios_idfa", "other2")
    assert facebook.user_attributes == ("tier",) and facebook.calculated_attributes == (3, 4)
    assert facebook.value_attribute == ("calculated", 4) and facebook.sampling_percent == 10
    assert (facebook.max_age_seconds, facebook.max_queued, facebook.batch_size) == (10800, 75000, 10000)
    assert facebook.base_url == "https://graph.facebook.com" and facebook.require_gdpr_purpose is None
    assert facebook.is_active and facebook.options["customer_file_source"] == "USER_PROVIDED_ONLY"
    webhook, _ = registry.plan_create("ws", 1, {"output": "webhook", "credentials": {"secret": "s"},
                                                "settings": {"webhook": {"url": "http://127.0.0.1:1/hook"}}})
    assert webhook.identity_types == () and webhook.base_url is None and webhook.batch_size == 500
    assert webhook.options["url"] == "http://127.0.0.1:1/hook" and webhook.id > facebook.id
    kafka, _ = registry.plan_create("ws", 1, {"output": "kafka", "settings": {"kafka": {
        "bootstrap_servers": "a:1, b:2", "topic": "audience-deltas"}}})
    assert kafka.options["bootstrap_servers"] == "a:1,b:2" and dict(kafka.credentials) == {}
    for mode in BRAZE_SEGMENT_MODES:  # all seven
        checked = check_settings("braze", {"base_url": "https://rest.iad-01.braze.com",
                                           "braze": {"send_segments_as": mode}})
        assert checked["identity_types"] == ["customer_id"] and checked["braze"]["send_segments_as"] == mode
    with pytest.raises(BadRequest) as error:
        check_settings("braze", {"base_url": "https://x", "braze": {"external_id_type": "email"},
                                 "identity_types": ["customer_id"]})
    assert error.value.field == "settings.identity_types"


def _status_database() -> duckdb.DuckDBPyConnection:
    database = duckdb.connect()
    database.execute(delivery_schema.MIGRATION_SQL)
    for id_ in (1, 2):
        database.execute("INSERT INTO delivery_connections VALUES (?, 'ws', 5, 'braze', 'b', 'active', '{}', 'x', "
                         "NULL, 0, 0)", [id_])
    return database


def test_delivery_status_counts_pending_held_lag_and_errors():
    database = _status_database()
    now = 10 * delivery_schema.DAY_MS
    database.execute("""INSERT INTO delivery_outbox (workspace_id, connection_id, seq, mpid, op, identifiers,
                        attributes, changed_ms, attempts, next_attempt_ms, last_error) VALUES
        ('ws', 1, 1, 100, 'add', '{}', NULL, 500, 0, 0, NULL),
        ('ws', 1, 2, 101, 'add', '{}', NULL, 300, 2, 0, 'boom'),
        ('ws', 1, 3, 102, 'remove', '{}', NULL, 400, 0, 0, NULL)""")
    database.execute("INSERT INTO delivery_state (workspace_id, connection_id, mpid, identifiers, acknowledged_ms) "
                     "VALUES ('ws', 1, 103, '{}', 1), ('ws', 1, 102, '{}', 1)")
    day_ago = now - delivery_schema.DAY_MS
    database.execute("INSERT INTO delivery_attempts VALUES (?, 1, ?, 5, 3, 2, 1, 0, 200, NULL, ?)",
                     ["ws", now - 1000, [10, 30]])
    database.execute("INSERT INTO delivery_attempts VALUES (?, 1, ?, 5, 2, 0, 2, 0, 503, 'HTTP 503', NULL)",
                     ["ws", now - 500])
    database.execute("INSERT INTO delivery_attempts VALUES (?, 1, ?, 5, 1, 1, 0, 0, 200, NULL, ?)",
                     ["ws", day_ago, [99_999]])  # a day old: out of the lag window, still the last success before
    rows = database.execute(f"SELECT * FROM ({delivery_schema.status_query(str(now))}) ORDER BY connection_id")
    names = [d[0] for d in rows.description]
    first, second = (dict(zip(names, row)) for row in rows.fetchall())
    assert (first["pending_adds"], first["pending_removes"], first["retrying"], first["held"]) == (2, 1, 1, 2)
    assert first["oldest_pending_ms"] == 300 and first["last_success_ms"] == now - 1000
    assert first["last_attempt_ms"] == now - 500 and (first["lag_p50_ms"], first["lag_max_ms"]) == (10, 30)
    assert (first["requests_24h"], first["retried_24h"], first["rejected_24h"]) == (2, 3, 0)
    assert (first["last_error"], first["last_error_ms"]) == ("HTTP 503", now - 500)
    assert second["pending_adds"] == 0 and second["held"] == 0 and second["last_success_ms"] is None
    assert second["lag_p50_ms"] is None and second["last_error"] is None
    # the view is the same query at the transaction's time
    assert database.execute("SELECT count(*) FROM delivery_status").fetchone() == (2,)


def test_connections_view_leaves_credentials_out():
    database = _status_database()
    columns = [row[0] for row in database.execute("DESCRIBE connections").fetchall()]
    assert "credentials_sealed" not in columns and {"id", "workspace_id", "settings", "remote"} <= set(columns)


def test_http_client_never_sees_a_credential_in_an_error(workspace: Workspace):
    """A body that fails validation after the credentials were read is answered without them."""
    w = workspace
    audience = w.audience()
    body = {**BRAZE, "settings": {**BRAZE["settings"], "sampling_percent": -1}}
    response = w.http.post(w.base(audience), json=body, auth=w.auth)
    assert response.status_code == 400 and BRAZE_KEY not in response.text
    response = w.http.post(w.base(audience), json={**BRAZE, "credentials": {"api_key": BRAZE_KEY, "x": "y"}},
                           auth=w.auth)
    assert response.status_code == 400 and BRAZE_KEY not in response.text


def _on_server(server: LiveServer, coroutine: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(coroutine, server.loop).result(timeout=60)


def test_deleting_a_connection_or_its_audience_waits_for_delivery_and_deletes_facebook_audiences(
        server: LiveServer, idsync: Callable[..., IdSyncClient]):
    client = idsync()
    w = Workspace(server, client)
    for n in range(3):
        client.identify({"email": f"member{n}@example.com"})
    kept, dropped = w.audience("kept"), w.audience("dropped")
    with FakeFacebook(access_tokens={FB_TOKEN}) as fake:
        def facebook(**options: Any) -> dict[str, Any]:
            return {"output": "facebook", "credentials": {"access_token": FB_TOKEN},
                    "settings": {"base_url": fake.base_url, "identity_types": ["email"],
                                 "facebook": {"ad_account_id": "act_1234", **options}}}
        single = w.create(kept, facebook())["id"]
        stays = w.create(kept, facebook(delete_on_audience_delete=False))["id"]
        with_audience = w.create(dropped, facebook())["id"]
        _on_server(server, background_idle(server.app.state.background_tasks))
        _on_server(server, server.app.state.delivery.run_once())
        remote = {cid: server.app.state.connections.find(cid).remote["audiences"]["EMAIL_SHA256"]["id"]
                  for cid in (single, stays, with_audience)}
        assert all(len(fake.members(audience_id)) == 3 for audience_id in remote.values())

        # a diff or acknowledgement holding the connection's lock: the delete waits for it, then goes through
        lock = server.app.state.delivery.lock(single)
        lock.acquire()
        answers: list[int] = []
        deleting = threading.Thread(target=lambda: answers.append(
            w.http.delete(f"{w.base(kept)}/{single}", auth=w.auth).status_code))
        deleting.start()
        deleting.join(timeout=1.0)
        assert deleting.is_alive() and server.query("SELECT count(*) FROM connections WHERE id = ?", single) == [(1,)]
        lock.release()
        deleting.join(timeout=30)
        assert answers == [204]
        assert set(fake.audiences()) == {remote[stays], remote[with_audience]}   # deleted downstream

        assert w.http.delete(f"{w.audiences}/{dropped}", auth=w.auth).status_code == 204
        assert set(fake.audiences()) == {remote[stays]}
        assert w.http.delete(f"{w.audiences}/{kept}", auth=w.auth).status_code == 204
        assert set(fake.audiences()) == {remote[stays]}   # delete_on_audience_delete: false keeps it
        assert server.query("SELECT count(*) FROM delivery_state") == [(0,)]


def test_resync_replaces_a_facebook_audience_and_the_state_becomes_what_it_holds(
        server: LiveServer, idsync: Callable[..., IdSyncClient]):
    client = idsync()
    w = Workspace(server, client)
    mpids = [int(client.identify({"email": f"member{n}@example.com"})["mpid"]) for n in range(3)]
    audience = w.audience("resynced")
    with FakeFacebook(access_tokens={FB_TOKEN}) as fake:
        cid = w.create(audience, {"output": "facebook", "credentials": {"access_token": FB_TOKEN},
                                  "settings": {"base_url": fake.base_url, "identity_types": ["email"],
                                               "facebook": {"ad_account_id": "act_1234"}}})["id"]
        _on_server(server, background_idle(server.app.state.background_tasks))
        _on_server(server, server.app.state.delivery.run_once())
        audience_id = server.app.state.connections.find(cid).remote["audiences"]["EMAIL_SHA256"]["id"]
        wanted = set(fake.members(audience_id))
        assert len(wanted) == 3
        # drift: someone added a stranger at Facebook, idmesh's records lost a member and hold a stale change
        stranger = "ab" * 32
        assert httpx.post(f"{fake.base_url}/v25.0/{audience_id}/users", headers={"Authorization": f"Bearer {FB_TOKEN}"},
                          json={"payload": {"schema": "EMAIL_SHA256", "is_raw": True, "data": [stranger]}}
                          ).status_code == 200
        server.query("DELETE FROM delivery_state WHERE mpid = ?", mpids[0])
        server.query("INSERT INTO delivery_outbox (workspace_id, connection_id, seq, mpid, op, identifiers, changed_ms, "
                     "next_attempt_ms) VALUES (?, ?, 1, 42, 'remove', '{}', 1, 1)", w.id, cid)

        answer = w.http.post(f"{w.base(audience)}/{cid}/resync", auth=w.auth)
        assert answer.status_code == 200, answer.text
        assert answer.json() | {"error": None} == {"connection_id": cid, "mode": "replace", "members": 3,
                                                    "acknowledged": 3, "queued": 0, "completed": True, "error": None}
        assert fake.members(audience_id) == wanted   # the stranger is gone
        assert any(r.path.endswith("/usersreplace") for r in fake.requests())
        assert sorted(m for (m,) in server.query("SELECT mpid FROM delivery_state WHERE connection_id = ?", cid)
                      ) == sorted(mpids)
        assert server.query("SELECT count(*) FROM delivery_outbox WHERE connection_id = ?", cid) == [(0,)]
        # admin may too; an inactive Facebook connection is refused (a replace would send at once)
        assert w.http.put(f"{w.base(audience)}/{cid}", json={"status": "inactive"}, auth=w.auth).status_code == 200
        assert w.http.post(f"{w.base(audience)}/{cid}/resync", headers=ADMIN).status_code == 409
