"""A fake Meta Graph API for customer-list custom audiences over real HTTP, mirroring ../shared/spec/outputs.md §2.

    facebook = FakeFacebook(access_tokens={"token"}).start()
    httpx.post(f"{facebook.base_url}/v25.0/act_1/customaudiences", data={"access_token": "token", "name": "a",
               "subtype": "CUSTOM", "customer_file_source": "USER_PROVIDED_ONLY"}).json()   # {"id": "..."}
    facebook.members(audience_id, "EMAIL")              # hashes now in the audience
    facebook.faults.configure(rate=0.3, seed=7)         # see fakes.faults

Endpoints, under `/v{N}.0/` (any N unless `api_versions` says which; another is code 2635):
- `POST /act_{id}/customaudiences` (name, subtype CUSTOM, description, customer_file_source, is_value_based) ->
  {"id"}; `GET` lists the account's audiences ({"data": [...]} with `fields`, default id only).
- `GET /{audience_id}` reads one (`fields` optional), `DELETE /{audience_id}` deletes it -> {"success": true}.
- `POST /{audience_id}/users` adds, `DELETE /{audience_id}/users` removes, `POST /{audience_id}/usersreplace`
  replaces -> {audience_id, session_id, num_received, num_invalid_entries, invalid_entry_samples}.
Parameters come from the query string, a form-urlencoded body (`payload`/`session` as JSON strings) or a JSON body
(as objects), merged in that order (§2.1). The token is `access_token` (any of those places) or
`Authorization: Bearer`; missing is code 104, unknown code 190 (OAuthException, HTTP 400); with `app_secret`
set, `appsecret_proof` must be hex HMAC-SHA256(app_secret, token), else code 100.

Uploads (§2.3, §2.7): `schema` is one single key (EMAIL_SHA256, PHONE_SHA256, MOBILE_ADVERTISER_ID; `data` a flat
list of strings) or an array of multi keys (`data` rows of the same width, "" for unknown). More than `max_rows`
(10,000) rows, an unknown key, a row of the wrong width or the wrong shape is a code 100 error and nothing is
applied. A row whose hashed columns are not 64 lowercase hex characters, that names no key at all, or whose
LOOKALIKE_VALUE is not a number >= 0 is an invalid entry: counted in `num_invalid_entries`, echoed in
`invalid_entry_samples` ({value: reason}, at most 10) and not applied. LOOKALIKE_VALUE is a code 100 error on an
audience that is not value-based, and required on adds and replaces to one that is.

Membership is kept per person, as Meta matches people: an added row's keys (EMAIL, PHONE, MADID, EXTERN_ID, ...)
join the person already holding any of them (persons sharing a key merge) and a removed row removes every person
holding any of its keys (fake's choice for the matching rule). Single keys count as their multi-key names
(EMAIL_SHA256 is EMAIL, PHONE_SHA256 is PHONE, MOBILE_ADVERTISER_ID is MADID).

Sessions (§2.3, §2.4): `session` {session_id, batch_seq >= 1, last_batch_flag, estimated_num_total} is optional on
/users (`require_session` makes it required) and required on /usersreplace. Every batch is recorded. A replace
session stages its rows and swaps them in as the whole membership once the last batch has arrived and every
batch_seq from 1 to it has (so batches may come out of order and be resent; a resent batch of a finished session
is answered as before and changes nothing; a new batch for a finished or superseded session is a code 100 error).
While a replace runs, /users calls are rejected with code 2650 (`replace_blocks_users`); a replace not finished
within `replace_timeout_seconds` is abandoned; a new replace session while one runs supersedes it
(`replace_conflict="supersede"`) or is rejected with code 2650 (`"reject"`). These rules are UNVERIFIED in the
spec (§2.4, §9.3): the fake's choice, configurable.

Throttling (§2.5): at most `rate_limit` calls per ad account per `rate_window_seconds` (default the Standard tier,
190,000 per hour); past it the answer is HTTP 400 with code `throttle_code` (80003 by default; 17 and 613 too).
Every answer about an account carries `X-Business-Use-Case-Usage` ({account id: [{type: custom_audience,
call_count, total_cputime, total_time (percent of the budget), estimated_time_to_regain_access (minutes)}]}).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import itertools
import math
import re
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.requests import Request
from starlette.responses import Response

from .faults import FaultInjector, FaultPlan, FaultResponses, LoggedRequest, PlainResponse, WindowBudget
from .server import FakeDestination

SINGLE_KEYS = {"EMAIL_SHA256": "EMAIL", "PHONE_SHA256": "PHONE", "MOBILE_ADVERTISER_ID": "MADID"}
MULTI_KEYS = ("EXTERN_ID", "EMAIL", "PHONE", "GEN", "DOBY", "DOBM", "DOBD", "LN", "FN", "FI", "CT", "ST", "ZIP",
              "MADID", "COUNTRY")
VALUE_KEY = "LOOKALIKE_VALUE"
UNHASHED_KEYS = frozenset({"EXTERN_ID", "MADID"})
CUSTOMER_FILE_SOURCES = ("USER_PROVIDED_ONLY", "PARTNER_PROVIDED_ONLY", "BOTH_USER_AND_PARTNER_PROVIDED")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MAX_SAMPLES = 10

THROTTLING = {
    4: ("(#4) Application request limit reached", None),
    17: ("(#17) User request limit reached", 2446079),
    613: ("(#613) Calls to this api have exceeded the rate limit.", 1487742),
    80003: ("(#80003) There have been too many calls to this ad-account. Wait a bit and try again.", None),
    80004: ("(#80004) There have been too many calls to this ad-account. Wait a bit and try again.", None),
}

Pair = tuple[str, str]  # (multi-key name, value)


@dataclass(frozen=True)
class FacebookConfig:
    access_tokens: frozenset[str] = frozenset({"fb-test-token"})
    app_secret: str | None = None
    api_versions: frozenset[str] | None = None  # e.g. {"v25.0"}; None: any v{N}.0
    ad_accounts: frozenset[str] | None = None  # account ids without "act_"; None: any
    max_rows: int = 10_000
    require_session: bool = False
    replace_blocks_users: bool = True
    replace_timeout_seconds: float = 90 * 60
    replace_conflict: str = "supersede"  # or "reject"
    rate_limit: int = 190_000
    rate_window_seconds: float = 3600.0
    throttle_code: int = 80003
    fault_throttle_codes: tuple[int, ...] = (17, 613, 80003)

    def __post_init__(self) -> None:
        if self.replace_conflict not in ("supersede", "reject"):
            raise ValueError("replace_conflict is 'supersede' or 'reject'")
        for code in (self.throttle_code, *self.fault_throttle_codes):
            if code not in THROTTLING:
                raise ValueError(f"unknown throttling code {code}; known: {sorted(THROTTLING)}")


class GraphError(Exception):
    def __init__(self, code: int, message: str, *, subcode: int | None = None, kind: str = "OAuthException",
                 transient: bool | None = None, user_title: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.subcode = subcode
        self.kind = kind
        self.transient = transient
        self.user_title = user_title


def invalid_parameter(message: str) -> GraphError:
    return GraphError(100, f"(#100) {message}")


def unknown_object(method: str, object_id: str) -> GraphError:
    return GraphError(100, f"Unsupported {method.lower()} request. Object with ID '{object_id}' does not exist, "
                           "cannot be loaded due to missing permissions, or does not support this operation.",
                      subcode=33, kind="GraphMethodException")


class Membership:
    """People in an audience: each person holds keys (pairs) and maybe a LOOKALIKE_VALUE; a key names one person."""

    def __init__(self) -> None:
        self._index: dict[Pair, int] = {}
        self._persons: dict[int, dict[str, set[str]]] = {}
        self._values: dict[int, float] = {}
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._persons)

    def add(self, pairs: list[Pair], value: float | None) -> None:
        found = {self._index[pair] for pair in pairs if pair in self._index}
        if found:
            person = min(found)
            for other in found - {person}:
                for key, values in self._persons.pop(other).items():
                    self._persons[person].setdefault(key, set()).update(values)
                    for item in values:
                        self._index[(key, item)] = person
                other_value = self._values.pop(other, None)
                if other_value is not None:
                    self._values.setdefault(person, other_value)
        else:
            person = next(self._ids)
            self._persons[person] = {}
        keys = self._persons[person]
        for key, item in pairs:
            keys.setdefault(key, set()).add(item)
            self._index[(key, item)] = person
        if value is not None:
            self._values[person] = value

    def remove(self, pairs: list[Pair]) -> None:
        for person in {self._index[pair] for pair in pairs if pair in self._index}:
            for key, values in self._persons.pop(person).items():
                for item in values:
                    del self._index[(key, item)]
            self._values.pop(person, None)

    def members(self, key: str) -> set[str]:
        return {item for (name, item) in self._index if name == key}

    def persons(self) -> list[dict[str, Any]]:
        people = []
        for person, keys in self._persons.items():
            entry: dict[str, Any] = {key: set(values) for key, values in keys.items()}
            if person in self._values:
                entry[VALUE_KEY] = self._values[person]
            people.append(entry)
        return people

    def values(self) -> dict[Pair, float]:
        return {pair: self._values[person] for pair, person in self._index.items() if person in self._values}


@dataclass
class SessionRecord:
    """One upload session as the fake saw it."""

    session_id: str
    edge: str  # "users" (POST), "users_delete" (DELETE) or "usersreplace"
    started_at: float
    batches: dict[int, int] = field(default_factory=dict)  # batch_seq -> rows received
    last_batch_seq: int | None = None
    estimated_num_total: int | None = None
    status: str = "open"  # open | finished | superseded | expired (replace sessions end; /users ones stay open)
    answers: dict[int, dict[str, Any]] = field(default_factory=dict)  # replace: batch_seq -> the answer given


@dataclass
class Audience:
    id: str
    account_id: str
    name: str
    description: str
    subtype: str
    customer_file_source: str
    is_value_based: bool
    created_at: float
    membership: Membership = field(default_factory=Membership)
    sessions: dict[str, SessionRecord] = field(default_factory=dict)
    replacing: tuple[str, Membership] | None = None  # (session_id, staged membership) while a replace runs
    deleted: bool = False


@dataclass(frozen=True)
class AudienceView:
    """A snapshot of an audience for assertions."""

    id: str
    account_id: str
    name: str
    description: str
    subtype: str
    customer_file_source: str
    is_value_based: bool
    deleted: bool
    size: int
    members: dict[str, set[str]]  # key -> values held (e.g. "EMAIL" -> hashes)
    persons: list[dict[str, Any]]  # each {key: values, "LOOKALIKE_VALUE": value?}
    values: dict[Pair, float]  # (key, value) -> LOOKALIKE_VALUE of its person
    sessions: dict[str, SessionRecord]
    replace_in_progress: str | None  # the running replace session's id


@dataclass(frozen=True)
class UploadRows:
    pairs: list[list[Pair]]  # per valid row
    values: list[float | None]
    received: int
    invalid: int
    samples: dict[str, str]


def _parse_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def parse_rows(payload: Any, *, value_based: bool, needs_value: bool, max_rows: int) -> UploadRows:
    """Validate an upload's payload; GraphError for what fails the whole request, invalid entries counted."""
    if not isinstance(payload, dict):
        raise invalid_parameter("param payload must be an object with 'schema' and 'data'")
    schema, data = payload.get("schema"), payload.get("data")
    if schema is None:
        raise invalid_parameter("The parameter payload[schema] is required")
    if not isinstance(data, list):
        raise invalid_parameter("The parameter payload[data] is required and must be an array")
    if len(data) > max_rows:
        raise invalid_parameter(f"payload[data] holds {len(data)} rows; at most {max_rows} per request")
    if isinstance(schema, str):
        if schema not in SINGLE_KEYS:
            raise invalid_parameter(f"Invalid schema key: {schema}; single keys are {', '.join(SINGLE_KEYS)}")
        columns = [SINGLE_KEYS[schema]]
        rows: list[list[Any]] = []
        for index, item in enumerate(data):
            if not isinstance(item, str):
                raise invalid_parameter(f"payload[data][{index}]: a single-key schema takes a flat list of strings")
            rows.append([item])
    elif isinstance(schema, list) and schema:
        for key in schema:
            if key not in MULTI_KEYS and key != VALUE_KEY:
                raise invalid_parameter(f"Invalid schema key: {key}")
        if len(set(schema)) != len(schema):
            raise invalid_parameter("payload[schema] names a key twice")
        columns = list(schema)
        rows = data
        for index, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != len(columns):
                width = len(row) if isinstance(row, list) else "not an array"
                raise invalid_parameter(f"payload[data][{index}] has {width} values; the schema has {len(columns)} keys")
    else:
        raise invalid_parameter("payload[schema] must be a key or a non-empty array of keys")
    if VALUE_KEY in columns and not value_based:
        raise invalid_parameter("LOOKALIKE_VALUE is only accepted by value-based audiences")
    if needs_value and VALUE_KEY not in columns:
        raise invalid_parameter("a value-based audience needs a LOOKALIKE_VALUE column")
    value_at = columns.index(VALUE_KEY) if VALUE_KEY in columns else None
    checked = [(position, key, key not in UNHASHED_KEYS) for position, key in enumerate(columns) if key != VALUE_KEY]
    all_pairs: list[list[Pair]] = []
    values: list[float | None] = []
    invalid = 0
    samples: dict[str, str] = {}
    for row in rows:
        pairs: list[Pair] = []
        problem: tuple[str, str] | None = None
        for position, key, hashed in checked:
            item = row[position]
            if item == "":
                continue
            if not isinstance(item, str) or (hashed and not SHA256_HEX.fullmatch(item)):
                problem = (str(item), f"{key}: not a SHA-256 hex digest" if hashed else f"{key}: not a string")
                break
            pairs.append((key, item))
        value = None
        if problem is None and value_at is not None:
            value = _parse_number(row[value_at])
            if value is None and needs_value:
                problem = (str(row[value_at]), "LOOKALIKE_VALUE: not a number >= 0")
        if problem is None and not pairs:
            problem = (orjson.dumps(row).decode(), "the row names no key")
        if problem is not None:
            invalid += 1
            if len(samples) < MAX_SAMPLES:
                samples[problem[0]] = problem[1]
            continue
        all_pairs.append(pairs)
        values.append(value)
    return UploadRows(all_pairs, values, len(rows), invalid, samples)


