"""Rule-based property test of the identity engine (spec A2, B§8): random identify / login / logout / search /
modify / alias sequences, in-process against IdSyncService over a real DuckDB file, once per strategy.

After every step the in-memory graph and the tables must agree and hold the contract's invariants:
(a) a unique-type value has at most one holder; (b) the login-ID gate; (c) MPIDs are never 0 and always exist;
(d) blocked values are never stored; (e) every acknowledged answer is in the store. A client error changes
nothing. Restarts (a step, and always at the end) must reload exactly the graph that was acknowledged, and a
read_only repeat of the last request must give the same MPID.
"""

from __future__ import annotations

import asyncio
import functools
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import engine as hypothesis_engine
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from engine.errors import BadRequest, Forbidden, LookupFailed, NotFound
from engine.idsync import IdSyncService
from strategies.model import Operation

# --- workspaces: each test run focuses on one, the others only serve cross-workspace references ---------------
WORKSPACES: dict[str, dict[str, Any]] = {
    "default": {"strategy": "default"},
    "profile_conversion": {"strategy": "profile_conversion", "hub_limit": 2},
    "profile_link": {"strategy": "profile_link", "hub_limit": 2},
    "profile_isolation": {"strategy": "profile_isolation", "hub_limit": 2},
    "best_match": {"strategy": "best_match", "hub_limit": 3},
    # Conversion with email as a second login/unique id and an immutable customer id (the immutable-id gate).
    "conversion_immutable": {"strategy": "profile_conversion", "login_ids": ["customerid", "email"],
                             "unique_ids": ["customerid", "email"], "immutable_ids": ["customerid"],
                             "hub_limit": 2},
}

# --- a small pool of values, so that collisions (and case/whitespace twins) are frequent ----------------------
POOL: dict[str, list[Any]] = {
    "customerid": ["cust-1", " cust-1 ", "cust-2", "CUST-2", 12345, "12345"],
    "email": ["ann@example.com", " Ann@Example.COM ", "bob@example.com", "BOB@example.com\t", "cat@example.com"],
    "mobile_number": ["+1 (555) 010-0001", "+15550100001", "555-0100-002"],
    "ios_idfv": ["dev-a", "DEV-A ", "dev-b", "dev-c"],
    "android_uuid": ["and-1", "AND-1", "and-2"],
}
BLOCKED_RAW: list[Any] = ["", "0", "-1", "null", " NULL ", "undefined", "00000000-0000-0000-0000-000000000000", 0, -1]
BLOCKED = frozenset({"", "null", "undefined", "0", "-1", "00000000-0000-0000-0000-000000000000"})
TYPES = tuple(POOL)
DEVICE_TYPES = frozenset({"ios_idfv", "android_uuid"})
# The public table names (the store may implement some of them as views over a write journal).
TABLES = ("workspaces", "profiles", "identities", "identity_changes", "aliases", "hub_values")
CLIENT_ERRORS = (BadRequest, LookupFailed, NotFound, Forbidden)


def oracle_normalize(identity_type: str, raw: Any) -> str | None:
    """The matching form of a value as spec A2.12/A2.13 describe it, written independently of engine.normalize:
    a value that is blocked as sent (after trimming, any case) or after normalization is None."""
    if raw is None or isinstance(raw, bool):
        return None
    value = str(raw).strip()
    if value.lower() in BLOCKED:
        return None
    if identity_type == "email" or identity_type in DEVICE_TYPES:
        value = value.lower()
    elif identity_type == "mobile_number":
        value = ("+" if value.startswith("+") else "") + re.sub(r"\D", "", value)
    return None if value.lower() in BLOCKED else value


def request_keys(identities: dict[str, Any]) -> set[tuple[str, str]]:
    keys = {(t, oracle_normalize(t, v)) for t, v in identities.items() if t in POOL}
    return {k for k in keys if k[1] is not None}


@st.composite
def identity_values(draw: Any, identity_type: str) -> Any:
    if draw(st.integers(0, 4)) == 4:  # one value in five is blocked; shrinking goes towards a real value
        return draw(st.sampled_from(BLOCKED_RAW))
    return draw(st.sampled_from(POOL[identity_type]))


