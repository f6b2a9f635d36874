"""Delivery benchmark: the initial sync of a 1M-member audience to local fake Braze and Facebook servers, and the
membership diff of that audience.

    .venv/bin/python bench/delivery.py            # 1,000,000 members (about 10 minutes)
    .venv/bin/python bench/delivery.py --quick    # 100,000 members
    .venv/bin/python bench/delivery.py --tiny     # 2,000 members: the smoke test
    .venv/bin/python bench/delivery.py fakes --braze-port P --facebook-port P --control-port P   # the fakes alone

What runs where. The fakes (tests/fakes: FakeBraze, FakeFacebook, no faults) run in a child process, so they do
not share this process's GIL; this process is idmesh's side: a real DuckDB file, the outbox
(audiences/outbox.py) and `DeliveryService.flush_connection` with the real outputs, as `idmesh serve` runs them
(except that Facebook keeps the ids of the audiences it creates in memory only: nothing restarts here).
The fakes count the objects (Braze) and rows (Facebook) of every upload request before answering it.

The data, written in SQL: `members` profiles with a customer id each, an email for 90% of them (mixed case, so
normalizing matters) and a phone number for two thirds, 3.3% with neither; spare profiles outside the audience
for the steady rounds; one audience holding the members (memberships applied directly: evaluation is not what is
measured here). Two connections: Braze (single_array, external id = customer id, 75 objects per request) and
Facebook (email and phone, 10,000 rows per request). Every member reaches Braze; members with an email or a phone
reach Facebook (96.7%).

Measured:
1. Initial diff, per connection: current members read, wanted identifiers (consent, sampling, identity fan-out,
   SHA-256 for Facebook), then the outbox rewrite in one transaction (every member an add), as
   `DeliveryService` diffs a connection.
2. Initial sync, per connection alone: `flush_connection(force=True)` until the outbox is empty. Members/s =
   members delivered / seconds; fill = objects or rows received / (requests x the maximum per request), and the
   share of requests that were full. Time inside the output's `deliver` (HTTP to the fake, which applies the
   request before answering) is summed from `delivery_attempts.duration_ms`; the rest is idmesh's own work per
   batch (take + mark as sending, acknowledge: DuckDB transactions on the outbox and the state).
3. Steady diff, several rounds: 1% of the members leave and as many profiles enter, then the diff of each
   connection against its acknowledged state of 1M (the figure DESIGN.md's "membership diff, 1M members <= 1 s"
   is about); the changes are flushed before the next round. Also a diff with nothing changed (the scheduled
   diff every 5 minutes). Medians over rounds.
Convergence is checked after each sync: each fake holds exactly the members (count and an order-free digest of
the identifiers: customer ids at Braze, SHA-256 hex of the spec-normalized email and phone per key at
Facebook), the outbox is empty, delivery_state counts the members.

stdout gets the figures line, then the result as JSON; the tables go to stderr; the full result goes to
bench/results/delivery-<size>-<time>.result.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Run as `python bench/delivery.py`, Python puts bench/ first on the path, where bench/audiences.py would shadow the
# `audiences` package: the project root must come first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
SIZES = {"full": 1_000_000, "quick": 100_000, "tiny": 2_000}
WORKSPACE_ID = "bench-delivery"   # also the identity scope (a workspace resolves against its own by default)
BRAZE_KEY = "bench-braze-key"
FACEBOOK_TOKEN = "bench-facebook-token"
AD_ACCOUNT = "act_101"
BRAZE_MAX = 75
FACEBOOK_MAX = 10_000
CHANGE_SHARE = 0.01          # steady diff: this share of the members leaves, as many profiles enter
GOAL_DIFF_S = 1.0            # DESIGN.md: membership diff, 1M members
GOAL_FILL = 0.95             # DESIGN.md: requests >= 95% full
GOAL_MEMBERS_PER_S = 20_000  # DESIGN.md: delivery to local fakes
STARTED_AT_MS = 1_790_000_000_000


# --- shared by both processes -----------------------------------------------------------------------------------

def digest(values: Iterable[str]) -> dict[str, Any]:
    """An order-free fingerprint of a set of strings: how many, and the sum of their 64-bit BLAKE2b hashes."""
    total, count = 0, 0
    for value in values:
        total += int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "big")
        count += 1
    return {"count": count, "sum": f"{total % (1 << 64):016x}"}


# --- the fakes' process ---------------------------------------------------------------------------------------------

class Counting:
    """ASGI layer in front of a fake: reads the body, records its upload size (`measure(method, path, body)`,
    None for requests that upload nothing), then hands the request to the fake."""

    def __init__(self, app: Any, measure: Callable[[str, str, bytes], int | None]) -> None:
        self.app = app
        self.measure = measure
        self.sizes: Counter[int] = Counter()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.extend(message.get("body", b""))
            if not message.get("more_body", False):
                break
        size = self.measure(scope["method"], scope["path"], bytes(body))
        if size is not None:
            self.sizes[size] += 1
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def serve_fakes(braze_port: int, facebook_port: int, control_port: int) -> None:
    """FakeBraze and FakeFacebook (no faults, no bodies kept) behind `Counting`, and a control server answering
    `GET /summary?audience=<id>&connection=<id>` and `POST /clear`; until SIGTERM or SIGINT."""
    import signal
    import threading

    import orjson
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    sys.path.insert(0, str(ROOT / "tests"))
    from fakes import FakeBraze, FakeFacebook, FakeServer

    braze = FakeBraze(api_keys={BRAZE_KEY}, keep_bodies=False, log_limit=100)
    facebook = FakeFacebook(access_tokens={FACEBOOK_TOKEN}, keep_bodies=False, log_limit=100,
                            rate_limit=10_000_000)

    def braze_size(method: str, path: str, body: bytes) -> int | None:
        return len(orjson.loads(body).get("attributes", [])) if path == "/users/track" else None

    def facebook_size(method: str, path: str, body: bytes) -> int | None:
        return len(orjson.loads(body)["payload"]["data"]) if path.endswith("/users") else None

    counted = {"braze": Counting(braze.asgi, braze_size), "facebook": Counting(facebook.asgi, facebook_size)}

    async def summary(request: Request) -> Response:
        audience, connection = request.query_params["audience"], request.query_params["connection"]
        members = [value for _, value in braze.users_with("SegmentMembershipArray", audience)]
        per_key = {}
        for view in facebook.audiences().values():
            if view.description.startswith(f"idmesh connection {connection} ("):
                key = view.description.rsplit(", ", 1)[-1]
                per_key[key] = {"id": view.id, **digest(facebook.members(view.id, key))}
        sizes = {name: {str(size): count for size, count in layer.sizes.items()} for name, layer in counted.items()}
        return JSONResponse({"braze": {"members": digest(members), "sizes": sizes["braze"]},
                             "facebook": {"audiences": per_key, "sizes": sizes["facebook"]}})

    async def clear(request: Request) -> Response:
        for layer in counted.values():
            layer.sizes.clear()
        return JSONResponse({"cleared": True})

    control = Starlette(routes=[Route("/summary", summary), Route("/clear", clear, methods=["POST"])])
    servers = [FakeServer(counted["braze"], port=braze_port).start(),
               FakeServer(counted["facebook"], port=facebook_port).start(),
               FakeServer(control, port=control_port).start()]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    for server in servers:
        server.stop()


class FakesProcess:
    """The fakes in a child process, on ports chosen here."""

    def __init__(self, log: Path) -> None:
        from bench.harness import free_port

        self.ports = {"braze": free_port(), "facebook": free_port(), "control": free_port()}
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "fakes", "--braze-port", str(self.ports["braze"]),
                 "--facebook-port", str(self.ports["facebook"]), "--control-port", str(self.ports["control"])],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"bench: the fakes exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.post(self.url("control") + "/clear", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SystemExit("bench: the fakes did not start")

    def summary(self, audience_id: int, connection_id: int) -> dict[str, Any]:
        import httpx

        answer = httpx.get(self.url("control") + "/summary", timeout=600,
                           params={"audience": audience_id, "connection": connection_id})
        answer.raise_for_status()
        return answer.json()

    def clear_counts(self) -> None:
        import httpx

        httpx.post(self.url("control") + "/clear", timeout=60).raise_for_status()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --- idmesh's side ----------------------------------------------------------------------------------------------------

def build_database(path: Path, members: int, spare: int) -> None:
    """Profiles 1..members + spare, with identities as the module docstring says (no audience yet)."""
    from engine.store import open_database

    total = members + spare
    db = open_database(str(path))
    try:
        db.execute("SET enable_progress_bar = false")
        db.execute("BEGIN")
        db.execute("""INSERT INTO identities_base
                      SELECT $scope, i, 'customerid', 'c' || i, 'c' || i, $at FROM range(1, $total + 1) t(i)""",
                   {"scope": WORKSPACE_ID, "total": total, "at": STARTED_AT_MS})
        db.execute("""INSERT INTO identities_base
                      SELECT $scope, i, 'email', 'reader' || i || '@example.com', 'Reader' || i || '@Example.COM', $at
                      FROM range(1, $total + 1) t(i) WHERE i % 10 <> 0""",
                   {"scope": WORKSPACE_ID, "total": total, "at": STARTED_AT_MS})
        db.execute("""INSERT INTO identities_base
                      SELECT $scope, i, 'mobile_number', '+1555' || lpad(i::VARCHAR, 8, '0'),
                             '+1 (555) ' || lpad(i::VARCHAR, 8, '0'), $at
                      FROM range(1, $total + 1) t(i) WHERE i % 10 < 7 AND i % 30 <> 0""",
                   {"scope": WORKSPACE_ID, "total": total, "at": STARTED_AT_MS})
        db.execute("COMMIT")
        db.execute("CHECKPOINT")
    finally:
        db.close()


@dataclass
class World:
    """The database, the registries and the delivery service over them, with one audience and two connections."""

    db: Any
    writer: Any
    audiences: Any
    connections: Any
    delivery: Any
    audience_id: int
    braze: Any
    facebook: Any

    def commit(self, batch: Any) -> None:
        self.writer.submit(batch).result()

    async def close(self) -> None:
        await self.delivery.aclose()
        self.writer.close()
        self.db.close()


def open_world(path: Path, fakes: FakesProcess) -> World:
    from audiences.connections import ConnectionRegistry
    from audiences.delivery import DeliveryService
    from audiences.outputs.base import RetryPolicy
    from audiences.registry import AudienceRegistry
    from engine.computation_gate import ComputationGate
    from engine.secrets import MasterKey
    from engine.store import open_database
    from engine.writer import GroupCommitWriter

    db = open_database(str(path))
    db.execute("SET enable_progress_bar = false")
    writer = GroupCommitWriter(db)
    audiences = AudienceRegistry(lambda workspace_id, ca_id: False)
    connections = ConnectionRegistry(MasterKey(b"b" * 32))
    world = World(db, writer, audiences, connections, None, 0, None, None)
    audience, batch = audiences.plan_create(WORKSPACE_ID, {
        "name": "benchmark readers", "external_name": "Benchmark Readers", "type": "standard",
        "criteria": {"identity": {"type": "customerid", "present": True}}})
    world.commit(batch)
    audiences.remember(audience)
    world.audience_id = audience.id
    bodies = {
        "braze": {"output": "braze", "name": "braze", "credentials": {"api_key": BRAZE_KEY},
                  "settings": {"base_url": fakes.url("braze"), "identity_types": ["customer_id"],
                               "braze": {"send_segments_as": "single_array"}}},
        "facebook": {"output": "facebook", "name": "facebook", "credentials": {"access_token": FACEBOOK_TOKEN},
                     "settings": {"base_url": fakes.url("facebook"), "identity_types": ["email", "mobile_number"],
                                  "facebook": {"ad_account_id": AD_ACCOUNT}}},
    }
    for name, body in bodies.items():
        connection, batch = connections.plan_create(WORKSPACE_ID, audience.id, body)
        world.commit(batch)
        connections.remember(connection)
        setattr(world, name, connection)
    # nothing fails against the fakes; should something be retried, it comes back at once
    world.delivery = DeliveryService(db, connections, audiences, lambda workspace_id: workspace_id, ComputationGate(),
                                     policy=RetryPolicy(base_seconds=0.05, max_seconds=0.5))
    return world


def apply(world: World, members: Any, at_ms: int) -> dict[str, int]:
    from audiences.membership import apply_members

    cursor = world.db.cursor()
    try:
        cursor.begin()
        change = apply_members(cursor, WORKSPACE_ID, world.audience_id, members, at_ms)
        cursor.commit()
    finally:
        cursor.close()
    return {"size": change.size, "adds": change.adds, "drops": change.drops}


def timed_diff(world: World, connection: Any, at_ms: int) -> dict[str, Any]:
    """One connection's diff as DeliveryService diffs it, its phases timed."""
    from audiences import outbox
    from audiences.membership import current_members

    cursor = world.db.cursor()
    try:
        started = time.perf_counter()
        members = current_members(cursor, WORKSPACE_ID, world.audience_id)
        read = time.perf_counter()
        wanted = outbox.wanted_identifiers(cursor, connection, WORKSPACE_ID, members)
        fanned = time.perf_counter()
        cursor.begin()
        try:
            result = outbox.diff_connection(cursor, connection, wanted, at_ms)
            cursor.commit()
        except BaseException:
            cursor.rollback()
            raise
        done = time.perf_counter()
    finally:
        cursor.close()
    return {"total_s": done - started, "members_s": read - started, "wanted_s": fanned - read,
            "outbox_s": done - fanned, "members": len(members), "wanted": result.wanted, "held": result.held,
            "adds": result.adds, "removes": result.removes}


