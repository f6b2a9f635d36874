"""Every strategy flow of spec B§9 (Conversion, Default, Link, Isolation, Best Match) through HTTP.

The docs' MPIDs (1234, 2345, ...) are renamed P1, P2, ...: the tests assert which answers are the same profile,
which are new ones, `is_logged_in`, and what each profile holds on the server (the platform graph endpoint and,
for statuses and the ledger, the DuckDB file).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from live_server import LiveServer
from workspace_probe import WorkspaceProbe, module_server

# B§9: "Flows use priority CID > Email > IDFV > Roku".
PRIORITY = ["customerid", "email", "ios_idfv", "roku_aid"]
IDFV, ROKU, CID = "9876", "8765", "ABC123"
EMAIL, NEW_EMAIL, POOLE = "ed.hyde@example.com", "h.jekyll.md@example.com", "g.poole@example.com"
LOGIN = {"customerid": CID, "email": EMAIL, "ios_idfv": IDFV}

SETTINGS: dict[str, dict[str, Any]] = {
    # Conversion with email made unique in this workspace, so the modify step can steal it (G-PC).
    "profile_conversion": {"strategy": "profile_conversion", "identity_priority": PRIORITY,
                           "unique_ids": ["customerid", "email"]},
    "default": {"strategy": "default", "identity_priority": PRIORITY},
    "profile_link": {"strategy": "profile_link", "identity_priority": PRIORITY},
    "profile_isolation": {"strategy": "profile_isolation", "identity_priority": PRIORITY},
    "best_match": {"strategy": "best_match", "identity_priority": ["email", "ios_idfv", "android_uuid"]},
}
CONVERTING = ["profile_conversion", "default"]
SEPARATING = ["profile_link", "profile_isolation"]


class Workspace(WorkspaceProbe):
    """A workspace on the live server: its IDSync client plus read access to what the server holds."""

    def identify(self, identities: dict[str, Any], previous: str | None = None) -> dict:
        return checked(self.api.identify(identities, previous))

    def login(self, identities: dict[str, Any], previous: str | None = None) -> dict:
        return checked(self.api.login(identities, previous))

    def logout(self, identities: dict[str, Any], previous: str | None = None) -> dict:
        return checked(self.api.logout(identities, previous))

    def search(self, identities: dict[str, Any]) -> str | None:
        response = self.api.search(identities)
        if response.status_code == 404:
            return None
        assert response.status_code == 200, response.text
        return checked(response.json())["mpid"]

    def status(self, mpid: str) -> str:
        return self.sql("SELECT status FROM profiles WHERE scope = ? AND mpid = ?", self.id, int(mpid))[0][0]

    def profile_count(self) -> int:
        return self.sql("SELECT count(*) FROM profiles WHERE scope = ?", self.id)[0][0]


def checked(answer: dict) -> dict:
    """An IDSync answer (B§4): mpid is a string holding a non-zero signed 64-bit integer; never ephemeral."""
    mpid = answer["mpid"]
    assert isinstance(mpid, str) and -(1 << 63) <= int(mpid) < (1 << 63) and int(mpid) != 0, answer
    assert answer["is_ephemeral"] is False
    assert isinstance(answer["is_logged_in"], bool)
    return answer


def ids(**identities: str) -> set[tuple[str, str]]:
    return set(identities.items())


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    yield from module_server(tmp_path_factory.mktemp("idmesh"))


@pytest.fixture
def workspace(server: LiveServer) -> Iterator[Any]:
    made: list[Workspace] = []

    def make(strategy: str) -> Workspace:
        made.append(Workspace(server, SETTINGS[strategy]))
        return made[-1]

    yield make
    for ws in made:
        ws.close()


def start_session(ws: Workspace) -> tuple[str, str]:
    """The first two steps every strategy with login ids shares: anonymous identify, then login.
    Returns (anonymous profile, known profile)."""
    anonymous = ws.identify({"ios_idfv": IDFV})
    assert anonymous["is_logged_in"] is False
    known = ws.login(LOGIN, anonymous["mpid"])
    assert known["is_logged_in"] is True
    return anonymous["mpid"], known["mpid"]


# --- Profile Conversion (G-PC) and Default (G-DEF: Conversion with customer id as the only login/unique id) ---

@pytest.mark.parametrize("strategy", CONVERTING)
def test_conversion_login_converts_the_anonymous_profile_in_place(workspace, strategy):
    ws = workspace(strategy)
    p1, known = start_session(ws)
    assert known == p1
    assert ws.holds(p1) == ids(customerid=CID, email=EMAIL, ios_idfv=IDFV)
    assert ws.profile_count() == 1


@pytest.mark.parametrize("strategy", CONVERTING)
def test_conversion_logout_creates_anonymous_profile_and_returning_login_finds_the_known_one(workspace, strategy):
    ws = workspace(strategy)
    p1, _ = start_session(ws)
    logged_out = ws.logout({"ios_idfv": IDFV}, p1)
    p2 = logged_out["mpid"]
    assert p2 != p1 and logged_out["is_logged_in"] is False
    assert ws.holds(p2) == ids(ios_idfv=IDFV)
    assert ws.holds(p1) == ids(customerid=CID, email=EMAIL, ios_idfv=IDFV)
    returning = ws.login(LOGIN, p2)
    assert returning["mpid"] == p1 and returning["is_logged_in"] is True
    assert ws.holds(p2) == ids(ios_idfv=IDFV), "the anonymous P2 must not be converted on a returning login"


@pytest.mark.parametrize("strategy", CONVERTING)
def test_conversion_second_logout_reuses_the_anonymous_profile_of_the_first(workspace, strategy):
    """A2.3: Conversion returns the existing anonymous profile of the device and creates one only if none exists."""
    ws = workspace(strategy)
    p1, _ = start_session(ws)
    p2 = ws.logout({"ios_idfv": IDFV}, p1)["mpid"]
    assert ws.login(LOGIN, p2)["mpid"] == p1
    again = ws.logout({"ios_idfv": IDFV}, p1)
    assert again["mpid"] == p2 and again["is_logged_in"] is False
    assert ws.profile_count() == 2


@pytest.mark.parametrize("strategy", CONVERTING + ["profile_isolation"])
def test_logout_without_an_anonymous_profile_creates_one_and_later_logouts_reuse_it(workspace, strategy):
    """A2.3 on a device whose first request was a login: no anonymous profile exists, so the first logout makes
    one; Conversion and Isolation return it on every later logout."""
    ws = workspace(strategy)
    known = ws.login(LOGIN)["mpid"]
    first = ws.logout({"ios_idfv": IDFV}, known)
    assert first["mpid"] != known and first["is_logged_in"] is False
    assert ws.login(LOGIN, first["mpid"])["mpid"] == known
    assert ws.logout({"ios_idfv": IDFV}, known)["mpid"] == first["mpid"]
    assert ws.profile_count() == 2


@pytest.mark.parametrize("strategy, email_unique", [("profile_conversion", True), ("default", False)])
def test_conversion_modify_steals_a_unique_email_from_a_feed_profile_which_is_orphaned(workspace, server, strategy,
                                                                                      email_unique):
    ws = workspace(strategy)
    p1, _ = start_session(ws)
    p3 = ws.identify({"email": NEW_EMAIL})["mpid"]  # a profile created by a feed, holding only that email
    assert p3 != p1
    response = ws.api.modify(p1, [{"identity_type": "email", "old_value": EMAIL, "new_value": NEW_EMAIL}])
    assert response.status_code == 200, response.text
    assert response.json()["change_results"] == [{"identity_type": "email", "modified_mpid": p1}]
    assert ws.holds(p1) == ids(customerid=CID, email=NEW_EMAIL, ios_idfv=IDFV)
    if email_unique:
        assert ws.holds(p3) == set() and ws.status(p3) == "orphaned"
        assert ws.search({"email": NEW_EMAIL}) == p1
        steal = ws.sql("SELECT other_mpid FROM identity_changes WHERE scope = ? AND mpid = ? AND change = 'steal' "
                       "AND identity_type = 'email' AND value = ?", ws.id, int(p3), NEW_EMAIL)
        assert steal == [(int(p1),)]
        assert ws.identify({"email": NEW_EMAIL})["mpid"] not in (p1, p3), "an orphan is never returned"
        server.restart()
        assert ws.holds(p3) == set() and ws.status(p3) == "orphaned"
        assert ws.holds(p1) == ids(customerid=CID, email=NEW_EMAIL, ios_idfv=IDFV)
        assert ws.search({"email": NEW_EMAIL}) == p1
    else:  # Default: only customer id is unique, so P3 keeps its copy
        assert ws.holds(p3) == ids(email=NEW_EMAIL) and ws.status(p3) == "active"


@pytest.mark.parametrize("strategy", CONVERTING + SEPARATING)
def test_new_device_identify_makes_anonymous_profile_and_login_adds_roku_to_the_known_one(workspace, strategy):
    """G-PC / G-PL / G-PI "New Device": identify{Roku} -> new P4; login{CID, email, Roku} -> the known profile
    gains the Roku id; P4 stays anonymous and untouched."""
    ws = workspace(strategy)
    anonymous, known = start_session(ws)
    roku = ws.identify({"roku_aid": ROKU})
    p4 = roku["mpid"]
    assert p4 not in (anonymous, known) and roku["is_logged_in"] is False
    login = ws.login({"customerid": CID, "email": EMAIL, "roku_aid": ROKU}, p4)
    assert login["mpid"] == known and login["is_logged_in"] is True
    assert ws.holds(known) == ids(customerid=CID, email=EMAIL, ios_idfv=IDFV, roku_aid=ROKU)
    assert ws.holds(p4) == ids(roku_aid=ROKU)
    again = ws.identify({"roku_aid": ROKU})
    assert again["mpid"] == p4 and again["is_logged_in"] is False


# --- Profile Link (G-PL) and Profile Isolation (G-PI) ---------------------------------------------------------

@pytest.mark.parametrize("strategy", SEPARATING)
def test_login_with_a_new_login_id_creates_a_new_known_profile_and_anonymous_keeps_idfv(workspace, strategy):
    ws = workspace(strategy)
    p1, p2 = start_session(ws)
    assert p2 != p1
    assert ws.holds(p2) == ids(customerid=CID, email=EMAIL, ios_idfv=IDFV)
    assert ws.holds(p1) == ids(ios_idfv=IDFV), "nothing moves between the anonymous and the known profile"
    assert ws.profile_count() == 2


def test_link_logout_always_creates_a_new_anonymous_profile(workspace):
    ws = workspace("profile_link")
    p1, p2 = start_session(ws)
    first = ws.logout({"ios_idfv": IDFV}, p2)
    p3 = first["mpid"]
    assert p3 not in (p1, p2) and first["is_logged_in"] is False
    assert ws.holds(p3) == ids(ios_idfv=IDFV)
    second = ws.logout({"ios_idfv": IDFV}, p3)
    assert second["mpid"] not in (p1, p2, p3) and second["is_logged_in"] is False
    assert ws.profile_count() == 4


def test_isolation_logout_returns_to_the_existing_anonymous_profile(workspace):
    ws = workspace("profile_isolation")
    p1, p2 = start_session(ws)
    for _ in range(2):
        logged_out = ws.logout({"ios_idfv": IDFV}, p2)
        assert logged_out["mpid"] == p1 and logged_out["is_logged_in"] is False
    assert ws.holds(p1) == ids(ios_idfv=IDFV)
    assert ws.profile_count() == 2


@pytest.mark.parametrize("strategy", SEPARATING)
def test_returning_login_after_logout_finds_the_known_profile(workspace, strategy):
    ws = workspace(strategy)
    _, p2 = start_session(ws)
    logged_out = ws.logout({"ios_idfv": IDFV}, p2)["mpid"]
    returning = ws.login(LOGIN, logged_out)
    assert returning["mpid"] == p2 and returning["is_logged_in"] is True
    assert ws.holds(logged_out) == ids(ios_idfv=IDFV)


def test_link_modify_steals_email_from_another_profile(workspace):
    ws = workspace("profile_link")
    _, p2 = start_session(ws)
    p4 = ws.identify({"email": NEW_EMAIL})  # email is a login id under Link: a new known profile
    assert p4["mpid"] != p2 and p4["is_logged_in"] is True
    response = ws.api.modify(p2, [{"identity_type": "email", "old_value": EMAIL, "new_value": NEW_EMAIL}])
    assert response.status_code == 200, response.text
    assert ws.holds(p2) == ids(customerid=CID, email=NEW_EMAIL, ios_idfv=IDFV)
    assert ws.holds(p4["mpid"]) == set() and ws.status(p4["mpid"]) == "orphaned"
    assert ws.login({"email": NEW_EMAIL, "ios_idfv": IDFV})["mpid"] == p2


# --- Best Match (G-BM): priority Email > IDFV > Android ID, no login ids -----------------------------------

def test_best_match_identify_adds_the_email_to_the_device_profile(workspace):
    ws = workspace("best_match")
    p1 = ws.identify({"ios_idfv": IDFV})["mpid"]
    with_email = ws.identify({"email": EMAIL, "ios_idfv": IDFV})
    assert with_email["mpid"] == p1 and with_email["is_logged_in"] is False
    assert ws.holds(p1) == ids(ios_idfv=IDFV, email=EMAIL)


def test_best_match_modify_replaces_and_identify_adds_a_second_email(workspace):
    ws = workspace("best_match")
    p1 = ws.identify({"email": EMAIL, "ios_idfv": IDFV})["mpid"]
    response = ws.api.modify(p1, [{"identity_type": "email", "old_value": EMAIL, "new_value": NEW_EMAIL}])
    assert response.status_code == 200, response.text
    assert ws.holds(p1) == ids(ios_idfv=IDFV, email=NEW_EMAIL)
    assert ws.identify({"email": POOLE, "ios_idfv": IDFV})["mpid"] == p1
    assert ws.holds(p1) == {("ios_idfv", IDFV), ("email", NEW_EMAIL), ("email", POOLE)}


def test_best_match_email_outranks_android_id(workspace):
    ws = workspace("best_match")
    p1 = ws.identify({"email": POOLE, "ios_idfv": IDFV})["mpid"]
    p2 = ws.identify({"android_uuid": ROKU})["mpid"]
    assert p2 != p1
    both = ws.identify({"android_uuid": ROKU, "email": POOLE})
    assert both["mpid"] == p1 and both["is_logged_in"] is False
    assert ws.holds(p1) == ids(email=POOLE, ios_idfv=IDFV, android_uuid=ROKU)
    assert ws.holds(p2) == ids(android_uuid=ROKU)
