"""A fake Braze REST API (`POST /users/track`) over real HTTP, mirroring ../shared/spec/outputs.md §1.

    braze = FakeBraze(api_keys={"key"}).start()      # or `with FakeBraze() as braze:`
    httpx.post(f"{braze.base_url}/users/track", json=..., headers={"Authorization": "Bearer key"})
    braze.user(external_id="u1")                     # that profile's attributes, or None
    braze.faults.configure(rate=0.3, seed=7)         # see fakes.faults
    braze.stop()

Behaviour (spec §1.2, §1.3, §1.5); choices the spec leaves open are marked "fake's choice":
- `Authorization: Bearer <key>` with a key from `api_keys`, else 401; a key in `forbidden_keys` (no `users.track`
  permission) gets 403. A body that is not JSON, or not `application/json`, is a 400 (fake's choice: spec §1.1 calls
  the header required).
- More than `max_objects` (75) in any of `attributes`, `events`, `purchases`, or more than `max_total_objects`
  across them when set (the 50-object MAU contracts), is a 400 `Max Input Length Exceeded`; nothing is applied.
- Each object names its user by `external_id`, `user_alias` {alias_name, alias_label}, `braze_id`, `email` or
  `phone`, taken in that order when several are present (email before phone as Braze does; the rest is the
  fake's choice). Each identifier is its own profile here: the fake does not link an external_id to an email.
  An object without one (or with a malformed one, or malformed values) is skipped and reported in `errors[]` as
  {type, input_array, index}; the rest of the request is applied and answered 201.
- `_update_existing_only`: true never creates a profile; omitted, a new external_id, email or phone creates one,
  while user_alias and braze_id default to true (a braze_id profile exists only when seeded with `seed_user`).
  An object for a profile it may not create is counted as processed and changes nothing (recorded in `skipped`).
- Attributes: a plain value sets; null removes; a plain array replaces (duplicates collapse); `{"add": [...]}` adds
  (an element already present moves to the end) and `{"remove": [...]}` removes, add first when both are given
  (fake's choice); arrays longer than `array_cap` (25) keep their newest elements (the last ones; which end Braze
  truncates is not documented: fake's choice). `{"inc": n}` increments. Arrays of objects: a plain array of objects
  sets, `$add` appends, `$remove` drops by `$identifier_key`/`$identifier_value`, `$update` merges `$new_object`
  and needs `"_merge_objects": true`. Other objects set (merged with `_merge_objects`).
- Events (`name`, `time`) and purchases (`product_id`, `currency`, `price`, `time`) are recorded, in the order
  attributes, events, purchases, and create profiles under the same rules.
- Success: 201 {"message": "success", "<array>_processed": n for each array sent, "errors": [...] if any}.
- Rate limit: at most `rate_limit` requests per `rate_window_seconds` (3,000 per 3 s); past it 429. Every answer of
  /users/track carries X-RateLimit-Limit, X-RateLimit-Remaining and X-RateLimit-Reset (epoch seconds), 429 too,
  an injected throttle included (Remaining 0); injected 5xx and 504 answers model a proxy and carry none.
- Not modelled: the 202 `{"message": "queued"}` maintenance answer, /users/track/bulk, /users/delete, /users/identify.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .faults import FaultInjector, FaultPlan, FaultResponses, LoggedRequest, PlainResponse, WindowBudget
from .server import FakeDestination

UserKey = tuple[str, str]  # ("external_id", "u1"), ("user_alias", "<alias_label>:<alias_name>"), ("email", ...)

ARRAYS = ("attributes", "events", "purchases")
IDENTIFIER_FIELDS = ("external_id", "user_alias", "braze_id", "email", "phone")
CONTROL_FIELDS = frozenset({"external_id", "user_alias", "braze_id", "_update_existing_only", "_merge_objects"})
MISSING_IDENTIFIER = "'external_id' or 'braze_id' or 'user_alias' is required"


@dataclass(frozen=True)
class BrazeConfig:
    api_keys: frozenset[str] = frozenset({"braze-test-key"})
    forbidden_keys: frozenset[str] = frozenset()
    max_objects: int = 75
    max_total_objects: int | None = None
    array_cap: int = 25
    rate_limit: int = 3000
    rate_window_seconds: float = 3.0


class InvalidObject(Exception):
    """An object Braze reports in `errors[]` and skips."""


@dataclass
class BrazeState:
    users: dict[UserKey, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    purchases: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, int, UserKey]] = field(default_factory=list)  # (input_array, index, user): not created


def user_key(obj: dict[str, Any]) -> tuple[UserKey, str]:
    """The profile an object names and the field that named it; InvalidObject when there is none or it is bad."""
    for name in IDENTIFIER_FIELDS:
        if name not in obj or obj[name] is None:
            continue
        value = obj[name]
        if name == "user_alias":
            if not (isinstance(value, dict) and isinstance(value.get("alias_name"), str)
                    and isinstance(value.get("alias_label"), str) and value["alias_name"] and value["alias_label"]):
                raise InvalidObject("'user_alias' must be an object with 'alias_name' and 'alias_label'")
            return ("user_alias", f"{value['alias_label']}:{value['alias_name']}"), name
        if not isinstance(value, str) or not value:
            raise InvalidObject(f"'{name}' must be a non-empty string")
        return (name, value), name
    raise InvalidObject(MISSING_IDENTIFIER)


def may_create(obj: dict[str, Any], identified_by: str) -> bool:
    update_existing_only = obj.get("_update_existing_only")
    if update_existing_only is None:
        return identified_by not in ("user_alias", "braze_id")
    if not isinstance(update_existing_only, bool):
        raise InvalidObject("'_update_existing_only' must be a boolean")
    return not update_existing_only


def _unique(values: list[Any]) -> list[Any]:
    seen: list[Any] = []
    for value in values:
        if isinstance(value, (dict, list)):
            raise InvalidObject("string arrays hold strings, numbers or booleans")
        if value in seen:
            seen.remove(value)  # a repeated element counts as added again: it moves to the end
        seen.append(value)
    return seen


def _capped(values: list[Any], cap: int) -> list[Any]:
    return values[-cap:] if len(values) > cap else values


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for name, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = _merge(merged[name], value)
        elif value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    return merged


def _object_array_op(current: Any, ops: dict[str, Any], merge_objects: bool) -> list[Any]:
    items = list(current) if isinstance(current, list) else []
    for op, argument in ops.items():
        if op not in ("$add", "$remove", "$update"):
            raise InvalidObject(f"unknown array of objects operation '{op}'")
        if not isinstance(argument, list) or not all(isinstance(item, dict) for item in argument):
            raise InvalidObject(f"'{op}' takes an array of objects")
        if op == "$add":
            items.extend(argument)
            continue
        if op == "$update" and not merge_objects:
            raise InvalidObject("'$update' needs '_merge_objects': true")
        for selector in argument:
            if "$identifier_key" not in selector or "$identifier_value" not in selector:
                raise InvalidObject(f"'{op}' items need '$identifier_key' and '$identifier_value'")
            key, value = selector["$identifier_key"], selector["$identifier_value"]
            if op == "$remove":
                items = [item for item in items if not (isinstance(item, dict) and item.get(key) == value)]
            else:
                new_object = selector.get("$new_object")
                if not isinstance(new_object, dict):
                    raise InvalidObject("'$update' items need a '$new_object'")
                items = [_merge(item, new_object) if isinstance(item, dict) and item.get(key) == value else item
                         for item in items]
    return items


def apply_attributes(current: dict[str, Any], obj: dict[str, Any], identified_by: str, array_cap: int
                     ) -> dict[str, Any]:
    """The profile's attributes after `obj`; `current` is left alone, so an invalid object changes nothing."""
    attributes = dict(current)
    merge_objects = obj.get("_merge_objects") is True
    for name, value in obj.items():
        if name in CONTROL_FIELDS or name == identified_by:
            continue
        existing = attributes.get(name)
        if value is None:
            attributes.pop(name, None)
        elif isinstance(value, list):
            if value and all(isinstance(item, dict) for item in value):
                attributes[name] = list(value)
            else:
                attributes[name] = _capped(_unique(value), array_cap)
        elif isinstance(value, dict) and value and value.keys() <= {"add", "remove"}:
            added, removed = value.get("add", []), value.get("remove", [])
            if not isinstance(added, list) or not isinstance(removed, list):
                raise InvalidObject(f"'add' and 'remove' on '{name}' take arrays")
            values = _unique(list(existing) + added if isinstance(existing, list) else added)
            if removed:
                _unique(removed)  # the same element check
                values = [item for item in values if item not in removed]
            attributes[name] = _capped(values, array_cap)
        elif isinstance(value, dict) and value.keys() == {"inc"}:
            step = value["inc"]
            if isinstance(step, bool) or not isinstance(step, (int, float)):
                raise InvalidObject(f"'inc' on '{name}' takes a number")
            base = existing if isinstance(existing, (int, float)) and not isinstance(existing, bool) else 0
            attributes[name] = base + step
        elif isinstance(value, dict) and any(op.startswith("$") for op in value):
            attributes[name] = _object_array_op(existing, value, merge_objects)
        elif isinstance(value, dict):
            attributes[name] = _merge(existing, value) if merge_objects and isinstance(existing, dict) else value
        else:
            attributes[name] = value
    return attributes


