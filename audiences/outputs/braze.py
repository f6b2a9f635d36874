"""Braze audience output: membership as custom attributes on the user, through `POST {base_url}/users/track`
(../shared/spec/outputs.md §1; README, "Braze").

Braze has no API to maintain a segment's members, so, like mParticle's Braze audience integration, the output
sets attributes a Braze segment then filters on. "Send Segments As" (`settings.braze.send_segments_as`) picks
which, alone or combined:
- single string: `SegmentMembership` = "'<audience id>'", filtered with "matches regex" (set on add, removed with
  null on exit);
- single array: `SegmentMembershipArray` gets the audience id with `{"add": [...]}` and loses it with
  `{"remove": [...]}` (the string-array operations, never `$add`/`$remove`, which are for arrays of objects), so
  several connections share one array without overwriting each other;
- per segment: `In <external name>` = true on add, false on exit.
The modes single_string, single_array, per_segment, array_and_string, array_and_per_segment,
string_and_per_segment and all send the attributes of the parts they name, in one object per member.

One user per attributes object, named by the first of external_id (the connection's `external_id_type`), email,
phone that the delta's identifiers hold: a connection sends email or phone only when its `identity_types` list
them, so falling back to them is a setting, and a member with none of them is never enqueued (fanout). Adds carry
the forwarded attributes and create the profile unless `update_existing_only`; removes never create one.

Answers: 2xx acknowledges every object except those `errors[]` names by input_array/index (a validation error
is permanent, anything else is tried again alone); 429 and 5xx, timeouts and resets are tried again (with the
wait Retry-After, X-RateLimit-Retry-After or X-RateLimit-Reset asks for); 401, 403 and 404 reject the whole
batch with a reason naming the key (the rows stay parked until the connection's credentials change); another
400 is split in halves to find the objects it is about.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from audiences.outputs.base import (
    Acknowledged,
    AudienceRef,
    Delta,
    Outcome,
    Rejected,
    RetryLater,
    http_client,
    outcome_of_error,
    outcome_of_status,
    retry_after_seconds,
)

if TYPE_CHECKING:
    from audiences.connections import Connection

TRACK_PATH = "/users/track"
MAX_OBJECTS = 75  # per array and per request (spec §1.2); some contracts allow 50 across all arrays

# "Send Segments As": (single string, single array, one attribute per segment)
SEGMENT_MODES: dict[str, tuple[bool, bool, bool]] = {
    "single_string": (True, False, False),
    "single_array": (False, True, False),
    "per_segment": (False, False, True),
    "array_and_string": (True, True, False),
    "array_and_per_segment": (False, True, True),
    "string_and_per_segment": (True, False, True),
    "all": (True, True, True),
}

# Identifier fields in the order an object is named by (the delta's keys, from audiences/fanout.py).
IDENTIFIER_ORDER = ("external_id", "email", "phone")
# Fields of an attributes object that are not custom attributes: a forwarded attribute never takes their place.
CONTROL_FIELDS = frozenset({"external_id", "user_alias", "braze_id", "email", "phone", "_update_existing_only",
                            "_merge_objects"})

# errors[] items Braze reports for what it will never take as sent (identifiers, value shapes); any other item is
# taken as passing and tried again, up to MAX_ITEM_RETRIES times.
_PERMANENT_ITEM_ERROR = re.compile(
    r"required|invalid|must|malformed|not a valid|not valid|too long|exceed|takes|hold|unknown|not allowed|"
    r"not supported|bad", re.IGNORECASE)
MAX_ITEM_RETRIES = 8

# Requests one `deliver` may spend splitting 400 answers to find the objects they are about: about what one bad
# object among 75 costs (2 * log2(75) + 1). A 400 every half gets (a malformed request, not an object) ends it.
MAX_SPLIT_REQUESTS = 16

_AUTH_REASONS = {
    401: "the REST API key was not accepted (unknown or missing)",
    403: "the REST API key lacks the users.track permission, or the Braze account is inactive",
    404: "the REST API key is unknown at this Braze instance (check base_url)",
}


@dataclass(frozen=True)
class BrazeOptions:
    """A connection's Braze settings as the output reads them (validated by audiences/connections.py)."""

    send_string: bool
    send_array: bool
    send_per_segment: bool
    string_attribute: str
    array_attribute: str
    batch_size: int
    update_existing_only: bool

    @classmethod
    def of(cls, connection: Connection) -> BrazeOptions:
        block = connection.options
        string, array, per_segment = SEGMENT_MODES[block.get("send_segments_as", "single_string")]
        return cls(string, array, per_segment,
                   string_attribute=block.get("string_attribute", "SegmentMembership"),
                   array_attribute=block.get("array_attribute", "SegmentMembershipArray"),
                   batch_size=max(1, min(MAX_OBJECTS, int(block.get("batch_size", MAX_OBJECTS)))),
                   update_existing_only=bool(block.get("update_existing_only", False)))


