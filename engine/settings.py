"""Workspace settings: plain JSON in, a validated frozen dataclass out.

Every validation failure names the field, so the API can answer 400 with it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.errors import BadRequest
from engine.identity_types import ALL_IDENTITY_TYPES, DEFAULT_PRIORITY
from engine.normalize import NORMALIZATION_STEPS, IdentityNormalizer, default_normalization

STRATEGIES = ("default", "profile_conversion", "profile_link", "profile_isolation", "best_match")

# Upper bounds that keep the numbers derived from settings inside the store's 64-bit integers (and orjson's):
# absurd values were accepted and then failed the commit of every alias, or every answer listing the workspace.
MAX_BURST = 10**12
MAX_ALIAS_DELAY_SECONDS = 100 * 365 * 86_400
MAX_ALIAS_WINDOW_DAYS = 100 * 365

# Spec B§9: login and unique ids each strategy starts from when settings name only the strategy.
STRATEGY_ID_DEFAULTS: dict[str, tuple[str, ...]] = {
    "default": ("customerid",),
    "profile_conversion": ("customerid",),
    "profile_link": ("customerid", "email"),
    "profile_isolation": ("customerid", "email"),
    "best_match": (),
}


@dataclass(frozen=True)
class RateLimit:
    requests_per_second: float
    burst: int


@dataclass(frozen=True)
class AliasSettings:
    delay_seconds: int = 0
    max_window_days: int = 90


@dataclass(frozen=True)
class WorkspaceSettings:
    strategy: str = "default"
    identity_priority: tuple[str, ...] = DEFAULT_PRIORITY
    login_ids: tuple[str, ...] = ("customerid",)
    unique_ids: tuple[str, ...] = ("customerid",)
    immutable_ids: tuple[str, ...] = ()
    normalization: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    blocked_values: tuple[str, ...] = ()
    blocked_patterns: tuple[str, ...] = ()
    hub_limit: int = 10
    key_only_auth: bool = False
    rate_limit: RateLimit | None = None
    alias: AliasSettings = AliasSettings()

    def normalizer(self) -> IdentityNormalizer:
        return IdentityNormalizer(self.normalization, self.blocked_values, self.blocked_patterns)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["normalization"] = {t: list(s) for t, s in self.normalization.items()}
        for key in ("identity_priority", "login_ids", "unique_ids", "immutable_ids", "blocked_values",
                    "blocked_patterns"):
            data[key] = list(data[key])
        return data


_KNOWN_KEYS = set(WorkspaceSettings.__dataclass_fields__)


def parse_settings(raw: Mapping[str, Any] | None) -> WorkspaceSettings:
    """Validate user-supplied settings (a JSON object) and fill the strategy's defaults."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - _KNOWN_KEYS)
    if unknown:
        raise BadRequest(f"settings.{unknown[0]} is not a known setting", field=f"settings.{unknown[0]}")
    strategy = raw.get("strategy", "default")
    if strategy not in STRATEGIES:
        raise BadRequest(f"settings.strategy must be one of {', '.join(STRATEGIES)}", field="settings.strategy")
    id_defaults = STRATEGY_ID_DEFAULTS[strategy]
    priority = _type_list(raw, "identity_priority", DEFAULT_PRIORITY)
    if len(set(priority)) != len(priority) or not priority:
        raise BadRequest("settings.identity_priority must be a non-empty list without repeats",
                         field="settings.identity_priority")
    login_ids = _type_list(raw, "login_ids", id_defaults)
    unique_ids = _type_list(raw, "unique_ids", id_defaults)
    immutable_ids = _type_list(raw, "immutable_ids", ())
    if strategy == "default" and (set(login_ids) != {"customerid"} or set(unique_ids) != {"customerid"}):
        raise BadRequest("the default strategy fixes login_ids and unique_ids to [customerid]; "
                         "use profile_conversion to choose them", field="settings.login_ids")
    if strategy == "best_match" and (login_ids or unique_ids or immutable_ids):
        raise BadRequest("best_match has no login, unique or immutable ids", field="settings.login_ids")
    if strategy != "best_match" and not login_ids:
        raise BadRequest(f"{strategy} needs at least one login id type", field="settings.login_ids")
    for name, types in (("login_ids", login_ids), ("unique_ids", unique_ids), ("immutable_ids", immutable_ids)):
        missing = [t for t in types if t not in priority]
        if missing:
            raise BadRequest(f"settings.{name}: {missing[0]} is not in identity_priority", field=f"settings.{name}")
    if not set(immutable_ids) <= set(unique_ids) & set(login_ids):
        raise BadRequest("settings.immutable_ids must also be login ids and unique ids",
                         field="settings.immutable_ids")
    normalization = default_normalization()
    custom_norm = raw.get("normalization", {})
    if not isinstance(custom_norm, Mapping):
        raise BadRequest("settings.normalization must be an object of type -> steps", field="settings.normalization")
    for identity_type, steps in custom_norm.items():
        path = f"settings.normalization.{identity_type}"
        if identity_type not in ALL_IDENTITY_TYPES:
            raise BadRequest(f"{path}: unknown identity type", field=path)
        if not isinstance(steps, list) or any(not isinstance(s, str) or s not in NORMALIZATION_STEPS for s in steps):
            raise BadRequest(f"{path} must be a list drawn from {', '.join(NORMALIZATION_STEPS)}", field=path)
        normalization[identity_type] = steps
    blocked_values = _string_list(raw, "blocked_values")
    blocked_patterns = _string_list(raw, "blocked_patterns")
    for pattern in blocked_patterns:
        try:
            re.compile(pattern)
        except (re.error, OverflowError) as exc:  # OverflowError: a repeat count like {99999999999}
            raise BadRequest(f"settings.blocked_patterns: {pattern!r} is not a regular expression ({exc})",
                             field="settings.blocked_patterns") from None
    hub_limit = raw.get("hub_limit", 10)
    if not _is_int(hub_limit) or hub_limit < 2:
        raise BadRequest("settings.hub_limit must be an integer >= 2", field="settings.hub_limit")
    key_only = raw.get("key_only_auth", False)
    if not isinstance(key_only, bool):
        raise BadRequest("settings.key_only_auth must be true or false", field="settings.key_only_auth")
    return WorkspaceSettings(
        strategy=strategy,
        identity_priority=priority,
        login_ids=login_ids,
        unique_ids=unique_ids,
        immutable_ids=immutable_ids,
        normalization={t: tuple(s) for t, s in normalization.items()},
        blocked_values=blocked_values,
        blocked_patterns=blocked_patterns,
        hub_limit=hub_limit,
        key_only_auth=key_only,
        rate_limit=_rate_limit(raw.get("rate_limit")),
        alias=_alias_settings(raw.get("alias")),
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_list(raw: Mapping[str, Any], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if key not in raw:
        return tuple(default)
    value = raw[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"settings.{key} must be a list of identity types", field=f"settings.{key}")
    unknown = [v for v in value if v not in ALL_IDENTITY_TYPES]
    if unknown:
        raise BadRequest(f"settings.{key}: {unknown[0]!r} is not an identity type", field=f"settings.{key}")
    return tuple(value)


def _string_list(raw: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"settings.{key} must be a list of strings", field=f"settings.{key}")
    return tuple(value)


def _rate_limit(value: Any) -> RateLimit | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise BadRequest("settings.rate_limit must be null or {requests_per_second, burst}",
                         field="settings.rate_limit")
    rps, burst = value.get("requests_per_second"), value.get("burst", value.get("requests_per_second"))
    if not isinstance(rps, (int, float)) or isinstance(rps, bool) or rps <= 0:
        raise BadRequest("settings.rate_limit.requests_per_second must be a positive number",
                         field="settings.rate_limit.requests_per_second")
    if not isinstance(burst, (int, float)) or isinstance(burst, bool) or not 1 <= burst <= MAX_BURST:
        raise BadRequest(f"settings.rate_limit.burst must be a number from 1 to {MAX_BURST:,}",
                         field="settings.rate_limit.burst")
    return RateLimit(float(rps), int(burst))


def _alias_settings(value: Any) -> AliasSettings:
    if value is None:
        return AliasSettings()
    if not isinstance(value, Mapping):
        raise BadRequest("settings.alias must be an object", field="settings.alias")
    delay = value.get("delay_seconds", 0)
    window = value.get("max_window_days", 90)
    if not _is_int(delay) or not 0 <= delay <= MAX_ALIAS_DELAY_SECONDS:
        raise BadRequest(f"settings.alias.delay_seconds must be an integer from 0 to {MAX_ALIAS_DELAY_SECONDS:,}",
                         field="settings.alias.delay_seconds")
    if not _is_int(window) or not 1 <= window <= MAX_ALIAS_WINDOW_DAYS:
        raise BadRequest(f"settings.alias.max_window_days must be an integer from 1 to {MAX_ALIAS_WINDOW_DAYS:,}",
                         field="settings.alias.max_window_days")
    return AliasSettings(delay, window)
