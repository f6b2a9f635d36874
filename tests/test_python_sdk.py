"""The official mParticle Python server SDK (PyPI `mparticle` 0.16.1) against a live idmesh.

Every request here is built, serialized, authenticated and sent by the SDK itself (`EventsApi.upload_events`,
`EventsApi.bulk_upload_events`, Basic auth from `Configuration.api_key` / `api_secret`); the tests then read
what the DuckDB views hold. The SDK's host is `Configuration.host`, the base URL *including* the `/v2` path
(it appends `/events` and `/bulkevents`). Plain http works: its urllib3 pool only applies the TLS settings to
https URLs, so the LiveServer's http base URL is used as it is.

How the SDK reports an answer: a (None, status, headers) tuple for 200-205, an `ApiException` carrying status
and body for anything else, 207 included. It never parses the body, so the per-batch outcome is read from
`api_client.last_response` (the raw answer of the last successful call).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import mparticle
import pytest
from live_server import IdSyncClient, LiveServer, WorkspaceCredentials
from mparticle.rest import ApiException

ZERO_IDFA = "00000000-0000-0000-0000-000000000000"  # what iOS reports when ad tracking is limited
IDFV = "07D2FF8E-7B5F-4C41-9A6B-2D2C2A1D5A11"      # the SDK insists on UUID syntax for ios_idfv
CONSENT_MS = 1795330000000


# --------------------------------------------------------------------------- SDK plumbing


@pytest.fixture
def workspace(server: LiveServer) -> WorkspaceCredentials:
    return server.create_workspace()


@pytest.fixture
def events_api(server: LiveServer, workspace: WorkspaceCredentials) -> Iterator[mparticle.EventsApi]:
    with sdk_client(server, workspace.api_key, workspace.api_secret) as api:
        yield api


@contextlib.contextmanager
def sdk_client(server: LiveServer, key: str, secret: str) -> Iterator[mparticle.EventsApi]:
    config = mparticle.Configuration()
    config.host = server.base_url + "/v2"
    config.api_key = key
    config.api_secret = secret
    api = mparticle.EventsApi(config)
    try:
        yield api
    finally:
        api.api_client.rest_client.pool_manager.clear()
        # Each Configuration adds a stderr handler to the process-wide `mparticle` and `urllib3` loggers.
        for logger in (logging.getLogger("mparticle"), logging.getLogger("urllib3")):
            logger.removeHandler(config.logger_stream_handler)


def upload(api: mparticle.EventsApi, batch: mparticle.Batch) -> dict[str, Any]:
    """One batch through `upload_events`; returns idmesh's outcome for it after checking the SDK saw success."""
    _, status, _ = api.upload_events(batch)
    assert status == 202
    return json.loads(api.api_client.last_response.data)


def bulk_upload(api: mparticle.EventsApi, batches: list[mparticle.Batch]) -> list[dict[str, Any]]:
    _, status, _ = api.bulk_upload_events(batches)
    assert status == 202
    return json.loads(api.api_client.last_response.data)["results"]


def stored_counts(server: LiveServer, workspace: WorkspaceCredentials) -> dict[str, int]:
    """Row counts of every view an accepted batch writes to, for 'nothing stored twice' checks."""
    views = ("events", "batches", "user_attributes", "consent_history")
    counts = {view: server.query(f"SELECT count(*) FROM {view} WHERE workspace_id = ?", workspace.id)[0][0]
              for view in views}
    counts["profiles"] = server.query("SELECT count(*) FROM profiles WHERE scope = ?", workspace.id)[0][0]
    return counts


# --------------------------------------------------------------------------- batches built with the SDK's models


def identities(customer_id: str, email: str | None = None) -> mparticle.UserIdentities:
    return mparticle.UserIdentities(customerid=customer_id, email=email, other_id_2=f"loyalty-{customer_id}")


