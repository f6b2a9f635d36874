"""Builds the in-memory identity graphs from the store's row streams, batch by batch."""

from __future__ import annotations

import gc
import logging
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc

from engine.graph import IdentityGraph, ProfileRecord
from engine.store import GraphSnapshot

log = logging.getLogger("idmesh.graph")


def _interned_column(column: pa.Array) -> list[str]:
    """Strings that repeat (scopes, identity types) become one shared object each."""
    encoded = pc.dictionary_encode(column)
    words = [sys.intern(w) for w in encoded.dictionary.to_pylist()]
    return [words[i] for i in encoded.indices.to_pylist()]


def build_graphs(snapshot: GraphSnapshot) -> dict[str, IdentityGraph]:
    # Millions of long-lived objects: cyclic GC passes during the build only cost time, and afterwards they
    # would rescan the whole graph now and then (a pause of most of a second at 1M profiles). Freezing moves
    # the graph out of the collector's view.
    started = time.monotonic()
    log.info("loading the identity graphs")  # start-up time is mostly this: seconds at a million profiles
    gc.disable()
    try:
        graphs = _build(snapshot)
    finally:
        gc.enable()
    gc.freeze()
    log.info("loaded the identity graphs: %d profiles in %.1f s", sum(len(g.profiles) for g in graphs.values()),
             time.monotonic() - started)
    return graphs


def _build(snapshot: GraphSnapshot) -> dict[str, IdentityGraph]:
    graphs: dict[str, IdentityGraph] = {}
    for batch in snapshot.profiles:
        for scope, mpid, created, last_seen, status in zip(
                _interned_column(batch.column("scope")), batch.column("mpid").to_pylist(),
                batch.column("created_ms").to_pylist(), batch.column("last_seen_ms").to_pylist(),
                batch.column("status").to_pylist()):
            graph = graphs.get(scope)
            if graph is None:
                graph = graphs[scope] = IdentityGraph(scope)
            graph.profiles[mpid] = ProfileRecord(mpid, created, last_seen, (), status == "orphaned")

    current: ProfileRecord | None = None  # identities arrive ordered by mpid, a profile's rows together
    flat: list[str] = []
    graph: IdentityGraph | None = None
    for batch in snapshot.identities:
        for scope, mpid, identity_type, value in zip(
                _interned_column(batch.column("scope")), batch.column("mpid").to_pylist(),
                _interned_column(batch.column("identity_type")), batch.column("value").to_pylist()):
            if current is None or mpid != current.mpid:
                if current is not None:
                    current.identities = tuple(flat)
                graph = graphs[scope]
                current = graph.profiles[mpid]
                flat = []
            flat += (identity_type, value)
            graph.index_add(identity_type, value, current.mpid)
    if current is not None:
        current.identities = tuple(flat)

    for batch in snapshot.hub_values:
        for scope, identity_type, value in zip(batch.column("scope").to_pylist(),
                                               batch.column("identity_type").to_pylist(),
                                               batch.column("value").to_pylist()):
            graphs.setdefault(scope, IdentityGraph(scope)).quarantined.add((identity_type, value))
    return graphs
