from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from live_server import IdSyncClient, LiveServer


@pytest.fixture
def server(tmp_path) -> Iterator[LiveServer]:
    live = LiveServer(tmp_path / "idmesh.duckdb").start()
    yield live
    live.stop()


@pytest.fixture
def idsync(server: LiveServer) -> Iterator[Callable[..., IdSyncClient]]:
    """`idsync(settings)` creates a workspace with those settings and returns a client for it."""
    clients: list[IdSyncClient] = []

    def make(settings: dict[str, Any] | None = None) -> IdSyncClient:
        client = IdSyncClient(server, server.create_workspace(settings))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
