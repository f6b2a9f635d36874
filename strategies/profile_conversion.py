"""Profile Conversion (and Default, which is Conversion with customer id fixed as the login and unique id).

An anonymous profile becomes known in place on the first login, so the MPID never changes (B§9, A2.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from strategies.lookup import is_known, priority_walk, return_or_create
from strategies.model import Decision, Operation, ResolveInput
from strategies.shared import (
    anonymous_resolution,
    known_login_match,
    logout_to_existing_anonymous,
    require_login_identity,
)


@dataclass(frozen=True)
class ProfileConversion:
    name: str
    has_login_ids: bool = True
    allows_alias: bool = True

    def decide(self, request: ResolveInput) -> Decision:
        if request.operation is Operation.LOGOUT:
            return logout_to_existing_anonymous(request)
        require_login_identity(request, self.name)
        if not request.login_identities():
            return anonymous_resolution(request)
        known = known_login_match(request)
        if known is not None:
            return return_or_create(request, known, "login id matched known profile")
        request_keys = set(request.identities.items())
        previous = request.previous
        if previous and not is_known(previous, request.rules) and previous.identities & request_keys:
            return return_or_create(request, previous, "converted the anonymous previous_mpid profile")
        anonymous = priority_walk(request, lambda p: not is_known(p, request.rules))
        if anonymous is not None:
            return return_or_create(request, anonymous, "converted the anonymous profile of this device")
        return return_or_create(request, None, "login id not seen before and no anonymous profile: new profile")


PROFILE_CONVERSION = ProfileConversion("profile_conversion")
DEFAULT = ProfileConversion("default")
