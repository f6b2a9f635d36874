"""The Braze output against the fake Braze over real HTTP (tests/fakes/braze.py on a loopback port).

Each "Send Segments As" mode leaves the fake's profiles saying exactly what the membership says; requests are
filled to the batch size and never above it; objects `errors[]` names are retried (or rejected) alone; 429s and
rate-limit headers are honoured with the wait they ask for; refused keys reject the batch at once; transport
faults are retried and converge. Clocks are injected (the fake's rate window and the output's), so no assertion
depends on the wall clock.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
from fakes.braze import FakeBraze
from fakes.faults import Fault, FaultPlan, WindowBudget
from fakes.server import FakeServer

from audiences.connections import Connection, ConnectionRegistry, Credentials, check_settings
from audiences.delivery import DeliveryService
from audiences.membership import apply_members
from audiences.outputs.base import Acknowledged, AudienceRef, Delta, Rejected, RetryLater, RetryPolicy, http_client
from audiences.outputs.braze import (
    MAX_ITEM_RETRIES,
    SEGMENT_MODES,
    BrazeOptions,
    BrazeOutput,
    item_outcome,
    plan_objects,
)
from audiences.registry import Audience, AudienceRegistry
from engine.idsync import IdSyncService
from engine.writer import WriteBatch

KEY = "braze-test-key"
PARISIANS = AudienceRef(7, "possible_parisians", "Possible Parisians")
ATHENIANS = AudienceRef(8, "aspiring_athenians", "Aspiring Athenians")
FIXED_NOW = 1_000_000.0


def connection(base_url: str, mode: str = "single_array", *, connection_id: int = 1, audience_id: int = 7,
               api_key: str = KEY, identity_types: list[str] | None = None, **braze: Any) -> Connection:
    settings = {"base_url": base_url, "braze": {"send_segments_as": mode, **braze}}
    if identity_types is not None:
        settings["identity_types"] = identity_types
    return Connection(id=connection_id, workspace_id="ws", audience_id=audience_id, output="braze", name="braze",
                      status="active", settings=check_settings("braze", settings),
                      credentials=Credentials({"api_key": api_key}))


def add(seq: int, user: str, attributes: dict[str, object] | None = None, **identifiers: str) -> Delta:
    return Delta(seq, seq, "add", identifiers or {"external_id": user}, attributes or {})


def remove(seq: int, user: str) -> Delta:
    return Delta(seq, seq, "remove", {"external_id": user}, held_identifiers={"external_id": user})


def deliver(output: BrazeOutput, conn: Connection, deltas: list[Delta]) -> list[Any]:
    async def run() -> list[Any]:
        try:
            return await output.deliver(conn, deltas)
        finally:
            await output.aclose()
    return asyncio.run(run())


def in_batches(output_factory: Callable[[], BrazeOutput], conn: Connection, deltas: list[Delta]) -> list[Any]:
    """What the flush task does: `batch_limit` deltas per `deliver`, one output for the whole run."""
    async def run() -> list[Any]:
        output = output_factory()
        outcomes: list[Any] = []
        try:
            limit = output.batch_limit(conn)
            for start in range(0, len(deltas), limit):
                outcomes += await output.deliver(conn, deltas[start:start + limit])
        finally:
            await output.aclose()
        return outcomes
    return asyncio.run(run())


def track_requests(fake: FakeBraze) -> list[dict[str, Any]]:
    return [entry.json() for entry in fake.requests() if entry.path == "/users/track"]


@pytest.fixture
def fake():
    with FakeBraze(api_keys={KEY}, forbidden_keys={"read-only-key"}) as braze:
        yield braze


class Rewriting:
    """An ASGI layer in front of the fake for what the fake never does by itself: `edit_request(body) -> body`
    changes a request before the fake sees it, `edit_response(status, headers, body) -> (status, headers, body)`
    changes its answer."""

    def __init__(self, inner: Callable[..., Awaitable[None]],
                 edit_request: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 edit_response: Callable[[int, list[tuple[bytes, bytes]], dict[str, Any]],
                                         tuple[int, list[tuple[bytes, bytes]], dict[str, Any]]] | None = None) -> None:
        self.inner = inner
        self.edit_request = edit_request
        self.edit_response = edit_response

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            body.extend(message.get("body", b""))
            if not message.get("more_body", False):
                break
        request = bytes(body)
        if self.edit_request is not None:
            request = orjson.dumps(self.edit_request(orjson.loads(request)))
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": request, "more_body": False}

        start: dict[str, Any] = {}
        answer = bytearray()

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                answer.extend(message.get("body", b""))

        await self.inner(scope, replay, capture)
        status, headers, payload = start["status"], list(start.get("headers", [])), orjson.loads(answer or b"{}")
        if self.edit_response is not None:
            status, headers, payload = self.edit_response(status, headers, payload)
        out = orjson.dumps(payload)
        headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(out)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": out})


# --- what each mode sends ------------------------------------------------------------------------------------------

def test_wire_format_of_every_part() -> None:
    conn = connection("http://127.0.0.1:9", "all")
    objects, unsendable = plan_objects(BrazeOptions.of(conn), PARISIANS, [
        add(1, "u1", {"tier": "gold", "ltv": 12.5, "external_id": "spoof", "SegmentMembership": "spoof"}),
        remove(2, "u2"),
        Delta(3, 3, "add", {"email": "a@example.com", "phone": "+15551234567"}),
        Delta(4, 4, "add", {}),
    ])
    assert [obj.body for obj in objects] == [
        {"external_id": "u1", "tier": "gold", "ltv": 12.5, "SegmentMembership": "'7'",
         "SegmentMembershipArray": {"add": ["7"]}, "In Possible Parisians": True},
        {"external_id": "u2", "SegmentMembership": None, "SegmentMembershipArray": {"remove": ["7"]},
         "In Possible Parisians": False, "_update_existing_only": True},
        {"email": "a@example.com", "SegmentMembership": "'7'", "SegmentMembershipArray": {"add": ["7"]},
         "In Possible Parisians": True},
    ]
    assert list(unsendable) == [3] and isinstance(unsendable[3], Rejected)
    assert "$add" not in orjson.dumps([obj.body for obj in objects]).decode()


def _expected_profile(mode: str, memberships: dict[int, bool | None], string_names: dict[int, str]
                      ) -> dict[str, Any]:
    """What a profile should hold for `memberships` (audience id -> True in, False left, None never sent)."""
    string, array, per_segment = SEGMENT_MODES[mode]
    profile: dict[str, Any] = {}
    audiences = {PARISIANS.id: PARISIANS, ATHENIANS.id: ATHENIANS}
    held = [str(a) for a, state in sorted(memberships.items()) if state]
    for audience_id, state in memberships.items():
        if state is None:
            continue
        if string and state:
            profile[string_names[audience_id]] = f"'{audience_id}'"
        if per_segment:
            profile[f"In {audiences[audience_id].external_name}"] = state
    if array and any(state is not None for state in memberships.values()):
        profile["SegmentMembershipArray"] = held
    return profile


@pytest.mark.parametrize("mode", sorted(SEGMENT_MODES))
def test_each_mode_leaves_braze_saying_what_the_membership_says(fake: FakeBraze, mode: str) -> None:
    """Two audiences, each with its own connection to the same Braze, over rounds of random enters and exits: every
    profile ends with exactly the attributes its memberships call for. The single string attribute is one value per
    connection (Braze cannot append to a string), so each connection names its own."""
    string_names = {PARISIANS.id: "SegmentMembership", ATHENIANS.id: "SegmentMembership_8"}
    audiences = (PARISIANS, ATHENIANS)
    conns = {a.id: connection(fake.base_url, mode, connection_id=a.id, audience_id=a.id,
                              string_attribute=string_names[a.id]) for a in audiences}
    users = [f"user-{i}" for i in range(40)]
    state: dict[str, dict[int, bool | None]] = {u: {a.id: None for a in audiences} for u in users}
    rng = random.Random(f"braze-{mode}")
    seq = 0
    for _ in range(4):
        for audience in audiences:
            deltas = []
            for user in users:
                now = rng.random() < 0.5
                if bool(state[user][audience.id]) == now:
                    continue
                if not now and state[user][audience.id] is None:
                    continue
                seq += 1
                deltas.append(add(seq, user) if now else remove(seq, user))
                state[user][audience.id] = now
            conn = conns[audience.id]
            outcomes = in_batches(lambda conn=conn, audience=audience: BrazeOutput(conn, audience), conn, deltas)
            assert all(isinstance(o, Acknowledged) for o in outcomes), outcomes
    for user in users:
        profile = fake.user(external_id=user)
        expected = _expected_profile(mode, state[user], string_names)
        if not any(s is not None for s in state[user].values()):
            assert profile is None
            continue
        assert profile is not None
        if "SegmentMembershipArray" in expected:
            assert sorted(profile.pop("SegmentMembershipArray")) == sorted(expected.pop("SegmentMembershipArray"))
        assert profile == expected, user


def test_a_removed_member_is_never_created(fake: FakeBraze) -> None:
    conn = connection(fake.base_url, "all")
    outcomes = deliver(BrazeOutput(conn, PARISIANS), conn, [remove(1, "never-seen")])
    assert outcomes == [Acknowledged(201)]
    assert fake.user(external_id="never-seen") is None
    assert fake.skipped() == [("attributes", 0, ("external_id", "never-seen"))]


def test_forwarded_attributes_are_set_on_add_and_left_on_exit(fake: FakeBraze) -> None:
    conn = connection(fake.base_url, "per_segment")
    deliver(BrazeOutput(conn, PARISIANS), conn,
            [add(1, "u1", {"tier": "gold", "ltv": 120.5, "tags": ["a", "b"], "prefs": {"inc": 1}})])
    assert fake.user(external_id="u1") == {"tier": "gold", "ltv": 120.5, "tags": ["a", "b"], "prefs": '{"inc":1}',
                                           "In Possible Parisians": True}
    deliver(BrazeOutput(conn, PARISIANS), conn, [remove(2, "u1")])
    assert fake.user(external_id="u1") == {"tier": "gold", "ltv": 120.5, "tags": ["a", "b"], "prefs": '{"inc":1}',
                                           "In Possible Parisians": False}


def test_update_existing_only_never_creates_profiles(fake: FakeBraze) -> None:
    conn = connection(fake.base_url, "single_array", update_existing_only=True)
    fake.seed_user(("external_id", "known"))
    outcomes = deliver(BrazeOutput(conn, PARISIANS), conn, [add(1, "known"), add(2, "unknown")])
    assert outcomes == [Acknowledged(201), Acknowledged(201)]
    assert fake.user(external_id="known") == {"SegmentMembershipArray": ["7"]}
    assert fake.user(external_id="unknown") is None


def test_external_id_type_and_the_email_and_phone_fallback(fake: FakeBraze) -> None:
    """Which identity is the external id is a setting; email and phone name the profile only for members without
    it, and only when identity_types lists them (otherwise such members are never enqueued)."""
    conn = connection(fake.base_url, "single_array", identity_types=["customer_id", "email", "mobile_number"])
    deliver(BrazeOutput(conn, PARISIANS), conn, [
        Delta(1, 1, "add", {"external_id": "c1", "email": "c1@example.com"}),
        Delta(2, 2, "add", {"email": "only-email@example.com", "phone": "+15550000002"}),
        Delta(3, 3, "add", {"phone": "+15550000003"}),
    ])
    assert fake.user(external_id="c1") == {"SegmentMembershipArray": ["7"]}
    assert fake.user(email="c1@example.com") is None
    assert fake.user(email="only-email@example.com") == {"SegmentMembershipArray": ["7"]}
    assert fake.user(phone="+15550000003") == {"SegmentMembershipArray": ["7"]}


def test_an_add_naming_a_new_profile_takes_the_membership_off_the_old_one(fake: FakeBraze) -> None:
    conn = connection(fake.base_url, "array_and_per_segment", identity_types=["customer_id", "email"])
    deliver(BrazeOutput(conn, PARISIANS), conn, [Delta(1, 1, "add", {"email": "m@example.com"})])
    moved = Delta(2, 1, "add", {"external_id": "c9", "email": "m@example.com"},
                  held_identifiers={"email": "m@example.com"})
    assert deliver(BrazeOutput(conn, PARISIANS), conn, [moved]) == [Acknowledged(201)]
    assert fake.user(email="m@example.com") == {"SegmentMembershipArray": [], "In Possible Parisians": False}
    assert fake.user(external_id="c9") == {"SegmentMembershipArray": ["7"], "In Possible Parisians": True}


def test_the_array_cap_drops_memberships_where_per_segment_keeps_them(fake: FakeBraze) -> None:
    """A member in more audiences than the array holds (25 unless Braze raised it): Braze truncates the array, so
    some memberships are not there; one boolean attribute per audience has no cap (README, "Braze")."""
    many = [AudienceRef(100 + i, f"a{i}", f"Audience {i}") for i in range(30)]

    async def run() -> None:
        async with http_client(fake.base_url) as client:
            for audience in many:
                conn = connection(fake.base_url, "array_and_per_segment", connection_id=audience.id,
                                  audience_id=audience.id)
                assert await BrazeOutput(conn, audience, client=client).deliver(conn, [add(audience.id, "busy")]) \
                    == [Acknowledged(201)]

    asyncio.run(run())
    profile = fake.user(external_id="busy")
    assert len(profile["SegmentMembershipArray"]) == 25
    assert all(profile[f"In {a.external_name}"] is True for a in many)


# --- batching -------------------------------------------------------------------------------------------------------

def test_requests_are_filled_to_the_batch_size_and_never_above(fake: FakeBraze) -> None:
    conn = connection(fake.base_url, "all")
    deltas = [add(i, f"u{i}") for i in range(1, 161)]
    outcomes = in_batches(lambda: BrazeOutput(conn, PARISIANS), conn, deltas)
    assert all(isinstance(o, Acknowledged) for o in outcomes) and len(outcomes) == 160
    assert [len(body["attributes"]) for body in track_requests(fake)] == [75, 75, 10]
    assert all(set(body) == {"attributes"} for body in track_requests(fake))


def test_a_configured_batch_size_counts_every_object(fake: FakeBraze) -> None:
    """A contract allowing 50 objects across all arrays: batch_size 50, and adds that also take the membership off
    an old profile count both objects."""
    fake.configure(max_total_objects=50)
    conn = connection(fake.base_url, "single_array", batch_size=50, identity_types=["customer_id", "email"])
    deltas = [Delta(i, i, "add", {"external_id": f"c{i}"},
                    held_identifiers={"email": f"m{i}@example.com"} if i % 10 == 0 else {}) for i in range(1, 101)]
    outcomes = in_batches(lambda: BrazeOutput(conn, PARISIANS), conn, deltas)
    assert all(isinstance(o, Acknowledged) for o in outcomes)
    sizes = [len(body["attributes"]) for body in track_requests(fake)]
    assert max(sizes) == 50 and sum(sizes) == 110
    assert sizes == [50, 5, 50, 5]  # each deliver of 50 deltas (5 moved) sends 55 objects: 50, then 5


def test_one_deliver_with_more_than_a_batch_splits_it(fake: FakeBraze) -> None:
    conn = connection(fake.base_url, "single_array", batch_size=20)
    outcomes = deliver(BrazeOutput(conn, PARISIANS), conn, [add(i, f"u{i}") for i in range(1, 46)])
    assert outcomes == [Acknowledged(201)] * 45
    assert [len(body["attributes"]) for body in track_requests(fake)] == [20, 20, 5]


def test_a_400_is_split_to_get_through(fake: FakeBraze) -> None:
    """batch_size left at 75 for a 50-object contract: "Max Input Length Exceeded" sends the halves."""
    fake.configure(max_total_objects=50)
    conn = connection(fake.base_url, "single_array")
    outcomes = deliver(BrazeOutput(conn, PARISIANS), conn, [add(i, f"u{i}") for i in range(1, 76)])
    assert outcomes == [Acknowledged(201)] * 75
    assert [entry.status for entry in fake.requests()] == [400, 201, 201]
    assert len(fake.users_with("SegmentMembershipArray", "7")) == 75


# --- partial errors -------------------------------------------------------------------------------------------------

def _serve(fake: FakeBraze, **edits: Any) -> FakeServer:
    return FakeServer(Rewriting(fake.asgi, **edits)).start()


def test_partial_errors_are_retried_alone() -> None:
    """Braze names objects 3 and 5 in errors[] with a passing error, and object 4 loses its identifier (the fake
    answers the missing-identifier error): only 3 and 5 are tried again, 4 is rejected, the rest are acknowledged;
    the retry sends nothing else."""
    fake = FakeBraze(api_keys={KEY})
    first = {"done": False}

    def edit_request(body: dict[str, Any]) -> dict[str, Any]:
        if not first["done"]:
            for index in (3, 4, 5):
                body["attributes"][index].pop("external_id")
        return body

    def edit_response(status: int, headers: list, payload: dict[str, Any]) -> tuple[int, list, dict[str, Any]]:
        if not first["done"]:
            first["done"] = True
            for item in payload["errors"]:
                if item["index"] in (3, 5):
                    item["type"] = "internal error, try again"
        return status, headers, payload

    server = _serve(fake, edit_request=edit_request, edit_response=edit_response)
    try:
        conn = connection(server.base_url, "single_array")
        deltas = [add(i, f"u{i}") for i in range(10)]
        outcomes = deliver(BrazeOutput(conn, PARISIANS), conn, deltas)
        assert [type(o).__name__ for o in outcomes] == (["Acknowledged"] * 3 + ["RetryLater", "Rejected", "RetryLater"]
                                                        + ["Acknowledged"] * 4)
        assert "is required" in outcomes[4].reason and outcomes[4].status == 201
        assert "try again" in outcomes[3].reason
        retried = [deltas[3], deltas[5]]
        assert deliver(BrazeOutput(conn, PARISIANS), conn, retried) == [Acknowledged(201)] * 2
        bodies = track_requests(fake)
        assert [o["external_id"] for o in bodies[1]["attributes"]] == ["u3", "u5"]
        assert {key[1] for key in fake.users_with("SegmentMembershipArray", "7")} == \
            {f"u{i}" for i in range(10) if i != 4}
    finally:
        server.stop()


def test_a_passing_item_error_is_not_retried_forever() -> None:
    assert isinstance(item_outcome("internal error", 0, 201), RetryLater)
    assert isinstance(item_outcome("internal error", MAX_ITEM_RETRIES - 1, 201), Rejected)
    assert isinstance(item_outcome("'external_id' or 'braze_id' or 'user_alias' is required", 0, 201), Rejected)


# --- rate limits ----------------------------------------------------------------------------------------------------

def _frozen_fake(rate_limit: int) -> FakeBraze:
    fake = FakeBraze(api_keys={KEY}, rate_limit=rate_limit, rate_window_seconds=3.0)
    fake.budget = WindowBudget(rate_limit, 3.0, clock=lambda: FIXED_NOW)
    return fake.start()


def test_a_429_waits_for_the_reset_it_names() -> None:
    fake = _frozen_fake(rate_limit=1)
    try:
        conn = connection(fake.base_url, "single_array")
        assert deliver(BrazeOutput(conn, PARISIANS, clock=lambda: FIXED_NOW), conn, [add(1, "u1")]) == \
            [Acknowledged(201)]
        outcomes = deliver(BrazeOutput(conn, PARISIANS, clock=lambda: FIXED_NOW), conn, [add(2, "u2"), add(3, "u3")])
        assert all(isinstance(o, RetryLater) and o.status == 429 for o in outcomes)
        assert [o.after_seconds for o in outcomes] == [3.0, 3.0]  # X-RateLimit-Reset = now + 3 s window
        assert fake.user(external_id="u2") is None
    finally:
        fake.stop()


def test_a_spent_window_holds_the_rest_of_the_batch_back() -> None:
    """X-RateLimit-Remaining 0 on a success: the chunks left are not sent into a certain 429, and the next
    deliver call waits too."""
    fake = _frozen_fake(rate_limit=2)
    try:
        conn = connection(fake.base_url, "single_array", batch_size=10)

        async def run() -> tuple[list[Any], list[Any]]:
            output = BrazeOutput(conn, PARISIANS, clock=lambda: FIXED_NOW)
            try:
                first = await output.deliver(conn, [add(i, f"u{i}") for i in range(30)])
                second = await output.deliver(conn, [add(99, "u99")])
            finally:
                await output.aclose()
            return first, second

        first, second = asyncio.run(run())
        assert first[:20] == [Acknowledged(201)] * 20
        assert all(isinstance(o, RetryLater) and o.after_seconds == 3.0 for o in first[20:])
        assert isinstance(second[0], RetryLater) and second[0].after_seconds == 3.0
        assert len(fake.requests()) == 2
    finally:
        fake.stop()


@pytest.mark.parametrize(("headers", "wait"), [
    ([(b"retry-after", b"7")], 7.0),
    ([(b"x-ratelimit-retry-after", b"4")], 4.0),
    ([(b"retry-after", b"9"), (b"x-ratelimit-retry-after", b"4")], 9.0),
    ([(b"x-ratelimit-reset", str(int(FIXED_NOW) + 12).encode())], 12.0),
])
def test_429_headers_in_order_of_precedence(headers: list[tuple[bytes, bytes]], wait: float) -> None:
    fake = FakeBraze(api_keys={KEY})

    def throttle(status: int, _headers: list, payload: dict[str, Any]) -> tuple[int, list, dict[str, Any]]:
        return 429, [(b"content-type", b"application/json"), *headers], {"message": "API rate limit reached"}

    server = _serve(fake, edit_response=throttle)
    try:
        conn = connection(server.base_url, "single_array")
        outcomes = deliver(BrazeOutput(conn, PARISIANS, clock=lambda: FIXED_NOW), conn, [add(1, "u1")])
        assert outcomes == [RetryLater(outcomes[0].reason, wait, 429)]
        assert "rate limit" in outcomes[0].reason
    finally:
        server.stop()


def test_the_fakes_injected_throttle_is_retried(fake: FakeBraze) -> None:
    fake.faults.force(Fault.THROTTLE)
    conn = connection(fake.base_url, "single_array")
    outcomes = deliver(BrazeOutput(conn, PARISIANS), conn, [add(1, "u1"), add(2, "u2")])
    assert all(isinstance(o, RetryLater) and o.status == 429 and o.after_seconds is not None for o in outcomes)
    assert fake.users() == {}


# --- refused keys, server errors, lost answers ---------------------------------------------------------------------

@pytest.mark.parametrize(("api_key", "status", "words"), [
    ("wrong-key", 401, "not accepted"),
    ("read-only-key", 403, "users.track permission"),
])
def test_a_refused_key_rejects_the_whole_batch_at_once(fake: FakeBraze, api_key: str, status: int,
                                                       words: str) -> None:
    conn = connection(fake.base_url, "single_array", api_key=api_key, batch_size=10)
    outcomes = deliver(BrazeOutput(conn, PARISIANS), conn, [add(i, f"u{i}") for i in range(25)])
    assert all(isinstance(o, Rejected) and o.status == status and words in o.reason for o in outcomes)
    assert all(api_key not in o.reason for o in outcomes)
    assert len(fake.requests()) == 1  # the other chunks are not sent with a key that was refused
    assert fake.users() == {}


def test_a_404_names_the_base_url(fake: FakeBraze) -> None:
    conn = connection(f"{fake.base_url}/not-braze", "single_array")
    outcomes = deliver(BrazeOutput(conn, PARISIANS), conn, [add(1, "u1"), add(2, "u2")])
    assert all(isinstance(o, Rejected) and o.status == 404 and "base_url" in o.reason for o in outcomes)


@pytest.mark.parametrize("fault", [Fault.SERVER_ERROR, Fault.RESET, Fault.RESET_APPLIED])
def test_server_errors_and_resets_are_retried(fake: FakeBraze, fault: Fault) -> None:
    fake.faults.force(fault)
    conn = connection(fake.base_url, "single_array", batch_size=5)
    outcomes = deliver(BrazeOutput(conn, PARISIANS), conn, [add(i, f"u{i}") for i in range(10)])
    assert all(isinstance(o, RetryLater) for o in outcomes)
    assert len(fake.requests()) == 1  # the second chunk waits with the first


def test_a_timeout_is_retried(fake: FakeBraze) -> None:
    fake.faults.configure(delay_seconds=3.0)
    fake.faults.force(Fault.TIMEOUT_APPLIED)
    conn = connection(fake.base_url, "single_array")

    async def run() -> list[Any]:
        async with http_client(fake.base_url, timeout=0.3) as client:
            return await BrazeOutput(conn, PARISIANS, client=client).deliver(conn, [add(1, "u1")])

    outcomes = asyncio.run(run())
    assert isinstance(outcomes[0], RetryLater) and "Timeout" in outcomes[0].reason


def test_under_faults_braze_converges_to_the_membership(fake: FakeBraze) -> None:
    """30% of requests throttled, failing, timing out or reset (applied or not): retrying what is not acknowledged
    ends with every profile as the membership says, each delta acknowledged once."""
    conn = connection(fake.base_url, "all", batch_size=10)
    in_batches(lambda: BrazeOutput(conn, PARISIANS), conn, [add(i, f"u{i}") for i in range(120)])
    fake.faults.configure(FaultPlan(rate=0.3, seed=11, delay_seconds=1.0))
    fake.faults.force(*Fault)  # every kind at least once, then the seeded 30%
    # one pending change per member, as the outbox keeps it: odd members leave, 60 new ones enter
    pending = [remove(1000 + i, f"u{i}") for i in range(1, 120, 2)] + [add(i, f"u{i}") for i in range(120, 180)]
    members = {f"u{i}" for i in [*range(0, 120, 2), *range(120, 180)]}
    acknowledged: list[int] = []

    async def run() -> None:
        nonlocal pending
        async with http_client(fake.base_url, timeout=0.5) as client:
            output = BrazeOutput(conn, PARISIANS, client=client)
            for _ in range(60):
                if not pending:
                    return
                batch, pending = pending[:10], pending[10:]
                outcomes = await output.deliver(conn, batch)
                for delta, outcome in zip(batch, outcomes):
                    assert not isinstance(outcome, Rejected), outcome
                    if isinstance(outcome, Acknowledged):
                        acknowledged.append(delta.seq)
                    else:
                        pending.append(delta)
                output._not_before = 0.0  # the outbox would wait out the window the throttle names; no need here

    asyncio.run(run())
    assert not pending and len(acknowledged) == len(set(acknowledged)) == 120
    assert set(fake.faults.injected) == set(Fault)
    assert {key[1] for key in fake.users_with("SegmentMembershipArray", "7")} == members
    assert {key[1] for key in fake.users_with("In Possible Parisians", True)} == members
    assert {key[1] for key in fake.users_with("SegmentMembership", "'7'")} == members
    assert {key[1] for key in fake.users_with("In Possible Parisians", False)} == {f"u{i}" for i in range(1, 120, 2)}


# --- through the delivery service -----------------------------------------------------------------------------------

class Pipeline:
    """A real DuckDB file with a workspace, audiences and Braze connections, and the delivery service over it: the
    membership is diffed into the outbox and flushed through BrazeOutput to the fake."""

    def __init__(self, path: Path) -> None:
        self.service = IdSyncService.open(str(path))
        created, batch = self.service.workspaces.plan_create("braze", None)
        self._commit(batch)
        self.service.workspaces.remember(created.workspace)
        self.workspace = created.workspace
        self.audiences = AudienceRegistry(lambda ws, ca_id: False)
        self.connections = ConnectionRegistry(self.service.master_key)
        self.delivery = DeliveryService(
            self.service.connection, self.connections, self.audiences,
            lambda ws: self.service.workspaces.get(ws).scope, self.service.computation_gate,
            outputs={"braze": lambda c, a: BrazeOutput(c, a, timeout=0.5)},
            policy=RetryPolicy(base_seconds=0.05, max_seconds=0.2, jitter=0.5))

    def _commit(self, batch: WriteBatch) -> None:
        self.service.writer.submit(batch).result(timeout=30)

    def audience(self, name: str) -> Audience:
        audience, batch = self.audiences.plan_create(self.workspace.id, {
            "name": name, "external_name": f"Ext {name}", "type": "standard",
            "criteria": {"identity": {"type": "customerid", "present": True}}})
        self._commit(batch)
        self.audiences.remember(audience)
        return audience

    def connect(self, audience: Audience, base_url: str, api_key: str = KEY, **braze: Any) -> Connection:
        conn, batch = self.connections.plan_create(self.workspace.id, audience.id, {
            "output": "braze", "credentials": {"api_key": api_key},
            "settings": {"base_url": base_url, "braze": braze}})
        self._commit(batch)
        self.connections.remember(conn)
        return conn

    def update(self, conn: Connection, body: dict[str, Any]) -> Connection:
        updated, batch = self.connections.plan_update(self.workspace.id, conn.audience_id, conn.id, body)
        self._commit(batch)
        self.connections.remember(updated)
        return updated

    def customer_ids(self, mpids: list[int]) -> None:
        self.service.connection.executemany(
            "INSERT INTO identities_base VALUES (?, ?, 'customerid', ?, ?, 0)",
            [(self.workspace.scope, m, f"c{m}", f"c{m}") for m in mpids])

    def members(self, audience: Audience, mpids: list[int]) -> None:
        cursor = self.service.connection.cursor()
        cursor.begin()
        apply_members(cursor, self.workspace.id, audience.id, pl.Series("mpid", mpids, dtype=pl.Int64),
                      time.time_ns() // 1_000_000)
        cursor.commit()
        cursor.close()

    def rows(self, sql: str, *params: Any) -> list[tuple]:
        cursor = self.service.connection.cursor()
        try:
            return cursor.execute(sql, list(params)).fetchall()
        finally:
            cursor.close()

    async def settle(self, connection_ids: list[int], rounds: int = 200) -> None:
        """Flush rounds until the outboxes are empty (retries wait out their short backoff, or a 429's window)."""
        for _ in range(rounds):
            await self.delivery.run_once()
            left = self.rows("SELECT count(*) FROM delivery_outbox WHERE list_contains(?, connection_id)",
                             connection_ids)[0][0]
            if not left:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{left} deltas still pending")

    def close(self) -> None:
        asyncio.run(self.delivery.aclose())
        self.service.close()


@pytest.fixture
def pipeline(tmp_path: Path):
    made = Pipeline(tmp_path / "braze.duckdb")
    yield made
    made.close()


def test_memberships_reach_braze_through_the_outbox_under_faults(pipeline: Pipeline, fake: FakeBraze) -> None:
    """Two audiences in different modes sharing one Braze; the membership moves while 30% of requests fail
    (throttled, 5xx, timeouts and resets, applied or not): the profiles end exactly as the membership says, and
    delivery_state says what Braze holds."""
    buyers, churned = pipeline.audience("buyers"), pipeline.audience("churned")
    to_buyers = pipeline.connect(buyers, fake.base_url, send_segments_as="all", batch_size=10)
    to_churned = pipeline.connect(churned, fake.base_url, send_segments_as="array_and_per_segment", batch_size=10)
    pipeline.customer_ids(list(range(1, 61)))
    pipeline.members(buyers, list(range(1, 31)))
    pipeline.members(churned, list(range(20, 41)))
    asyncio.run(pipeline.settle([to_buyers.id, to_churned.id]))
    fake.configure(rate_window_seconds=0.2)  # a throttled answer names a reset at most a second or so away
    fake.faults.configure(FaultPlan(rate=0.3, seed=5, delay_seconds=1.0))
    fake.faults.force(*Fault)
    pipeline.members(buyers, list(range(15, 51)))
    pipeline.members(churned, list(range(1, 11)))
    asyncio.run(pipeline.settle([to_buyers.id, to_churned.id]))
    fake.faults.disable()

    def holders(attribute: str, value: Any) -> set[str]:
        return {key[1] for key in fake.users_with(attribute, value)}

    buyer_ids = {f"c{m}" for m in range(15, 51)}
    churned_ids = {f"c{m}" for m in range(1, 11)}
    assert set(fake.faults.injected) == set(Fault)
    assert holders("SegmentMembershipArray", str(buyers.id)) == buyer_ids
    assert holders("SegmentMembership", f"'{buyers.id}'") == buyer_ids
    assert holders("In Ext buyers", True) == buyer_ids
    assert holders("In Ext buyers", False) == {f"c{m}" for m in range(1, 15)}
    assert holders("SegmentMembershipArray", str(churned.id)) == churned_ids
    assert holders("In Ext churned", True) == churned_ids
    assert holders("In Ext churned", False) == {f"c{m}" for m in range(20, 41)}
    held = pipeline.rows("SELECT connection_id, count(*) FROM delivery_state GROUP BY ALL ORDER BY 1")
    assert held == [(to_buyers.id, 36), (to_churned.id, 10)]


def test_a_refused_key_parks_the_deltas_until_the_connection_is_fixed(pipeline: Pipeline, fake: FakeBraze) -> None:
    audience = pipeline.audience("vip")
    conn = pipeline.connect(audience, fake.base_url, api_key="revoked-key", send_segments_as="single_array")
    pipeline.customer_ids([1, 2, 3])
    pipeline.members(audience, [1, 2, 3])
    result = asyncio.run(pipeline.delivery.run_once())
    assert result.flushes[conn.id].rejected == 3
    asyncio.run(pipeline.delivery.run_once())
    assert len(fake.requests()) == 1  # parked: not sent again while the key is the same
    status = pipeline.rows("SELECT pending_adds, last_error FROM delivery_status WHERE connection_id = ?", conn.id)
    assert status[0][0] == 3 and "401" in status[0][1] and "revoked-key" not in status[0][1]
    pipeline.update(conn, {"credentials": {"api_key": KEY}})
    asyncio.run(pipeline.settle([conn.id]))
    assert {key[1] for key in fake.users_with("SegmentMembershipArray", str(audience.id))} == {"c1", "c2", "c3"}
