"""Every resolution rule of spec B§8 and every decision of A2, through HTTP against a live server.

State on the server side is read through `/v1/search`, the platform graph and hub endpoints, and (read-only,
after the answer) the DuckDB file: `identities`, `identity_changes`, `profiles`, `aliases`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from live_server import LiveServer
from workspace_probe import ADMIN, WorkspaceProbe, module_server

PRIORITY = ["customerid", "email", "ios_idfv", "roku_aid"]
CID, EMAIL, IDFV = "ABC123", "ed.hyde@example.com", "9876"
HOUR_MS = 3_600_000

CONVERSION = {"strategy": "profile_conversion", "identity_priority": PRIORITY, "unique_ids": ["customerid", "email"]}
LOGIN_STRATEGIES = ["default", "profile_conversion", "profile_link", "profile_isolation"]


class Workspace(WorkspaceProbe):
    def mpid(self, operation: str, identities: dict[str, Any], previous: str | int | None = None) -> str:
        return self.answer(operation, identities, previous)["mpid"]

    def answer(self, operation: str, identities: dict[str, Any], previous: str | int | None = None,
               **params: Any) -> dict:
        response = self.api.call(f"/v1/{operation}", {"environment": "production", "known_identities": identities,
                                                      "previous_mpid": previous}, **params)
        assert response.status_code == 200, f"{operation} {identities}: {response.text}"
        answer = response.json()
        mpid = answer["mpid"]
        assert isinstance(mpid, str) and int(mpid) != 0 and -(1 << 63) <= int(mpid) < (1 << 63)
        assert answer["is_ephemeral"] is False
        return answer

    def modify(self, mpid: str, identity_type: str, old: str | None, new: str | None) -> httpx.Response:
        return self.api.modify(mpid, [{"identity_type": identity_type, "old_value": old, "new_value": new}])

    def search(self, identities: dict[str, Any]) -> str | None:
        response = self.api.search(identities)
        if response.status_code == 404:
            error_of(response, 404, "NOT_FOUND_ERROR")
            return None
        assert response.status_code == 200, response.text
        return response.json()["mpid"]

    def hubs(self) -> dict:
        response = self.admin.get(f"/platform/v2/workspaces/{self.id}/identity/hubs", headers=ADMIN)
        assert response.status_code == 200, response.text
        return response.json()

    def snapshot(self) -> dict[str, Any]:
        """Everything a request could change, to show that a rejected one changed nothing."""
        def rows(query: str) -> list[tuple]:
            return sorted(self.sql(query, self.id))
        return {
            "profiles": rows("SELECT mpid, created_ms, last_seen_ms, status FROM profiles WHERE scope = ?"),
            "identities": rows("SELECT mpid, identity_type, value, raw_value FROM identities WHERE scope = ?"),
            "identity_changes": rows("SELECT count(*) FROM identity_changes WHERE scope = ?"),
            "aliases": rows("SELECT count(*) FROM aliases WHERE workspace_id = ?"),
            "hub_values": rows("SELECT count(*) FROM hub_values WHERE scope = ?"),
        }


def error_of(response: httpx.Response, status: int, code: str) -> dict:
    """A1: errors carry both spellings plus ErrorCode, StatusCode and RequestId."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["errors"] == body["Errors"] and len(body["errors"]) >= 1, body
    assert body["errors"][0]["code"] == code and body["errors"][0]["message"], body
    assert body["ErrorCode"] == code and body["StatusCode"] == status and body["RequestId"], body
    return body["errors"][0]


def tick() -> None:
    """Let the millisecond clock move, so last-seen times differ."""
    time.sleep(0.005)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    yield from module_server(tmp_path_factory.mktemp("idmesh"))


@pytest.fixture
def workspace(server: LiveServer) -> Iterator[Callable[[dict[str, Any]], Workspace]]:
    made: list[Workspace] = []

    def make(settings: dict[str, Any]) -> Workspace:
        made.append(Workspace(server, settings))
        return made[-1]

    yield make
    for ws in made:
        ws.close()


# --- B§8 lookup: priority walk, login-ID gate, immutable gate -------------------------------------------------

