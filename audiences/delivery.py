"""The delivery service (docs/delivery.md): diffs every active connection into the outbox, and flushes each
connection's due deltas to its output in a task of its own, acknowledging what the destination took.

- Diff: after audience evaluations change memberships (`memberships_changed`, called from the upkeep's worker
  threads), on schedule (`diff`, also catching identity and consent changes that moved no membership), and when
  asked (`run_once`). A diff reads the connection's wanted members outside the connection's lock (the costly
  part: membership, consent, fan-out), then rewrites its outbox rows under the lock in one transaction.
- Flush: `flush_due` starts one asyncio task per connection that is due and has none running, with the output
  built for that connection (its own httpx client): a slow or failing destination occupies only its own task
  and client, and the next `flush_due` skips it while it runs. A round walks the connection's due rows once, in
  batches of the output's size; it stops early when a whole batch is told to retry later (the destination is
  down or throttling: the backoff in the outbox says when to come back).
- Work on DuckDB runs in worker threads, each on its own cursor, inside the store's computation gate (an
  erasure deletes the same people's delivery rows, and holds the gate alone); a connection's diff and
  acknowledgements take its lock, since both rewrite its outbox rows.

Nothing here is needed for correctness across a crash: the outbox and delivery_state are the whole truth, and a
delta sent but not acknowledged is sent again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import duckdb
import orjson
import polars as pl

from audiences import outbox
from audiences.connections import Connection, ConnectionRegistry
from audiences.membership import current_members
from audiences.outputs.base import (
    DEFAULT_RETRY,
    Acknowledged,
    AudienceRef,
    Delta,
    Outcome,
    Output,
    OutputFactory,
    RetryLater,
    RetryPolicy,
    seconds_from_env,
)
from audiences.registry import AudienceRegistry
from audiences.upkeep import lock_held
from engine.ca_registry import CalculatedAttributeRegistry
from engine.computation_gate import ComputationGate
from engine.errors import NotFound
from engine.store import now_ms
from engine.writer import GroupCommitWriter

log = logging.getLogger("idmesh.delivery")

DIFF_SECONDS = 300         # scheduled diff of every active connection (identity and consent changes)
# how often due connections are looked for (thresholds, retries); IDMESH_DELIVERY_FLUSH_SECONDS, default 5
FLUSH_POLL_SECONDS = seconds_from_env("IDMESH_DELIVERY_FLUSH_SECONDS", 5.0)
NUDGE_DELAY_SECONDS = 1.0  # membership changes within this long share one diff


def default_outputs() -> dict[str, OutputFactory]:
    """The outputs this build knows, by `connection.output`. Imported here, so a missing optional dependency of
    one output (aiokafka) leaves the others working."""
    outputs: dict[str, OutputFactory] = {}
    from audiences.outputs.webhook import WebhookOutput
    outputs["webhook"] = WebhookOutput
    for kind, module, name in (("braze", "audiences.outputs.braze", "BrazeOutput"),
                               ("facebook", "audiences.outputs.facebook", "FacebookOutput"),
                               ("kafka", "audiences.outputs.kafka", "KafkaOutput")):
        try:
            outputs[kind] = getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, AttributeError) as exc:
            log.warning("output %s is not available: %s", kind, exc)
    return outputs


def server_outputs(connections: ConnectionRegistry, writer: GroupCommitWriter, calculated: CalculatedAttributeRegistry,
                   lock: asyncio.Lock | None = None) -> dict[str, OutputFactory]:
    """`default_outputs()` as a process that owns the store uses them: the Facebook output keeps the audience ids it
    creates durable (`connection.remote`, through the group-commit writer, under `lock`, the lock connection
    changes take) and is told the name a calculated value attribute is forwarded under (the outbox forwards
    calculated attributes by name)."""
    outputs = default_outputs()
    if "facebook" not in outputs:
        return outputs
    from audiences.outputs.facebook import FacebookOutput, RegistryRemoteStore

    store = RegistryRemoteStore(connections, writer, lock)

    def facebook(connection: Connection, audience: AudienceRef) -> Output:
        value = connection.value_attribute
        name = None
        if value is not None and value[0] == "calculated":
            try:
                name = calculated.get(connection.workspace_id, int(value[1])).name
            except NotFound:  # deleted meanwhile: the output finds the value the way it does without a name
                name = None
        return FacebookOutput(connection, audience, store=store, value_attribute_name=name)

    outputs["facebook"] = facebook
    return outputs


@dataclass(frozen=True)
class FlushResult:
    connection_id: int
    requests: int = 0
    acknowledged: int = 0
    retried: int = 0
    rejected: int = 0
    error: str | None = None   # why the round stopped early, if it did


@dataclass(frozen=True)
class RoundResult:
    """One `run_once`: what each connection's diff queued and what its flush sent."""

    diffs: dict[int, outbox.DiffResult]
    flushes: dict[int, FlushResult]