def rows(world: World, sql: str, *params: Any) -> list[tuple]:
    cursor = world.db.cursor()
    try:
        return cursor.execute(sql, list(params)).fetchall()
    finally:
        cursor.close()


async def flush_until_empty(world: World, connection: Any, on_progress: Callable[[int], None]) -> dict[str, Any]:
    """`flush_connection(force=True)` rounds until the connection's outbox is empty; returns the seconds and
    the rounds' counts."""
    service = world.delivery

    async def watch() -> None:
        while True:
            on_progress(service.progress.sent.get(connection.id, 0))
            await asyncio.sleep(0.25)

    watcher = asyncio.ensure_future(watch())
    requests = acknowledged = retried = rejected = rounds = 0
    started = time.perf_counter()
    try:
        while True:
            rounds += 1
            result = await service.flush_connection(connection, force=True)
            requests += result.requests
            acknowledged += result.acknowledged
            retried += result.retried
            rejected += result.rejected
            left = rows(world, "SELECT count(*) FROM delivery_outbox WHERE connection_id = ?", connection.id)[0][0]
            if not left or rejected:
                break
            await asyncio.sleep(0.05)
    finally:
        watcher.cancel()
    return {"seconds": time.perf_counter() - started, "rounds": rounds, "requests": requests,
            "acknowledged": acknowledged, "retried": retried, "rejected": rejected, "left": left}