def test_priority_walk_narrows_candidates_type_by_type(workspace):
    """G-COMP: email matches P1 and P2, then `other` picks P1; with IDFV absent, GAID picks P2. A lower type that
    matches none of the candidates is skipped. Each time the tie-break alone would have picked the other one."""
    ws = workspace({"strategy": "best_match", "identity_priority": ["email", "other", "ios_idfv", "android_aaid"]})
    p1 = ws.mpid("identify", {"other": "AAAA"})
    p2 = ws.mpid("identify", {"android_aaid": "2345"})
    p3 = ws.mpid("identify", {"ios_idfv": "1111"})
    for mpid in (p1, p2):
        tick()
        assert ws.modify(mpid, "email", None, EMAIL).status_code == 200
    tick()
    assert ws.mpid("identify", {"email": EMAIL, "other": "AAAA"}) == p1
    tick()
    assert ws.mpid("identify", {"email": EMAIL, "android_aaid": "2345"}) == p2
    tick()
    assert ws.mpid("identify", {"other": "AAAA"}) == p1
    tick()
    assert ws.mpid("identify", {"email": EMAIL, "ios_idfv": "1111", "android_aaid": "2345"}) == p2
    assert p3 not in (p1, p2)


@pytest.mark.parametrize("strategy", LOGIN_STRATEGIES)
def test_login_id_gate_a_device_id_alone_never_returns_a_known_profile(workspace, strategy):
    """G-UD example 3: the IDFV matches a known profile but the request has no login id: a new profile."""
    ws = workspace({"strategy": strategy, "identity_priority": PRIORITY})
    known = ws.mpid("login", {"customerid": CID, "email": EMAIL, "ios_idfv": IDFV})
    fresh = ws.answer("identify", {"ios_idfv": IDFV})
    assert fresh["mpid"] != known and fresh["is_logged_in"] is False
    assert ("customerid", CID) not in ws.holds(fresh["mpid"])
    # Matching one of its login ids is enough (G-UD example 1).
    assert ws.mpid("login", {"customerid": CID, "ios_idfv": "another-device"}) == known
    # A different login id on the same device is not this person.
    assert ws.mpid("login", {"customerid": "OTHER-CID", "ios_idfv": IDFV}) != known


def test_login_id_gate_applies_before_the_priority_walk(workspace):
    """B§8.3 [inf, adopted]: an ineligible known profile must not steer the walk. Email (not a login id under
    Default) matches known P1 and anonymous P2; the IDFV matches only P1. Gate first: P2. Walk first: P1, then
    the gate would empty the set and make a new profile."""
    ws = workspace({"strategy": "default", "identity_priority": PRIORITY})
    p1 = ws.mpid("login", {"customerid": CID, "email": EMAIL, "ios_idfv": IDFV})
    p2 = ws.mpid("identify", {"email": EMAIL, "roku_aid": "roku-1"})
    assert p2 != p1 and ("email", EMAIL) in ws.holds(p2)
    assert ws.mpid("identify", {"email": EMAIL, "ios_idfv": IDFV}) == p2


def test_immutable_id_gate_and_immutable_ids_cannot_be_modified(workspace):
    ws = workspace({"strategy": "profile_conversion", "identity_priority": PRIORITY,
                    "login_ids": ["customerid", "email"], "unique_ids": ["customerid", "email"],
                    "immutable_ids": ["customerid"]})
    p1 = ws.mpid("login", {"customerid": CID, "email": EMAIL, "ios_idfv": IDFV})
    # P1 holds an immutable id: a request matching only its (mutable) email login id may not return it (B§8).
    assert ws.mpid("login", {"email": EMAIL, "ios_idfv": IDFV}) != p1
    assert ws.mpid("login", {"customerid": CID}) == p1
    before = ws.snapshot()
    for change in ({"old_value": CID, "new_value": "XYZ789"}, {"old_value": CID, "new_value": None},
                   {"old_value": None, "new_value": "XYZ789"}):
        response = ws.api.modify(p1, [{"identity_type": "customerid", **change}])
        error_of(response, 400, "BAD_REQUEST")
    assert ws.snapshot() == before
    # An immutable id may be set on a profile that has none yet, but never taken from the profile holding it.
    anonymous = ws.mpid("identify", {"roku_aid": "r-1"})
    before = ws.snapshot()
    error_of(ws.modify(anonymous, "customerid", None, CID), 400, "BAD_REQUEST")
    assert ws.snapshot() == before
    assert ws.modify(anonymous, "customerid", None, "NEW-CID").status_code == 200
    assert ws.mpid("login", {"customerid": "NEW-CID"}) == anonymous


# --- A2.1 tie-break, A2.2 previous_mpid ----------------------------------------------------------------------

def two_anonymous_profiles_sharing_idfv(ws: Workspace, idfv: str) -> tuple[str, str]:
    """Returns (older-touched, most recently touched) anonymous profiles that both hold `idfv`."""
    first = ws.mpid("identify", {"roku_aid": f"{idfv}-r1"})
    second = ws.mpid("identify", {"roku_aid": f"{idfv}-r2"})
    for mpid in (first, second):
        tick()
        assert ws.modify(mpid, "ios_idfv", None, idfv).status_code == 200
    tick()
    return first, second


