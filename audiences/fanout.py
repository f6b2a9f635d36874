"""Identity fan-out (docs/delivery.md): which of a member's identities an output accepts, under which key, and how
each value is normalized and hashed (spec/outputs.md §2.6), for many members at once.

Keys per output (the `identifiers` JSON of an outbox row; an output reads them as they are):
- facebook: EMAIL and PHONE (SHA-256 lowercase hex of the normalized value), MADID (lowercase, hyphens kept, not
  hashed), EXTERN_ID (the value as the client sent it, not hashed), and with `match_user_attributes` the
  multi-key audience's FN, LN, GEN, CT, ST, ZIP, COUNTRY from reserved user attributes (hashed). A value already
  64 hex characters is taken as hashed by the client and passed through (lowercased).
- braze: external_id (the `external_id_type` identity as the client sent it), email, phone.
- webhook, kafka: mpid (decimal text) always, then each chosen identity type under its Profile API name
  (customer_id, email, ios_advertising_id...), as the client sent it.

Several identity types can feed one key (email and other email-like types never do; phones and advertising ids
can): the first type in the connection's `identity_types` order that the member holds wins. A member holding
two values of one type sends the latest added (ties: the smaller value), so the choice is stable.

Everything here is columnar: polars over frames read from the `identities` and `user_attributes` views, SHA-256
in DuckDB (polars has no cryptographic hash), no Python per member.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import duckdb
import polars as pl

from engine.event_batches import DEVICE_IDENTITY_KEYS, USER_IDENTITY_KEYS
from engine.identity_types import ALL_IDENTITY_TYPES, USER_IDENTITY_TYPES
from engine.normalize import PHONE_TYPES
from engine.profiles import profile_api_name, wire_name

if TYPE_CHECKING:
    from audiences.connections import Connection

USER_TYPES = frozenset(USER_IDENTITY_TYPES)
MPID = pl.Int64

# Facebook: identity type -> key. Other user identity types are EXTERN_ID (one of them per connection).
FACEBOOK_EMAIL_TYPES = ("email",)
FACEBOOK_PHONE_TYPES = PHONE_TYPES
FACEBOOK_MADID_TYPES = ("ios_idfa", "android_aaid", "fire_aid", "roku_aid")
# Facebook multi-key attribute keys -> the reserved user attribute holding them
FACEBOOK_ATTRIBUTE_KEYS: dict[str, str] = {
    "FN": "$firstname", "LN": "$lastname", "GEN": "$gender", "CT": "$city", "ST": "$state", "ZIP": "$zip",
    "COUNTRY": "$country",
}
FACEBOOK_HASHED = frozenset({"EMAIL", "PHONE", *FACEBOOK_ATTRIBUTE_KEYS})

BRAZE_PHONE_TYPES = PHONE_TYPES

_DEFAULT_TYPES: dict[str, tuple[str, ...]] = {
    "facebook": ("email", "mobile_number", "ios_idfa", "android_aaid"),
    "webhook": (),
    "kafka": (),
}

_EVENTS_API_NAMES = {**USER_IDENTITY_KEYS, **DEVICE_IDENTITY_KEYS}
_HEX64 = r"^[0-9a-f]{64}$"


def wire_type(spelled: str) -> str | None:
    """An identity type in any spelling idmesh takes (IDSync wire, Profile API, Events API) -> the wire spelling
    the `identities` view uses; None when it names no identity type."""
    if not isinstance(spelled, str):
        return None
    for candidate in (spelled, wire_name(spelled), _EVENTS_API_NAMES.get(spelled)):
        if candidate in ALL_IDENTITY_TYPES:
            return candidate
    return None


def default_identity_types(output: str, block: Mapping[str, Any] | None = None) -> list[str]:
    """identity_types a connection gets when its settings leave them out (braze: its external id type)."""
    if output == "braze":
        return [(block or {}).get("external_id_type", "customer_id")]
    return list(_DEFAULT_TYPES[output])


def identity_types_problem(output: str, wire_types: Sequence[str], block: Mapping[str, Any]) -> str | None:
    """Why the output cannot send these identity types (wire spelling), or None when it can."""
    if output == "facebook":
        extern = [t for t in wire_types if _facebook_key(t) == "EXTERN_ID"]
        refused = [t for t in wire_types if _facebook_key(t) is None]
        if refused:
            return (f"facebook cannot match on {', '.join(refused)}; it takes email, phones, advertising ids "
                    f"({', '.join(FACEBOOK_MADID_TYPES)}) and one user identity type as EXTERN_ID")
        if len(extern) > 1:
            return f"facebook takes one user identity type as EXTERN_ID, not {', '.join(extern)}"
        if not wire_types and not block.get("match_user_attributes"):
            return "facebook needs at least one identity type"
    elif output == "braze":
        external = wire_type(block["external_id_type"])
        refused = [t for t in wire_types if t != external and t != "email" and t not in BRAZE_PHONE_TYPES]
        if refused:
            return (f"braze identifies users by the external id type ({block['external_id_type']}), email or phone, "
                    f"not {', '.join(refused)}")
        if not wire_types:
            return "braze needs at least one identity type"
    return None


def _facebook_key(identity_type: str) -> str | None:
    if identity_type in FACEBOOK_EMAIL_TYPES:
        return "EMAIL"
    if identity_type in FACEBOOK_PHONE_TYPES:
        return "PHONE"
    if identity_type in FACEBOOK_MADID_TYPES:
        return "MADID"
    if identity_type in USER_TYPES:
        return "EXTERN_ID"
    return None


def identity_keys(connection: Connection) -> list[tuple[str, str]]:
    """(identity type in wire spelling, identifier key) pairs the connection sends, in preference order."""
    types = connection.identity_types
    if connection.output == "facebook":
        return [(t, key) for t in types if (key := _facebook_key(t)) is not None]
    if connection.output == "braze":
        external = wire_type(connection.options["external_id_type"])
        pairs = [(external, "external_id")] if external in types else []
        pairs += [(t, "email") for t in types if t == "email"]
        pairs += [(t, "phone") for t in types if t in BRAZE_PHONE_TYPES]
        return pairs
    return [(t, profile_api_name(t)) for t in types]


def attribute_keys(connection: Connection) -> list[tuple[str, str]]:
    """(user attribute name, identifier key) pairs a Facebook multi-key connection matches on."""
    if connection.output != "facebook":
        return []
    return [(FACEBOOK_ATTRIBUTE_KEYS[key], key) for key in connection.options.get("match_user_attributes", [])]


# --- reading -----------------------------------------------------------------------------------------------------
def read_identities(cursor: duckdb.DuckDBPyConnection, scope: str, identity_types: Sequence[str],
                    mpids: pl.Series | None = None) -> pl.DataFrame:
    """Identities of these types in the scope (of these profiles when `mpids` is given): mpid, identity_type,
    value (normalized), raw_value (as sent), added_ms."""
    schema = {"mpid": MPID, "identity_type": pl.String, "value": pl.String, "raw_value": pl.String,
              "added_ms": pl.Int64}
    if not identity_types:
        return pl.DataFrame(schema=schema)
    query = ("SELECT i.mpid, i.identity_type, i.value, i.raw_value, i.added_ms FROM identities i "
             "WHERE i.scope = $scope AND list_contains($types, i.identity_type)")
    return _read(cursor, query, {"scope": scope, "types": list(identity_types)}, mpids, "i").cast(schema)


def read_user_attributes(cursor: duckdb.DuckDBPyConnection, workspace_id: str, names: Sequence[str],
                         mpids: pl.Series | None = None) -> pl.DataFrame:
    """User attributes of these names as text (lists joined with commas; NULL values left out): mpid, name, value."""
    schema = {"mpid": MPID, "name": pl.String, "value": pl.String}
    if not names:
        return pl.DataFrame(schema=schema)
    query = ("SELECT a.mpid, a.name, CASE WHEN json_type(a.value) = 'ARRAY' "
             "THEN array_to_string(a.value::VARCHAR[], ',') ELSE json_extract_string(a.value, '$') END AS value "
             "FROM user_attributes a WHERE a.workspace_id = $workspace AND list_contains($names, a.name) "
             "AND a.value IS NOT NULL AND json_type(a.value) <> 'NULL'")
    return _read(cursor, query, {"workspace": workspace_id, "names": list(names)}, mpids, "a").cast(schema)


def _read(cursor: duckdb.DuckDBPyConnection, query: str, params: dict[str, Any], mpids: pl.Series | None,
          alias: str) -> pl.DataFrame:
    if mpids is None:
        return pl.from_arrow(cursor.sql(query, params=params).to_arrow_table())
    # the members as a registered Arrow table: a semi-join reads only their rows whatever their number
    members = pl.DataFrame({"mpid": mpids.cast(MPID)}).unique().to_arrow()
    name = "fanout_members"
    cursor.register(name, members)
    try:
        return pl.from_arrow(cursor.sql(f"{query} AND {alias}.mpid IN (SELECT mpid FROM {name})",
                                        params=params).to_arrow_table())
    finally:
        cursor.unregister(name)


def members_identifiers(cursor: duckdb.DuckDBPyConnection, connection: Connection, scope: str,
                        members: pl.Series) -> pl.DataFrame:
    """Read what the connection needs for these members and build their identifiers (`build_identifiers`)."""
    types = [t for t, _ in identity_keys(connection)]
    identities = read_identities(cursor, scope, sorted(set(types)), members)
    names = [name for name, _ in attribute_keys(connection)]
    attributes = read_user_attributes(cursor, connection.workspace_id, names, members) if names else None
    return build_identifiers(connection, members, identities, attributes)


# --- building ----------------------------------------------------------------------------------------------------
_EMPTY_LONG = pl.DataFrame(schema={"mpid": MPID, "key": pl.String, "value": pl.String})


def build_identifiers(connection: Connection, members: pl.Series, identities: pl.DataFrame,
                      attributes: pl.DataFrame | None = None) -> pl.DataFrame:
    """mpid, identifiers: one row per member holding at least one identifier the connection sends, in mpid order.
    `identifiers` is canonical JSON text (keys sorted, no spaces), so equal identifiers are equal strings and
    the diff compares them as text. `identities` and `attributes` are frames shaped like `read_identities` and
    `read_user_attributes` (rows of other profiles are ignored)."""
    wanted = pl.DataFrame({"mpid": members.cast(MPID).unique()})
    long = pl.concat([_identity_values(connection, identities),
                      _attribute_values(connection, attributes)], how="vertical")
    if connection.output in ("webhook", "kafka"):
        long = pl.concat([long, wanted.select("mpid", key=pl.lit("mpid"), value=pl.col("mpid").cast(pl.String))])
    long = long.join(wanted, on="mpid", how="semi").filter(pl.col("value").is_not_null() & (pl.col("value") != ""))
    if connection.output == "facebook":
        long = _hash_keys(long, FACEBOOK_HASHED)
    return _as_json(long)


def _identity_values(connection: Connection, identities: pl.DataFrame) -> pl.DataFrame:
    """mpid, key, value: per member and key, the preferred identity's value normalized for the output."""
    pairs = identity_keys(connection)
    if not pairs or identities.is_empty():
        return _EMPTY_LONG
    mapping = pl.DataFrame({"identity_type": [t for t, _ in pairs], "key": [k for _, k in pairs],
                            "rank": list(range(len(pairs)))}, schema_overrides={"rank": pl.Int32})
    joined = identities.cast({"mpid": MPID}).join(mapping, on="identity_type", how="inner")
    # each key's rule runs over that key's rows only: a when/then chain would run every rule over every row
    normalized = pl.concat([joined.filter(pl.col("key") == key).with_columns(value=_identity_rule(connection.output, key))
                            for key in sorted({k for _, k in pairs})])
    return _first_per_key(normalized.filter(pl.col("value").is_not_null() & (pl.col("value") != ""))
                          .sort(["mpid", "key", "rank", "added_ms", "value"],
                                descending=[False, False, False, True, False]))