def segment_attribute(audience: AudienceRef) -> str:
    """The per-segment boolean attribute's name, as mParticle names it: "In <external name>"."""
    return f"In {audience.external_name}"


def segment_value(audience: AudienceRef) -> str:
    """What the array holds for the audience: its id as text (mParticle sends audience ids)."""
    return str(audience.id)


def string_value(audience: AudienceRef) -> str:
    """The single string attribute's value: the quoted audience id, "'12'" (a segment filters it with
    "matches regex")."""
    return f"'{audience.id}'"


def braze_identifier(identifiers: Mapping[str, str]) -> tuple[str, str] | None:
    """The field and value that name the member's Braze profile: external_id, else email, else phone."""
    for name in IDENTIFIER_ORDER:
        value = identifiers.get(name)
        if isinstance(value, str) and value:
            return name, value
    return None


def membership_fields(options: BrazeOptions, audience: AudienceRef, member: bool) -> dict[str, Any]:
    """The attributes that say the profile is (or no longer is) in the audience."""
    fields: dict[str, Any] = {}
    if options.send_string:
        fields[options.string_attribute] = string_value(audience) if member else None
    if options.send_array:
        fields[options.array_attribute] = {"add" if member else "remove": [segment_value(audience)]}
    if options.send_per_segment:
        fields[segment_attribute(audience)] = member
    return fields


def forwarded_fields(attributes: Mapping[str, object], taken: set[str]) -> dict[str, Any]:
    """Forwarded user and calculated attributes as Braze custom attributes. Identifier and control fields and the
    membership attributes keep their meaning (a forwarded attribute of the same name is left out); values Braze
    would read as an operation or a nested object (a JSON object) are sent as their JSON text."""
    fields: dict[str, Any] = {}
    for name, value in attributes.items():
        if not name or name in CONTROL_FIELDS or name in taken:
            continue
        if isinstance(value, dict):
            value = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        elif isinstance(value, list):
            value = [v if v is None or isinstance(v, (str, int, float, bool)) else orjson.dumps(v).decode()
                     for v in value]
        fields[name] = value
    return fields


@dataclass(frozen=True)
class TrackObject:
    """One attributes object of a request and the delta it belongs to. `primary` is the object that carries the
    delta's own change; the other kind takes the membership off the profile a moved add named before."""

    owner: int
    body: dict[str, Any]
    primary: bool = True


def plan_objects(options: BrazeOptions, audience: AudienceRef, deltas: Sequence[Delta]
                 ) -> tuple[list[TrackObject], dict[int, Rejected]]:
    """The attributes objects for these deltas, and the deltas that cannot be sent at all (no identifier)."""
    objects: list[TrackObject] = []
    unsendable: dict[int, Rejected] = {}
    for index, delta in enumerate(deltas):
        named = braze_identifier(delta.identifiers)
        if named is None:
            unsendable[index] = Rejected("no Braze identifier: the member has no external id, email or phone among "
                                         f"the identifiers sent ({', '.join(sorted(delta.identifiers)) or 'none'})")
            continue
        field, value = named
        if delta.op == "add":
            membership = membership_fields(options, audience, member=True)
            body: dict[str, Any] = {field: value,
                                    **forwarded_fields(delta.attributes, set(membership)),
                                    **membership}
            if options.update_existing_only:
                body["_update_existing_only"] = True
            objects.append(TrackObject(index, body))
            held = braze_identifier(delta.held_identifiers)
            if held is not None and held != named:
                # the profile Braze held the membership on is not the one the add names now (say the member got a
                # customer id after being sent by email): take the membership off the old one, or it stays forever
                objects.append(TrackObject(index, _remove_body(options, audience, held), primary=False))
        else:
            objects.append(TrackObject(index, _remove_body(options, audience, named)))
    return objects, unsendable


