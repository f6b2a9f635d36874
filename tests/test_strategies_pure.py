"""The strategies are pure functions of a ResolveInput: checked here without a store or HTTP."""

from __future__ import annotations

import pytest

from strategies import strategy_for
from strategies.lookup import priority_walk
from strategies.model import IdentityRules, MissingLoginIdentity, Operation, ProfileView, ResolveInput

RULES = IdentityRules(("customerid", "email", "ios_idfv"), frozenset({"customerid"}), frozenset({"customerid"}),
                      frozenset())


def profile(mpid: int, *identities: tuple[str, str], last_seen: int = 0, created: int = 0) -> ProfileView:
    return ProfileView(mpid, created, last_seen, frozenset(identities))


def request(operation: Operation, identities: dict[str, str], profiles: list[ProfileView],
            previous: ProfileView | None = None, rules: IdentityRules = RULES) -> ResolveInput:
    matches = {t: tuple(p for p in profiles if (t, v) in p.identities) for t, v in identities.items()}
    return ResolveInput(operation, identities, {t: m for t, m in matches.items() if m}, previous, rules)


def test_conversion_converts_the_device_profile_and_adds_the_login_id():
    anonymous = profile(1, ("ios_idfv", "d"))
    decision = strategy_for("profile_conversion").decide(
        request(Operation.LOGIN, {"customerid": "c", "ios_idfv": "d"}, [anonymous]))
    assert decision.mpid == 1 and decision.add == (("customerid", "c"),)


def test_link_creates_a_new_profile_for_a_new_login_id():
    anonymous = profile(1, ("ios_idfv", "d"))
    decision = strategy_for("profile_link").decide(
        request(Operation.LOGIN, {"customerid": "c", "ios_idfv": "d"}, [anonymous]))
    assert decision.mpid is None and set(decision.add) == {("customerid", "c"), ("ios_idfv", "d")}


@pytest.mark.parametrize("name", ["default", "profile_conversion", "profile_link", "profile_isolation"])
def test_login_without_login_id_is_refused(name: str):
    with pytest.raises(MissingLoginIdentity):
        strategy_for(name).decide(request(Operation.LOGIN, {"ios_idfv": "d"}, []))


def test_best_match_takes_a_second_value_of_a_type():
    p1 = profile(1, ("email", "a@x"), ("ios_idfv", "d"))
    rules = IdentityRules(("email", "ios_idfv"), frozenset(), frozenset(), frozenset())
    decision = strategy_for("best_match").decide(
        request(Operation.LOGIN, {"email": "b@x", "ios_idfv": "d"}, [p1], rules=rules))
    assert decision.mpid == 1 and decision.add == (("email", "b@x"),)


def test_gate_hides_a_known_profile_from_a_request_without_its_login_id():
    known = profile(1, ("customerid", "c"), ("ios_idfv", "d"))
    decision = strategy_for("profile_conversion").decide(request(Operation.IDENTIFY, {"ios_idfv": "d"}, [known]))
    assert decision.mpid is None


def test_tie_break_prefers_recent_then_old_then_small():
    a = profile(5, ("email", "e"), last_seen=10, created=3)
    b = profile(4, ("email", "e"), last_seen=10, created=3)
    c = profile(3, ("email", "e"), last_seen=9, created=1)
    chosen = priority_walk(request(Operation.IDENTIFY, {"email": "e"}, [a, b, c]), lambda p: True)
    assert chosen.mpid == 4


def test_unique_value_held_elsewhere_is_never_added():
    holder = profile(1, ("customerid", "c"))
    target = profile(2, ("ios_idfv", "d"))
    rules = IdentityRules(("ios_idfv", "customerid"), frozenset({"customerid"}), frozenset({"customerid"}),
                          frozenset())
    decision = strategy_for("best_match").decide(
        request(Operation.IDENTIFY, {"ios_idfv": "d", "customerid": "c"}, [holder, target], rules=rules))
    assert decision.mpid == 2 and decision.add == ()
    assert decision.skipped[0][0] == ("customerid", "c")