def consent_state() -> mparticle.ConsentState:
    consent = mparticle.ConsentState()
    consent.gdpr = {"marketing": mparticle.GDPRConsentState(
        document="marketing_v1", consented=True, timestamp_unixtime_ms=CONSENT_MS,
        location="https://shop.example.com/privacy", hardware_id="hw-1")}
    consent.ccpa = {"data_sale_opt_out": mparticle.CCPAConsentState(
        document="ccpa_v1", consented=False, timestamp_unixtime_ms=CONSENT_MS + 1)}
    return consent


def shop_events(base_ms: int) -> list[Any]:
    """A custom event with attributes, a screen view and a purchase of one product, one second apart."""
    product = mparticle.Product(id="sku-1", name="Shoe", price=59.0, quantity=2)
    purchase = mparticle.ProductAction(action="purchase", transaction_id="t-1", total_amount=118.0,
                                       products=[product])
    return [
        mparticle.AppEvent(event_name="Added To Cart", custom_event_type="transaction",
                           timestamp_unixtime_ms=base_ms, custom_attributes={"sku": "sku-1", "price": "59.00"}),
        mparticle.ScreenViewEvent(screen_name="Cart", timestamp_unixtime_ms=base_ms + 1000,
                                  custom_attributes={"from": "home"}),
        mparticle.CommerceEvent(product_action=purchase, timestamp_unixtime_ms=base_ms + 2000),
    ]


def make_batch(**fields: Any) -> mparticle.Batch:
    """A Batch filled through its property setters. `Batch(events=...)` skips the setter that wraps each event
    in an EventBase, and the SDK then sends events without an event_type: the setters are the documented way."""
    batch = mparticle.Batch()
    for name, value in fields.items():
        setattr(batch, name, value)
    return batch


def full_batch(customer_id: str, request_id: str | None = None) -> mparticle.Batch:
    return make_batch(
        environment="development",
        source_request_id=request_id,
        user_identities=identities(customer_id, email=f"{customer_id}@example.com"),
        device_info=mparticle.DeviceInformation(ios_advertising_id=ZERO_IDFA, ios_idfv=IDFV),
        user_attributes={"tier": "gold", "$city": "Lisbon", "favourite_colours": ["red", "blue"]},
        deleted_user_attributes=["old_attr"],
        consent_state=consent_state(),
        events=shop_events(1795330000000),
    )


def small_batch(customer_id: str, event_name: str, request_id: str | None = None) -> mparticle.Batch:
    return make_batch(
        environment="production",
        source_request_id=request_id,
        user_identities=identities(customer_id),
        device_info=mparticle.DeviceInformation(ios_advertising_id=ZERO_IDFA),
        events=[mparticle.AppEvent(event_name=event_name, custom_attributes={"customer": customer_id})],
    )


def identify(server: LiveServer, workspace: WorkspaceCredentials, customer_id: str) -> int:
    client = IdSyncClient(server, workspace)
    try:
        return int(client.identify({"customerid": customer_id})["mpid"])
    finally:
        client.close()


# --------------------------------------------------------------------------- tests


