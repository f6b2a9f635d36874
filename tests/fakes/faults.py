"""What goes wrong between idmesh and a destination, for the fake destinations.

- `FaultInjector` decides, per request and reproducibly (seeded), whether a request is answered normally or hit by a
  fault: throttled, a 5xx, a timeout (applied or not), a connection reset (applied or not).
- `FaultMiddleware` is the raw ASGI layer in front of a fake's app that carries the decision out, and keeps the
  `RequestLog` of every request with its fault and the status sent.
- `WindowBudget` counts requests per time window, for the fakes' own rate limits (Braze 429, Meta throttling codes).

Connection resets: uvicorn does not let an ASGI app drop a connection without an answer (an exception before the
response starts becomes a 500; after it starts, the client has the status line already). `reset_connection` reaches
the socket through uvicorn's `send` callable, a bound method of its per-request cycle object that holds the asyncio
transport, sets SO_LINGER to zero and aborts the transport: the kernel sends a TCP RST and httpx raises
`httpx.ReadError` ("Connection reset by peer"). This needs uvicorn with the asyncio event loop (uvloop's transports
close with a FIN, which httpx reports as `httpx.RemoteProtocolError`, "Server disconnected without sending a
response"); `fakes.server.FakeServer` runs the fakes that way. Without a uvicorn transport (e.g. under
`httpx.ASGITransport`) the fault raises `ConnectionResetError` into the caller instead.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any


class Fault(StrEnum):
    THROTTLE = "throttle"  # the destination's throttling answer (Braze 429, Meta code 17/613/80003); not applied
    SERVER_ERROR = "server_error"  # 500, 502 or 503; not applied
    TIMEOUT = "timeout"  # no answer for `delay_seconds`, then 504; not applied
    TIMEOUT_APPLIED = "timeout_applied"  # applied at once; the answer is held back for `delay_seconds`
    RESET = "reset"  # connection reset before the request is applied
    RESET_APPLIED = "reset_applied"  # applied, then the connection is reset instead of answering


APPLIED_FAULTS = frozenset({Fault.TIMEOUT_APPLIED, Fault.RESET_APPLIED})
EVERY_FAULT: Mapping[Fault, float] = {fault: 1.0 for fault in Fault}


@dataclass(frozen=True)
class FaultPlan:
    """How often and how a fake misbehaves; plain data, replaced as a whole by `FaultInjector.configure`.

    rate: fraction of eligible requests hit by a fault (0..1).
    kinds: relative weights of the faults drawn (default: every kind, equally).
    seed: seeds the draw, so a run is reproducible for the same arrival order.
    delay_seconds: how long a timeout holds the answer back; set it above the client's timeout.
    latency_seconds: added to every request before anything else: a slow destination.
    match: a regular expression searched in "METHOD /path"; only matching requests are eligible (None: all).
    """

    rate: float = 0.0
    kinds: Mapping[Fault, float] = field(default_factory=lambda: dict(EVERY_FAULT))
    seed: int = 0
    delay_seconds: float = 2.0
    latency_seconds: float = 0.0
    match: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be within 0..1, not {self.rate}")
        if self.rate > 0 and not any(weight > 0 for weight in self.kinds.values()):
            raise ValueError("a fault rate needs at least one fault kind with a positive weight")
        for kind in self.kinds:
            Fault(kind)  # raises ValueError on an unknown name


class FaultInjector:
    """Thread-safe: tests configure it from their thread while the server draws from its event loop."""

    def __init__(self, plan: FaultPlan | None = None) -> None:
        self._lock = threading.Lock()
        self._forced: deque[Fault | None] = deque()
        self.injected: Counter[Fault] = Counter()
        self._apply(plan or FaultPlan())

    def _apply(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.rng = random.Random(plan.seed)
        self._pattern = re.compile(plan.match) if plan.match else None
        self._kinds = [Fault(kind) for kind, weight in plan.kinds.items() if weight > 0]
        self._weights = [weight for weight in plan.kinds.values() if weight > 0]

    def configure(self, plan: FaultPlan | None = None, **changes: Any) -> FaultPlan:
        """Install `plan` (or the current plan with `changes`); the random draw restarts from the plan's seed."""
        with self._lock:
            self._apply(replace(plan or self.plan, **changes))
            return self.plan

    def disable(self) -> None:
        """No more faults (random or forced); counters stay."""
        with self._lock:
            self._forced.clear()
            self._apply(replace(self.plan, rate=0.0, latency_seconds=0.0))

    def force(self, *faults: Fault | str | None) -> None:
        """The next eligible requests get these faults, in order, ahead of the random draw (None: no fault)."""
        with self._lock:
            self._forced.extend(Fault(fault) if fault is not None else None for fault in faults)

    def draw(self, method: str, path: str) -> Fault | None:
        with self._lock:
            if self._pattern is not None and not self._pattern.search(f"{method} {path}"):
                return None
            if self._forced:
                fault = self._forced.popleft()
            elif self.plan.rate > 0 and self.rng.random() < self.plan.rate:
                fault = self.rng.choices(self._kinds, self._weights)[0]
            else:
                fault = None
            if fault is not None:
                self.injected[fault] += 1
            return fault

    def choice(self, options: list[Any]) -> Any:
        """A seeded pick for the shape of a fault (which 5xx, which throttling code)."""
        with self._lock:
            return self.rng.choice(options)


