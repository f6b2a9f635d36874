"""Connections of an audience to an output (docs/delivery.md, "Connection"): the model, settings validation, and
the registry kept in memory and written through the group-commit writer like audiences/registry.py.

Settings are plain JSON, stored with every default filled in, so what a connection does can be read off its row
(and off the `connections` view) without knowing this module's defaults. Credentials are sealed with the server
master key before they reach the database, kept unsealed in memory only inside `Credentials` (whose repr shows
key names, never values), and answered as `{"api_key": "set"}`.

Plans validate and return the new state with the batch that makes it durable; the caller commits and then
`remember`s, so memory never holds what a failed commit did not store (api/connection_routes.py serialises plans
and commits with a lock).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import duckdb

from audiences import fanout
from engine.errors import BadRequest, NotFound
from engine.secrets import MasterKey
from engine.store import now_ms
from engine.writer import WriteBatch

OUTPUTS = ("braze", "facebook", "webhook", "kafka")
STATUSES = ("active", "inactive")

# Braze "Send Segments As" (mParticle's seven modes): a single string attribute, a single array attribute, one
# boolean attribute per audience, and the combinations of the three.
BRAZE_SEGMENT_MODES = ("single_string", "single_array", "per_segment", "array_and_string", "array_and_per_segment",
                       "string_and_per_segment", "all")
FACEBOOK_FILE_SOURCES = ("USER_PROVIDED_ONLY", "PARTNER_PROVIDED_ONLY", "BOTH_USER_AND_PARTNER_PROVIDED")
KAFKA_SECURITY = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

# Upload thresholds per output: flush when the oldest pending delta is this old or this many are queued. Facebook
# uploads in bulk (mParticle: 3 hours or 75,000 messages); Braze is near real time.
DEFAULT_UPLOAD: dict[str, dict[str, int]] = {
    "facebook": {"max_age_seconds": 3 * 3600, "max_queued": 75_000},
    "braze": {"max_age_seconds": 60, "max_queued": 75},
    "webhook": {"max_age_seconds": 5, "max_queued": 500},
    "kafka": {"max_age_seconds": 5, "max_queued": 500},
}
MAX_BATCH = {"braze": 75, "facebook": 10_000, "webhook": 10_000, "kafka": 10_000}
DEFAULT_BATCH = {"braze": 75, "facebook": 10_000, "webhook": 500, "kafka": 500}
DEFAULT_BASE_URL = {"facebook": "https://graph.facebook.com"}

# Credential names per output: required ones, then optional ones.
CREDENTIALS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "braze": (("api_key",), ()),
    "facebook": (("access_token",), ("app_secret",)),
    "webhook": (("secret",), ()),
    "kafka": ((), ("username", "password")),
}
# Answers show this instead of a credential; sent back in an update it keeps the stored value.
SET_MARKER = "set"

MAX_NAME = 256
MAX_TEXT = 2048
MAX_CREDENTIAL = 8192
MAX_LIST = 100
_FACEBOOK_API_VERSION = re.compile(r"v\d{1,3}\.\d{1,2}")
_AD_ACCOUNT = re.compile(r"(act_)?\d{1,30}")
_BOOTSTRAP = re.compile(r"[A-Za-z0-9.\-\[\]:]+:\d{1,5}")
_ATTRIBUTE_NAME = re.compile(r"[^\x00-\x1f]{1,256}")

_COLUMNS = ("id, workspace_id, audience_id, output, name, status, settings, credentials_sealed, remote, created_ms, "
            "updated_ms")


class Credentials(Mapping[str, str]):
    """A connection's credentials in memory. Printing, logging or formatting one shows only which names are set."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self._values = dict(values or {})

    def __getitem__(self, name: str) -> str:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Credentials({', '.join(f'{k}=set' for k in sorted(self._values))})"

    __str__ = __repr__

    def public_json(self) -> dict[str, str]:
        return {name: SET_MARKER for name in sorted(self._values)}


