"""Keeping calculated attribute values current without recomputing everyone.

A profile's value depends only on its own events and the evaluation time, so after a batch the touched
profiles are recomputed from their events, and nobody else changes — except under a `within_last` window,
where a value also changes when its oldest counted event leaves the window. Each profile therefore carries
the time its value next changes by itself (oldest counted event + window, or the first event stamped in the
future that starts to count); `advance` recomputes those that are due.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from typing import Any

import polars as pl

from engine.ca_compute import compute, counted_events
from engine.ca_definitions import Definition

EventsOf = Callable[[list[int]], pl.DataFrame]  # mpids -> all their events, in the compute() frame layout


class IncrementalValues:
    """Values of one definition per profile, kept equal to a full computation at the latest `as_of_ms`."""

    def __init__(self, definition: Definition, events_of: EventsOf) -> None:
        self.definition = definition
        self._events_of = events_of
        self.values: dict[int, Any] = {}
        self._expiry: list[tuple[int, int]] = []          # (expires_at_ms, mpid), may hold stale entries
        self._expires_at: dict[int, int] = {}

    def refresh(self, mpids: Iterable[int], as_of_ms: int) -> None:
        """Recompute these profiles (the ones a batch touched) as of `as_of_ms`."""
        wanted = sorted(set(mpids))
        if not wanted:
            return
        events = self._events_of(wanted)
        fresh = dict(compute(self.definition, events, as_of_ms).iter_rows())
        for mpid in wanted:
            if mpid in fresh:
                self.values[mpid] = fresh[mpid]
            else:
                self.values.pop(mpid, None)
        self._schedule_expiry(events, wanted, as_of_ms)

    def advance(self, as_of_ms: int) -> None:
        """Recompute the profiles whose windowed value changed because time passed."""
        due = []
        while self._expiry and self._expiry[0][0] <= as_of_ms:
            expires_at, mpid = heapq.heappop(self._expiry)
            if self._expires_at.get(mpid) == expires_at:
                del self._expires_at[mpid]
                due.append(mpid)
        self.refresh(due, as_of_ms)

    def _schedule_expiry(self, events: pl.DataFrame, mpids: list[int], as_of_ms: int) -> None:
        for mpid in mpids:
            self._expires_at.pop(mpid, None)
        changes = []
        window = self.definition.time_period.window_ms
        if window is not None:
            # the value changes once the oldest counted event is older than the window
            oldest = counted_events(self.definition, events, as_of_ms).group_by("mpid").agg(
                (pl.col("timestamp_ms").min() + window + 1).alias("at"))
            changes.append(oldest)
        # an event stamped after as_of does not count yet, but will
        future = events.filter(pl.col("timestamp_ms") > as_of_ms).group_by("mpid").agg(
            pl.col("timestamp_ms").min().alias("at"))
        changes.append(future)
        soonest = pl.concat(changes).group_by("mpid").agg(pl.col("at").min())
        for mpid, at in soonest.iter_rows():
            self._expires_at[mpid] = at
            heapq.heappush(self._expiry, (at, mpid))
