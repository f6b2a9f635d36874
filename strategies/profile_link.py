"""Profile Link: a new login id starts a new known profile (the app aliases the anonymous one to it);
logout always starts a new anonymous profile (B§9)."""

from __future__ import annotations

from dataclasses import dataclass

from strategies.model import Decision, Operation, ResolveInput
from strategies.shared import (
    anonymous_resolution,
    login_to_known_or_new,
    logout_to_new_anonymous,
    require_login_identity,
)


@dataclass(frozen=True)
class ProfileLink:
    name: str = "profile_link"
    has_login_ids: bool = True
    allows_alias: bool = True

    def decide(self, request: ResolveInput) -> Decision:
        if request.operation is Operation.LOGOUT:
            return logout_to_new_anonymous(request)
        require_login_identity(request, self.name)
        if not request.login_identities():
            return anonymous_resolution(request)
        return login_to_known_or_new(request)


PROFILE_LINK = ProfileLink()