def test_single_batch_from_the_sdk_is_stored_field_for_field(server, workspace, events_api):
    earlier = small_batch("cust-1", "Signed Up")
    earlier.user_attributes = {"old_attr": "to be deleted", "tier": "silver"}
    first = upload(events_api, earlier)

    outcome = upload(events_api, full_batch("cust-1", request_id="req-full-1"))

    assert outcome["status"] == "accepted" and outcome["batch_id"]
    mpid = int(outcome["mpid"])
    assert int(first["mpid"]) == mpid  # same customer id, same profile
    assert identify(server, workspace, "cust-1") == mpid

    events = server.query("""SELECT event_type, event_name, custom_event_type, timestamp_ms, custom_attributes,
                                    environment, data->'product_action'
                             FROM events WHERE mpid = ? AND batch_id = ? ORDER BY event_index""",
                  mpid, outcome["batch_id"])
    assert [row[:4] for row in events] == [
        ("custom_event", "Added To Cart", "transaction", 1795330000000),
        ("screen_view", "Cart", None, 1795330001000),
        ("commerce_event", None, None, 1795330002000),
    ]
    assert [json.loads(row[4]) if row[4] else None for row in events] == [
        {"sku": "sku-1", "price": "59.00"}, {"from": "home"}, None]
    assert {row[5] for row in events} == {"development"}
    assert json.loads(events[2][6]) == {"action": "purchase", "transaction_id": "t-1", "total_amount": 118.0,
                                        "products": [{"id": "sku-1", "name": "Shoe", "price": 59.0, "quantity": 2}]}

    batch_row = server.query("""SELECT source, source_request_id, event_count, environment,
                                       envelope->'device_info'->>'ios_idfv'
                                FROM batches WHERE batch_id = ?""", outcome["batch_id"])
    assert batch_row == [("s2s", "req-full-1", 3, "development", IDFV)]

    # The later batch wins `tier`, adds a list and a `$` reserved name, and deletes `old_attr`.
    attributes = {name: json.loads(value) for name, value in
                  server.query("SELECT name, value FROM user_attributes WHERE mpid = ?", mpid)}
    assert attributes == {"tier": "gold", "$city": "Lisbon", "favourite_colours": ["red", "blue"]}

    consent = server.query("""SELECT regulation, purpose, consented, document, timestamp_ms, location, hardware_id
                              FROM consent WHERE mpid = ? ORDER BY regulation""", mpid)
    assert consent == [
        ("ccpa", "data_sale_opt_out", False, "ccpa_v1", CONSENT_MS + 1, None, None),
        ("gdpr", "marketing", True, "marketing_v1", CONSENT_MS, "https://shop.example.com/privacy", "hw-1"),
    ]

    # Identities came from user_identities and device_info; the all-zero IDFA is not an identity.
    stored = dict(server.query("SELECT identity_type, raw_value FROM identities WHERE mpid = ?", mpid))
    assert stored == {"customerid": "cust-1", "email": "cust-1@example.com", "other2": "loyalty-cust-1",
                      "ios_idfv": IDFV}
    assert stored_counts(server, workspace)["profiles"] == 1


def test_bulk_upload_makes_one_profile_per_customer_id(server, workspace, events_api):
    batches = [small_batch("cust-a", "A1"), small_batch("cust-b", "B1"), small_batch("cust-a", "A2"),
               small_batch("cust-c", "C1")]

    results = bulk_upload(events_api, batches)

    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert {r["status"] for r in results} == {"accepted"}
    mpids = [int(r["mpid"]) for r in results]
    # Every batch carries the same all-zero IDFA: it must not join the customers into one profile.
    assert mpids[0] == mpids[2] and len({mpids[0], mpids[1], mpids[3]}) == 3
    for customer_id, mpid in (("cust-a", mpids[0]), ("cust-b", mpids[1]), ("cust-c", mpids[3])):
        assert identify(server, workspace, customer_id) == mpid
    profiles_per_customer = server.query("""SELECT value, count(DISTINCT mpid) FROM identities
                                            WHERE scope = ? AND identity_type = 'customerid' GROUP BY value
                                            ORDER BY value""", workspace.id)
    assert profiles_per_customer == [("cust-a", 1), ("cust-b", 1), ("cust-c", 1)]
    assert stored_counts(server, workspace)["profiles"] == 3

    events = server.query("""SELECT mpid, event_name, custom_attributes->>'customer', event_type
                             FROM events WHERE workspace_id = ? ORDER BY event_name""", workspace.id)
    assert events == [(mpids[0], "A1", "cust-a", "custom_event"), (mpids[0], "A2", "cust-a", "custom_event"),
                      (mpids[1], "B1", "cust-b", "custom_event"), (mpids[3], "C1", "cust-c", "custom_event")]
    assert server.query("SELECT DISTINCT source, environment FROM batches WHERE workspace_id = ?",
                workspace.id) == [("s2s", "production")]