@dataclass(frozen=True)
class Connection:
    id: int
    workspace_id: str
    audience_id: int
    output: str
    name: str
    status: str
    settings: dict[str, Any]          # as accepted, every default filled in
    credentials: Credentials = field(repr=False, compare=False)
    created_ms: int = 0
    updated_ms: int = 0
    remote: dict[str, Any] | None = None  # what the destination created for it (Facebook audience ids), None before

    # --- settings accessors: what the delivery modules read ------------------------------------------------
    @property
    def is_active(self) -> bool:
        return self.status == "active"

    @property
    def identity_types(self) -> tuple[str, ...]:
        """The identity types to send, in IDSync wire spelling (as `identities.identity_type` holds them)."""
        return tuple(fanout.wire_type(t) for t in self.settings["identity_types"])

    @property
    def base_url(self) -> str | None:
        return self.settings.get("base_url")

    @property
    def user_attributes(self) -> tuple[str, ...]:
        """User attributes forwarded with each add (Facebook's value attribute included when it is one)."""
        names = list(self.settings["forward_attributes"]["user"])
        value = self.value_attribute
        if value is not None and value[0] == "user" and value[1] not in names:
            names.append(value[1])
        return tuple(names)

    @property
    def calculated_attributes(self) -> tuple[int, ...]:
        """Calculated attribute ids forwarded with each add (Facebook's value attribute included when it is one)."""
        ids = list(self.settings["forward_attributes"]["calculated"])
        value = self.value_attribute
        if value is not None and value[0] == "calculated" and value[1] not in ids:
            ids.append(value[1])
        return tuple(ids)

    @property
    def require_gdpr_purpose(self) -> str | None:
        return self.settings["consent"]["require_gdpr_purpose"]

    @property
    def sampling_percent(self) -> int:
        return self.settings["sampling_percent"]

    @property
    def max_age_seconds(self) -> float:
        return self.settings["upload"]["max_age_seconds"]

    @property
    def max_queued(self) -> int:
        return self.settings["upload"]["max_queued"]

    @property
    def batch_size(self) -> int:
        return self.options["batch_size"]

    @property
    def options(self) -> dict[str, Any]:
        """The output's own block: settings["braze"], settings["facebook"], settings["webhook"] or settings["kafka"]."""
        return self.settings[self.output]

    @property
    def value_attribute(self) -> tuple[str, str | int] | None:
        """Facebook value-based audiences: ("user", name) or ("calculated", id) of the value; None otherwise."""
        if self.output != "facebook" or self.options.get("value_based") is None:
            return None
        value = self.options["value_based"]
        if "calculated_attribute_id" in value:
            return ("calculated", value["calculated_attribute_id"])
        return ("user", value["user_attribute"])

    def summary_json(self) -> dict[str, Any]:
        """An entry of the audience's `connected_outputs`."""
        return {"id": self.id, "output": self.output, "name": self.name, "status": self.status}

    def public_json(self) -> dict[str, Any]:
        """The Platform API's answer: everything but the credentials' values."""
        return {"id": self.id, "audience_id": self.audience_id, "output": self.output, "name": self.name,
                "status": self.status, "settings": self.settings, "credentials": self.credentials.public_json(),
                "remote": self.remote, "created_timestamp_ms": self.created_ms,
                "last_modified_timestamp_ms": self.updated_ms}


# --- validation --------------------------------------------------------------------------------------------------
def _object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise BadRequest(f"{name} must be an object", field=name)
    return dict(value)


def _no_unknown(value: Mapping[str, Any], allowed: tuple[str, ...], name: str) -> None:
    unknown = sorted(k for k in value if k not in allowed)
    if unknown:
        raise BadRequest(f"{name}: unknown {', '.join(map(str, unknown))}; allowed: {', '.join(allowed)}",
                         field=f"{name}.{unknown[0]}")


def _text(value: Any, name: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > limit or "\x00" in value:
        raise BadRequest(f"{name} must be a non-empty string of at most {limit} characters", field=name)
    return value


def _integer(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}", field=name)
    return value


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"{name} must be a number from {low:g} to {high:g}", field=name)
    return value


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false", field=name)
    return value


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise BadRequest(f"{name} must be one of {', '.join(choices)}", field=name)
    return value


