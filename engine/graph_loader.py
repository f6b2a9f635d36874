"""Builds the in-memory identity graphs from a column snapshot of the store, without per-row SQL."""

from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.compute as pc

from engine.graph import IdentityGraph, ProfileRecord
from engine.store import GraphSnapshot


def _interned_column(column: pa.ChunkedArray) -> list[str]:
    """Strings that repeat (scopes, identity types) become one shared object each."""
    encoded = pc.dictionary_encode(column).combine_chunks()
    words = [sys.intern(w) for w in encoded.dictionary.to_pylist()]
    return [words[i] for i in encoded.indices.to_pylist()]


def build_graphs(snapshot: GraphSnapshot) -> dict[str, IdentityGraph]:
    graphs: dict[str, IdentityGraph] = {}
    p = snapshot.profiles
    scopes = _interned_column(p.column("scope"))
    for scope, mpid, created, last_seen, status in zip(
            scopes, p.column("mpid").to_pylist(), p.column("created_ms").to_pylist(),
            p.column("last_seen_ms").to_pylist(), p.column("status").to_pylist()):
        graph = graphs.get(scope)
        if graph is None:
            graph = graphs[scope] = IdentityGraph(scope)
        graph.profiles[mpid] = ProfileRecord(mpid, created, last_seen, (), status == "orphaned")

    ident = snapshot.identities  # ordered by mpid, so each profile's identities arrive together
    current: ProfileRecord | None = None
    flat: list[str] = []
    graph = None
    for scope, mpid, identity_type, value in zip(
            _interned_column(ident.column("scope")), ident.column("mpid").to_pylist(),
            _interned_column(ident.column("identity_type")), ident.column("value").to_pylist()):
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

    h = snapshot.hub_values
    for scope, identity_type, value in zip(h.column("scope").to_pylist(), h.column("identity_type").to_pylist(),
                                           h.column("value").to_pylist()):
        graphs.setdefault(scope, IdentityGraph(scope)).quarantined.add((identity_type, value))
    return graphs