def test_tie_break_most_recently_seen_wins_deterministically_and_after_restart(workspace, server):
    ws = workspace(CONVERSION)
    older, recent = two_anonymous_profiles_sharing_idfv(ws, "shared")
    assert ws.mpid("identify", {"ios_idfv": "shared"}) == recent
    tick()
    assert ws.mpid("identify", {"roku_aid": "shared-r1"}) == older  # now the older one is the most recently seen
    tick()
    assert [ws.mpid("identify", {"ios_idfv": "shared"}) for _ in range(3)] == [older] * 3
    server.restart()
    assert ws.mpid("identify", {"ios_idfv": "shared"}) == older


def test_previous_mpid_converts_the_anonymous_profile_it_names_when_it_shares_an_identity(workspace):
    ws = workspace(CONVERSION)
    named, tie_break_winner = two_anonymous_profiles_sharing_idfv(ws, IDFV)
    login = ws.answer("login", {"customerid": CID, "ios_idfv": IDFV}, previous=int(named))  # Android: a number
    assert login["mpid"] == named and login["is_logged_in"] is True
    assert ("customerid", CID) in ws.holds(named)
    assert ws.holds(tie_break_winner) == {("ios_idfv", IDFV), ("roku_aid", f"{IDFV}-r2")}


def test_previous_mpid_of_a_known_profile_is_ignored(workspace):
    ws = workspace(CONVERSION)
    known = ws.mpid("login", {"customerid": CID, "ios_idfv": IDFV})
    anonymous = ws.mpid("logout", {"ios_idfv": IDFV}, previous=known)
    login = ws.mpid("login", {"customerid": "SOMEONE-ELSE", "ios_idfv": IDFV}, previous=known)
    assert login != known
    assert login == anonymous, "A2.2: otherwise the anonymous profile found by the device identities"
    assert ("customerid", "SOMEONE-ELSE") not in ws.holds(known)


def test_previous_mpid_sharing_no_identity_with_the_request_is_ignored(workspace):
    ws = workspace(CONVERSION)
    unrelated = ws.mpid("identify", {"roku_aid": "roku-1"})
    login = ws.mpid("login", {"customerid": CID, "ios_idfv": IDFV}, previous=unrelated)
    assert login != unrelated
    assert ws.holds(unrelated) == {("roku_aid", "roku-1")}
    assert ws.answer("identify", {"roku_aid": "roku-1"})["is_logged_in"] is False


# --- A2.4 identify with a login id, A2.5 Best Match login/logout ----------------------------------------------

@pytest.mark.parametrize("strategy, converts", [("default", True), ("profile_conversion", True),
                                                 ("profile_link", False), ("profile_isolation", False)])
def test_identify_with_a_login_id_resolves_like_login(workspace, strategy, converts):
    ws = workspace({"strategy": strategy, "identity_priority": PRIORITY})
    anonymous = ws.mpid("identify", {"ios_idfv": IDFV})
    restored = ws.answer("identify", {"customerid": CID, "email": EMAIL, "ios_idfv": IDFV}, previous=anonymous)
    assert (restored["mpid"] == anonymous) is converts
    assert restored["is_logged_in"] is True
    assert ws.mpid("login", {"customerid": CID}) == restored["mpid"]
    again = ws.answer("identify", {"customerid": CID, "ios_idfv": IDFV})
    assert again["mpid"] == restored["mpid"] and again["is_logged_in"] is True


def test_best_match_login_and_logout_behave_as_identify(workspace):
    ws = workspace({"strategy": "best_match", "identity_priority": PRIORITY})
    p1 = ws.mpid("identify", {"ios_idfv": IDFV})
    for operation, identities in (("login", {"ios_idfv": IDFV}), ("logout", {"ios_idfv": IDFV}),
                                  ("login", {"email": EMAIL, "ios_idfv": IDFV}), ("logout", {"email": EMAIL})):
        answer = ws.answer(operation, identities)
        assert answer["mpid"] == p1 and answer["is_logged_in"] is False, (operation, identities)
    assert ws.holds(p1) == {("ios_idfv", IDFV), ("email", EMAIL)}


# --- A2.6 search, A2.7 context, A2.8 read_only / return_matches -----------------------------------------------