def _url(value: Any, name: str) -> str:
    text = _text(value, name)
    try:
        parts = urlsplit(text)
        port_ok = parts.port is None or 0 < parts.port
    except ValueError:
        port_ok = False
        parts = None
    if parts is None or not port_ok or parts.scheme not in ("http", "https") or not parts.hostname \
            or parts.username or parts.password or parts.query or parts.fragment or any(c.isspace() for c in text):
        raise BadRequest(f"{name} must be an http or https URL without credentials, query or fragment", field=name)
    return text.rstrip("/") if name.endswith("base_url") else text


def _string_list(value: Any, name: str, limit: int = MAX_LIST) -> list[str]:
    if not isinstance(value, list) or len(value) > limit:
        raise BadRequest(f"{name} must be a list of at most {limit} strings", field=name)
    seen: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not _ATTRIBUTE_NAME.fullmatch(item):
            raise BadRequest(f"{name}[{i}] must be a string of 1 to 256 printable characters", field=f"{name}[{i}]")
        if item in seen:
            raise BadRequest(f"{name}[{i}]: {item!r} is listed twice", field=f"{name}[{i}]")
        seen.append(item)
    return seen


def _identity_types(value: Any, name: str) -> list[str]:
    types = _string_list(value, name)
    wires: list[str] = []
    for i, spelled in enumerate(types):
        wire = fanout.wire_type(spelled)
        if wire is None:
            raise BadRequest(f"{name}[{i}]: {spelled!r} is not an identity type", field=f"{name}[{i}]")
        if wire in wires:
            raise BadRequest(f"{name}[{i}]: {spelled!r} names an identity type listed already", field=f"{name}[{i}]")
        wires.append(wire)
    return types


def check_settings(output: str, settings: Any, known_ca: Any = None) -> dict[str, Any]:
    """The settings with every default filled in, or BadRequest naming the first field that is wrong.
    `known_ca(ca_id) -> bool`, when given, says whether a calculated attribute may be forwarded."""
    given = _object({} if settings is None else settings, "settings")
    common = ("base_url", "identity_types", "forward_attributes", "consent", "sampling_percent", "upload")
    _no_unknown(given, (*common, output), "settings")

    checked: dict[str, Any] = {}
    if given.get("base_url") is not None:
        if output in ("webhook", "kafka"):
            raise BadRequest(f"settings.base_url: a {output} connection names its destination in settings.{output}",
                             field="settings.base_url")
        checked["base_url"] = _url(given["base_url"], "settings.base_url")
    elif output == "braze":
        raise BadRequest("settings.base_url is required for braze: the REST endpoint of the Braze instance, e.g. "
                         "https://rest.iad-01.braze.com", field="settings.base_url")
    elif output in DEFAULT_BASE_URL:
        checked["base_url"] = DEFAULT_BASE_URL[output]

    block = _output_block(output, given.get(output), known_ca)
    types = _identity_types(given["identity_types"], "settings.identity_types") \
        if given.get("identity_types") is not None else fanout.default_identity_types(output, block)
    problem = fanout.identity_types_problem(output, [fanout.wire_type(t) or t for t in types], block)
    if problem is not None:
        raise BadRequest(f"settings.identity_types: {problem}", field="settings.identity_types")
    checked["identity_types"] = types

    forward = _object(given.get("forward_attributes") or {}, "settings.forward_attributes")
    _no_unknown(forward, ("user", "calculated"), "settings.forward_attributes")
    user = _string_list(forward.get("user") or [], "settings.forward_attributes.user")
    calculated = forward.get("calculated") or []
    if not isinstance(calculated, list) or len(calculated) > MAX_LIST:
        raise BadRequest(f"settings.forward_attributes.calculated must be a list of at most {MAX_LIST} calculated "
                         "attribute ids", field="settings.forward_attributes.calculated")
    for i, ca_id in enumerate(calculated):
        _ca_id(ca_id, f"settings.forward_attributes.calculated[{i}]", known_ca)
    if len(set(calculated)) != len(calculated):
        raise BadRequest("settings.forward_attributes.calculated lists an id twice",
                         field="settings.forward_attributes.calculated")
    checked["forward_attributes"] = {"user": user, "calculated": list(calculated)}

    consent = _object(given.get("consent") or {}, "settings.consent")
    _no_unknown(consent, ("exclude_ccpa_data_sale_opt_out", "require_gdpr_purpose"), "settings.consent")
    if consent.get("exclude_ccpa_data_sale_opt_out", True) is not True:
        raise BadRequest("settings.consent.exclude_ccpa_data_sale_opt_out cannot be turned off: profiles that opted "
                         "out of the sale of their data are never forwarded",
                         field="settings.consent.exclude_ccpa_data_sale_opt_out")
    purpose = consent.get("require_gdpr_purpose")
    if purpose is not None:
        purpose = _text(purpose, "settings.consent.require_gdpr_purpose", MAX_NAME).strip().lower()
    checked["consent"] = {"exclude_ccpa_data_sale_opt_out": True, "require_gdpr_purpose": purpose}

    percent = given.get("sampling_percent")
    checked["sampling_percent"] = 100 if percent is None else _integer(percent, "settings.sampling_percent", 1, 100)

    upload = _object(given.get("upload") or {}, "settings.upload")
    _no_unknown(upload, ("max_age_seconds", "max_queued"), "settings.upload")
    defaults = DEFAULT_UPLOAD[output]
    checked["upload"] = {
        "max_age_seconds": defaults["max_age_seconds"] if upload.get("max_age_seconds") is None
        else _number(upload["max_age_seconds"], "settings.upload.max_age_seconds", 0, 7 * 86_400),
        "max_queued": defaults["max_queued"] if upload.get("max_queued") is None
        else _integer(upload["max_queued"], "settings.upload.max_queued", 1, 10_000_000),
    }
    checked[output] = block
    return checked