def attempts_since(world: World, connection_id: int, since_ms: int) -> dict[str, Any]:
    """The delivery_attempts rows of a sync: requests (deliver calls), deltas, seconds inside `deliver`."""
    calls, deltas, deliver_ms = rows(world, "SELECT count(*), coalesce(sum(deltas), 0), coalesce(sum(duration_ms), 0) "
                                            "FROM delivery_attempts WHERE connection_id = ? AND at_ms >= ?",
                                     connection_id, since_ms)[0]
    return {"deliver_calls": calls, "deltas": int(deltas), "deliver_s": deliver_ms / 1000}


def expected_state(world: World) -> dict[str, Any]:
    """What each fake should hold for the current members: Braze customer ids; Facebook per key the SHA-256 hex of
    the email trimmed and lowercased, of the phone's digits without leading zeros (spec §2.6, written here in SQL,
    not taken from audiences/fanout.py)."""
    members = f"""SELECT mpid FROM audience_membership_history WHERE workspace_id = '{WORKSPACE_ID}'
                  AND audience_id = {int(world.audience_id)} AND exited_ms IS NULL"""
    braze = [v for (v,) in rows(world, f"SELECT raw_value FROM identities WHERE identity_type = 'customerid' "
                                       f"AND mpid IN ({members})")]
    email = [v for (v,) in rows(world, f"SELECT sha256(lower(trim(raw_value))) FROM identities "
                                       f"WHERE identity_type = 'email' AND mpid IN ({members})")]
    phone = [v for (v,) in rows(world, "SELECT sha256(ltrim(regexp_replace(raw_value, '[^0-9]', '', 'g'), '0')) "
                                       f"FROM identities WHERE identity_type = 'mobile_number' AND mpid IN ({members})")]
    facebook_members = rows(world, f"""SELECT count(DISTINCT mpid) FROM identities WHERE mpid IN ({members})
                                       AND identity_type IN ('email', 'mobile_number')""")[0][0]
    return {"braze": digest(braze), "facebook": {"EMAIL_SHA256": digest(email), "PHONE_SHA256": digest(phone)},
            "braze_members": len(braze), "facebook_members": facebook_members}


