"""Delayed aliases wait for their delay, then the scheduler's job processes them (A2.10)."""

from __future__ import annotations

import asyncio
import time

from live_server import IdSyncClient, LiveServer


def test_delayed_alias_stays_pending_until_due_then_copies_first_seen_once(server: LiveServer):
    client = IdSyncClient(server, server.create_workspace({"strategy": "profile_link",
                                                           "alias": {"delay_seconds": 1}}))
    source = client.identify({"ios_idfv": "device-1"})["mpid"]
    time.sleep(0.01)
    destination = client.login({"customerid": "c-1", "ios_idfv": "device-1"})["mpid"]
    assert client.alias(source, destination).status_code == 202
    cur = server.service.connection.cursor()

    def state() -> tuple:
        status = cur.execute("SELECT status FROM aliases").fetchone()[0]
        first_seen = dict(cur.execute("SELECT mpid, first_seen_ms FROM profiles").fetchall())
        return status, first_seen[int(source)] == first_seen[int(destination)]

    loop = server.loop
    assert asyncio.run_coroutine_threadsafe(server.service.process_due_aliases(), loop).result() == 0
    assert state() == ("pending", False)
    time.sleep(1.1)
    assert asyncio.run_coroutine_threadsafe(server.service.process_due_aliases(), loop).result() == 1
    assert state() == ("processed", True)
    assert asyncio.run_coroutine_threadsafe(server.service.process_due_aliases(), loop).result() == 0
    server.restart()
    assert server.service.aliases.due(int(time.time() * 1000)) == []
    client.close()
