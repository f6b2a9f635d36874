"""Value types shared by the strategies and the service that applies their decisions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

IdentityKey = tuple[str, str]  # (identity type, normalized value)


class Operation(str, Enum):
    IDENTIFY = "identify"
    LOGIN = "login"
    LOGOUT = "logout"


@dataclass(frozen=True, slots=True)
class IdentityRules:
    priority: tuple[str, ...]
    login_ids: frozenset[str]
    unique_ids: frozenset[str]
    immutable_ids: frozenset[str]


@dataclass(frozen=True, slots=True)
class ProfileView:
    """What a strategy may know about one existing profile."""

    mpid: int
    created_ms: int
    last_seen_ms: int
    identities: frozenset[IdentityKey]

    def holds_type(self, identity_type: str) -> bool:
        return any(t == identity_type for t, _ in self.identities)


@dataclass(frozen=True, slots=True)
class ResolveInput:
    operation: Operation
    identities: Mapping[str, str]                      # request: type -> normalized value, blocked ones dropped
    matches: Mapping[str, tuple[ProfileView, ...]]     # type -> profiles holding the request's value (usable ones)
    previous: ProfileView | None                       # the profile named by previous_mpid, when it exists
    rules: IdentityRules

    def login_identities(self) -> dict[str, str]:
        return {t: v for t, v in self.identities.items() if t in self.rules.login_ids}


@dataclass(frozen=True, slots=True)
class Decision:
    """Return `mpid` (or create a profile when None) and add `add` to it; `reason` goes to the ledger."""

    mpid: int | None
    add: tuple[IdentityKey, ...]
    reason: str
    skipped: tuple[tuple[IdentityKey, str], ...] = ()  # request identities not added, with why


class Strategy(Protocol):
    name: str
    allows_alias: bool

    def decide(self, request: ResolveInput) -> Decision: ...


class MissingLoginIdentity(Exception):
    """A login that carries none of the workspace's login-ID types (spec A2.15)."""

    def __init__(self, strategy: str, login_types: frozenset[str]) -> None:
        self.login_types = sorted(login_types)
        super().__init__(f"{strategy} login is missing a login identity type: send one of "
                         f"{', '.join(self.login_types)} in known_identities")
