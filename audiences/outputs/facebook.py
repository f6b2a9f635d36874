"""Facebook (Meta) custom audiences output, modelled after mParticle's (../shared/spec/outputs.md §2; README,
"Facebook"; ../shared/reference/mparticle-features.md §5).

Downstream audiences. One customer-list custom audience per identifier key the members carry (EMAIL_SHA256,
PHONE_SHA256, MOBILE_ADVERTISER_ID), plus, with `settings.facebook.multi_key`, one multi-key audience whose rows
hold every key (EXTERN_ID, EMAIL, PHONE, MADID and the matched user attributes FN, LN, GEN, CT, ST, ZIP, COUNTRY).
Each is created on first use:

    POST {base_url}/{api_version}/act_{ad_account}/customaudiences
    {"name": "<external_name> <KEY>", "subtype": "CUSTOM", "customer_file_source": "<settings>",
     "description": "idmesh connection <id> (<created_ms>), audience <id>, <KEY>", "is_value_based": true?}

and its id is recorded before any row is uploaded to it (`RemoteStore`: the connection's `remote` JSON,
`{"ad_account_id": "act_1", "audiences": {"EMAIL_SHA256": {"id", "name", "value_based"}, ...}}`), so a restart
reuses it. Should an answer be lost, or the process die between the creation and the record, the next creation
first lists the ad account's audiences and adopts the one whose description names this connection and key: no
duplicate either way.

Uploads. Add = `POST /{audience_id}/users`, remove = `DELETE /{audience_id}/users`, at most `batch_size`
(<= 10,000) rows per request. A `deliver` call takes up to `SESSION_REQUESTS` requests' worth of deltas; per
audience and operation its rows form one session `{session_id, batch_seq 1.., last_batch_flag,
estimated_num_total}`, removes before adds (so an identifier moving from one member to another ends up held).
Everything is sent as a JSON body (POST and DELETE alike, `payload` and `session` as objects), the token as
`Authorization: Bearer` (never in a URL or body), `appsecret_proof` in the body when the connection has an
app_secret. Single-key audiences take `{"schema": "EMAIL_SHA256", "data": [hash, ...]}`; the multi-key one and
value-based adds take a schema array and 2-D rows ("" for an unknown key). Identifiers come normalized and hashed
from audiences/fanout.py (§2.6); MADID and EXTERN_ID are sent as they are. An add whose identifiers changed also
removes the held values it no longer names (`Delta.held_identifiers`).

Value-based audiences (`settings.facebook.value_based`): created with `is_value_based=true`; adds carry a
LOOKALIKE_VALUE column from the forwarded attribute (a user attribute, or a calculated attribute such as LTV).
Only values > 0 are sent (>= 0 with `allow_zero`); a member whose value is missing, not a number, negative (never
sent), or zero when zero is not allowed is skipped: its add is answered `Rejected` (so it is counted in
delivery_attempts.rejected with the reason, and parked until the diff replaces it) and counted in
`UploadReport.skipped_values`.

Answers (§2.5). Throttling arrives as an error body, usually HTTP 400: codes 4, 17, 32, 613 and 80000-80014 are
`RetryLater`, waiting `estimated_time_to_regain_access` (minutes) from X-Business-Use-Case-Usage when it is > 0,
else the outbox's backoff; the rest of the call is not sent. Code 190 (invalid token) and permission codes
(10, 200-299) are `Rejected` for the whole call with a reason saying to fix the credentials (the rows stay parked
until the connection changes); nothing more is sent. 5xx, codes 1/2/2650, `is_transient` errors, timeouts and
resets are retried, that request's rows alone: the call's other requests go on.
Code 100 (a bad parameter or row) fails the whole request at Facebook, which does not say which row: its deltas
are `Rejected` with the message and the other requests of the call go on; code 100 with subcode 33 (the audience no
longer exists: deleted outside idmesh) forgets its id, so the next call creates it again, and retries (a full
resync, `replace_all`, refills it). Rows Facebook counts as invalid (`num_invalid_entries`) do not fail a request:
they are counted in `UploadReport.invalid_entries`, logged with their reasons, and their deltas acknowledged.

Full resync: `replace_all` sends the whole membership through `POST /{id}/usersreplace`, one session per
downstream audience. Deletion: `delete_downstream(connection)` deletes the downstream audiences (`DELETE /{id}`)
when the idmesh audience or the connection is deleted (unless `delete_on_audience_delete` is false).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import orjson

from audiences import fanout
from audiences.outputs.base import (
    Acknowledged,
    AudienceRef,
    Delta,
    Outcome,
    Rejected,
    RetryLater,
    http_client,
    outcome_of_error,
    retry_after_seconds,
    retry_delay,
)

if TYPE_CHECKING:
    from audiences.connections import Connection, ConnectionRegistry
    from engine.writer import GroupCommitWriter

log = logging.getLogger("idmesh.outputs.facebook")

MAX_ROWS = 10_000          # rows per /users or /usersreplace request (§2.3)
SESSION_REQUESTS = 5       # full requests one deliver call may send per audience and operation
# per-key audiences: identifier key -> single-key schema (and the remote key of the audience)
SINGLE_SCHEMAS = {"EMAIL": "EMAIL_SHA256", "PHONE": "PHONE_SHA256", "MADID": "MOBILE_ADVERTISER_ID"}
MULTI_KEY = "MULTI_KEY"    # remote key of the multi-key audience
MULTI_KEY_ORDER = ("EXTERN_ID", "EMAIL", "PHONE", "GEN", "DOBY", "DOBM", "DOBD", "LN", "FN", "FI", "CT", "ST", "ZIP",
                   "MADID", "COUNTRY")
VALUE_COLUMN = "LOOKALIKE_VALUE"
TARGET_ORDER = (*SINGLE_SCHEMAS.values(), MULTI_KEY)

THROTTLING_CODES = frozenset({4, 17, 32, 613, *range(80000, 80015)})
TOKEN_CODES = frozenset({102, 190})          # session / access token invalid or expired
PERMISSION_CODES = frozenset({10, *range(200, 300)})
TRANSIENT_CODES = frozenset({1, 2, 2650})    # unknown / service error / "failed to update" (e.g. a replace runs)
GONE_SUBCODE = 33                            # with code 100: the object does not exist (any more)

DELETE_ATTEMPTS = 3
DELETE_MAX_WAIT_SECONDS = 10.0
REPLACE_ATTEMPTS = 6
LIST_PAGES = 20


# --- settings ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FacebookOptions:
    ad_account_id: str          # "act_<digits>"
    api_version: str            # "v25.0"
    batch_size: int             # rows per request, <= MAX_ROWS
    customer_file_source: str
    multi_key: bool
    value_based: Mapping[str, Any] | None
    delete_on_audience_delete: bool

    @classmethod
    def of(cls, connection: Connection) -> FacebookOptions:
        block = connection.options
        return cls(ad_account_id=block["ad_account_id"], api_version=block.get("api_version") or "v25.0",
                   batch_size=max(1, min(MAX_ROWS, int(block.get("batch_size") or MAX_ROWS))),
                   customer_file_source=block.get("customer_file_source") or "USER_PROVIDED_ONLY",
                   multi_key=bool(block.get("multi_key")), value_based=block.get("value_based"),
                   delete_on_audience_delete=block.get("delete_on_audience_delete", True) is not False)

    @property
    def allow_zero(self) -> bool:
        return bool(self.value_based and self.value_based.get("allow_zero"))


# --- where created audience ids are kept ---------------------------------------------------------------------------

class RemoteStore(Protocol):
    """Makes a connection's `remote` JSON durable; returns once it is committed (raises when it could not be)."""

    async def save(self, connection: Connection, remote: dict[str, Any]) -> None: ...


