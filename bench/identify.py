"""Identify benchmark: cold start, memory per profile, in-process identify latency, group-commit wait, and HTTP
identify throughput against a bare FastAPI echo endpoint measured in the same run.

    .venv/bin/python bench/identify.py                 # 1,000,000 profiles
    .venv/bin/python bench/identify.py --quick         # 100,000 profiles, shorter rounds (smoke run)
    .venv/bin/python bench/identify.py --profiles 250000 --rebuild

The machine is small and shared, so every figure is a median over repeated runs, and the HTTP figure is a ratio of
two servers driven alternately (A/B/A/B) by the same client in the same run. Each measurement that needs a clean
process (load time, RSS) runs in a fresh child process of this script; the children talk to the parent through
one JSON object per stdout line. All traffic stays on 127.0.0.1.

The built database is cached in bench/results/ (gitignored) keyed by the profile count; phases that write work on
a copy, so the cache always holds exactly N profiles.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/identify.py`: make the project importable
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
SCHEMA_TAG = "identify-v3"  # bump when the generated data changes, so stale caches are rebuilt

GOALS = {
    "load_s": 10.0,                 # 1M profiles loaded into the graph
    "bytes_per_profile": 1024.0,    # with 3 identities
    "inproc_p50_us": 50.0,
    "inproc_p99_us": 500.0,
    "commit_wait_p99_ms": 10.0,
    "http_ratio": 0.5,              # idmesh identify / bare FastAPI echo, requests per second
}

# Request mix for the in-process and group-commit phases (weights, not percentages).
MIX: dict[str, int] = {
    "known_identify": 50,   # a logged-in app identifies with all three ids of an existing customer
    "known_login": 10,      # login with customer id + email of an existing customer
    "anon_return": 20,      # an anonymous device seen before: returns its anonymous profile
    "new_device": 10,       # first launch of a new device: creates an anonymous profile
    "convert": 5,           # first login on an anonymous device: the anonymous profile becomes known in place
    "new_customer": 5,      # sign-up on a new device: creates a known profile with three identities
}


# --- generated data: the same functions in SQL (build) and Python (requests) ----------------------------------

def customer_id(i: int) -> str:
    return f"cust_{i:09d}"


def email_raw(i: int) -> str:
    return f"User{i:09d}@Example.com"  # SDKs send it as typed; the store holds it trimmed and lowercased


def idfv_raw(i: int) -> str:
    h = hashlib.md5(f"idfv{i}".encode()).hexdigest().upper()  # iOS reports IDFVs in upper case
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


PROFILE_SQL = """
INSERT INTO profiles_base (scope, mpid, created_ms, first_seen_ms, last_seen_ms, status)
SELECT $scope,
       ((i + 1)::HUGEINT * 11400714819323198485 % 18446744073709551616 - 9223372036854775808)::BIGINT,
       $now - 31536000000 + (i * 7919) % 31536000000,
       $now - 31536000000 + (i * 7919) % 31536000000,
       $now - (i * 104729) % 2592000000,
       'active'
FROM range($lo, $hi) AS r(i)
"""

# mpid is a bijection of i (odd multiplier modulo 2**64), so ids are unique and spread over the int64 range.
IDENTITY_SQL = """
INSERT INTO identities_base (scope, mpid, identity_type, value, raw_value, added_ms)
WITH base AS (
    SELECT i,
           ((i + 1)::HUGEINT * 11400714819323198485 % 18446744073709551616 - 9223372036854775808)::BIGINT AS mpid,
           $now - 31536000000 + (i * 7919) % 31536000000 AS added_ms,
           md5('idfv' || i::VARCHAR) AS h
    FROM range($lo, $hi) AS r(i)
)
SELECT $scope, mpid, t.identity_type,
       CASE t.identity_type
           WHEN 'customerid' THEN 'cust_' || lpad(i::VARCHAR, 9, '0')
           WHEN 'email' THEN 'user' || lpad(i::VARCHAR, 9, '0') || '@example.com'
           ELSE h[1:8] || '-' || h[9:12] || '-' || h[13:16] || '-' || h[17:20] || '-' || h[21:32]
       END,
       CASE t.identity_type
           WHEN 'customerid' THEN 'cust_' || lpad(i::VARCHAR, 9, '0')
           WHEN 'email' THEN 'User' || lpad(i::VARCHAR, 9, '0') || '@Example.com'
           ELSE upper(h[1:8] || '-' || h[9:12] || '-' || h[13:16] || '-' || h[17:20] || '-' || h[21:32])
       END,
       added_ms
