"""Wire compatibility (spec A1, B§2-B§5): auth modes, gzip, CORS, SDK quirks, real SDK fixtures."""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import json
from email.utils import formatdate
from pathlib import Path

import pytest
from live_server import LiveServer

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "web-sdk-2.68"


def signed_headers(key: str, secret: str, path: str, body: bytes, date: str) -> dict[str, str]:
    message = f"POST\n{date}\n{path}".encode() + body
    signature = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return {"x-mp-key": key, "Date": date, "x-mp-signature": signature, "Content-Type": "application/json"}


def identify_body(**identities: str) -> dict:
    return {"environment": "production", "known_identities": identities}


def test_basic_auth_and_wrong_secret(server: LiveServer):
    ws = server.create_workspace()
    with server.client() as http:
        ok = http.post("/v1/identify", json=identify_body(ios_idfv="a1"), auth=(ws.api_key, ws.api_secret))
        bad = http.post("/v1/identify", json=identify_body(ios_idfv="a1"), auth=(ws.api_key, "nope"))
        none = http.post("/v1/identify", json=identify_body(ios_idfv="a1"))
    assert ok.status_code == 200
    assert bad.status_code == 401 and bad.json()["ErrorCode"] == "UNAUTHORIZED"
    assert none.status_code == 401
    assert ws.api_secret not in bad.text


def test_hmac_signature_ios_style_and_android_gzip_with_query(server: LiveServer):
    ws = server.create_workspace()
    body = json.dumps(identify_body(ios_idfv="hmac-device")).encode()
    with server.client() as http:
        ios = http.post("/v1/identify", content=body,
                        headers=signed_headers(ws.api_key, ws.api_secret, "/v1/identify", body, "20170712T224127Z"))
        # Android: RFC-1123 date, signs path+query over the uncompressed JSON, sends it gzipped.
        rfc_date = formatdate(usegmt=True)
        headers = signed_headers(ws.api_key, ws.api_secret, "/v1/identify?return_matches=true", body, rfc_date)
        android = http.post("/v1/identify?return_matches=true", content=gzip.compress(body),
                            headers=dict(headers, **{"Content-Encoding": "gzip"}))
        tampered = http.post("/v1/identify", content=body.replace(b"hmac-device", b"other-device"),
                             headers=signed_headers(ws.api_key, ws.api_secret, "/v1/identify", body, rfc_date))
    assert ios.status_code == 200, ios.text
    assert android.status_code == 200, android.text
    assert android.json()["mpid"] == ios.json()["mpid"]
    assert android.json()["matched_identities"] == {"ios_idfv": "hmac-device"}
    assert tampered.status_code == 401


def test_key_only_auth_is_off_by_default_and_works_when_enabled(server: LiveServer):
    closed = server.create_workspace()
    opened = server.create_workspace({"key_only_auth": True})
    with server.client() as http:
        refused = http.post("/v1/identify", json=identify_body(ios_idfv="k"), headers={"x-mp-key": closed.api_key})
        accepted = http.post("/v1/identify", json=identify_body(ios_idfv="k"), headers={"x-mp-key": opened.api_key})
    assert refused.status_code == 401
    assert accepted.status_code == 200