@st.composite
def known_identities(draw: Any) -> dict[str, Any]:
    types = draw(st.lists(st.sampled_from(TYPES), min_size=1, max_size=3, unique=True))
    body = {t: draw(identity_values(t)) for t in types}
    if draw(st.integers(0, 40)) == 13:
        body["not_an_identity_type"] = "x"
    return body


# How a step names an MPID: mostly a recent answer of this workspace (0 = the latest), sometimes nothing, a
# profile of another workspace, or a literal that is no MPID of this workspace.
LITERAL_MPIDS = ["0", 0, "garbage", "123", 123, "-9223372036854775808"]


def _mpid_ref(choice: tuple[int, int, Any]) -> tuple[str, Any]:
    kind, recent, literal = choice
    if kind <= 5:
        return ("recent", recent)
    return {6: ("none", None), 7: ("foreign", None)}.get(kind, ("literal", literal))


mpid_refs = st.tuples(st.integers(0, 9), st.integers(0, 30), st.sampled_from(LITERAL_MPIDS)).map(_mpid_ref)


@st.composite
def identity_changes(draw: Any) -> list[dict[str, Any]]:
    changes = []
    for _ in range(draw(st.integers(1, 2))):
        identity_type = draw(st.sampled_from(TYPES))
        old = draw(st.none() | identity_values(identity_type))
        new = draw(st.none() | identity_values(identity_type))
        changes.append({"identity_type": identity_type, "old_value": old, "new_value": new})
    if draw(st.integers(0, 40)) == 13:
        changes.append({"identity_type": "not_an_identity_type", "old_value": None, "new_value": "x"})
    return changes


resolve_steps = st.tuples(st.sampled_from(list(Operation)), known_identities(), mpid_refs)
actions = st.one_of(
    st.tuples(st.just("resolve"), st.tuples(resolve_steps)),
    st.tuples(st.just("resolve"), st.tuples(resolve_steps)),
    st.tuples(st.just("burst"), st.tuples(st.lists(resolve_steps, min_size=2, max_size=4))),
    st.tuples(st.just("modify"), st.tuples(mpid_refs, identity_changes())),
    st.tuples(st.just("modify"), st.tuples(mpid_refs, identity_changes())),
    st.tuples(st.just("search"), st.tuples(known_identities())),
    st.tuples(st.just("alias"), st.tuples(mpid_refs, mpid_refs, st.sampled_from([None, "recent", "reversed",
                                                                                   "ancient"]))),
    st.tuples(st.just("restart"), st.tuples(st.integers(0, 3))),
)


def completes(step: Callable[..., None]) -> Callable[..., None]:
    """Marks the machine broken while a step runs, so that teardown after a failed step only cleans up
    (its restart checks would report a second, misleading failure)."""

    @functools.wraps(step)
    def run_step(self: IdentityMachine, *args: Any, **kwargs: Any) -> None:
        self.broken = True
        step(self, *args, **kwargs)
        self.broken = False

    return run_step


def graph_state(service: IdSyncService) -> dict[str, Any]:
    """Everything a restart must reproduce, per scope: profiles (created, last seen, identities, orphaned) and
    quarantined values. Empty graphs are left out."""
    state = {}
    for scope, graph in service.graphs.items():
        if not graph.profiles and not graph.quarantined:
            continue
        profiles = {}
        for mpid, record in graph.profiles.items():
            keys = list(record.identity_keys())
            assert len(keys) == len(set(keys)), f"profile {mpid} holds an identity twice: {keys}"
            profiles[mpid] = (record.created_ms, record.last_seen_ms, frozenset(keys), record.orphaned)
        state[scope] = (profiles, frozenset(graph.quarantined))
    return state


def profile_keys(state: dict[str, Any], scope: str, mpid: int) -> frozenset | None:
    found = state.get(scope, ({}, None))[0].get(mpid)
    return None if found is None else found[2]


