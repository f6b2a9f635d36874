"""Audience definitions (docs/audiences.md): parsed from plain JSON into frozen dataclasses, every problem a
BadRequest naming the field (`criteria.all[1].event.count.value`).

A definition is a name, how partners see it, its type (real_time, or standard with a refresh interval) and
one criteria tree: `all` / `any` / `not` nodes over leaves on events, user attributes, calculated attributes,
identities, profile times, consent and other audiences. Event conditions, attribute comparisons, time periods
and dates are the calculated attributes' (engine/ca_definitions.py), so both features compare alike.

Parsing needs nothing but the JSON. What needs the workspace (a calculated attribute must be active, another
audience must exist, audiences must not include each other in a circle) is `check_references`, which takes
lookups so the registry can call it with whatever it keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from engine.ca_definitions import (
    OPERATORS,
    Condition,
    TimePeriod,
    date_ms,
    parse_comparison,
    parse_condition,
    parse_data_point,
    parse_time_period,
)
from engine.errors import BadRequest
from engine.identity_types import ALL_IDENTITY_TYPES

MAX_NAME = 128
MAX_DESCRIPTION = 1000
MAX_DEPTH = 8            # levels from the root node to a leaf, both counted
MAX_LEAVES = 50
DEFAULT_REFRESH_MINUTES = 60
REFRESH_MINUTES = (5, 10_080)   # five minutes to a week
MAX_COUNT = 1_000_000_000
TYPES = ("real_time", "standard")
COUNT_OPERATORS = ("at_least", "at_most", "exactly", "more_than", "fewer_than", "between")
PROFILE_FIELDS = ("first_seen", "last_seen")
CCPA_PURPOSE = "data_sale_opt_out"


@dataclass(frozen=True)
class Count:
    """How many matching events a profile must have: `low` to `high` inclusive (`high` None: no limit)."""

    operator: str
    values: tuple[int, ...]
    low: int
    high: int | None

    def admits(self, count: int) -> bool:
        return self.low <= count and (self.high is None or count <= self.high)


AT_LEAST_ONE = Count("at_least", (1,), 1, None)


@dataclass(frozen=True)
class EventLeaf:
    event_type: str | None
    event_name: str | None
    conditions: tuple[Condition, ...]
    time_period: TimePeriod
    count: Count = AT_LEAST_ONE


@dataclass(frozen=True)
class UserAttributeLeaf:
    name: str
    operator: str                  # a calculated-attribute operator, or not_exists
    value_type: str
    values: tuple[Any, ...]

    def condition(self) -> Condition:
        return Condition(self.name, self.operator, self.value_type, self.values)


@dataclass(frozen=True)
class CalculatedAttributeLeaf:
    ca_id: int
    operator: str
    value_type: str
    values: tuple[Any, ...]

    def condition(self) -> Condition:
        return Condition(f"calculated attribute {self.ca_id}", self.operator, self.value_type, self.values)


@dataclass(frozen=True)
class IdentityLeaf:
    identity_type: str
    present: bool = True


@dataclass(frozen=True)
class ProfileLeaf:
    """The profile's first or last seen time lies in [as_of - window, as_of], at or after `after_ms` and
    before `before_ms` (each bound optional, at least one given)."""

    field: str                     # first_seen or last_seen
    window_ms: int | None = None
    after_ms: int | None = None
    before_ms: int | None = None


@dataclass(frozen=True)
class ConsentLeaf:
    """True when the profile's current answer for the purpose is `consented` (no statement answers false).
    A CCPA leaf asks about the `data_sale_opt_out` purpose, whose `consented` means "opted out"."""

    regulation: str                # gdpr or ccpa
    purpose: str                   # lower case
    consented: bool


@dataclass(frozen=True)
class AudienceLeaf:
    audience_id: int
    member: bool = True


@dataclass(frozen=True)
class AllOf:
    children: tuple[Criteria, ...]


@dataclass(frozen=True)
class AnyOf:
    children: tuple[Criteria, ...]


@dataclass(frozen=True)
class Not:
    child: Criteria


Leaf = EventLeaf | UserAttributeLeaf | CalculatedAttributeLeaf | IdentityLeaf | ProfileLeaf | ConsentLeaf | AudienceLeaf
Criteria = AllOf | AnyOf | Not | Leaf


@dataclass(frozen=True)
class AudienceDefinition:
    name: str
    external_name: str
    description: str | None
    type: str                      # real_time or standard
    refresh_minutes: int | None    # standard audiences only
    criteria: Criteria


# --- parsing -------------------------------------------------------------------------------------------------

def parse_audience(raw: Any) -> AudienceDefinition:
    """A whole definition. Keys other than the documented ones are ignored at this level (a client may send back
    read-only fields such as `id`), but not inside `criteria`, where a misspelt key would quietly change who
    belongs."""
    if not isinstance(raw, Mapping):
        raise BadRequest("the audience definition must be an object", field="definition")
    name = _name(raw, "name", required=True)
    external_name = _name(raw, "external_name") or name
    description = raw.get("description")
    if description is not None and (not isinstance(description, str) or len(description) > MAX_DESCRIPTION):
        raise BadRequest(f"description must be a string of at most {MAX_DESCRIPTION} characters", field="description")
    kind = raw.get("type", "real_time")
    if not isinstance(kind, str) or kind not in TYPES:
        raise BadRequest("type must be real_time or standard", field="type")
    refresh = raw.get("refresh_minutes")
    if kind == "real_time" and refresh is not None:
        raise BadRequest("refresh_minutes is for standard audiences (real-time ones follow every batch)",
                         field="refresh_minutes")
    if kind == "standard":
        refresh = DEFAULT_REFRESH_MINUTES if refresh is None else refresh
        low, high = REFRESH_MINUTES
        if not _whole(refresh) or not low <= refresh <= high:
            raise BadRequest(f"refresh_minutes must be a whole number from {low} to {high}", field="refresh_minutes")
    if "criteria" not in raw:
        raise BadRequest("criteria is required", field="criteria")
    return AudienceDefinition(name, external_name, description, kind, refresh, parse_criteria(raw["criteria"]))


def parse_criteria(raw: Any, path: str = "criteria") -> Criteria:
    """A criteria tree on its own (the preview endpoint, tests)."""
    leaves = [0]
    return _node(raw, path, 1, leaves)


def _name(raw: Mapping[str, Any], key: str, required: bool = False) -> str | None:
    value = raw.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or len(value.strip()) > MAX_NAME:
        raise BadRequest(f"{key} must be a non-empty string of at most {MAX_NAME} characters", field=key)
    return value.strip()


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object(raw: Any, path: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise BadRequest(f"{path} must be an object", field=path)
    for key in raw:
        if key not in allowed:
            raise BadRequest(f"{path}.{key} is not a field here (it takes {', '.join(allowed)})", field=f"{path}.{key}")
    return raw


_BRANCHES = ("all", "any", "not")


def _node(raw: Any, path: str, depth: int, leaves: list[int]) -> Criteria:
    keys = tuple(_BRANCHES) + tuple(_LEAVES)
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise BadRequest(f"{path} must be an object with exactly one of {', '.join(keys)}", field=path)
    (key, body), = raw.items()
    if key not in keys:
        raise BadRequest(f"{path}.{key} is not a criterion (one of {', '.join(keys)})", field=f"{path}.{key}")
    if depth > MAX_DEPTH:
        raise BadRequest(f"{path}: criteria nest at most {MAX_DEPTH} levels deep", field=path)
    where = f"{path}.{key}"
    if key == "not":
        return Not(_node(body, where, depth + 1, leaves))
    if key in ("all", "any"):
        if not isinstance(body, list) or not body:
            raise BadRequest(f"{where} must be a non-empty list of criteria", field=where)
        children = tuple(_node(child, f"{where}[{i}]", depth + 1, leaves) for i, child in enumerate(body))
        return AllOf(children) if key == "all" else AnyOf(children)
    leaves[0] += 1
    if leaves[0] > MAX_LEAVES:
        raise BadRequest(f"{path}: criteria hold at most {MAX_LEAVES} leaves", field=path)
    return _LEAVES[key](body, where)


def _event(raw: Any, path: str) -> EventLeaf:
    body = _object(raw, path, ("event_type", "event_name", "conditions", "time_period", "count"))
    point = parse_data_point(body, path)
    conditions = body.get("conditions", [])
    if conditions is None:
        conditions = []
    if not isinstance(conditions, list):
        raise BadRequest(f"{path}.conditions must be a list", field=f"{path}.conditions")
    parsed = tuple(parse_condition(c, f"{path}.conditions[{i}]") for i, c in enumerate(conditions))
    period = parse_time_period(body.get("time_period"), f"{path}.time_period")
    count = AT_LEAST_ONE if body.get("count") is None else _count(body["count"], f"{path}.count")
    return EventLeaf(point.event_type, point.event_name, parsed, period, count)


def _count(raw: Any, path: str) -> Count:
    body = _object(raw, path, ("operator", "value", "values"))
    operator = body.get("operator")
    if not isinstance(operator, str) or operator not in COUNT_OPERATORS:
        raise BadRequest(f"{path}.operator must be one of {', '.join(COUNT_OPERATORS)}", field=f"{path}.operator")
    if operator == "between":
        values = body.get("values")
        if "value" in body or not isinstance(values, list) or len(values) != 2:
            raise BadRequest(f"{path}.values must be [low, high] for between", field=f"{path}.values")
        for i, value in enumerate(values):
            if not _whole(value) or not 0 <= value <= MAX_COUNT:
                raise BadRequest(f"{path}.values[{i}] must be a whole number from 0 to {MAX_COUNT}",
                                 field=f"{path}.values[{i}]")
        if values[0] > values[1]:
            raise BadRequest(f"{path}.values: the lower bound comes first", field=f"{path}.values")
        return Count(operator, tuple(values), values[0], values[1])
    value = body.get("value")
    if "values" in body:
        raise BadRequest(f"{path}.values is for between; {operator} takes value", field=f"{path}.values")
    # fewer_than 0 and more_than the maximum could never hold: surely a mistake, so say so now
    low = 1 if operator == "fewer_than" else 0
    high = MAX_COUNT - 1 if operator == "more_than" else MAX_COUNT
    if not _whole(value) or not low <= value <= high:
        raise BadRequest(f"{path}.value must be a whole number from {low} to {high} for {operator}",
                         field=f"{path}.value")
    bounds = {"at_least": (value, None), "at_most": (0, value), "exactly": (value, value),
              "more_than": (value + 1, None), "fewer_than": (0, value - 1)}[operator]
    return Count(operator, (value,), *bounds)


def _attribute_comparison(body: Mapping[str, Any], path: str) -> tuple[str, str, tuple[Any, ...]]:
    """A comparison with the calculated-attribute operators, plus `not_exists`."""
    operator = body.get("operator")
    if operator == "not_exists":
        values = body.get("values", [])
        if values != []:
            raise BadRequest(f"{path}.values must be empty for not_exists", field=f"{path}.values")
        value_type = body.get("value_type", "string")
        if value_type not in ("string", "number", "boolean"):
            raise BadRequest(f"{path}.value_type must be string, number or boolean", field=f"{path}.value_type")
        return "not_exists", value_type, ()
    if not isinstance(operator, str) or operator not in OPERATORS:
        raise BadRequest(f"{path}.operator must be one of {', '.join(OPERATORS)}, not_exists", field=f"{path}.operator")
    return parse_comparison(body, path)


def _user_attribute(raw: Any, path: str) -> UserAttributeLeaf:
    body = _object(raw, path, ("name", "operator", "values", "value_type"))
    name = body.get("name")
    if not isinstance(name, str) or not name or len(name) > 256:
        raise BadRequest(f"{path}.name must be an attribute name of at most 256 characters", field=f"{path}.name")
    return UserAttributeLeaf(name, *_attribute_comparison(body, path))


def _calculated_attribute(raw: Any, path: str) -> CalculatedAttributeLeaf:
    body = _object(raw, path, ("id", "operator", "values", "value_type"))
    ca_id = body.get("id")
    if not _whole(ca_id) or ca_id <= 0:
        raise BadRequest(f"{path}.id must be the id of a calculated attribute", field=f"{path}.id")
    return CalculatedAttributeLeaf(ca_id, *_attribute_comparison(body, path))


def _identity(raw: Any, path: str) -> IdentityLeaf:
    body = _object(raw, path, ("type", "present"))
    identity_type = body.get("type")
    if not isinstance(identity_type, str) or identity_type not in ALL_IDENTITY_TYPES:
        raise BadRequest(f"{path}.type must be an identity type (IDSync spelling, e.g. email, customerid, ios_idfa)",
                         field=f"{path}.type")
    present = body.get("present", True)
    if not isinstance(present, bool):
        raise BadRequest(f"{path}.present must be true or false", field=f"{path}.present")
    return IdentityLeaf(identity_type, present)


def _profile(raw: Any, path: str) -> ProfileLeaf:
    body = _object(raw, path, ("field", "within_last", "before", "after"))
    field = body.get("field")
    if not isinstance(field, str) or field not in PROFILE_FIELDS:
        raise BadRequest(f"{path}.field must be first_seen or last_seen", field=f"{path}.field")
    window = None
    if body.get("within_last") is not None:
        within = _object(body["within_last"], f"{path}.within_last", ("value", "unit"))
        window = parse_time_period({"type": "within_last", **within}, f"{path}.within_last").window_ms
    after = None if body.get("after") is None else date_ms(body["after"], f"{path}.after")
    before = None if body.get("before") is None else date_ms(body["before"], f"{path}.before")
    if window is None and after is None and before is None:
        raise BadRequest(f"{path} needs within_last, before, after or several of them", field=path)
    if after is not None and before is not None and after >= before:
        raise BadRequest(f"{path}.before must come after {path}.after", field=f"{path}.before")
    return ProfileLeaf(field, window, after, before)


def _consent(raw: Any, path: str) -> ConsentLeaf:
    body = _object(raw, path, ("gdpr_purpose", "consented", "ccpa_data_sale_opt_out"))
    if "ccpa_data_sale_opt_out" in body:
        if len(body) != 1:
            raise BadRequest(f"{path} asks either about a GDPR purpose or about the CCPA data sale opt-out",
                             field=path)
        opted_out = body["ccpa_data_sale_opt_out"]
        if not isinstance(opted_out, bool):
            raise BadRequest(f"{path}.ccpa_data_sale_opt_out must be true or false",
                             field=f"{path}.ccpa_data_sale_opt_out")
        return ConsentLeaf("ccpa", CCPA_PURPOSE, opted_out)
    purpose = body.get("gdpr_purpose")
    if not isinstance(purpose, str) or not purpose.strip() or len(purpose) > 256:
        raise BadRequest(f"{path}.gdpr_purpose must name a purpose (or use ccpa_data_sale_opt_out)",
                         field=f"{path}.gdpr_purpose")
    consented = body.get("consented", True)
    if not isinstance(consented, bool):
        raise BadRequest(f"{path}.consented must be true or false", field=f"{path}.consented")
    # the SDKs send purposes lower-cased; matching without case keeps "Advertising" from silently never matching
    return ConsentLeaf("gdpr", purpose.strip().lower(), consented)


def _audience(raw: Any, path: str) -> AudienceLeaf:
    body = _object(raw, path, ("id", "member"))
    audience_id = body.get("id")
    if not _whole(audience_id) or audience_id <= 0:
        raise BadRequest(f"{path}.id must be the id of an audience", field=f"{path}.id")
    member = body.get("member", True)
    if not isinstance(member, bool):
        raise BadRequest(f"{path}.member must be true or false", field=f"{path}.member")
    return AudienceLeaf(audience_id, member)


_LEAVES: dict[str, Callable[[Any, str], Leaf]] = {
    "event": _event, "user_attribute": _user_attribute, "calculated_attribute": _calculated_attribute,
    "identity": _identity, "profile": _profile, "consent": _consent, "audience": _audience,
}


# --- walking a tree ------------------------------------------------------------------------------------------

def leaves_with_paths(criteria: Criteria, path: str = "criteria") -> Iterator[tuple[Leaf, str]]:
    """Every leaf with the path of its body in the JSON it was parsed from (`criteria.all[0].audience`)."""
    if isinstance(criteria, (AllOf, AnyOf)):
        key = "all" if isinstance(criteria, AllOf) else "any"
        for i, child in enumerate(criteria.children):
            yield from leaves_with_paths(child, f"{path}.{key}[{i}]")
    elif isinstance(criteria, Not):
        yield from leaves_with_paths(criteria.child, f"{path}.not")
    else:
        yield criteria, f"{path}.{_LEAF_KEYS[type(criteria)]}"


def leaves(criteria: Criteria) -> list[Leaf]:
    return [leaf for leaf, _ in leaves_with_paths(criteria)]


def referenced_audiences(criteria: Criteria) -> frozenset[int]:
    return frozenset(leaf.audience_id for leaf in leaves(criteria) if isinstance(leaf, AudienceLeaf))


def referenced_calculated_attributes(criteria: Criteria) -> frozenset[int]:
    return frozenset(leaf.ca_id for leaf in leaves(criteria) if isinstance(leaf, CalculatedAttributeLeaf))


def uses_time_windows(criteria: Criteria) -> bool:
    """Whether membership can change by time passing alone, through a `within_last` window (events leaving
    it, a profile's last seen time growing old). Other audiences and calculated attributes it reads may change
    by time too; their own upkeep covers that."""
    return any((isinstance(leaf, EventLeaf) and leaf.time_period.kind == "within_last")
               or (isinstance(leaf, ProfileLeaf) and leaf.window_ms is not None) for leaf in leaves(criteria))


_LEAF_KEYS = {EventLeaf: "event", UserAttributeLeaf: "user_attribute", CalculatedAttributeLeaf: "calculated_attribute",
              IdentityLeaf: "identity", ProfileLeaf: "profile", ConsentLeaf: "consent", AudienceLeaf: "audience"}


# --- checks against the workspace ----------------------------------------------------------------------------

def check_references(criteria: Criteria, ca_exists: Callable[[int], bool],
                     audience_criteria: Callable[[int], Criteria | None], audience_id: int | None = None,
                     path: str = "criteria") -> None:
    """Every calculated attribute the criteria read is an active one of the workspace (`ca_exists`), every
    audience they read exists (`audience_criteria` returns its criteria, None when there is no such audience
    in the workspace), and no audience reads itself, directly or through others. `audience_id` is the audience
    being updated (None when it is being created: nothing can read it yet)."""
    for leaf, where in leaves_with_paths(criteria, path):
        if isinstance(leaf, CalculatedAttributeLeaf) and not ca_exists(leaf.ca_id):
            raise BadRequest(f"{where}.id: no active calculated attribute {leaf.ca_id} in this workspace",
                             field=f"{where}.id")
        if not isinstance(leaf, AudienceLeaf):
            continue
        if leaf.audience_id == audience_id:
            raise BadRequest(f"{where}.id: an audience cannot include itself", field=f"{where}.id")
        if audience_criteria(leaf.audience_id) is None:
            raise BadRequest(f"{where}.id: no audience {leaf.audience_id} in this workspace", field=f"{where}.id")
        if audience_id is not None:
            chain = _path_to(leaf.audience_id, audience_id, audience_criteria)
            if chain is not None:
                circle = " -> ".join(str(a) for a in [audience_id, *chain])
                raise BadRequest(f"{where}.id: audiences would include each other in a circle ({circle})",
                                 field=f"{where}.id")


def _path_to(start: int, goal: int, audience_criteria: Callable[[int], Criteria | None]) -> list[int] | None:
    """The audiences from `start` to `goal` following audience leaves, or None when `goal` is out of reach."""
    came_from: dict[int, int | None] = {start: None}
    frontier = [start]
    while frontier:
        current = frontier.pop()
        if current == goal:
            chain = [current]
            while came_from[chain[-1]] is not None:
                chain.append(came_from[chain[-1]])
            return chain[::-1]
        found = audience_criteria(current)
        for target in sorted(referenced_audiences(found)) if found is not None else ():
            if target not in came_from:
                came_from[target] = current
                frontier.append(target)
    return None


def dependency_order(audiences: Mapping[int, Criteria]) -> list[int]:
    """The ids so that an audience comes after every audience of the mapping it reads (ties by id). Audiences
    it reads that are not in the mapping are taken as already evaluated. ValueError on a circle."""
    order: list[int] = []
    state: dict[int, str] = {}

    def visit(audience_id: int, trail: tuple[int, ...]) -> None:
        if state.get(audience_id) == "done":
            return
        if state.get(audience_id) == "open":
            raise ValueError(f"audiences include each other in a circle: {trail + (audience_id,)}")
        state[audience_id] = "open"
        for target in sorted(referenced_audiences(audiences[audience_id])):
            if target in audiences:
                visit(target, trail + (audience_id,))
        state[audience_id] = "done"
        order.append(audience_id)

    for audience_id in sorted(audiences):
        visit(audience_id, ())
    return order

