"""Webhook delivery over real HTTP: a local receiver that verifies every signature and applies membership messages
as set operations; membership changes reach it; a receiver failing with 500s (and one that applies a batch then
fails or answers too late) is retried until it holds the membership exactly; a slow destination does not delay
another one; a rejected batch waits until the connection is fixed. The store is a real DuckDB file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
from fakes.server import FakeServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from audiences.connections import Connection, ConnectionRegistry
from audiences.delivery import DeliveryService
from audiences.membership import apply_members
from audiences.outputs import webhook
from audiences.outputs.base import RetryPolicy, http_client
from audiences.registry import Audience, AudienceRegistry
from engine.idsync import IdSyncService
from engine.writer import WriteBatch

SECRET = "whsec-test-1"
FAST_RETRY = RetryPolicy(base_seconds=0.05, max_seconds=0.2, jitter=0.5)


@dataclass
class Receiver:
    """A webhook endpoint: checks the signature, then applies each message to its per-audience member sets."""

    secret: str = SECRET
    fail_first: int = 0              # answer 500 to this many requests, applying nothing
    apply_then_fail: int = 0         # then apply this many and answer 500 anyway (the answer says nothing happened)
    delay_seconds: float = 0.0       # sleep before answering (after applying)
    members: dict[int, set[str]] = field(default_factory=dict)
    identifiers: dict[str, dict[str, str]] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    bad_signatures: int = 0
    delivery_ids: list[str] = field(default_factory=list)
    answered_at: list[float] = field(default_factory=list)

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        self.requests += 1
        if not webhook.verify(self.secret, request.headers.get(webhook.TIMESTAMP_HEADER),
                              request.headers.get(webhook.SIGNATURE_HEADER), body):
            self.bad_signatures += 1
            return JSONResponse({"error": "bad signature"}, status_code=401)
        if self.fail_first > 0:
            self.fail_first -= 1
            return JSONResponse({"error": "try again"}, status_code=500)
        self.delivery_ids.append(request.headers[webhook.DELIVERY_HEADER])
        for message in orjson.loads(body)["messages"]:
            self.messages.append(message)
            held = self.members.setdefault(message["audience_id"], set())
            if message["op"] == "add":
                held.add(message["mpid"])
                self.identifiers[message["mpid"]] = message["identifiers"]
            else:
                held.discard(message["mpid"])
        if self.apply_then_fail > 0:
            self.apply_then_fail -= 1
            return JSONResponse({"error": "applied, but says otherwise"}, status_code=503)
        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        self.answered_at.append(time.monotonic())
        return JSONResponse({"ok": True})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])


@pytest.fixture
def receivers() -> Iterator[list[tuple[Receiver, FakeServer]]]:
    started: list[tuple[Receiver, FakeServer]] = []
    yield started
    for _, server in started:
        server.stop()


def serve(receivers: list, receiver: Receiver) -> str:
    server = FakeServer(receiver.app()).start()
    receivers.append((receiver, server))
    return f"{server.base_url}/hook"


class World:
    """A real DuckDB file with a workspace, audiences and webhook connections, and the delivery service over it."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.service = IdSyncService.open(str(path))
        created, batch = self.service.workspaces.plan_create("delivery", None)
        self._commit(batch)
        self.service.workspaces.remember(created.workspace)
        self.workspace = created.workspace
        self.audiences = AudienceRegistry(lambda ws, ca_id: False)
        self.connections = ConnectionRegistry(self.service.master_key)
        self.delivery = DeliveryService(
            self.service.connection, self.connections, self.audiences,
            lambda ws: self.service.workspaces.get(ws).scope, self.service.computation_gate,
            outputs={"webhook": lambda c, a: webhook.WebhookOutput(c, a, http_client(timeout=timeout))},
            policy=FAST_RETRY)

    def _commit(self, batch: WriteBatch) -> None:
        self.service.writer.submit(batch).result(timeout=30)

    def audience(self, name: str) -> Audience:
        audience, batch = self.audiences.plan_create(self.workspace.id, {
            "name": name, "external_name": f"ext_{name}", "type": "standard",
            "criteria": {"identity": {"type": "email", "present": True}}})
        self._commit(batch)
        self.audiences.remember(audience)
        return audience

    def connect(self, audience: Audience, url: str, secret: str = SECRET, **settings: Any) -> Connection:
        connection, batch = self.connections.plan_create(self.workspace.id, audience.id, {
            "output": "webhook", "credentials": {"secret": secret},
            "settings": {"webhook": {"url": url, **settings.pop("webhook", {})}, **settings}})
        self._commit(batch)
        self.connections.remember(connection)
        return connection

    def update(self, connection: Connection, body: dict[str, Any]) -> Connection:
        updated, batch = self.connections.plan_update(self.workspace.id, connection.audience_id, connection.id,
                                                      body)
        self._commit(batch)
        self.connections.remember(updated)
        return updated

    def members(self, audience: Audience, mpids: list[int]) -> None:
        cursor = self.service.connection.cursor()
        cursor.begin()
        apply_members(cursor, self.workspace.id, audience.id, pl.Series("mpid", mpids, dtype=pl.Int64),
                      time.time_ns() // 1_000_000)
        cursor.commit()
        cursor.close()

    def emails(self, mpids: list[int]) -> None:
        self.service.connection.executemany(
            "INSERT INTO identities_base VALUES (?, ?, 'email', ?, ?, 0)",
            [(self.workspace.scope, m, f"p{m}@example.com", f"P{m}@Example.com") for m in mpids])

    def rows(self, sql: str, *params: Any) -> list[tuple]:
        cursor = self.service.connection.cursor()
        try:
            return cursor.execute(sql, list(params)).fetchall()
        finally:
            cursor.close()

    def close(self) -> None:
        asyncio.run(self.delivery.aclose())
        self.service.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    made = World(tmp_path / "delivery.duckdb")
    yield made
    made.close()


async def until_settled(delivery: DeliveryService, connection_ids: list[int], timeout: float = 30.0) -> int:
    """Flush rounds until the connections' outboxes are empty (retries wait out their short backoff). Returns
    the rounds it took."""
    deadline = time.monotonic() + timeout
    rounds = 0
    while True:
        rounds += 1
        await delivery.run_once()
        left = delivery._read(lambda cur: cur.execute(
            "SELECT count(*) FROM delivery_outbox WHERE list_contains(?, connection_id)",
            [connection_ids]).fetchall()[0][0])
        if not left:
            return rounds
        if time.monotonic() > deadline:
            raise AssertionError(f"{left} deltas still pending after {rounds} rounds")
        await asyncio.sleep(0.05)


def as_text(mpids: list[int]) -> set[str]:
    return {str(m) for m in mpids}


def test_membership_changes_reach_the_receiver_signed(world: World, receivers):
    receiver = Receiver()
    audience = world.audience("buyers")
    connection = world.connect(audience, serve(receivers, receiver), identity_types=["email"])
    world.emails([1, 2, 3, 4])
    world.members(audience, [1, 2, 3])
    result = asyncio.run(world.delivery.run_once())
    assert (result.diffs[connection.id].adds, result.flushes[connection.id].acknowledged) == (3, 3)
    assert receiver.members == {audience.id: as_text([1, 2, 3])}
    first = next(m for m in receiver.messages if m["mpid"] == "1")
    assert first == {"audience_id": audience.id, "external_name": "ext_buyers", "connection_id": connection.id,
                     "op": "add", "mpid": "1", "identifiers": {"email": "P1@Example.com", "mpid": "1"},
                     "attributes": {}, "changed_ms": first["changed_ms"]}
    assert receiver.bad_signatures == 0
    world.members(audience, [2, 3, 4])
    asyncio.run(world.delivery.run_once())
    assert receiver.members == {audience.id: as_text([2, 3, 4])}
    assert world.rows("SELECT mpid FROM delivery_state ORDER BY mpid") == [(2,), (3,), (4,)]
    assert world.rows("SELECT count(*) FROM delivery_outbox") == [(0,)]
    # nothing changed: nothing is sent
    before = receiver.requests
    asyncio.run(world.delivery.run_once())
    assert receiver.requests == before
    status = world.rows("SELECT pending_adds, pending_removes, held, last_success_ms IS NOT NULL, requests_24h "
                        "FROM delivery_status WHERE connection_id = ?", connection.id)
    assert status == [(0, 0, 3, True, 2)]


def test_a_resync_sends_every_members_add_again(world: World, receivers):
    receiver = Receiver()
    audience = world.audience("resent")
    connection = world.connect(audience, serve(receivers, receiver), identity_types=["email"])
    world.emails([1, 2, 3])
    world.members(audience, [1, 2, 3])
    asyncio.run(world.delivery.run_once())
    receiver.members.clear()   # the receiver lost its data

    async def resync() -> Any:
        result = await world.delivery.resync(connection)
        await world.delivery.idle()
        return result

    result = asyncio.run(resync())
    assert (result.mode, result.members, result.queued, result.completed) == ("resend", 3, 3, True)
    assert receiver.members == {audience.id: as_text([1, 2, 3])}
    assert [m["op"] for m in receiver.messages] == ["add"] * 6
    assert world.rows("SELECT count(*) FROM delivery_outbox") == [(0,)]
    assert world.rows("SELECT count(*) FROM delivery_state") == [(3,)]


def test_batches_follow_the_batch_size_and_a_threshold_holds_small_queues_back(world: World, receivers):
    receiver = Receiver()
    audience = world.audience("many")
    connection = world.connect(audience, serve(receivers, receiver), webhook={"batch_size": 40},
                               upload={"max_age_seconds": 3600, "max_queued": 100})
    world.members(audience, list(range(1, 51)))
    asyncio.run(world.delivery.diff([connection.id]))
    flushed = asyncio.run(world.delivery.flush_connection(connection))
    assert flushed.requests == 0 and receiver.requests == 0   # 50 queued < 100, the oldest is young
    world.members(audience, list(range(1, 121)))
    asyncio.run(world.delivery.diff([connection.id]))
    flushed = asyncio.run(world.delivery.flush_connection(connection))
    assert (flushed.requests, flushed.acknowledged) == (3, 120)
    assert len(receiver.delivery_ids) == 3 and receiver.members[audience.id] == as_text(list(range(1, 121)))


def test_a_failing_receiver_is_retried_until_it_holds_the_membership_exactly(world: World, receivers):
    receiver = Receiver(fail_first=3, apply_then_fail=2)
    audience = world.audience("flaky")
    connection = world.connect(audience, serve(receivers, receiver), webhook={"batch_size": 7})
    world.members(audience, list(range(1, 31)))

    async def scenario() -> None:
        await world.delivery.run_once()   # the first answers are 500s: everything waits for a retry
        assert receiver.members.get(audience.id, set()) == set()
        # the membership moves while deltas are failing: some leave before anything was acknowledged
        world.members(audience, list(range(10, 41)))
        await until_settled(world.delivery, [connection.id])

    asyncio.run(scenario())
    assert receiver.members[audience.id] == as_text(list(range(10, 41)))
    assert world.rows("SELECT count(*) FROM delivery_state") == [(31,)]
    retried = world.rows("SELECT sum(retried), count(*) FILTER (WHERE status = 500) FROM delivery_attempts")
    assert retried[0][0] > 0 and retried[0][1] >= 3


def test_a_receiver_answering_too_late_gets_the_batch_again_and_ends_exact(tmp_path: Path, receivers):
    receiver = Receiver(delay_seconds=1.5)
    world = World(tmp_path / "late.duckdb", timeout=0.5)
    try:
        audience = world.audience("late")
        connection = world.connect(audience, serve(receivers, receiver))
        world.members(audience, [1, 2, 3])

        async def scenario() -> None:
            await world.delivery.run_once()   # applied, but the answer comes after the client gave up
            assert receiver.members[audience.id] == as_text([1, 2, 3])
            assert world.rows("SELECT count(*) FROM delivery_state") == [(0,)]
            world.members(audience, [1, 2])   # 3 leaves: its add may have been applied, so it is removed
            receiver.delay_seconds = 0
            await until_settled(world.delivery, [connection.id])

        asyncio.run(scenario())
        assert receiver.members[audience.id] == as_text([1, 2])
        assert world.rows("SELECT mpid FROM delivery_state ORDER BY mpid") == [(1,), (2,)]
    finally:
        world.close()


def test_a_slow_destination_does_not_delay_another(world: World, receivers):
    slow, fast = Receiver(delay_seconds=3.0), Receiver()
    audience = world.audience("both")
    slow_connection = world.connect(audience, serve(receivers, slow))
    fast_connection = world.connect(audience, serve(receivers, fast))
    world.members(audience, [1, 2, 3])

    async def scenario() -> tuple[float, float]:
        await asyncio.to_thread(world.delivery.diff_connections)
        started = time.monotonic()
        tasks = world.delivery.flush_due(force=True)
        await tasks[fast_connection.id]
        fast_done = time.monotonic() - started
        assert not tasks[slow_connection.id].done()
        # the next scheduler tick skips the slow one (its task is still running) and flushes the fast one again
        world.members(audience, [1, 2, 3, 4])
        await asyncio.to_thread(world.delivery.diff_connections)
        again = world.delivery.flush_due(force=True)
        assert slow_connection.id not in again
        await again[fast_connection.id]
        await tasks[slow_connection.id]
        return fast_done, time.monotonic() - started

    fast_done, slow_done = asyncio.run(scenario())
    assert fast_done < 1.5 <= 3.0 <= slow_done
    assert fast.members[audience.id] == as_text([1, 2, 3, 4])
    # the slow round picked up the later change after its first answer: it ends as exact, only later
    assert slow.members[audience.id] == as_text([1, 2, 3, 4])


def test_a_rejected_batch_waits_until_the_connection_is_fixed(world: World, receivers):
    receiver = Receiver()
    audience = world.audience("secretive")
    connection = world.connect(audience, serve(receivers, receiver), secret="wrong-secret")
    world.members(audience, [1, 2])
    result = asyncio.run(world.delivery.run_once())
    assert result.flushes[connection.id].rejected == 2 and receiver.bad_signatures == 1
    asyncio.run(world.delivery.run_once())   # parked: not sent again as it is
    assert receiver.requests == 1
    assert world.rows("SELECT DISTINCT last_error FROM delivery_outbox")[0][0].startswith("rejected: HTTP 401")
    world.update(connection, {"credentials": {"secret": SECRET}})
    asyncio.run(world.delivery.run_once())
    assert receiver.members[audience.id] == as_text([1, 2])
    assert world.rows("SELECT count(*) FROM delivery_outbox") == [(0,)]


def test_signatures_check_body_secret_and_age():
    body = b'{"messages":[]}'
    now = int(time.time())
    good = webhook.sign("k", str(now), body)
    assert good.startswith("sha256=") and webhook.verify("k", str(now), good, body)
    assert not webhook.verify("other", str(now), good, body)
    assert not webhook.verify("k", str(now), good, body + b" ")
    assert not webhook.verify("k", str(now - 3600), webhook.sign("k", str(now - 3600), body), body)
    assert not webhook.verify("k", None, good, body) and not webhook.verify("k", "x", good, body)


# --- the whole path in a running server -------------------------------------------------------------------------

def _play(customer: str) -> dict[str, Any]:
    data = {"event_name": "play", "custom_event_type": "other", "timestamp_unixtime_ms": int(time.time() * 1000) - 1000}
    return {"user_identities": {"customer_id": customer}, "events": [{"event_type": "custom_event", "data": data}]}


def _eventually(condition: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def test_ingested_events_reach_the_webhook_through_the_server(server, idsync, receivers):
    receiver = Receiver()
    url = serve(receivers, receiver)
    client = idsync()
    workspace_id = server.service.workspaces.by_api_key(client.auth[0]).id
    base = f"/platform/v2/workspaces/{workspace_id}/audiences"
    audience = client.http.post(base, auth=client.auth, json={
        "name": "players", "criteria": {"event": {"event_type": "custom_event", "event_name": "play"}}}).json()
    created = client.http.post(f"{base}/{audience['id']}/connections", auth=client.auth, json={
        "output": "webhook", "credentials": {"secret": SECRET},
        "settings": {"webhook": {"url": url}, "identity_types": ["customer_id"], "upload": {"max_age_seconds": 0}}})
    assert created.status_code == 201, created.text
    for customer in ("alice", "bob"):
        assert client.call("/v2/events", _play(customer)).status_code == 202
    mpids = {str(client.identify({"customerid": c})["mpid"]) for c in ("alice", "bob")}
    _eventually(lambda: receiver.members.get(audience["id"]) == mpids, "the players reach the webhook")
    by_mpid = {m["mpid"]: m["identifiers"] for m in receiver.messages}
    assert sorted(i["customer_id"] for i in by_mpid.values()) == ["alice", "bob"]
    connection = f"{base}/{audience['id']}/connections/{created.json()['id']}"
    _eventually(lambda: client.http.get(connection, auth=client.auth).json()["delivery"]["held"] == 2,
                "the status shows both held")
    # a restart resends nothing: the state says what the webhook holds
    server.restart()
    requests = receiver.requests
    asyncio.run_coroutine_threadsafe(server.app.state.delivery.run_once(force=False), server.loop).result()
    assert receiver.requests == requests and receiver.bad_signatures == 0
