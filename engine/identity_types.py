"""The identity type catalogue: IDSync wire keys, which of them name devices, and the default priority.

IDSync requests, settings and the store all use the IDSync wire spelling (spec B§7), e.g. `customerid`,
`ios_idfv`, `device_application_stamp`.
"""

from __future__ import annotations

USER_IDENTITY_TYPES: tuple[str, ...] = (
    "customerid", "email", "other", "facebook", "twitter", "google", "microsoft", "yahoo", "alias",
    "facebookcustomaudienceid", "other2", "other3", "other4", "other5", "other6", "other7", "other8",
    "other9", "other10", "mobile_number", "phone_number_2", "phone_number_3",
)

DEVICE_IDENTITY_TYPES: tuple[str, ...] = (
    "ios_idfa", "ios_idfv", "android_aaid", "android_uuid", "push_token", "roku_aid", "roku_publisher_id",
    "fire_aid", "amp_id", "device_application_stamp",
)

ALL_IDENTITY_TYPES: frozenset[str] = frozenset(USER_IDENTITY_TYPES + DEVICE_IDENTITY_TYPES)

# G-DEF's documented hierarchy in wire spelling (Microsoft ad/publisher ids have no wire key). The types the
# documented list does not rank come after it, device stamp last: it is the weakest signal of all.
_DOCUMENTED_ORDER = (
    "customerid", "mobile_number", "email", "other", "facebook", "google", "twitter", "microsoft", "yahoo",
    "ios_idfa", "ios_idfv", "android_aaid", "android_uuid", "roku_aid", "roku_publisher_id",
)
DEFAULT_PRIORITY: tuple[str, ...] = (
    _DOCUMENTED_ORDER
    + tuple(t for t in USER_IDENTITY_TYPES + DEVICE_IDENTITY_TYPES
            if t not in _DOCUMENTED_ORDER and t != "device_application_stamp")
    + ("device_application_stamp",)
)


def is_device_type(identity_type: str) -> bool:
    return identity_type in DEVICE_IDENTITY_TYPES