def test_search_is_read_only_has_no_login_gate_and_answers_404_on_no_match(workspace):
    ws = workspace(CONVERSION)
    known = ws.mpid("login", {"customerid": CID, "ios_idfv": IDFV})
    before = ws.snapshot()
    assert ws.search({"ios_idfv": IDFV}) == known  # identify would not return a known profile here
    assert ws.search({"ios_idfv": IDFV, "email": "new@example.com"}) == known
    assert ws.search({"ios_idfv": "no-such-device"}) is None
    assert ws.search({"email": "new@example.com"}) is None
    assert ws.snapshot() == before
    assert ws.holds(known) == {("customerid", CID), ("ios_idfv", IDFV)}


@pytest.mark.parametrize("operation", ["identify", "login", "logout", "search"])
@pytest.mark.parametrize("context", ["opaque-context-token==", None])
def test_context_is_echoed_and_is_ephemeral_is_false(workspace, operation, context):
    ws = workspace(CONVERSION)
    ws.mpid("login", {"customerid": CID, "ios_idfv": IDFV})
    response = ws.api.call(f"/v1/{operation}", {"environment": "production", "context": context,
                                                "known_identities": {"customerid": CID, "ios_idfv": IDFV}})
    assert response.status_code == 200, response.text
    assert response.json()["context"] == context and response.json()["is_ephemeral"] is False


def test_read_only_writes_nothing_and_return_matches_fills_matched_identities(workspace, server):
    ws = workspace(CONVERSION)
    p1 = ws.mpid("identify", {"ios_idfv": IDFV})
    before = ws.snapshot()
    looked_up = ws.answer("identify", {"ios_idfv": IDFV, "email": "new@example.com"}, read_only="true",
                          return_matches="true")
    assert looked_up["mpid"] == p1 and looked_up["matched_identities"] == {"ios_idfv": IDFV}
    assert ws.answer("login", {"customerid": CID, "ios_idfv": IDFV}, read_only="true")["mpid"] == p1
    would_create = ws.api.call("/v1/identify", {"environment": "production",
                                                "known_identities": {"ios_idfv": "brand-new"}},
                               read_only="true")
    assert would_create.status_code < 500, would_create.text
    assert ws.snapshot() == before
    assert ws.search({"email": "new@example.com"}) is None and ws.search({"customerid": CID}) is None
    server.restart()
    assert ws.snapshot() == before
    assert ws.holds(p1) == {("ios_idfv", IDFV)}
    # Without read_only, return_matches names only the request ids that matched, not the ones just added (B§4).
    added = ws.answer("identify", {"ios_idfv": IDFV, "email": "new@example.com"}, return_matches="true")
    assert added["mpid"] == p1 and added["matched_identities"] == {"ios_idfv": IDFV}


# --- A2.9 rate limits -----------------------------------------------------------------------------------------

def test_rate_limit_answers_429_with_retry_after_per_workspace_and_writes_nothing(workspace):
    ws = workspace({"strategy": "profile_conversion", "rate_limit": {"requests_per_second": 1, "burst": 2}})
    unlimited = workspace({"strategy": "profile_conversion"})
    statuses = [ws.api.raw("identify", {"ios_idfv": f"device-{i}"}).status_code for i in range(2)]
    throttled = ws.api.raw("identify", {"ios_idfv": "throttled-device"})
    assert statuses == [200, 200]
    error_of(throttled, 429, "THROTTLED")
    retry_after = int(throttled.headers["Retry-After"])
    assert retry_after >= 1
    assert [unlimited.api.raw("identify", {"ios_idfv": "x"}).status_code for _ in range(4)] == [200] * 4
    assert ws.sql("SELECT count(*) FROM identities WHERE scope = ? AND value = 'throttled-device'", ws.id) == [(0,)]
    time.sleep(retry_after)
    assert ws.api.raw("identify", {"ios_idfv": "after-wait"}).status_code == 200


# --- A2.10 alias ------------------------------------------------------------------------------------------------

def alias_ledger(ws: Workspace) -> list[tuple]:
    return ws.sql("SELECT source_mpid, destination_mpid, start_ms, end_ms FROM aliases WHERE workspace_id = ? "
                  "ORDER BY received_ms", ws.id)