FROM base CROSS JOIN (VALUES ('customerid'), ('email'), ('ios_idfv')) AS t(identity_type)
ORDER BY mpid
"""


def cache_paths(profiles: int) -> tuple[Path, Path]:
    stem = RESULTS / f"identify-{profiles}"
    return stem.with_suffix(".duckdb"), stem.with_suffix(".json")


def db_companions(path: Path) -> list[Path]:
    return [path, Path(str(path) + ".wal"), Path(str(path) + ".master-key")]


def copy_database(source: Path, target: Path) -> None:
    for companion in db_companions(target):
        companion.unlink(missing_ok=True)
    for src, dst in zip(db_companions(source), db_companions(target)):
        if src.exists():
            shutil.copyfile(src, dst)


def remove_database(path: Path) -> None:
    for companion in db_companions(path):
        companion.unlink(missing_ok=True)


def build_database(profiles: int, console: Any) -> dict[str, Any]:
    """Workspace through the service (so its row, hashed secret and sealed secret are real), then the bulk rows
    straight into `profiles` and `identities` with set-based SQL in chunks."""
    import duckdb
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from engine.idsync import IdSyncService
    from engine.store import now_ms

    db_path, meta_path = cache_paths(profiles)
    building = db_path.with_name(db_path.stem + ".building.duckdb")
    remove_database(building)
    started = time.perf_counter()

    api_key = "idm_bench" + secrets.token_hex(8)
    api_secret = secrets.token_urlsafe(32)
    service = IdSyncService.open(str(building))
    try:
        created, batch = service.workspaces.plan_create("bench", {"strategy": "default"}, api_key=api_key,
                                                        api_secret=api_secret)
        asyncio.run(service.commit(batch))
        service.workspaces.remember(created.workspace)
    finally:
        service.close()
    scope = created.workspace.scope

    chunk = max(10_000, min(100_000, profiles // 20 or profiles))
    stamp = now_ms()
    connection = duckdb.connect(str(building))
    try:
        columns = [TextColumn("[bold]build[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn()]
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(f"{profiles:,} profiles x 3 identities", total=profiles)
            for lo in range(0, profiles, chunk):
                hi = min(profiles, lo + chunk)
                params = {"scope": scope, "now": stamp, "lo": lo, "hi": hi}
                connection.execute("BEGIN")
                connection.execute(PROFILE_SQL, params)
                connection.execute(IDENTITY_SQL, params)
                connection.execute("COMMIT")
                progress.update(task, completed=hi)
        connection.execute("CHECKPOINT")
        counts = connection.execute("SELECT (SELECT count(*) FROM profiles), (SELECT count(*) FROM identities), "
                                    "(SELECT count(DISTINCT mpid) FROM profiles)").fetchone()
        sample = connection.execute("SELECT identity_type, value FROM identities WHERE mpid = "
                                    "((42 + 1)::HUGEINT * 11400714819323198485 % 18446744073709551616 "
                                    "- 9223372036854775808)::BIGINT ORDER BY identity_type").fetchall()
    finally:
        connection.close()
    if counts != (profiles, 3 * profiles, profiles):
        raise SystemExit(f"bench: generated {counts}, wanted ({profiles}, {3 * profiles}, {profiles})")
    if profiles > 42:  # the Python request generators must agree with the SQL that built the rows
        wanted = [("customerid", customer_id(42)), ("email", email_raw(42).lower()), ("ios_idfv", idfv_raw(42).lower())]
        if sample != wanted:
            raise SystemExit(f"bench: generated identities {sample} do not match the request generators {wanted}")

    for src, dst in zip(db_companions(building), db_companions(db_path)):
        if src.exists():
            src.replace(dst)
    meta = {"schema": SCHEMA_TAG, "profiles": profiles, "workspace_id": created.workspace.id, "api_key": api_key,
            "api_secret": api_secret, "build_s": round(time.perf_counter() - started, 2),
            "file_mb": round(db_path.stat().st_size / 2**20, 1)}
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


def ensure_database(profiles: int, rebuild: bool, console: Any) -> dict[str, Any]:
    db_path, meta_path = cache_paths(profiles)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if not rebuild and db_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("schema") == SCHEMA_TAG and meta.get("profiles") == profiles:
            console.print(f"[dim]using cached database {db_path.relative_to(ROOT)} ({meta['file_mb']} MB, "
                          f"built in {meta['build_s']} s)[/]")
            return meta
    return build_database(profiles, console)


# --- request generation --------------------------------------------------------------------------------------

class RequestMaker:
    """Endless identify requests in the MIX proportions: (category, operation, known_identities)."""

    def __init__(self, profiles: int, seed: int, anon_pool: list[str], convert_pool: list[str]) -> None:
        from strategies.model import Operation

        self.operation = Operation
        self.profiles = profiles
        self.rng = random.Random(seed)
        self.anon_pool = anon_pool
        self.convert_pool = convert_pool
        self.token = secrets.token_hex(4)
        self.fresh = 0
        self.categories = list(MIX)
        self.cumulative = []
        total = 0
        for name in self.categories:
            total += MIX[name]
            self.cumulative.append(total)
        self.total = total

    def new_idfv(self) -> str:
        self.fresh += 1
        return f"{self.token.upper()}-B00C-4000-8000-{self.fresh:012X}"

    def __iter__(self) -> Iterator[tuple[str, Any, dict[str, str]]]:
        return self

    def __next__(self) -> tuple[str, Any, dict[str, str]]:
        rng = self.rng
        pick = rng.randrange(self.total)
        category = next(c for c, edge in zip(self.categories, self.cumulative) if pick < edge)
        identify, login = self.operation.IDENTIFY, self.operation.LOGIN
        if category == "known_identify":
            i = rng.randrange(self.profiles)
            return category, identify, {"customerid": customer_id(i), "email": email_raw(i), "ios_idfv": idfv_raw(i)}
        if category == "known_login":
            i = rng.randrange(self.profiles)
            return category, login, {"customerid": customer_id(i), "email": email_raw(i)}
        if category == "anon_return":
            return category, identify, {"ios_idfv": rng.choice(self.anon_pool)}
        if category == "new_device":
            return category, identify, {"ios_idfv": self.new_idfv()}
        if category == "convert" and self.convert_pool:
            self.fresh += 1
            return category, login, {"customerid": f"new_{self.token}_{self.fresh}",
                                     "email": f"New{self.token}{self.fresh}@Example.com",
                                     "ios_idfv": self.convert_pool.pop()}
        self.fresh += 1
        return "new_customer", login, {"customerid": f"new_{self.token}_{self.fresh}",
                                       "email": f"New{self.token}{self.fresh}@Example.com",
                                       "ios_idfv": self.new_idfv()}


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def summarize(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"n": len(ordered), "p50": percentile(ordered, 50), "p90": percentile(ordered, 90),
            "p99": percentile(ordered, 99), "p999": percentile(ordered, 99.9),
            "max": ordered[-1] if ordered else float("nan"),
            "mean": statistics.fmean(ordered) if ordered else float("nan")}


# --- child processes -----------------------------------------------------------------------------------------

def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class Reporter:
    """Progress lines for the parent's bar, at most five a second."""

    def __init__(self, total: int, label: str) -> None:
        self.total = total
        self.label = label
        self.last = 0.0
        emit({"progress": [0, total], "label": label})

    def __call__(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last > 0.2:
            self.last = now
            emit({"progress": [done, self.total], "label": self.label})


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def timed_open(db_path: str) -> tuple[Any, dict[str, Any]]:
    """Open the service as the server does, in this fresh process, with the two phases of the graph load timed
    by wrapping the module-level functions `IdSyncService` calls (no engine change)."""
    import duckdb  # noqa: F401  (imported before the baseline RSS: libraries are not the graph)
    import psutil  # noqa: F401
    import pyarrow  # noqa: F401

    import engine.idsync as idsync_module

    phases: dict[str, float] = {}

    def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    idsync_module.read_graph_snapshot = timed("snapshot_s", idsync_module.read_graph_snapshot)
    idsync_module.build_graphs = timed("build_graphs_s", idsync_module.build_graphs)
    idsync_module.fold_journal_at_start = timed("fold_journal_s", idsync_module.fold_journal_at_start)

    gc.collect()
    rss_before = rss_bytes()
    t0 = time.perf_counter()
    service = idsync_module.IdSyncService.open(db_path)
    load_s = time.perf_counter() - t0
    gc.collect()
    rss_after = rss_bytes()
    profiles = sum(len(g) for g in service.graphs.values())
    return service, {"load_s": load_s, "rss_before": rss_before, "rss_after": rss_after,
                     "rss_delta": rss_after - rss_before, "graph_profiles": profiles, **phases}


def graph_footprint(service: Any) -> dict[str, int]:
    """What the Python objects of the graphs add up to (sys.getsizeof, shared objects counted once)."""
    sizeof = sys.getsizeof
    parts = {"profiles_dict": 0, "index_dicts": 0, "records": 0, "identity_tuples": 0, "value_strings": 0,
             "ints": 0, "shared_lists": 0}
    for graph in service.graphs.values():
        parts["profiles_dict"] += sizeof(graph.profiles)
        for values in graph._index.values():
            parts["index_dicts"] += sizeof(values)
            for entry in values.values():
                if isinstance(entry, list):
                    parts["shared_lists"] += sizeof(entry)
        for mpid, record in graph.profiles.items():
            parts["records"] += sizeof(record)
            parts["ints"] += sizeof(mpid) + sizeof(record.created_ms) + sizeof(record.last_seen_ms)
            flat = record.identities
            parts["identity_tuples"] += sizeof(flat)
            for k in range(1, len(flat), 2):
                parts["value_strings"] += sizeof(flat[k])
    parts["total"] = sum(parts.values())
    return parts


def memory_diagnostics(service: Any) -> dict[str, Any]:
    import ctypes

    import pyarrow as pa

    found: dict[str, Any] = {"python_objects": graph_footprint(service)}
    try:
        found["duckdb_bytes"] = int(service.connection.execute(
            "SELECT coalesce(sum(memory_usage_bytes), 0) FROM duckdb_memory()").fetchone()[0])
    except Exception as exc:  # diagnostics only
        found["duckdb_bytes"] = f"n/a ({exc.__class__.__name__})"
    found["arrow_allocated_bytes"] = pa.total_allocated_bytes()
    found["arrow_pool"] = pa.default_memory_pool().backend_name
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        gc.collect()
        found["rss_after_malloc_trim"] = rss_bytes()
    except OSError:
        pass
    return found


def child_load(args: argparse.Namespace) -> None:
    service, measured = timed_open(args.db)
    if args.diagnose:
        emit({"progress": [0, 1], "label": "memory breakdown"})
        measured["memory"] = memory_diagnostics(service)
        if "rss_after_malloc_trim" in measured["memory"]:
            measured["memory"]["rss_delta_after_malloc_trim"] = (measured["memory"]["rss_after_malloc_trim"]
                                                                 - measured["rss_before"])
    service.close()
    emit({"result": measured})


def child_inprocess(args: argparse.Namespace) -> None:
    from engine.errors import IdmeshError
    from strategies.model import Operation

    service, measured = timed_open(args.db)
    meta = json.loads(Path(args.meta).read_text())
    workspace = service.workspaces.get(meta["workspace_id"])
    plan = service.plan_resolve
    identify = Operation.IDENTIFY

    # Anonymous devices that already have a profile: made first, untimed, like any earlier traffic would have.
    anon_size, convert_size = args.anon_pool, args.anon_pool // 2
    tick = Reporter(anon_size + convert_size + args.warmup + args.requests, "plan_resolve")
    seeder = RequestMaker(args.profiles, 7, [], [])
    anon_pool = [seeder.new_idfv() for _ in range(anon_size)]
    convert_pool = [seeder.new_idfv() for _ in range(convert_size)]
    for n, device in enumerate(anon_pool + convert_pool):
        plan(workspace, identify, {"ios_idfv": device}, None, None, False)
        tick(n)
    done = anon_size + convert_size

    maker = RequestMaker(args.profiles, 11, anon_pool, convert_pool)
    for _ in range(args.warmup):
        _, operation, known = next(maker)
        plan(workspace, operation, known, None, None, False)
        done += 1
        tick(done)

    requests = [next(maker) for _ in range(args.requests)]
    timings: dict[str, list[float]] = {c: [] for c in MIX}
    everything: list[float] = []
    failures = 0
    clock = time.perf_counter_ns
    gc_before = [s["collections"] for s in gc.get_stats()]
    for n, (category, operation, known) in enumerate(requests):
        t0 = clock()
        try:
            plan(workspace, operation, known, None, None, False)
        except IdmeshError:
            failures += 1
        elapsed_us = (clock() - t0) / 1000
        timings[category].append(elapsed_us)
        everything.append(elapsed_us)
        if n & 1023 == 0:
            tick(done + n)
    tick(done + len(requests), force=True)
    gc_after = [s["collections"] for s in gc.get_stats()]
    measured["inprocess"] = {"all": summarize(everything), "failures": failures,
                             "by_category": {c: summarize(v) for c, v in timings.items() if v},
                             "gc_collections": [b - a for a, b in zip(gc_before, gc_after)]}
    if args.profile_out:
        import cProfile

        more = [next(maker) for _ in range(args.requests // 2)]
        profiler = cProfile.Profile()
        profiler.enable()
        for _, operation, known in more:
            plan(workspace, operation, known, None, None, False)
        profiler.disable()
        profiler.dump_stats(args.profile_out)
    emit({"result": measured})
    os._exit(0)  # the graph is large; skip tearing it down object by object


def child_commit(args: argparse.Namespace) -> None:
    import uvloop

    from strategies.model import Operation

    service, measured = timed_open(args.db)
    meta = json.loads(Path(args.meta).read_text())
    workspace = service.workspaces.get(meta["workspace_id"])
    identify = Operation.IDENTIFY

    transactions: list[float] = []
    writer = service.writer
    real_write = writer._write

    def timed_write(batch: Any) -> None:  # runs on the writer thread; one entry per DuckDB transaction
        t0 = time.perf_counter_ns()
        real_write(batch)
        transactions.append((time.perf_counter_ns() - t0) / 1e6)

    writer._write = timed_write

    async def run() -> dict[str, Any]:
        seeder = RequestMaker(args.profiles, 13, [], [])
        anon_pool = [seeder.new_idfv() for _ in range(args.anon_pool // 4)]
        convert_pool = [seeder.new_idfv() for _ in range(args.anon_pool // 8)]
        devices = anon_pool + convert_pool
        tick = Reporter(len(devices), "seeding anonymous devices")
        # Seed through the real path, concurrently, so the pool is durable before timing starts.
        for lo in range(0, len(devices), 256):
            await asyncio.gather(*(service.resolve(workspace, identify, {"ios_idfv": d})
                                   for d in devices[lo:lo + 256]))
            tick(lo)
        maker = RequestMaker(args.profiles, 17, anon_pool, convert_pool)
        waits: list[float] = []
        totals: list[float] = []
        failures = 0
        clock = time.perf_counter_ns
        duration_ns = int(args.duration * 1e9)
        tick = Reporter(int(args.duration * 10), f"{args.concurrency} concurrent resolves")
        transactions.clear()

        async def worker(deadline: int) -> None:
            nonlocal failures
            while clock() < deadline:
                _, operation, known = next(maker)
                t0 = clock()
                try:
                    _, batch = service.plan_resolve(workspace, operation, known, None, None, False)
                    t1 = clock()
                    await service.commit(batch)  # exactly what IdSyncService.resolve awaits
                except Exception:
                    failures += 1
                    continue
                t2 = clock()
                if measuring:
                    waits.append((t2 - t1) / 1e6)
                    totals.append((t2 - t0) / 1e6)

        measuring = False
        warm_deadline = clock() + int(min(2.0, args.duration / 3) * 1e9)
        await asyncio.gather(*(worker(warm_deadline) for _ in range(args.concurrency)))
        measuring = True
        transactions.clear()
        commits_before = writer.commits
        started = clock()
        deadline = started + duration_ns
        tasks = [asyncio.ensure_future(worker(deadline)) for _ in range(args.concurrency)]
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.1)
            tick(int((clock() - started) / 1e8))
        await asyncio.gather(*tasks)
        elapsed = (clock() - started) / 1e9
        commits = writer.commits - commits_before
        return {"wait_ms": summarize(waits), "resolve_ms": summarize(totals), "requests": len(waits),
                "elapsed_s": elapsed, "requests_per_s": len(waits) / elapsed, "commits": commits,
                "commits_per_s": commits / elapsed, "requests_per_commit": len(waits) / max(1, commits),
                "transaction_ms": summarize(list(transactions)), "failures": failures,
                "concurrency": args.concurrency}

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        measured["commit"] = runner.run(run())
    service.close()
    emit({"result": measured})
    os._exit(0)


def child_drive_httpx(args: argparse.Namespace) -> None:
    """Fallback HTTP driver when wrk is absent: one process, one event loop, `concurrency` keep-alive
    connections, the same request shapes the wrk script sends."""
    import httpx
    import uvloop

    bodies = json.loads(Path(args.bodies).read_text())
    token = secrets.token_hex(4).upper()

    async def run() -> dict[str, Any]:
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        headers = {"Authorization": args.auth, "Content-Type": "application/json"}
        latencies: list[float] = []
        errors = 0
        counter = 0
        clock = time.perf_counter_ns
        async with httpx.AsyncClient(base_url=args.url, limits=limits, headers=headers, timeout=30) as client:
            deadline = clock() + int(args.duration * 1e9)

            async def worker() -> None:
                nonlocal errors, counter
                while clock() < deadline:
                    counter += 1
                    body = new_device_body(token, counter) if counter % 5 == 0 else bodies[counter % len(bodies)]
                    t0 = clock()
                    try:
                        response = await client.post("/v1/identify", content=body)
                        if response.status_code != 200:
                            errors += 1
                    except httpx.HTTPError:
                        errors += 1
                        continue
                    latencies.append((clock() - t0) / 1e6)

            started = clock()
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            elapsed = (clock() - started) / 1e9
        stats = summarize(latencies)
        return {"requests_per_s": len(latencies) / elapsed, "requests": len(latencies), "errors": errors,
                "latency_p50_ms": stats["p50"], "latency_p99_ms": stats["p99"]}

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        emit({"result": runner.run(run())})


def child_serve_echo(args: argparse.Namespace) -> None:
    """The baseline: the thinnest FastAPI POST route, reading the body and sending it back."""
    import uvicorn
    from fastapi import FastAPI, Request
    from starlette.responses import Response

    app = FastAPI()

    async def echo(request):  # type: ignore[no-untyped-def]
        return Response(await request.body(), media_type="application/json")

    async def healthz():  # type: ignore[no-untyped-def]
        return Response(b'{"status":"ok"}', media_type="application/json")

    # Classes, not strings: with postponed annotations FastAPI would look `Request` up in this module's globals.
    echo.__annotations__ = {"request": Request, "return": Response}
    healthz.__annotations__ = {"return": Response}
    app.post("/v1/identify")(echo)
    app.get("/healthz")(healthz)

    uvicorn.run(app, host="127.0.0.1", port=args.port, access_log=False, log_level="warning", loop="uvloop",
                http="httptools")


# --- HTTP phase (parent) -------------------------------------------------------------------------------------

def identify_body(i: int, n: int) -> str:
    return json.dumps({
        "client_sdk": {"platform": "ios", "sdk_vendor": "mparticle", "sdk_version": "8.27.1"},
        "environment": "production", "request_id": f"5a1b2c3d-0000-4000-8000-{n:012x}",
        "request_timestamp_ms": 1767225600000 + n, "previous_mpid": None,
        "known_identities": {"customerid": customer_id(i), "email": email_raw(i), "ios_idfv": idfv_raw(i)},
    }, separators=(",", ":"))


def new_device_body(token: str, counter: int) -> str:
    return json.dumps({"client_sdk": {"platform": "ios", "sdk_vendor": "mparticle", "sdk_version": "8.27.1"},
                       "environment": "production",
                       "known_identities": {"ios_idfv": f"{token}-B00C-4000-8000-{counter:012X}"}},
                      separators=(",", ":"))


WRK_SCRIPT = """
-- 4 in 5 requests: a known customer's identify (one of %(count)d bodies); 1 in 5: a new device's first identify.
local bodies = {%(bodies)s}
local n = #bodies
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "%(auth)s"
request = function()
  i = i + 1
  local body
  if i %% 5 == 0 then
    body = string.format('{"client_sdk":{"platform":"ios","sdk_vendor":"mparticle","sdk_version":"8.27.1"},' ..
      '"environment":"production","known_identities":{"ios_idfv":"%(token)s-B00C-4000-8000-%%012X"}}', i)
  else
    body = bodies[(i %% n) + 1]
  end
  return wrk.format(nil, "/v1/identify", nil, body)
end
"""


def parse_duration_ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(url: str, script: Path, duration: float, concurrency: int) -> dict[str, Any]:
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--timeout", "10s", "--latency",
               "-s", str(script), url + "/v1/identify"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    return {"requests_per_s": rps, "requests": requests,
            "errors": (int(non_2xx.group(1)) if non_2xx else 0)
            + (sum(int(x) for x in socket_errors.groups()) if socket_errors else 0),
            "latency_p50_ms": parse_duration_ms(latency["50"]), "latency_p99_ms": parse_duration_ms(latency["99"])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bench: server exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"bench: {url} not ready after {timeout:.0f} s")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def http_phase(args: argparse.Namespace, meta: dict[str, Any], console: Any) -> dict[str, Any]:
    import httpx
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    source, _ = cache_paths(args.profiles)
    work = RESULTS / f"work-http-{args.profiles}.duckdb"
    copy_database(source, work)
    auth = "Basic " + base64.b64encode(f"{meta['api_key']}:{meta['api_secret']}".encode()).decode()
    rng = random.Random(23)
    bodies = [identify_body(rng.randrange(args.profiles), n) for n in range(1000)]
    driver = args.driver if args.driver != "auto" else ("wrk" if shutil.which("wrk") else "httpx")
    scratch = Path(tempfile.mkdtemp(prefix="idmesh-bench-"))
    bodies_file = scratch / "bodies.json"
    bodies_file.write_text(json.dumps(bodies))

    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        env = dict(os.environ, IDMESH_ADMIN_TOKEN=secrets.token_urlsafe(16))
        for name, command in (
                ("idmesh", [sys.executable, "-m", "api.cli", "serve", "--db", str(work), "--host", "127.0.0.1"]),
                ("echo", [sys.executable, str(Path(__file__).resolve()), "--_child", "serve-echo"])):
            port = free_port()
            log = RESULTS / f"server-{name}.log"
            with log.open("w") as log_file:
                process = subprocess.Popen(command + ["--port", str(port)], cwd=ROOT, env=env, stdout=log_file,
                                           stderr=subprocess.STDOUT)
            servers[name] = (process, f"http://127.0.0.1:{port}")
        with console.status(f"starting idmesh (loading {args.profiles:,} profiles) and the echo server"):
            for name, (process, url) in servers.items():
                wait_ready(url, process, 300, RESULTS / f"server-{name}.log")
        for name, (_, url) in servers.items():  # both answer the same request; idmesh must really identify
            response = httpx.post(url + "/v1/identify", content=bodies[0],
                                  headers={"Authorization": auth, "Content-Type": "application/json"})
            if response.status_code != 200 or (name == "idmesh" and "mpid" not in response.json()):
                raise SystemExit(f"bench: preflight {name} -> {response.status_code} {response.text[:300]}")

        def drive(url: str, duration: float, round_no: int) -> dict[str, Any]:
            if driver == "wrk":
                script = scratch / f"round{round_no}.lua"
                script.write_text(WRK_SCRIPT % {
                    "count": len(bodies), "auth": auth, "token": f"{secrets.token_hex(4).upper()}",
                    "bodies": ",\n".join(f"[[{b}]]" for b in bodies)})
                return run_wrk(url, script, duration, args.concurrency)
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child", "drive-httpx",
                                  "--url", url, "--duration", str(duration), "--concurrency", str(args.concurrency),
                                  "--bodies", str(bodies_file), "--auth", auth],
                                 capture_output=True, text=True, cwd=ROOT, timeout=duration + 120, check=True)
            return json.loads(out.stdout.strip().splitlines()[-1])["result"]

        runs: dict[str, list[dict[str, Any]]] = {"idmesh": [], "echo": []}
        columns = [SpinnerColumn(), TextColumn("[bold]http[/] {task.description}"), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(f"warm-up ({driver})", total=2 + 2 * args.rounds)
            for name in ("idmesh", "echo"):
                drive(servers[name][1], min(3.0, args.round_seconds), 0)
                progress.advance(task)
            for round_no in range(1, args.rounds + 1):
                for name in ("idmesh", "echo"):
                    progress.update(task, description=f"round {round_no}/{args.rounds}: {name} "
                                                      f"({driver}, {args.concurrency} connections)")
                    runs[name].append(drive(servers[name][1], args.round_seconds, round_no))
                    progress.advance(task)
        server_rss = {}
        import psutil

        for name, (process, _) in servers.items():
            server_rss[name] = psutil.Process(process.pid).memory_info().rss
    finally:
        for process, _ in servers.values():
            stop_process(process)
        shutil.rmtree(scratch, ignore_errors=True)
        remove_database(work)

    ratios = [a["requests_per_s"] / b["requests_per_s"] for a, b in zip(runs["idmesh"], runs["echo"])]
    return {"driver": driver, "concurrency": args.concurrency, "rounds": args.rounds, "round_s": args.round_seconds,
            "idmesh_rps": statistics.median(r["requests_per_s"] for r in runs["idmesh"]),
            "echo_rps": statistics.median(r["requests_per_s"] for r in runs["echo"]),
            "ratio": statistics.median(ratios), "ratios": ratios,
            "idmesh_latency_p50_ms": statistics.median(r["latency_p50_ms"] for r in runs["idmesh"]),
            "idmesh_latency_p99_ms": statistics.median(r["latency_p99_ms"] for r in runs["idmesh"]),
            "echo_latency_p50_ms": statistics.median(r["latency_p50_ms"] for r in runs["echo"]),
            "echo_latency_p99_ms": statistics.median(r["latency_p99_ms"] for r in runs["echo"]),
            "errors": {name: sum(r["errors"] for r in rs) for name, rs in runs.items()},
            "server_rss_mb": {name: round(v / 2**20) for name, v in server_rss.items()},
            "runs": runs}


# --- parent orchestration ------------------------------------------------------------------------------------

def run_child(mode: str, extra: list[str], console: Any, title: str) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / f"child-{mode}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--_child", mode, *extra]
    result: dict[str, Any] | None = None
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn()]
    with log.open("w") as log_file, Progress(*columns, console=console) as progress:
        task = progress.add_task(title, total=None)
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log_file, text=True)
        for line in process.stdout:
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "progress" in message:
                done, total = message["progress"]
                label = title if message["label"] == title else f"{title}: {message['label']}"
                progress.update(task, completed=done, total=total, description=label)
            elif "result" in message:
                result = message["result"]
        code = process.wait()
    if code != 0 or result is None:
        raise SystemExit(f"bench: child {mode} failed (exit {code}):\n{log.read_text()[-4000:]}")
    return result


def fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def print_table(results: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    n = results["profiles"]
    load, rss, inproc = results["load"], results["memory"], results["inprocess"]["all"]
    commit, http = results["commit"], results.get("http")
    table = Table(title=f"idmesh identify benchmark: {n:,} profiles x 3 identities "
                        f"({results['machine']['cpus']} CPUs, Python {results['machine']['python']})")
    for column in ("measure", "result", "goal", "met"):
        table.add_column(column, justify="right" if column != "measure" else "left")

    def row(measure: str, value: str, goal: str, met: bool | None) -> None:
        table.add_row(measure, value, goal, "-" if met is None else ("[green]yes[/]" if met else "[red]NO[/]"))

    scale = "" if n == 1_000_000 else f" (at {n:,}; goal is for 1M)"
    row("start-up load, IdSyncService.open (median of "
        f"{len(load['samples_s'])})", f"{fmt(load['median_s'], 2)} s", f"<= {GOALS['load_s']:.0f} s" + scale,
        load["median_s"] <= GOALS["load_s"] * n / 1_000_000)
    row("  snapshot read / graph build (median)", f"{fmt(load['snapshot_s'], 2)} / {fmt(load['build_graphs_s'], 2)} s",
        "", None)
    row("resident memory per profile (RSS delta / N)", f"{fmt(rss['bytes_per_profile'], 0)} B",
        f"<= {GOALS['bytes_per_profile']:.0f} B", rss["bytes_per_profile"] <= GOALS["bytes_per_profile"])
    row("  RSS after load - before (median)", f"{fmt(rss['delta_mb'], 0)} MB", "", None)
    row("in-process identify p50 (plan_resolve)", f"{fmt(inproc['p50'])} µs", f"<= {GOALS['inproc_p50_us']:.0f} µs",
        inproc["p50"] <= GOALS["inproc_p50_us"])
    row("in-process identify p99", f"{fmt(inproc['p99'])} µs", f"<= {GOALS['inproc_p99_us']:.0f} µs",
        inproc["p99"] <= GOALS["inproc_p99_us"])
    row("  p99.9 / max / mean", f"{fmt(inproc['p999'])} / {fmt(inproc['max'], 0)} / {fmt(inproc['mean'])} µs",
        "", None)
    for category, stats in results["inprocess"]["by_category"].items():
        row(f"  {category} ({MIX[category]}%) p50 / p99", f"{fmt(stats['p50'])} / {fmt(stats['p99'])} µs", "", None)
    wait = commit["wait_ms"]
    row(f"group-commit wait p50 ({commit['concurrency']} concurrent)", f"{fmt(wait['p50'], 2)} ms", "", None)
    row("group-commit wait p99", f"{fmt(wait['p99'], 2)} ms", f"<= {GOALS['commit_wait_p99_ms']:.0f} ms",
        wait["p99"] <= GOALS["commit_wait_p99_ms"])
    row("  commits/s, requests per commit", f"{fmt(commit['commits_per_s'], 0)}, {fmt(commit['requests_per_commit'])}",
        "", None)
    row("  resolves/s, DuckDB transaction p50 / p99",
        f"{fmt(commit['requests_per_s'], 0)}, {fmt(commit['transaction_ms']['p50'], 2)} / "
        f"{fmt(commit['transaction_ms']['p99'], 2)} ms", "", None)
    if http:
        row(f"HTTP identify, idmesh ({http['driver']}, {http['concurrency']} conn, median of {http['rounds']})",
            f"{fmt(http['idmesh_rps'], 0)} req/s", "", None)
        row("HTTP bare FastAPI echo, same run", f"{fmt(http['echo_rps'], 0)} req/s", "", None)
        row("HTTP ratio idmesh / echo (median of per-round ratios)", f"{fmt(http['ratio'], 2)}",
            f">= {GOALS['http_ratio']}", http["ratio"] >= GOALS["http_ratio"])
        row("  HTTP latency p50 / p99: idmesh | echo",
            f"{fmt(http['idmesh_latency_p50_ms'], 1)} / {fmt(http['idmesh_latency_p99_ms'], 1)} | "
            f"{fmt(http['echo_latency_p50_ms'], 1)} / {fmt(http['echo_latency_p99_ms'], 1)} ms", "", None)
        if any(http["errors"].values()):
            row("  HTTP errors (non-2xx, socket)", json.dumps(http["errors"]), "0", False)
    console.print(table)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", type=int, help="profiles in the database (default 1,000,000; 100,000 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 100k profiles, fewer requests, short rounds")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached database")
    parser.add_argument("--load-runs", type=int, help="extra fresh processes that only time the load (default 3)")
    parser.add_argument("--requests", type=int, help="timed in-process plan_resolve calls (default 200,000)")
    parser.add_argument("--concurrency", type=int, default=64, help="coroutines / HTTP connections (default 64)")
    parser.add_argument("--commit-seconds", type=float, help="group-commit phase duration (default 10)")
    parser.add_argument("--rounds", type=int, help="A/B HTTP rounds (default 5)")
    parser.add_argument("--round-seconds", type=float, help="seconds per HTTP run (default 10)")
    parser.add_argument("--driver", choices=("auto", "wrk", "httpx"), default="auto",
                        help="HTTP load generator: wrk when installed, else an async httpx process")
    parser.add_argument("--skip-http", action="store_true", help="skip the HTTP phase")
    parser.add_argument("--cprofile", metavar="FILE", help="also cProfile plan_resolve into FILE (pstats)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    for hidden in ("--db", "--meta", "--profile-out", "--url", "--bodies", "--auth"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--anon-pool", type=int, default=20_000, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=5_000, help=argparse.SUPPRESS)
    parser.add_argument("--diagnose", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.profiles = args.profiles or (100_000 if quick else 1_000_000)
    args.load_runs = args.load_runs if args.load_runs is not None else 3
    args.requests = args.requests or (50_000 if quick else 200_000)
    args.commit_seconds = args.commit_seconds or (3.0 if quick else 10.0)
    args.rounds = args.rounds or (3 if quick else 5)
    args.round_seconds = args.round_seconds or (3.0 if quick else 10.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    children = {"load": child_load, "inprocess": child_inprocess, "commit": child_commit,
                "drive-httpx": child_drive_httpx, "serve-echo": child_serve_echo}
    if args._child:
        children[args._child](args)
        return 0

    from rich.console import Console

    console = Console(stderr=True)  # stdout carries only the JSON line
    if not console.is_terminal:
        console.width = 140  # logs and pipes get the table on one line per row
    started = time.perf_counter()
    console.rule(f"[bold]idmesh identify benchmark[/]: {args.profiles:,} profiles")
    meta = ensure_database(args.profiles, args.rebuild, console)
    source, meta_path = cache_paths(args.profiles)
    common = ["--meta", str(meta_path), "--profiles", str(args.profiles)]
    read_copy = RESULTS / f"work-read-{args.profiles}.duckdb"
    write_copy = RESULTS / f"work-commit-{args.profiles}.duckdb"
    try:
        copy_database(source, read_copy)
        loads = []
        for k in range(args.load_runs):
            extra = ["--db", str(read_copy), *common] + (["--diagnose"] if k == 0 else [])
            loads.append(run_child("load", extra, console, f"load {k + 1}/{args.load_runs} (fresh process)"))
        inproc_extra = ["--db", str(read_copy), *common, "--requests", str(args.requests)]
        if args.cprofile:
            inproc_extra += ["--profile-out", args.cprofile]
        inproc = run_child("inprocess", inproc_extra, console, "in-process identify")
        copy_database(source, write_copy)
        commit = run_child("commit", ["--db", str(write_copy), *common, "--duration", str(args.commit_seconds),
                                      "--concurrency", str(args.concurrency)], console, "group commit")
    finally:
        remove_database(read_copy)
        remove_database(write_copy)
    http = None if args.skip_http else http_phase(args, meta, console)

    samples = loads + [inproc, commit]
    memory_diag = loads[0].get("memory") if loads else None
    results = {
        "bench": "identify", "profiles": args.profiles, "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "load": {"median_s": statistics.median(s["load_s"] for s in samples),
                 "samples_s": [round(s["load_s"], 3) for s in samples],
                 "snapshot_s": statistics.median(s["snapshot_s"] for s in samples),
                 "build_graphs_s": statistics.median(s["build_graphs_s"] for s in samples)},
        "memory": {"delta_mb": statistics.median(s["rss_delta"] for s in samples) / 2**20,
                   "bytes_per_profile": statistics.median(s["rss_delta"] for s in samples) / args.profiles,
                   "samples_bytes_per_profile": [round(s["rss_delta"] / args.profiles) for s in samples],
                   "diagnostics": memory_diag},
        "inprocess": inproc["inprocess"],
        "commit": commit["commit"],
        "http": http,
        "goals": GOALS,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print_table(results, console)
    if memory_diag:
        objects = memory_diag["python_objects"]
        console.print("[dim]memory breakdown (first load run): python graph objects "
                      + ", ".join(f"{k} {v / args.profiles:.0f} B" for k, v in objects.items())
                      + f" per profile; duckdb {memory_diag['duckdb_bytes']} B; arrow pool "
                      f"{memory_diag['arrow_allocated_bytes']} B ({memory_diag['arrow_pool']}); RSS delta after "
                      f"malloc_trim {memory_diag.get('rss_delta_after_malloc_trim', 0) / args.profiles:.0f} B "
                      "per profile[/]")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"identify-{args.profiles}-{stamp}.result.json"
    out.write_text(json.dumps(results, indent=2))
    console.print(f"[dim]full results: {out.relative_to(ROOT)}[/]")
    print(json.dumps({k: v for k, v in results.items() if k != "http"}
                     | {"http": {k: v for k, v in (http or {}).items() if k != "runs"} or None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
