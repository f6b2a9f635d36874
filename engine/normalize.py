"""Identity value normalization and blocked values (spec A2.12, A2.13).

Normalization is data: each type maps to a list of step names, so a workspace can override it in its
settings as plain JSON.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from engine.identity_types import DEVICE_IDENTITY_TYPES


def _digits_keep_plus(value: str) -> str:
    digits = re.sub(r"\D", "", value)
    return "+" + digits if value.startswith("+") else digits


NORMALIZATION_STEPS: dict[str, Callable[[str], str]] = {
    "trim": str.strip,
    "lowercase": str.lower,
    "digits": _digits_keep_plus,
}

PHONE_TYPES = ("mobile_number", "phone_number_2", "phone_number_3")


def default_normalization() -> dict[str, list[str]]:
    steps: dict[str, list[str]] = {"email": ["trim", "lowercase"]}
    for phone in PHONE_TYPES:
        steps[phone] = ["trim", "digits"]
    for device in DEVICE_IDENTITY_TYPES:
        steps[device] = ["trim", "lowercase"]
    return steps


# Values SDKs send when they have nothing (spec A2.13); compared after normalization.
ALWAYS_BLOCKED: frozenset[str] = frozenset(
    {"", "null", "undefined", "0", "-1", "00000000-0000-0000-0000-000000000000"}
)


class IdentityNormalizer:
    """Turns a raw identity value into its matching form, or None when the value is blocked."""

    def __init__(self, steps_by_type: Mapping[str, Sequence[str]], blocked_values: Sequence[str] = (),
                 blocked_patterns: Sequence[str] = ()) -> None:
        self._steps = {t: tuple(NORMALIZATION_STEPS[s] for s in steps) for t, steps in steps_by_type.items()}
        self._blocked = ALWAYS_BLOCKED | {v.strip().lower() for v in blocked_values}
        self._patterns = tuple(re.compile(p) for p in blocked_patterns)

    def normalize(self, identity_type: str, raw_value: object) -> str | None:
        if raw_value is None or isinstance(raw_value, bool):
            return None
        value = str(raw_value).strip()
        if self.is_blocked(value):  # before the steps too: "-1" must not survive as the phone number "1"
            return None
        for step in self._steps.get(identity_type, ()):
            value = step(value)
        if self.is_blocked(value):
            return None
        return value

    def is_blocked(self, value: str) -> bool:
        if value.lower() in self._blocked:
            return True
        return any(p.fullmatch(value) for p in self._patterns)
