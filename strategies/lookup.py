"""The lookup every strategy shares: eligibility gate, priority walk and deterministic tie-break
(spec B§8 steps 1-4, A2.1)."""

from __future__ import annotations

from collections.abc import Callable

from strategies.model import Decision, IdentityKey, IdentityRules, ProfileView, ResolveInput

Eligible = Callable[[ProfileView], bool]


def is_known(profile: ProfileView, rules: IdentityRules) -> bool:
    return any(t in rules.login_ids for t, _ in profile.identities)


def login_gate(request: ResolveInput) -> Eligible:
    """B§8.3: a known profile is eligible only if it shares a login-ID value with the request; one holding an
    immutable id only if it shares an immutable-ID value."""
    rules = request.rules
    login_keys = {(t, v) for t, v in request.identities.items() if t in rules.login_ids}
    immutable_keys = {(t, v) for t, v in login_keys if t in rules.immutable_ids}

    def eligible(profile: ProfileView) -> bool:
        if any(t in rules.immutable_ids for t, _ in profile.identities):
            return bool(profile.identities & immutable_keys)
        if not is_known(profile, rules):
            return True
        return bool(profile.identities & login_keys)

    return eligible


def priority_walk(request: ResolveInput, eligible: Eligible) -> ProfileView | None:
    """Narrow candidates type by type in priority order; a type that would empty the set is skipped."""
    candidates: dict[int, ProfileView] | None = None
    for identity_type in request.rules.priority:
        if identity_type not in request.identities:
            continue
        found = {p.mpid: p for p in request.matches.get(identity_type, ()) if eligible(p)}
        if not found:
            continue
        if candidates is None:
            candidates = found
        else:
            narrowed = {m: p for m, p in candidates.items() if m in found}
            if narrowed:
                candidates = narrowed
        if len(candidates) == 1:
            break
    if not candidates:
        return None
    return min(candidates.values(), key=tie_break_key)


def tie_break_key(profile: ProfileView) -> tuple[int, int, int]:
    """A2.1: most recently seen, then oldest created, then smallest MPID."""
    return (-profile.last_seen_ms, profile.created_ms, profile.mpid)


def identities_to_add(request: ResolveInput, target: ProfileView | None, *, multi_valued: bool = False,
                      exclude_types: frozenset[str] = frozenset()) -> tuple[tuple[IdentityKey, ...],
                                                                             tuple[tuple[IdentityKey, str], ...]]:
    """The request identities the target lacks and may take (B§8.6, A2.11).

    Never steals: a unique value held by another profile stays where it is. A profile keeps one value per
    unique type (a second customer id means a different person) unless the strategy is multi-valued.
    """
    rules = request.rules
    held = target.identities if target else frozenset()
    target_mpid = target.mpid if target else None
    add: list[IdentityKey] = []
    skipped: list[tuple[IdentityKey, str]] = []
    for identity_type, value in request.identities.items():
        key = (identity_type, value)
        if key in held:
            continue
        if identity_type in exclude_types:
            skipped.append((key, f"{identity_type} is not taken on this operation"))
            continue
        if identity_type in rules.unique_ids:
            holders = [p.mpid for p in request.matches.get(identity_type, ()) if p.mpid != target_mpid]
            if holders:
                skipped.append((key, f"unique value held by profile {holders[0]}"))
                continue
            if not multi_valued and target is not None and target.holds_type(identity_type):
                skipped.append((key, f"profile already holds another {identity_type}"))
                continue
        add.append(key)
    return tuple(add), tuple(skipped)


def return_or_create(request: ResolveInput, target: ProfileView | None, reason: str, **add_options: object
                     ) -> Decision:
    add, skipped = identities_to_add(request, target, **add_options)  # type: ignore[arg-type]
    if target is None:
        return Decision(None, add, reason, skipped)
    return Decision(target.mpid, add, reason, skipped)
