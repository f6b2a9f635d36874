"""Validating one Events API batch (reference §2, spec B§7). Pure: no I/O, no graph.

Every problem is a BadRequest naming the field (`events[3].data.event_name`), so a bad batch changes
nothing. Fields the schema does not name are kept as they came: the stored envelope is the batch minus its
events, and each event is stored whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.errors import BadRequest

EVENT_TYPES = frozenset({
    "custom_event", "commerce_event", "screen_view", "session_start", "session_end", "crash_report", "opt_out",
    "first_run", "application_state_transition", "push_registration", "push_message", "network_performance",
    "breadcrumb", "profile", "uninstall", "user_attribute_change", "user_identity_change", "media",
})
ENVIRONMENTS = frozenset({"production", "development"})

# Events API spellings of user_identities (spec B§7) -> IDSync wire keys; both customer id spellings occur.
USER_IDENTITY_KEYS: dict[str, str] = {
    "customer_id": "customerid", "customerid": "customerid", "email": "email", "other": "other",
    "facebook": "facebook", "twitter": "twitter", "google": "google", "microsoft": "microsoft", "yahoo": "yahoo",
    "alias": "alias", "facebook_custom_audience_id": "facebookcustomaudienceid", "mobile_number": "mobile_number",
    "phone_number_2": "phone_number_2", "phone_number_3": "phone_number_3",
    **{f"other_id_{n}": f"other{n}" for n in range(2, 11)},
}
DEVICE_IDENTITY_KEYS: dict[str, str] = {
    "ios_advertising_id": "ios_idfa", "ios_idfv": "ios_idfv", "android_advertising_id": "android_aaid",
    "android_uuid": "android_uuid", "push_token": "push_token", "roku_advertising_id": "roku_aid",
    "roku_publisher_id": "roku_publisher_id", "fire_advertising_id": "fire_aid", "amp_id": "amp_id",
}

MAX_ATTRIBUTE_NAME = 256
MAX_ATTRIBUTE_STRING = 4096
MAX_ATTRIBUTE_LIST = 1000
# Up to 2**53 (the year 287,396) a unix time in ms is exact as a double, and the views read timestamps through
# DOUBLE into BIGINT columns: a larger one would be stored and then break every read and fold of its rows.
MAX_TIMESTAMP_MS = 1 << 53


@dataclass
class ParsedBatch:
    mpid: int | None
    identities: dict[str, str]          # IDSync wire key -> raw value, from user_identities, device_info, mp_deviceid
    environment: str
    batch_id: str | None
    source_request_id: str | None
    timestamp_ms: int | None
    events: list[Any]
    user_attributes: dict[str, Any]
    deleted_user_attributes: list[str]
    consent_state: dict[str, Any] | None
    envelope: dict[str, Any]            # the batch without its events, for the batches table
    attribute_changes: list[AttributeChange]


@dataclass(frozen=True)
class AttributeChange:
    """A `user_attribute_change` event: how the web SDK reports a removed attribute (it never sends
    `deleted_user_attributes`), so it changes the profile like the envelope's attributes do."""

    name: str
    value: Any
    deleted: bool
    timestamp_ms: int | None


def parse_batch(batch: Any) -> ParsedBatch:
    if not isinstance(batch, Mapping):
        raise BadRequest("a batch must be a JSON object", field="batch")
    events = _optional(batch, "events", list, "a list of events") or []
    for index, event in enumerate(events):
        if not _plainly_valid(event):
            _check_event(event, f"events[{index}]")
    attributes = _user_attributes(batch)
    deleted = _deleted_attributes(batch, attributes)
    return ParsedBatch(
        mpid=_mpid(batch.get("mpid")),
        identities=_identities(batch),
        environment=_environment(batch),
        batch_id=_identifier(batch, "batch_id"),
        source_request_id=_identifier(batch, "source_request_id"),
        timestamp_ms=_timestamp(batch.get("timestamp_unixtime_ms"), "timestamp_unixtime_ms"),
        events=events,
        user_attributes=attributes,
        deleted_user_attributes=deleted,
        consent_state=_consent(batch.get("consent_state")),
        envelope={k: v for k, v in batch.items() if k != "events"},
        attribute_changes=[_attribute_change(event, f"events[{index}].data") for index, event in enumerate(events)
                           if event.get("event_type") == "user_attribute_change" and event.get("data") is not None],
    )


def _attribute_change(event: Mapping[str, Any], path: str) -> AttributeChange:
    data = event["data"]
    name = data.get("user_attribute_name")
    if not isinstance(name, str) or not name or len(name) > MAX_ATTRIBUTE_NAME:
        raise BadRequest(f"{path}.user_attribute_name must be an attribute name", field=f"{path}.user_attribute_name")
    deleted = data.get("deleted") is True
    value = data.get("new")
    if not deleted:
        _check_attribute_value(value, f"{path}.new")
    timestamp = _timestamp(data.get("timestamp_unixtime_ms"), f"{path}.timestamp_unixtime_ms")
    return AttributeChange(name, value, deleted, timestamp)