def _check_event(obj: dict[str, Any]) -> None:
    if not isinstance(obj.get("name"), str) or not obj["name"]:
        raise InvalidObject("'name' is required")
    if not isinstance(obj.get("time"), str):
        raise InvalidObject("'time' is required")


def _check_purchase(obj: dict[str, Any]) -> None:
    if not isinstance(obj.get("product_id"), str) or not obj["product_id"]:
        raise InvalidObject("'product_id' is required")
    if not isinstance(obj.get("currency"), str):
        raise InvalidObject("'currency' is required")
    if isinstance(obj.get("price"), bool) or not isinstance(obj.get("price"), (int, float)):
        raise InvalidObject("'price' must be a number")
    if not isinstance(obj.get("time"), str):
        raise InvalidObject("'time' is required")


class BrazeFaultResponses(FaultResponses):
    def __init__(self, fake: FakeBraze) -> None:
        self.fake = fake

    def throttled(self, injector: FaultInjector, request: LoggedRequest) -> PlainResponse:
        return PlainResponse(429, orjson.dumps({"message": "API rate limit reached", "errors": []}),
                             self.fake.rate_limit_headers(exhausted=True))


class FakeBraze(FakeDestination):
    def __init__(self, config: BrazeConfig | None = None, *, faults: FaultPlan | None = None, log_limit: int = 10_000,
                 keep_bodies: bool = True, clock: Callable[[], float] = time.time, **settings: Any) -> None:
        if "api_keys" in settings:
            settings["api_keys"] = frozenset(settings["api_keys"])
        if "forbidden_keys" in settings:
            settings["forbidden_keys"] = frozenset(settings["forbidden_keys"])
        self.config = replace(config or BrazeConfig(), **settings)
        self.state = BrazeState()
        self._lock = threading.Lock()
        self.budget = WindowBudget(self.config.rate_limit, self.config.rate_window_seconds, clock)
        app = Starlette(routes=[Route("/users/track", self._track, methods=["POST"])])
        super().__init__(app, BrazeFaultResponses(self), faults, log_limit, keep_bodies)

    # -- configuration and inspection, from the test's thread --------------------------------------------------
    def configure(self, **settings: Any) -> BrazeConfig:
        """Change settings at run time (e.g. `array_cap=100`, `rate_limit=10`); the rate window restarts."""
        for name in ("api_keys", "forbidden_keys"):
            if name in settings:
                settings[name] = frozenset(settings[name])
        with self._lock:
            self.config = replace(self.config, **settings)
            self.budget = WindowBudget(self.config.rate_limit, self.config.rate_window_seconds, self.budget.clock)
        return self.config

    def users(self) -> dict[UserKey, dict[str, Any]]:
        """A deep copy of every profile: {(identifier field, value): attributes}."""
        with self._lock:
            return copy.deepcopy(self.state.users)

    def user(self, external_id: str | None = None, *, user_alias: dict[str, str] | None = None,
             braze_id: str | None = None, email: str | None = None, phone: str | None = None) -> dict[str, Any] | None:
        named = {"external_id": external_id, "user_alias": user_alias, "braze_id": braze_id, "email": email,
                 "phone": phone}
        key, _ = user_key({name: value for name, value in named.items() if value is not None})
        with self._lock:
            attributes = self.state.users.get(key)
            return copy.deepcopy(attributes) if attributes is not None else None

    def users_with(self, attribute: str, value: Any) -> set[UserKey]:
        """Profiles whose `attribute` equals `value` or, for an array, contains it."""
        with self._lock:
            return {key for key, attributes in self.state.users.items()
                    if attributes.get(attribute) == value
                    or (isinstance(attributes.get(attribute), list) and value in attributes[attribute])}

    def events(self) -> list[dict[str, Any]]:
        """Recorded events, each with `user` (its UserKey) added."""
        with self._lock:
            return copy.deepcopy(self.state.events)

    def purchases(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self.state.purchases)

    def skipped(self) -> list[tuple[str, int, UserKey]]:
        """Objects for profiles `_update_existing_only` kept from being created: (input_array, index, user)."""
        with self._lock:
            return list(self.state.skipped)

    def seed_user(self, key: UserKey, attributes: dict[str, Any] | None = None) -> None:
        """Create a profile directly (e.g. ("braze_id", "...") or one `_update_existing_only` then updates)."""
        with self._lock:
            self.state.users[key] = dict(attributes or {})

    def clear(self) -> None:
        """Forget every profile, event, purchase, logged request and the rate window."""
        with self._lock:
            self.state = BrazeState()
        self.budget.reset()
        self.log.clear()

    # -- HTTP ---------------------------------------------------------------------------------------------------
    def rate_limit_headers(self, exhausted: bool = False, used: int | None = None, reset_at: float | None = None
                           ) -> list[tuple[bytes, bytes]]:
        if used is None or reset_at is None:
            used, reset_at = self.budget.peek()
        limit = self.config.rate_limit
        remaining = 0 if exhausted else max(0, limit - used)
        return [(b"x-ratelimit-limit", str(limit).encode()), (b"x-ratelimit-remaining", str(remaining).encode()),
                (b"x-ratelimit-reset", str(math.ceil(reset_at)).encode())]

    def _json(self, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> Response:
        response = Response(orjson.dumps(body), status_code=status, media_type="application/json")
        response.raw_headers.extend(headers)
        return response

    async def _track(self, request: Request) -> Response:
        config = self.config
        authorization = request.headers.get("authorization", "")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or key not in config.api_keys | config.forbidden_keys:
            return self._json(401, {"message": "Invalid API Key"}, self.rate_limit_headers())
        if key in config.forbidden_keys:
            return self._json(403, {"message": "API key lacks the users.track permission"}, self.rate_limit_headers())
        allowed, used, reset_at = self.budget.take()
        headers = self.rate_limit_headers(not allowed, used, reset_at)
        if not allowed:
            return self._json(429, {"message": "API rate limit reached", "errors": []}, headers)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return self._json(400, {"message": "Bad Syntax", "errors": ["Content-Type must be application/json"]},
                              headers)
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as error:
            return self._json(400, {"message": "Bad Syntax", "errors": [f"invalid JSON: {error}"]}, headers)
        if not isinstance(body, dict):
            return self._json(400, {"message": "Bad Syntax", "errors": ["the body must be a JSON object"]}, headers)
        present = [name for name in ARRAYS if name in body]
        for name in present:
            if not isinstance(body[name], list):
                return self._json(400, {"message": "Bad Syntax", "errors": [f"'{name}' must be an array"]}, headers)
        if not present:
            return self._json(400, {"message": "Bad Syntax",
                                    "errors": ["one of 'attributes', 'events' or 'purchases' is required"]}, headers)
        too_long = [name for name in present if len(body[name]) > config.max_objects]
        total = sum(len(body[name]) for name in present)
        if too_long or (config.max_total_objects is not None and total > config.max_total_objects):
            detail = (f"'{too_long[0]}' holds {len(body[too_long[0]])} objects, at most {config.max_objects}"
                      if too_long else f"{total} objects in all, at most {config.max_total_objects}")
            return self._json(400, {"message": "Max Input Length Exceeded", "errors": [detail]}, headers)
        answer: dict[str, Any] = {"message": "success"}
        errors: list[dict[str, Any]] = []
        with self._lock:
            for name in present:
                processed = 0
                for index, obj in enumerate(body[name]):
                    try:
                        self._apply(name, index, obj, config)
                    except InvalidObject as error:
                        errors.append({"type": str(error), "input_array": name, "index": index})
                    else:
                        processed += 1
                answer[f"{name}_processed"] = processed
        if errors:
            answer["errors"] = errors
        return self._json(201, answer, headers)

    def _apply(self, array: str, index: int, obj: Any, config: BrazeConfig) -> None:
        """One object of one array, under the state lock; InvalidObject leaves the state as it was."""
        if not isinstance(obj, dict):
            raise InvalidObject(f"each item of '{array}' must be an object")
        key, identified_by = user_key(obj)
        create = may_create(obj, identified_by)
        users = self.state.users
        if array == "attributes":
            new = apply_attributes(users.get(key, {}), obj, identified_by, config.array_cap)
        elif array == "events":
            _check_event(obj)
        else:
            _check_purchase(obj)
        if key not in users and not create:
            self.state.skipped.append((array, index, key))
            return
        if array == "attributes":
            users[key] = new
            return
        users.setdefault(key, {})
        record = {name: value for name, value in obj.items() if name not in CONTROL_FIELDS}
        record["user"] = key
        (self.state.events if array == "events" else self.state.purchases).append(record)