def test_batch_naming_a_known_mpid_lands_on_that_profile(server, workspace, events_api):
    mpid = int(upload(events_api, small_batch("cust-m", "First"))["mpid"])
    by_mpid = make_batch(environment="production", mpid=mpid, user_attributes={"plan": "pro"},
                         events=[mparticle.ScreenViewEvent(screen_name="Account")])

    outcome = upload(events_api, by_mpid)

    assert outcome["status"] == "accepted" and int(outcome["mpid"]) == mpid
    assert server.query("SELECT event_type, event_name FROM events WHERE mpid = ? ORDER BY received_ms, event_index",
                mpid) == [("custom_event", "First"), ("screen_view", "Account")]
    assert server.query("SELECT value->>'$' FROM user_attributes WHERE mpid = ? AND name = 'plan'", mpid) == [("pro",)]
    assert stored_counts(server, workspace)["profiles"] == 1


def every_sdk_event() -> list[Any]:
    """One model of each event class the SDK's Batch accepts, in its list's order."""
    from mparticle.models.user_attribute_change_event import UserAttributeChangeEvent  # not re-exported

    return [
        mparticle.AppEvent(event_name="Tapped", custom_event_type="navigation", timestamp_unixtime_ms=1795330000000,
                           session_id=42, session_uuid="S-1", event_id=7, source_message_id="m-1",
                           custom_flags={"flag": "on"}, location=mparticle.GeoLocation(latitude=38.7, longitude=-9.1)),
        mparticle.FirstRunEvent(), mparticle.SessionStartEvent(), mparticle.SessionEndEvent(session_duration_ms=5),
        mparticle.ApplicationStateTransitionEvent(application_transition_type="application_initialized"),
        mparticle.ScreenViewEvent(screen_name="Home"),
        mparticle.PushRegistrationEvent(register=True, registration_token="push-token"),
        mparticle.ProfileEvent(), mparticle.OptOutEvent(is_opted_out=True), mparticle.BreadcrumbEvent(label="crumb"),
        mparticle.CommerceEvent(product_action=mparticle.ProductAction("add_to_cart"), currency_code="EUR",
                                promotion_action=mparticle.PromotionAction(
                                    action="view", promotions=[mparticle.Promotion(id="promo-1")])),
        mparticle.PushMessageEvent(push_message_token="push-token", push_message_type="received", message="hi"),
        mparticle.NetworkPerformanceEvent(http_verb="GET", url="https://example.com", time_elapsed=1, bytes_in=1,
                                          bytes_out=1, response_code=200),
        mparticle.CrashReportEvent(message="boom"),
        UserAttributeChangeEvent(user_attribute_name="tier", new="gold", deleted=False, is_new_attribute=True),
    ]


def test_every_event_type_and_envelope_field_the_sdk_builds_is_accepted(server, workspace, events_api):
    batch = make_batch(
        environment="production",
        user_identities=identities("cust-e"),
        mp_deviceid="device-stamp-1",
        ip="203.0.113.9",
        application_info=mparticle.ApplicationInformation(application_name="shop", application_version="1.0"),
        context=mparticle.BatchContext(data_plan=mparticle.DataPlanContext(plan_id="shop_plan", plan_version=2)),
        integration_attributes={"160": {"braze_id": "b-1"}},
        events=every_sdk_event(),
    )

    outcome = upload(events_api, batch)

    mpid = int(outcome["mpid"])
    # The SDK itself labels CrashReportEvent as commerce_event; idmesh stores what it was sent.
    assert server.query("SELECT event_type FROM events WHERE mpid = ? ORDER BY event_index", mpid) == [
        (t,) for t in ("custom_event", "first_run", "session_start", "session_end", "application_state_transition",
                       "screen_view", "push_registration", "profile", "opt_out", "breadcrumb", "commerce_event",
                       "push_message", "network_performance", "commerce_event", "user_attribute_change")]
    assert server.query("""SELECT event_name, custom_event_type, session_id, session_uuid, event_id, source_message_id,
                                  data->'custom_flags'->>'flag', data->'location'->>'latitude'
                           FROM events WHERE mpid = ? AND event_index = 0""", mpid) == [
        ("Tapped", "navigation", 42, "S-1", "7", "m-1", "on", "38.7")]
    envelope = json.loads(server.query("SELECT envelope FROM batches WHERE mpid = ?", mpid)[0][0])
    assert envelope["ip"] == "203.0.113.9" and envelope["application_info"]["application_name"] == "shop"
    assert envelope["context"]["data_plan"] == {"plan_id": "shop_plan", "plan_version": 2}
    assert envelope["integration_attributes"] == {"160": {"braze_id": "b-1"}}
    assert dict(server.query("SELECT identity_type, raw_value FROM identities WHERE mpid = ?", mpid)) == {
        "customerid": "cust-e", "other2": "loyalty-cust-e", "device_application_stamp": "device-stamp-1"}


