"""Erasures and calculated attribute computations, which write the same value rows in different transactions
(engine/computation_gate.py): an erasure waits for a running computation, neither commit fails, and no value
row of the erased MPID outlives the erasure.

The interleavings are made deterministic by pausing a computation right after it read events (inside a full
computation's transaction, or between an incremental refresh's reads and its writes), starting the erasure,
and letting the computation go on only once the erasure is waiting for it, or has already finished, as it
would without the gate.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from live_server import IdSyncClient, LiveServer
from test_calculated_attributes_api import SPEND, purchase, settle, values
from test_dsr import Controller

from engine import ca_engine
from engine.computation_gate import ComputationGate

WAIT_S = 120  # generous: only a broken test waits this long


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"waited {WAIT_S} s for {what}"
        time.sleep(0.005)


class PausedReads:
    """Wraps engine.ca_engine.read_each: once armed, the next read hands over its events only when `resume` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.armed = False
        self.paused = threading.Event()
        self.resume = threading.Event()
        original = ca_engine.read_each

        def read_then_pause(*args: Any, **kwargs: Any) -> Iterator[Any]:
            for read in original(*args, **kwargs):
                if self.armed:
                    self.armed = False
                    self.paused.set()
                    assert self.resume.wait(WAIT_S), "the test never resumed the computation"
                yield read

        monkeypatch.setattr(ca_engine, "read_each", read_then_pause)


