"""The Profile API view of one person (spec B§11): identities, user attributes, memberships, attribution.

The profile must exist in the workspace's identity graph (in memory); its details are read from the views,
which include the write journal, so a profile shows everything acknowledged. Identity types use the Profile
API names (`customer_id`, `other_id_2`, `android_id`, `google_advertising_id`...), values as the client sent
them. User attribute values are strings or lists of strings, as mParticle returns them; null stays null.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import duckdb
import orjson

from engine.errors import BadRequest, NotFound
from engine.graph import IdentityGraph
from engine.identity_types import is_device_type
from engine.workspaces import Workspace

PROFILE_FIELDS = ("device_identities", "user_identities", "user_attributes", "audience_memberships", "attribution")

# IDSync wire key -> Profile API name, where they differ (spec B§7 table, last column)
_PROFILE_API_NAMES = {
    "customerid": "customer_id", "facebookcustomaudienceid": "facebook_custom_audience_id",
    **{f"other{n}": f"other_id_{n}" for n in range(2, 11)},
    "android_uuid": "android_id", "android_aaid": "google_advertising_id", "ios_idfa": "ios_advertising_id",
    "ios_idfv": "ios_vendor_id", "roku_aid": "roku_advertising_id", "fire_aid": "fire_advertising_id",
}
_WIRE_NAMES = {name: wire for wire, name in _PROFILE_API_NAMES.items()}


def profile_api_name(identity_type: str) -> str:
    return _PROFILE_API_NAMES.get(identity_type, identity_type)


def wire_name(profile_api_type: str) -> str:
    return _WIRE_NAMES.get(profile_api_type, profile_api_type)


def parse_fields(fields: str | None) -> tuple[str, ...]:
    if not fields:
        raise BadRequest(f"fields is required: a comma list of {', '.join(PROFILE_FIELDS)}", field="fields")
    wanted = tuple(f.strip() for f in fields.split(",") if f.strip())
    unknown = [f for f in wanted if f not in PROFILE_FIELDS]
    if unknown or not wanted:
        raise BadRequest(f"fields: unknown {', '.join(unknown) or 'empty list'}; choose from "
                         f"{', '.join(PROFILE_FIELDS)}", field="fields")
    return wanted


def resolve_immutable(workspace: Workspace, graph: IdentityGraph, identity: Any) -> int:
    """The MPID holding an identity that names one profile: an immutable or unique type of the workspace
    (customer_id by default), e.g. {"type": "customer_id", "value": "12345"}."""
    if not isinstance(identity, dict) or not isinstance(identity.get("type"), str):
        raise BadRequest("identity must be an object with type and value", field="identity")
    identity_type = wire_name(identity["type"])
    lookup_types = workspace.rules.immutable_ids | workspace.rules.unique_ids
    if identity_type not in lookup_types:
        raise BadRequest(f"identity.type {identity['type']} does not name one profile in this workspace; use "
                         f"{', '.join(sorted(profile_api_name(t) for t in lookup_types))}", field="identity.type")
    raw = identity.get("value")
    if not isinstance(raw, (str, int)) or isinstance(raw, bool):
        raise BadRequest("identity.value must be a string", field="identity.value")
    value = workspace.normalizer.normalize(identity_type, raw)
    holders = graph.holders(identity_type, value) if value is not None else ()
    if len(holders) != 1:
        raise NotFound(f"no profile holds {identity['type']} {raw!r}")
    return holders[0]


def read_profile(connection: duckdb.DuckDBPyConnection, workspace: Workspace, graph: IdentityGraph, mpid: int,
                 fields: Iterable[str]) -> dict[str, Any]:
    record = graph.get(mpid)
    if record is None:
        raise NotFound(f"no profile with mpid {mpid} in this workspace")
    cursor = connection.cursor()  # its own connection: safe beside the writer thread
    try:
        row = cursor.execute("""SELECT created_ms, last_seen_ms FROM profiles WHERE scope = ? AND mpid = ?""",
                             [workspace.scope, mpid]).fetchone()
        created_ms, last_seen_ms = row if row else (record.created_ms, record.last_seen_ms)
        body: dict[str, Any] = {
            "mpid": mpid, "created_timestamp_ms": created_ms, "last_stored_timestamp_ms": last_seen_ms,
            "is_opted_out": _is_opted_out(cursor, workspace, mpid), "limit_ad_tracking": None,
        }
        wanted = set(fields)
        if wanted & {"device_identities", "user_identities"}:
            identities = cursor.execute("""SELECT identity_type, raw_value FROM identities WHERE scope = ? AND mpid = ?
                                           ORDER BY identity_type, raw_value""", [workspace.scope, mpid]).fetchall()
            if "device_identities" in wanted:
                body["device_identities"] = _identity_list(t for t in identities if is_device_type(t[0]))
            if "user_identities" in wanted:
                body["user_identities"] = _identity_list(t for t in identities if not is_device_type(t[0]))
        if "user_attributes" in wanted:
            body["account_userattributes"] = None
            body["user_attributes"] = _attributes(cursor, workspace, mpid)
        if "audience_memberships" in wanted:
            body["audience_memberships"] = []  # api/profile_routes.py fills it: audiences sit above engine
        if "attribution" in wanted:
            body["attribution"] = _install_attribution(cursor, workspace, mpid)
        return body
    finally:
        cursor.close()


def _identity_list(rows: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"type": profile_api_name(t), "encoding": "none", "value": v} for t, v in rows]


def _attributes(cursor: duckdb.DuckDBPyConnection, workspace: Workspace, mpid: int) -> dict[str, Any]:
    rows = cursor.execute("SELECT name, value FROM user_attributes WHERE workspace_id = ? AND mpid = ? ORDER BY name",
                          [workspace.id, mpid]).fetchall()
    return {name: profile_value(orjson.loads(value) if value is not None else None) for name, value in rows}


def profile_value(value: Any) -> Any:
    if isinstance(value, list):
        return [_as_text(v) for v in value]
    return None if value is None else _as_text(value)


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def _is_opted_out(cursor: duckdb.DuckDBPyConnection, workspace: Workspace, mpid: int) -> bool:
    row = cursor.execute("""SELECT data->>'is_opted_out' FROM events
                            WHERE workspace_id = ? AND mpid = ? AND event_type = 'opt_out'
                            ORDER BY timestamp_ms DESC LIMIT 1""", [workspace.id, mpid]).fetchone()
    return bool(row) and row[0] == "true"


def _install_attribution(cursor: duckdb.DuckDBPyConnection, workspace: Workspace, mpid: int) -> dict[str, Any] | None:
    """B§11: install attribution = publisher + campaign of the first `attribution` custom event."""
    row = cursor.execute("""SELECT custom_attributes->>'publisher', custom_attributes->>'campaign', timestamp_ms
                            FROM events WHERE workspace_id = ? AND mpid = ? AND event_type = 'custom_event'
                              AND custom_event_type = 'attribution' AND event_name = 'attribution'
                            ORDER BY timestamp_ms LIMIT 1""", [workspace.id, mpid]).fetchone()
    if row is None:
        return None
    return {"publisher": row[0], "campaign": row[1], "timestamp_ms": row[2]}
