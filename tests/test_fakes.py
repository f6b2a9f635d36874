"""The fake destinations behave as ../shared/spec/outputs.md says Braze and Meta do, driven by raw httpx requests
shaped like the spec's examples; every fault kind does what fakes.faults promises."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from fakes import FakeBraze, FakeFacebook, Fault, FaultInjector, FaultPlan

BRAZE_KEY = "braze-test-key"
TOKEN = "fb-test-token"
AUTH = {"Authorization": f"Bearer {BRAZE_KEY}"}
http = httpx.Client(timeout=10)  # one client for the module: building one per call costs more than the call


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@pytest.fixture
def braze() -> Iterator[FakeBraze]:
    with FakeBraze() as fake:
        yield fake


@pytest.fixture
def facebook() -> Iterator[FakeFacebook]:
    with FakeFacebook() as fake:
        yield fake


def track(braze: FakeBraze, body: dict, headers: dict | None = None, **kwargs) -> httpx.Response:
    return http.post(f"{braze.base_url}/users/track", json=body, headers=AUTH if headers is None else headers,
                      **kwargs)


# -- Braze ------------------------------------------------------------------------------------------------------


def test_braze_applies_the_spec_attributes_object(braze: FakeBraze) -> None:
    braze.seed_user(("external_id", "user-123"), {"obsolete_attr": "x", "my_int": 4, "audiences_2": ["seg_a", "seg_b"]})
    obj = {
        "external_id": "user-123",
        "_update_existing_only": True,
        "first_name": "Jon",
        "my_flag": True,
        "my_int": {"inc": 1},
        "audiences": ["seg_a", "seg_b"],
        "audiences_2": {"add": ["seg_c"], "remove": ["seg_a"]},
        "obsolete_attr": None,
    }
    response = track(braze, {"attributes": [obj]})
    assert response.status_code == 201
    assert response.json() == {"message": "success", "attributes_processed": 1}
    assert braze.user("user-123") == {"first_name": "Jon", "my_flag": True, "my_int": 5,
                                      "audiences": ["seg_a", "seg_b"], "audiences_2": ["seg_b", "seg_c"]}


def test_braze_string_arrays_are_sets_with_recency_order(braze: FakeBraze) -> None:
    track(braze, {"attributes": [{"external_id": "u", "music_videos_favorited": ["a", "b", "c", "b"]}]})
    assert braze.user("u")["music_videos_favorited"] == ["a", "c", "b"]  # duplicates collapse
    track(braze, {"attributes": [{"external_id": "u", "music_videos_favorited": {"add": ["a", "d"]}}]})
    assert braze.user("u")["music_videos_favorited"] == ["c", "b", "a", "d"]  # an element present moves to the end
    track(braze, {"attributes": [{"external_id": "u", "music_videos_favorited": {
        "add": ["calvinharris-summer"], "remove": ["nickiminaj-anaconda", "c"]}}]})
    assert braze.user("u")["music_videos_favorited"] == ["b", "a", "d", "calvinharris-summer"]
    track(braze, {"attributes": [{"external_id": "u", "music_videos_favorited": ["z"]}]})
    assert braze.user("u")["music_videos_favorited"] == ["z"]  # a plain array replaces
    track(braze, {"attributes": [{"external_id": "u", "fresh": {"remove": ["x"]}}]})
    assert braze.user("u")["fresh"] == []
    assert braze.users_with("music_videos_favorited", "z") == {("external_id", "u")}


def test_braze_array_cap_truncates_and_is_configurable(braze: FakeBraze) -> None:
    segments = [f"seg_{i}" for i in range(30)]
    track(braze, {"attributes": [{"external_id": "u", "audiences": {"add": segments}}]})
    assert braze.user("u")["audiences"] == segments[-25:]
    braze.configure(array_cap=100)
    track(braze, {"attributes": [{"external_id": "u", "audiences": {"add": segments}}]})
    assert braze.user("u")["audiences"] == segments  # each added element moves to the end, in order


def test_braze_arrays_of_objects(braze: FakeBraze) -> None:
    pets = [{"id": 1, "type": "dog", "name": "Gus"}, {"id": 2, "type": "cat", "name": "Gerald"}]
    track(braze, {"attributes": [{"external_id": "u", "pets": pets}]})
    track(braze, {"attributes": [{"external_id": "u", "pets": {"$add": [{"id": 3, "type": "fish"}]}}]})
    track(braze, {"attributes": [{"external_id": "u", "pets": {
        "$remove": [{"$identifier_key": "id", "$identifier_value": 1}]}}]})
    answer = track(braze, {"attributes": [{"external_id": "u", "pets": {
        "$update": [{"$identifier_key": "id", "$identifier_value": 2, "$new_object": {"name": "G"}}]}}]}).json()
    assert answer["errors"][0]["index"] == 0  # $update needs _merge_objects
    track(braze, {"attributes": [{"external_id": "u", "_merge_objects": True, "pets": {
        "$update": [{"$identifier_key": "id", "$identifier_value": 2, "$new_object": {"name": "G"}}]}}]})
    assert braze.user("u")["pets"] == [{"id": 2, "type": "cat", "name": "G"}, {"id": 3, "type": "fish"}]


def test_braze_authentication(braze: FakeBraze) -> None:
    body = {"attributes": [{"external_id": "u", "a": 1}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {BRAZE_KEY}"}):
        response = track(braze, body, headers=headers)
        assert response.status_code == 401
        assert "message" in response.json()
        assert {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"} <= set(response.headers)
    braze.configure(forbidden_keys={"no-permission"})
    assert track(braze, body, headers={"Authorization": "Bearer no-permission"}).status_code == 403
    assert braze.users() == {}


def test_braze_rejects_more_than_max_objects_per_array(braze: FakeBraze) -> None:
    objects = [{"external_id": f"u{i}", "a": 1} for i in range(76)]
    for array in ("attributes", "events", "purchases"):
        response = track(braze, {array: objects})
        assert response.status_code == 400
        assert response.json()["message"] == "Max Input Length Exceeded"
    assert braze.users() == {}
    assert track(braze, {"attributes": objects[:75]}).json()["attributes_processed"] == 75
    braze.clear()
    braze.configure(max_total_objects=50)
    events = [{"external_id": "u", "name": "e", "time": "2026-01-01T00:00:00Z"}] * 25
    response = track(braze, {"attributes": objects[:26], "events": events})
    assert response.status_code == 400 and response.json()["message"] == "Max Input Length Exceeded"
    assert track(braze, {"attributes": objects[:25], "events": events}).status_code == 201


def test_braze_reports_objects_without_identifier_and_applies_the_rest(braze: FakeBraze) -> None:
    response = track(braze, {"attributes": [{"external_id": "u1", "a": 1}, {"a": 2}, {"external_id": "u3", "a": 3},
                                            {"external_id": "u4", "audiences": {"add": "not-a-list"}}]})
    assert response.status_code == 201
    body = response.json()
    assert body["message"] == "success" and body["attributes_processed"] == 2
    assert body["errors"][0] == {"type": "'external_id' or 'braze_id' or 'user_alias' is required",
                                 "input_array": "attributes", "index": 1}
    assert body["errors"][1]["index"] == 3
    assert set(braze.users()) == {("external_id", "u1"), ("external_id", "u3")}


def test_braze_update_existing_only(braze: FakeBraze) -> None:
    alias = {"alias_name": "a1", "alias_label": "crm"}
    answer = track(braze, {"attributes": [
        {"external_id": "new", "_update_existing_only": True, "a": 1},  # never creates
        {"external_id": "created", "a": 1},  # omitted: a new external_id creates
        {"user_alias": alias, "a": 1},  # user_alias defaults to true: not created
    ]}).json()
    assert answer["attributes_processed"] == 3
    assert set(braze.users()) == {("external_id", "created")}
    assert [(array, index) for array, index, _ in braze.skipped()] == [("attributes", 0), ("attributes", 2)]
    track(braze, {"attributes": [{"user_alias": alias, "_update_existing_only": False, "a": 2}]})
    assert braze.user(user_alias=alias) == {"a": 2}
    track(braze, {"attributes": [{"external_id": "created", "_update_existing_only": True, "a": 5}]})
    assert braze.user("created") == {"a": 5}
    assert track(braze, {"attributes": [{"external_id": "x", "_update_existing_only": "yes"}]}).json()["errors"]


def test_braze_identifiers(braze: FakeBraze) -> None:
    braze.seed_user(("braze_id", "5cd8e8b4"))
    track(braze, {"attributes": [
        {"braze_id": "5cd8e8b4", "a": 1},
        {"braze_id": "unknown", "a": 1},  # a braze_id names an existing profile only
        {"email": "jane@example.com", "phone": "+16505551212", "a": 2},  # email wins over phone
        {"phone": "+16505550000", "a": 3},
        {"external_id": "u1", "email": "u1@example.com"},  # email is then a plain attribute
    ]})
    assert braze.users() == {("braze_id", "5cd8e8b4"): {"a": 1},
                             ("email", "jane@example.com"): {"phone": "+16505551212", "a": 2},
                             ("phone", "+16505550000"): {"a": 3},
                             ("external_id", "u1"): {"email": "u1@example.com"}}


def test_braze_rate_limit_headers_and_429(braze: FakeBraze) -> None:
    braze.configure(rate_limit=3, rate_window_seconds=60)
    remaining = []
    for _ in range(3):
        response = track(braze, {"attributes": [{"external_id": "u", "a": 1}]})
        assert response.status_code == 201
        remaining.append(int(response.headers["x-ratelimit-remaining"]))
        assert response.headers["x-ratelimit-limit"] == "3"
    assert remaining == [2, 1, 0]
    response = track(braze, {"attributes": [{"external_id": "v", "a": 1}]})
    assert response.status_code == 429
    assert response.headers["x-ratelimit-remaining"] == "0"
    assert time.time() < int(response.headers["x-ratelimit-reset"]) <= time.time() + 61
    assert braze.user("v") is None
    braze.configure(rate_window_seconds=0.2)
    time.sleep(0.25)
    assert track(braze, {"attributes": [{"external_id": "v", "a": 1}]}).status_code == 201


def test_braze_events_and_purchases(braze: FakeBraze) -> None:
    body = {
        "attributes": [{"external_id": "u1", "tier": "gold"}],
        "events": [{"external_id": "u1", "name": "audience_entered", "time": "2026-01-01T00:00:00Z",
                    "properties": {"audience": "vip"}},
                   {"external_id": "u2", "time": "2026-01-01T00:00:00Z"}],
        "purchases": [{"external_id": "u1", "product_id": "sku", "currency": "USD", "price": 9.5,
                       "time": "2026-01-01T00:00:00Z"}],
    }
    answer = track(braze, body).json()
    assert answer == {"message": "success", "attributes_processed": 1, "events_processed": 1,
                      "purchases_processed": 1,
                      "errors": [{"type": "'name' is required", "input_array": "events", "index": 1}]}
    assert braze.events() == [{"name": "audience_entered", "time": "2026-01-01T00:00:00Z",
                               "properties": {"audience": "vip"}, "user": ("external_id", "u1")}]
    assert braze.purchases()[0]["product_id"] == "sku"
    track(braze, {"events": [{"external_id": "u3", "name": "e", "time": "2026-01-01T00:00:00Z"}]})
    assert braze.user("u3") == {}  # an event creates the profile


def test_braze_bad_requests(braze: FakeBraze) -> None:
    url = f"{braze.base_url}/users/track"
    assert http.post(url, content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}).status_code == 400
    assert http.post(url, content=b"{}", headers={**AUTH, "Content-Type": "text/plain"}).status_code == 400
    assert track(braze, {}).status_code == 400
    assert track(braze, {"attributes": {"external_id": "u"}}).status_code == 400
    assert braze.users() == {}


# -- Meta -------------------------------------------------------------------------------------------------------


def graph(facebook: FakeFacebook, path: str) -> str:
    return f"{facebook.base_url}/v25.0/{path}"


def create_audience(facebook: FakeFacebook, **fields) -> str:
    data = {"access_token": TOKEN, "name": "My audience", "subtype": "CUSTOM", "description": "idmesh",
            "customer_file_source": "USER_PROVIDED_ONLY", **fields}
    response = http.post(graph(facebook, "act_1234/customaudiences"), data=data)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def error_of(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


JANE = [sha("jane.doe@example.com"), sha("16505551212"), sha("jane"), sha("doe"), sha("us"), "user-123"]
JANE_SCHEMA = ["EMAIL", "PHONE", "FN", "LN", "COUNTRY", "EXTERN_ID"]


def form_upload(facebook: FakeFacebook, audience_id: str, payload: dict, session: dict | None = None,
                edge: str = "users") -> httpx.Response:
    data = {"access_token": TOKEN, "payload": json.dumps(payload, sort_keys=True, separators=(",", ":"))}
    if session is not None:
        data["session"] = json.dumps(session, sort_keys=True, separators=(",", ":"))
    return http.post(graph(facebook, f"{audience_id}/{edge}"), data=data)


def test_facebook_creates_reads_lists_and_deletes_audiences(facebook: FakeFacebook) -> None:
    assert sha("jane.doe@example.com") == "86e0b9e56c17cc4d12387e1949b85053fbe73bc3ce5a1188713a9d300cc6133d"
    audience_id = create_audience(facebook)
    assert audience_id.isdigit()
    assert facebook.audience(audience_id).customer_file_source == "USER_PROVIDED_ONLY"
    value_based = http.post(graph(facebook, "act_1234/customaudiences"), json={
        "access_token": TOKEN, "name": "LTV", "subtype": "CUSTOM", "customer_file_source": "PARTNER_PROVIDED_ONLY",
        "is_value_based": True}).json()["id"]
    assert facebook.audience(value_based).is_value_based
    listed = http.get(graph(facebook, "act_1234/customaudiences"), params={"access_token": TOKEN,
                                                                              "fields": "name"}).json()
    assert listed["data"] == [{"id": audience_id, "name": "My audience"}, {"id": value_based, "name": "LTV"}]
    read = http.get(graph(facebook, audience_id), params={"access_token": TOKEN, "fields": "name,subtype"}).json()
    assert read == {"id": audience_id, "name": "My audience", "subtype": "CUSTOM"}
    for bad in ({"customer_file_source": None}, {"customer_file_source": "SOMEONE"}, {"name": ""},
                {"subtype": "LOOKALIKE"}, {"is_value_based": "maybe"}):
        data = {"access_token": TOKEN, "name": "x", "subtype": "CUSTOM",
                "customer_file_source": "BOTH_USER_AND_PARTNER_PROVIDED"}
        data.update({k: v for k, v in bad.items() if v is not None})
        for key in [k for k, v in bad.items() if v is None]:
            del data[key]
        assert error_of(http.post(graph(facebook, "act_1234/customaudiences"), data=data))["code"] == 100
    deleted = http.delete(graph(facebook, audience_id), params={"access_token": TOKEN})
    assert deleted.json() == {"success": True}
    assert facebook.audience(audience_id).deleted and audience_id not in facebook.audiences()
    error = error_of(form_upload(facebook, audience_id, {"schema": "EMAIL_SHA256", "data": [sha("a")]}))
    assert (error["code"], error["error_subcode"], error["type"]) == (100, 33, "GraphMethodException")


def test_facebook_spec_upload_in_every_encoding(facebook: FakeFacebook) -> None:
    audience_id = create_audience(facebook)
    payload = {"schema": JANE_SCHEMA, "is_raw": True, "data": [JANE]}
    session = {"session_id": 42, "batch_seq": 1, "last_batch_flag": True, "estimated_num_total": 1}
    response = form_upload(facebook, audience_id, payload, session)
    assert response.status_code == 200
    assert response.json() == {"audience_id": audience_id, "session_id": "42", "num_received": 1,
                               "num_invalid_entries": 0, "invalid_entry_samples": {}}
    view = facebook.audience(audience_id)
    assert view.size == 1 and view.members["EXTERN_ID"] == {"user-123"}
    assert facebook.members(audience_id, "EMAIL") == {JANE[0]}
    assert view.sessions["42"].batches == {1: 1} and view.sessions["42"].last_batch_seq == 1
    url = graph(facebook, f"{audience_id}/users")
    # removal as the SDK sends it: DELETE with query parameters
    removed = http.delete(url, params={"access_token": TOKEN, "payload": json.dumps(payload)})
    assert removed.json()["num_received"] == 1 and facebook.audience(audience_id).size == 0
    # Segment's shape: a JSON body with objects, token as a Bearer header, for POST and DELETE
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert http.post(url, json={"payload": payload, "session": session}, headers=bearer).status_code == 200
    assert facebook.audience(audience_id).size == 1
    assert http.request("DELETE", url, json={"payload": payload}, headers=bearer).status_code == 200
    assert facebook.audience(audience_id).size == 0
    # POST with everything in the query string
    assert http.post(url, params={"access_token": TOKEN, "payload": json.dumps(payload)}).status_code == 200
    assert facebook.members(audience_id, "PHONE") == {JANE[1]}


def test_facebook_access_token(facebook: FakeFacebook) -> None:
    audience_id = create_audience(facebook)
    url = graph(facebook, f"{audience_id}/users")
    payload = json.dumps({"schema": "EMAIL_SHA256", "data": [sha("a@b.c")]})
    missing = error_of(http.post(url, data={"payload": payload}))
    assert missing["code"] == 104
    invalid = error_of(http.post(url, data={"access_token": "expired", "payload": payload}))
    assert (invalid["code"], invalid["type"]) == (190, "OAuthException")
    facebook.configure(app_secret="s3cret")
    assert error_of(http.post(url, data={"access_token": TOKEN, "payload": payload}))["code"] == 100
    proof = hmac.new(b"s3cret", TOKEN.encode(), hashlib.sha256).hexdigest()
    assert http.post(url, data={"access_token": TOKEN, "appsecret_proof": proof, "payload": payload}).status_code == 200
    assert facebook.members(audience_id, "EMAIL_SHA256") == {sha("a@b.c")}


def test_facebook_row_limit_and_schema_checks(facebook: FakeFacebook) -> None:
    audience_id = create_audience(facebook)
    too_many = {"schema": "EMAIL_SHA256", "data": [sha(str(i)) for i in range(10_001)]}
    assert error_of(form_upload(facebook, audience_id, too_many))["code"] == 100
    assert facebook.audience(audience_id).size == 0
    full = {"schema": "EMAIL_SHA256", "data": too_many["data"][:10_000]}
    assert form_upload(facebook, audience_id, full).json()["num_received"] == 10_000
    assert facebook.audience(audience_id).size == 10_000
    for payload in ({"schema": ["EMAIL", "PHONE"], "data": [[sha("a"), sha("1")], [sha("b")]]},  # row width
                    {"schema": ["EMAIL", "SHOE_SIZE"], "data": [[sha("a"), "42"]]},  # unknown key
                    {"schema": "EMAIL", "data": [sha("a")]},  # EMAIL is a multi key, not a single one
                    {"schema": "EMAIL_SHA256", "data": [[sha("a")]]},  # a single key takes a flat list
                    {"schema": ["EMAIL", "EMAIL"], "data": [[sha("a"), sha("a")]]},
                    {"data": [sha("a")]}):
        assert error_of(form_upload(facebook, audience_id, payload))["code"] == 100
    assert error_of(http.post(graph(facebook, f"{audience_id}/users"), data={"access_token": TOKEN}))["code"] == 100


def test_facebook_counts_invalid_entries(facebook: FakeFacebook) -> None:
    audience_id = create_audience(facebook)
    rows = [[sha("a"), sha("1"), "x1"],
            ["not-a-hash", sha("2"), "x2"],
            [sha("c").upper(), "", "x3"],  # hex digests are lowercase
            ["", "", ""],  # names no key
            ["", sha("4"), ""]]
    answer = form_upload(facebook, audience_id, {"schema": ["EMAIL", "PHONE", "EXTERN_ID"], "data": rows}).json()
    assert (answer["num_received"], answer["num_invalid_entries"]) == (5, 3)
    assert answer["invalid_entry_samples"]["not-a-hash"].startswith("EMAIL")
    assert sha("c").upper() in answer["invalid_entry_samples"]
    assert facebook.members(audience_id, "PHONE") == {sha("1"), sha("4")}
    assert facebook.members(audience_id, "EXTERN_ID") == {"x1"}


def test_facebook_value_based_audience(facebook: FakeFacebook) -> None:
    audience_id = create_audience(facebook, is_value_based="true")
    rows = [[sha("a@x.com"), 44.5], [sha("b@x.com"), 140], [sha("c@x.com"), 0], [sha("d@x.com"), -3],
            [sha("e@x.com"), "12.5"]]
    answer = form_upload(facebook, audience_id, {"schema": ["EMAIL", "LOOKALIKE_VALUE"], "data": rows}).json()
    assert (answer["num_received"], answer["num_invalid_entries"]) == (5, 1)
    view = facebook.audience(audience_id)
    assert view.values == {("EMAIL", sha("a@x.com")): 44.5, ("EMAIL", sha("b@x.com")): 140.0,
                           ("EMAIL", sha("c@x.com")): 0.0, ("EMAIL", sha("e@x.com")): 12.5}
    no_value = {"schema": "EMAIL_SHA256", "data": [sha("f@x.com")]}
    assert error_of(form_upload(facebook, audience_id, no_value))["code"] == 100
    removed = http.delete(graph(facebook, f"{audience_id}/users"),
                           params={"access_token": TOKEN, "payload": json.dumps(no_value | {"data": [sha("a@x.com")]})})
    assert removed.status_code == 200 and facebook.audience(audience_id).size == 3
    plain = create_audience(facebook)
    valued = {"schema": ["EMAIL", "LOOKALIKE_VALUE"], "data": [[sha("a@x.com"), 1]]}
    assert error_of(form_upload(facebook, plain, valued))["code"] == 100


def test_facebook_matches_people_by_any_key(facebook: FakeFacebook) -> None:
    audience_id = create_audience(facebook)
    form_upload(facebook, audience_id, {"schema": ["EMAIL", "PHONE"], "data": [[sha("a"), sha("1")],
                                                                               [sha("b"), ""]]})
    form_upload(facebook, audience_id, {"schema": ["EMAIL", "MADID"], "data": [[sha("b"), "ab-cd"]]})
    assert facebook.audience(audience_id).size == 2
    persons = facebook.audience(audience_id).persons
    assert {"EMAIL": {sha("b")}, "MADID": {"ab-cd"}} in persons and {"EMAIL": {sha("a")}, "PHONE": {sha("1")}} in persons
    http.delete(graph(facebook, f"{audience_id}/users"),
                 params={"access_token": TOKEN, "payload": json.dumps({"schema": "PHONE_SHA256", "data": [sha("1")]})})
    assert facebook.members(audience_id, "EMAIL") == {sha("b")}
    http.delete(graph(facebook, f"{audience_id}/users"), params={
        "access_token": TOKEN, "payload": json.dumps({"schema": "MOBILE_ADVERTISER_ID", "data": ["ab-cd"]})})
    assert facebook.audience(audience_id).size == 0


def test_facebook_sessions_are_recorded_and_checked(facebook: FakeFacebook) -> None:
    audience_id = create_audience(facebook)
    for seq in (1, 2, 3):
        session = {"session_id": 9778993, "batch_seq": seq, "last_batch_flag": seq == 3, "estimated_num_total": 3}
        form_upload(facebook, audience_id, {"schema": "EMAIL_SHA256", "data": [sha(str(seq))]}, session)
    record = facebook.audience(audience_id).sessions["9778993"]
    assert (record.batches, record.last_batch_seq, record.estimated_num_total) == ({1: 1, 2: 1, 3: 1}, 3, 3)
    for bad in ({"session_id": "x", "batch_seq": 1}, {"session_id": 1, "batch_seq": 0},
                {"session_id": 1, "batch_seq": 1, "last_batch_flag": "yes"}):
        assert error_of(form_upload(facebook, audience_id, {"schema": "EMAIL_SHA256", "data": []}, bad))["code"] == 100
    facebook.configure(require_session=True)
    assert error_of(form_upload(facebook, audience_id, {"schema": "EMAIL_SHA256", "data": [sha("x")]}))["code"] == 100


def replace_batch(facebook: FakeFacebook, audience_id: str, session_id: int, seq: int, last: bool, emails: list[str]
                  ) -> httpx.Response:
    return form_upload(facebook, audience_id, {"schema": "EMAIL_SHA256", "data": [sha(e) for e in emails]},
                       {"session_id": session_id, "batch_seq": seq, "last_batch_flag": last}, edge="usersreplace")


def test_facebook_usersreplace(facebook: FakeFacebook) -> None:
    audience_id = create_audience(facebook)
    form_upload(facebook, audience_id, {"schema": "EMAIL_SHA256", "data": [sha("old1"), sha("old2"), sha("keep")]})
    first = replace_batch(facebook, audience_id, 555, 1, False, ["keep", "new1"])
    assert first.json()["session_id"] == "555"
    assert facebook.audience(audience_id).replace_in_progress == "555"
    assert facebook.audience(audience_id).size == 3  # the old membership stands until the last batch
    blocked = error_of(form_upload(facebook, audience_id, {"schema": "EMAIL_SHA256", "data": [sha("x")]}))
    assert blocked["code"] == 2650
    last = replace_batch(facebook, audience_id, 555, 3, True, ["new3"])  # batch 2 is still missing
    assert facebook.audience(audience_id).replace_in_progress == "555"
    replace_batch(facebook, audience_id, 555, 2, False, ["new2"])
    assert facebook.members(audience_id, "EMAIL") == {sha("keep"), sha("new1"), sha("new2"), sha("new3")}
    view = facebook.audience(audience_id)
    assert view.replace_in_progress is None and view.sessions["555"].status == "finished"
    resent = replace_batch(facebook, audience_id, 555, 3, True, ["new3"])  # its answer was lost: same answer again
    assert resent.json() == last.json()
    assert error_of(replace_batch(facebook, audience_id, 555, 4, True, ["late"]))["code"] == 100
    assert form_upload(facebook, audience_id, {"schema": "EMAIL_SHA256", "data": [sha("x")]}).status_code == 200
    no_session = form_upload(facebook, audience_id, {"schema": "EMAIL_SHA256", "data": []}, edge="usersreplace")
    assert error_of(no_session)["code"] == 100


def test_facebook_replace_conflicts_and_timeout() -> None:
    now = [1_000_000.0]
    with FakeFacebook(clock=lambda: now[0], replace_timeout_seconds=60) as facebook:
        audience_id = create_audience(facebook)
        replace_batch(facebook, audience_id, 1, 1, False, ["a"])
        replace_batch(facebook, audience_id, 2, 1, True, ["b"])  # supersedes session 1
        assert facebook.members(audience_id, "EMAIL") == {sha("b")}
        assert facebook.audience(audience_id).sessions["1"].status == "superseded"
        assert error_of(replace_batch(facebook, audience_id, 1, 2, True, ["a"]))["code"] == 100
        facebook.configure(replace_conflict="reject")
        replace_batch(facebook, audience_id, 3, 1, False, ["c"])
        assert error_of(replace_batch(facebook, audience_id, 4, 1, True, ["d"]))["code"] == 2650
        now[0] += 61  # session 3 outlived the replace timeout: abandoned
        assert replace_batch(facebook, audience_id, 4, 1, True, ["d"]).status_code == 200
        assert facebook.audience(audience_id).sessions["3"].status == "expired"
        assert facebook.members(audience_id, "EMAIL") == {sha("d")}
        facebook.configure(replace_blocks_users=False)
        replace_batch(facebook, audience_id, 5, 1, False, ["e"])
        assert form_upload(facebook, audience_id, {"schema": "EMAIL_SHA256", "data": [sha("x")]}).status_code == 200


def test_facebook_throttles_past_the_budget(facebook: FakeFacebook) -> None:
    audience_id = create_audience(facebook)
    facebook.configure(rate_limit=2, rate_window_seconds=60)
    payload = {"schema": "EMAIL_SHA256", "data": [sha("a")]}
    for _ in range(2):
        response = form_upload(facebook, audience_id, payload)
        assert response.status_code == 200
    usage = json.loads(response.headers["x-business-use-case-usage"])
    assert usage["1234"][0]["type"] == "custom_audience" and usage["1234"][0]["call_count"] == 100
    throttled = form_upload(facebook, audience_id, {"schema": "EMAIL_SHA256", "data": [sha("b")]})
    assert error_of(throttled)["code"] == 80003
    usage = json.loads(throttled.headers["x-business-use-case-usage"])["1234"][0]
    assert usage["call_count"] == 100 and usage["estimated_time_to_regain_access"] == 1
    assert facebook.members(audience_id, "EMAIL") == {sha("a")}
    facebook.configure(throttle_code=613)
    facebook.configure(rate_limit=0)
    error = error_of(form_upload(facebook, audience_id, payload))
    assert (error["code"], error["error_subcode"]) == (613, 1487742)


def test_facebook_api_versions(facebook: FakeFacebook) -> None:
    facebook.configure(api_versions={"v25.0", "v26.0"})
    old = http.get(f"{facebook.base_url}/v19.0/act_1/customaudiences", params={"access_token": TOKEN})
    assert error_of(old)["code"] == 2635 and "v26.0" in error_of(old)["message"]
    assert http.get(f"{facebook.base_url}/v26.0/act_1/customaudiences",
                     params={"access_token": TOKEN}).status_code == 200
    assert error_of(http.get(f"{facebook.base_url}/act_1/customaudiences"))["code"] == 2500


# -- faults -----------------------------------------------------------------------------------------------------

FAST = {"delay_seconds": 1.2}
CLIENT_TIMEOUT = 0.5  # well below the delay, well above a plain answer on a busy machine


def braze_attempt(braze: FakeBraze, external_id: str) -> httpx.Response | Exception:
    try:
        return track(braze, {"attributes": [{"external_id": external_id, "a": 1}]}, timeout=CLIENT_TIMEOUT)
    except httpx.HTTPError as error:
        return error


def test_braze_faults_each_kind(braze: FakeBraze) -> None:
    braze.faults.configure(**FAST)
    braze.faults.force(Fault.THROTTLE, Fault.SERVER_ERROR, Fault.TIMEOUT, Fault.TIMEOUT_APPLIED, Fault.RESET,
                       Fault.RESET_APPLIED, None)
    outcomes = {fault: braze_attempt(braze, fault.value) for fault in
                (Fault.THROTTLE, Fault.SERVER_ERROR, Fault.TIMEOUT, Fault.TIMEOUT_APPLIED, Fault.RESET,
                 Fault.RESET_APPLIED)}
    assert track(braze, {"attributes": [{"external_id": "plain", "a": 1}]}).status_code == 201
    throttled = outcomes[Fault.THROTTLE]
    assert throttled.status_code == 429 and throttled.headers["x-ratelimit-remaining"] == "0"
    assert "x-ratelimit-reset" in throttled.headers
    assert outcomes[Fault.SERVER_ERROR].status_code in (500, 502, 503)
    assert isinstance(outcomes[Fault.TIMEOUT], httpx.ReadTimeout)
    assert isinstance(outcomes[Fault.TIMEOUT_APPLIED], httpx.ReadTimeout)
    assert isinstance(outcomes[Fault.RESET], httpx.ReadError)
    assert isinstance(outcomes[Fault.RESET_APPLIED], httpx.ReadError)
    time.sleep(FAST["delay_seconds"] + 0.2)  # the timeouts have answered into closed connections by now
    assert {value for _, value in braze.users()} == {"timeout_applied", "reset_applied", "plain"}
    log = braze.requests()
    assert [entry.fault for entry in log] == [Fault.THROTTLE, Fault.SERVER_ERROR, Fault.TIMEOUT, Fault.TIMEOUT_APPLIED,
                                              Fault.RESET, Fault.RESET_APPLIED, None]
    assert [entry.status for entry in log][2:] == [504, 201, None, 201, 201]
    assert log[-1].json() == {"attributes": [{"external_id": "plain", "a": 1}]}
    assert braze.faults.injected == Counter({fault: 1 for fault in Fault})


def test_a_timeout_answers_a_patient_client(braze: FakeBraze) -> None:
    braze.faults.configure(delay_seconds=0.3)
    braze.faults.force(Fault.TIMEOUT, Fault.TIMEOUT_APPLIED)
    assert track(braze, {"attributes": [{"external_id": "u1", "a": 1}]}, timeout=5).status_code == 504
    assert track(braze, {"attributes": [{"external_id": "u2", "a": 1}]}, timeout=5).status_code == 201
    assert set(braze.users()) == {("external_id", "u2")}


def test_facebook_faults_each_kind(facebook: FakeFacebook) -> None:
    audience_id = create_audience(facebook)
    facebook.faults.configure(**FAST, match=r"/users$")
    kinds = [Fault.THROTTLE, Fault.THROTTLE, Fault.THROTTLE, Fault.SERVER_ERROR, Fault.TIMEOUT, Fault.TIMEOUT_APPLIED,
             Fault.RESET, Fault.RESET_APPLIED]
    facebook.faults.force(*kinds)
    outcomes = []
    for index, _ in enumerate(kinds):
        try:
            outcomes.append(form_upload_quick(facebook, audience_id, f"e{index}"))
        except httpx.HTTPError as error:
            outcomes.append(error)
    codes = set()
    for throttled in outcomes[:3]:
        error = error_of(throttled)
        codes.add(error["code"])
        assert error["type"] == "OAuthException" and error["is_transient"] is True
        assert json.loads(throttled.headers["x-business-use-case-usage"])["1234"][0]["call_count"] == 100
    assert codes <= {17, 613, 80003}
    assert outcomes[3].status_code in (500, 502, 503)
    if outcomes[3].status_code == 500:
        assert outcomes[3].json()["error"]["code"] == 2
    assert isinstance(outcomes[4], httpx.ReadTimeout) and isinstance(outcomes[5], httpx.ReadTimeout)
    assert isinstance(outcomes[6], httpx.ReadError) and isinstance(outcomes[7], httpx.ReadError)
    time.sleep(FAST["delay_seconds"] + 0.2)
    assert facebook.members(audience_id, "EMAIL") == {sha("e5"), sha("e7")}
    # the audience read did not match the fault pattern: never faulted
    assert http.get(graph(facebook, audience_id), params={"access_token": TOKEN}).status_code == 200


def form_upload_quick(facebook: FakeFacebook, audience_id: str, email: str) -> httpx.Response:
    return http.post(graph(facebook, f"{audience_id}/users"), timeout=CLIENT_TIMEOUT, data={
        "access_token": TOKEN, "payload": json.dumps({"schema": "EMAIL_SHA256", "data": [sha(email)]})})


def test_fault_draws_are_seeded_and_follow_the_rate() -> None:
    plan = FaultPlan(rate=0.3, seed=11)
    first, second = FaultInjector(plan), FaultInjector(plan)
    draws = [first.draw("POST", "/users/track") for _ in range(2000)]
    assert draws == [second.draw("POST", "/users/track") for _ in range(2000)]
    assert 0.26 < sum(fault is not None for fault in draws) / len(draws) < 0.34
    assert set(draws) == set(Fault) | {None}
    first.configure(kinds={Fault.RESET: 1.0})
    assert {first.draw("POST", "/x") for _ in range(200)} == {Fault.RESET, None}
    first.configure(match=r"^DELETE ")
    assert {first.draw("POST", "/x") for _ in range(200)} == {None}
    first.disable()
    assert {first.draw("DELETE", "/x") for _ in range(200)} == {None}
    with pytest.raises(ValueError):
        FaultPlan(rate=1.5)
    with pytest.raises(ValueError):
        FaultPlan(rate=0.5, kinds={"meteor": 1.0})


def test_random_faults_at_thirty_percent(braze: FakeBraze) -> None:
    braze.faults.configure(rate=0.3, seed=3, delay_seconds=0.8)
    for index in range(60):
        braze_attempt(braze, f"u{index}")
    time.sleep(0.9)
    log = braze.requests()
    faulted = [entry for entry in log if entry.fault is not None]
    assert len(faulted) == sum(braze.faults.injected.values())
    assert 8 <= len(faulted) <= 30
    applied = {entry.json()["attributes"][0]["external_id"] for entry in log
               if entry.fault is None or entry.fault in (Fault.TIMEOUT_APPLIED, Fault.RESET_APPLIED)}
    assert {value for _, value in braze.users()} == applied
    assert all(entry.status == 201 for entry in log if entry.fault is None)


def test_latency_slows_every_request(braze: FakeBraze) -> None:
    braze.faults.configure(latency_seconds=0.3)
    started = time.monotonic()
    assert track(braze, {"attributes": [{"external_id": "u", "a": 1}]}).status_code == 201
    assert time.monotonic() - started >= 0.3


def test_server_restart_keeps_the_port_and_stops_during_a_timeout() -> None:
    braze = FakeBraze(keep_bodies=False).start()
    try:
        base_url = braze.base_url
        braze.faults.configure(delay_seconds=30)
        braze.faults.force(Fault.TIMEOUT)
        assert isinstance(braze_attempt(braze, "u"), httpx.ReadTimeout)
        started = time.monotonic()
        braze.stop()
        assert time.monotonic() - started < 5  # the sleeping timeout did not hold the shutdown up
        braze.start()
        assert braze.base_url == base_url
        assert track(braze, {"attributes": [{"external_id": "v", "a": 1}]}).status_code == 201
        assert braze.requests()[-1].body == b""  # keep_bodies=False
    finally:
        braze.stop()


def test_fakes_run_in_process_with_asgi_transport() -> None:
    braze = FakeBraze()

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=braze.asgi), base_url="http://braze") as client:
            response = await client.post("/users/track", json={"attributes": [{"external_id": "u", "a": 1}]},
                                         headers=AUTH)
            assert response.status_code == 201
            braze.faults.force(Fault.RESET)
            with pytest.raises(ConnectionResetError):
                await client.post("/users/track", json={"attributes": [{"external_id": "v"}]}, headers=AUTH)

    import asyncio

    asyncio.run(scenario())
    assert set(braze.users()) == {("external_id", "u")}