@pytest.fixture
def reads(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[PausedReads]:
    paused = PausedReads(monkeypatch)
    yield paused
    paused.resume.set()  # a failed test must not leave the server's shutdown waiting for the computation


class Shop:
    """A workspace with two customers and an active `sum` of their purchases, computed: `erased` and `kept`."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        credentials = server.create_workspace()
        self.client, self.controller = IdSyncClient(server, credentials), Controller(server, credentials)
        self.workspace_id = server.service.workspaces.by_api_key(credentials.api_key).id
        self.base = f"/platform/v2/workspaces/{self.workspace_id}/calculatedattributes"
        for batch in (purchase("erased", 10, 1_000), purchase("erased", 5, 2_000), purchase("kept", 7, 3_000)):
            assert self.client.call("/v2/events", batch).status_code == 202
        self.erased = int(self.client.identify({"customerid": "erased"})["mpid"])
        self.kept = int(self.client.identify({"customerid": "kept"})["mpid"])
        created = self.client.http.post(self.base, json={"name": "spend", "draft_definition": SPEND}, auth=self.auth)
        self.ca_id = created.json()["id"]
        self.activate()
        settle(server)
        assert values(server, self.ca_id) == {self.erased: 15.0, self.kept: 7.0}

    @property
    def auth(self) -> tuple[str, str]:
        return self.client.auth

    def activate(self) -> None:
        assert self.client.http.post(f"{self.base}/{self.ca_id}/activation", auth=self.auth).status_code == 204

    def calculation(self) -> dict[str, Any]:
        return self.client.http.get(f"{self.base}/{self.ca_id}/calculation", auth=self.auth).json()

    def start_erasure(self) -> tuple[str, Future[int]]:
        """Submit an erasure of `erased` and start processing it on the server's loop; the future resolves to
        the number of requests completed."""
        request_id = self.controller.submitted({"customer_id": "erased"})
        dsr = self.server.app.state.dsr
        return request_id, asyncio.run_coroutine_threadsafe(dsr.process_due(), self.server.loop)

    def close(self) -> None:
        self.client.close()
        self.controller.http.close()


@pytest.fixture
def shop(server: LiveServer) -> Iterator[Shop]:
    created = Shop(server)
    yield created
    created.close()


def erase_while_paused(server: LiveServer, shop: Shop, reads: PausedReads) -> str:
    """With a computation paused after its read, erase `erased`; let the computation go on once the erasure waits
    for it (or, without the gate, has finished). Returns the request id once the erasure is done."""
    assert reads.paused.wait(WAIT_S)
    request_id, erasing = shop.start_erasure()
    gate = server.service.computation_gate
    wait_until(lambda: erasing.done() or gate.exclusive_waiting, "the erasure to wait or finish")
    reads.resume.set()
    assert erasing.result(WAIT_S) == 1, "the erasure did not complete"
    settle(server)
    return request_id


def test_an_erasure_waits_for_a_full_computation_and_neither_commit_fails(server: LiveServer, shop: Shop,
                                                                           reads: PausedReads):
    """The full computation deleted every value row of the attribute in its transaction, the erased person's
    too; an erasure deleting that row meanwhile would fail its group commit (a write-write conflict)."""
    assert shop.client.http.put(f"{shop.base}/{shop.ca_id}", json={"draft_definition": SPEND},
                                auth=shop.auth).status_code == 204
    reads.armed = True
    shop.activate()  # a new active definition: everything is computed again
    request_id = erase_while_paused(server, shop, reads)

    status = shop.controller.status(request_id)
    assert (status["request_status"], status["results_count"]) == ("completed", 1)
    assert shop.calculation()["status"] == "ready"
    assert values(server, shop.ca_id) == {shop.kept: 7.0}
    assert server.query("SELECT count(*) FROM calculated_attribute_values WHERE mpid = ?", shop.erased) == [(0,)]


def test_a_refresh_that_read_the_persons_events_writes_no_value_after_the_erasure(server: LiveServer, shop: Shop,
                                                                                 reads: PausedReads):
    """An incremental refresh reads first and writes after; had the erasure committed in between, the refresh
    would write the erased MPID's value back. Refreshes queued for the MPID after the erasure write nothing."""
    reads.armed = True
    assert shop.client.call("/v2/events", purchase("erased", 100, 4_000)).status_code == 202  # queues a refresh
    request_id = erase_while_paused(server, shop, reads)

    assert shop.controller.status(request_id)["request_status"] == "completed"
    assert server.query("SELECT count(*) FROM calculated_attribute_values WHERE mpid = ?", shop.erased) == [(0,)]
    ca = server.app.state.calculated.get(shop.workspace_id, shop.ca_id)
    server.app.state.calculation.refresh(ca, [shop.erased, shop.kept])
    assert values(server, shop.ca_id) == {shop.kept: 7.0}


# --- the gate itself ----------------------------------------------------------------------------------------------

def hold_computing(gate: ComputationGate, entered: threading.Event, leave: threading.Event) -> threading.Thread:
    def compute() -> None:
        with gate.computing():
            entered.set()
            leave.wait(WAIT_S)
    thread = threading.Thread(target=compute, daemon=True)
    thread.start()
    return thread


def test_a_waiting_erasure_goes_before_computations_that_had_not_started():
    gate = ComputationGate()
    first_in, first_out = threading.Event(), threading.Event()
    hold_computing(gate, first_in, first_out)
    assert first_in.wait(WAIT_S)
    order: list[str] = []

    async def erase() -> None:
        async with gate.exclusive():
            order.append("erasure")

    async def scenario() -> None:
        erasure = asyncio.create_task(erase())
        while not gate.exclusive_waiting:
            await asyncio.sleep(0.005)
        second_in = threading.Event()
        hold_computing(gate, second_in, threading.Event())
        await asyncio.sleep(0.05)
        assert not second_in.is_set(), "a computation started while an erasure waited"
        first_out.set()
        await erasure
        await asyncio.to_thread(second_in.wait, WAIT_S)
        order.append("second computation" if second_in.is_set() else "second computation never started")

    asyncio.run(scenario())
    assert order == ["erasure", "second computation"]


def test_a_cancelled_erasure_does_not_leave_the_gate_shut():
    """An erasure cancelled while it waits (a shutdown) still gets the gate once the computations end, in a
    thread nobody waits for any more; it must give it back."""
    gate = ComputationGate()
    running, finish = threading.Event(), threading.Event()
    hold_computing(gate, running, finish)
    assert running.wait(WAIT_S)

    async def erase() -> None:
        async with gate.exclusive():
            raise AssertionError("the cancelled erasure ran")

    async def scenario() -> bool:
        erasure = asyncio.create_task(erase())
        while not gate.exclusive_waiting:
            await asyncio.sleep(0.005)
        erasure.cancel()
        with pytest.raises(asyncio.CancelledError):
            await erasure
        finish.set()
        later = threading.Event()
        hold_computing(gate, later, threading.Event())
        return await asyncio.to_thread(later.wait, WAIT_S)

    assert asyncio.run(scenario()), "no computation could start after the cancelled erasure"