def converged(world: World, fakes: FakesProcess, expected: dict[str, Any], name: str) -> dict[str, Any]:
    connection = getattr(world, name)
    summary = fakes.summary(world.audience_id, connection.id)
    pending, held = rows(world, "SELECT (SELECT count(*) FROM delivery_outbox WHERE connection_id = $1), "
                                "(SELECT count(*) FROM delivery_state WHERE connection_id = $1)", connection.id)[0]
    if name == "braze":
        holds, wanted = summary["braze"]["members"], expected["braze"]
        exact, members = holds == wanted, expected["braze_members"]
    else:
        holds = {key: {"count": a["count"], "sum": a["sum"]} for key, a in summary["facebook"]["audiences"].items()}
        wanted = expected["facebook"]
        exact, members = holds == wanted, expected["facebook_members"]
    return {"exact": exact and pending == 0 and held == members, "destination": holds, "expected": wanted,
            "pending": pending, "held": held, "members": members}


def fill_of(sizes: dict[str, int], maximum: int) -> dict[str, Any]:
    counts = {int(size): count for size, count in sizes.items()}
    requests = sum(counts.values())
    items = sum(size * count for size, count in counts.items())
    full = counts.get(maximum, 0)
    return {"requests": requests, "items": items, "fill": items / (requests * maximum) if requests else None,
            "full_share": full / requests if requests else None,
            "sizes": {str(size): count for size, count in sorted(counts.items(), reverse=True)[:12]}}


