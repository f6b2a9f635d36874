"""Profile Conversion (and Default, which is Conversion with customer id fixed as the login and unique id).

An anonymous profile becomes known in place on the first login, so the MPID never changes (B§9, A2.2).
"""

from __future__ import annotations

from strategies.lookup import is_known, priority_walk, return_or_create
from strategies.model import Decision, ResolveInput
from strategies.shared import LoginIdStrategy, known_login_match, logout_to_existing_anonymous


def convert_on_login(request: ResolveInput) -> Decision:
    known = known_login_match(request)
    if known is not None:
        return return_or_create(request, known, "login id matched known profile")
    previous = request.previous
    if previous and not is_known(previous, request.rules) and previous.identities & set(request.identities.items()):
        return return_or_create(request, previous, "converted the anonymous previous_mpid profile")
    anonymous = priority_walk(request, lambda p: not is_known(p, request.rules))
    if anonymous is not None:
        return return_or_create(request, anonymous, "converted the anonymous profile of this device")
    return return_or_create(request, None, "login id not seen before and no anonymous profile: new profile")


PROFILE_CONVERSION = LoginIdStrategy("profile_conversion", convert_on_login, logout_to_existing_anonymous,
                                     allows_alias=True)
DEFAULT = LoginIdStrategy("default", convert_on_login, logout_to_existing_anonymous, allows_alias=True)
