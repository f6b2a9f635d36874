"""Delivery reliability through the real `idmesh serve` (DESIGN.md, "Reliability and security goals"; issue 6, item 6):
SIGKILL in the middle of flushes while the destinations fail 30% of requests, and a slow destination beside a
fast one.

The server is a subprocess on a real DuckDB file; fake Braze and fake Facebook (tests/fakes) serve on loopback
ports from threads of this test process, so what they hold survives every kill of the server. Everything goes
through the public interfaces: workspaces, audiences and connections through the Platform API, profiles through
`/v2/bulkevents`, state through `/v1/sql` and the connections' `delivery` status, and the database file opened
read-only between a kill and the next start.

What the kill test proves:
- the ledger never lies: at each kill, for every profile whose outbox row was never taken for sending, each
  destination holds exactly what `delivery_state` says it was acknowledged to hold. Only rows marked as
  possibly sent (attempts > 0) may differ, and those are sent again after the restart;
- nothing is lost: after the restarts the destinations converge to the membership exactly (Braze attributes of
  the "all" mode per profile, Facebook member sets per key equal to the hashed identifiers of the current
  members), the outbox is empty, `delivery_state` names exactly the members, nothing was rejected;
- nothing applied twice changes anything: every operation is a set add or remove, so resends (counted and
  printed, never asserted) leave the exact end state above; no downstream audience was created twice.
What the slow-destination test proves, by order of events and never by elapsed time: while every request to
Braze hangs unanswered, the Facebook connection of the same audience converges, takes a membership change and
converges again; Braze then catches up.

Polls have generous limits that only keep a broken build from hanging; nothing asserts how long anything took.
`pytest -s` (or `-rP`) shows the resend and fault counts.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import httpx
import orjson
import pytest
from fakes import FakeBraze, FakeFacebook, FakeServer, Fault, FaultPlan, LoggedRequest
from fakes.faults import APPLIED_FAULTS
from test_crash_recovery import ADMIN_TOKEN
from test_faults import FaultServer

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BRAZE_KEY = "braze-test-key"
FB_TOKEN = "fb-test-token"
AD_ACCOUNT = "act_4242"
EXTERNAL_NAME = "Reliable Readers"
IN_SEGMENT = f"In {EXTERNAL_NAME}"
WAIT_S = 120                 # bound on every poll; nothing is timed
CLIENT_TIMEOUT_S = 1.0       # the server's read timeout for destinations (IDMESH_DELIVERY_TIMEOUT_SECONDS) ...
FAULT_DELAY_S = 2.0          # ... below how long a timeout fault holds its answer: timeouts are real timeouts
FAST_TICKS = {"IDMESH_DELIVERY_FLUSH_SECONDS": "0.5"}
GOLD = {"user_attribute": {"name": "tier", "operator": "equals", "values": ["gold"]}}


# --- the population -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Person:
    n: int

    @property
    def customer(self) -> str:
        return f"cust-{self.n:05d}"

    @property
    def email(self) -> str | None:
        return None if self.n % 7 == 3 else f"Reader.{self.n}@Example.COM"   # mixed case: normalized before hashing

    @property
    def phone(self) -> str | None:
        return None if self.n % 5 == 1 else f"+1 (555) {self.n // 10000 % 10}{self.n % 10000:04d}-{self.n % 97:02d}"

    def hashes(self) -> dict[str, str]:
        """What Facebook should hold for this person, per key, written from the spec (§2.6), not from fanout.py:
        email trimmed and lowercased, phone digits only without leading zeros; SHA-256 hex of either."""
        found = {}
        if self.email is not None:
            found["EMAIL"] = hashlib.sha256(self.email.strip().lower().encode()).hexdigest()
        if self.phone is not None:
            found["PHONE"] = hashlib.sha256(re.sub(r"\D", "", self.phone).lstrip("0").encode()).hexdigest()
        return found

    def batch(self, tier: str, at_ms: int) -> dict[str, Any]:
        identities = {"customer_id": self.customer}
        if self.email is not None:
            identities["email"] = self.email
        if self.phone is not None:
            identities["mobile_number"] = self.phone
        return {"batch_id": f"{self.customer}-{tier}-{at_ms}", "environment": "production",
                "timestamp_unixtime_ms": at_ms, "user_identities": identities, "user_attributes": {"tier": tier},
                "events": [{"event_type": "custom_event",
                            "data": {"event_name": "read", "custom_event_type": "other",
                                     "timestamp_unixtime_ms": at_ms}}]}


def people(first: int, count: int) -> list[Person]:
    return [Person(n) for n in range(first, first + count)]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- the server and its Platform API ----------------------------------------------------------------------------

class Platform:
    """One workspace on a running server: audiences, connections, ingest and analyst SQL over HTTP."""

    def __init__(self, base_url: str, workspace_id: str, auth: tuple[str, str]) -> None:
        self.workspace_id = workspace_id
        self.auth = auth
        self.http = httpx.Client(base_url=base_url, auth=auth, timeout=60)
        self.audiences = f"/platform/v2/workspaces/{workspace_id}/audiences"

    @classmethod
    def create(cls, server: FaultServer) -> Platform:
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            created = http.post("/platform/v2/workspaces", headers=ADMIN, json={"name": "reliability"})
        assert created.status_code == 201, created.text
        body = created.json()
        return cls(server.base_url, body["id"], (body["api_key"], body["api_secret"]))

    def on(self, server: FaultServer) -> Platform:
        """The same workspace on another (restarted) server."""
        self.http.close()
        return Platform(server.base_url, self.workspace_id, self.auth)

    def audience(self, criteria: dict[str, Any]) -> int:
        created = self.http.post(self.audiences, json={"name": "reliable readers", "external_name": EXTERNAL_NAME,
                                                       "criteria": criteria})
        assert created.status_code == 201, created.text
        return created.json()["id"]

    def connect(self, audience_id: int, body: dict[str, Any]) -> int:
        created = self.http.post(f"{self.audiences}/{audience_id}/connections", json=body)
        assert created.status_code == 201, created.text
        return created.json()["id"]

    def delivery(self, audience_id: int, connection_id: int) -> dict[str, Any]:
        answer = self.http.get(f"{self.audiences}/{audience_id}/connections/{connection_id}")
        assert answer.status_code == 200, answer.text
        return answer.json()["delivery"]

    def ingest(self, batches: list[dict[str, Any]]) -> None:
        for start in range(0, len(batches), 100):
            answer = self.http.post("/v2/bulkevents", json=batches[start:start + 100])
            assert answer.status_code == 202, answer.text[:2000]

    def sql(self, query: str) -> list[list[Any]]:
        answer = self.http.post("/v1/sql", json={"sql": query, "limit": 100_000})
        assert answer.status_code == 200, answer.text
        assert not answer.json()["truncated"]
        return answer.json()["rows"]

    def members(self, audience_id: int) -> set[str]:
        """The audience's current members, by customer id."""
        return {row[0] for row in self.sql(
            "SELECT i.raw_value FROM audience_members m JOIN identities i ON i.mpid = m.mpid "
            f"AND i.identity_type = 'customerid' WHERE m.audience_id = {int(audience_id)}")}

    def close(self) -> None:
        self.http.close()