def _optional(container: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str,
              path: str = "") -> Any:
    value = container.get(key)
    if value is not None and not isinstance(value, kind):
        raise BadRequest(f"{path}{key} must be {what}", field=f"{path}{key}")
    return value


def _plainly_valid(event: Any) -> bool:
    """True only for event shapes `_check_event` accepts, decided without building its field paths: ingest
    checks every event, and those paths plus the generic checks took about 40% of parse_batch's time (3.2 to
    1.7 µs per event on bench/ingest.py's batches, with the lazy device_info paths below). Anything unusual
    (another Mapping type, a float timestamp) answers False and goes through `_check_event`, which accepts it
    or names the problem."""
    if type(event) is not dict:
        return False
    event_type = event.get("event_type")
    data = event.get("data")
    if type(event_type) is not str or event_type not in EVENT_TYPES or type(data) is not dict:
        return False
    timestamp = data.get("timestamp_unixtime_ms")
    if timestamp is not None and (type(timestamp) is not int or not 0 <= timestamp <= MAX_TIMESTAMP_MS):
        return False
    attributes = data.get("custom_attributes")
    if attributes is not None and type(attributes) is not dict:
        return False
    if event_type == "custom_event":
        kind = data.get("custom_event_type")
        return _plain_text(data.get("event_name")) and (kind is None or type(kind) is str)
    if event_type == "screen_view":
        return _plain_text(data.get("screen_name"))
    if event_type == "commerce_event":
        return _plain_product_action(data.get("product_action"))
    return True


def _plain_text(value: Any) -> bool:
    return type(value) is str and not value.isspace() and value != ""  # what `_required_text` accepts


def _plain_product_action(action: Any) -> bool:
    if action is None:
        return True
    if type(action) is not dict or not _plain_text(action.get("action")):
        return False
    products = action.get("products")
    return products is None or (type(products) is list and all(type(p) is dict for p in products))


def _check_event(event: Any, path: str) -> None:
    if not isinstance(event, Mapping):
        raise BadRequest(f"{path} must be an object with event_type and data", field=path)
    event_type = event.get("event_type")
    if not isinstance(event_type, str) or event_type not in EVENT_TYPES:
        raise BadRequest(f"{path}.event_type {event_type!r} is not an Events API event type",
                         field=f"{path}.event_type")
    data = event.get("data")
    if data is None:
        if event_type in ("custom_event", "screen_view"):
            raise BadRequest(f"{path}.data is required for {event_type}", field=f"{path}.data")
        return
    if not isinstance(data, Mapping):
        raise BadRequest(f"{path}.data must be an object", field=f"{path}.data")
    data_path = f"{path}.data."
    _timestamp(data.get("timestamp_unixtime_ms"), f"{data_path}timestamp_unixtime_ms")
    _optional(data, "custom_attributes", Mapping, "an object", data_path)
    if event_type == "custom_event":
        _required_text(data, "event_name", data_path)
        _optional(data, "custom_event_type", str, "a string", data_path)
    elif event_type == "screen_view":
        _required_text(data, "screen_name", data_path)
    elif event_type == "commerce_event":
        action = _optional(data, "product_action", Mapping, "an object", data_path)
        if action is not None:
            _required_text(action, "action", f"{data_path}product_action.")
            products = _optional(action, "products", list, "a list", f"{data_path}product_action.")
            for i, product in enumerate(products or []):
                if not isinstance(product, Mapping):
                    raise BadRequest(f"{data_path}product_action.products[{i}] must be an object",
                                     field=f"{data_path}product_action.products[{i}]")


def _required_text(data: Mapping[str, Any], key: str, path: str) -> None:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{path}{key} is required and must be a non-empty string", field=f"{path}{key}")