async def sync_one(world: World, fakes: FakesProcess, name: str, expected: dict[str, Any],
                   progress: Any) -> dict[str, Any]:
    connection = getattr(world, name)
    pending = rows(world, "SELECT count(*) FROM delivery_outbox WHERE connection_id = ?", connection.id)[0][0]
    task = progress.add_task(f"sync {name}", total=pending)
    fakes.clear_counts()
    since_ms = time.time_ns() // 1_000_000
    flushed = await flush_until_empty(world, connection,
                                      lambda sent: progress.update(task, completed=min(sent, pending)))
    progress.update(task, completed=pending)
    attempts = attempts_since(world, connection.id, since_ms)
    summary = fakes.summary(world.audience_id, connection.id)
    fill = fill_of(summary[name]["sizes"], BRAZE_MAX if name == "braze" else FACEBOOK_MAX)
    check = converged(world, fakes, expected, name)
    members = check["members"]
    seconds = flushed["seconds"]
    return {"deltas": pending, "members": members, "seconds": seconds, "members_per_s": members / seconds,
            **flushed, **attempts, "idmesh_s": seconds - attempts["deliver_s"], "fill": fill, "check": check}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def measure(args: argparse.Namespace, console: Any) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"delivery-{args.size}.run-{os.getpid()}.duckdb"
    from bench.harness import remove_database

    remove_database(path)
    spare = max(10, int(args.members * CHANGE_SHARE) * (args.rounds + 1))
    fakes = FakesProcess(RESULTS / f"delivery-fakes-{os.getpid()}.log")
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    result: dict[str, Any] = {}
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("build: profiles and identities (SQL)", total=1)
            started = time.perf_counter()
            build_database(path, args.members, spare)
            result["build_s"] = time.perf_counter() - started
            progress.update(task, completed=1)
            fakes.wait_ready()
            result.update(asyncio.run(run_rounds(path, fakes, args, progress)))
    finally:
        fakes.stop()
        remove_database(path)
    return result


