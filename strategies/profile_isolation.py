"""Profile Isolation: known and anonymous profiles never mix; logout returns to the device's anonymous
profile; aliasing is not allowed (B§9, G-AL)."""

from __future__ import annotations

from dataclasses import dataclass

from strategies.model import Decision, Operation, ResolveInput
from strategies.shared import (
    anonymous_resolution,
    login_to_known_or_new,
    logout_to_existing_anonymous,
    require_login_identity,
)


@dataclass(frozen=True)
class ProfileIsolation:
    name: str = "profile_isolation"
    has_login_ids: bool = True
    allows_alias: bool = False

    def decide(self, request: ResolveInput) -> Decision:
        if request.operation is Operation.LOGOUT:
            return logout_to_existing_anonymous(request)
        require_login_identity(request, self.name)
        if not request.login_identities():
            return anonymous_resolution(request)
        return login_to_known_or_new(request)


PROFILE_ISOLATION = ProfileIsolation()
