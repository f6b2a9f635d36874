"""Alias processing copies the source's events inside the window and its first-seen; unalias undoes exactly that."""

from __future__ import annotations

import time

from live_server import IdSyncClient, LiveServer


def send_events(client: IdSyncClient, mpid: str, names_and_times: list[tuple[str, int]]) -> None:
    events = [{"event_type": "custom_event", "data": {"event_name": n, "timestamp_unixtime_ms": t}}
              for n, t in names_and_times]
    response = client.call("/v2/events", {"mpid": mpid, "events": events})
    assert response.status_code == 202, response.text


def event_names(server: LiveServer, mpid: str) -> list[tuple]:
    return server.query("SELECT event_name, copied_from_mpid FROM events WHERE mpid = ? ORDER BY timestamp_ms, event_name",
                int(mpid))


def first_seen(server: LiveServer, mpid: str) -> int:
    return server.query("SELECT first_seen_ms FROM profiles WHERE mpid = ?", int(mpid))[0][0]


def test_alias_copies_events_in_window_and_unalias_removes_exactly_the_copies(server: LiveServer, idsync):
    client = idsync({"strategy": "profile_link"})
    now = int(time.time() * 1000)
    anonymous = client.identify({"ios_idfv": "device-1"})["mpid"]
    send_events(client, anonymous, [("too old", now - 5000), ("browsed", now - 3000), ("carted", now - 2000),
                                    ("after window", now - 500)])
    time.sleep(0.01)
    known = client.login({"customerid": "c-1", "ios_idfv": "device-1"})["mpid"]
    assert known != anonymous
    send_events(client, known, [("purchased", now - 1000)])
    destination_first_seen = first_seen(server, known)

    response = client.alias(anonymous, known, start_unixtime_ms=now - 4000, end_unixtime_ms=now - 1500)
    assert response.status_code == 202, response.text
    alias = response.json()
    assert alias["status"] == "processed"
    assert event_names(server, known) == [("browsed", int(anonymous)), ("carted", int(anonymous)),
                                          ("purchased", None)]
    assert first_seen(server, known) == first_seen(server, anonymous) < destination_first_seen
    assert len(event_names(server, anonymous)) == 4  # the source keeps its own events
    assert server.query("SELECT action, copied_events FROM alias_effects") == [("processed", 2)]

    # events that arrive after processing are the destination's own and survive unalias
    send_events(client, known, [("returned", now)])
    undone = client.call("/v1/unalias", {"alias_id": alias["alias_id"]})
    assert undone.status_code == 200, undone.text
    assert event_names(server, known) == [("purchased", None), ("returned", None)]
    assert first_seen(server, known) == destination_first_seen
    assert server.query("SELECT status FROM aliases") == [("unaliased",)]
    assert server.query("SELECT action, copied_events FROM alias_effects ORDER BY at_ms, action") == [
        ("processed", 2), ("unaliased", 2)]
    again = client.call("/v1/unalias", {"alias_id": alias["alias_id"]})
    assert again.status_code == 404

    # the source may be aliased again once its alias was undone; survives a restart
    server.restart()
    redo = client.alias(anonymous, known, start_unixtime_ms=now - 4000, end_unixtime_ms=now - 1500)
    assert redo.status_code == 202, redo.text
    assert len(event_names(server, known)) == 4


def test_unalias_by_pair_and_its_errors(server: LiveServer, idsync):
    client = idsync({"strategy": "profile_link", "alias": {"delay_seconds": 3600}})
    source = client.identify({"ios_idfv": "d-2"})["mpid"]
    destination = client.login({"customerid": "c-2", "ios_idfv": "d-2"})["mpid"]
    send_events(client, source, [("seen", int(time.time() * 1000))])
    assert client.alias(source, destination).json()["status"] == "pending"
    pair = {"data": {"source_mpid": source, "destination_mpid": destination}}
    other = idsync({"strategy": "profile_link"})
    assert other.call("/v1/unalias", pair).status_code == 404  # another workspace's alias is invisible
    with server.client() as anonymous:
        assert anonymous.post("/v1/unalias", json=pair, headers={"x-mp-key": client.auth[0]}).status_code == 401
    assert client.call("/v1/unalias", {"data": {"source_mpid": "x"}}).status_code == 400
    cancelled = client.call("/v1/unalias", pair)
    assert cancelled.status_code == 200 and cancelled.json()["unaliased"][0]["source_mpid"] == source
    assert server.query("SELECT count(*) FROM events WHERE mpid = ?", int(destination)) == [(0,)]
    assert server.service.aliases.due(int(time.time() * 1000) + 7_200_000) == []  # never processed later