def test_cors_preflight_allows_the_web_sdk(server: LiveServer):
    with server.client() as http:
        response = http.options("/v1/identify", headers={
            "Origin": "http://localhost:9999", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-mp-key,content-type"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("*", "http://localhost:9999")
    assert "x-mp-key" in response.headers["access-control-allow-headers"].lower()


def test_sdk_quirks_previous_mpid_number_roku_request_id_unknown_keys(server: LiveServer):
    ws = server.create_workspace({"strategy": "profile_conversion"})
    auth = (ws.api_key, ws.api_secret)
    with server.client() as http:
        first = http.post("/v1/identify", json=identify_body(android_uuid="dev-1"), auth=auth).json()
        as_number = http.post("/v1/login", auth=auth, json={
            "environment": "production", "previous_mpid": int(first["mpid"]), "requestId": "roku-1",
            "client_sdk": {"platform": "roku"}, "some_future_key": {"x": 1}, "context": None,
            "known_identities": {"customerid": "c-1", "android_uuid": "dev-1", "email": None}})
    assert as_number.status_code == 200, as_number.text
    assert as_number.json()["mpid"] == first["mpid"]
    assert isinstance(as_number.json()["mpid"], str) and int(as_number.json()["mpid"]) != 0


def test_text_plain_and_missing_content_type_are_parsed_as_json(server: LiveServer):
    ws = server.create_workspace()
    with server.client() as http:
        response = http.post("/v1/identify", content=json.dumps(identify_body(ios_idfv="tp")),
                             auth=(ws.api_key, ws.api_secret), headers={"Content-Type": "text/plain;charset=UTF-8"})
    assert response.status_code == 200


@pytest.mark.parametrize("body, field", [
    (b"{not json", "body"),
    (json.dumps({"known_identities": {"email": "a@b.c"}}).encode(), "environment"),
    (json.dumps({"environment": "production"}).encode(), "known_identities"),
    (json.dumps(identify_body(not_a_type="x")).encode(), "known_identities.not_a_type"),
    (json.dumps(identify_body(email="", ios_idfa="00000000-0000-0000-0000-000000000000")).encode(),
     "known_identities"),
])
def test_bad_identify_bodies_name_the_field_and_write_nothing(server: LiveServer, body: bytes, field: str):
    ws = server.create_workspace()
    with server.client() as http:
        response = http.post("/v1/identify", content=body, auth=(ws.api_key, ws.api_secret),
                             headers={"Content-Type": "application/json"})
    payload = response.json()
    assert response.status_code == 400
    assert payload["errors"] == payload["Errors"] and payload["StatusCode"] == 400
    assert payload["errors"][0]["field"] == field
    assert payload["ErrorCode"] == "BAD_REQUEST" and payload["RequestId"]
    count = server.service.connection.cursor().execute("SELECT count(*) FROM profiles").fetchone()[0]
    assert count == 0


def test_gzip_bomb_is_refused(server: LiveServer):
    ws = server.create_workspace()
    bomb = gzip.compress(b'{"environment":"production","known_identities":{"email":"' + b"a" * 6_000_000 + b'"}}')
    with server.client() as http:
        response = http.post("/v1/identify", content=bomb, auth=(ws.api_key, ws.api_secret),
                             headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert response.status_code == 413


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def test_replays_the_web_sdk_session_captured_from_the_real_sdk(server: LiveServer):
    """identify -> login -> modify (incl. a no-op change) -> logout -> alias, exactly as web SDK 2.68 sent them."""
    ws = server.create_workspace({"strategy": "profile_conversion", "key_only_auth": True})
    headers = {"x-mp-key": ws.api_key, "Content-Type": "application/json"}
    with server.client() as http:
        identify = http.post("/v1/identify", json=_fixture("01-identify.json")["body"], headers=headers).json()
        login_body = _fixture("01-login.json")["body"]
        login_body["previous_mpid"] = identify["mpid"]
        login = http.post("/v1/login", json=login_body, headers=headers).json()
        assert login["mpid"] == identify["mpid"] and login["is_logged_in"] is True
        modify = http.post(f"/v1/{login['mpid']}/modify", json=_fixture("01-modify.json")["body"], headers=headers)
        assert modify.status_code == 200, modify.text
        assert [r["modified_mpid"] for r in modify.json()["change_results"]] == [login["mpid"]] * 2
        logout_body = _fixture("01-logout.json")["body"]
        logout_body["previous_mpid"] = login["mpid"]
        logout = http.post("/v1/logout", json=logout_body, headers=headers).json()
        assert logout["mpid"] != login["mpid"] and logout["is_logged_in"] is False
        alias_body = _fixture("01-alias-alias.json")["body"]
        alias_body["api_key"] = ws.api_key
        alias_body["data"].update(source_mpid=logout["mpid"], destination_mpid=login["mpid"])
        alias = http.post(f"/v1/identity/{ws.api_key}/Alias", json=alias_body,
                          headers={"Content-Type": "application/json"})
        assert alias.status_code == 202, alias.text
        search = http.post("/v1/search", auth=(ws.api_key, ws.api_secret), json={
            "environment": "development", "known_identities": {"email": "NEW-web-mz7d1xd3@example.com"}})
    assert search.json()["mpid"] == login["mpid"]


def test_basic_auth_header_is_checked_before_the_body(server: LiveServer):
    with server.client() as http:
        response = http.post("/v1/identify", content=b"{broken", headers={
            "Authorization": "Basic " + base64.b64encode(b"nobody:nothing").decode()})
    assert response.status_code == 401
