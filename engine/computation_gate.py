"""Keeping erasures (and closing the store) apart from computations of derived per-profile rows.

A calculated attribute computation (engine/ca_engine.py) reads profiles' events and writes their value rows in
its own DuckDB transaction, outside the group commit. An erasure (engine/erasure.py) deletes the same rows in
a writer transaction. Run side by side they go wrong in two ways:
- both delete the same row: DuckDB refuses the second ("Conflict on tuple deletion"), so either the
  computation fails or the erasure's group commit does, answering 503 to every request in it and reloading
  the identity graphs;
- the computation read the person's events before the erasure committed and writes after it: a value row
  for an MPID that no longer exists, which nothing would ever delete.

So computations share this gate and an erasure holds it alone, from before it plans (the in-memory forgetting)
until its commit. A computation then runs wholly before the erasure (which deletes what it wrote) or wholly
after it (and finds no events or seeds of the erased MPID, so writes no row for it). Closing the store holds
it alone too: DuckDB refuses to close a connection while one of its cursors is busy. One waiting to hold the
gate alone goes before computations that have not started yet, so a steady stream of incremental refreshes
cannot starve an erasure.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager


class ComputationGate:
    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._computing = 0
        self._exclusive = False
        self._exclusive_waiting = 0

    @property
    def exclusive_waiting(self) -> bool:
        """Someone waits for the running computations to end (tests use it to order their steps)."""
        with self._condition:
            return self._exclusive_waiting > 0

    @contextmanager
    def computing(self) -> Iterator[None]:
        """Held by a computation, in its worker thread, around its reads and its transaction."""
        with self._condition:
            self._condition.wait_for(lambda: not self._exclusive and not self._exclusive_waiting)
            self._computing += 1
        try:
            yield
        finally:
            with self._condition:
                self._computing -= 1
                self._condition.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Held on the event loop while no computation may run: waits for the running ones to end."""
        acquiring = asyncio.ensure_future(asyncio.to_thread(self._acquire_exclusive))
        try:
            await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            # the thread still gets the gate once the computations end: give it back then, or it stays shut
            acquiring.add_done_callback(self._release_if_acquired)
            raise
        try:
            yield
        finally:
            self._release_exclusive()

    def _acquire_exclusive(self) -> None:
        with self._condition:
            self._exclusive_waiting += 1
            try:
                self._condition.wait_for(lambda: not self._exclusive and not self._computing)
            finally:
                self._exclusive_waiting -= 1
            self._exclusive = True

    def _release_exclusive(self) -> None:
        with self._condition:
            self._exclusive = False
            self._condition.notify_all()

    def _release_if_acquired(self, acquiring: asyncio.Future[None]) -> None:
        if not acquiring.cancelled() and acquiring.exception() is None:
            self._release_exclusive()