class RegistryRemoteStore:
    """`remote` written through the connection registry and the group-commit writer (`delivery_connections.remote`).
    `lock` should be the lock connection changes take (`app.state.audience_changes`): an update planned from the
    registry writes the whole row, so a save between its plan and its commit would be lost."""

    def __init__(self, registry: ConnectionRegistry, writer: GroupCommitWriter,
                 lock: asyncio.Lock | None = None) -> None:
        self._registry = registry
        self._writer = writer
        self._lock = lock

    async def save(self, connection: Connection, remote: dict[str, Any]) -> None:
        async with self._lock if self._lock is not None else contextlib.nullcontext():
            current = self._registry.find(connection.id)
            if current is None:
                raise LookupError(f"connection {connection.id} no longer exists")
            changed, batch = self._registry.plan_remote(current, remote)
            await asyncio.wrap_future(self._writer.submit(batch))
            self._registry.remember(changed)


# --- reports ----------------------------------------------------------------------------------------------------

@dataclass
class UploadReport:
    """What uploads did, for logs, tests and benchmarks (per call: `last_report`; since built: `totals`)."""

    requests: int = 0                 # /users and /usersreplace requests sent (creations and lists not counted)
    rows: int = 0                     # rows in them
    num_received: int = 0             # rows Facebook said it received
    invalid_entries: int = 0          # num_invalid_entries summed
    invalid_samples: dict[str, str] = field(default_factory=dict)   # a few {value: reason}
    skipped_values: int = 0           # value-based adds not sent (value missing, negative, or zero not allowed)
    created: list[str] = field(default_factory=list)                 # keys whose audience this call created
    adopted: list[str] = field(default_factory=list)                 # keys found by description instead
    fills: list[int] = field(default_factory=list)                   # rows per upload request, in order

    def add(self, other: UploadReport) -> None:
        self.requests += other.requests
        self.rows += other.rows
        self.num_received += other.num_received
        self.invalid_entries += other.invalid_entries
        for value, reason in other.invalid_samples.items():
            if len(self.invalid_samples) < 20:
                self.invalid_samples.setdefault(value, reason)
        self.skipped_values += other.skipped_values
        self.created.extend(other.created)
        self.adopted.extend(other.adopted)
        self.fills.extend(other.fills)


@dataclass(frozen=True)
class ReplaceResult:
    """A full resync. `outcomes` has one entry per member given, in order: Acknowledged when every audience its
    rows went to finished its replace session. `completed`: every session finished (the downstream audiences hold
    exactly the acknowledged members)."""

    outcomes: list[Outcome]
    completed: bool
    sessions: dict[str, str]          # target key -> session_id
    report: UploadReport


@dataclass(frozen=True)
class DeleteResult:
    deleted: list[str]                # audience ids gone (deleted now, or already gone)
    failed: dict[str, str]            # audience id -> why it is still there
    skipped: bool = False             # delete_on_audience_delete is false


# --- answers ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GraphFailure:
    """How a Graph answer (or its absence) failed. `outcome` is what the deltas it carried become; `stop` says the
    rest of the call should not be sent; `gone` that the audience addressed no longer exists."""

    outcome: RetryLater | Rejected
    stop: bool
    gone: bool = False
    throttled: bool = False