def _ca_id(value: Any, name: str, known_ca: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{name} must be a calculated attribute id (a positive integer)", field=name)
    if known_ca is not None and not known_ca(value):
        raise BadRequest(f"{name}: no active calculated attribute {value} in this workspace", field=name)
    return value


def _output_block(output: str, value: Any, known_ca: Any) -> dict[str, Any]:
    name = f"settings.{output}"
    given = _object(value or {}, name)
    batch = given.get("batch_size")
    block: dict[str, Any] = {"batch_size": DEFAULT_BATCH[output] if batch is None
                             else _integer(batch, f"{name}.batch_size", 1, MAX_BATCH[output])}
    if output == "braze":
        _no_unknown(given, ("batch_size", "send_segments_as", "external_id_type", "string_attribute",
                            "array_attribute", "array_cap", "update_existing_only"), name)
        block["send_segments_as"] = _choice(given.get("send_segments_as", "single_string"),
                                            f"{name}.send_segments_as", BRAZE_SEGMENT_MODES)
        external = given.get("external_id_type", "customer_id")
        if fanout.wire_type(external) not in fanout.USER_TYPES:
            raise BadRequest(f"{name}.external_id_type must be a user identity type (customer_id, email, other...)",
                             field=f"{name}.external_id_type")
        block["external_id_type"] = external
        block["string_attribute"] = _text(given.get("string_attribute", "SegmentMembership"),
                                          f"{name}.string_attribute", MAX_NAME)
        block["array_attribute"] = _text(given.get("array_attribute", "SegmentMembershipArray"),
                                         f"{name}.array_attribute", MAX_NAME)
        # Braze arrays hold 25 values unless the account asked for up to 100; it truncates the rest
        block["array_cap"] = _integer(given.get("array_cap", 25), f"{name}.array_cap", 1, 100)
        block["update_existing_only"] = _boolean(given.get("update_existing_only", False),
                                                 f"{name}.update_existing_only")
    elif output == "facebook":
        _no_unknown(given, ("batch_size", "ad_account_id", "api_version", "customer_file_source", "multi_key",
                            "match_user_attributes", "value_based", "delete_on_audience_delete"), name)
        if given.get("ad_account_id") is None:
            raise BadRequest(f"{name}.ad_account_id is required (e.g. act_1234567890)", field=f"{name}.ad_account_id")
        account = given["ad_account_id"]
        if not isinstance(account, str) or not _AD_ACCOUNT.fullmatch(account):
            raise BadRequest(f"{name}.ad_account_id must be digits, optionally after act_",
                             field=f"{name}.ad_account_id")
        block["ad_account_id"] = account if account.startswith("act_") else f"act_{account}"
        version = given.get("api_version", "v25.0")
        if not isinstance(version, str) or not _FACEBOOK_API_VERSION.fullmatch(version):
            raise BadRequest(f"{name}.api_version must look like v25.0", field=f"{name}.api_version")
        block["api_version"] = version
        block["customer_file_source"] = _choice(given.get("customer_file_source", "USER_PROVIDED_ONLY"),
                                                f"{name}.customer_file_source", FACEBOOK_FILE_SOURCES)
        block["multi_key"] = _boolean(given.get("multi_key", False), f"{name}.multi_key")
        matched = _string_list(given.get("match_user_attributes") or [], f"{name}.match_user_attributes")
        for i, key in enumerate(matched):
            if key not in fanout.FACEBOOK_ATTRIBUTE_KEYS:
                raise BadRequest(f"{name}.match_user_attributes[{i}] must be one of "
                                 f"{', '.join(fanout.FACEBOOK_ATTRIBUTE_KEYS)}",
                                 field=f"{name}.match_user_attributes[{i}]")
        if matched and not block["multi_key"]:
            raise BadRequest(f"{name}.match_user_attributes needs multi_key: attributes only match inside the "
                             "multi-key audience", field=f"{name}.match_user_attributes")
        block["match_user_attributes"] = matched
        block["value_based"] = _value_based(given.get("value_based"), f"{name}.value_based", known_ca)
        block["delete_on_audience_delete"] = _boolean(given.get("delete_on_audience_delete", True),
                                                      f"{name}.delete_on_audience_delete")
    elif output == "webhook":
        _no_unknown(given, ("batch_size", "url"), name)
        if given.get("url") is None:
            raise BadRequest(f"{name}.url is required: where the membership messages are posted", field=f"{name}.url")
        block["url"] = _url(given["url"], f"{name}.url")
    else:  # kafka
        _no_unknown(given, ("batch_size", "bootstrap_servers", "topic", "security_protocol", "sasl_mechanism"), name)
        servers = _text(given.get("bootstrap_servers"), f"{name}.bootstrap_servers") \
            if given.get("bootstrap_servers") is not None else None
        if servers is None or not all(_BOOTSTRAP.fullmatch(s.strip()) and 0 < int(s.rsplit(":", 1)[1]) < 65536
                                      for s in servers.split(",")):
            raise BadRequest(f"{name}.bootstrap_servers is required: host:port[,host:port...], ports 1 to 65535",
                             field=f"{name}.bootstrap_servers")
        block["bootstrap_servers"] = ",".join(s.strip() for s in servers.split(","))
        topic = given.get("topic")
        if not isinstance(topic, str) or not re.fullmatch(r"[A-Za-z0-9._\-]{1,249}", topic) or topic in (".", ".."):
            raise BadRequest(f"{name}.topic is required: letters, digits, '.', '_' and '-', at most 249",
                             field=f"{name}.topic")
        block["topic"] = topic
        block["security_protocol"] = _choice(given.get("security_protocol", "PLAINTEXT"),
                                             f"{name}.security_protocol", KAFKA_SECURITY)
        block["sasl_mechanism"] = _choice(given.get("sasl_mechanism", "PLAIN"), f"{name}.sasl_mechanism", KAFKA_SASL)
    return block


def _value_based(value: Any, name: str, known_ca: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    given = _object(value, name)
    _no_unknown(given, ("calculated_attribute_id", "user_attribute", "allow_zero"), name)
    if ("calculated_attribute_id" in given) == ("user_attribute" in given):
        raise BadRequest(f"{name} names its value with exactly one of calculated_attribute_id and user_attribute",
                         field=name)
    if "calculated_attribute_id" in given:
        found: dict[str, Any] = {"calculated_attribute_id": _ca_id(given["calculated_attribute_id"],
                                                                   f"{name}.calculated_attribute_id", known_ca)}
    else:
        found = {"user_attribute": _string_list([given["user_attribute"]], f"{name}.user_attribute")[0]}
    # values must be above zero unless zero is allowed; negatives are never sent (outputs/facebook.py)
    found["allow_zero"] = _boolean(given.get("allow_zero", False), f"{name}.allow_zero")
    return found


def check_credentials(output: str, value: Any, current: Credentials | None = None,
                      settings: Mapping[str, Any] | None = None) -> Credentials:
    """The credentials a body sends, checked. On an update, a name left out or sent as "set" keeps its value."""
    required, optional = CREDENTIALS[output]
    if value is None and current is not None:
        return current
    given = _object({} if value is None else value, "credentials")
    _no_unknown(given, required + optional, "credentials")
    merged = dict(current or {})
    for credential, secret in given.items():
        if secret == SET_MARKER and credential in merged:
            continue
        if secret is None and credential in optional:
            merged.pop(credential, None)
            continue
        if not isinstance(secret, str) or not secret or len(secret) > MAX_CREDENTIAL:
            raise BadRequest(f"credentials.{credential} must be a non-empty string of at most {MAX_CREDENTIAL} "
                             "characters", field=f"credentials.{credential}")
        merged[credential] = secret
    for credential in required:
        if credential not in merged:
            raise BadRequest(f"credentials.{credential} is required for {output}", field=f"credentials.{credential}")
    if output == "kafka":
        if ("username" in merged) != ("password" in merged):
            raise BadRequest("credentials: kafka takes username and password together", field="credentials.password")
        sasl = settings is not None and settings["kafka"]["security_protocol"].startswith("SASL")
        if sasl and "username" not in merged:
            raise BadRequest("credentials.username and credentials.password are required with SASL",
                             field="credentials.username")
    return Credentials(merged)


# --- registry ----------------------------------------------------------------------------------------------------
CONNECTION_KEYS = ("output", "name", "status", "settings", "credentials")


class ConnectionRegistry:
    def __init__(self, master_key: MasterKey) -> None:
        self._key = master_key
        self._by_id: dict[int, Connection] = {}
        self._last_id = 0  # never handed out twice in a process, like audience ids

    def load(self, connection: duckdb.DuckDBPyConnection) -> None:
        cursor = connection.cursor()
        try:
            rows = cursor.execute(f"SELECT {_COLUMNS} FROM delivery_connections").fetchall()
        finally:
            cursor.close()
        loaded = {}
        for (id_, workspace_id, audience_id, output, name, status, settings, sealed, remote, created, updated) in rows:
            credentials = Credentials(json.loads(self._key.unseal(sealed)))
            loaded[id_] = Connection(id_, workspace_id, audience_id, output, name, status, json.loads(settings),
                                     credentials, created, updated, json.loads(remote) if remote else None)
        self._by_id = loaded
        self._last_id = max(self._last_id, *loaded, 0)

    # --- reading ---------------------------------------------------------------------------------------------
    def list(self, workspace_id: str, audience_id: int | None = None) -> list[Connection]:
        return sorted((c for c in self._by_id.values() if c.workspace_id == workspace_id
                       and (audience_id is None or c.audience_id == audience_id)), key=lambda c: c.id)

    def all(self) -> list[Connection]:
        return sorted(self._by_id.values(), key=lambda c: c.id)

    def active(self) -> list[Connection]:
        return [c for c in self.all() if c.is_active]

    def of_audience(self, audience_id: int) -> list[Connection]:
        return [c for c in self.all() if c.audience_id == audience_id]

    def get(self, workspace_id: str, audience_id: int, connection_id: int) -> Connection:
        found = self._by_id.get(connection_id)
        if found is None or found.workspace_id != workspace_id or found.audience_id != audience_id:
            raise NotFound(f"no connection {connection_id} of audience {audience_id} in this workspace")
        return found

    def find(self, connection_id: int) -> Connection | None:
        return self._by_id.get(connection_id)

    def remember(self, connection: Connection | None, forget_ids: tuple[int, ...] = ()) -> None:
        for forgotten in forget_ids:
            self._by_id.pop(forgotten, None)
        if connection is not None:
            self._by_id[connection.id] = connection

    # --- plans -------------------------------------------------------------------------------------------------
    def plan_create(self, workspace_id: str, audience_id: int, body: Any,
                    known_ca: Any = None) -> tuple[Connection, WriteBatch]:
        """`known_ca(ca_id) -> bool`: whether the workspace has that calculated attribute, active."""
        given = _body(body)
        output = _choice(given.get("output"), "output", OUTPUTS)
        settings = check_settings(output, given.get("settings"), known_ca)
        credentials = check_credentials(output, given.get("credentials"), settings=settings)
        name = _text(given["name"], "name", MAX_NAME) if given.get("name") is not None else output
        status = _choice(given.get("status", "active"), "status", STATUSES)
        stamp = now_ms()
        self._last_id = max(self._last_id, *self._by_id, 0) + 1
        created = Connection(self._last_id, workspace_id, audience_id, output, name, status, settings, credentials,
                             stamp, stamp)
        return created, self._upsert(created)

    def plan_update(self, workspace_id: str, audience_id: int, connection_id: int, body: Any,
                    known_ca: Any = None) -> tuple[Connection, WriteBatch]:
        """PUT takes what POST takes. Keys left out keep their values; `settings`, when sent, is taken whole
        (defaults fill what it leaves out); credentials left out, or sent as "set", keep their values."""
        current = self.get(workspace_id, audience_id, connection_id)
        given = _body(body)
        if given.get("output", current.output) != current.output:
            raise BadRequest("output cannot change: create another connection", field="output")
        settings = current.settings if given.get("settings") is None \
            else check_settings(current.output, given["settings"], known_ca)
        credentials = check_credentials(current.output, given.get("credentials"), current.credentials, settings)
        name = _text(given["name"], "name", MAX_NAME) if given.get("name") is not None else current.name
        status = _choice(given.get("status", current.status), "status", STATUSES)
        updated = replace(current, name=name, status=status, settings=settings, credentials=credentials,
                          updated_ms=max(now_ms(), current.updated_ms + 1))
        return updated, self._upsert(updated)

    def plan_remote(self, connection: Connection, remote: dict[str, Any] | None) -> tuple[Connection, WriteBatch]:
        """Record what the destination created for the connection (outputs/facebook.py: audience ids per key).
        `updated_ms` stays: it tells the delivery service when the configuration changed, and this is no such
        change."""
        changed = replace(connection, remote=remote)
        text = json.dumps(remote) if remote is not None else None
        batch = WriteBatch()
        batch.statements.append(lambda cur: cur.execute("UPDATE delivery_connections SET remote = ? WHERE id = ?",
                                                        [text, connection.id]))
        return changed, batch

    def plan_delete(self, workspace_id: str, audience_id: int, connection_id: int) -> WriteBatch:
        """The connection and everything delivery keeps for it: state, pending outbox rows, attempts."""
        self.get(workspace_id, audience_id, connection_id)
        return _delete_batch([connection_id])

    def plan_delete_audience(self, workspace_id: str, audience_id: int) -> tuple[tuple[int, ...], WriteBatch]:
        """Every connection of a deleted audience, with the ids to `remember(None, ids)` after the commit."""
        ids = tuple(c.id for c in self.list(workspace_id, audience_id))
        return ids, _delete_batch(list(ids))

    def _upsert(self, connection: Connection) -> WriteBatch:
        row = [connection.id, connection.workspace_id, connection.audience_id, connection.output, connection.name,
               connection.status, json.dumps(connection.settings),
               self._key.seal(json.dumps(dict(connection.credentials), sort_keys=True)),
               json.dumps(connection.remote) if connection.remote is not None else None,
               connection.created_ms, connection.updated_ms]
        batch = WriteBatch()
        batch.statements.append(lambda cur: cur.execute(
            f"INSERT OR REPLACE INTO delivery_connections ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row))
        return batch


def _delete_batch(ids: list[int]) -> WriteBatch:
    def delete(cur: duckdb.DuckDBPyConnection) -> None:
        if not ids:
            return
        for table in ("delivery_state", "delivery_outbox", "delivery_attempts"):
            cur.execute(f"DELETE FROM {table} WHERE list_contains(?, connection_id)", [ids])
        cur.execute("DELETE FROM delivery_connections WHERE list_contains(?, id)", [ids])

    batch = WriteBatch()
    batch.statements.append(delete)
    return batch


def _body(body: Any) -> dict[str, Any]:
    if not isinstance(body, Mapping):
        raise BadRequest("the body must be an object with output, settings and credentials (docs/delivery.md)",
                         field="body")
    # the read-only keys of an answer are allowed (and ignored), so an answer can be sent back changed
    _no_unknown(body, (*CONNECTION_KEYS, "id", "audience_id", "remote", "delivery", "created_timestamp_ms",
                       "last_modified_timestamp_ms"), "body")
    return dict(body)
