"""Event ingest benchmark: events/s through `POST /v2/bulkevents` over HTTP into one idmesh server process,
beside a bare FastAPI echo endpoint that receives the same bodies in the same run (the HTTP ceiling).

    .venv/bin/python bench/ingest.py                  # 5 rounds of 500 requests of 100 batches (~830 events each)
    .venv/bin/python bench/ingest.py --quick          # smoke run, seconds
    .venv/bin/python bench/ingest.py --profile bench/results/ingest.pstats     # plus a cProfile'd server run
    .venv/bin/python bench/ingest.py --baseline /tmp/base   # plus idmesh from another source tree, same rounds

The server is `idmesh serve` on a fresh DuckDB file in a temp directory, with one workspace from a --config
JSON. Profiles exist before the timed rounds: a seeding phase sends batches that identify customers and
anonymous devices, and the answers give their MPIDs. The timed bodies are built before each round, so the
client only sends them; every batch has a unique source_request_id, so nothing is a replay.

Each round sends the same bodies to every server (idmesh, the echo server, and a --baseline idmesh if given),
in an order that rotates from round to round; figures are medians over the rounds and ratios are medians of
per-round ratios. The client is one asyncio loop in this process speaking raw HTTP/1.1 keep-alive
(bench/harness.HttpConnection; httpx could not saturate even the echo server with bodies this size), and its
CPU time is reported so a saturated client would show. With the servers stopped, each idmesh database must
hold exactly the events and batches it acknowledged. stdout gets the figures line, then the result as JSON;
the tables go to stderr.
"""