async def run_rounds(path: Path, fakes: FakesProcess, args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    """Everything after the build, on one event loop (the outputs' httpx clients belong to the loop)."""
    import polars as pl

    world = open_world(path, fakes)
    result: dict[str, Any] = {}
    try:
        at_ms = STARTED_AT_MS
        result["apply"] = apply(world, pl.Series("mpid", range(1, args.members + 1), dtype=pl.Int64), at_ms)
        expected = expected_state(world)
        task = progress.add_task("initial diff", total=2)
        result["initial_diff"] = {}
        for name in ("braze", "facebook"):
            result["initial_diff"][name] = timed_diff(world, getattr(world, name), at_ms)
            progress.advance(task)
        result["sync"] = {}
        for name in ("braze", "facebook"):
            result["sync"][name] = await sync_one(world, fakes, name, expected, progress)
        result["steady"] = await steady_rounds(world, args, progress)
    finally:
        await world.close()
    return result


async def steady_rounds(world: World, args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    """Rounds of: 1% leave and as many enter, each connection's diff timed, the changes flushed; then a diff with
    nothing changed."""
    import polars as pl

    changed = max(1, int(args.members * CHANGE_SHARE))
    members = list(range(1, args.members + 1))
    next_new = args.members + 1
    diffs: dict[str, list[dict[str, Any]]] = {"braze": [], "facebook": []}
    task = progress.add_task(f"steady diffs ({changed:,} out, {changed:,} in)", total=args.rounds)
    at_ms = STARTED_AT_MS
    for round_number in range(args.rounds):
        at_ms += 3_600_000
        leaving = set(members[round_number::max(1, len(members) // changed)][:changed])
        members = [m for m in members if m not in leaving] + list(range(next_new, next_new + changed))
        next_new += changed
        apply(world, pl.Series("mpid", members, dtype=pl.Int64), at_ms)
        for name in diffs:
            diffs[name].append(timed_diff(world, getattr(world, name), at_ms))
            await flush_until_empty(world, getattr(world, name), lambda sent: None)
        progress.advance(task)
    unchanged = {name: timed_diff(world, getattr(world, name), at_ms + 1) for name in diffs}
    summary = {}
    for name, runs in diffs.items():
        summary[name] = {"median_s": median([r["total_s"] for r in runs]),
                         "phases_median_s": {phase: median([r[phase] for r in runs])
                                             for phase in ("members_s", "wanted_s", "outbox_s")},
                         "adds": runs[-1]["adds"], "removes": runs[-1]["removes"], "held": runs[-1]["held"],
                         "runs_s": [round(r["total_s"], 3) for r in runs],
                         "unchanged_s": unchanged[name]["total_s"],
                         "unchanged_queued": unchanged[name]["adds"] + unchanged[name]["removes"]}
    return {"changed_per_round": changed, "rounds": args.rounds, **summary}


# --- report -----------------------------------------------------------------------------------------------------

def figures_line(result: dict[str, Any]) -> str:
    sync, steady, initial = result["sync"], result["steady"], result["initial_diff"]
    parts = []
    for name, maximum in (("braze", BRAZE_MAX), ("facebook", FACEBOOK_MAX)):
        s = sync[name]
        ratio = s["members_per_s"] / GOAL_MEMBERS_PER_S
        parts.append(f"{name} {s['members_per_s']:,.0f} members/s (ratio to goal {ratio:.2f}), "
                     f"fill {s['fill']['fill']:.3f} of {maximum:,} ({s['fill']['requests']:,} requests, "
                     f"{s['fill']['full_share']:.3f} full), exact: {'yes' if s['check']['exact'] else 'NO'}")
    for name in ("braze", "facebook"):
        parts.append(f"diff {name}: initial {initial[name]['total_s']:.2f} s, steady {steady[name]['median_s']:.2f} s "
                     f"(ratio to goal {steady[name]['median_s'] / GOAL_DIFF_S:.2f}), unchanged "
                     f"{steady[name]['unchanged_s']:.2f} s")
    return f"delivery figures: {result['workload']['members']:,} members; " + "; ".join(parts)


def print_tables(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"initial sync of {result['workload']['members']:,} members, each destination alone")
    for column in ("destination", "members", "seconds", "members/s", "requests", "fill", "full", "in deliver s",
                   "idmesh s", "exact"):
        table.add_column(column, justify="right")
    for name, s in result["sync"].items():
        table.add_row(name, f"{s['members']:,}", f"{s['seconds']:.1f}", f"{s['members_per_s']:,.0f}",
                      f"{s['fill']['requests']:,}", f"{s['fill']['fill']:.3f}", f"{s['fill']['full_share']:.3f}",
                      f"{s['deliver_s']:.1f}", f"{s['idmesh_s']:.1f}", "yes" if s["check"]["exact"] else "NO")
    console.print(table)
    table = Table(title="membership diff (seconds)")
    steady_title = f"steady ({result['steady']['changed_per_round']:,} out/in) median"
    for column in ("connection", "initial", "members read", "wanted", "outbox", steady_title, "members read", "wanted",
                   "outbox", "unchanged"):
        table.add_column(column, justify="right")
    for name in ("braze", "facebook"):
        first, steady = result["initial_diff"][name], result["steady"][name]
        phases = steady["phases_median_s"]
        table.add_row(name, f"{first['total_s']:.2f}", f"{first['members_s']:.2f}", f"{first['wanted_s']:.2f}",
                      f"{first['outbox_s']:.2f}", f"{steady['median_s']:.2f}", f"{phases['members_s']:.2f}",
                      f"{phases['wanted_s']:.2f}", f"{phases['outbox_s']:.2f}", f"{steady['unchanged_s']:.2f}")
    console.print(table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="100,000 members")
    size.add_argument("--tiny", action="store_true", help="2,000 members: the smoke test")
    parser.add_argument("--members", type=int, help="any other number of members")
    parser.add_argument("--rounds", type=int, default=3, help="steady diff rounds (default 3)")
    args = parser.parse_args(argv)
    args.size = "quick" if args.quick else "tiny" if args.tiny else "full"
    if args.members is not None:
        args.size = f"{args.members}"
    else:
        args.members = SIZES[args.size]
    if args.members < 100 or args.rounds < 1:
        parser.error("at least 100 members and one round")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fakes"]:
        parser = argparse.ArgumentParser(description="serve the benchmark's fakes")
        for name in ("--braze-port", "--facebook-port", "--control-port"):
            parser.add_argument(name, type=int, required=True)
        fake_args = parser.parse_args(argv[1:])
        serve_fakes(fake_args.braze_port, fake_args.facebook_port, fake_args.control_port)
        return 0
    args = parse_args(argv)

    import duckdb
    import polars as pl
    from rich.console import Console

    console = Console(stderr=True)   # stdout carries the figures line and the JSON
    if not console.is_terminal:
        console.width = 150
    started = time.perf_counter()
    console.rule(f"[bold]idmesh delivery benchmark[/]: initial sync of {args.members:,} members to fake Braze and "
                 f"Facebook (another process), {args.rounds} steady diff round(s)")
    measured = measure(args, console)
    result = {
        "bench": "delivery", "size": args.size,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "duckdb": duckdb.__version__, "polars": pl.__version__},
        "workload": {"members": args.members, "email_share": 0.9, "phone_share": 2 / 3, "neither_share": 1 / 30},
        "goals": {"diff_s": GOAL_DIFF_S, "fill": GOAL_FILL, "members_per_s": GOAL_MEMBERS_PER_S},
        **measured, "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print_tables(result, console)
    failures = [f"{name} did not converge: {json.dumps(s['check'])}" for name, s in result["sync"].items()
                if not s["check"]["exact"]]
    for failure in failures:
        console.print(f"[bold red]bench: {failure}[/]")
    out = RESULTS / f"delivery-{args.size}-{time.strftime('%Y%m%d-%H%M%S')}.result.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    console.print(f"[dim]full results: {out.relative_to(ROOT)}[/]")
    print(figures_line(result))
    print(json.dumps(result, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