def _identity_rule(output: str, key: str) -> pl.Expr:
    raw = pl.col("raw_value")
    if output == "facebook":
        trimmed = raw.str.strip_chars().str.strip_chars(" \t\r\n\x00\x0b").str.to_lowercase()
        if key == "PHONE":  # digits only, no leading zeros; a value hashed already stays as it is
            return pl.when(trimmed.str.contains(_HEX64)).then(trimmed).otherwise(
                trimmed.str.replace_all(r"\D", "").str.strip_chars_start("0"))
        if key in ("EMAIL", "MADID"):
            return trimmed
        return raw  # EXTERN_ID: the advertiser's own id, exactly as sent
    if output == "braze":
        if key == "external_id":  # must equal what the Braze SDK was given: the value as the client sent it
            return raw
        if key == "email":
            return raw.str.strip_chars().str.to_lowercase()
        return pl.col("value")  # phone: the stored form keeps the leading + (E.164)
    return raw


def _attribute_values(connection: Connection, attributes: pl.DataFrame | None) -> pl.DataFrame:
    pairs = attribute_keys(connection)
    if not pairs or attributes is None or attributes.is_empty():
        return _EMPTY_LONG
    mapping = pl.DataFrame({"name": [n for n, _ in pairs], "key": [k for _, k in pairs]})
    joined = attributes.cast({"mpid": MPID}).join(mapping, on="name", how="inner")
    normalized = pl.concat([joined.filter(pl.col("key") == key).with_columns(value=_attribute_rule(key))
                            for _, key in pairs])
    return _first_per_key(normalized.filter(pl.col("value").is_not_null() & (pl.col("value") != ""))
                          .sort(["mpid", "key", "value"]))


