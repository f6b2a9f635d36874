"""Who evaluates audiences when (docs/audiences.md), and the incremental upkeep after ingest that calculated
attributes and real-time audiences share.

- After an ingested batch: the touched profiles' calculated attributes are refreshed, then the workspace's
  real-time audiences are evaluated for those profiles only, in dependency order, and applied within them.
  Touched profiles gather per workspace while a refresh runs and go together into the next one, so a busy
  ingest costs a few large refreshes rather than one DuckDB read per request.
- A full evaluation (every profile of the workspace): when an audience is created or its definition changes,
  when a standard audience is due (`refresh_minutes`) or asked for, when time alone may have changed a real-time
  audience with a time window (`TIME_DRIVEN_SECONDS`), and at start-up. Real-time audiences reading an audience
  being evaluated go along (they follow its stored membership).
- Start-up: every audience is evaluated once the calculated attributes are recomputed. Upkeep after an
  acknowledged batch is not durable, and a full evaluation runs in its own transaction that a crash rolls back,
  so what a crash cut short cannot be told from the tables; evaluating everything redoes it whatever it was
  (the performance goal puts 20 audiences over 1M profiles at <= 5 s).

Evaluations run in worker threads (asyncio.to_thread), each on its own DuckDB cursor and transaction, holding
the lock of every audience it writes (taken in id order, so two evaluations never wait on each other in a
circle) and the store's computation gate (engine/computation_gate.py: an erasure never runs beside one).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import duckdb
import polars as pl

from audiences.definitions import Criteria
from audiences.evaluate import evaluate_audiences
from audiences.membership import Change, apply_members, current_members
from audiences.registry import Audience, AudienceRegistry
from engine.ca_engine import CalculatedAttributeEngine
from engine.ca_registry import CalculatedAttributeRegistry
from engine.computation_gate import ComputationGate
from engine.store import now_ms

log = logging.getLogger("idmesh.audiences")

STANDARD_POLL_SECONDS = 60    # how often the scheduler looks for standard audiences that are due
TIME_DRIVEN_SECONDS = 300     # real-time audiences with a time window: full evaluation this often
PREVIEW_ID = 0                # what a previewed definition is called in its evaluation: no audience has it


@dataclass
class EvaluationStatus:
    """A full evaluation's state: not_started, calculating, ready or failed. In memory: start-up evaluates every
    audience again, so what a status would say after a restart is "calculating" anyway."""

    state: str = "not_started"
    started_ms: int | None = None
    completed_ms: int | None = None    # the last full evaluation that finished
    error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_json(self) -> dict[str, object]:
        return {"status": self.state, "started_timestamp_ms": self.started_ms,
                "completed_timestamp_ms": self.completed_ms, "error": self.error}


class AudienceUpkeep:
    def __init__(self, connection: duckdb.DuckDBPyConnection, audiences: AudienceRegistry,
                 calculated: CalculatedAttributeRegistry, calculation: CalculatedAttributeEngine,
                 gate: ComputationGate) -> None:
        self._connection = connection
        self.audiences = audiences
        self.calculated = calculated
        self.calculation = calculation
        self._gate = gate
        self.status: dict[int, EvaluationStatus] = {}
        self.tasks: set[asyncio.Task[Any]] = set()   # work running off the event loop; tests wait for it
        self._pending: dict[str, set[int]] = {}
        self._drain: asyncio.Task[None] | None = None
        # told (workspace id, audience ids) from the worker thread after an evaluation committed membership changes:
        # delivery diffs those audiences' connections (audiences/delivery.py)
        self.on_applied: list[Callable[[str, list[int]], None]] = []

    def status_of(self, audience_id: int) -> EvaluationStatus:
        return self.status.setdefault(audience_id, EvaluationStatus())

    def forget(self, audience_id: int) -> None:
        self.status.pop(audience_id, None)

    # --- on the event loop ------------------------------------------------------------------------------------
    def start(self, work: Awaitable[Any], what: str) -> asyncio.Task[Any]:
        """Run `work` in the background, keeping a reference until it is done (the loop keeps only weak ones)."""
        task = asyncio.ensure_future(work)
        self.tasks.add(task)

        def done(finished: asyncio.Task[Any]) -> None:
            self.tasks.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                log.error("%s failed: %s", what, finished.exception())
        task.add_done_callback(done)
        return task

    def profiles_touched(self, workspace_id: str, mpids: list[int]) -> None:
        """An ingest stored events or attributes of these profiles: queue their upkeep."""
        if not mpids or not (self.calculated.active(workspace_id) or self.audiences.has_real_time(workspace_id)):
            return
        self._pending.setdefault(workspace_id, set()).update(mpids)
        if self._drain is None or self._drain.done():
            self._drain = self.start(self._drain_pending(), "upkeep after ingest")

    async def _drain_pending(self) -> None:
        while self._pending:
            workspace_id, mpids = self._pending.popitem()
            await asyncio.to_thread(self.refresh_profiles, workspace_id, sorted(mpids))

    def evaluate_in_background(self, workspace_id: str, audience_ids: list[int]) -> asyncio.Task[Any]:
        """A full evaluation of these audiences (and the real-time ones reading them); "calculating" at once."""
        stamp = now_ms()
        for audience_id in audience_ids:
            status = self.status_of(audience_id)
            status.state, status.started_ms, status.error = "calculating", stamp, None
        return self.start(asyncio.to_thread(self.evaluate_full, workspace_id, audience_ids),
                          f"evaluating audiences {audience_ids}")

    def evaluate_after_start(self, waiting_for: list[asyncio.Task[Any]]) -> None:
        """Start-up: once the calculated attributes they may read are recomputed, evaluate every audience."""
        async def run() -> None:
            await asyncio.gather(*waiting_for, return_exceptions=True)
            for workspace_id in self.audiences.workspaces():
                ids = [a.id for a in self.audiences.list(workspace_id)]
                # one workspace at a time; a failure is logged (and the status says it) and the others go on
                await asyncio.wait([self.evaluate_in_background(workspace_id, ids)])
        self.start(run(), "evaluating audiences after start-up")

    async def evaluate_due_standard(self, as_of_ms: int | None = None) -> list[int]:
        """Scheduler job: standard audiences whose `refresh_minutes` have passed since their last evaluation.
        Returns their ids."""
        at = as_of_ms or now_ms()
        due: dict[str, list[int]] = {}
        for audience in self.audiences.all():
            status = self.status_of(audience.id)
            minutes = audience.parsed.refresh_minutes
            if audience.is_real_time or status.state == "calculating" or minutes is None:
                continue
            if status.completed_ms is None or at - status.completed_ms >= minutes * 60_000:
                due.setdefault(audience.workspace_id, []).append(audience.id)
        await asyncio.gather(*(self.evaluate_in_background(ws, ids) for ws, ids in due.items()),
                             return_exceptions=True)
        return sorted(i for ids in due.values() for i in ids)

    async def evaluate_time_driven(self, as_of_ms: int | None = None) -> list[int]:
        """Scheduler job: real-time audiences whose time windows move with the clock, evaluated fully (a
        profile leaves "in the last 72 hours" without any batch touching it). Returns their ids."""
        chosen: dict[str, list[int]] = {}
        for audience in self.audiences.all():
            if audience.is_real_time and audience.changes_with_time():
                chosen.setdefault(audience.workspace_id, []).append(audience.id)
        for workspace_id, ids in chosen.items():
            try:
                await asyncio.to_thread(self.evaluate_full, workspace_id, ids, as_of_ms)
            except Exception as exc:  # the status says failed; the next run tries again
                log.error("time-driven evaluation of audiences %s failed: %s", ids, exc)
        return sorted(i for ids in chosen.values() for i in ids)

    async def refresh_time_driven_attributes(self, as_of_ms: int | None = None) -> int:
        """Scheduler job: recompute the calculated attribute values time alone has changed (windows,
        future-stamped events), then the real-time audiences of those profiles. Returns how many profile values
        were recomputed."""
        as_of = as_of_ms or now_ms()
        recomputed = 0
        changed: dict[str, set[int]] = {}
        for ca in self.calculated.all_active():
            mpids = await asyncio.to_thread(self.calculation.due, ca, as_of)
            if mpids:
                await asyncio.to_thread(self.calculation.refresh, ca, mpids, as_of)
                recomputed += len(mpids)
                changed.setdefault(ca.workspace_id, set()).update(mpids)
        for workspace_id, mpids in changed.items():
            await asyncio.to_thread(self.evaluate_touched, workspace_id, sorted(mpids), as_of)
        return recomputed

    # --- in a worker thread -----------------------------------------------------------------------------------
    def refresh_profiles(self, workspace_id: str, mpids: list[int]) -> None:
        """The upkeep of an ingest: calculated attributes first (real-time audiences may read them)."""
        for ca in self.calculated.active(workspace_id):
            try:
                self.calculation.refresh(ca, mpids)
            except Exception as exc:  # keep going; the values stay as they were and the next batch retries
                log.error("refreshing calculated attribute %s failed: %s", ca.id, exc)
        try:
            self.evaluate_touched(workspace_id, mpids)
        except Exception as exc:  # the memberships stay as they were; the next batch of these profiles retries
            log.error("real-time audiences of workspace %s failed: %s", workspace_id, exc)

    def evaluate_touched(self, workspace_id: str, mpids: list[int], as_of_ms: int | None = None) -> None:
        """The workspace's real-time audiences for these profiles only, applied within them."""
        if not mpids:
            return
        held = [a.id for a in self.audiences.real_time(workspace_id)]
        with self._holding(held):
            # created meanwhile: its own full evaluation covers these profiles; deleted meanwhile: nothing to do
            audiences = [a for a in self.audiences.real_time(workspace_id) if a.id in held]
            if audiences:
                self._evaluate(workspace_id, audiences, as_of_ms or now_ms(), mpids)

    def evaluate_full(self, workspace_id: str, audience_ids: list[int], as_of_ms: int | None = None) -> None:
        """These audiences and the real-time ones reading them, for every profile of the workspace."""
        stamp = now_ms()
        while True:
            writes, reads = self._closure(workspace_id, audience_ids)
            for audience_id in writes:
                status = self.status_of(audience_id)
                if status.state != "calculating":
                    status.state, status.started_ms, status.error = "calculating", stamp, None
            # the audiences it reads are locked too: one being evaluated is read once it has committed
            with self._holding(sorted(writes | reads)):
                now_writes, now_reads = self._closure(workspace_id, audience_ids)
                if not now_writes | now_reads <= writes | reads:
                    continue  # a reader was created meanwhile: lock it too
                self._evaluate_locked(workspace_id, now_writes, as_of_ms)
                return

    def _closure(self, workspace_id: str, audience_ids: list[int]) -> tuple[set[int], set[int]]:
        """What a full evaluation of these writes (them and their real-time readers, as defined now) and what
        else it reads."""
        wanted = set(audience_ids) | self.audiences.real_time_dependents(workspace_id, set(audience_ids))
        writes = {a.id for a in self.audiences.list(workspace_id) if a.id in wanted}
        reads = {target for a in self.audiences.list(workspace_id) if a.id in writes
                 for target in a.reads_audiences()} - writes
        return writes, reads

    def _evaluate_locked(self, workspace_id: str, writes: set[int], as_of_ms: int | None) -> None:
        audiences = self.audiences.in_dependency_order([a for a in self.audiences.list(workspace_id)
                                                        if a.id in writes])
        for audience in audiences:
            self._wait_for_calculated_attributes(audience)
        try:
            self._evaluate(workspace_id, audiences, as_of_ms or now_ms(), None)
        except Exception as exc:
            for audience in audiences:
                status = self.status_of(audience.id)
                status.state, status.error = "failed", str(exc)
            raise
        finished = now_ms()
        for audience in audiences:
            status = self.status_of(audience.id)
            status.state, status.completed_ms = "ready", finished

    def _evaluate(self, workspace_id: str, audiences: list[Audience], as_of_ms: int, mpids: list[int] | None) -> None:
        cursor = self._connection.cursor()
        try:
            with self._gate.computing():
                cursor.begin()
                try:
                    found = evaluate_audiences(cursor, workspace_id, [(a.id, a.criteria) for a in audiences],
                                               as_of_ms, mpids,
                                               stored_members=lambda other: current_members(cursor, workspace_id,
                                                                                             other))
                    at = now_ms()
                    changed = [audience.id for audience in audiences
                               if _moved(apply_members(cursor, workspace_id, audience.id, found[audience.id], at,
                                                       universe=mpids))]
                    cursor.commit()
                except BaseException:
                    cursor.rollback()
                    raise
        finally:
            cursor.close()
        for listener in self.on_applied if changed else ():
            try:
                listener(workspace_id, changed)
            except Exception as exc:  # a listener's trouble is its own; the memberships are committed
                log.error("membership change listener failed: %s", exc)

    def _wait_for_calculated_attributes(self, audience: Audience) -> None:
        """A full computation of a calculated attribute the audience reads may be running (it was just activated,
        or start-up recomputes it): its values appear only when it commits, so wait for it."""
        for ca_id in sorted(audience.reads_calculated_attributes()):
            with self.calculation.status_of(ca_id).lock:
                pass

    @contextmanager
    def _holding(self, audience_ids: list[int]) -> Iterator[None]:
        """The locks of these audiences, taken in id order, so two evaluations never wait on each other in a
        circle."""
        with ExitStack() as stack:
            for audience_id in sorted(set(audience_ids)):
                stack.enter_context(self.status_of(audience_id).lock)
            yield