@pytest.mark.parametrize("strategy", ["default", "profile_conversion", "profile_link"])
def test_alias_is_accepted_with_202_and_recorded_in_the_ledger(workspace, strategy):
    ws = workspace({"strategy": strategy, "identity_priority": PRIORITY})
    source = ws.mpid("identify", {"ios_idfv": IDFV})
    destination = ws.mpid("login", {"customerid": CID, "roku_aid": "roku-1"})
    start, end = now_ms() - 2 * HOUR_MS, now_ms()
    response = ws.api.alias(source, destination, start_unixtime_ms=start, end_unixtime_ms=end)
    assert response.status_code == 202, response.text
    answer = response.json()  # the server-to-server path names the alias (the SDK paths answer an empty body)
    assert (answer["source_mpid"], answer["destination_mpid"], answer["status"]) == (source, destination, "processed")
    assert alias_ledger(ws) == [(int(source), int(destination), start, end)]
    # The same source may be aliased again for a window that does not overlap the first one.
    third = ws.mpid("identify", {"roku_aid": "roku-2"})
    later = ws.api.alias(source, third, start_unixtime_ms=end + 1, end_unixtime_ms=end + 1000)
    assert later.status_code == 202, later.text
    assert len(alias_ledger(ws)) == 2


def test_alias_copies_the_source_first_seen_to_the_destination_and_no_identities(workspace):
    """A2.10 / B§10: with the default delay of 0 the alias is processed at once: the source's first-seen
    overwrites the destination's; identities are not copied."""
    ws = workspace({"strategy": "profile_link", "identity_priority": PRIORITY})
    source = ws.mpid("identify", {"ios_idfv": IDFV})
    tick()
    destination = ws.mpid("login", {"customerid": CID, "ios_idfv": IDFV})

    def first_seen(mpid: str) -> int:
        return ws.sql("SELECT first_seen_ms FROM profiles WHERE mpid = ?", int(mpid))[0][0]

    source_first_seen = first_seen(source)
    assert first_seen(destination) > source_first_seen
    assert ws.api.alias(source, destination).status_code == 202
    deadline = time.monotonic() + 3
    while first_seen(destination) != source_first_seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first_seen(destination) == source_first_seen
    assert ws.holds(source) == {("ios_idfv", IDFV)}
    assert ws.holds(destination) == {("customerid", CID), ("ios_idfv", IDFV)}


@pytest.mark.parametrize("alias_settings, window_days", [(None, 90), ({"max_window_days": 7}, 7)])
def test_alias_window_defaults_to_and_is_capped_at_the_max_window(workspace, alias_settings, window_days):
    """B§10 defaults: start = the max window before the request, end = request time; A2.10: the window is capped
    at 90 days, configurable."""
    settings = {"strategy": "profile_conversion", "identity_priority": PRIORITY}
    if alias_settings:
        settings["alias"] = alias_settings
    ws = workspace(settings)
    a, b, c = (ws.mpid("identify", {"roku_aid": f"roku-{n}"}) for n in range(3))
    sent = now_ms()
    assert ws.api.alias(a, b).status_code == 202
    assert ws.api.alias(c, b, start_unixtime_ms=sent - 200 * 24 * HOUR_MS, end_unixtime_ms=sent).status_code == 202
    received = now_ms()
    (_, _, default_start, default_end), (_, _, capped_start, capped_end) = alias_ledger(ws)
    window = window_days * 24 * HOUR_MS
    assert sent - window <= default_start <= received - window and sent <= default_end <= received
    assert sent - window <= capped_start <= received - window and capped_end == sent


WINDOW_A, WINDOW_B = (-3 * HOUR_MS, -2 * HOUR_MS), (-1 * HOUR_MS, 0)
OVERLAPPING = (-150 * 60_000, -30 * 60_000)


@pytest.mark.parametrize("earlier, request_", [
    ([], ("a", "a", WINDOW_A)),                                  # source == destination
    ([], ("a", "b", (0, -HOUR_MS))),                             # start after end
    ([], ("unknown", "b", WINDOW_A)),                            # source does not exist
    ([], ("a", "unknown", WINDOW_A)),                            # destination does not exist
    ([("a", "b", WINDOW_A)], ("a", "c", OVERLAPPING)),          # source already a source, windows overlap
    ([("a", "b", WINDOW_A)], ("b", "c", WINDOW_B)),             # source was a destination
    ([("a", "b", WINDOW_A)], ("c", "a", WINDOW_B)),             # destination was a source
], ids=["same-mpid", "start-after-end", "unknown-source", "unknown-destination", "overlapping-source",
        "source-was-destination", "destination-was-source"])