def _attribute_rule(key: str) -> pl.Expr:
    """spec/outputs.md §2.6 for the multi-key attribute keys; Unicode letters are kept (NFC), not only a-z."""
    text = pl.col("value").str.strip_chars(" \t\r\n\x00\x0b.").str.to_lowercase()
    letters = text.str.normalize("NFC").str.replace_all(r"[^\p{L}]", "")
    compact = text.str.replace_all(r"[\s\p{P}]", "")
    if key in ("FN", "LN", "CT"):
        rule = letters
    elif key == "GEN":
        rule = (pl.when(text.str.starts_with("m")).then(pl.lit("m"))
                .when(text.str.starts_with("f")).then(pl.lit("f")).otherwise(pl.lit(None, pl.String)))
    elif key == "ZIP":  # US ZIP+4 keeps its first five digits
        rule = pl.when(compact.str.contains(r"^\d{5}(\d{4})?$")).then(compact.str.slice(0, 5)).otherwise(compact)
    elif key == "COUNTRY":
        rule = pl.when(letters.str.len_chars() == 2).then(letters).otherwise(pl.lit(None, pl.String))
    else:  # ST
        rule = compact
    return pl.when(text.str.contains(_HEX64)).then(text).otherwise(rule)


def _first_per_key(ordered: pl.DataFrame) -> pl.DataFrame:
    """The first row of each (mpid, key) run of a frame sorted by them: a comparison with the row before, cheaper
    than a unique() that hashes every row."""
    new_run = (pl.col("mpid") != pl.col("mpid").shift(1)) | (pl.col("key") != pl.col("key").shift(1))
    return ordered.filter(new_run.fill_null(True)).select("mpid", "key", "value")