def _remove_body(options: BrazeOptions, audience: AudienceRef, named: tuple[str, str]) -> dict[str, Any]:
    # an exit never creates a profile only to say it is not in the audience
    return {named[0]: named[1], **membership_fields(options, audience, member=False), "_update_existing_only": True}


def request_body(objects: Sequence[TrackObject]) -> bytes:
    return orjson.dumps({"attributes": [obj.body for obj in objects]})


def item_outcome(error_type: str, attempts: int, status: int) -> Outcome:
    """The outcome of one object `errors[]` names."""
    reason = f"Braze skipped the object: {error_type}"[:500]
    if _PERMANENT_ITEM_ERROR.search(error_type):
        return Rejected(reason, status)
    if attempts + 1 >= MAX_ITEM_RETRIES:
        return Rejected(f"{reason} (still failing after {attempts + 1} attempts)"[:500], status)
    return RetryLater(reason, None, status)


def indexed_errors(body: Any) -> dict[int, str]:
    """attributes index -> error type, from a 2xx answer's `errors[]` (items naming another array or no index
    are about nothing this output sent)."""
    errors = body.get("errors") if isinstance(body, dict) else None
    found: dict[int, str] = {}
    if not isinstance(errors, list):
        return found
    for item in errors:
        if not isinstance(item, dict) or item.get("input_array", "attributes") != "attributes":
            continue
        index = item.get("index")
        if isinstance(index, int) and not isinstance(index, bool) and index >= 0:
            found.setdefault(index, str(item.get("type") or item.get("message") or "error"))
    return found


def _answer_message(response: httpx.Response) -> str:
    """Braze's own words about a failed request: its `message` and `errors`, or the start of the body."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return text[:200]
    if isinstance(body, dict):
        parts = [str(body.get("message") or "")]
        errors = body.get("errors")
        if errors:
            parts.append(orjson.dumps(errors).decode()[:200])
        return "; ".join(p for p in parts if p)[:300]
    return str(body)[:200]


class BrazeOutput:
    """The Braze output of one connection: its own httpx client (Bearer key, JSON), built per connection by the
    delivery service and closed with `aclose`. `timeout` (seconds) replaces base.DEFAULT_TIMEOUT; `client` (not
    closed here) and `clock` are for tests."""

    kind = "braze"

    def __init__(self, connection: Connection, audience: AudienceRef, *, client: httpx.AsyncClient | None = None,
                 timeout: float | None = None, clock: Callable[[], float] = time.time) -> None:
        self.connection = connection
        self.audience = audience
        self.clock = clock
        self._client = client if client is not None else http_client(connection.base_url or "", timeout=timeout)
        self._owns_client = client is None
        self._not_before = 0.0  # epoch seconds: the rate-limit window the last answer said was spent closes then

    def batch_limit(self, connection: Connection) -> int:
        # one attributes object per delta (a moved add takes two; deliver then sends a second request)
        return BrazeOptions.of(connection).batch_size

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def deliver(self, connection: Connection, deltas: list[Delta]) -> list[Outcome]:
        options = BrazeOptions.of(connection)
        objects, unsendable = plan_objects(options, self.audience, deltas)
        per_object: list[Outcome | None] = [None] * len(objects)
        headers = {"Authorization": f"Bearer {connection.credentials.get('api_key', '')}",
                   "Content-Type": "application/json"}
        sender = _Sender(self, headers, deltas, objects, per_object)
        chunks = [list(range(start, min(start + options.batch_size, len(objects))))
                  for start in range(0, len(objects), options.batch_size)]
        for position, chunk in enumerate(chunks):
            wait = self._not_before - self.clock()
            if wait > 0:
                # the last answer said the rate-limit window is spent: do not send into a certain 429
                stop = RetryLater(f"Braze rate limit spent until its reset, {wait:.1f} s from now", wait)
                for later in chunks[position:]:
                    sender.settle(later, stop)
                break
            stopped = await sender.send(chunk)
            if stopped is not None:
                for later in chunks[position + 1:]:
                    sender.settle(later, _not_sent(stopped))
                break
        return _per_delta(deltas, objects, per_object, unsendable)

    def _note_rate_limit(self, response: httpx.Response) -> None:
        remaining = response.headers.get("x-ratelimit-remaining")
        reset = response.headers.get("x-ratelimit-reset")
        try:
            spent = remaining is not None and int(remaining) <= 0
            reset_at = float(reset) if reset is not None else 0.0
        except ValueError:
            return
        if spent and reset_at > self.clock():
            self._not_before = reset_at


class _Sender:
    """Sends chunks of one `deliver` call and settles each object's outcome."""

    def __init__(self, output: BrazeOutput, headers: dict[str, str], deltas: Sequence[Delta],
                 objects: Sequence[TrackObject], per_object: list[Outcome | None]) -> None:
        self.output = output
        self.headers = headers
        self.deltas = deltas
        self.objects = objects
        self.per_object = per_object
        self.split_requests = 0

    def settle(self, chunk: Sequence[int], outcome: Outcome) -> None:
        for i in chunk:
            self.per_object[i] = outcome

    async def send(self, chunk: list[int]) -> Outcome | None:
        """Send one chunk and settle its objects; the outcome that should stop the rest of the call (a 429, a
        5xx, no answer, a refused key), or None to go on."""
        output = self.output
        try:
            response = await output._client.post(TRACK_PATH, content=request_body([self.objects[i] for i in chunk]),
                                                  headers=self.headers)
        except httpx.HTTPError as exc:
            outcome = outcome_of_error(exc)
            self.settle(chunk, outcome)
            return outcome
        output._note_rate_limit(response)
        status = response.status_code
        if 200 <= status < 300:
            try:
                body = response.json()
            except ValueError:
                body = None  # a 2xx is success; a body we cannot read names no failed object
            errors = indexed_errors(body)
            for position, i in enumerate(chunk):
                error = errors.get(position)
                self.per_object[i] = Acknowledged(status) if error is None else \
                    item_outcome(error, self.deltas[self.objects[i].owner].attempts, status)
            return None
        if status in _AUTH_REASONS:
            outcome = Rejected(f"Braze answered {status}: {_AUTH_REASONS[status]} ({_answer_message(response)}); "
                               "the deltas stay parked until the connection's credentials or settings change", status)
            self.settle(chunk, outcome)
            return outcome
        if status in (400, 413) and len(chunk) > 1 and self.split_requests + 2 <= MAX_SPLIT_REQUESTS:
            # a 400 about the request names no object: halves find the ones it is about (and a request too large
            # for a contract's limit, "Max Input Length Exceeded", gets through as two)
            self.split_requests += 2
            middle = len(chunk) // 2
            for half in (chunk[:middle], chunk[middle:]):
                stopped = await self.send(half)
                if stopped is not None:
                    return stopped
            return None
        outcome = outcome_of_status(response)
        reason = f"Braze answered {status}: {_answer_message(response)}"
        if isinstance(outcome, RetryLater):
            outcome = RetryLater(reason, retry_after_seconds(response, output.clock()), status)
            self.settle(chunk, outcome)
            return outcome
        self.settle(chunk, Rejected(reason, status))
        return None