def test_alias_validation_and_rules_answer_400_and_record_nothing(workspace, earlier, request_):
    ws = workspace({"strategy": "profile_link", "identity_priority": PRIORITY})
    names = {name: ws.mpid("identify", {"roku_aid": f"roku-{name}"}) for name in "abc"}
    names["unknown"] = "1234567890123"
    base = now_ms()
    for source, destination, (start, end) in earlier:
        response = ws.api.alias(names[source], names[destination], start_unixtime_ms=base + start,
                                end_unixtime_ms=base + end)
        assert response.status_code == 202, response.text
    before = ws.snapshot()
    source, destination, (start, end) = request_
    response = ws.api.alias(names[source], names[destination], start_unixtime_ms=base + start,
                            end_unixtime_ms=base + end)
    error_of(response, 400, "BAD_REQUEST")
    assert ws.snapshot() == before


@pytest.mark.parametrize("strategy", ["profile_isolation", "best_match"])
def test_alias_is_forbidden_under_isolation_and_best_match(workspace, strategy):
    ws = workspace({"strategy": strategy, "identity_priority": PRIORITY})
    source = ws.mpid("identify", {"ios_idfv": IDFV})
    destination = ws.mpid("identify", {"roku_aid": "roku-1"})
    error_of(ws.api.alias(source, destination), 403, "FORBIDDEN")
    assert alias_ledger(ws) == []


# --- A2.11 unique ids ---------------------------------------------------------------------------------------

def test_unique_ids_identify_and_login_never_steal_modify_steals_and_orphans(workspace):
    ws = workspace(CONVERSION)
    p1 = ws.mpid("login", {"customerid": CID, "email": EMAIL, "ios_idfv": IDFV})

    def holders(value: str) -> list[int]:
        rows = ws.sql("SELECT mpid FROM identities WHERE scope = ? AND identity_type = 'email' AND value = ?",
                      ws.id, value)
        return [row[0] for row in rows]

    identified = ws.mpid("identify", {"email": EMAIL, "ios_idfv": "device-2"})
    assert identified != p1 and ws.holds(identified) == {("ios_idfv", "device-2")}
    logged_in = ws.mpid("login", {"customerid": "CID-2", "email": EMAIL, "ios_idfv": "device-3"})
    assert logged_in != p1 and ws.holds(logged_in) == {("customerid", "CID-2"), ("ios_idfv", "device-3")}
    assert holders(EMAIL) == [int(p1)]

    # modify steals; a loser that keeps other identifiers stays active
    keeper = ws.mpid("identify", {"email": "f@example.com", "roku_aid": "roku-f"})
    assert ws.modify(p1, "email", EMAIL, "f@example.com").status_code == 200
    assert ws.holds(keeper) == {("roku_aid", "roku-f")}
    assert ws.sql("SELECT status FROM profiles WHERE mpid = ?", int(keeper)) == [("active",)]
    assert holders("f@example.com") == [int(p1)] and holders(EMAIL) == []

    # a loser left with nothing is orphaned and never returned again
    orphan = ws.mpid("identify", {"email": "g@example.com"})
    assert ws.modify(p1, "email", "f@example.com", "g@example.com").status_code == 200
    assert ws.holds(orphan) == set()
    assert ws.sql("SELECT status FROM profiles WHERE mpid = ?", int(orphan)) == [("orphaned",)]
    assert ws.mpid("identify", {"email": "g@example.com"}) not in (orphan, p1)
    assert ws.mpid("identify", {"email": "g@example.com"}, previous=orphan) != orphan
    assert ws.search({"email": "g@example.com"}) == p1

    duplicated = ws.sql("SELECT identity_type, value FROM identities WHERE scope = ? AND identity_type IN "
                        "('customerid', 'email') GROUP BY 1, 2 HAVING count(DISTINCT mpid) > 1", ws.id)
    assert duplicated == []


# --- A2.12 normalization, A2.13 blocked values -----------------------------------------------------------------

def test_normalization_before_matching_keeps_the_raw_value(workspace):
    ws = workspace({"strategy": "profile_conversion"})  # default priority: every type, phone numbers included
    raw = {"email": "  Ed.Hyde@Example.COM ", "mobile_number": "+1 (555) 010-9999", "ios_idfv": "ABCD-EF01"}
    p1 = ws.mpid("identify", raw)
    for variant in ({"email": "ed.hyde@example.com"}, {"mobile_number": "+15550109999"},
                    {"mobile_number": " +1 555.010.9999"}, {"ios_idfv": "abcd-ef01"}):
        assert ws.mpid("identify", variant) == p1, variant
    stored = set(ws.sql("SELECT identity_type, value, raw_value FROM identities WHERE mpid = ?", int(p1)))
    assert stored == {("email", "ed.hyde@example.com", raw["email"]),
                      ("mobile_number", "+15550109999", raw["mobile_number"]),
                      ("ios_idfv", "abcd-ef01", raw["ios_idfv"])}
    # Other types are only trimmed: a customer id keeps its case.
    known = ws.mpid("login", {"customerid": " ABC123 ", "ios_idfv": "abcd-ef01"})
    assert known == p1
    assert ws.mpid("login", {"customerid": "ABC123"}) == p1
    assert ws.mpid("login", {"customerid": "abc123"}) != p1
    # modify matches its old_value after normalization too
    assert ws.modify(p1, "email", " ED.HYDE@example.com", "new@example.com").status_code == 200
    assert ("email", "new@example.com") in ws.holds(p1) and ("email", "ed.hyde@example.com") not in ws.holds(p1)


