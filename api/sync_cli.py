"""`idmesh sync [--once]`: audience delivery from the command line, on the database file (no server may run: DuckDB
allows one writing process, and a running server delivers by itself).

It does what the server's scheduler does: evaluates the audiences (every one at the start, as the server does
at start-up; then standard audiences when due and time-windowed ones on their period), diffs every active
connection into the outbox, and flushes the due deltas, one task per connection (audiences/delivery.py). With
`--once` it makes one round (evaluate, diff, flush everything pending whatever the upload thresholds say) and
exits; status 0 when every delta was acknowledged, 3 when some wait for a retry or were rejected. Progress bars
show each phase and each connection's flush.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the machinery is imported when a sync runs: `idmesh sql` and `serve` never load it
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from audiences.delivery import DeliveryService, FlushResult
    from engine.idsync import IdSyncService


def add_sync_command(subparsers: Any) -> None:  # noqa: ANN401 (argparse's subparsers action has no public type)
    sync = subparsers.add_parser("sync", help="deliver audience memberships to their connections",
                                 description="Evaluate audiences, diff every active connection and flush the "
                                             "changes to the destinations, on the --db file (stop the server "
                                             "first: it delivers by itself). Runs until interrupted, or one "
                                             "round with --once.")
    sync.add_argument("--db", default=None, help="DuckDB file (default as idmesh serve)")
    sync.add_argument("--once", action="store_true",
                      help="one round: evaluate, diff, flush everything pending, then exit")
    sync.add_argument("--no-evaluate", action="store_true",
                      help="deliver the memberships as stored, without evaluating the audiences first")


class Sync:
    """The registries, the upkeep and the delivery service over one opened store."""

    def __init__(self, service: IdSyncService) -> None:
        from audiences.connections import ConnectionRegistry
        from audiences.delivery import DeliveryService, server_outputs
        from audiences.registry import AudienceRegistry
        from audiences.upkeep import AudienceUpkeep
        from engine.ca_engine import CalculatedAttributeEngine
        from engine.ca_registry import CalculatedAttributeRegistry

        self.service = service
        self.calculated = CalculatedAttributeRegistry()
        self.calculated.load(service.connection)
        self.audiences = AudienceRegistry(
            lambda ws, ca_id: any(ca.id == ca_id for ca in self.calculated.active(ws)))
        self.audiences.load(service.connection)
        self.connections = ConnectionRegistry(service.master_key)
        self.connections.load(service.connection)
        self.upkeep = AudienceUpkeep(service.connection, self.audiences, self.calculated,
                                     CalculatedAttributeEngine(service.connection, service.computation_gate),
                                     service.computation_gate)
        self.delivery = DeliveryService(service.connection, self.connections, self.audiences,
                                        lambda workspace_id: service.workspaces.get(workspace_id).scope,
                                        service.computation_gate,
                                        outputs=server_outputs(self.connections, service.writer, self.calculated))
        self.upkeep.on_applied.append(self.delivery.memberships_changed)


def sync_command(args: argparse.Namespace, service: IdSyncService, console: Console | None = None) -> int:
    """Run `idmesh sync` on an opened store; the caller closes it."""
    from rich.console import Console

    out = console or Console(stderr=True)
    sync = Sync(service)
    try:
        if args.once:
            return asyncio.run(_once(sync, out, evaluate=not args.no_evaluate))
        asyncio.run(_forever(sync, out, evaluate=not args.no_evaluate))
    except KeyboardInterrupt:
        out.print("stopped; what was sent without an acknowledgement is sent again next time")
    return 0


def _progress(console: Console) -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


async def _once(sync: Sync, console: Console, evaluate: bool) -> int:
    delivery = sync.delivery
    delivery.start()
    connections = delivery.connections.active()
    with _progress(console) as bars:
        if evaluate:
            await _evaluate(sync, bars)
        diff_bar = bars.add_task("diff connections", total=len(connections))
        diffs = {}
        for connection in connections:
            diffs.update(await asyncio.to_thread(delivery.diff_connections, [connection.id]))
            bars.advance(diff_bar)
        await delivery.idle()   # a nudged diff (from the evaluation) finishes before the flush
        flushes = await _flush(delivery, bars, connections)
    await delivery.aclose()
    left = await asyncio.to_thread(_pending, sync)
    console.print(_summary(sync, diffs, flushes, left))
    return 0 if not any(left.values()) else 3


async def _evaluate(sync: Sync, bars: Progress) -> None:
    audiences = sync.audiences.all()
    bar = bars.add_task("evaluate audiences", total=len(audiences))
    for workspace_id in sync.audiences.workspaces():
        ids = [a.id for a in sync.audiences.list(workspace_id)]
        try:
            await asyncio.to_thread(sync.upkeep.evaluate_full, workspace_id, ids)
        except Exception as exc:  # delivered as stored; the status says failed
            bars.console.print(f"[red]evaluating the audiences of workspace {workspace_id} failed: {exc}")
        bars.advance(bar, len(ids))


async def _flush(delivery: DeliveryService, bars: Progress, connections: list[Any]) -> dict[int, FlushResult]:
    """Flush every connection (thresholds ignored), drawing each one's bar from the service's progress counters."""
    from audiences.delivery import FlushResult

    tasks = delivery.flush_due(force=True)
    shown: dict[int, Any] = {}
    while True:
        for connection in connections:
            pending = delivery.progress.pending.get(connection.id)
            if pending is None:
                continue
            if connection.id not in shown:
                shown[connection.id] = bars.add_task(f"flush {connection.output} #{connection.id} "
                                                     f"({connection.name})", total=max(pending, 1))
            bars.update(shown[connection.id], total=max(pending, 1),
                        completed=delivery.progress.sent.get(connection.id, 0) if pending else 1)
        if all(task.done() for task in tasks.values()):
            break
        await asyncio.sleep(0.1)
    results = {}
    for connection_id, task in tasks.items():
        results[connection_id] = task.result() if task.exception() is None \
            else FlushResult(connection_id, error=repr(task.exception()))
    return results


def _pending(sync: Sync) -> dict[int, int]:
    from audiences.outbox import statuses
    from engine.store import now_ms

    found: dict[int, int] = {}
    cursor = sync.service.connection.cursor()
    try:
        for workspace_id in {c.workspace_id for c in sync.connections.all()}:
            for connection_id, status in statuses(cursor, workspace_id, now_ms()).items():
                found[connection_id] = status.pending_adds + status.pending_removes
    finally:
        cursor.close()
    return found


def _summary(sync: Sync, diffs: dict[int, Any], flushes: dict[int, FlushResult], left: dict[int, int]) -> Table:
    from rich.table import Table

    from audiences.delivery import FlushResult

    table = Table(title="delivery")
    for column in ("connection", "output", "audience", "queued +/-", "acknowledged", "retry later", "rejected",
                   "still pending", "note"):
        table.add_column(column)
    for connection in sync.connections.active():
        diff = diffs.get(connection.id)
        flush = flushes.get(connection.id, FlushResult(connection.id))
        audience = sync.audiences.find(connection.audience_id)
        table.add_row(f"#{connection.id} {connection.name}", connection.output,
                      audience.name if audience else f"#{connection.audience_id}",
                      f"+{diff.adds} -{diff.removes}" if diff else "-", str(flush.acknowledged), str(flush.retried),
                      str(flush.rejected), str(left.get(connection.id, 0)), flush.error or "")
    return table


async def _forever(sync: Sync, console: Console, evaluate: bool) -> None:
    """The server's schedule without the server: a tick every FLUSH_POLL_SECONDS (new connections diffed, due
    flushes started), a diff of everything every DIFF_SECONDS, standard audiences when due, time-windowed ones on
    their period."""
    from audiences.delivery import DIFF_SECONDS, FLUSH_POLL_SECONDS
    from audiences.upkeep import STANDARD_POLL_SECONDS, TIME_DRIVEN_SECONDS

    delivery = sync.delivery
    delivery.start()
    if evaluate:
        with _progress(console) as bars:
            await _evaluate(sync, bars)
    console.print(f"delivering {len(delivery.connections.active())} connections; Ctrl-C stops")
    started = time.monotonic()
    last = {"diff": started, "standard": started, "time": started}
    watched: set[asyncio.Task[FlushResult]] = set()
    try:
        while True:
            await delivery.tick()
            now = time.monotonic()
            if now - last["diff"] >= DIFF_SECONDS:
                last["diff"] = now
                await delivery.diff()
            if evaluate and now - last["standard"] >= STANDARD_POLL_SECONDS:
                last["standard"] = now
                await sync.upkeep.evaluate_due_standard()
            if evaluate and now - last["time"] >= TIME_DRIVEN_SECONDS:
                last["time"] = now
                await sync.upkeep.evaluate_time_driven()
            for connection_id, task in list(delivery.flushing.items()):
                if task not in watched:
                    watched.add(task)
                    task.add_done_callback(lambda done, cid=connection_id: _report(console, cid, done))
            watched = {task for task in watched if not task.done()}
            await asyncio.sleep(FLUSH_POLL_SECONDS)
    finally:
        await delivery.aclose()


def _report(console: Console, connection_id: int, task: asyncio.Task[FlushResult]) -> None:
    if task.cancelled() or task.exception() is not None:
        return
    result = task.result()
    if result.requests:
        console.log(f"#{connection_id}: {result.requests} requests, {result.acknowledged} acknowledged, "
                    f"{result.retried} to retry, {result.rejected} rejected" + (f" ({result.error})"
                                                                                  if result.error else ""))
