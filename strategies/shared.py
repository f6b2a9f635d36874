"""Decision steps more than one strategy takes, named after what they do, and the shape shared by the
strategies that have login ids."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from strategies.lookup import is_known, login_gate, priority_walk, return_or_create
from strategies.model import Decision, MissingLoginIdentity, Operation, ProfileView, ResolveInput

Step = Callable[[ResolveInput], Decision]


def known_login_match(request: ResolveInput) -> ProfileView | None:
    """The known profile the request's login ids select, through the gate and the priority walk."""
    eligible = login_gate(request)
    return priority_walk(request, lambda p: is_known(p, request.rules) and eligible(p))


def anonymous_resolution(request: ResolveInput) -> Decision:
    """A request without login ids: the gate leaves anonymous profiles (and none that are known)."""
    match = priority_walk(request, login_gate(request))
    reason = "matched by priority walk" if match else "no eligible profile matched: new profile"
    return return_or_create(request, match, reason)


def logout_to_existing_anonymous(request: ResolveInput) -> Decision:
    """A2.3 (Conversion, Isolation): the anonymous profile the device ids select, else a new one.
    Login ids in a logout are ignored: the user is leaving them."""
    match = priority_walk(request, lambda p: not is_known(p, request.rules))
    reason = "logout: returned anonymous profile of this device" if match else "logout: new anonymous profile"
    return return_or_create(request, match, reason, exclude_types=request.rules.login_ids)


def logout_to_new_anonymous(request: ResolveInput) -> Decision:
    """Profile Link: a logout always starts a new anonymous profile (B§9)."""
    return return_or_create(request, None, "logout: always a new anonymous profile",
                            exclude_types=request.rules.login_ids)


def login_to_known_or_new(request: ResolveInput) -> Decision:
    """Link and Isolation: a login id seen for the first time makes a new profile; anonymous data stays put."""
    known = known_login_match(request)
    if known is not None:
        return return_or_create(request, known, "login id matched known profile")
    return return_or_create(request, None, "login id not seen before: new profile")


@dataclass(frozen=True)
class LoginIdStrategy:
    """A strategy with login ids: logout, a login-id request and an anonymous request each take one step."""

    name: str
    with_login_id: Step
    on_logout: Step
    allows_alias: bool

    def decide(self, request: ResolveInput) -> Decision:
        if request.operation is Operation.LOGOUT:
            return self.on_logout(request)
        if request.login_identities():
            return self.with_login_id(request)
        if request.operation is Operation.LOGIN:
            raise MissingLoginIdentity(self.name, request.rules.login_ids)  # A2.15
        return anonymous_resolution(request)
