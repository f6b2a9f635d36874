"""A workspace on a live server seen from outside: its IDSync client plus read access to what the server holds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from live_server import ADMIN_TOKEN, IdSyncClient, LiveServer

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class WorkspaceProbe:
    def __init__(self, server: LiveServer, settings: dict[str, Any]) -> None:
        self.server = server
        credentials = server.create_workspace(settings)
        self.id = credentials.id
        self.api = IdSyncClient(server, credentials)
        self.admin = server.client()

    def graph(self, mpid: str) -> dict:
        response = self.admin.get(f"/platform/v2/workspaces/{self.id}/profiles/{mpid}/graph", headers=ADMIN)
        assert response.status_code == 200, response.text
        return response.json()

    def holds(self, mpid: str) -> set[tuple[str, str]]:
        """The profile's identities as the platform graph endpoint reports them."""
        return {(i["type"], i["value"]) for i in self.graph(mpid)["identities"]}

    def sql(self, query: str, *params: Any) -> list[tuple]:
        """Read the server's DuckDB file (the public views) after an answer."""
        return self.server.service.connection.cursor().execute(query, list(params)).fetchall()

    def close(self) -> None:
        self.api.close()
        self.admin.close()


def module_server(directory: Path) -> Iterator[LiveServer]:
    """One live server for a whole module (starting one per test costs more than the tests); every test makes its
    own workspace, so tests share nothing but the process. Restarting keeps every workspace, as in production."""
    live = LiveServer(directory / "idmesh.duckdb").start()
    yield live
    live.stop()