def regain_seconds(response: httpx.Response) -> float | None:
    """The largest `estimated_time_to_regain_access` (minutes) in X-Business-Use-Case-Usage, in seconds; None when
    the header is absent, does not parse, or says 0."""
    value = response.headers.get("x-business-use-case-usage")
    if not value:
        return None
    try:
        usage = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    minutes = 0.0
    if isinstance(usage, dict):
        for entries in usage.values():
            for entry in entries if isinstance(entries, list) else []:
                wait = entry.get("estimated_time_to_regain_access") if isinstance(entry, dict) else None
                if isinstance(wait, int | float) and not isinstance(wait, bool) and math.isfinite(wait):
                    minutes = max(minutes, float(wait))
    return minutes * 60.0 if minutes > 0 else None


def graph_failure(response: httpx.Response, what: str) -> GraphFailure:
    """Classify a non-2xx answer (or a 2xx carrying an error object) to `what` (e.g. "upload to 2385...")."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    code = error.get("code") if isinstance(error.get("code"), int) else None
    subcode = error.get("error_subcode") if isinstance(error.get("error_subcode"), int) else None
    message = str(error.get("message") or response.text[:200] or f"HTTP {status}")[:300]
    label = f"Facebook {what}: HTTP {status}" + (f", code {code}" if code is not None else "") + \
        (f"/{subcode}" if subcode is not None else "") + f": {message}"
    if code in THROTTLING_CODES:
        wait = regain_seconds(response)
        return GraphFailure(RetryLater(f"{label} (throttled" + (f", access back in {wait:.0f} s)" if wait else ")"),
                                       wait, status), stop=True, throttled=True)
    if code in TOKEN_CODES:
        return GraphFailure(Rejected(f"{label}. The access token is invalid or expired: update the connection's "
                                     "credentials.access_token; its deltas wait until then", status), stop=True)
    if code in PERMISSION_CODES:
        return GraphFailure(Rejected(f"{label}. The token lacks a permission (ads_management) or access to the ad "
                                     "account: fix it and update the connection", status), stop=True)
    if code == 100 and subcode == GONE_SUBCODE:
        return GraphFailure(RetryLater(f"{label} (the custom audience is gone: it is created again)", None, status),
                            stop=False, gone=True)
    if status >= 500 or status in (408, 425, 429) or code in TRANSIENT_CODES or error.get("is_transient") is True:
        # one request's trouble: the call's other requests carry other rows and go on (see transport_failure)
        return GraphFailure(RetryLater(label, retry_after_seconds(response), status), stop=False)
    return GraphFailure(Rejected(label, status), stop=False)


def transport_failure(exc: Exception, what: str) -> GraphFailure:
    """No answer: that request's rows are retried, the call's other requests go on. Stopping the call here would
    leave every later row unsent yet counted as attempted, and its backoff would grow with failures it never met:
    under 30% failing requests a call of ten requests then almost never got its last rows through. A destination
    that fails every request still costs one call per backoff period: the flush round ends when a whole batch is
    told to retry."""
    retry = outcome_of_error(exc)
    return GraphFailure(RetryLater(f"Facebook {what}: {retry.reason}"[:500]), stop=False)


# --- planning rows ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    owner: int                        # index of the delta (or member) it belongs to
    primary: bool                     # False: the cleanup of a held value an add no longer names
    cells: Mapping[str, str]          # multi-key name -> value
    value: float | int | None = None  # LOOKALIKE_VALUE (value-based adds)


def lookalike_value(raw: object, allow_zero: bool) -> tuple[float | int | None, str | None]:
    """(value to send, None) or (None, why the member is skipped)."""
    if raw is None:
        return None, "no value"
    number: float | int
    if isinstance(raw, bool):
        return None, f"value {raw!r} is not a number"
    if isinstance(raw, int | float):
        number = raw
    elif isinstance(raw, str):
        try:
            number = float(raw.strip())
        except ValueError:
            return None, f"value {raw[:40]!r} is not a number"
        if number.is_integer() and abs(number) < 2**53:
            number = int(number)
    else:
        return None, f"value of type {type(raw).__name__} is not a number"
    if not math.isfinite(number):
        return None, f"value {number!r} is not finite"
    if number < 0:
        return None, f"value {number!r} is negative (never sent)"
    if number == 0 and not allow_zero:
        return None, "value 0 (zero values are not allowed by settings.facebook.value_based.allow_zero)"
    return number, None


def value_attribute_name(connection: Connection, explicit: str | None = None) -> str | None:
    """The key of `Delta.attributes` holding a value-based connection's value: `explicit`, else the user
    attribute's name. None for a calculated attribute given by id only: the outbox forwards it under its name,
    which the connection does not hold (`_value_of` then takes the one forwarded attribute that is no forwarded
    user attribute, when the connection forwards a single calculated attribute)."""
    if explicit is not None:
        return explicit
    kind_name = connection.value_attribute
    if kind_name is None:
        return None
    kind, name = kind_name
    if kind == "user":
        return str(name)
    return None


def _value_of(delta: Delta, connection: Connection, name: str | None) -> object:
    if name is not None:
        return delta.attributes.get(name)
    if len(connection.calculated_attributes) == 1:
        users = set(connection.user_attributes)
        others = [key for key in delta.attributes if key not in users]
        if len(others) == 1:
            return delta.attributes[others[0]]
    return None


def _single_cells(identifiers: Mapping[str, str]) -> dict[str, dict[str, str]]:
    return {schema: {key: identifiers[key]} for key, schema in SINGLE_SCHEMAS.items() if identifiers.get(key)}


def _multi_cells(identifiers: Mapping[str, str]) -> dict[str, str]:
    return {key: identifiers[key] for key in MULTI_KEY_ORDER if identifiers.get(key)}


@dataclass
class Plan:
    rows: dict[tuple[str, str], list[Row]]       # (target, "remove" | "add") -> rows, in delta order
    settled: dict[int, Outcome]                 # deltas answered without a request
    skipped_values: int = 0


def plan_rows(connection: Connection, deltas: Sequence[Delta], value_name: str | None,
              existing: Mapping[str, Any], held_cleanup: bool = True) -> Plan:
    """Rows per downstream audience and operation. Removes go only to audiences that exist (nothing else can hold
    the member); adds create theirs on first use (the multi-key one only with `multi_key`)."""
    options = FacebookOptions.of(connection)
    rows: dict[tuple[str, str], list[Row]] = {}
    settled: dict[int, Outcome] = {}
    skipped = 0
    for index, delta in enumerate(deltas):
        if delta.op == "remove":
            held = {t: c for t, c in _targets(delta.identifiers, True).items() if t in existing}
            for target, cells in held.items():
                rows.setdefault((target, "remove"), []).append(Row(index, True, cells))
            if not held:  # no audience of the connection can hold what it names
                settled[index] = Acknowledged()
            continue
        value: float | int | None = None
        if options.value_based is not None:
            value, why = lookalike_value(_value_of(delta, connection, value_name), options.allow_zero)
            if why is not None:
                skipped += 1
                settled[index] = Rejected(f"value-based audience: member skipped, {why}")
                continue
        new = _targets(delta.identifiers, options.multi_key)
        if not new:
            settled[index] = Rejected("no identifier this connection uploads (EXTERN_ID and matched attributes go "
                                      "only to the multi-key audience, settings.facebook.multi_key)")
            continue
        if held_cleanup and delta.held_identifiers:
            for target, cells in _targets(delta.held_identifiers, True).items():
                if target in existing and new.get(target) != cells:
                    rows.setdefault((target, "remove"), []).append(Row(index, False, cells))
        for target, cells in new.items():
            rows.setdefault((target, "add"), []).append(Row(index, True, cells, value))
    return Plan(rows, settled, skipped)


def _targets(identifiers: Mapping[str, str], multi_key: bool) -> dict[str, dict[str, str]]:
    targets: dict[str, dict[str, str]] = {}
    for schema, cells in _single_cells(identifiers).items():
        targets[schema] = cells
    if multi_key:
        cells = _multi_cells(identifiers)
        if cells:
            targets[MULTI_KEY] = cells
    return targets


def payload(target: str, rows: Sequence[Row], with_value: bool, columns: Sequence[str] | None = None
            ) -> dict[str, Any]:
    """The `payload` parameter for rows of one audience. A single-key audience without values takes its single
    key and a flat list; otherwise a schema array and rows in its order ("" for an unknown key)."""
    if target != MULTI_KEY and not with_value:
        key = next(k for k, schema in SINGLE_SCHEMAS.items() if schema == target)
        return {"schema": target, "is_raw": True, "data": [row.cells[key] for row in rows]}
    if target != MULTI_KEY:
        keys = [next(k for k, schema in SINGLE_SCHEMAS.items() if schema == target)]
    else:
        present = set(columns or ())
        for row in rows:
            present.update(row.cells)
        keys = [key for key in MULTI_KEY_ORDER if key in present]
    schema = [*keys, VALUE_COLUMN] if with_value else keys
    data = [[row.cells.get(key, "") for key in keys] + ([row.value] if with_value else []) for row in rows]
    return {"schema": schema, "is_raw": True, "data": data}


def multi_key_columns(connection: Connection) -> list[str]:
    """The keys a connection's multi-key rows can hold, in schema order (an empty replace still names them)."""
    keys = {key for _, key in fanout.identity_keys(connection)} | {key for _, key in fanout.attribute_keys(connection)}
    return [key for key in MULTI_KEY_ORDER if key in keys]


