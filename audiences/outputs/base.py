"""What every destination implements (docs/delivery.md, "Outputs"), and the policy they share: how an HTTP answer
or a transport error becomes an outcome, how long to wait before trying again, and the httpx client they send
with.

An output is built per connection (`OutputFactory(connection, audience)`) and owns what it sends with (an
httpx client, a Kafka producer) until `aclose`: each connection flushes in its own task with its own client, so
one slow destination never holds a connection pool another one needs.

Retries happen in the outbox, not inside `deliver`: a delta that should be tried again is answered with
`RetryLater`, the outbox stamps its `next_attempt_ms` with `retry_delay` and the next flush takes it when due. So a
retry survives a restart, and a failing destination never keeps a flush task busy sleeping.
"""

from __future__ import annotations

import email.utils
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import httpx

if TYPE_CHECKING:  # audiences/connections.py imports nothing of the outputs; this keeps it that way at runtime
    from audiences.connections import Connection

USER_AGENT = "idmesh/0.1 (audience delivery)"


def seconds_from_env(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable `name`, else `default`; a value that is not one
    is a ValueError naming the variable (the server refuses to start rather than run with a setting it ignored)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise ValueError(f"{name}={raw!r} is not a positive number of seconds")
    return value


# Connect and pool waits are short: a destination that does not accept a connection in seconds is down, and the
# deltas are retried later. Reads may be slow (a bulk upload is processed before the answer comes):
# IDMESH_DELIVERY_TIMEOUT_SECONDS (default 30) bounds them.
_READ_SECONDS = seconds_from_env("IDMESH_DELIVERY_TIMEOUT_SECONDS", 30.0)
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=_READ_SECONDS, write=_READ_SECONDS, pool=5.0)

# Statuses that say "not now" rather than "never": request timeout, too early, rate limited, server trouble.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})

Op = Literal["add", "remove"]


@dataclass(frozen=True)
class Delta:
    """One pending change of one member at one destination (a row of `delivery_outbox`).

    `identifiers` are what to send, normalized and hashed by audiences/fanout.py when the row was made; for a
    remove they are what the acknowledged add named. `held_identifiers` are what the destination was last
    acknowledged to hold for the member ({} when nothing): an add whose identifiers changed names the new ones,
    and an output keyed by identifier (a Facebook row) removes the held ones the new add no longer names."""

    seq: int
    mpid: int
    op: Op
    identifiers: dict[str, str]
    attributes: dict[str, object] = field(default_factory=dict)
    changed_ms: int = 0      # when the membership change behind it happened
    attempts: int = 0        # requests that carried it before this one
    held_identifiers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Acknowledged:
    """The destination applied the delta."""

    status: int | None = None   # HTTP status of the answer, for delivery_attempts (None: not HTTP, or no answer)


@dataclass(frozen=True)
class RetryLater:
    """Not applied, try again: 429, 5xx, timeouts, resets, throttling codes. `after_seconds` is the wait the
    destination asked for (Retry-After and the like); None leaves it to exponential backoff."""

    reason: str
    after_seconds: float | None = None
    status: int | None = None


@dataclass(frozen=True)
class Rejected:
    """Never going to be applied as sent (invalid token, a 400 naming the item): the delta leaves the outbox and
    the failure is recorded."""

    reason: str
    status: int | None = None


Outcome = Acknowledged | RetryLater | Rejected


class Output(Protocol):
    """One destination kind. `deliver` answers one outcome per delta, in the same order, and never raises for
    anything the destination did: an exception there counts as `RetryLater` for the whole batch."""

    kind: str

    def batch_limit(self, connection: Connection) -> int:
        """At most this many deltas per `deliver` call."""
        ...

    async def deliver(self, connection: Connection, deltas: list[Delta]) -> list[Outcome]: ...

    async def aclose(self) -> None:
        """Release what the output sends with (client, producer)."""
        ...


@dataclass(frozen=True)
class AudienceRef:
    """The audience a connection delivers, as outputs name it to partners (Braze segment attributes, webhook
    messages, Kafka records)."""

    id: int
    name: str
    external_name: str


# Built when a connection's flush task starts, and again when the connection (its updated_ms) or the audience's
# names change; the class of an output is usually its factory: `WebhookOutput(connection, audience)`.
OutputFactory = Callable[["Connection", AudienceRef], Output]