def start_server(db_path: Path, tmp_path: Path, name: str, env: dict[str, str]) -> FaultServer:
    server = FaultServer(db_path, tmp_path / f"{name}.log", env=env)
    server.wait_healthy()
    return server


def eventually(condition: Callable[[], bool], what: str, server: FaultServer | None = None,
               pause: float = 0.2, explain: Callable[[], Any] | None = None) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if server is not None:
            assert server.process.poll() is None, f"the server exited: {server.log_text()[-3000:]}"
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}" + (f"; {explain()}" if explain else "")
        time.sleep(pause)


# --- what the fakes hold ----------------------------------------------------------------------------------------

def braze_connection(audience_id: int, base_url: str, **braze: Any) -> dict[str, Any]:
    return {"output": "braze", "name": "braze", "credentials": {"api_key": BRAZE_KEY},
            "settings": {"base_url": base_url, "identity_types": ["customer_id"],
                         "upload": {"max_age_seconds": 0},
                         "braze": {"send_segments_as": "all", **braze}}}


def facebook_connection(base_url: str, batch_size: int) -> dict[str, Any]:
    return {"output": "facebook", "name": "facebook", "credentials": {"access_token": FB_TOKEN},
            "settings": {"base_url": base_url, "identity_types": ["email", "mobile_number"],
                         "upload": {"max_age_seconds": 0},
                         "facebook": {"ad_account_id": AD_ACCOUNT, "batch_size": batch_size}}}


def braze_profiles(braze: FakeBraze) -> dict[str, dict[str, Any]]:
    users = braze.users()
    assert all(kind == "external_id" for kind, _ in users), [k for k in users if k[0] != "external_id"][:5]
    return {value: attributes for (_, value), attributes in users.items()}