def _timestamp(value: Any, path: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_TIMESTAMP_MS:
        raise BadRequest(f"{path} must be a unix time in milliseconds", field=path)
    return int(value)


def _mpid(value: Any) -> int | None:
    """MPIDs come as numbers (server SDKs) or strings (the web SDK); 0 and null mean none."""
    if value is None:
        return None
    try:
        mpid = int(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    except ValueError:
        mpid = None
    if mpid is None or not -(1 << 63) <= mpid < (1 << 63):
        raise BadRequest("mpid must be a 64-bit integer or its decimal string", field="mpid")
    return mpid or None


def _identifier(batch: Mapping[str, Any], key: str) -> str | None:
    value = batch.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise BadRequest(f"{key} must be a string or an integer", field=key)
    return str(value)


def _environment(batch: Mapping[str, Any]) -> str:
    environment = batch.get("environment") or "production"
    if not isinstance(environment, str) or environment not in ENVIRONMENTS:
        raise BadRequest("environment must be production or development", field="environment")
    return environment


def _identities(batch: Mapping[str, Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    user_identities = _optional(batch, "user_identities", Mapping, "an object of identity type -> value") or {}
    for key, value in user_identities.items():
        wire = USER_IDENTITY_KEYS.get(key)
        if wire is None:
            raise BadRequest(f"user_identities.{key} is not an Events API identity type",
                             field=f"user_identities.{key}")
        _add_identity(found, wire, value, f"user_identities.{key}")
    device_info = _optional(batch, "device_info", Mapping, "an object") or {}
    for key, wire in DEVICE_IDENTITY_KEYS.items():
        value = device_info.get(key)
        if value is not None:  # most of the nine are absent: no field path for them
            _add_identity(found, wire, value, f"device_info.{key}")
    _add_identity(found, "device_application_stamp", batch.get("mp_deviceid"), "mp_deviceid")
    return found


def _add_identity(found: dict[str, str], wire: str, value: Any, path: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadRequest(f"{path} must be a string", field=path)
    found[wire] = str(value)


def _user_attributes(batch: Mapping[str, Any]) -> dict[str, Any]:
    attributes = _optional(batch, "user_attributes", Mapping, "an object of name -> value") or {}
    for name, value in attributes.items():
        path = f"user_attributes.{name}"
        if not name or len(name) > MAX_ATTRIBUTE_NAME:
            raise BadRequest(f"user attribute names must have 1 to {MAX_ATTRIBUTE_NAME} characters", field=path)
        _check_attribute_value(value, path)
    return dict(attributes)


def _check_attribute_value(value: Any, path: str) -> None:
    if isinstance(value, list):
        if len(value) > MAX_ATTRIBUTE_LIST:
            raise BadRequest(f"{path} holds more than {MAX_ATTRIBUTE_LIST} values", field=path)
        for item in value:
            _check_attribute_scalar(item, path, allow_null=False)
    else:
        _check_attribute_scalar(value, path, allow_null=True)


def _check_attribute_scalar(value: Any, path: str, allow_null: bool) -> None:
    if value is None and allow_null:
        return  # a tag
    if not isinstance(value, (str, int, float, bool)):
        raise BadRequest(f"{path} must be a string, number, boolean, list of those, or null", field=path)
    if isinstance(value, str) and len(value) > MAX_ATTRIBUTE_STRING:
        raise BadRequest(f"{path} is longer than {MAX_ATTRIBUTE_STRING} characters", field=path)


def _deleted_attributes(batch: Mapping[str, Any], attributes: Mapping[str, Any]) -> list[str]:
    deleted = _optional(batch, "deleted_user_attributes", list, "a list of attribute names") or []
    for index, name in enumerate(deleted):
        path = f"deleted_user_attributes[{index}]"
        if not isinstance(name, str) or not name:
            raise BadRequest(f"{path} must be an attribute name", field=path)
        if name in attributes:
            raise BadRequest(f"{path}: {name!r} is both set and deleted in this batch", field=path)
    return list(deleted)


def _consent(state: Any) -> dict[str, Any] | None:
    if state is None:
        return None
    if not isinstance(state, Mapping):
        raise BadRequest("consent_state must be an object with gdpr and/or ccpa", field="consent_state")
    for regulation, purposes in state.items():
        path = f"consent_state.{regulation}"
        if regulation not in ("gdpr", "ccpa"):
            raise BadRequest(f"{path}: regulation must be gdpr or ccpa", field=path)
        if purposes is None:
            continue
        if not isinstance(purposes, Mapping):
            raise BadRequest(f"{path} must be an object of purpose -> consent", field=path)
        if regulation == "ccpa" and set(purposes) - {"data_sale_opt_out"}:
            raise BadRequest(f"{path}: the only CCPA purpose is data_sale_opt_out", field=path)
        for purpose, answer in purposes.items():
            where = f"{path}.{purpose}"
            if not isinstance(answer, Mapping):
                raise BadRequest(f"{where} must be an object", field=where)
            if not isinstance(answer.get("consented"), bool):
                raise BadRequest(f"{where}.consented is required and must be a boolean", field=f"{where}.consented")
            if _timestamp(answer.get("timestamp_unixtime_ms"), f"{where}.timestamp_unixtime_ms") is None:
                raise BadRequest(f"{where}.timestamp_unixtime_ms is required", field=f"{where}.timestamp_unixtime_ms")
    return dict(state)
