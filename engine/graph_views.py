"""networkx views over the identity graph: one profile's neighbourhood, and the hub report."""

from __future__ import annotations

import math
from html import escape
from typing import Any

import networkx as nx

from engine.aliasing import AliasRecord
from engine.errors import NotFound
from engine.graph import IdentityGraph
from engine.identity_types import is_device_type


def profile_graph(graph: IdentityGraph, mpid: int, aliases: list[AliasRecord]) -> nx.Graph:
    """The profile, its identities, the profiles that share a device id with it, and its aliases."""
    record = graph.get(mpid)
    if record is None:
        raise NotFound(f"no profile with mpid {mpid} in this workspace", field="mpid")
    g = nx.Graph()
    g.add_node(("profile", mpid), kind="profile", mpid=mpid, orphaned=record.orphaned, focus=True)
    for identity_type, value in record.identity_keys():
        node = ("identity", identity_type, value)
        g.add_node(node, kind="identity", identity_type=identity_type, value=value,
                   quarantined=(identity_type, value) in graph.quarantined)
        g.add_edge(("profile", mpid), node, kind="holds")
        if not is_device_type(identity_type):
            continue
        for other in graph.holders(identity_type, value):
            if other != mpid:
                g.add_node(("profile", other), kind="profile", mpid=other, orphaned=graph.profiles[other].orphaned,
                           focus=False)
                g.add_edge(("profile", other), node, kind="holds")
    for alias in aliases:
        for other in (alias.source_mpid, alias.destination_mpid):
            if other != mpid:
                g.add_node(("profile", other), kind="profile", mpid=other, focus=False,
                           orphaned=bool(graph.get(other) and graph.profiles[other].orphaned))
        g.add_edge(("profile", alias.source_mpid), ("profile", alias.destination_mpid), kind="alias",
                   alias_id=alias.alias_id, source=alias.source_mpid, destination=alias.destination_mpid,
                   start_ms=alias.start_ms, end_ms=alias.end_ms)
    return g


def profile_graph_json(g: nx.Graph, mpid: int) -> dict[str, Any]:
    identities, neighbours, alias_edges = [], {}, []
    for node, data in g.nodes(data=True):
        if data["kind"] == "identity":
            if g.has_edge(("profile", mpid), node):
                identities.append({"type": data["identity_type"], "value": data["value"],
                                   "quarantined": data["quarantined"]})
            for other in g.neighbors(node):
                if other[1] != mpid:
                    neighbours.setdefault(other[1], []).append({"type": data["identity_type"],
                                                                "value": data["value"]})
    for _, _, data in g.edges(data=True):
        if data["kind"] == "alias":
            alias_edges.append({"alias_id": data["alias_id"], "source_mpid": str(data["source"]),
                                "destination_mpid": str(data["destination"]), "start_unixtime_ms": data["start_ms"],
                                "end_unixtime_ms": data["end_ms"]})
    return {"mpid": str(mpid), "identities": identities,
            "neighbours": [{"mpid": str(m), "shared_identities": s} for m, s in sorted(neighbours.items())],
            "aliases": alias_edges,
            "nodes": g.number_of_nodes(), "edges": g.number_of_edges()}


def profile_graph_svg(g: nx.Graph, mpid: int) -> str:
    """A radial picture: the profile in the middle, its identities around it, linked profiles outside."""
    size, centre = 640, 320
    positions: dict[Any, tuple[float, float]] = {("profile", mpid): (centre, centre)}
    identities = [n for n, d in g.nodes(data=True) if d["kind"] == "identity"]
    others = [n for n, d in g.nodes(data=True) if d["kind"] == "profile" and n[1] != mpid]
    for ring, nodes, radius in ((0, identities, 140), (1, others, 270)):
        for i, node in enumerate(nodes):
            angle = 2 * math.pi * i / max(1, len(nodes)) + ring * 0.3
            positions[node] = (centre + radius * math.cos(angle), centre + radius * math.sin(angle))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
             f'viewBox="0 0 {size} {size}" font-family="sans-serif" font-size="11">',
             '<rect width="100%" height="100%" fill="white"/>']
    for u, v, data in g.edges(data=True):
        (x1, y1), (x2, y2) = positions[u], positions[v]
        dash = ' stroke-dasharray="6 4"' if data["kind"] == "alias" else ""
        parts.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#888"{dash}/>')
    for node, data in g.nodes(data=True):
        x, y = positions[node]
        if data["kind"] == "profile":
            fill = "#d62728" if data.get("orphaned") else "#1f77b4" if data.get("focus") else "#9ecae1"
            label = f"MPID {data['mpid']}"
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="16" fill="{fill}"/>')
        else:
            fill = "#ff7f0e" if data["quarantined"] else "#2ca02c"
            label = f"{data['identity_type']}: {data['value']}"
            parts.append(f'<rect x="{x - 7:.1f}" y="{y - 7:.1f}" width="14" height="14" fill="{fill}"/>')
        parts.append(f'<text x="{x:.1f}" y="{y + 28:.1f}" text-anchor="middle">{escape(label[:48])}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def hub_report(graph: IdentityGraph, limit: int = 20) -> dict[str, Any]:
    """Quarantined values, the most shared values, and the largest groups of profiles glued by shared values."""
    shared = sorted(graph.shared_values(), key=lambda item: -len(item[2]))
    g = nx.Graph()
    for identity_type, value, mpids in shared:
        if (identity_type, value) in graph.quarantined:
            continue  # quarantined values no longer glue profiles together
        first = mpids[0]
        for other in mpids[1:]:
            g.add_edge(first, other)
    components = sorted(nx.connected_components(g), key=len, reverse=True)
    return {
        "quarantined": [{"type": t, "value": v, "profiles": graph.holder_count(t, v)}
                        for t, v in sorted(graph.quarantined)],
        "most_shared_values": [{"type": t, "value": v, "profiles": len(m)} for t, v, m in shared[:limit]],
        "largest_linked_groups": [{"profiles": len(c), "sample_mpids": [str(m) for m in sorted(c)[:5]]}
                                  for c in components[:limit]],
        "profiles": len(graph),
    }