# --- retry policy ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: the n-th retry waits base * 2**(n-1), at most `max_seconds`, multiplied by
    a random factor in [1 - jitter, 1] so connections failing together do not come back together. A wait the
    destination asked for is honoured (never shortened), up to `max_requested_seconds`."""

    base_seconds: float = 2.0
    max_seconds: float = 600.0
    jitter: float = 0.5
    max_requested_seconds: float = 86_400.0

    def backoff(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the `attempts`-th failed attempt (1 for the first failure)."""
        exponent = max(0, attempts - 1)
        ceiling = self.max_seconds if exponent >= 64 else min(self.max_seconds, self.base_seconds * 2.0 ** exponent)
        return ceiling * (1.0 - self.jitter * (rng or random).random())


# IDMESH_DELIVERY_RETRY_MAX_SECONDS caps the backoff (default 600 s; a wait the destination asks for is still
# honoured in full)
DEFAULT_RETRY = RetryPolicy(max_seconds=seconds_from_env("IDMESH_DELIVERY_RETRY_MAX_SECONDS", 600.0))


def retry_delay(attempts: int, after_seconds: float | None, policy: RetryPolicy = DEFAULT_RETRY,
                rng: random.Random | None = None) -> float:
    """Seconds before a delta that failed for the `attempts`-th time is tried again."""
    if after_seconds is not None and after_seconds >= 0:
        # a little jitter above the asked wait: many deltas told "retry after 10 s" should not all return at once
        return min(after_seconds, policy.max_requested_seconds) * (1.0 + 0.1 * (rng or random).random())
    return policy.backoff(attempts, rng)


def retry_after_seconds(response: httpx.Response, now: float | None = None) -> float | None:
    """The wait a response asks for, in seconds: `Retry-After` (seconds or an HTTP date), else
    `X-RateLimit-Retry-After` (seconds), else, when the answer is a 429, `X-RateLimit-Reset` (epoch seconds) minus
    now. None when it asks for nothing, and for values that do not parse."""
    clock = time.time() if now is None else now
    headers = response.headers
    value = headers.get("retry-after")
    if value is not None:
        seconds = _seconds(value)
        if seconds is not None:
            return seconds
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            when = None
        if when is not None and when.tzinfo is not None:
            return max(0.0, when.timestamp() - clock)
    value = headers.get("x-ratelimit-retry-after")
    if value is not None and (seconds := _seconds(value)) is not None:
        return seconds
    value = headers.get("x-ratelimit-reset")
    if response.status_code == 429 and value is not None and (reset := _seconds(value)) is not None:
        return max(0.0, reset - clock)
    return None


def _seconds(value: str) -> float | None:
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 and seconds == seconds and seconds != float("inf") else None


# --- classifying answers --------------------------------------------------------------------------------------

def outcome_of_status(response: httpx.Response) -> Outcome:
    """The outcome of a whole request from its status alone: 2xx acknowledged, 408/425/429/5xx retried (with
    the wait the answer asks for), any other status rejected. Outputs whose answers say more per item (Braze
    `errors[]`, Facebook error codes) look at the body first and use this for the rest."""
    status = response.status_code
    if 200 <= status < 300:
        return Acknowledged(status)
    reason = f"HTTP {status}{_excerpt(response)}"
    if status in RETRYABLE_STATUSES or status >= 500:
        return RetryLater(reason, retry_after_seconds(response), status)
    return Rejected(reason, status)


def outcome_of_error(exc: Exception) -> RetryLater:
    """A request that got no answer (timeout, refused or reset connection, broken protocol) is tried again: the
    destination may or may not have applied it, and every operation sent is idempotent there."""
    kind = type(exc).__name__
    detail = str(exc).strip()
    return RetryLater(f"{kind}: {detail}"[:500] if detail else kind)


def _excerpt(response: httpx.Response, limit: int = 300) -> str:
    """The start of an error body, for `last_error`; bodies are the destination's, never our secrets."""
    try:
        text = response.text.strip()
    except (httpx.ResponseNotRead, UnicodeDecodeError):
        return ""
    return f": {text[:limit]}" if text else ""


# --- the client -----------------------------------------------------------------------------------------------

def http_client(base_url: str = "", timeout: httpx.Timeout | float | None = None,
                headers: dict[str, str] | None = None, max_connections: int = 4) -> httpx.AsyncClient:
    """The httpx client one connection sends with: its own pool (a few connections: one flush task sends one
    request at a time, the rest are spare for a slow close), bounded timeouts, no redirects followed (a
    redirected upload would be sent again to wherever the destination points) and no environment proxies or
    netrc credentials picked up by accident."""
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
        headers={"User-Agent": USER_AGENT, **(headers or {})},
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                            keepalive_expiry=30.0),
        follow_redirects=False,
        trust_env=False,
    )