def _new_session_id() -> int:
    return random.SystemRandom().randrange(1, 1 << 62)


def appsecret_proof(app_secret: str, access_token: str) -> str:
    return hmac.new(app_secret.encode(), access_token.encode(), hashlib.sha256).hexdigest()


def description_of(connection: Connection, audience: AudienceRef, target: str) -> str:
    """What a created audience is described as: it names the connection (with its creation time, so another
    deployment's connection of the same id is not mistaken for it) and the key, to adopt it after a lost answer."""
    return f"idmesh connection {connection.id} ({connection.created_ms}), audience {audience.id}, {target}"


def name_of(audience: AudienceRef, target: str) -> str:
    return f"{(audience.external_name or audience.name)[:200]} {target}"


# --- the output -------------------------------------------------------------------------------------------------

class _Graph:
    """Requests to the Graph API for one connection: versioned paths, token and appsecret_proof."""

    def __init__(self, client: httpx.AsyncClient, connection: Connection) -> None:
        self.client = client
        options = FacebookOptions.of(connection)
        self.version = options.api_version
        token = connection.credentials.get("access_token", "")
        self.headers = {"Authorization": f"Bearer {token}"}
        secret = connection.credentials.get("app_secret")
        self.proof = {"appsecret_proof": appsecret_proof(secret, token)} if secret else {}

    async def send(self, method: str, path: str, body: dict[str, Any] | None = None,
                   params: dict[str, Any] | None = None) -> httpx.Response:
        url = f"/{self.version}/{path}"
        if method == "GET":
            return await self.client.get(url, params={**(params or {}), **self.proof}, headers=self.headers)
        content = orjson.dumps({**(body or {}), **self.proof})
        return await self.client.request(method, url, content=content,
                                         headers={**self.headers, "Content-Type": "application/json"})