def test_normalization_is_configurable_per_workspace(workspace):
    ws = workspace({"strategy": "profile_conversion", "normalization": {"customerid": ["trim", "lowercase"],
                                                                          "ios_idfv": ["trim"]}})
    known = ws.mpid("login", {"customerid": " ABC123", "ios_idfv": "ABCD"})
    assert ws.mpid("login", {"customerid": "abc123"}) == known
    assert ws.mpid("identify", {"ios_idfv": "abcd"}) != ws.mpid("identify", {"ios_idfv": "ABCD"})


BLOCKED_SETTINGS = {"strategy": "profile_conversion", "identity_priority": PRIORITY + ["ios_idfa"],
                    "blocked_values": ["unknown-device"], "blocked_patterns": [r"test-\d+"]}


@pytest.mark.parametrize("value", ["", "null", "undefined", "0", "-1", "00000000-0000-0000-0000-000000000000",
                                   "unknown-device", "test-12345"])
def test_blocked_values_are_never_stored_or_used_to_match(workspace, value):
    ws = workspace(BLOCKED_SETTINGS)
    first = ws.mpid("identify", {"ios_idfa": value, "roku_aid": "roku-1"})
    second = ws.mpid("identify", {"ios_idfa": value, "roku_aid": "roku-2"})
    assert first != second
    before = ws.snapshot()
    error_of(ws.api.raw("identify", {"ios_idfa": value}), 400, "BAD_REQUEST")  # nothing left to identify with
    assert ws.snapshot() == before
    modified = ws.modify(first, "ios_idfa", None, value)
    assert modified.status_code in (200, 400), modified.text
    assert ws.sql("SELECT value FROM identities WHERE scope = ? AND identity_type = 'ios_idfa'", ws.id) == []


# --- A2.14 hub guardrail ------------------------------------------------------------------------------------

def test_hub_guardrail_quarantines_a_device_id_shared_by_more_profiles_than_the_limit(workspace, server):
    ws = workspace({"strategy": "profile_link", "identity_priority": PRIORITY, "hub_limit": 2})
    hub = "shared-tablet"
    a = ws.mpid("login", {"customerid": "A", "ios_idfv": hub})
    b = ws.mpid("login", {"customerid": "B", "ios_idfv": hub})
    assert a != b
    assert ws.hubs()["quarantined"] == []
    assert ws.search({"ios_idfv": hub}) in (a, b)  # at the limit it is still used
    c = ws.mpid("login", {"customerid": "C", "ios_idfv": hub})
    assert len({a, b, c}) == 3
    assert ws.hubs()["quarantined"] == [{"type": "ios_idfv", "value": hub, "profiles": 3}]
    assert {"type": "ios_idfv", "value": hub, "quarantined": True} in ws.graph(c)["identities"]
    assert ws.search({"ios_idfv": hub}) is None
    assert ws.search({"customerid": "A", "ios_idfv": hub}) == a
    server.restart()
    assert ws.search({"ios_idfv": hub}) is None
    assert ws.hubs()["quarantined"] == [{"type": "ios_idfv", "value": hub, "profiles": 3}]


# --- A2.15 login without a login id; errors; the ledger -------------------------------------------------------

@pytest.mark.parametrize("strategy", LOGIN_STRATEGIES)
def test_login_without_a_login_id_is_a_lookup_error_that_writes_nothing(workspace, strategy):
    ws = workspace({"strategy": strategy, "identity_priority": PRIORITY})
    ws.mpid("identify", {"ios_idfv": IDFV})
    before = ws.snapshot()
    for identities in ({"ios_idfv": IDFV}, {"ios_idfv": "new-device", "roku_aid": "roku-1"}):
        error = error_of(ws.api.raw("login", identities), 400, "LOOKUP_ERROR")
        login_types = ["customerid"] if strategy in ("default", "profile_conversion") else ["customerid", "email"]
        assert all(t in error["message"] for t in login_types), error
    assert ws.snapshot() == before


