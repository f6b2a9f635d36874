"""OpenDSR v3 data subject requests (reference §7) as plain data, and the validation of a request body.

Pure: no I/O, no graph. Every problem is a BadRequest naming the field (`subject_identities.email.encoding`).
Identity types are accepted in the spellings controllers already use for mParticle: the DSR v3 list (`email`,
`controller_customer_id`, `mpid`, `other`..`other10`, `mobile_number`, `phone_number_2/3`, device ids such as
`ios_advertising_id`), the Events API and Profile API names (`customer_id`, `other_id_2`, `android_id`,
`ios_idfv`...) and the IDSync wire keys; each maps to one IDSync wire key, the spelling the store uses.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from engine.errors import BadRequest
from engine.event_batches import DEVICE_IDENTITY_KEYS, USER_IDENTITY_KEYS
from engine.identity_types import ALL_IDENTITY_TYPES

API_VERSION = "3.0"
REGULATIONS = ("gdpr", "ccpa")
REQUEST_TYPES = ("erasure", "access", "portability")
PENDING, IN_PROGRESS, COMPLETED, CANCELLED = "pending", "in_progress", "completed", "cancelled"
FINAL_STATUSES = (COMPLETED, CANCELLED)
ENCODINGS = ("raw",)  # reference §7: raw ids only
MAX_IDENTITIES = 50
MAX_CALLBACK_URLS = 10
MAX_URL_LENGTH = 2048
MAX_GROUP_ID_LENGTH = 256
MAX_VALUE_LENGTH = 4096
MPID = "mpid"

# The names discovery advertises (the DSR v3 list plus the device ids of OpenDSR §5.1) -> IDSync wire key.
ADVERTISED_TYPES: dict[str, str] = {
    "email": "email", "controller_customer_id": "customerid", "customer_id": "customerid",
    "other": "other", **{f"other{n}": f"other{n}" for n in range(2, 11)},
    "mobile_number": "mobile_number", "phone_number_2": "phone_number_2", "phone_number_3": "phone_number_3",
    "facebook": "facebook", "twitter": "twitter", "google": "google", "microsoft": "microsoft", "yahoo": "yahoo",
    "facebook_custom_audience_id": "facebookcustomaudienceid",
    "android_advertising_id": "android_aaid", "android_id": "android_uuid", "ios_advertising_id": "ios_idfa",
    "ios_vendor_id": "ios_idfv", "fire_advertising_id": "fire_aid", "roku_advertising_id": "roku_aid",
    "roku_publisher_id": "roku_publisher_id", "push_token": "push_token", "amp_id": "amp_id",
}
# Other spellings accepted too: Events API user_identities and device_info keys, mp_deviceid, IDSync wire keys.
_OTHER_SPELLINGS: dict[str, str] = {
    **USER_IDENTITY_KEYS, **DEVICE_IDENTITY_KEYS, "mp_deviceid": "device_application_stamp",
    **{t: t for t in ALL_IDENTITY_TYPES},
}


def wire_type(dsr_type: str) -> str | None:
    """The IDSync wire key a DSR identity type names, or None when idmesh has no such type."""
    return ADVERTISED_TYPES.get(dsr_type) or _OTHER_SPELLINGS.get(dsr_type)


@dataclass(frozen=True)
class SubjectIdentity:
    dsr_type: str          # as the controller spelled it
    wire_type: str | None  # None for mpid
    value: str


@dataclass(frozen=True)
class NewRequest:
    """A validated POST /v3/requests body."""

    subject_request_id: str
    regulation: str
    request_type: str
    submitted_ms: int
    skip_waiting_period: bool
    identities: tuple[SubjectIdentity, ...]
    status_callback_urls: tuple[str, ...]
    group_id: str | None


@dataclass
class DsrRecord:
    """One stored request. `identities` (DSR type -> raw value) are kept only until the request reaches a final
    status; `mpid` is the profile it concerns, cleared once that profile is erased."""

    workspace_id: str
    subject_request_id: str
    regulation: str
    request_type: str
    status: str
    group_id: str | None
    submitted_ms: int
    received_ms: int
    process_after_ms: int
    identities: dict[str, str] | None
    identity_types: list[str]
    mpid: int | None
    status_callback_urls: list[str]
    results_count: int | None = None
    updated_ms: int = 0
    completed_ms: int | None = None

    def subject_identities(self) -> tuple[SubjectIdentity, ...]:
        return tuple(SubjectIdentity(t, None if t == MPID else wire_type(t), v) for t, v in (self.identities or {}).items())


def canonical_request_id(value: Any, field_name: str = "subject_request_id") -> str:
    """A UUID in its lowercase hyphenated form (OpenDSR: GUIDs are lowercase v4)."""
    if not isinstance(value, str):
        raise BadRequest(f"{field_name} must be a UUID string", field=field_name)
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise BadRequest(f"{field_name} must be a UUID", field=field_name) from None


def parse_request(body: Any) -> NewRequest:
    if not isinstance(body, Mapping):
        raise BadRequest("the body must be a JSON object", field="body")
    api_version = body.get("api_version", API_VERSION)
    if api_version != API_VERSION:
        raise BadRequest(f"api_version must be \"{API_VERSION}\"", field="api_version")
    regulation = _choice(body, "regulation", REGULATIONS)
    request_type = _choice(body, "subject_request_type", REQUEST_TYPES)
    skip = body.get("skip_waiting_period", False)
    if not isinstance(skip, bool):
        raise BadRequest("skip_waiting_period must be true or false", field="skip_waiting_period")
    extensions = body.get("extensions")
    if extensions is not None and not isinstance(extensions, Mapping):
        raise BadRequest("extensions must be an object", field="extensions")
    return NewRequest(
        subject_request_id=canonical_request_id(body.get("subject_request_id")),
        regulation=regulation,
        request_type=request_type,
        submitted_ms=_rfc3339_ms(body.get("submitted_time"), "submitted_time"),
        skip_waiting_period=skip,
        identities=_identities(body.get("subject_identities")),
        status_callback_urls=_callback_urls(body.get("status_callback_urls")),
        group_id=_group_id(body.get("group_id")),
    )


def _choice(body: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    value = body.get(key)
    if value not in allowed:
        raise BadRequest(f"{key} must be one of {', '.join(allowed)}", field=key)
    return value


def _rfc3339_ms(value: Any, path: str) -> int:
    if not isinstance(value, str):
        raise BadRequest(f"{path} is required: an RFC 3339 date-time such as 2026-11-23T10:00:00Z", field=path)
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadRequest(f"{path} must be an RFC 3339 date-time such as 2026-11-23T10:00:00Z", field=path) from None
    if parsed.tzinfo is None:
        raise BadRequest(f"{path} must carry a time zone (Z or +hh:mm)", field=path)
    return int(parsed.timestamp() * 1000)


def _identities(raw: Any) -> tuple[SubjectIdentity, ...]:
    path = "subject_identities"
    if not isinstance(raw, Mapping) or not raw:
        raise BadRequest(f"{path} must be a non-empty object keyed by identity type: "
                         '{"email": {"value": "...", "encoding": "raw"}}', field=path)
    if len(raw) > MAX_IDENTITIES:
        raise BadRequest(f"{path} holds {len(raw)} identities; at most {MAX_IDENTITIES} are accepted", field=path)
    if MPID in raw and len(raw) > 1:
        raise BadRequest(f"{path}.mpid excludes every other identity: send the mpid alone", field=f"{path}.mpid")
    seen: dict[str, str] = {}
    parsed = []
    for dsr_type, entry in raw.items():
        where = f"{path}.{dsr_type}"
        wire = None if dsr_type == MPID else wire_type(dsr_type)
        if dsr_type != MPID and wire is None:
            raise BadRequest(f"{where}: {dsr_type!r} is not a supported identity type (see GET /v3/discovery)",
                             field=where)
        if wire is not None and wire in seen:
            raise BadRequest(f"{where} names the same identity type as {path}.{seen[wire]}", field=where)
        if not isinstance(entry, Mapping):
            raise BadRequest(f"{where} must be an object with value and encoding", field=where)
        encoding = entry.get("encoding", "raw")
        if encoding not in ENCODINGS:
            raise BadRequest(f"{where}.encoding must be raw: hashed identities cannot be matched", field=f"{where}.encoding")
        value = entry.get("value")
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip() or len(value) > MAX_VALUE_LENGTH:
            raise BadRequest(f"{where}.value must be a non-empty string", field=f"{where}.value")
        if dsr_type == MPID:
            _mpid(value, f"{where}.value")
        if wire is not None:
            seen[wire] = dsr_type
        parsed.append(SubjectIdentity(dsr_type, wire, value))
    return tuple(parsed)


def _mpid(value: str, path: str) -> int:
    try:
        mpid = int(value)
    except ValueError:
        mpid = 0
    if mpid == 0 or not -(1 << 63) <= mpid < (1 << 63):
        raise BadRequest(f"{path} must be a non-zero 64-bit MPID", field=path)
    return mpid


def mpid_of(identity: SubjectIdentity) -> int:
    return _mpid(identity.value, f"subject_identities.{identity.dsr_type}.value")


def _callback_urls(raw: Any) -> tuple[str, ...]:
    path = "status_callback_urls"
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_CALLBACK_URLS:
        raise BadRequest(f"{path} must be a list of at most {MAX_CALLBACK_URLS} URLs", field=path)
    for i, url in enumerate(raw):
        where = f"{path}[{i}]"
        if not isinstance(url, str) or len(url) > MAX_URL_LENGTH:
            raise BadRequest(f"{where} must be an http or https URL", field=where)
        try:
            parts = urlsplit(url)
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest(f"{where} must be an http or https URL", field=where)
    return tuple(dict.fromkeys(raw))  # the same URL twice gets each callback once


def _group_id(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw or len(raw) > MAX_GROUP_ID_LENGTH:
        raise BadRequest(f"group_id must be a string of 1 to {MAX_GROUP_ID_LENGTH} characters", field="group_id")
    return raw


def rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