def _not_sent(cause: Outcome) -> Outcome:
    """The outcome of objects left unsent because an earlier request of the call stopped it."""
    if isinstance(cause, Rejected):
        return Rejected(cause.reason, cause.status)
    after = cause.after_seconds if isinstance(cause, RetryLater) else None
    return RetryLater(f"not sent: an earlier request of the batch failed ({getattr(cause, 'reason', '')})"[:500],
                      after)


def _per_delta(deltas: Sequence[Delta], objects: Sequence[TrackObject], per_object: Sequence[Outcome | None],
               unsendable: Mapping[int, Rejected]) -> list[Outcome]:
    """One outcome per delta from its objects': a retry wins (every object is sent again, each is idempotent), then
    the primary object's rejection; a cleanup object Braze refuses for good is not worth holding the add back."""
    outcomes: list[Outcome] = []
    by_owner: dict[int, list[tuple[TrackObject, Outcome]]] = {}
    for obj, outcome in zip(objects, per_object):
        by_owner.setdefault(obj.owner, []).append(
            (obj, outcome if outcome is not None else RetryLater("not sent")))
    for index in range(len(deltas)):
        if index in unsendable:
            outcomes.append(unsendable[index])
            continue
        results = by_owner.get(index, [])
        retry = next((o for _, o in results if isinstance(o, RetryLater)), None)
        rejected = next((o for obj, o in results if obj.primary and isinstance(o, Rejected)), None)
        acknowledged = next((o for obj, o in results if obj.primary and isinstance(o, Acknowledged)), None)
        outcomes.append(retry or rejected or acknowledged or RetryLater("not sent"))
    return outcomes
