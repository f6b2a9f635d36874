"""Profile Link: a new login id starts a new known profile (the app aliases the anonymous one to it);
logout always starts a new anonymous profile (B§9)."""

from __future__ import annotations

from strategies.shared import LoginIdStrategy, login_to_known_or_new, logout_to_new_anonymous

PROFILE_LINK = LoginIdStrategy("profile_link", login_to_known_or_new, logout_to_new_anonymous, allows_alias=True)