def _hash_keys(long: pl.DataFrame, hashed_keys: frozenset[str]) -> pl.DataFrame:
    """SHA-256 (lowercase hex) of the values of these keys, except values already 64 hex characters."""
    needs = pl.col("key").is_in(sorted(hashed_keys)) & ~pl.col("value").str.contains(_HEX64)
    return _in_duckdb(long.with_columns(needs=needs),
                      "mpid, key, CASE WHEN needs THEN sha256(value) ELSE value END AS value")


def sha256_hex(values: pl.Series) -> pl.Series:
    """The lowercase hex SHA-256 of each value's UTF-8 bytes, in order."""
    return _in_duckdb(pl.DataFrame({"value": values.cast(pl.String)}), "sha256(value) AS sha256")["sha256"]


def _in_duckdb(frame: pl.DataFrame, projection: str) -> pl.DataFrame:
    """`SELECT <projection> FROM frame` in a private in-memory DuckDB (polars has no cryptographic hash; the
    server's database is never involved). A projection over a scan keeps the rows in order."""
    with duckdb.connect(":memory:") as instance:
        instance.execute("SET enable_progress_bar = false")
        result = instance.from_arrow(frame.to_arrow()).project(projection).to_arrow_table()
    return pl.from_arrow(result)


def _as_json(long: pl.DataFrame) -> pl.DataFrame:
    """mpid, key, value rows (one per member and key) -> mpid, identifiers as canonical JSON text. Keys are this
    module's own names (no character JSON escapes); values are escaped only where they hold a character JSON must
    escape, since most (hashes, ids) hold none and the general escape costs more than all the rest."""
    if long.is_empty():
        return pl.DataFrame(schema={"mpid": MPID, "identifiers": pl.String})
    special = pl.col("value").str.contains(r'[\x00-\x1f"\\]')
    # json_encode of a one-field struct escapes the way JSON does; the slices keep the quoted string alone
    escaped = pl.struct(v=pl.col("value")).struct.json_encode().str.slice(5).str.head(-1)
    plain = pl.concat_str([pl.lit('"'), pl.col("value"), pl.lit('"')])
    quoted = pl.concat([long.filter(~special).with_columns(quoted=plain),
                        long.filter(special).with_columns(quoted=escaped)])
    # gathering into a list and joining it is far cheaper in polars than str.join inside the aggregation
    return (quoted.lazy().sort(["mpid", "key"])
            .select("mpid", piece=pl.concat_str([pl.lit('"'), pl.col("key"), pl.lit('":'), pl.col("quoted")]))
            .group_by("mpid", maintain_order=True).agg("piece")
            .select("mpid", identifiers=pl.lit("{") + pl.col("piece").list.join(",") + pl.lit("}"))
            .collect())


# --- sampling ----------------------------------------------------------------------------------------------------
def sample_buckets(connection_id: int, mpids: pl.Series) -> pl.Series:
    """Each profile's sampling bucket 0..99 for a connection: the first 8 bytes of SHA-256("<connection id>:<mpid>")
    as an unsigned integer, modulo 100. Stable across processes and versions, and different per connection so two
    10% samples are not the same 10%."""
    keys = pl.DataFrame({"mpid": mpids.cast(MPID)}).select(
        key=pl.concat_str([pl.lit(f"{int(connection_id)}:"), pl.col("mpid").cast(pl.String)]))
    digests = sha256_hex(keys["key"])
    return (digests.str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64) % 100).cast(pl.Int32)


def in_sample(connection: Connection, mpids: pl.Series) -> pl.Series:
    """Boolean mask over `mpids`: the profiles a connection's user-level sampling keeps."""
    if connection.sampling_percent >= 100:
        return pl.Series(values=[True] * len(mpids), dtype=pl.Boolean)
    return sample_buckets(connection.id, mpids) < connection.sampling_percent