def bad_json(ws: Workspace, _: str) -> httpx.Response:
    return ws.api.http.post("/v1/identify", content=b"{not json", auth=ws.api.auth)


BAD_REQUESTS: dict[str, tuple[int, str, Callable[[Workspace, str], httpx.Response]]] = {
    "not-json": (400, "BAD_REQUEST", bad_json),
    "missing-environment": (400, "BAD_REQUEST", lambda ws, p1: ws.api.call(
        "/v1/identify", {"known_identities": {"ios_idfv": "d-1"}})),
    "identities-not-an-object": (400, "BAD_REQUEST", lambda ws, p1: ws.api.call(
        "/v1/identify", {"environment": "production", "known_identities": ["ios_idfv"]})),
    "unknown-identity-type": (400, "BAD_REQUEST", lambda ws, p1: ws.api.raw(
        "identify", {"ios_idfv": "d-1", "shoe_size": "42"})),
    "no-usable-identity": (400, "BAD_REQUEST", lambda ws, p1: ws.api.raw("identify", {"ios_idfv": "  "})),
    "login-without-login-id": (400, "LOOKUP_ERROR", lambda ws, p1: ws.api.raw("login", {"ios_idfv": "d-1"})),
    "modify-half-valid": (400, "BAD_REQUEST", lambda ws, p1: ws.api.modify(p1, [
        {"identity_type": "email", "old_value": EMAIL, "new_value": "other@example.com"},
        {"identity_type": "shoe_size", "old_value": None, "new_value": "42"}])),
    "modify-immutable": (400, "BAD_REQUEST", lambda ws, p1: ws.api.modify(p1, [
        {"identity_type": "roku_aid", "old_value": None, "new_value": "r-9"},
        {"identity_type": "customerid", "old_value": CID, "new_value": "XYZ"}])),
    "alias-same-mpid": (400, "BAD_REQUEST", lambda ws, p1: ws.api.alias(p1, p1)),
    "bad-credentials": (401, "UNAUTHORIZED", lambda ws, p1: ws.api.http.post(
        "/v1/identify", json={"environment": "production", "known_identities": {"ios_idfv": "d-1"}},
        auth=(ws.api.auth[0], "wrong-secret"))),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_answer_the_error_body_and_change_nothing(workspace, case):
    status, code, send = BAD_REQUESTS[case]
    ws = workspace({"strategy": "profile_conversion", "identity_priority": PRIORITY,
                    "unique_ids": ["customerid", "email"], "immutable_ids": ["customerid"]})
    p1 = ws.mpid("login", {"customerid": CID, "email": EMAIL, "ios_idfv": IDFV})
    before = ws.snapshot()
    error_of(send(ws, p1), status, code)
    assert ws.snapshot() == before


def test_modify_of_an_unknown_mpid_creates_nothing(workspace):
    ws = workspace(CONVERSION)
    ws.mpid("identify", {"ios_idfv": IDFV})
    before = ws.snapshot()
    response = ws.modify("1234567890123", "email", None, "x@example.com")
    assert 400 <= response.status_code < 500
    body = response.json()
    assert body["errors"] == body["Errors"] and body["StatusCode"] == response.status_code and body["ErrorCode"]
    assert ws.snapshot() == before


def test_ledger_explains_why_an_email_is_on_a_profile(workspace):
    ws = workspace(CONVERSION)
    response = ws.api.call("/v1/login", {"environment": "production", "request_id": "req-why-email",
                                         "known_identities": {"customerid": CID, "email": " Ed.Hyde@Example.com"}})
    assert response.status_code == 200, response.text
    mpid = int(response.json()["mpid"])
    rows = ws.sql("SELECT request_id, operation, strategy, reason FROM identity_changes WHERE scope = ? AND mpid = ? "
                  "AND change = 'add' AND identity_type = 'email' AND value = ?", ws.id, mpid, EMAIL)
    assert len(rows) == 1, rows
    request_id, operation, strategy, reason = rows[0]
    assert (request_id, operation, strategy) == ("req-why-email", "login", "profile_conversion") and reason
    # Roku spells it requestId.
    roku = ws.api.call("/v1/identify", {"environment": "production", "requestId": "roku-req-1",
                                        "known_identities": {"roku_aid": "roku-1"}})
    assert roku.status_code == 200, roku.text
    assert ws.sql("SELECT request_id, change FROM identity_changes WHERE scope = ? AND mpid = ? AND "
                  "identity_type = 'roku_aid'", ws.id, int(roku.json()["mpid"])) == [("roku-req-1", "add")]
