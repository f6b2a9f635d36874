"""Audiences and connections named in `idmesh serve --config` (data/demo.json): each workspace entry may list
`audiences` (the Platform API's create body), each with `connections` (the connections API's create body). The
ones missing (matched by name) are created before the server starts, through the same registries and group
commit as the API, so `make run` shows an audience syncing to a local sink without a setup step."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI


async def ensure_audiences(app: FastAPI, workspaces: list[dict[str, Any]]) -> list[str]:
    """Create what the config lists and is missing. Returns a line per thing created, for the start-up output.
    A bad entry raises BadRequest naming its field, as the API would answer it."""
    service = app.state.service
    created: list[str] = []
    for entry in workspaces:
        workspace = service.workspaces.by_api_key(entry.get("api_key", ""))
        if workspace is None:
            continue
        for body in entry.get("audiences", []):
            wanted = {k: v for k, v in body.items() if k != "connections"}
            found = app.state.audiences.list(workspace.id, name=wanted.get("name"))
            if found:
                audience = found[0]
            else:
                audience, batch = app.state.audiences.plan_create(workspace.id, wanted)
                await service.commit(batch)
                app.state.audiences.remember(audience)
                created.append(f"audience {audience.name!r}: id={audience.id}")
            for connection_body in body.get("connections", []):
                name = connection_body.get("name") or connection_body.get("output")
                if any(c.name == name for c in app.state.connections.list(workspace.id, audience.id)):
                    continue
                connection, batch = app.state.connections.plan_create(workspace.id, audience.id, connection_body)
                await service.commit(batch)
                app.state.connections.remember(connection)
                created.append(f"connection {connection.name!r} ({connection.output}) of audience "
                               f"{audience.name!r}: id={connection.id}")
    return created