@dataclass(frozen=True)
class SessionParam:
    session_id: str
    batch_seq: int
    last_batch_flag: bool
    estimated_num_total: int | None


def parse_session(session: Any) -> SessionParam:
    if not isinstance(session, dict):
        raise invalid_parameter("param session must be an object")
    session_id, batch_seq = session.get("session_id"), session.get("batch_seq")
    if isinstance(session_id, str) and session_id.isdigit():
        session_id = int(session_id)
    if isinstance(session_id, bool) or not isinstance(session_id, int) or not 0 <= session_id < 2**63:
        raise invalid_parameter("param session[session_id] must be an int64")
    if isinstance(batch_seq, bool) or not isinstance(batch_seq, int) or batch_seq < 1:
        raise invalid_parameter("param session[batch_seq] must be an integer from 1")
    last = session.get("last_batch_flag", False)
    if not isinstance(last, bool):
        raise invalid_parameter("param session[last_batch_flag] must be a boolean")
    total = session.get("estimated_num_total")
    if total is not None and (isinstance(total, bool) or not isinstance(total, int)):
        raise invalid_parameter("param session[estimated_num_total] must be an integer")
    return SessionParam(str(session_id), batch_seq, last, total)


def _boolean(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise invalid_parameter(f"param {name} must be a boolean")


class FacebookFaultResponses(FaultResponses):
    def __init__(self, fake: FakeFacebook) -> None:
        self.fake = fake

    def throttled(self, injector: FaultInjector, request: LoggedRequest) -> PlainResponse:
        code = injector.choice(list(self.fake.config.fault_throttle_codes))
        body = self.fake.error_body(throttling_error(code))
        usage = orjson.dumps({self.fake.account_of(request.path): [
            {"type": "custom_audience", "call_count": 100, "total_cputime": 100, "total_time": 100,
             "estimated_time_to_regain_access": 0}]})
        return PlainResponse(400, body, [(b"x-business-use-case-usage", usage)])

    def server_error(self, injector: FaultInjector, request: LoggedRequest) -> PlainResponse:
        answer = super().server_error(injector, request)
        if answer.status != 500:
            return answer
        error = GraphError(2, "An unexpected error has occurred. Please retry your request later.", transient=True)
        return PlainResponse(500, self.fake.error_body(error))


def throttling_error(code: int) -> GraphError:
    message, subcode = THROTTLING[code]
    return GraphError(code, message, subcode=subcode, transient=True)


ACCOUNT_EDGE = re.compile(r"act_(\d+)/customaudiences/?")
AUDIENCE_EDGE = re.compile(r"(\d+)/(users|usersreplace)/?")
AUDIENCE_NODE = re.compile(r"(\d+)/?")
VERSIONED = re.compile(r"/(v\d+\.0)/(.*)")
AUDIENCE_FIELDS = ("id", "account_id", "name", "description", "subtype", "customer_file_source", "is_value_based",
                   "approximate_count_lower_bound", "approximate_count_upper_bound", "operation_status")


class FakeFacebook(FakeDestination):
    def __init__(self, config: FacebookConfig | None = None, *, faults: FaultPlan | None = None,
                 log_limit: int = 10_000, keep_bodies: bool = True, clock: Any = time.time, **settings: Any) -> None:
        self.config = replace(config or FacebookConfig(), **_frozen(settings))
        self.clock = clock
        self._lock = threading.Lock()
        self._audiences: dict[str, Audience] = {}
        self._audience_ids = itertools.count(23850000000000001)
        self._session_ids = itertools.count(7000000001)
        self._trace_ids = itertools.count(1)
        self.budget = WindowBudget(self.config.rate_limit, self.config.rate_window_seconds, clock)
        super().__init__(self._asgi, FacebookFaultResponses(self), faults, log_limit, keep_bodies)

    # -- configuration and inspection, from the test's thread --------------------------------------------------
    def configure(self, **settings: Any) -> FacebookConfig:
        """Change settings at run time (e.g. `rate_limit=5`, `replace_conflict="reject"`); the rate window restarts."""
        with self._lock:
            self.config = replace(self.config, **_frozen(settings))
            self.budget = WindowBudget(self.config.rate_limit, self.config.rate_window_seconds, self.clock)
        return self.config

    def audiences(self, include_deleted: bool = False) -> dict[str, AudienceView]:
        with self._lock:
            return {audience_id: self._view(audience) for audience_id, audience in self._audiences.items()
                    if include_deleted or not audience.deleted}

    def audience(self, audience_id: str) -> AudienceView:
        """Deleted audiences too (`deleted` says so); KeyError for an id never created."""
        with self._lock:
            return self._view(self._audiences[str(audience_id)])

    def audience_named(self, name: str) -> AudienceView | None:
        """The live audience with this name (the newest, should a lost answer have made two)."""
        with self._lock:
            found = [audience for audience in self._audiences.values() if audience.name == name and not audience.deleted]
            return self._view(found[-1]) if found else None

    def members(self, audience_id: str, key: str = "EMAIL") -> set[str]:
        """Values of one key held by the audience's members; a single key may be given by its upload name."""
        with self._lock:
            return self._audiences[str(audience_id)].membership.members(SINGLE_KEYS.get(key, key))

    def create_audience(self, account_id: str, name: str, *, description: str = "",
                        customer_file_source: str = "USER_PROVIDED_ONLY", is_value_based: bool = False) -> str:
        """Create an audience directly, as if an earlier run had; returns its id."""
        with self._lock:
            return self._create(str(account_id), name, description, "CUSTOM", customer_file_source,
                                is_value_based).id

    def clear(self) -> None:
        """Forget every audience, logged request and rate window."""
        with self._lock:
            self._audiences.clear()
        self.budget.reset()
        self.log.clear()

    def account_of(self, path: str) -> str:
        """The ad account a request path concerns ("" when none is known)."""
        matched = VERSIONED.fullmatch(path)
        rest = matched.group(2) if matched else ""
        account = ACCOUNT_EDGE.fullmatch(rest)
        if account:
            return account.group(1)
        audience_id = rest.split("/", 1)[0]
        with self._lock:
            audience = self._audiences.get(audience_id)
            return audience.account_id if audience is not None else ""

    def _view(self, audience: Audience) -> AudienceView:
        membership = audience.membership
        keys = {key for person in membership.persons() for key in person if key != VALUE_KEY}
        return AudienceView(
            id=audience.id, account_id=audience.account_id, name=audience.name, description=audience.description,
            subtype=audience.subtype, customer_file_source=audience.customer_file_source,
            is_value_based=audience.is_value_based, deleted=audience.deleted, size=len(membership),
            members={key: membership.members(key) for key in keys}, persons=membership.persons(),
            values=membership.values(), sessions=copy.deepcopy(audience.sessions),
            replace_in_progress=audience.replacing[0] if audience.replacing else None)

    # -- HTTP ---------------------------------------------------------------------------------------------------
    def error_body(self, error: GraphError) -> bytes:
        body: dict[str, Any] = {"message": error.message, "type": error.kind, "code": error.code}
        if error.subcode is not None:
            body["error_subcode"] = error.subcode
        if error.transient is not None:
            body["is_transient"] = error.transient
        if error.user_title is not None:
            body["error_user_title"] = error.user_title
        body["fbtrace_id"] = f"AFake{next(self._trace_ids):08d}"
        return orjson.dumps({"error": body})

    def _usage_header(self, account_id: str) -> tuple[bytes, bytes]:
        used, reset_at = self.budget.peek(account_id)
        limit = self.config.rate_limit
        percent = min(100, math.ceil(100 * used / limit)) if limit else (100 if used else 0)
        regain = math.ceil(max(0.0, reset_at - self.clock()) / 60) if used > limit else 0
        usage = {account_id: [{"type": "custom_audience", "call_count": percent, "total_cputime": percent // 2,
                               "total_time": percent // 2, "estimated_time_to_regain_access": regain}]}
        return b"x-business-use-case-usage", orjson.dumps(usage)

    async def _asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        headers: list[tuple[bytes, bytes]] = []
        try:
            status, body = await self._handle(request, headers)
        except GraphError as error:
            status, body = (500 if error.code == 2 else 400), self.error_body(error)
        response = Response(body, status_code=status, media_type="application/json")
        response.raw_headers.extend(headers)
        await response(scope, receive, send)

    async def _handle(self, request: Request, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
        config = self.config
        matched = VERSIONED.fullmatch(request.url.path)
        if matched is None:
            raise GraphError(2500, f"Unknown path components: {request.url.path}")
        version, rest = matched.groups()
        if config.api_versions is not None and version not in config.api_versions:
            latest = max(config.api_versions, key=lambda v: int(v[1:].split(".")[0]))
            raise GraphError(2635, f"(#2635) You are calling a deprecated version of the Ads API. "
                                   f"Please update to the latest version: {latest}.")
        params = await self._params(request)
        self._authenticate(request, params, config)
        method = request.method
        account = ACCOUNT_EDGE.fullmatch(rest)
        edge = AUDIENCE_EDGE.fullmatch(rest)
        node = AUDIENCE_NODE.fullmatch(rest)
        with self._lock:
            if account:
                account_id = account.group(1)
                if config.ad_accounts is not None and account_id not in config.ad_accounts:
                    raise unknown_object(method, f"act_{account_id}")
                if method not in ("POST", "GET"):
                    raise unknown_object(method, f"act_{account_id}")
                self._spend(account_id, headers)
                if method == "POST":
                    return 200, orjson.dumps({"id": self._create_from(account_id, params).id})
                return 200, orjson.dumps(self._list(account_id, params))
            found = edge or node
            if found is None:
                raise GraphError(100, f"Unsupported {method.lower()} request.", kind="GraphMethodException")
            audience = self._audiences.get(found.group(1))
            if audience is None or audience.deleted:
                raise unknown_object(method, found.group(1))
            self._spend(audience.account_id, headers)
            if node:
                if method == "GET":
                    return 200, orjson.dumps(self._read(audience, params))
                if method == "DELETE":
                    audience.deleted = True
                    return 200, b'{"success":true}'
                raise unknown_object(method, audience.id)
            if edge.group(2) == "users" and method in ("POST", "DELETE"):
                answer = self._users(audience, params, remove=method == "DELETE", config=config)
            elif edge.group(2) == "usersreplace" and method == "POST":
                answer = self._replace(audience, params, config)
            else:
                raise unknown_object(method, audience.id)
            return 200, orjson.dumps(answer)

    async def _params(self, request: Request) -> dict[str, Any]:
        """Query string, then a form or JSON body; `payload` and `session` given as JSON strings are decoded."""
        params: dict[str, Any] = dict(parse_qsl(request.url.query, keep_blank_values=True))
        body = await request.body()
        if body:
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type == "application/x-www-form-urlencoded":
                params.update(parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))
            elif content_type == "application/json":
                try:
                    decoded = orjson.loads(body)
                except orjson.JSONDecodeError as error:
                    raise invalid_parameter(f"the JSON body does not parse: {error}") from None
                if not isinstance(decoded, dict):
                    raise invalid_parameter("the JSON body must be an object")
                params.update(decoded)
            else:
                raise invalid_parameter(f"unsupported Content-Type {content_type or '(none)'}")
        for name in ("payload", "session"):
            if isinstance(params.get(name), str):
                try:
                    params[name] = orjson.loads(params[name])
                except orjson.JSONDecodeError:
                    raise invalid_parameter(f"param {name} must be JSON") from None
        return params

    def _authenticate(self, request: Request, params: dict[str, Any], config: FacebookConfig) -> None:
        token = params.get("access_token")
        if token is None:
            scheme, _, credential = request.headers.get("authorization", "").partition(" ")
            token = credential if scheme.lower() in ("bearer", "oauth") and credential else None
        if token is None:
            raise GraphError(104, "An access token is required to request this resource.")
        if token not in config.access_tokens:
            raise GraphError(190, "Invalid OAuth access token - Cannot parse access token", subcode=None)
        if config.app_secret is not None:
            proof = hmac.new(config.app_secret.encode(), token.encode(), hashlib.sha256).hexdigest()
            if not hmac.compare_digest(str(params.get("appsecret_proof", "")), proof):
                raise invalid_parameter("Invalid appsecret_proof provided in the API argument")

    def _spend(self, account_id: str, headers: list[tuple[bytes, bytes]]) -> None:
        allowed, _, _ = self.budget.take(account_id)
        headers.append(self._usage_header(account_id))
        if not allowed:
            raise throttling_error(self.config.throttle_code)

    def _create(self, account_id: str, name: str, description: str, subtype: str, source: str, value_based: bool
                ) -> Audience:
        audience = Audience(str(next(self._audience_ids)), account_id, name, description, subtype, source,
                            value_based, self.clock())
        self._audiences[audience.id] = audience
        return audience

    def _create_from(self, account_id: str, params: dict[str, Any]) -> Audience:
        name = params.get("name")
        if not isinstance(name, str) or not name.strip():
            raise invalid_parameter("The parameter name is required")
        subtype = params.get("subtype", "CUSTOM")
        if subtype != "CUSTOM":
            raise invalid_parameter(f"subtype {subtype!r}: this fake serves customer lists (CUSTOM) only")
        source = params.get("customer_file_source")
        if source not in CUSTOMER_FILE_SOURCES:
            raise invalid_parameter(f"param customer_file_source must be one of {', '.join(CUSTOMER_FILE_SOURCES)}")
        description = params.get("description", "")
        if not isinstance(description, str):
            raise invalid_parameter("param description must be a string")
        value_based = _boolean(params.get("is_value_based", False), "is_value_based")
        return self._create(account_id, name, description, subtype, source, value_based)

    def _fields(self, audience: Audience) -> dict[str, Any]:
        size = len(audience.membership)
        return {"id": audience.id, "account_id": f"act_{audience.account_id}", "name": audience.name,
                "description": audience.description, "subtype": audience.subtype,
                "customer_file_source": audience.customer_file_source, "is_value_based": audience.is_value_based,
                "approximate_count_lower_bound": size, "approximate_count_upper_bound": size,
                "operation_status": {"code": 200, "description": "Normal"}}

    def _requested(self, params: dict[str, Any], default: tuple[str, ...]) -> list[str]:
        fields = params.get("fields")
        if fields is None:
            return list(default)
        names = [name.strip() for name in str(fields).split(",") if name.strip()]
        unknown = [name for name in names if name not in AUDIENCE_FIELDS]
        if unknown:
            raise invalid_parameter(f"Tried accessing nonexisting field ({unknown[0]})")
        return ["id", *[name for name in names if name != "id"]]

    def _read(self, audience: Audience, params: dict[str, Any]) -> dict[str, Any]:
        values = self._fields(audience)
        return {name: values[name] for name in self._requested(params, ("id", "name", "description"))}

    def _list(self, account_id: str, params: dict[str, Any]) -> dict[str, Any]:
        names = self._requested(params, ("id",))
        data = [{name: values[name] for name in names}
                for audience in self._audiences.values() if audience.account_id == account_id and not audience.deleted
                for values in [self._fields(audience)]]
        return {"data": data, "paging": {"cursors": {"before": "", "after": ""}}}

    def _replace_running(self, audience: Audience, config: FacebookConfig) -> str | None:
        """The running replace session's id, after abandoning one that outlived `replace_timeout_seconds`."""
        if audience.replacing is None:
            return None
        session_id = audience.replacing[0]
        record = audience.sessions[session_id]
        if self.clock() - record.started_at > config.replace_timeout_seconds:
            record.status = "expired"
            audience.replacing = None
            return None
        return session_id

    def _session_record(self, audience: Audience, session: SessionParam | None, edge: str) -> str:
        if session is None:
            return str(next(self._session_ids))
        record = audience.sessions.get(session.session_id)
        if record is None:
            record = SessionRecord(session.session_id, edge, self.clock(), estimated_num_total=session.estimated_num_total)
            audience.sessions[session.session_id] = record
        return session.session_id

    def _users(self, audience: Audience, params: dict[str, Any], remove: bool, config: FacebookConfig
               ) -> dict[str, Any]:
        if "payload" not in params:
            raise invalid_parameter("The parameter payload is required")
        session = parse_session(params["session"]) if params.get("session") is not None else None
        if session is None and config.require_session:
            raise invalid_parameter("The parameter session is required")
        if config.replace_blocks_users and self._replace_running(audience, config) is not None:
            raise GraphError(2650, "(#2650) Failed to update the custom audience: a replace session is in progress",
                             user_title="Audience replace in progress", transient=True)
        rows = parse_rows(params["payload"], value_based=audience.is_value_based,
                          needs_value=audience.is_value_based and not remove, max_rows=config.max_rows)
        session_id = self._session_record(audience, session, "users_delete" if remove else "users")
        if session is not None:
            record = audience.sessions[session_id]
            record.batches[session.batch_seq] = record.batches.get(session.batch_seq, 0) + rows.received
            if session.last_batch_flag:
                record.last_batch_seq = session.batch_seq
        membership = audience.membership
        for pairs, value in zip(rows.pairs, rows.values):
            if remove:
                membership.remove(pairs)
            else:
                membership.add(pairs, value)
        return _answer(audience, session_id, rows)

    def _replace(self, audience: Audience, params: dict[str, Any], config: FacebookConfig) -> dict[str, Any]:
        if "payload" not in params:
            raise invalid_parameter("The parameter payload is required")
        if params.get("session") is None:
            raise invalid_parameter("The parameter session is required")
        session = parse_session(params["session"])
        rows = parse_rows(params["payload"], value_based=audience.is_value_based,
                          needs_value=audience.is_value_based, max_rows=config.max_rows)
        running = self._replace_running(audience, config)
        record = audience.sessions.get(session.session_id)
        if record is not None and record.edge != "usersreplace":
            raise invalid_parameter(f"session {session.session_id} belongs to the /users edge")
        if record is not None and record.status != "open":
            if session.batch_seq in record.answers:
                return record.answers[session.batch_seq]  # a resent batch of a finished session: answered as before
            raise invalid_parameter(f"replace session {session.session_id} is {record.status}")
        if running is not None and running != session.session_id:
            if config.replace_conflict == "reject":
                raise GraphError(2650, "(#2650) Failed to update the custom audience: another replace session is "
                                       "in progress", user_title="Audience replace in progress", transient=True)
            audience.sessions[running].status = "superseded"
            audience.replacing = None
        if audience.replacing is None:
            self._session_record(audience, session, "usersreplace")
            audience.replacing = (session.session_id, Membership())
        record = audience.sessions[session.session_id]
        staged = audience.replacing[1]
        for pairs, value in zip(rows.pairs, rows.values):
            staged.add(pairs, value)
        record.batches[session.batch_seq] = rows.received
        if session.last_batch_flag:
            record.last_batch_seq = session.batch_seq
        answer = _answer(audience, session.session_id, rows)
        record.answers[session.batch_seq] = answer
        last = record.last_batch_seq
        if last is not None and all(seq in record.batches for seq in range(1, last + 1)):
            audience.membership = staged
            audience.replacing = None
            record.status = "finished"
        return answer


def _answer(audience: Audience, session_id: str, rows: UploadRows) -> dict[str, Any]:
    return {"audience_id": audience.id, "session_id": session_id, "num_received": rows.received,
            "num_invalid_entries": rows.invalid, "invalid_entry_samples": rows.samples}


def _frozen(settings: dict[str, Any]) -> dict[str, Any]:
    for name in ("access_tokens", "api_versions", "ad_accounts"):
        if settings.get(name) is not None:
            settings[name] = frozenset(str(item) for item in settings[name])
    if "fault_throttle_codes" in settings:
        settings["fault_throttle_codes"] = tuple(settings["fault_throttle_codes"])
    return settings