@dataclass
class LoggedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    at: float
    fault: Fault | None = None
    status: int | None = None  # the answer's status (the app's, under an applied fault); None: no answer at all
    response: bytes = b""

    def json(self) -> Any:
        import json

        return json.loads(self.body)


class RequestLog:
    """The last `max_entries` requests a fake received; `keep_bodies=False` for benchmarks (bodies are large)."""

    def __init__(self, max_entries: int = 10_000, keep_bodies: bool = True) -> None:
        self._lock = threading.Lock()
        self._entries: deque[LoggedRequest] = deque(maxlen=max_entries)
        self.keep_bodies = keep_bodies
        self.total = 0

    def append(self, entry: LoggedRequest) -> None:
        with self._lock:
            self._entries.append(entry)
            self.total += 1

    def entries(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.total = 0


class WindowBudget:
    """At most `limit` calls per window of `window_seconds`; a window opens at the first call after the last one
    closed (not aligned to the clock), so a test's burst never straddles a boundary by accident."""

    def __init__(self, limit: int | None, window_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self.limit = limit
        self.window_seconds = window_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[float, int]] = {}

    def take(self, key: str = "") -> tuple[bool, int, float]:
        """Count one call for `key`: (allowed, calls in this window, epoch seconds when the window closes)."""
        now = self.clock()
        with self._lock:
            start, used = self._counts.get(key, (now, 0))
            if now >= start + self.window_seconds:
                start, used = now, 0
            used += 1
            self._counts[key] = (start, used)
        allowed = self.limit is None or used <= self.limit
        return allowed, used, start + self.window_seconds

    def peek(self, key: str = "") -> tuple[int, float]:
        now = self.clock()
        with self._lock:
            start, used = self._counts.get(key, (now, 0))
        if now >= start + self.window_seconds:
            return 0, now + self.window_seconds
        return used, start + self.window_seconds

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


@dataclass(frozen=True)
class PlainResponse:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_type: bytes = b"application/json"


class FaultResponses:
    """The answers a fake gives for faults that never reach its app; each fake subclasses it."""

    def throttled(self, injector: FaultInjector, request: LoggedRequest) -> PlainResponse:
        return PlainResponse(429, b'{"message": "Too Many Requests"}')

    def server_error(self, injector: FaultInjector, request: LoggedRequest) -> PlainResponse:
        status = injector.choice([500, 502, 503])
        if status == 500:
            return PlainResponse(500, b'{"message": "Internal Server Error"}')
        reason = {502: b"Bad Gateway", 503: b"Service Unavailable"}[status]
        return PlainResponse(status, b"<html><body><h1>%d %s</h1></body></html>" % (status, reason),
                             content_type=b"text/html")

    def gateway_timeout(self, injector: FaultInjector, request: LoggedRequest) -> PlainResponse:
        return PlainResponse(504, b"<html><body><h1>504 Gateway Timeout</h1></body></html>", content_type=b"text/html")


def reset_connection(send: Callable[..., Awaitable[None]]) -> bool:
    """Drop the connection under uvicorn's `send` with a TCP RST and no answer; False when there is no transport."""
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        return False
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # the peer is gone already; abort below is all that is left to do
    transport.abort()
    # uvicorn would otherwise log "ASGI callable returned without starting response" and write a 500 into the
    # aborted transport; the connection is gone, which is what its own connection_lost will record a moment later.
    cycle.disconnected = True
    return True


Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


class FaultMiddleware:
    """Outermost ASGI layer of a fake: reads the request, draws a fault, answers or forwards, logs the request."""

    def __init__(self, app: Callable[..., Awaitable[None]], injector: FaultInjector, log: RequestLog,
                 responses: FaultResponses) -> None:
        self.app = app
        self.injector = injector
        self.log = log
        self.responses = responses
        self.stopping = asyncio.Event()  # set when the server stops: timeouts stop waiting

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
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
        entry = LoggedRequest(
            method=scope["method"], path=scope["path"], query=scope.get("query_string", b"").decode("latin-1"),
            headers={k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
            body=bytes(body) if self.log.keep_bodies else b"", at=time.time())
        body = bytes(body)
        plan = self.injector.plan
        if plan.latency_seconds > 0:
            await self._sleep(plan.latency_seconds)
        fault = self.injector.draw(entry.method, entry.path)
        entry.fault = fault
        self.log.append(entry)  # in arrival order; status and response are filled in below
        if fault is None:
            await self._forward(scope, body, entry, send, capture=False)
        elif fault is Fault.THROTTLE:
            await self._answer(send, entry, self.responses.throttled(self.injector, entry))
        elif fault is Fault.SERVER_ERROR:
            await self._answer(send, entry, self.responses.server_error(self.injector, entry))
        elif fault is Fault.TIMEOUT:
            await self._sleep(plan.delay_seconds)
            await self._answer(send, entry, self.responses.gateway_timeout(self.injector, entry))
        elif fault is Fault.RESET:
            self._reset(send)
        elif fault is Fault.TIMEOUT_APPLIED:
            messages = await self._forward(scope, body, entry, send, capture=True)
            await self._sleep(plan.delay_seconds)
            for message in messages:
                await send(message)
        elif fault is Fault.RESET_APPLIED:
            await self._forward(scope, body, entry, send, capture=True)
            self._reset(send)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass

    def _reset(self, send: Send) -> None:
        if not reset_connection(send):
            raise ConnectionResetError("fault injected: connection reset (no uvicorn transport to abort)")

    async def _forward(self, scope: dict[str, Any], body: bytes, entry: LoggedRequest, send: Send, capture: bool
                       ) -> list[dict[str, Any]]:
        """Run the app on the buffered body; its messages go to the client unless `capture` keeps them back."""
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await self.stopping.wait()
            return {"type": "http.disconnect"}

        captured: list[dict[str, Any]] = []

        async def record(message: dict[str, Any]) -> None:
            # the log is complete before the client has the answer, so a test reading it right after never races
            if message["type"] == "http.response.start":
                entry.status = message["status"]
            elif message["type"] == "http.response.body" and self.log.keep_bodies:
                entry.response += message.get("body", b"")
            if capture:
                captured.append(message)
            else:
                await send(message)

        await self.app(scope, replay, record)
        return captured

    async def _answer(self, send: Send, entry: LoggedRequest, answer: PlainResponse) -> None:
        entry.status = answer.status
        entry.response = answer.body if self.log.keep_bodies else b""
        headers = [(b"content-type", answer.content_type), (b"content-length", str(len(answer.body)).encode()),
                   *answer.headers]
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})