from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import json
import os
import platform
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/ingest.py`: make the project importable
    sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402  (needs ROOT on sys.path)
    HttpConnection,
    ServerProcess,
    echo_command,
    free_port,
    summarize,
)
from engine.ingest import MAX_BULK_BATCHES, MAX_REQUEST_BYTES  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GOAL_EVENTS_PER_S = 50_000.0  # DESIGN.md: event ingest via /v2/bulkevents, one process
ENDPOINT = "/v2/bulkevents"  # requests of MAX_BULK_BATCHES batches, each request at most MAX_REQUEST_BYTES

# What one batch is, by weight: mostly SDK traffic of profiles the server already knows by MPID.
BATCH_MIX: dict[str, int] = {
    "known_mpid": 75,         # an SDK that holds the MPID from an earlier identify
    "known_identities": 10,   # a server-to-server feed naming the customer by customer_id + email
    "anonymous_return": 7,    # a device seen before, no user identity: resolves to its anonymous profile
    "new_device": 5,          # first batch of a new install: creates an anonymous profile
    "new_customer": 3,        # a sign-up: creates a known profile (customer_id, email, device)
}
USER_ATTRIBUTES_SHARE = 0.3
DELETED_ATTRIBUTES_SHARE = 0.03
CONSENT_SHARE = 0.05

EVENT_NAMES = ("add_to_wishlist", "search", "share", "filter_applied", "video_play", "coupon_applied",
               "tutorial_step", "notification_open", "rate_app", "level_complete", "banner_click", "sort_changed")
CUSTOM_EVENT_TYPES = ("navigation", "search", "transaction", "user_content", "user_preference", "social", "other")
SCREENS = ("Home", "Search", "ProductDetail", "Cart", "Checkout", "Profile", "Settings", "Category", "Orders")
ATTRIBUTE_VALUES: dict[str, Callable[[random.Random], Any]] = {
    "category": lambda r: r.choice(("shoes", "bags", "outerwear", "beauty", "home", "kids")),
    "source": lambda r: r.choice(("push", "email", "organic", "deeplink", "ad")),
    "position": lambda r: r.randrange(1, 40),
    "query": lambda r: r.choice(("red dress", "sneakers", "gift card", "rain jacket", "lamp")),
    "variant": lambda r: r.choice(("A", "B", "control")),
    "price": lambda r: round(r.uniform(3, 250), 2),
    "in_stock": lambda r: r.random() < 0.8,
    "level": lambda r: r.randrange(1, 60),
    "plan": lambda r: r.choice(("free", "plus", "pro")),
    "color": lambda r: r.choice(("red", "black", "white", "navy")),
    "size": lambda r: r.choice(("S", "M", "L", "XL", "38", "42")),
    "count": lambda r: r.randrange(0, 12),
}
ATTRIBUTE_KEYS = tuple(ATTRIBUTE_VALUES)
BASE_TIME_MS = 1_767_225_600_000  # 2026-01-01: the generated traffic is stamped near it


# --- generated people: the same functions when seeding and when sending --------------------------------------

def customer_id(i: int) -> str:
    return f"cust_{i:08d}"


def email(i: int) -> str:
    return f"Shopper{i:08d}@Example.com"  # SDKs send it as typed; idmesh normalizes it


def device_identity(kind: str, i: int) -> dict[str, str]:
    """Half the devices are iPhones, half Android phones; `kind` keeps customer, anonymous and fresh devices
    apart."""
    tag = {"customer": "C", "anonymous": "A", "fresh": "F"}[kind]
    value = f"{i:08X}-B00C-4{tag}00-8000-00000000{i % 9999:04d}"
    if i % 2 == 0:
        return {"ios_idfv": value}
    return {"android_uuid": value.lower()}


def device_info(kind: str, i: int) -> dict[str, Any]:
    ids = device_identity(kind, i)
    if "ios_idfv" in ids:
        return {"platform": "iOS", "device_model": "iPhone15,2", "os_version": "17.4", **ids}
    return {"platform": "Android", "device_model": "Pixel 8", "os_version": "14", **ids}


APPLICATION_INFO = {"application_name": "Shop", "application_version": "4.12.0", "package": "com.example.shop"}


# --- events: a pool of serialized event arrays, spliced into batches ---------------------------------------

def custom_event(rng: random.Random, at: int) -> dict[str, Any]:
    keys = rng.sample(ATTRIBUTE_KEYS, rng.randint(3, 8))
    return {"event_type": "custom_event", "data": {
        "event_name": rng.choice(EVENT_NAMES), "custom_event_type": rng.choice(CUSTOM_EVENT_TYPES),
        "timestamp_unixtime_ms": at, "custom_attributes": {k: ATTRIBUTE_VALUES[k](rng) for k in keys}}}


def screen_view(rng: random.Random, at: int) -> dict[str, Any]:
    return {"event_type": "screen_view", "data": {"screen_name": rng.choice(SCREENS), "timestamp_unixtime_ms": at}}


def commerce_event(rng: random.Random, at: int) -> dict[str, Any]:
    products = [{"id": f"sku{rng.randrange(10_000):05d}", "name": f"Item {rng.randrange(500)}",
                 "price": round(rng.uniform(5, 200), 2), "quantity": rng.randint(1, 3)}
                for _ in range(rng.randint(1, 3))]
    action = rng.choice(("view_detail", "add_to_cart", "add_to_cart", "purchase"))
    product_action: dict[str, Any] = {"action": action, "products": products}
    if action == "purchase":
        product_action["transaction_id"] = f"T{rng.randrange(10**9)}"
        product_action["total_amount"] = round(sum(p["price"] * p["quantity"] for p in products), 2)
    return {"event_type": "commerce_event", "data": {
        "timestamp_unixtime_ms": at, "currency_code": "USD", "product_action": product_action}}


def session_event(event_type: str, at: int, session: str, duration_ms: int | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"timestamp_unixtime_ms": at, "session_uuid": session}
    if duration_ms is not None:
        data["session_duration_ms"] = duration_ms
    return {"event_type": event_type, "data": data}


def event_list(rng: random.Random) -> list[dict[str, Any]]:
    """5 to 20 events of one app session (mean about 8.5, long sessions rarer): sometimes opened by
    session_start, sometimes closed by session_end; between them about 60% custom events, 30% screen views,
    10% commerce events. Compact, as SDKs send them: 100 such batches must fit the 256 KB request limit."""
    count = 5 + min(15, int(rng.expovariate(1 / 4)))
    session = f"{rng.getrandbits(64):016x}"
    started = at = BASE_TIME_MS + rng.randrange(86_400_000)
    events: list[dict[str, Any]] = []
    if rng.random() < 0.3:
        events.append(session_event("session_start", at, session))
    closing = rng.random() < 0.2
    while len(events) < count - closing:
        at += rng.randrange(500, 30_000)
        pick = rng.random()
        make = custom_event if pick < 0.6 else screen_view if pick < 0.9 else commerce_event
        events.append(make(rng, at))
    if closing:
        events.append(session_event("session_end", at + 1000, session, at + 1000 - started))
    return events


@dataclass
class EventPool:
    """Serialized event arrays; a batch takes one whole, so building a request is byte concatenation."""

    arrays: list[bytes]
    counts: list[int]

    @classmethod
    def generate(cls, size: int, seed: int) -> EventPool:
        rng = random.Random(seed)
        lists = [event_list(rng) for _ in range(size)]
        return cls([orjson.dumps(events) for events in lists], [len(events) for events in lists])


# --- batches and requests ----------------------------------------------------------------------------------

@dataclass
class Population:
    """Who the server already knows: customer index -> MPID, and anonymous devices with a profile."""

    customers: list[tuple[int, int]] = field(default_factory=list)
    anonymous_devices: list[int] = field(default_factory=list)


@dataclass
class Request:
    body: bytes          # what goes on the wire (gzip when asked)
    raw_bytes: int       # uncompressed JSON size
    events: list[int]    # events per batch, in order


class BatchMaker:
    """Unique batches in the BATCH_MIX proportions. Only the envelope is built per batch; the events come
    from the pool."""

    def __init__(self, pool: EventPool, population: Population, seed: int, token: str) -> None:
        self.pool = pool
        self.population = population
        self.rng = random.Random(seed)
        self.token = token
        self.serial = 0
        self.kinds = list(BATCH_MIX)
        self.weights = list(BATCH_MIX.values())

    def next_id(self) -> int:
        self.serial += 1
        return self.serial

    def envelope(self, kind: str) -> dict[str, Any]:
        rng = self.rng
        serial = self.next_id()
        batch: dict[str, Any] = {"source_request_id": f"{self.token}-{serial:012x}", "environment": "production",
                                 "schema_version": 2, "timestamp_unixtime_ms": BASE_TIME_MS + serial,
                                 "ip": f"203.0.113.{serial % 250 + 1}"}
        if kind == "known_mpid":
            index, mpid = rng.choice(self.population.customers)
            batch["mpid"] = mpid
            batch["device_info"] = device_info("customer", index)
        elif kind == "known_identities":
            index, _ = rng.choice(self.population.customers)
            batch["user_identities"] = {"customer_id": customer_id(index), "email": email(index)}
            batch["device_info"] = device_info("customer", index)
        elif kind == "anonymous_return":
            batch["device_info"] = device_info("anonymous", rng.choice(self.population.anonymous_devices))
        elif kind == "new_device":
            batch["device_info"] = device_info("fresh", int(self.token[:6], 16) * 1_000_000 + serial)
        else:  # new_customer
            index = 10**8 + int(self.token[:6], 16) % 9000 * 10**4 + serial
            batch["user_identities"] = {"customer_id": customer_id(index), "email": email(index)}
            batch["device_info"] = device_info("fresh", index)
        batch["application_info"] = APPLICATION_INFO
        self.add_profile_data(batch)
        return batch

    def add_profile_data(self, batch: dict[str, Any]) -> None:
        rng = self.rng
        if rng.random() < USER_ATTRIBUTES_SHARE:
            batch["user_attributes"] = {"$FirstName": rng.choice(("Ann", "Bo", "Chen", "Dara")),
                                        "plan": ATTRIBUTE_VALUES["plan"](rng), "loyalty_points": rng.randrange(5000),
                                        "interests": rng.sample(("shoes", "bags", "home", "beauty"), 2)}
        if rng.random() < DELETED_ATTRIBUTES_SHARE:
            batch["deleted_user_attributes"] = ["promo_code"]
        if rng.random() < CONSENT_SHARE:
            at = batch["timestamp_unixtime_ms"]
            batch["consent_state"] = {
                "gdpr": {"marketing": {"consented": rng.random() < 0.7, "document": "privacy_v3",
                                       "timestamp_unixtime_ms": at, "location": "app"}},
                "ccpa": {"data_sale_opt_out": {"consented": rng.random() < 0.1, "timestamp_unixtime_ms": at}}}

    def batch(self, kind: str | None = None) -> tuple[bytes, int]:
        kind = kind or self.rng.choices(self.kinds, self.weights)[0]
        envelope = orjson.dumps(self.envelope(kind))
        k = self.rng.randrange(len(self.pool.arrays))
        return envelope[:-1] + b',"events":' + self.pool.arrays[k] + b"}", self.pool.counts[k]

    def request(self, compress: bool) -> Request:
        """100 batches under the request limit: a draw that lands over it is drawn again (rare)."""
        for _ in range(20):
            request = assemble([self.batch() for _ in range(MAX_BULK_BATCHES)], compress)
            if request.raw_bytes <= MAX_REQUEST_BYTES:
                return request
        raise SystemExit(f"bench: generated requests keep exceeding {MAX_REQUEST_BYTES} bytes; make batches smaller")


def assemble(batches: list[tuple[bytes, int]], compress: bool) -> Request:
    raw = b"[" + b",".join(body for body, _ in batches) + b"]"
    return Request(gzip.compress(raw, compresslevel=6) if compress else raw, len(raw), [n for _, n in batches])


def seeding_requests(maker: BatchMaker, customers: int, anonymous: int, compress: bool
                     ) -> Iterator[tuple[Request, list[tuple[str, int]]]]:
    """Batches that make the profiles: customer i identified by customer_id + email + its device, and
    anonymous devices alone. Yields each request with who its batches are, in order."""
    people = [("customer", i) for i in range(customers)] + [("anonymous", j) for j in range(anonymous)]
    for lo in range(0, len(people), MAX_BULK_BATCHES):
        chunk = people[lo:lo + MAX_BULK_BATCHES]
        batches = []
        for kind, i in chunk:
            envelope: dict[str, Any] = {"source_request_id": f"{maker.token}-seed-{kind}-{i}",
                                        "environment": "production", "device_info": device_info(kind, i),
                                        "application_info": APPLICATION_INFO}
            if kind == "customer":
                envelope["user_identities"] = {"customer_id": customer_id(i), "email": email(i)}
            events = [session_event("session_start", BASE_TIME_MS + i, f"seed{i:012d}")]
            envelope["events"] = events
            batches.append((orjson.dumps(envelope), len(events)))
        yield assemble(batches, compress), chunk


# --- driving -----------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """One target, one list of requests: what came back and what it cost."""

    target: str
    wall_s: float
    latencies_ms: list[float]
    statuses: dict[int, int]
    accepted_batches: int
    accepted_events: int
    sent_events: int
    sent_batches: int
    mpids: list[list[int | None]]
    client_cpu_s: float
    server_cpu_s: float
    server_threads_cpu_s: dict[str, float]

    def figures(self) -> dict[str, Any]:
        stats = summarize(self.latencies_ms)
        return {"target": self.target, "requests": len(self.latencies_ms), "wall_s": round(self.wall_s, 3),
                "events_per_s": self.sent_events / self.wall_s, "batches_per_s": self.sent_batches / self.wall_s,
                "requests_per_s": len(self.latencies_ms) / self.wall_s,
                "latency_p50_ms": stats["p50"], "latency_p99_ms": stats["p99"], "latency_max_ms": stats["max"],
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "accepted_events": self.accepted_events, "sent_events": self.sent_events,
                "client_cpu_share": self.client_cpu_s / self.wall_s,
                "server_cpu_cores": self.server_cpu_s / self.wall_s,
                "server_threads_cpu_cores": {k: v / self.wall_s for k, v in self.server_threads_cpu_s.items()}}


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a server's main thread (the event loop) and of all its other threads together (the
    group-commit writer, DuckDB's workers)."""
    import psutil

    split = {"event_loop": 0.0, "other_threads": 0.0}
    for thread in psutil.Process(pid).threads():
        split["event_loop" if thread.id == pid else "other_threads"] += thread.user_time + thread.system_time
    return split


async def send_all(url: str, headers: dict[str, str], requests: list[Request], concurrency: int,
                   advance: Callable[[], None], keep_mpids: bool) -> tuple[list[float], dict[int, int], int, int,
                                                                            list[list[int | None]]]:
    """POST every request once over `concurrency` keep-alive connections; the answers are parsed (a client
    would read them) and the accepted batches and events counted."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    accepted = [0, 0]
    mpids: list[list[int | None]] = [[] for _ in requests]
    queue = iter(range(len(requests)))
    host, port = url.removeprefix("http://").split(":")

    async def worker() -> None:
        connection = await HttpConnection.open(host, int(port))
        try:
            for n in queue:
                request = requests[n]
                t0 = time.perf_counter()
                status, content = await connection.post(ENDPOINT, headers, request.body)
                latencies.append((time.perf_counter() - t0) * 1000)
                statuses[status] = statuses.get(status, 0) + 1
                answer = orjson.loads(content)
                results = answer.get("results") if isinstance(answer, dict) else None
                if results is not None:
                    for result, events in zip(results, request.events):
                        if result.get("status") == "accepted":
                            accepted[0] += 1
                            accepted[1] += events
                    if keep_mpids:
                        mpids[n] = [int(r["mpid"]) if "mpid" in r else None for r in results]
                elif status < 300:  # the echo server: it read the body whole
                    accepted[0] += len(request.events)
                    accepted[1] += sum(request.events)
                advance()
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, statuses, accepted[0], accepted[1], mpids


def drive(server: ServerProcess, headers: dict[str, str], requests: list[Request], concurrency: int,
          progress: Any, label: str, keep_mpids: bool = False) -> Outcome:
    import psutil
    import uvloop

    task = progress.add_task(label, total=len(requests))
    server_process = psutil.Process(server.pid)
    cpu0, threads0 = server_process.cpu_times(), thread_cpu(server.pid)
    client0, t0 = time.process_time(), time.perf_counter()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        latencies, statuses, batches, events, mpids = runner.run(send_all(
            server.url, headers, requests, concurrency, lambda: progress.advance(task), keep_mpids))
    wall = time.perf_counter() - t0
    client_cpu = time.process_time() - client0
    cpu1, threads1 = server_process.cpu_times(), thread_cpu(server.pid)
    progress.update(task, visible=False)
    return Outcome(server.name, wall, latencies, statuses, batches, events,
                   sum(sum(r.events) for r in requests), sum(len(r.events) for r in requests), mpids, client_cpu,
                   (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
                   {k: threads1[k] - threads0[k] for k in threads1})


# --- servers -------------------------------------------------------------------------------------------------

def write_config(directory: Path, api_key: str, api_secret: str) -> Path:
    config = directory / "config.json"
    config.write_text(json.dumps({"workspaces": [
        {"name": "bench", "api_key": api_key, "api_secret": api_secret, "settings": {"strategy": "default"}}]}))
    return config


def start_idmesh(name: str, tree: Path, db: Path, config: Path, profile_out: Path | None = None) -> ServerProcess:
    """`idmesh serve` run from the source tree `tree` (this checkout, or a baseline export) with this venv."""
    port = free_port()
    if profile_out is None:
        command = [sys.executable, "-m", "api.cli", "serve"]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--_serve-profiled", str(profile_out)]
    command += ["--db", str(db), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ, IDMESH_ADMIN_TOKEN=secrets.token_urlsafe(16), PYTHONPATH=str(tree))
    return ServerProcess(name, command, port, RESULTS / f"server-ingest-{name}.log", env, cwd=tree)


def serve_profiled(profile_out: str, serve_args: list[str]) -> int:
    """`idmesh serve` with cProfile on the event-loop thread and timers in the group-commit writer (each
    transaction, and the Arrow table it builds first), all switched on by SIGUSR1 and off by SIGUSR2 (the
    benchmark measures only its timed requests); switching off writes `profile_out` (pstats) and
    `profile_out`.writer.json. Wrapping module attributes changes no engine code."""
    import cProfile
    import signal

    import engine.writer
    from api.cli import main as idmesh_main
    from engine.writer import GroupCommitWriter

    profiler = cProfile.Profile()
    transactions: list[tuple[float, float, int, bool]] = []
    tables: list[float] = []
    window = [0.0]
    real_write, real_table = GroupCommitWriter._write, engine.writer.journal_table

    def timed_write(writer: GroupCommitWriter, batch: Any) -> None:  # on the writer thread
        t0 = time.perf_counter()
        real_write(writer, batch)
        # after a fold the writer's journal count restarts at zero
        transactions.append((t0, time.perf_counter() - t0, len(batch.rows), writer._journal_rows == 0))

    def timed_table(*args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real_table(*args)
        finally:
            tables.append(time.perf_counter() - t0)

    def start(*_: Any) -> None:
        transactions.clear()
        tables.clear()
        window[0] = time.perf_counter()
        profiler.enable()

    def stop(*_: Any) -> None:
        profiler.disable()
        profiler.dump_stats(profile_out + ".tmp")
        Path(profile_out + ".writer.json").write_text(json.dumps({
            "window_s": time.perf_counter() - window[0], "transactions": transactions, "journal_tables": tables}))
        os.replace(profile_out + ".tmp", profile_out)

    GroupCommitWriter._write = timed_write
    engine.writer.journal_table = timed_table
    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    return idmesh_main(["serve", *serve_args])


def count_stored(db: Path) -> dict[str, int]:
    import duckdb

    connection = duckdb.connect(str(db), read_only=True)
    try:
        return {name: connection.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
                for name in ("events", "batches", "profiles")}
    finally:
        connection.close()


@dataclass
class Target:
    """A server the rounds drive. An idmesh server has its own BatchMaker, since the known MPIDs in the bodies
    are its own; the echo server gets idmesh's bodies."""

    name: str
    server: ServerProcess
    maker: BatchMaker | None = None
    db: Path | None = None
    sent_events: int = 0
    sent_batches: int = 0
    failures: list[str] = field(default_factory=list)

    def account(self, outcome: Outcome) -> None:
        """What idmesh must have stored: every batch it got, each accepted."""
        if self.maker is None:
            return
        self.sent_events += outcome.sent_events
        self.sent_batches += outcome.sent_batches
        if outcome.accepted_events != outcome.sent_events or set(outcome.statuses) != {202}:
            self.failures.append(f"{self.name}: statuses {outcome.statuses}, accepted {outcome.accepted_events} "
                                 f"of {outcome.sent_events} events")

    def verify(self) -> dict[str, Any]:
        """With the server stopped: the views hold exactly what was acknowledged."""
        stored = count_stored(self.db)
        ok = stored["events"] == self.sent_events and stored["batches"] == self.sent_batches
        if not ok:
            self.failures.append(f"{self.name}: stored {stored}, sent {self.sent_events} events in "
                                 f"{self.sent_batches} batches")
        return {**stored, "sent_events": self.sent_events, "sent_batches": self.sent_batches, "ok": ok}


# --- phases --------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What the phases share."""

    args: argparse.Namespace
    console: Any
    pool: EventPool
    headers: dict[str, str]

    def progress(self) -> Any:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=self.console, transient=True)

    def maker(self) -> BatchMaker:
        """Every idmesh target gets the same draws (same seed), so they receive the same workload."""
        return BatchMaker(self.pool, Population(), 11, secrets.token_hex(4))

    def requests(self, maker: BatchMaker, count: int) -> list[Request]:
        return [maker.request(self.args.gzip) for _ in range(count)]


def seed(run: Run, target: Target) -> dict[str, Any]:
    args = run.args
    pairs = list(seeding_requests(target.maker, args.profiles, args.anonymous, args.gzip))
    with run.progress() as progress:
        outcome = drive(target.server, run.headers, [request for request, _ in pairs], args.concurrency, progress,
                        f"{target.name}: seeding {args.profiles:,} customers and {args.anonymous:,} anonymous devices",
                        keep_mpids=True)
    target.account(outcome)
    population = target.maker.population
    for (_, people), mpids in zip(pairs, outcome.mpids):
        for (kind, i), mpid in zip(people, mpids):
            if mpid is None:
                continue
            if kind == "customer":
                population.customers.append((i, mpid))
            else:
                population.anonymous_devices.append(i)
    if not population.customers or not population.anonymous_devices:
        raise SystemExit(f"bench: seeding made no profiles: {outcome.statuses}; see {target.server.log}")
    return {"wall_s": round(outcome.wall_s, 2), "events_per_s": round(outcome.sent_events / outcome.wall_s),
            "customers": len(population.customers), "anonymous": len(population.anonymous_devices)}


def bodies_for(run: Run, targets: list[Target], count: int) -> dict[str, list[Request]]:
    bodies = {t.name: run.requests(t.maker, count) for t in targets if t.maker is not None}
    return {t.name: bodies.get(t.name, bodies["idmesh"]) for t in targets}


def rounds(run: Run, targets: list[Target]) -> dict[str, list[dict[str, Any]]]:
    """Warm-up, then per round fresh bodies sent to every target, the order rotating from round to round so
    drift on the shared machine favours none."""
    args = run.args
    figures: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    with run.progress() as progress:
        warm = bodies_for(run, targets, args.warmup)
        for target in targets:
            target.account(drive(target.server, run.headers, warm[target.name], args.concurrency, progress,
                                 f"warm-up: {target.name}"))
        for number in range(1, args.rounds + 1):
            built = progress.add_task(f"round {number}/{args.rounds}: building bodies", total=None)
            bodies = bodies_for(run, targets, args.requests)
            progress.update(built, visible=False)
            shift = (number - 1) % len(targets)
            for target in targets[shift:] + targets[:shift]:
                outcome = drive(target.server, run.headers, bodies[target.name], args.concurrency, progress,
                                f"round {number}/{args.rounds}: {target.name} ({args.concurrency} connections)")
                target.account(outcome)
                figures[target.name].append(outcome.figures())
    return figures


def profile_phase(run: Run, config: Path, scratch: Path) -> dict[str, Any]:
    """A dedicated server under cProfile, on its own database: seeding and warm-up untimed, then the timed
    requests with the profiler on. Costs are reported per event."""
    import pstats
    import signal

    args = run.args
    out = Path(args.profile).resolve()
    out.unlink(missing_ok=True)
    target = Target("idmesh-profiled", start_idmesh("idmesh-profiled", ROOT, scratch / "profile.duckdb", config, out),
                    run.maker(), scratch / "profile.duckdb")
    try:
        target.server.wait_ready()
        seed(run, target)
        with run.progress() as progress:
            drive(target.server, run.headers, run.requests(target.maker, args.warmup), args.concurrency, progress,
                  "profile: warm-up")
            requests = run.requests(target.maker, args.requests)
            os.kill(target.server.pid, signal.SIGUSR1)
            outcome = drive(target.server, run.headers, requests, args.concurrency, progress,
                            "profile: timed requests (cProfile on)")
            os.kill(target.server.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not out.exists():
            time.sleep(0.1)
    finally:
        target.server.stop()
    writer = json.loads(Path(f"{out}.writer.json").read_text())
    return {"file": str(out), "events": outcome.sent_events, "requests": len(requests),
            "events_per_s_under_profiler": outcome.sent_events / outcome.wall_s,
            "server_threads_cpu_cores": outcome.figures()["server_threads_cpu_cores"],
            "writer": writer_summary(writer, outcome.sent_events),
            "top": top_costs(pstats.Stats(str(out)), outcome.sent_events)}


def writer_summary(writer: dict[str, Any], events: int) -> dict[str, Any]:
    """The group-commit writer's transactions during the timed window: how busy the one thread every request
    waits for was, and what the journal folds cost."""
    window = writer["window_s"]
    durations = [d for _, d, _, _ in writer["transactions"]]
    folds = [d for _, d, _, folded in writer["transactions"] if folded]
    commits = summarize([d * 1000 for _, d, _, folded in writer["transactions"] if not folded])
    return {"window_s": window, "transactions": len(durations), "busy_share": sum(durations) / window,
            "commit_ms_p50": commits["p50"], "commit_ms_p99": commits["p99"],
            "journal_table_us_per_event": sum(writer["journal_tables"]) / events * 1e6,
            "rows_per_transaction": statistics.fmean(r for _, _, r, _ in writer["transactions"]) if durations else 0,
            "folds": len(folds), "fold_s_total": sum(folds), "fold_s_max": max(folds, default=0.0),
            "writer_us_per_event": sum(durations) / events * 1e6, "fold_us_per_event": sum(folds) / events * 1e6}


def top_costs(stats: Any, events: int, limit: int = 25) -> list[dict[str, Any]]:
    """The functions with the most own time on the event loop thread, and their cumulative time, in µs per
    event."""
    rows = []
    for (filename, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        where = Path(filename)
        try:
            short = str(where.resolve().relative_to(ROOT))
        except ValueError:
            short = "/".join(where.parts[-2:]) if where.parts else filename
        rows.append({"function": f"{short}:{line}({name})", "calls": calls,
                     "own_us_per_event": own / events * 1e6, "cumulative_us_per_event": cumulative / events * 1e6})
    rows.sort(key=lambda r: r["own_us_per_event"], reverse=True)
    return rows[:limit]


# --- report ------------------------------------------------------------------------------------------------

def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def ratio_median(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    """Median of per-round ratios: each pair ran side by side in one round."""
    return statistics.median(x["events_per_s"] / y["events_per_s"] for x, y in zip(a, b))


def summary(figures: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    idmesh, echo = figures["idmesh"], figures["echo"]
    events_per_s = median_of(idmesh, "events_per_s")
    found = {"events_per_s": events_per_s, "goal_events_per_s": GOAL_EVENTS_PER_S,
             "ratio_to_goal": events_per_s / GOAL_EVENTS_PER_S,
             "batches_per_s": median_of(idmesh, "batches_per_s"),
             "requests_per_s": median_of(idmesh, "requests_per_s"),
             "latency_p50_ms": median_of(idmesh, "latency_p50_ms"),
             "latency_p99_ms": median_of(idmesh, "latency_p99_ms"),
             "echo_events_per_s": median_of(echo, "events_per_s"), "ratio_to_echo": ratio_median(idmesh, echo),
             "echo_latency_p50_ms": median_of(echo, "latency_p50_ms"),
             "echo_latency_p99_ms": median_of(echo, "latency_p99_ms"),
             "client_cpu_share": median_of(idmesh, "client_cpu_share"),
             "echo_client_cpu_share": median_of(echo, "client_cpu_share"),
             "server_cpu_cores": median_of(idmesh, "server_cpu_cores"),
             "server_event_loop_cores": statistics.median(r["server_threads_cpu_cores"]["event_loop"]
                                                          for r in idmesh),
             "server_other_threads_cores": statistics.median(r["server_threads_cpu_cores"]["other_threads"]
                                                             for r in idmesh),
             "per_round_events_per_s": [round(r["events_per_s"]) for r in idmesh]}
    if "baseline" in figures:
        found["baseline_events_per_s"] = median_of(figures["baseline"], "events_per_s")
        found["ratio_to_baseline"] = ratio_median(idmesh, figures["baseline"])
        found["baseline_latency_p50_ms"] = median_of(figures["baseline"], "latency_p50_ms")
        found["baseline_latency_p99_ms"] = median_of(figures["baseline"], "latency_p99_ms")
        found["baseline_server_cpu_cores"] = median_of(figures["baseline"], "server_cpu_cores")
    return found


def print_table(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    s, w = result["summary"], result["workload"]
    table = Table(title=f"idmesh event ingest via {ENDPOINT}: median of {result['rounds']} rounds x "
                        f"{result['requests_per_round']} requests, {result['concurrency']} connections "
                        f"({result['machine']['cpus']} CPUs, Python {result['machine']['python']})")
    for column in ("measure", "result", "goal", "met"):
        table.add_column(column, justify="left" if column == "measure" else "right")

    def row(measure: str, value: str, goal: str = "", met: bool | None = None) -> None:
        table.add_row(measure, value, goal, "" if met is None else ("[green]yes[/]" if met else "[red]NO[/]"))

    row("events/s into idmesh (one process)", f"{s['events_per_s']:,.0f}", f">= {GOAL_EVENTS_PER_S:,.0f}",
        s["events_per_s"] >= GOAL_EVENTS_PER_S)
    row("  ratio to goal", f"{s['ratio_to_goal']:.2f}")
    row("  per round", ", ".join(f"{v:,}" for v in s["per_round_events_per_s"]))
    row("batches/s, requests/s", f"{s['batches_per_s']:,.0f}, {s['requests_per_s']:,.1f}")
    row("request latency p50 / p99", f"{s['latency_p50_ms']:,.0f} / {s['latency_p99_ms']:,.0f} ms")
    if "ratio_to_baseline" in s:
        row(f"baseline idmesh ({result['baseline']}), same rounds", f"{s['baseline_events_per_s']:,.0f} events/s")
        row("  this tree / baseline (median of per-round ratios)", f"{s['ratio_to_baseline']:.2f}")
        row("  baseline latency p50 / p99",
            f"{s['baseline_latency_p50_ms']:,.0f} / {s['baseline_latency_p99_ms']:,.0f} ms")
    row("bare FastAPI echo, same bodies (HTTP ceiling)", f"{s['echo_events_per_s']:,.0f} events/s")
    row("  idmesh / echo", f"{s['ratio_to_echo']:.2f}")
    row("  echo latency p50 / p99", f"{s['echo_latency_p50_ms']:,.0f} / {s['echo_latency_p99_ms']:,.0f} ms")
    row("client CPU (share of one core): idmesh | echo rounds",
        f"{s['client_cpu_share']:.0%} | {s['echo_client_cpu_share']:.0%}")
    row("server CPU cores: all | event loop | other threads",
        f"{s['server_cpu_cores']:.2f} | {s['server_event_loop_cores']:.2f} | {s['server_other_threads_cores']:.2f}")
    row("request: bytes (avg / max), events, batches",
        f"{w['request_bytes_avg']:,.0f} / {w['request_bytes_max']:,} B, {w['events_per_request']:.0f}, "
        f"{MAX_BULK_BATCHES}" + (f" (gzip {w['wire_bytes_avg']:,.0f} B)" if result["gzip"] else ""))
    for name, stored in result["verification"].items():
        row(f"{name}: stored = sent (events, batches)", f"{stored['events']:,} / {stored['sent_events']:,}, "
            f"{stored['batches']:,} / {stored['sent_batches']:,}", "equal", stored["ok"])
    console.print(table)


def print_profile(profile: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    w, cpu = profile["writer"], profile["server_threads_cpu_cores"]
    console.print(f"[bold]profile[/] ({profile['requests']} requests, {profile['events']:,} events, "
                  f"{profile['events_per_s_under_profiler']:,.0f} events/s with cProfile on): event loop "
                  f"{cpu['event_loop']:.2f} cores, other threads {cpu['other_threads']:.2f}; group-commit writer busy "
                  f"{w['busy_share']:.0%} of the window ({w['writer_us_per_event']:.1f} µs/event, of which building "
                  f"the Arrow journal table {w['journal_table_us_per_event']:.1f}), "
                  f"{w['transactions']} transactions, commit p50 / p99 {w['commit_ms_p50']:.0f} / "
                  f"{w['commit_ms_p99']:.0f} ms, {w['rows_per_transaction']:.0f} rows each; {w['folds']} journal "
                  f"folds, {w['fold_s_total']:.1f} s in all (max {w['fold_s_max']:.1f} s, "
                  f"{w['fold_us_per_event']:.1f} µs/event)")
    table = Table(title="event-loop thread under cProfile: own and cumulative time, µs per event")
    for column in ("function", "calls", "own", "cumulative"):
        table.add_column(column, justify="left" if column == "function" else "right")
    for row in profile["top"]:
        table.add_row(row["function"], f"{row['calls']:,}", f"{row['own_us_per_event']:.2f}",
                      f"{row['cumulative_us_per_event']:.2f}")
    console.print(table)


def figures_line(result: dict[str, Any]) -> str:
    s = result["summary"]
    stored = all(v["ok"] for v in result["verification"].values())
    baseline = f"; {s['ratio_to_baseline']:.2f} x baseline" if "ratio_to_baseline" in s else ""
    return (f"ingest figures: {s['events_per_s']:,.0f} events/s ({s['ratio_to_goal']:.2f} x goal "
            f"{GOAL_EVENTS_PER_S:,.0f}), {s['batches_per_s']:,.0f} batches/s, p50 {s['latency_p50_ms']:,.0f} ms, "
            f"p99 {s['latency_p99_ms']:,.0f} ms; echo {s['echo_events_per_s']:,.0f} events/s{baseline}; "
            f"stored = sent: {'yes' if stored else 'NO'}")


# --- main --------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: small population, 2 short rounds")
    parser.add_argument("--requests", type=int, help="timed requests of 100 batches per round (default 500)")
    parser.add_argument("--rounds", type=int, help="rounds, the servers' order rotating (default 5)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent requests (default 16)")
    parser.add_argument("--warmup", type=int, help="untimed requests before the rounds (default 40)")
    parser.add_argument("--profiles", type=int, help="customers seeded before timing (default 10,000)")
    parser.add_argument("--anonymous", type=int, help="anonymous devices seeded before timing (default 2,000)")
    parser.add_argument("--gzip", action="store_true", help="send gzip bodies (Content-Encoding: gzip)")
    parser.add_argument("--baseline", metavar="TREE", type=Path,
                        help="also drive idmesh run from another source tree in the same rounds, e.g. "
                             "`git archive HEAD | tar -x -C /tmp/base` before a change; reports the ratio")
    parser.add_argument("--profile", metavar="FILE",
                        help="also run a dedicated server under cProfile; its pstats go to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory with the databases")
    args = parser.parse_args(argv)
    quick = args.quick
    args.requests = args.requests or (15 if quick else 500)
    args.rounds = args.rounds or (2 if quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if quick else 40)
    args.profiles = args.profiles or (300 if quick else 10_000)
    args.anonymous = args.anonymous or (100 if quick else 2_000)
    if args.concurrency < 1 or args.requests < 1:
        parser.error("--concurrency and --requests must be at least 1")
    if args.baseline and not (args.baseline / "api" / "cli.py").exists():
        parser.error(f"--baseline {args.baseline}: not an idmesh source tree (no api/cli.py)")
    return args


def start_targets(args: argparse.Namespace, run: Run, config: Path, scratch: Path) -> list[Target]:
    trees = [("idmesh", ROOT)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    targets = [Target(name, start_idmesh(name, tree, scratch / f"{name}.duckdb", config), run.maker(),
                      scratch / f"{name}.duckdb") for name, tree in trees]
    port = free_port()
    targets.append(Target("echo", ServerProcess("echo", echo_command(port, [ENDPOINT]), port,
                                                RESULTS / "server-ingest-echo.log")))
    return targets


def measure(run: Run, config: Path, scratch: Path) -> dict[str, Any]:
    """Servers up, seeded, driven, stopped, checked."""
    targets = start_targets(run.args, run, config, scratch)
    try:
        with run.console.status("starting the servers"):
            for target in targets:
                target.server.wait_ready()
        seeded = {t.name: seed(run, t) for t in targets if t.maker is not None}
        for name, seeding in seeded.items():
            run.console.print(f"[dim]{name}: seeded {seeding['customers']:,} customers and "
                              f"{seeding['anonymous']:,} anonymous devices in {seeding['wall_s']} s[/]")
        figures = rounds(run, targets)
    finally:
        codes = {t.name: t.server.stop() for t in targets}
    failures = [f"{name} exited with {code}; see {t.server.log}" for t, (name, code) in zip(targets, codes.items())
                if t.maker is not None and code not in (0, None)]
    verification = {t.name: t.verify() for t in targets if t.maker is not None}
    sample = run.requests(targets[0].maker, 50)  # the request shape, from the generator the rounds used
    return {"seeded": seeded, "figures": figures, "verification": verification, "sample": sample,
            "failures": failures + [f for t in targets for f in t.failures]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_serve-profiled"]:
        return serve_profiled(argv[1], argv[2:])
    args = parse_args(argv)

    from rich.console import Console

    console = Console(stderr=True)  # stdout carries the figures line and the JSON
    if not console.is_terminal:
        console.width = 150
    started = time.perf_counter()
    console.rule(f"[bold]idmesh event ingest benchmark[/]: {args.rounds} rounds x {args.requests} requests")
    RESULTS.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="idmesh-ingest-"))
    api_key, api_secret = "idm_bench" + secrets.token_hex(6), secrets.token_urlsafe(24)
    config = write_config(scratch, api_key, api_secret)
    headers = {"Authorization": "Basic " + base64.b64encode(f"{api_key}:{api_secret}".encode()).decode(),
               "Content-Type": "application/json"}
    if args.gzip:
        headers["Content-Encoding"] = "gzip"
    run = Run(args, console, EventPool.generate(300 if args.quick else 2000, seed=7), headers)
    try:
        measured = measure(run, config, scratch)
        profile = profile_phase(run, config, scratch) if args.profile else None
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    sample, failures = measured["sample"], measured["failures"]
    result = {
        "bench": "ingest", "quick": args.quick, "rounds": args.rounds, "requests_per_round": args.requests,
        "concurrency": args.concurrency, "gzip": args.gzip, "baseline": str(args.baseline) if args.baseline else None,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "workload": {"mix": BATCH_MIX, "seeded": measured["seeded"],
                     "request_bytes_avg": statistics.fmean(r.raw_bytes for r in sample),
                     "request_bytes_max": max(r.raw_bytes for r in sample),
                     "wire_bytes_avg": statistics.fmean(len(r.body) for r in sample),
                     "events_per_request": statistics.fmean(sum(r.events) for r in sample),
                     "events_per_batch": statistics.fmean(run.pool.counts)},
        "summary": summary(measured["figures"]), "runs": measured["figures"],
        "verification": measured["verification"], "profile": profile,
        "failures": failures, "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print_table(result, console)
    if profile:
        print_profile(profile, console)
    for failure in failures:
        console.print(f"[red]bench: {failure}[/]")
    out = RESULTS / f"ingest-{time.strftime('%Y%m%d-%H%M%S')}.result.json"
    out.write_text(json.dumps(result, indent=2))
    console.print(f"[dim]full results: {out.relative_to(ROOT)}; server logs: bench/results/server-ingest-*.log"
                  + (f"; databases kept in {scratch}" if args.keep else "") + "[/]")
    print(figures_line(result))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
