"""A real idmesh server on a loopback port, in a thread of the test process, over a real DuckDB file."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from api.app import create_app
from engine.idsync import IdSyncService

ADMIN_TOKEN = "test-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class WorkspaceCredentials:
    id: str
    api_key: str
    api_secret: str


class LiveServer:
    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None
        self._server: uvicorn.Server | None = None
        self.service: IdSyncService | None = None

    def start(self) -> LiveServer:
        self.service = IdSyncService.open(str(self.db_path))
        self.app = create_app(self.service, ADMIN_TOKEN)  # tests reach app.state (e.g. the DSR service)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()  # tests schedule service coroutines on it
        await self._server.serve()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=20)
            self.service.close()
            self._server = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def query(self, sql: str, *params: Any) -> list[tuple]:
        """Rows of a query on the server's own database (a cursor is its own DuckDB connection)."""
        cursor = self.service.connection.cursor()
        try:
            return cursor.execute(sql, list(params)).fetchall()
        finally:
            cursor.close()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=20)

    def create_workspace(self, settings: dict[str, Any] | None = None, name: str = "test") -> WorkspaceCredentials:
        with self.client() as client:
            response = client.post("/platform/v2/workspaces", json={"name": name, "settings": settings or {}},
                                   headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            response.raise_for_status()
            body = response.json()
        return WorkspaceCredentials(body["id"], body["api_key"], body["api_secret"])


class IdSyncClient:
    """Calls the IDSync endpoints as an SDK would, with Basic auth, and returns parsed answers."""

    def __init__(self, server: LiveServer, workspace: WorkspaceCredentials) -> None:
        self.http = server.client()
        self.auth = (workspace.api_key, workspace.api_secret)

    def call(self, path: str, body: dict[str, Any], **params: Any) -> httpx.Response:
        return self.http.post(path, json=body, auth=self.auth, params=params)

    def _identity(self, operation: str, identities: dict[str, Any], previous_mpid: str | None, **params: Any
                  ) -> httpx.Response:
        body = {"environment": "production", "known_identities": identities, "previous_mpid": previous_mpid}
        return self.call(f"/v1/{operation}", body, **params)

    def identify(self, identities: dict[str, Any], previous_mpid: str | None = None, **params: Any) -> dict:
        return _ok(self._identity("identify", identities, previous_mpid, **params))

    def login(self, identities: dict[str, Any], previous_mpid: str | None = None, **params: Any) -> dict:
        return _ok(self._identity("login", identities, previous_mpid, **params))

    def logout(self, identities: dict[str, Any], previous_mpid: str | None = None, **params: Any) -> dict:
        return _ok(self._identity("logout", identities, previous_mpid, **params))

    def raw(self, operation: str, identities: dict[str, Any], **params: Any) -> httpx.Response:
        return self._identity(operation, identities, None, **params)

    def search(self, identities: dict[str, Any]) -> httpx.Response:
        return self.call("/v1/search", {"environment": "production", "known_identities": identities})

    def modify(self, mpid: str, changes: list[dict[str, Any]]) -> httpx.Response:
        return self.call(f"/v1/{mpid}/modify", {"environment": "production", "identity_changes": changes})

    def alias(self, source: str, destination: str, **times: Any) -> httpx.Response:
        data = {"source_mpid": source, "destination_mpid": destination, **times}
        return self.call("/v1/alias", {"request_type": "alias", "environment": "production", "data": data})

    def close(self) -> None:
        self.http.close()


def _ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()