class IdentityMachine(RuleBasedStateMachine):
    FOCUS = "default"  # the workspace under test; each test run pins it with a subclass

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="idmesh-props-")
        self.db_path = f"{self.dir}/props.duckdb"
        self.loop = asyncio.new_event_loop()
        self.service = IdSyncService.open(self.db_path)
        self._touch_table: bool | None = None
        self.broken = False
        # The workspace under test, and one other that only serves cross-workspace references.
        self.focus = self.FOCUS
        self.ws_ids: dict[str, str] = {}
        for name in (self.focus, "best_match" if self.focus != "best_match" else "default"):
            created, batch = self.service.workspaces.plan_create(name, WORKSPACES[name])
            self.run(self.service.commit(batch))
            self.service.workspaces.remember(created.workspace)
            self.ws_ids[name] = created.workspace.id
        foreign = next(n for n in self.ws_ids if n != self.focus)
        self.foreign_mpid = self.run(self.service.resolve(self.workspace_named(foreign), Operation.IDENTIFY,
                                                          {"ios_idfv": "dev-a", "email": "ann@example.com"})).mpid
        self.counts = self.table_counts()  # row counts after the last step (refreshed by the invariant)
        self.mpids: list[int] = []  # every MPID the workspace under test answered, latest last
        self.acknowledged: set[int] = {self.foreign_mpid}
        self.resolves: list[tuple[Operation, dict[str, Any], Any, int]] = []
        self.last_success: int | None = None  # index into resolves when the last state change was a resolve

    # --- plumbing ------------------------------------------------------------------------------------------
    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def workspace_named(self, name: str) -> Any:
        return self.service.workspaces.get(self.ws_ids[name])

    @property
    def ws(self) -> Any:
        return self.workspace_named(self.focus)

    @property
    def graph(self) -> Any:
        return self.service.graph(self.ws)

    def mpid_ref(self, ref: tuple[str, Any]) -> Any:
        kind, value = ref
        if kind == "recent":
            return str(self.mpids[-1 - value % len(self.mpids)]) if self.mpids else None
        if kind == "foreign":
            return str(self.foreign_mpid)
        return value  # none / literal

    def has_touch_table(self) -> bool:
        """Whether the store keeps last-seen updates in an append-only `profile_touches` table (folded at start)."""
        if self._touch_table is None:
            cur = self.service.connection.cursor()
            try:
                self._touch_table = bool(cur.execute("SELECT count(*) FROM information_schema.tables "
                                                     "WHERE table_name = 'profile_touches'").fetchone()[0])
            finally:
                cur.close()
        return self._touch_table

    def table_counts(self) -> dict[str, int]:
        return self.read_store()[1]

    def read_store(self) -> tuple[dict[str, Any], dict[str, int]]:
        """The graph state as the committed tables say it is (shaped like graph_state), and the row counts."""
        cur = self.service.connection.cursor()
        try:
            touches = {}
            if self.has_touch_table():
                touches = dict(cur.execute("SELECT mpid, max(last_seen_ms) FROM profile_touches GROUP BY mpid"
                                           ).fetchall())
            profiles = cur.execute("SELECT scope, mpid, created_ms, last_seen_ms, status FROM profiles").fetchall()
            rows = cur.execute("SELECT scope, mpid, identity_type, value, raw_value FROM identities").fetchall()
            hubs = cur.execute("SELECT scope, identity_type, value FROM hub_values").fetchall()
            counts = dict(cur.execute(" UNION ALL ".join(f"SELECT '{t}', count(*) FROM {t}" for t in TABLES
                                                         if t not in ("profiles", "identities", "hub_values"))
                                      ).fetchall())
        finally:
            cur.close()
        counts.update(profiles=len(profiles), identities=len(rows), hub_values=len(hubs))
        identities: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for _scope, mpid, identity_type, value, raw in rows:
            assert oracle_normalize(identity_type, raw) is not None, \
                f"(d) blocked value stored: {identity_type}={raw!r} (normalized {value!r}) on profile {mpid}"
            assert value == oracle_normalize(identity_type, raw), \
                f"stored {identity_type} {value!r} is not the normalization of raw {raw!r}"
            identities[mpid].append((identity_type, value))
        rows_per_mpid = Counter(mpid for _, mpid, _, _, _ in profiles)
        assert all(n == 1 for n in rows_per_mpid.values()), f"an MPID has two profile rows: {rows_per_mpid}"
        state: dict[str, Any] = {}
        for scope, mpid, created, last_seen, status in profiles:
            assert mpid != 0, "(c) MPID 0 stored"
            keys = identities.pop(mpid, [])
            assert len(keys) == len(set(keys)), f"duplicate identity rows for {mpid}: {keys}"
            state.setdefault(scope, ({}, set()))[0][mpid] = (
                created, max(last_seen, touches.get(mpid, last_seen)), frozenset(keys), status == "orphaned")
        assert not identities, f"identity rows without a profile: {dict(identities)}"
        for scope, identity_type, value in hubs:
            state.setdefault(scope, ({}, set()))[1].add((identity_type, value))
        return {scope: (p, frozenset(q)) for scope, (p, q) in state.items()}, counts

    def expect_no_change(self, before_state: dict[str, Any], what: str) -> None:
        assert self.table_counts() == self.counts, f"{what}: a rejected request wrote rows"
        assert graph_state(self.service) == before_state, f"{what}: a rejected request changed the graph"

    # --- steps ---------------------------------------------------------------------------------------------
    @rule(action=actions)
    @completes
    def act(self, action: tuple[str, tuple]) -> None:
        """One request, a burst of concurrent ones, or a restart: one rule, so that the mix of kinds is even
        (hypothesis' swarm testing would otherwise switch whole rules off in some examples)."""
        kind, args = action
        getattr(self, kind)(*args)

    # --- identify / login / logout -------------------------------------------------------------------------
    def resolve(self, step: tuple[Operation, dict[str, Any], Any]) -> None:
        operation, identities, previous = step
        previous_mpid = self.mpid_ref(previous)
        before = graph_state(self.service)
        try:
            answer = self.run(self.service.resolve(self.ws, operation, identities, previous_mpid))
        except CLIENT_ERRORS as exc:
            self.expect_no_change(before, f"{operation.value} {identities} -> {exc!r}")
            self.check_expected_error(operation, identities, exc)
            return
        self.check_resolve_answer(operation, identities, previous_mpid, answer, before, graph_state(self.service))
        self.record_resolve(operation, identities, previous_mpid, answer.mpid)

    def record_resolve(self, operation: Operation, identities: dict[str, Any], previous_mpid: Any, mpid: int
                       ) -> None:
        self.mpids.append(mpid)
        self.acknowledged.add(mpid)
        self.resolves.append((operation, identities, previous_mpid, mpid))
        self.last_success = len(self.resolves) - 1

    def check_expected_error(self, operation: Operation, identities: dict[str, Any], exc: Exception) -> None:
        usable = request_keys(identities)
        if "not_an_identity_type" in identities or not usable:
            assert isinstance(exc, BadRequest), f"expected BadRequest for {identities}, got {exc!r}"
            return
        login_ids = self.ws.rules.login_ids
        assert isinstance(exc, LookupFailed), f"unexpected {exc!r} for {operation.value} {identities}"
        assert operation is Operation.LOGIN and login_ids and not {t for t, _ in usable} & login_ids, \
            f"LOOKUP_ERROR for {operation.value} {identities}, which carries a login id: {exc}"

    def check_resolve_answer(self, operation: Operation, identities: dict[str, Any], previous_mpid: Any,
                             answer: Any, before: dict[str, Any], after: dict[str, Any] | None) -> None:
        """`before`/`after`: graph states just before and just after this request (no `after` in a burst,
        where later requests of the burst may already have changed the profile)."""
        workspace = self.ws
        rules = workspace.rules
        mpid = answer.mpid
        scope = workspace.scope
        assert mpid != 0 and -(1 << 63) <= mpid < (1 << 63), f"(c) bad MPID {mpid}"
        assert self.graph.get(mpid) is not None, f"(c) answered MPID {mpid} is not a profile of this workspace"
        request = request_keys(identities)
        before_keys = profile_keys(before, scope, mpid) or frozenset()
        has_login_ids = workspace.settings.strategy != "best_match"
        what = f"{operation.value} {identities} (previous_mpid {previous_mpid})"

        # (b) the login-ID gate, on the profile as it was before the request.
        before_login = {k for k in before_keys if k[0] in rules.login_ids}
        if has_login_ids and operation is not Operation.LOGOUT and before_login:
            assert before_login & request, (f"(b) gate: {what} returned known profile {mpid} holding "
                                            f"{sorted(before_login)} without one of its login ids")
        before_immutable = {k for k in before_keys if k[0] in rules.immutable_ids}
        if before_immutable and operation is not Operation.LOGOUT:
            assert before_immutable & request, f"(b) immutable gate: {what} returned {mpid} ({before_immutable})"
        if has_login_ids and operation is Operation.LOGOUT:
            assert not before_login, f"logout {identities} returned known profile {mpid} ({sorted(before_keys)})"
            assert answer.is_logged_in is False
        # matched_identities: the request values the profile held before.
        expected_matched = {t for t, v in request if (t, v) in before_keys}
        assert set(answer.matched_identities) == expected_matched, (what, answer.matched_identities, before_keys)
        if after is None:
            return
        after_state = after[scope][0][mpid]
        assert not after_state[3], f"orphaned profile {mpid} returned"
        after_keys = after_state[2]
        gained = after_keys - before_keys
        assert gained <= request, f"{what}: {mpid} gained identities the request did not carry: {gained - request}"
        assert answer.is_logged_in == any(t in rules.login_ids for t, _ in after_keys), what
        # Each request identity the profile did not take needs a reason the contract gives (A2.11, A2.3).
        for identity_type, value in request - after_keys:
            if operation is Operation.LOGOUT and has_login_ids and identity_type in rules.login_ids:
                continue
            held_elsewhere = any(m != mpid for m in self.graph.holders(identity_type, value))
            other_value = any(t == identity_type for t, _ in after_keys)
            assert identity_type in rules.unique_ids and (held_elsewhere or other_value), \
                f"{what}: {mpid} did not take {identity_type}={value!r}"
        # The returned profile's last_seen moved to the request time; nothing else's did.
        for other, (_created, seen, _keys, _orph) in after[scope][0].items():
            if other != mpid and other in before.get(scope, ({}, None))[0]:
                assert seen == before[scope][0][other][1], f"{what} touched profile {other}"

    def burst(self, steps: list[tuple[Operation, dict[str, Any], Any]]) -> None:
        """Concurrent requests: planned one after the other on the event loop, committed as one group."""

        async def one(operation: Operation, identities: dict[str, Any], previous_mpid: Any) -> tuple:
            before = graph_state(self.service)
            try:
                answer = await self.service.resolve(self.ws, operation, identities, previous_mpid)
            except CLIENT_ERRORS as exc:  # raised while planning, before any other request of the burst ran
                return before, graph_state(self.service), exc
            return before, None, answer

        previous_mpids = [self.mpid_ref(previous) for _, _, previous in steps]

        async def all_of() -> list[tuple]:
            return await asyncio.gather(*(one(op, ids, prev) for (op, ids, _), prev in zip(steps, previous_mpids)))

        for (operation, identities, _), previous_mpid, (before, at_error, outcome) in zip(
                steps, previous_mpids, self.run(all_of())):
            if isinstance(outcome, Exception):
                assert at_error == before, f"rejected {operation.value} {identities} changed the graph"
                self.check_expected_error(operation, identities, outcome)
            else:
                self.check_resolve_answer(operation, identities, previous_mpid, outcome, before, None)
                self.record_resolve(operation, identities, previous_mpid, outcome.mpid)

    def search(self, identities: dict[str, Any]) -> None:
        before = graph_state(self.service)
        try:
            answer = self.run(self.service.search(self.ws, identities))
        except CLIENT_ERRORS as exc:
            assert isinstance(exc, (BadRequest, NotFound)), exc
            self.expect_no_change(before, f"search {identities}")
            return
        self.expect_no_change(before, f"search {identities} (a search never writes)")
        record = self.graph.get(answer.mpid)
        assert record is not None and not record.orphaned, f"search returned {answer.mpid}"
        usable = request_keys(identities) - self.graph.quarantined
        assert set(record.identity_keys()) & usable, f"search {identities} returned {answer.mpid}, holding none"

    # --- modify / alias ------------------------------------------------------------------------------------
    def modify(self, profile: Any, changes: list[dict[str, Any]]) -> None:
        mpid = self.mpid_ref(profile)
        before = graph_state(self.service)
        try:
            results = self.run(self.service.modify(self.ws, mpid, changes))
        except CLIENT_ERRORS as exc:
            assert isinstance(exc, (BadRequest, LookupFailed)), exc
            self.expect_no_change(before, f"modify {mpid} {changes} -> {exc!r}")
            if isinstance(exc, LookupFailed):
                assert profile[0] != "recent" or not self.mpids, f"modify of existing {mpid} failed: {exc!r}"
            return
        target = int(mpid)
        assert [r.modified_mpid for r in results] == [target] * len(changes)
        unique_ids = self.ws.rules.unique_ids
        keys = set(self.graph.profiles[target].identity_keys())
        last = changes[-1]
        identity_type = last["identity_type"]
        old = oracle_normalize(identity_type, last["old_value"])
        new = oracle_normalize(identity_type, last["new_value"])
        if new is not None:
            assert (identity_type, new) in keys, f"modify {changes}: {target} lacks the new value"
            if identity_type in unique_ids:  # B§8: modify takes a unique value from every other profile
                assert self.graph.holders(identity_type, new) == (target,), f"modify {changes} did not steal"
                assert [t for t, _ in keys].count(identity_type) == 1, f"{target} holds two {identity_type}"
        if old is not None and old != new:
            assert (identity_type, old) not in keys, f"modify {changes}: {target} still holds the old value"
        # Profiles that lost identities to the steal: orphaned exactly when left with none.
        after = graph_state(self.service)
        for other, (_c, _s, other_keys, orphaned) in after[self.ws.scope][0].items():
            was = before[self.ws.scope][0].get(other)
            if other != target and was is not None and other_keys != was[2]:
                assert other_keys < was[2] and {t for t, _ in was[2] - other_keys} <= unique_ids, \
                    f"modify of {target} changed {other} beyond a unique-id steal"
                assert orphaned == (not other_keys), f"{other} lost its identities, orphaned={orphaned}"
        self.acknowledged.add(target)
        self.last_success = None

    def alias(self, source: Any, destination: Any, window: str | None) -> None:
        workspace = self.ws
        data: dict[str, Any] = {"source_mpid": self.mpid_ref(source), "destination_mpid": self.mpid_ref(destination)}
        if window == "recent":
            data.update(start_unixtime_ms=1_700_000_000_000, end_unixtime_ms=4_000_000_000_000)
        elif window == "reversed":
            data.update(start_unixtime_ms=4_000_000_000_000, end_unixtime_ms=1_700_000_000_000)
        elif window == "ancient":
            data.update(start_unixtime_ms=1_000, end_unixtime_ms=2_000)
        before = graph_state(self.service)
        body = {"request_type": "alias", "environment": "production", "data": data}
        try:
            self.run(self.service.alias(workspace, body))
        except CLIENT_ERRORS as exc:
            expected = BadRequest if workspace.strategy.allows_alias else Forbidden
            assert isinstance(exc, expected), f"alias {data} under {workspace.settings.strategy}: {exc!r}"
            self.expect_no_change(before, f"alias {data}")
            return
        assert workspace.strategy.allows_alias, f"alias accepted under {workspace.settings.strategy}"
        assert self.table_counts()["aliases"] == self.counts["aliases"] + 1
        # An alias copies events and first-seen only (B§10): no identity, profile or status changes.
        assert graph_state(self.service) == before, "an alias changed the identity graph"
        self.last_success = None

    def restart(self, roll: int) -> None:
        if roll == 2:  # keep restarts (the slowest step) rarer; hypothesis favours 0 and the bounds
            self.restart_and_compare()

    # --- invariants ----------------------------------------------------------------------------------------
    @invariant()
    @completes
    def graph_matches_store_and_invariants_hold(self) -> None:
        state = graph_state(self.service)
        stored, self.counts = self.read_store()
        assert state == stored, "(e) the in-memory graph differs from the committed tables"
        for scope, (profiles, _quarantined) in state.items():
            unique_ids = next(w.rules.unique_ids for w in map(self.workspace_named, self.ws_ids) if w.scope == scope)
            holders: dict[tuple[str, str], list[int]] = defaultdict(list)
            for mpid, (_created, _seen, keys, orphaned) in profiles.items():
                assert mpid != 0, "(c) MPID 0 in the graph"
                assert not (orphaned and keys), f"orphan {mpid} holds identities {keys}"
                for key in keys:
                    holders[key].append(mpid)
            for (identity_type, value), mpids in holders.items():
                if identity_type in unique_ids:
                    assert len(mpids) == 1, f"(a) unique {identity_type}={value!r} is held by {mpids}"
            graph = self.service.graphs[scope]  # the value index agrees with the profiles, for the whole pool
            for identity_type, raws in POOL.items():
                for value in {oracle_normalize(identity_type, raw) for raw in raws} - {None}:
                    assert sorted(graph.holders(identity_type, value)) == sorted(holders.get(
                        (identity_type, value), [])), f"index out of date for {identity_type}={value!r}"
        known = set().union(*(p.keys() for p, _ in state.values())) if state else set()
        assert self.acknowledged <= known, f"(e) acknowledged MPIDs missing: {self.acknowledged - known}"

    # --- restart -------------------------------------------------------------------------------------------
    def read_only(self, index: int) -> Any:
        operation, identities, previous_mpid, _ = self.resolves[index]
        try:
            return self.run(self.service.resolve(self.ws, operation, identities, previous_mpid, read_only=True)).mpid
        except NotFound:
            return "not found"

    def restart_and_compare(self) -> None:
        before = graph_state(self.service)
        aliases = {i: sorted(self.service.aliases.for_workspace(i), key=lambda a: a.alias_id)
                   for i in self.ws_ids.values()}
        counts = self.table_counts()
        lookups = [self.read_only(i) for i in range(len(self.resolves))]
        assert self.table_counts() == counts and graph_state(self.service) == before, "read_only requests wrote"
        self.service.close()
        self.service = IdSyncService.open(self.db_path)
        assert graph_state(self.service) == before, "the reloaded graph differs from the acknowledged one"
        assert {i: sorted(self.service.aliases.for_workspace(i), key=lambda a: a.alias_id)
                for i in self.ws_ids.values()} == aliases, "the alias ledger changed across a restart"
        assert [self.read_only(i) for i in range(len(self.resolves))] == lookups, \
            "read_only lookups answer differently after a restart"
        if self.last_success is not None:
            self.check_repeat_of_last_request(self.last_success, lookups[self.last_success])

    def check_repeat_of_last_request(self, index: int, repeated: Any) -> None:
        """The last acknowledged request, repeated read_only, returns the same MPID wherever the contract makes
        a repeat land on the same profile: not a Link logout (always a new profile), and not when the profile
        holds none of the request's matchable values (all quarantined, or only login ids in a logout)."""
        operation, identities, _, mpid = self.resolves[index]
        workspace = self.ws
        if operation is Operation.LOGOUT and workspace.settings.strategy == "profile_link":
            assert repeated == "not found", "a read_only Link logout must not find an existing profile"
            return
        matchable = request_keys(identities) - self.graph.quarantined
        if operation is Operation.LOGOUT and workspace.settings.strategy != "best_match":
            matchable = {k for k in matchable if k[0] not in workspace.rules.login_ids}
        if matchable & set(self.graph.profiles[mpid].identity_keys()):
            assert repeated == mpid, (f"repeating {operation.value} {identities} read_only gave {repeated}; the "
                                      f"acknowledged answer was {mpid}")

    def teardown(self) -> None:
        try:
            if not self.broken:
                self.restart_and_compare()
        finally:
            self.service.close()
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.parametrize("focus", list(WORKSPACES))
def test_identity_graph_properties(focus: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One run per workspace kind, so that every strategy gets the same share of the examples. A passing run
    takes a few seconds per kind. Each example costs a DuckDB file, so shrinking a failure is slow: it is capped
    at a minute (hypothesis' own cap, five minutes, would run into the suite's timeout)."""
    monkeypatch.setattr(hypothesis_engine, "MAX_SHRINKING_SECONDS", 60, raising=False)
    machine = type(f"IdentityMachine_{focus}", (IdentityMachine,), {"FOCUS": focus})
    run_state_machine_as_test(
        machine,
        settings=settings(max_examples=6, stateful_step_count=25, deadline=None, derandomize=True, database=None,
                          report_multiple_bugs=False, print_blob=False,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]),
    )