@dataclass(frozen=True)
class ResyncResult:
    """A full resync of one connection. `mode`: "replace" (Facebook /usersreplace: the destination now holds
    exactly `acknowledged` members when `completed`) or "resend" (an add queued for every member, `queued` of
    them new in the outbox, sent by the flush started at once)."""

    connection_id: int
    mode: str
    members: int
    acknowledged: int = 0
    queued: int = 0
    completed: bool = True
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass
class _Built:
    key: tuple[Any, ...]
    output: Output
    loop: asyncio.AbstractEventLoop   # an httpx client belongs to the loop it was first used on


@dataclass
class Progress:
    """Counters a caller can watch while a round runs (`idmesh sync` draws them as progress bars)."""

    pending: dict[int, int] = field(default_factory=dict)   # per connection: rows due when its flush began
    sent: dict[int, int] = field(default_factory=dict)      # per connection: deltas answered so far


class DeliveryService:
    def __init__(self, connection: duckdb.DuckDBPyConnection, connections: ConnectionRegistry,
                 audiences: AudienceRegistry, scope_of: Callable[[str], str], gate: ComputationGate,
                 outputs: Mapping[str, OutputFactory] | None = None, policy: RetryPolicy = DEFAULT_RETRY,
                 clock: Callable[[], int] = now_ms) -> None:
        self._db = connection
        self.connections = connections
        self.audiences = audiences
        self._scope_of = scope_of
        self._gate = gate
        self.outputs = dict(default_outputs() if outputs is None else outputs)
        self.policy = policy
        self._clock = clock
        self._locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._built: dict[int, _Built] = {}
        self.flushing: dict[int, asyncio.Task[FlushResult]] = {}   # the running flush task per connection
        self.progress = Progress()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nudged: set[int] = set()          # audiences whose memberships changed since the last nudge diff
        self._nudge_task: asyncio.Task[None] | None = None
        self._tick_diff: asyncio.Task[None] | None = None   # a tick's diff of new or changed connections
        self._diffed: dict[int, int] = {}       # connection id -> updated_ms of its last diff in this process
        self._diff_running = threading.Lock()   # one diff pass at a time: a later pass never writes older wants
        self._paused: Counter[int] = Counter()  # connections neither diffed nor flushed (deletion, full resync)
        self._closed = False

    # --- diff (worker threads) ---------------------------------------------------------------------------------
    def diff_connections(self, connection_ids: Iterable[int] | None = None,
                         at_ms: int | None = None) -> dict[int, outbox.DiffResult]:
        """Diff these active connections (None: all of them) into the outbox. A connection whose diff fails is
        logged and left as it was; the others go on. From a worker thread while nothing changes the registries
        (`idmesh sync`); beside a running server use `diff`, which picks the connections on the event loop."""
        return self._diff_many(self._active(connection_ids), at_ms)

    def _diff_many(self, connections: list[Connection], at_ms: int | None = None,
                   resend: bool = False) -> dict[int, outbox.DiffResult]:
        results: dict[int, outbox.DiffResult] = {}
        members: dict[tuple[str, int], pl.Series] = {}   # connections of one audience share its read
        with self._diff_running:
            for connection in connections:
                try:
                    results[connection.id] = self._diff_one(connection, members, at_ms, resend)
                    self._diffed[connection.id] = connection.updated_ms
                except Exception as exc:  # the next diff tries again; the outbox is as the last good diff left it
                    log.error("diff of connection %s failed: %s", connection.id, exc)
        return results

    def _diff_one(self, connection: Connection, members: dict[tuple[str, int], pl.Series],
                  at_ms: int | None, resend: bool = False) -> outbox.DiffResult:
        with self._gate.computing(), self._cursor() as cursor:
            key = (connection.workspace_id, connection.audience_id)
            if key not in members:
                members[key] = current_members(cursor, *key)
            wanted = outbox.wanted_identifiers(cursor, connection, self._scope_of(connection.workspace_id),
                                               members[key])
            with self.lock(connection.id):
                if self.connections.find(connection.id) is None:   # deleted meanwhile: its rows are gone
                    return outbox.DiffResult(0, 0, 0, wanted.height, 0)
                cursor.begin()
                try:
                    result = outbox.diff_connection(cursor, connection, wanted,
                                                    self._clock() if at_ms is None else at_ms, resend)
                    cursor.commit()
                except BaseException:
                    cursor.rollback()
                    raise
        if result.adds or result.removes or result.cancelled:
            log.info("connection %s: %d adds, %d removes queued, %d cancelled", connection.id, result.adds,
                     result.removes, result.cancelled)
        return result

    # --- diff (event loop) -------------------------------------------------------------------------------------
    async def diff(self, connection_ids: Iterable[int] | None = None) -> dict[int, outbox.DiffResult]:
        """Scheduler job: diff (all active connections by default), then flush the ones now due."""
        # the registries change on the event loop (API requests): read them here, not in the worker thread
        chosen = self._active(None if connection_ids is None else list(connection_ids))
        results = await asyncio.to_thread(self._diff_many, chosen)
        self.flush_due()
        return results

    async def tick(self) -> None:
        """Scheduler job, every FLUSH_POLL_SECONDS: diff the connections this process has not diffed since they
        were created or changed (the first tick after start-up diffs them all), in the background, and start the
        flushes that are due."""
        fresh = [c.id for c in self._active(None) if self._diffed.get(c.id) != c.updated_ms]
        if fresh and (self._tick_diff is None or self._tick_diff.done()):
            self._tick_diff = asyncio.ensure_future(self._diff_in_background(fresh))
        self.flush_due()

    async def _diff_in_background(self, connection_ids: list[int]) -> None:
        try:
            await self.diff(connection_ids)
        except Exception as exc:
            log.error("diff of connections %s failed: %s", connection_ids, exc)

    def memberships_changed(self, workspace_id: str, audience_ids: Iterable[int]) -> None:
        """The upkeep applied memberships of these audiences (called from its worker thread): diff their
        connections soon. Changes within NUDGE_DELAY_SECONDS share one diff."""
        loop = self._loop
        if loop is None or loop.is_closed() or self._closed:
            return
        loop.call_soon_threadsafe(self._nudge, set(audience_ids))

    def _nudge(self, audience_ids: set[int]) -> None:
        if not any(c.audience_id in audience_ids for c in self.connections.active()):
            return
        self._nudged |= audience_ids
        if self._nudge_task is None or self._nudge_task.done():
            self._nudge_task = asyncio.ensure_future(self._diff_nudged())

    async def _diff_nudged(self) -> None:
        pause = NUDGE_DELAY_SECONDS
        while self._nudged and not self._closed:
            # a busy ingest changes real-time audiences all the time: waiting at least as long as the last diff
            # took keeps diffing of big audiences to half the time at most
            await asyncio.sleep(pause)
            audience_ids, self._nudged = self._nudged, set()
            ids = [c.id for c in self.connections.active() if c.audience_id in audience_ids]
            started = time.monotonic()
            try:
                await self.diff(ids)
            except Exception as exc:
                log.error("diff after membership changes failed: %s", exc)
            pause = max(NUDGE_DELAY_SECONDS, time.monotonic() - started)

    # --- flush -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Remember the running loop (memberships_changed schedules onto it from other threads)."""
        self._loop = asyncio.get_running_loop()

    def flush_due(self, force: bool = False) -> dict[int, asyncio.Task[FlushResult]]:
        """Scheduler job: start a flush task for each active connection without one running. The task itself
        checks the thresholds (unless `force`) and returns at once when nothing is due. Returns the tasks started."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        started: dict[int, asyncio.Task[FlushResult]] = {}
        if self._closed:
            return started
        for connection in self.connections.active():
            if self._paused[connection.id]:
                continue
            running = self.flushing.get(connection.id)
            if running is not None and not running.done():
                continue   # a slow destination: its own task is still at it, the others go on
            started[connection.id] = self._start_flush(connection, force)
        return started

    def _start_flush(self, connection: Connection, force: bool) -> asyncio.Task[FlushResult]:
        task = asyncio.ensure_future(self.flush_connection(connection, force))
        self.flushing[connection.id] = task
        task.add_done_callback(lambda done, cid=connection.id: self._flush_done(cid, done))
        return task

    def _flush_done(self, connection_id: int, task: asyncio.Task[FlushResult]) -> None:
        if self.flushing.get(connection_id) is task:
            del self.flushing[connection_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("flush of connection %s failed: %s", connection_id, task.exception())

    async def flush_connection(self, connection: Connection, force: bool = False) -> FlushResult:
        """One round for one connection: when due (or `force`), send its due rows in batches and acknowledge each
        answer. Returns what happened."""
        output = await self._output_for(connection)
        if output is None:
            return FlushResult(connection.id, error=f"no output {connection.output!r}")
        if not force:
            state = await asyncio.to_thread(self._read, outbox.due, connection, self._clock())
            if not state.due:
                return FlushResult(connection.id)
        limit = max(1, output.batch_limit(connection))
        self.progress.pending[connection.id] = await asyncio.to_thread(self._count_due, connection.id)
        self.progress.sent[connection.id] = 0
        after, requests, acked, retried, rejected, stopped = -1, 0, 0, 0, 0, None
        while not self._closed:
            deltas = await asyncio.to_thread(self._take, connection, limit, after)
            if not deltas:
                break
            started = time.monotonic()
            outcomes = await self._deliver(output, connection, deltas)
            duration = int((time.monotonic() - started) * 1000)
            result = await asyncio.to_thread(self._acknowledge, connection, deltas, outcomes, duration)
            requests += 1
            acked, retried, rejected = acked + result.acknowledged, retried + result.retried, rejected + result.rejected
            self.progress.sent[connection.id] = self.progress.sent.get(connection.id, 0) + len(deltas)
            after = deltas[-1].seq
            if result.retried == len(deltas):
                stopped = next(o.reason for o in outcomes if isinstance(o, RetryLater))
                log.warning("connection %s: destination asks to retry later (%s); backing off", connection.id,
                            stopped)
                break
        return FlushResult(connection.id, requests, acked, retried, rejected, stopped)

    async def _deliver(self, output: Output, connection: Connection, deltas: list[Delta]) -> list[Outcome]:
        try:
            outcomes = list(await output.deliver(connection, deltas))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an output's bug or an unexpected failure: the deltas wait and come back
            log.error("output %s of connection %s raised: %r", connection.output, connection.id, exc)
            return [RetryLater(f"{type(exc).__name__}: {exc}"[:500])] * len(deltas)
        if len(outcomes) != len(deltas):
            log.error("output %s answered %d outcomes for %d deltas", connection.output, len(outcomes), len(deltas))
            return [RetryLater("output answered the wrong number of outcomes")] * len(deltas)
        return outcomes

    async def run_once(self, force: bool = True) -> RoundResult:
        """Diff every active connection, then flush each of them (all due rows when `force`, else only the
        connections whose thresholds are met) and wait for the flushes: `idmesh sync --once`, and tests."""
        diffs = await asyncio.to_thread(self._diff_many, self._active(None))
        waiting = list(self.flushing.values())
        if waiting:  # a flush already running finishes first: its round may not cover what the diff queued
            await asyncio.gather(*waiting, return_exceptions=True)
        tasks = self.flush_due(force)
        done = await asyncio.gather(*tasks.values(), return_exceptions=True)
        flushes = {cid: r if isinstance(r, FlushResult) else FlushResult(cid, error=repr(r))
                   for cid, r in zip(tasks, done)}
        return RoundResult(diffs, flushes)

    async def idle(self) -> None:
        """Wait until no flush or nudged diff runs (tests, shutdown)."""
        while True:
            waiting = [t for t in (*self.flushing.values(), self._nudge_task, self._tick_diff)
                       if t is not None and not t.done()]
            if not waiting:
                return
            await asyncio.gather(*waiting, return_exceptions=True)

    async def aclose(self) -> None:
        """Stop: running flushes are cancelled (what they sent without an acknowledgement is sent again at the
        next start), outputs are closed."""
        self._closed = True
        tasks = [t for t in (*self.flushing.values(), self._nudge_task, self._tick_diff)
                 if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        built, self._built = self._built, {}
        loop = asyncio.get_running_loop()
        for entry in built.values():
            if entry.loop is loop:
                await _close(entry.output)

    # --- outputs -----------------------------------------------------------------------------------------------
    async def _output_for(self, connection: Connection) -> Output | None:
        """The connection's output, built again when the connection or its audience's names changed. The first
        build in this process, and every rebuild after a change, unparks rejected rows older than the change."""
        factory = self.outputs.get(connection.output)
        audience = self.audiences.find(connection.audience_id)
        if factory is None or audience is None:
            return None
        ref = AudienceRef(audience.id, audience.name, audience.parsed.external_name)
        key = (connection.updated_ms, ref)
        loop = asyncio.get_running_loop()
        current = self._built.get(connection.id)
        if current is not None and current.key == key and current.loop is loop:
            return current.output
        if current is not None and current.loop is loop:
            await _close(current.output)
        # (built on a loop that is gone, e.g. an earlier `run_once` under asyncio.run: its client cannot be closed
        # on this one, and its sockets went with that loop)
        output = factory(connection, ref)
        self._built[connection.id] = _Built(key, output, loop)
        if current is not None and current.key == key:
            return output
        unparked = await asyncio.to_thread(self._unpark, connection)
        if unparked:
            log.info("connection %s changed: %d rejected deltas are tried again", connection.id, unparked)
        return output

    # --- DuckDB (worker threads) -------------------------------------------------------------------------------
    def _read(self, reader: Callable[..., Any], *args: Any) -> Any:
        with self._cursor() as cursor:
            return reader(cursor, *args)

    def _count_due(self, connection_id: int) -> int:
        with self._cursor() as cursor:
            return cursor.execute("SELECT count(*) FROM delivery_outbox WHERE connection_id = ? "
                                  "AND next_attempt_ms <= ?", [connection_id, self._clock()]).fetchall()[0][0]

    def _take(self, connection: Connection, limit: int, after_seq: int) -> list[Delta]:
        """The next batch, marked as being sent (committed) before it goes out."""
        with self._gate.computing(), self.lock(connection.id), self._cursor() as cursor:
            cursor.begin()
            try:
                deltas = outbox.take(cursor, connection, self._clock(), limit, after_seq)
                outbox.mark_sending(cursor, connection.id, deltas)
                cursor.commit()
            except BaseException:
                cursor.rollback()
                raise
        return deltas

    def _acknowledge(self, connection: Connection, deltas: list[Delta], outcomes: list[Outcome],
                     duration_ms: int) -> outbox.AckResult:
        with self._gate.computing(), self.lock(connection.id), self._cursor() as cursor:
            cursor.begin()
            try:
                result = outbox.acknowledge(cursor, connection, deltas, outcomes, self._clock(), duration_ms,
                                            policy=self.policy)
                cursor.commit()
            except BaseException:
                cursor.rollback()
                raise
        return result

    def _unpark(self, connection: Connection) -> int:
        with self._gate.computing(), self.lock(connection.id), self._cursor() as cursor:
            cursor.begin()
            try:
                count = outbox.unpark(cursor, connection.id, connection.updated_ms, self._clock())
                cursor.commit()
            except BaseException:
                cursor.rollback()
                raise
        return count

    @contextmanager
    def _cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        cursor = self._db.cursor()
        try:
            yield cursor
        finally:
            cursor.close()

    def lock(self, connection_id: int) -> threading.Lock:
        """The lock a connection's outbox rewrites hold (diff, acknowledgement). Whoever deletes a connection's
        delivery rows in another transaction should hold it too, so neither transaction meets the other's
        deletes (DuckDB fails the second one)."""
        with self._locks_guard:
            return self._locks.setdefault(connection_id, threading.Lock())

    def _active(self, connection_ids: Iterable[int] | None) -> list[Connection]:
        wanted = None if connection_ids is None else set(connection_ids)
        return [c for c in self.connections.active()
                if (wanted is None or c.id in wanted) and not self._paused[c.id]
                and self.audiences.find(c.audience_id) is not None]

    # --- full resync (event loop) --------------------------------------------------------------------------------
    async def resync(self, connection: Connection) -> ResyncResult:
        """Make the destination hold the current membership again, whatever delivery_state says. An output that
        can replace its whole membership (Facebook: `replace_all` through /usersreplace) does so with the wanted
        members while the connection's flushes and diffs are paused; once every replace session completed,
        delivery_state becomes exactly the acknowledged members and the outbox is cleared (erasure removes stay).
        Other outputs get a full re-send: an add for every wanted member is queued and the flush starts now (for an
        inactive connection, once it is active again)."""
        if connection.output != "facebook":
            diffs = await asyncio.to_thread(self._diff_many, [connection], None, True)
            if connection.id not in diffs:
                return ResyncResult(connection.id, "resend", 0, completed=False, error="the diff failed (see the log)")
            result = diffs[connection.id]
            if connection.is_active and not self._paused[connection.id]:
                running = self.flushing.get(connection.id)
                if running is not None and not running.done():
                    await asyncio.gather(running, return_exceptions=True)
                self._start_flush(connection, force=True)
            return ResyncResult(connection.id, "resend", result.wanted, queued=result.adds)
        async with self.paused([connection.id]):
            output = await self._output_for(connection)
            replace_all = getattr(output, "replace_all", None)
            if replace_all is None:
                return ResyncResult(connection.id, "replace", 0, completed=False,
                                    error=f"output {connection.output!r} is not available")
            wanted = await asyncio.to_thread(self._wanted, connection)
            at = self._clock()
            members = [Delta(0, mpid, "add", orjson.loads(ids), orjson.loads(attrs) if attrs else {}, at)
                       for mpid, ids, attrs in wanted.select("mpid", "identifiers", "attributes").iter_rows()]
            replaced = await replace_all(connection, members)
            acknowledged = [isinstance(o, Acknowledged) for o in replaced.outcomes]
            if not replaced.completed:
                reason = next((getattr(o, "reason", None) for o in replaced.outcomes
                               if not isinstance(o, Acknowledged)), None)
                return ResyncResult(connection.id, "replace", wanted.height, sum(acknowledged), completed=False,
                                    error=reason or "a replace session did not complete")
            held = wanted.filter(pl.Series(acknowledged, dtype=pl.Boolean))
            await asyncio.to_thread(self._replace_state, connection, held)
        self._diffed.pop(connection.id, None)   # the next tick diffs what changed while it was paused
        return ResyncResult(connection.id, "replace", wanted.height, held.height)

    def _wanted(self, connection: Connection) -> pl.DataFrame:
        with self._gate.computing(), self._cursor() as cursor:
            members = current_members(cursor, connection.workspace_id, connection.audience_id)
            return outbox.wanted_identifiers(cursor, connection, self._scope_of(connection.workspace_id), members)

    def _replace_state(self, connection: Connection, held: pl.DataFrame) -> None:
        with self._gate.computing(), self.lock(connection.id), self._cursor() as cursor:
            if self.connections.find(connection.id) is None:   # deleted meanwhile: its rows are gone
                return
            cursor.begin()
            try:
                outbox.replace_state(cursor, connection, held, self._clock())
                cursor.commit()
            except BaseException:
                cursor.rollback()
                raise

    # --- deletion and pauses (event loop) ------------------------------------------------------------------------
    @asynccontextmanager
    async def paused(self, connection_ids: Iterable[int]) -> AsyncIterator[None]:
        """Neither diff nor flush these connections inside the block: a running flush is cancelled first (what it
        sent without an acknowledgement is sent again later; an acknowledgement already in its worker thread still
        commits, which is why deleters also take `locks_held`). For deletions and full resyncs."""
        ids = sorted(set(connection_ids))
        self._paused.update(ids)
        try:
            running = [t for cid in ids if (t := self.flushing.get(cid)) is not None and not t.done()]
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            yield
        finally:
            self._paused.subtract(ids)
            for cid in ids:
                if self._paused[cid] <= 0:
                    del self._paused[cid]

    @asynccontextmanager
    async def locks_held(self, connection_ids: Iterable[int]) -> AsyncIterator[None]:
        """Hold these connections' locks (in id order) from the event loop, around a commit that deletes or
        rewrites their delivery rows in another transaction than the diff's and acknowledgement's own."""
        async with AsyncExitStack() as stack:
            for cid in sorted(set(connection_ids)):
                await stack.enter_async_context(lock_held(self.lock(cid)))
            yield

    async def delete_downstream(self, connections: Iterable[Connection]) -> None:
        """What a deleted connection created at its destination goes too, where the output does that: Facebook
        custom audiences, with `delete_on_audience_delete` (audiences/outputs/facebook.py). Braze attributes stay;
        webhooks and Kafka have nothing to delete. Failures are logged, never raised: the deletion goes on."""
        loop = asyncio.get_running_loop()
        for connection in connections:
            if connection.output != "facebook":
                continue
            built = self._built.get(connection.id)
            try:
                # the built output knows audiences it created whose record is not saved yet
                if built is not None and built.loop is loop and hasattr(built.output, "delete_downstream"):
                    result = await built.output.delete_downstream(connection)
                else:
                    from audiences.outputs.facebook import delete_downstream
                    result = await delete_downstream(connection)
            except Exception as exc:  # noqa: BLE001 - the idmesh side is deleted already
                log.error("connection %s: deleting its Facebook audiences failed: %r", connection.id, exc)
                continue
            if result.deleted:
                log.info("connection %s: Facebook custom audiences %s deleted", connection.id, result.deleted)

    async def forget(self, connection_ids: Iterable[int]) -> None:
        """Deleted connections: close their outputs and drop what this process kept for them."""
        loop = asyncio.get_running_loop()
        for cid in connection_ids:
            built = self._built.pop(cid, None)
            self._diffed.pop(cid, None)
            if built is not None and built.loop is loop:
                await _close(built.output)


async def _close(output: Output) -> None:
    try:
        await output.aclose()
    except Exception as exc:  # closing a client that already failed: nothing left to do
        log.warning("closing output %s failed: %s", getattr(output, "kind", "?"), exc)
