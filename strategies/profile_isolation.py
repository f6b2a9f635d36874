"""Profile Isolation: known and anonymous profiles never mix; logout returns to the device's anonymous
profile; aliasing is not allowed (B§9, G-AL)."""

from __future__ import annotations

from strategies.shared import LoginIdStrategy, login_to_known_or_new, logout_to_existing_anonymous

PROFILE_ISOLATION = LoginIdStrategy("profile_isolation", login_to_known_or_new, logout_to_existing_anonymous,
                                    allows_alias=False)