def _moved(change: Change) -> bool:
    return bool(change.adds or change.drops)


@asynccontextmanager
async def lock_held(lock: threading.Lock) -> AsyncIterator[None]:
    """Hold a thread lock from the event loop, waiting in a worker thread. Cancelled while waiting (the client
    went away), the lock is still taken once free, and given back then: otherwise it would stay taken."""
    acquiring = asyncio.ensure_future(asyncio.to_thread(lock.acquire))
    try:
        await asyncio.shield(acquiring)
    except asyncio.CancelledError:
        acquiring.add_done_callback(lambda done: lock.release() if not done.cancelled() and done.exception() is None
                                    else None)
        raise
    try:
        yield
    finally:
        lock.release()


async def background_idle(tasks: set[asyncio.Task[Any]]) -> None:
    """Wait until every computation started so far has finished (tests, and an orderly shutdown)."""
    while tasks:
        await asyncio.gather(*list(tasks), return_exceptions=True)


def members_preview(connection: duckdb.DuckDBPyConnection, gate: ComputationGate, workspace_id: str,
                    criteria: Criteria, as_of_ms: int | None = None) -> pl.Series:
    """A dry run (in a worker thread): who would match these criteria now; nothing is stored."""
    cursor = connection.cursor()
    try:
        with gate.computing():
            found = evaluate_audiences(cursor, workspace_id, [(PREVIEW_ID, criteria)], as_of_ms or now_ms(),
                                       stored_members=lambda other: current_members(cursor, workspace_id, other))
        return found[PREVIEW_ID]
    finally:
        cursor.close()