class FacebookOutput:
    """The Facebook output of one connection, built per connection by the delivery service and closed with
    `aclose`. `store` keeps created audience ids durable (without one they live in memory, and a restart adopts
    them again by description); `value_attribute_name` names the forwarded attribute holding a value-based
    connection's value when it is a calculated attribute (see `value_attribute_name`). `client`, `clock`,
    `session_ids` and `sleep` are for tests."""

    kind = "facebook"

    def __init__(self, connection: Connection, audience: AudienceRef, *, store: RemoteStore | None = None,
                 value_attribute_name: str | None = None, client: httpx.AsyncClient | None = None,
                 clock: Callable[[], float] = time.monotonic, session_ids: Callable[[], int] = _new_session_id,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.connection = connection
        self.audience = audience
        self.store = store
        self._value_name = value_attribute_name
        self._client = client if client is not None else http_client(connection.base_url or "")
        self._owns_client = client is None
        self._clock = clock
        self._session_ids = session_ids
        self._sleep = sleep
        self._remote: dict[str, Any] = _copy_remote(connection.remote)
        self._listing: dict[str, tuple[str, bool]] | None = None   # description -> (id, value based)
        self._not_before = 0.0                        # clock time before which the account is known throttled
        self.last_report = UploadReport()
        self.totals = UploadReport()

    def batch_limit(self, connection: Connection) -> int:
        return FacebookOptions.of(connection).batch_size * SESSION_REQUESTS

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    @property
    def remote(self) -> dict[str, Any]:
        """What this output knows the destination holds for the connection (a copy)."""
        return _copy_remote(self._remote)

    def audience_ids(self) -> dict[str, str]:
        """Target key -> downstream audience id, as known now."""
        return {key: entry["id"] for key, entry in self._remote.get("audiences", {}).items()}

    # --- deliver ---------------------------------------------------------------------------------------------
    async def deliver(self, connection: Connection, deltas: list[Delta]) -> list[Outcome]:
        report = UploadReport()
        self.last_report = report
        try:
            return await self._deliver(connection, deltas, report)
        finally:
            self.totals.add(report)
            if report.invalid_entries:
                log.warning("connection %s: Facebook counted %d invalid entries (%s)", connection.id,
                            report.invalid_entries, ", ".join(sorted(set(report.invalid_samples.values())))[:300])

    async def _deliver(self, connection: Connection, deltas: list[Delta], report: UploadReport) -> list[Outcome]:
        if not deltas:
            return []
        self._merge_remote(connection)
        mismatch = self._account_mismatch(connection)
        if mismatch is not None:
            return [mismatch] * len(deltas)
        wait = self._not_before - self._clock()
        if wait > 0:
            return [RetryLater(f"Facebook throttled this ad account; access back in {wait:.0f} s", wait)] * len(deltas)
        options = FacebookOptions.of(connection)
        graph = _Graph(self._client, connection)
        known = self._remote.get("audiences", {})
        named = {t for d in deltas for ids in (d.identifiers if d.op == "remove" else d.held_identifiers,)
                 for t in _targets(ids, True)}
        if named - set(known):
            # a remove for an audience whose id is not recorded (no store, or lost): find it before deciding
            # that nothing downstream holds the member
            failure = await self._adopt(graph, connection, options, report)
            if failure is not None:
                return [failure.outcome] * len(deltas)
        plan = plan_rows(connection, deltas, value_attribute_name(connection, self._value_name),
                         self._remote.get("audiences", {}))
        report.skipped_values += plan.skipped_values
        results: dict[tuple[int, bool], list[Outcome]] = {}   # (delta index, primary) -> outcomes of its rows
        stopped: Outcome | None = None
        for target in TARGET_ORDER:
            for op in ("remove", "add"):
                rows = plan.rows.get((target, op))
                if not rows:
                    continue
                if stopped is not None:
                    _settle(results, rows, _not_sent(stopped))
                    continue
                failure = await self._upload(graph, connection, options, target, op, rows, results, report)
                if failure is not None and failure.stop:
                    stopped = failure.outcome
        return [plan.settled[i] if i in plan.settled else _per_delta(results.get((i, True), []),
                                                                     results.get((i, False), []))
                for i in range(len(deltas))]

    async def _upload(self, graph: _Graph, connection: Connection, options: FacebookOptions, target: str, op: str,
                      rows: list[Row], results: dict[tuple[int, bool], list[Outcome]],
                      report: UploadReport) -> GraphFailure | None:
        """One session of requests for one audience and operation; returns the failure that ended it, if any."""
        audience_id: str | None
        if op == "add":
            audience_id, failure = await self._ensure(graph, connection, options, target, report)
            if failure is not None:
                _settle(results, rows, failure.outcome)
                return failure
        else:
            audience_id = self._remote["audiences"][target]["id"]
        with_value = op == "add" and options.value_based is not None
        session_id = self._session_ids()
        chunks = [rows[start:start + options.batch_size] for start in range(0, len(rows), options.batch_size)]
        for seq, chunk in enumerate(chunks, start=1):
            body = {"payload": payload(target, chunk, with_value),
                    "session": {"session_id": session_id, "batch_seq": seq, "last_batch_flag": seq == len(chunks),
                                "estimated_num_total": len(rows)}}
            failure = await self._post_rows(graph, "DELETE" if op == "remove" else "POST", f"{audience_id}/users",
                                            body, len(chunk), report, f"{op} on audience {audience_id} ({target})")
            if failure is None:
                _settle(results, chunk, Acknowledged(200))
                continue
            _settle(results, chunk, failure.outcome)
            rest = [row for later in chunks[seq:] for row in later]
            if failure.gone:
                await self._forget(connection, target)
            if failure.stop or failure.gone:
                _settle(results, rest, _not_sent(failure.outcome))
                return failure
        return None

    async def _post_rows(self, graph: _Graph, method: str, path: str, body: dict[str, Any], rows: int,
                         report: UploadReport, what: str) -> GraphFailure | None:
        report.requests += 1
        report.rows += rows
        report.fills.append(rows)
        try:
            response = await graph.send(method, path, body)
        except httpx.HTTPError as exc:
            return transport_failure(exc, what)
        if not 200 <= response.status_code < 300:
            failure = graph_failure(response, what)
            self._note_throttle(failure)
            return failure
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
            failure = graph_failure(response, what)
            self._note_throttle(failure)
            return failure
        if isinstance(answer, dict):
            received, invalid = answer.get("num_received"), answer.get("num_invalid_entries")
            report.num_received += received if isinstance(received, int) else 0
            report.invalid_entries += invalid if isinstance(invalid, int) else 0
            samples = answer.get("invalid_entry_samples")
            if isinstance(samples, dict):
                for value, reason in list(samples.items())[:10]:
                    if len(report.invalid_samples) < 20:
                        report.invalid_samples[str(value)] = str(reason)
        return None

    def _note_throttle(self, failure: GraphFailure) -> None:
        outcome = failure.outcome
        if failure.throttled and isinstance(outcome, RetryLater) and outcome.after_seconds:
            self._not_before = max(self._not_before, self._clock() + outcome.after_seconds)

    # --- downstream audiences --------------------------------------------------------------------------------
    def _merge_remote(self, connection: Connection) -> None:
        """Ids the connection carries that this output has not seen (another output of it saved them) join."""
        given = connection.remote or {}
        if not self._remote and given:
            self._remote = _copy_remote(given)
            return
        mine = self._remote.setdefault("audiences", {})
        for key, entry in (given.get("audiences") or {}).items():
            mine.setdefault(key, dict(entry))

    def _account_mismatch(self, connection: Connection) -> Rejected | None:
        recorded = self._remote.get("ad_account_id")
        wanted = FacebookOptions.of(connection).ad_account_id
        if recorded and self._remote.get("audiences") and recorded != wanted:
            return Rejected(f"settings.facebook.ad_account_id changed from {recorded} to {wanted} after custom "
                            f"audiences were created in {recorded}; they hold the members sent so far. Create a new "
                            "connection for the new ad account (or set the old one back)")
        return None

    async def _ensure(self, graph: _Graph, connection: Connection, options: FacebookOptions, target: str,
                      report: UploadReport) -> tuple[str | None, GraphFailure | None]:
        """The id of the target's audience: recorded, else adopted by description, else created; recorded before
        it is returned."""
        value_based = options.value_based is not None
        entry = self._remote.get("audiences", {}).get(target)
        if entry is not None:
            if bool(entry.get("value_based")) != value_based:
                kind = "value-based" if entry.get("value_based") else "not value-based"
                return None, GraphFailure(Rejected(
                    f"custom audience {entry['id']} ({target}) was created {kind}, and settings.facebook.value_based "
                    "now says otherwise; Facebook cannot change that: create a new connection"), stop=False)
            return entry["id"], None
        description = description_of(connection, self.audience, target)
        listing, failure = await self._list(graph, options)
        if failure is not None:
            return None, failure
        found = listing.get(description)
        audience_id = found[0] if found is not None else None
        if found is not None:
            report.adopted.append(target)
            value_based = found[1]
        else:
            body: dict[str, Any] = {"name": name_of(self.audience, target), "subtype": "CUSTOM",
                                    "description": description,
                                    "customer_file_source": options.customer_file_source}
            if value_based:
                body["is_value_based"] = True
            what = f"creating the {target} custom audience in {options.ad_account_id}"
            try:
                response = await graph.send("POST", f"{options.ad_account_id}/customaudiences", body)
            except httpx.HTTPError as exc:
                self._listing = None   # the audience may exist now: list again before the next creation
                return None, transport_failure(exc, what)
            created = _json(response)
            if not 200 <= response.status_code < 300 or not isinstance(created.get("id"), str | int):
                self._listing = None
                failure = graph_failure(response, what)
                self._note_throttle(failure)
                return None, failure
            audience_id = str(created["id"])
            listing[description] = (audience_id, value_based)
            report.created.append(target)
        failure = await self._record(connection, options, {target: (audience_id, value_based)})
        if failure is not None:
            return None, failure
        if found is not None and found[1] != (options.value_based is not None):
            return await self._ensure(graph, connection, options, target, report)   # answers the mismatch
        return audience_id, None

    async def _record(self, connection: Connection, options: FacebookOptions,
                      found: Mapping[str, tuple[str, bool]]) -> GraphFailure | None:
        """Record audience ids (target -> (id, value based)), durably when there is a store, then in memory."""
        remote = _copy_remote(self._remote)
        remote["ad_account_id"] = options.ad_account_id
        for target, (audience_id, value_based) in found.items():
            remote.setdefault("audiences", {})[target] = {"id": audience_id, "name": name_of(self.audience, target),
                                                          "value_based": value_based}
        try:
            if self.store is not None:
                await self.store.save(connection, remote)
        except Exception as exc:  # noqa: BLE001 - any failure to record means: do not upload yet
            ids = ", ".join(f"{audience_id} ({target})" for target, (audience_id, _) in found.items())
            return GraphFailure(RetryLater(f"custom audience {ids} exists but could not be recorded: "
                                           f"{type(exc).__name__}: {exc}"[:500]), stop=True)
        self._remote = remote
        return None

    async def _adopt(self, graph: _Graph, connection: Connection, options: FacebookOptions,
                     report: UploadReport) -> GraphFailure | None:
        """Record the audiences of the ad account whose description names this connection and a target the
        output does not know yet (listed once per output)."""
        known = self._remote.get("audiences", {})
        if all(target in known for target in TARGET_ORDER):
            return None
        listing, failure = await self._list(graph, options)
        if failure is not None:
            return failure
        found = {target: listing[description] for target in TARGET_ORDER if target not in known
                 and (description := description_of(connection, self.audience, target)) in listing}
        if not found:
            return None
        report.adopted.extend(found)
        return await self._record(connection, options, found)

    async def _list(self, graph: _Graph, options: FacebookOptions
                    ) -> tuple[dict[str, tuple[str, bool]], GraphFailure | None]:
        """description -> (id, value based) of the ad account's custom audiences (listed once per output)."""
        if self._listing is not None:
            return self._listing, None
        found: dict[str, tuple[str, bool]] = {}
        params: dict[str, Any] = {"fields": "id,name,description,is_value_based", "limit": 500}
        what = f"listing the custom audiences of {options.ad_account_id}"
        for _ in range(LIST_PAGES):
            try:
                response = await graph.send("GET", f"{options.ad_account_id}/customaudiences", params=params)
            except httpx.HTTPError as exc:
                return found, transport_failure(exc, what)
            page = _json(response)
            if not 200 <= response.status_code < 300 or not isinstance(page.get("data"), list):
                failure = graph_failure(response, what)
                self._note_throttle(failure)
                return found, failure
            for item in page["data"]:
                if isinstance(item, dict) and isinstance(item.get("description"), str) and item.get("id"):
                    found.setdefault(item["description"], (str(item["id"]), item.get("is_value_based") is True))
            paging = page.get("paging") if isinstance(page.get("paging"), dict) else {}
            after = (paging.get("cursors") or {}).get("after") if isinstance(paging.get("cursors"), dict) else None
            if not paging.get("next") or not after:
                break
            params = {**params, "after": after}
        self._listing = found
        return found, None

    async def _forget(self, connection: Connection, target: str) -> None:
        """The target's audience is gone downstream: drop its id so the next add creates it again."""
        remote = _copy_remote(self._remote)
        gone = remote.get("audiences", {}).pop(target, None)
        self._remote = remote
        if self._listing is not None and gone is not None:
            self._listing = {d: i for d, i in self._listing.items() if i[0] != gone.get("id")}
        log.warning("connection %s: custom audience %s (%s) no longer exists at Facebook; it is created again on the "
                    "next add, and a full resync (replace_all) refills it", connection.id,
                    gone.get("id") if gone else "?", target)
        if self.store is not None:
            try:
                await self.store.save(connection, remote)
            except Exception as exc:  # noqa: BLE001 - memory knows; the next gone answer tries again
                log.warning("connection %s: could not record that %s is gone: %s", connection.id, target, exc)

    # --- full resync -----------------------------------------------------------------------------------------
    async def replace_all(self, connection: Connection, members: Sequence[Delta],
                          max_attempts: int = REPLACE_ATTEMPTS) -> ReplaceResult:
        """Replace every downstream audience's membership with `members` (the connection's whole wanted set, as
        add deltas with their identifiers and attributes) through `/usersreplace`: per audience one session, its
        batches numbered from 1, the last flagged. A batch told to retry later is sent again (same session and
        batch_seq) after the backoff, up to `max_attempts` times. Audiences that exist but get no rows are emptied.

        For the caller (the delivery service or an API call; it should pause the connection's flushes meanwhile:
        Facebook refuses /users calls while a replace runs): when `completed`, the destination holds exactly the
        Acknowledged members, with the identifiers given; delivery_state should become that, and pending outbox
        rows be diffed again."""
        report = UploadReport()
        self.last_report = report
        outcomes: list[Outcome | None] = [None] * len(members)
        sessions: dict[str, str] = {}
        try:
            self._merge_remote(connection)
            mismatch = self._account_mismatch(connection)
            if mismatch is not None:
                return ReplaceResult([mismatch] * len(members), False, {}, report)
            options = FacebookOptions.of(connection)
            graph = _Graph(self._client, connection)
            failure = await self._adopt(graph, connection, options, report)   # so existing audiences are emptied
            if failure is not None:
                return ReplaceResult([failure.outcome] * len(members), False, {}, report)
            plan = plan_rows(connection, [Delta(d.seq, d.mpid, "add", d.identifiers, d.attributes, d.changed_ms)
                                          for d in members],
                             value_attribute_name(connection, self._value_name), {}, held_cleanup=False)
            report.skipped_values += plan.skipped_values
            for index, outcome in plan.settled.items():
                outcomes[index] = outcome
            targets = [t for t in TARGET_ORDER if (t, "add") in plan.rows or t in self._remote.get("audiences", {})]
            failures: dict[str, Outcome] = {}
            stopped: Outcome | None = None
            for target in targets:
                rows = plan.rows.get((target, "add"), [])
                if stopped is not None:
                    failures[target] = _not_sent(stopped)
                    continue
                failure = await self._replace_target(graph, connection, options, target, rows, sessions, report,
                                                     max_attempts)
                if failure is not None:
                    failures[target] = failure.outcome
                    if failure.stop:
                        stopped = failure.outcome
            by_owner: dict[int, list[Outcome]] = {}
            for (target, _), rows in plan.rows.items():
                for row in rows:
                    by_owner.setdefault(row.owner, []).append(failures.get(target, Acknowledged(200)))
            for index in range(len(members)):
                if outcomes[index] is None:
                    outcomes[index] = _per_delta(by_owner.get(index, []), [])
            return ReplaceResult([o for o in outcomes if o is not None], not failures, sessions, report)
        finally:
            self.totals.add(report)

    async def _replace_target(self, graph: _Graph, connection: Connection, options: FacebookOptions, target: str,
                              rows: list[Row], sessions: dict[str, str], report: UploadReport,
                              max_attempts: int) -> GraphFailure | None:
        audience_id, failure = await self._ensure(graph, connection, options, target, report)
        if failure is not None:
            return failure
        value_based = options.value_based is not None
        columns = multi_key_columns(connection) if target == MULTI_KEY else None
        session_id = self._session_ids()
        sessions[target] = str(session_id)
        chunks = [rows[start:start + options.batch_size] for start in range(0, len(rows), options.batch_size)] or [[]]
        for seq, chunk in enumerate(chunks, start=1):
            body = {"payload": payload(target, chunk, value_based, columns),
                    "session": {"session_id": session_id, "batch_seq": seq, "last_batch_flag": seq == len(chunks),
                                "estimated_num_total": len(rows)}}
            what = f"replace on audience {audience_id} ({target}), batch {seq}/{len(chunks)}"
            for attempt in range(1, max_attempts + 1):
                failure = await self._post_rows(graph, "POST", f"{audience_id}/usersreplace", body, len(chunk),
                                                report, what)
                if failure is None:
                    break
                if failure.gone:
                    await self._forget(connection, target)
                    return failure
                if not isinstance(failure.outcome, RetryLater) or attempt == max_attempts:
                    return failure
                await self._sleep(retry_delay(attempt, failure.outcome.after_seconds))
        return None

    # --- deletion --------------------------------------------------------------------------------------------
    async def delete_downstream(self, connection: Connection, force: bool = False) -> DeleteResult:
        """Delete the connection's downstream audiences with this output's client (see the module function)."""
        self._merge_remote(connection)
        merged = _with_remote(connection, self._remote)
        return await delete_downstream(merged, client=self._client, force=force, sleep=self._sleep)


async def delete_downstream(connection: Connection, *, client: httpx.AsyncClient | None = None, force: bool = False,
                            sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> DeleteResult:
    """`DELETE /{audience_id}` for every custom audience the connection created (its `remote`), called when the
    idmesh audience or the connection is deleted. Skipped when `delete_on_audience_delete` is false (unless
    `force`). An audience already gone counts as deleted. Throttling, 5xx and lost answers are retried a few times
    (at most DELETE_MAX_WAIT_SECONDS apart); what still fails is returned (and logged with its id) for the caller,
    who goes on deleting the connection: nothing here retries later."""
    options = FacebookOptions.of(connection)
    if not options.delete_on_audience_delete and not force:
        return DeleteResult([], {}, skipped=True)
    audiences = (connection.remote or {}).get("audiences") or {}
    if not audiences:
        return DeleteResult([], {})
    owned = client is None
    graph = _Graph(client if client is not None else http_client(connection.base_url or ""), connection)
    deleted: list[str] = []
    failed: dict[str, str] = {}
    try:
        for target in sorted(audiences):
            audience_id = str(audiences[target]["id"])
            what = f"deleting custom audience {audience_id} ({target})"
            for attempt in range(1, DELETE_ATTEMPTS + 1):
                try:
                    response = await graph.send("DELETE", audience_id, {})
                except httpx.HTTPError as exc:
                    failure: GraphFailure | None = transport_failure(exc, what)
                else:
                    failure = None if 200 <= response.status_code < 300 else graph_failure(response, what)
                if failure is None or failure.gone:
                    deleted.append(audience_id)
                    break
                if not isinstance(failure.outcome, RetryLater) or attempt == DELETE_ATTEMPTS:
                    failed[audience_id] = failure.outcome.reason
                    break
                await sleep(min(DELETE_MAX_WAIT_SECONDS, retry_delay(attempt, failure.outcome.after_seconds)))
    finally:
        if owned:
            await graph.client.aclose()
    for audience_id, reason in failed.items():
        log.warning("connection %s: custom audience %s was not deleted at Facebook: %s", connection.id, audience_id,
                    reason)
    return DeleteResult(deleted, failed)


# --- helpers ----------------------------------------------------------------------------------------------------

def _copy_remote(remote: Mapping[str, Any] | None) -> dict[str, Any]:
    if not remote:
        return {}
    copied = dict(remote)
    copied["audiences"] = {key: dict(entry) for key, entry in (remote.get("audiences") or {}).items()}
    return copied


def _with_remote(connection: Connection, remote: dict[str, Any]) -> Connection:
    return replace(connection, remote=remote or None)


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _settle(results: dict[tuple[int, bool], list[Outcome]], rows: Sequence[Row], outcome: Outcome) -> None:
    for row in rows:
        results.setdefault((row.owner, row.primary), []).append(outcome)


def _not_sent(cause: Outcome) -> Outcome:
    """The outcome of rows left unsent because an earlier request of the call stopped it."""
    if isinstance(cause, Rejected):
        return Rejected(cause.reason, cause.status)
    after = cause.after_seconds if isinstance(cause, RetryLater) else None
    return RetryLater(f"not sent: an earlier request failed ({getattr(cause, 'reason', '')})"[:500], after)


def _per_delta(primary: Sequence[Outcome], cleanup: Sequence[Outcome]) -> Outcome:
    """A delta's outcome from its rows': a retry anywhere wins (every row is sent again, each is idempotent), then
    a rejection of its own rows; a cleanup row refused for good does not hold the add back."""
    retry = next((o for o in (*primary, *cleanup) if isinstance(o, RetryLater)), None)
    rejected = next((o for o in primary if isinstance(o, Rejected)), None)
    acknowledged = next((o for o in primary if isinstance(o, Acknowledged)), None)
    return retry or rejected or acknowledged or Acknowledged()
