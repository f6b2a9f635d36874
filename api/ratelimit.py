"""Per-workspace token buckets (spec A2.9): off unless a workspace sets `rate_limit`."""

from __future__ import annotations

import math
import time

from engine.errors import Throttled
from engine.settings import RateLimit

MAX_RETRY_AFTER_S = (1 << 31) - 1  # what clients that read Retry-After as a 32-bit integer can hold


class TokenBuckets:
    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}  # workspace id -> (tokens, last refill time)

    def take(self, workspace_id: str, limit: RateLimit | None) -> None:
        if limit is None:
            return
        now = time.monotonic()
        tokens, last = self._state.get(workspace_id, (float(limit.burst), now))
        tokens = min(float(limit.burst), tokens + (now - last) * limit.requests_per_second)
        if tokens < 1.0:
            self._state[workspace_id] = (tokens, now)
            # capped: with a tiny rate the division overflows to infinity, which has no integer ceiling
            wait = math.ceil(min((1.0 - tokens) / limit.requests_per_second, MAX_RETRY_AFTER_S))
            raise Throttled("rate limit exceeded for this workspace", retry_after_s=max(1, wait))
        self._state[workspace_id] = (tokens - 1.0, now)