def test_replayed_source_request_id_stores_nothing_twice(server, workspace, events_api):
    original = full_batch("cust-r", request_id="req-replay-1")
    accepted = upload(events_api, original)
    assert accepted["status"] == "accepted"
    after_first = stored_counts(server, workspace)
    assert after_first == {"events": 3, "batches": 1, "user_attributes": 3, "consent_history": 2, "profiles": 1}

    # The SDK cannot set batch_id (its Batch model has no such field): source_request_id is its replay key.
    again = upload(events_api, full_batch("cust-r", request_id="req-replay-1"))
    assert again["status"] == "duplicate"
    assert stored_counts(server, workspace) == after_first

    # In a bulk: the old request, a new one, and that new one again within the same request.
    fresh = small_batch("cust-r", "Fresh", request_id="req-replay-2")
    results = bulk_upload(events_api, [full_batch("cust-r", request_id="req-replay-1"), fresh,
                                       small_batch("cust-r", "Fresh", request_id="req-replay-2")])
    assert [r["status"] for r in results] == ["duplicate", "accepted", "duplicate"]
    after_bulk = stored_counts(server, workspace)
    assert after_bulk == dict(after_first, events=4, batches=2)

    # Replay keys outlive a restart (reloaded from the batches table).
    server.restart()
    assert upload(events_api, full_batch("cust-r", request_id="req-replay-1"))["status"] == "duplicate"
    assert stored_counts(server, workspace) == after_bulk
    assert server.query("SELECT count(*) FROM events WHERE event_name = 'Fresh'") == [(1,)]


def test_partial_bulk_is_an_sdk_error_and_a_whole_retry_is_safe(server, workspace, events_api):
    anonymous = make_batch(environment="production", source_request_id="req-anon",
                           events=[mparticle.AppEvent(event_name="Nobody")])  # no identity, no mpid
    batches = [small_batch("cust-p", "Kept", request_id="req-kept"), anonymous]

    # idmesh answers 207; the SDK accepts only 200-205, so the caller sees an exception holding the results.
    with pytest.raises(ApiException) as raised:
        events_api.bulk_upload_events(batches)
    assert raised.value.status == 207
    results = json.loads(raised.value.body)["results"]
    assert [r["status"] for r in results] == ["accepted", "rejected"]
    assert results[1]["error"]["field"] == "user_identities"
    after = stored_counts(server, workspace)
    assert after == {"events": 1, "batches": 1, "user_attributes": 0, "consent_history": 0, "profiles": 1}

    # A caller that retries the whole request on that exception stores the accepted batch only once.
    with pytest.raises(ApiException) as retried:
        events_api.bulk_upload_events(batches)
    assert retried.value.status == 207
    assert [r["status"] for r in json.loads(retried.value.body)["results"]] == ["duplicate", "rejected"]
    assert stored_counts(server, workspace) == after


def test_rejections_reach_the_sdk_as_exceptions_and_store_nothing(server, workspace, events_api):
    unknown = make_batch(environment="production", mpid=123456789, events=[mparticle.AppEvent(event_name="Ghost")])
    with pytest.raises(ApiException) as raised:
        events_api.upload_events(unknown)
    assert raised.value.status == 400
    assert "mpid" in raised.value.body

    with sdk_client(server, workspace.api_key, "not-the-secret") as wrong_secret:
        with pytest.raises(ApiException) as refused:
            wrong_secret.upload_events(small_batch("cust-x", "Refused"))
    assert refused.value.status == 401
    assert stored_counts(server, workspace) == {"events": 0, "batches": 0, "user_attributes": 0,
                                                "consent_history": 0, "profiles": 0}