def braze_holds(braze: FakeBraze, audience_id: int) -> set[str]:
    return {value for _, value in braze.users_with("SegmentMembershipArray", str(audience_id))}


def facebook_audiences(facebook: FakeFacebook, connection_id: int) -> dict[str, str]:
    """Key (EMAIL_SHA256, PHONE_SHA256) -> id of the connection's downstream audience; at most one per key."""
    found: dict[str, list[str]] = {}
    for view in facebook.audiences().values():
        if view.description.startswith(f"idmesh connection {connection_id} ("):
            found.setdefault(view.description.rsplit(", ", 1)[-1], []).append(view.id)
    assert all(len(ids) == 1 for ids in found.values()), f"a downstream audience was created twice: {found}"
    return {key: ids[0] for key, ids in found.items()}


def facebook_holds(facebook: FakeFacebook, connection_id: int) -> dict[str, set[str]]:
    """Key (EMAIL, PHONE) -> hashes the connection's downstream audience of that key holds."""
    return {key.removesuffix("_SHA256"): facebook.members(audience_id, key)
            for key, audience_id in facebook_audiences(facebook, connection_id).items()}


def expected_hashes(members: list[Person]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {"EMAIL": set(), "PHONE": set()}
    for person in members:
        for key, value in person.hashes().items():
            found[key].add(value)
    return found


def applied(entry: LoggedRequest) -> bool:
    """The request reached the fake's app and changed its state (answered or not)."""
    return (entry.fault is None or entry.fault in APPLIED_FAULTS) and entry.status is not None \
        and 200 <= entry.status < 300


# --- the ledger against the destinations --------------------------------------------------------------------------

@dataclass
class Ledger:
    """delivery_state and delivery_outbox as the file holds them, per connection: customer ids (Braze) or hashes
    per key (Facebook) held, and those of rows taken for sending but not acknowledged (their fate is unknown)."""

    held: dict[str, set[str]]
    unsure: dict[str, set[str]]
    pending: int


def read_ledger(db_path: Path, connection_id: int, keys: tuple[str, ...]) -> Ledger:
    """The file as the next start finds it: DuckDB replays the WAL in memory and writes nothing."""
    with duckdb.connect(str(db_path), read_only=True) as db:
        state = db.execute("SELECT identifiers::VARCHAR FROM delivery_state WHERE connection_id = ?",
                           [connection_id]).fetchall()
        outbox = db.execute("SELECT identifiers::VARCHAR, attempts FROM delivery_outbox WHERE connection_id = ?",
                            [connection_id]).fetchall()
        held_by_mpid = dict(db.execute("SELECT mpid, identifiers::VARCHAR FROM delivery_state "
                                       "WHERE connection_id = ?", [connection_id]).fetchall())
        tried_mpids = [m for (m,) in db.execute("SELECT mpid FROM delivery_outbox WHERE connection_id = ? "
                                                "AND attempts > 0", [connection_id]).fetchall()]
    held: dict[str, set[str]] = {key: set() for key in keys}
    unsure: dict[str, set[str]] = {key: set() for key in keys}
    for (text,) in state:
        for key, value in orjson.loads(text).items():
            held[key].add(value)
    for text, attempts in outbox:
        if attempts > 0:
            for key, value in orjson.loads(text).items():
                unsure[key].add(value)
    for mpid in tried_mpids:   # what the destination was told before: a remove names it, an add may replace it
        for key, value in orjson.loads(held_by_mpid.get(mpid) or "{}").items():
            unsure[key].add(value)
    return Ledger(held, unsure, len(outbox))


def check_ledger(ledger: Ledger, holds: dict[str, set[str]], what: str) -> None:
    """Outside the rows possibly sent, the destination holds exactly what was acknowledged."""
    for key, held in ledger.held.items():
        at_destination = holds.get(key, set())
        unknown = ledger.unsure[key]
        missing = (held - unknown) - at_destination
        extra = (at_destination - unknown) - held
        assert not missing, f"{what} {key}: {len(missing)} acknowledged but not held, e.g. {sorted(missing)[:3]}"
        assert not extra, f"{what} {key}: {len(extra)} held but never acknowledged nor sent, e.g. {sorted(extra)[:3]}"


# --- resends ------------------------------------------------------------------------------------------------------

def braze_operations(entry: LoggedRequest) -> list[tuple[str, str]]:
    return [(obj["external_id"], "remove" if obj.get("SegmentMembership", "") is None else "add")
            for obj in entry.json().get("attributes", []) if "SegmentMembershipArray" in obj]


def facebook_operations(entry: LoggedRequest) -> list[tuple[str, str]]:
    body = entry.json()
    return [(value, entry.method) for value in body["payload"]["data"]]


def resend_report(name: str, entries: list[LoggedRequest], operations: Callable[[LoggedRequest], list]) -> str:
    """Requests that carried an operation an earlier request carried already, and operations the destination
    applied more than once (each a set add or remove: harmless, which the end state proves)."""
    seen: set[Any] = set()
    answered: set[Any] = set()   # operations of requests idmesh got a 2xx answer for
    applied_count: Counter[Any] = Counter()
    uploads = resent = after_answer = sendings = 0
    for entry in entries:
        carried = operations(entry)
        if not carried:
            continue
        uploads += 1
        sendings += len(carried)
        if any(op in seen for op in carried):
            resent += 1
        if any(op in answered for op in carried):
            after_answer += 1
        seen.update(carried)
        if applied(entry):
            applied_count.update(carried)
        if entry.fault is None and applied(entry):
            answered.update(carried)
    twice = sum(1 for count in applied_count.values() if count > 1)
    return (f"{name}: {uploads} upload requests, {resent} resent (carrying an operation sent before; "
            f"{after_answer} of them one answered 2xx before); {len(seen)} operations sent {sendings} times, "
            f"{twice} of them applied more than once")


# --- the tests ----------------------------------------------------------------------------------------------------

@pytest.fixture
def fakes() -> Iterator[tuple[FakeBraze, FakeFacebook]]:
    braze = FakeBraze(api_keys={BRAZE_KEY}, log_limit=100_000)
    facebook = FakeFacebook(access_tokens={FB_TOKEN}, log_limit=100_000)
    with braze, facebook:
        yield braze, facebook


INITIAL = people(0, 3_000)          # gold: members
BYSTANDERS = people(3_000, 400)     # silver: never members at first
NEWCOMERS = people(3_400, 600)      # arrive after the first kill, gold
LEAVERS = INITIAL[::5]              # turn silver after the first kill
JOINERS = BYSTANDERS[::2]           # turn gold after the first kill


@pytest.mark.timeout(900)
def test_sigkill_mid_flush_under_faults_loses_nothing_and_converges_exactly(tmp_path: Path, fakes) -> None:
    """3,000 members synced to both fakes; killed once both connections have some deltas acknowledged and some
    pending; restarted and the membership moved at once (600 exits, 800 entries) while the first sync resumes;
    killed again while Braze takes the exits; the third start converges. The ledger is checked at each kill."""
    braze, facebook = fakes
    # 30% of requests fail, of every kind (after the first kill each kind is forced once more, so none is left out
    # by chance); a timeout holds its answer past the client's timeout; a little latency keeps each flush long
    # enough to be caught in the middle
    for fake, seed in ((braze, 61), (facebook, 62)):
        fake.faults.configure(FaultPlan(rate=0.3, seed=seed, delay_seconds=FAULT_DELAY_S, latency_seconds=0.02))
    # backoff capped at a few seconds: under 30% failures its tail (a delta unlucky seven times waits 2 + 4 + ... +
    # 128 s) is what convergence waits for, and the claim here is the end state, not the waiting
    env = {**FAST_TICKS, "IDMESH_DELIVERY_TIMEOUT_SECONDS": str(CLIENT_TIMEOUT_S),
           "IDMESH_DELIVERY_RETRY_MAX_SECONDS": "4"}
    db_path = tmp_path / "idmesh.duckdb"
    server = start_server(db_path, tmp_path, "first", env)
    try:
        platform = Platform.create(server)
        audience_id = platform.audience(GOLD)
        at = now_ms() - 60_000
        platform.ingest([p.batch("gold", at) for p in INITIAL] + [p.batch("silver", at) for p in BYSTANDERS])
        members = {p.customer for p in INITIAL}
        eventually(lambda: platform.members(audience_id) == members, "the first members are evaluated", server)
        braze_id = platform.connect(audience_id, braze_connection(audience_id, braze.base_url))
        facebook_id = platform.connect(audience_id, facebook_connection(facebook.base_url, batch_size=100))

        # kill once both connections have some deltas acknowledged and some still pending
        def mid_flush() -> bool:
            statuses = [platform.delivery(audience_id, c) for c in (braze_id, facebook_id)]
            return all(s["held"] > 0 and s["pending_adds"] > 0 for s in statuses)

        eventually(mid_flush, "both connections part way through the first sync", server, pause=0.01)
        server.sigkill()
        braze_ledger = read_ledger(db_path, braze_id, ("external_id",))
        facebook_ledger = read_ledger(db_path, facebook_id, ("EMAIL", "PHONE"))
        first_kill = (len(braze_ledger.held["external_id"]), braze_ledger.pending,
                      len(facebook_ledger.held["EMAIL"] | facebook_ledger.held["PHONE"]), facebook_ledger.pending)
        check_ledger(braze_ledger, {"external_id": braze_holds(braze, audience_id)}, "Braze after the first kill")
        check_ledger(facebook_ledger, facebook_holds(facebook, facebook_id), "Facebook after the first kill")
        assert braze_ledger.pending and facebook_ledger.pending, "the kill came after a flush had ended"

        # the membership moves right after the restart, while the first sync resumes; kill again once removes go out
        braze.faults.force(*Fault)
        facebook.faults.force(*Fault)
        server = start_server(db_path, tmp_path, "second", env)
        platform = platform.on(server)
        at = now_ms()
        platform.ingest([p.batch("silver", at) for p in LEAVERS] + [p.batch("gold", at) for p in JOINERS + NEWCOMERS])
        final = [p for p in INITIAL if p not in set(LEAVERS)] + JOINERS + NEWCOMERS
        final_members = {p.customer for p in final}
        leavers = {p.customer for p in LEAVERS}

        def removing() -> bool:
            profiles = braze_profiles(braze)
            gone = sum(1 for c in leavers if profiles.get(c, {}).get(IN_SEGMENT) is False)
            return 0 < gone < len(leavers)

        eventually(removing, "Braze part way through the exits", server, pause=0.002)
        server.sigkill()
        braze_ledger = read_ledger(db_path, braze_id, ("external_id",))
        facebook_ledger = read_ledger(db_path, facebook_id, ("EMAIL", "PHONE"))
        check_ledger(braze_ledger, {"external_id": braze_holds(braze, audience_id)}, "Braze after the second kill")
        check_ledger(facebook_ledger, facebook_holds(facebook, facebook_id), "Facebook after the second kill")

        # the third start converges; the faults go on throughout
        server = start_server(db_path, tmp_path, "third", env)
        platform = platform.on(server)
        eventually(lambda: platform.members(audience_id) == final_members, "the moved membership is evaluated",
                   server)

        # a member without an email and without a phone has nothing Facebook matches on, and is not sent there
        wanted = {braze_id: final_members, facebook_id: {p.customer for p in final if p.hashes()}}

        def settled() -> bool:
            statuses = {c: platform.delivery(audience_id, c) for c in wanted}
            for status in statuses.values():
                assert not status["rejected_24h"], status
            return all(s["pending_adds"] == 0 and s["pending_removes"] == 0 and s["held"] == len(wanted[c])
                       for c, s in statuses.items())

        def explain() -> Any:
            return platform.sql("SELECT connection_id, op, attempts, count(*), "
                                "min(next_attempt_ms) - epoch_ms(now()), max(next_attempt_ms) - epoch_ms(now()), "
                                "any_value(last_error) FROM delivery_outbox GROUP BY ALL ORDER BY ALL")

        eventually(settled, "both connections acknowledged everything", server, pause=0.5, explain=explain)
        state = {(c, customer) for c, customer in platform.sql(
            "SELECT s.connection_id, i.raw_value FROM delivery_state s JOIN identities i ON i.mpid = s.mpid "
            "AND i.identity_type = 'customerid'")}
        assert state == {(c, m) for c, customers in wanted.items() for m in customers}
    finally:
        server.stop()

    # Braze: each profile as the "all" mode says for its membership; exits never created a profile
    profiles = braze_profiles(braze)
    audience = str(audience_id)
    member_attributes = {"SegmentMembership": f"'{audience}'", "SegmentMembershipArray": [audience],
                         IN_SEGMENT: True}
    exit_attributes = {"SegmentMembershipArray": [], IN_SEGMENT: False}
    for person in INITIAL + BYSTANDERS + NEWCOMERS:
        profile = profiles.pop(person.customer, None)
        if person.customer in final_members:
            assert profile == member_attributes, (person.customer, profile)
        elif person.customer in leavers:
            assert profile in (None, exit_attributes), (person.customer, profile)
        else:
            assert profile is None, (person.customer, profile)
    assert not profiles, f"profiles no one sent: {sorted(profiles)[:5]}"
    # Facebook: one audience per key, holding exactly the current members' hashes
    assert facebook_holds(facebook, facebook_id) == expected_hashes(final)
    assert set(braze.faults.injected) == set(facebook.faults.injected) == set(Fault)
    for fake in (braze, facebook):
        assert fake.log.total == len(fake.requests()), "the request log dropped entries: raise log_limit"

    braze_uploads = [e for e in braze.requests() if e.path == "/users/track"]
    facebook_uploads = [e for e in facebook.requests() if e.path.endswith("/users")]
    print(f"\nfirst kill: Braze {first_kill[0]} profiles acknowledged, {first_kill[1]} deltas pending; Facebook "
          f"{first_kill[2]} hashes acknowledged, {first_kill[3]} deltas pending; second kill during the exits")
    print(resend_report("Braze", braze_uploads, braze_operations))
    print(resend_report("Facebook", facebook_uploads, facebook_operations))
    for name, fake in (("Braze", braze), ("Facebook", facebook)):
        faults = ", ".join(f"{kind} {count}" for kind, count in sorted(fake.faults.injected.items()))
        print(f"{name}: {len(fake.requests())} requests in all; faults injected: {faults}")



class Held:
    """An ASGI layer that holds every request until `release()`: a destination as slow as the test wants, whose
    answers come only once the test has seen what it needs to see."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.arrived = 0
        self._released = False

    def release(self) -> None:
        self._released = True

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.arrived += 1
            while not self._released:
                await asyncio.sleep(0.01)
        await self.app(scope, receive, send)


@pytest.mark.timeout(600)
def test_a_slow_destination_never_delays_another(tmp_path: Path, fakes) -> None:
    """Braze and Facebook connections of one audience; every Braze request hangs until the test releases it. While
    the first one hangs, Facebook takes the whole audience and then a change of it; only then is Braze let go."""
    braze, facebook = fakes
    held = Held(braze.asgi)
    slow = FakeServer(held).start()
    # the server must not give up on the hanging request while the test watches the other connection
    env = {**FAST_TICKS, "IDMESH_DELIVERY_TIMEOUT_SECONDS": str(WAIT_S * 2)}
    server = start_server(tmp_path / "idmesh.duckdb", tmp_path, "slow", env)
    try:
        platform = Platform.create(server)
        audience_id = platform.audience(GOLD)
        population = people(0, 1_000)
        at = now_ms() - 60_000
        platform.ingest([p.batch("gold", at) for p in population])
        eventually(lambda: platform.members(audience_id) == {p.customer for p in population},
                   "the members are evaluated", server)
        braze_id = platform.connect(audience_id, braze_connection(audience_id, slow.base_url))
        eventually(lambda: held.arrived == 1, "Braze's first request arrives", server, pause=0.05)
        facebook_id = platform.connect(audience_id, facebook_connection(facebook.base_url, batch_size=10_000))

        def facebook_holds_exactly(members: list[Person]) -> Callable[[], bool]:
            def check() -> bool:
                status = platform.delivery(audience_id, facebook_id)
                reachable = [p for p in members if p.hashes()]   # no email and no phone: not sent to Facebook
                return (status["pending_adds"] == status["pending_removes"] == 0 and status["held"] == len(reachable)
                        and facebook_holds(facebook, facebook_id) == expected_hashes(members))
            return check

        eventually(facebook_holds_exactly(population), "Facebook holds the audience", server)
        assert held.arrived == 1 and braze.users() == {}
        assert platform.delivery(audience_id, braze_id)["pending_adds"] == len(population)

        # a change while Braze still hangs: Facebook takes it too
        leaving, joining = population[::4], people(1_000, 200)
        at = now_ms()
        platform.ingest([p.batch("silver", at) for p in leaving] + [p.batch("gold", at) for p in joining])
        final = [p for p in population if p not in set(leaving)] + joining
        eventually(facebook_holds_exactly(final), "Facebook holds the changed audience", server)
        braze_status = platform.delivery(audience_id, braze_id)
        assert held.arrived == 1 and braze.users() == {}
        # nothing answered yet; leavers whose add hangs in that request are to be removed (it may be applied)
        assert braze_status["held"] == 0 and braze_status["last_attempt_ms"] is None, braze_status
        assert braze_status["pending_adds"] == len(final), braze_status

        held.release()
        eventually(lambda: braze_holds(braze, audience_id) == {p.customer for p in final}
                   and platform.delivery(audience_id, braze_id)["pending_adds"] == 0, "Braze catches up", server)
    finally:
        held.release()
        server.stop()
        slow.stop()
