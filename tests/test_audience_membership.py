"""Audience membership on a real DuckDB file: applying evaluation results (enter, exit, re-enter, universe-limited
applies), size points, 24-hour stats, the analyst views and their workspace filter, the Profile API field, the
size chart; and a property test against a plain-Python model of the history."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import duckdb
import polars as pl
import pytest
from audience_seed import apply_audience, definition_row, seed_audience
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import LiveServer

from audiences.membership import (
    AudienceStats,
    Change,
    Membership,
    apply_members,
    audience_stats,
    current_members,
    forget_audience,
    memberships_of,
    size_history,
)
from audiences.size_chart import MAX_MARKERS, size_chart_svg
from engine.analyst_sql import PUBLIC_VIEWS, run_query
from engine.audience_schema import DAY_MS
from engine.store import open_database

WS, OTHER = "ws_alpha", "ws_beta"
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    connection = open_database(str(tmp_path / "idmesh.duckdb"))
    yield connection
    connection.close()


def members(*mpids: int) -> pl.Series:
    return pl.Series("mpid", list(mpids), dtype=pl.Int64)


def apply(cursor: duckdb.DuckDBPyConnection, audience_id: int, mpids: list[int], at_ms: int,
          universe: list[int] | None = None, workspace_id: str = WS) -> Change:
    """One apply in its own transaction, as the writer runs it."""
    cursor.execute("BEGIN")
    change = apply_members(cursor, workspace_id, audience_id, members(*mpids), at_ms, universe)
    cursor.execute("COMMIT")
    return change


def stays(cursor: duckdb.DuckDBPyConnection, audience_id: int, workspace_id: str = WS) -> list[tuple]:
    return cursor.execute("SELECT mpid, entered_ms, exited_ms FROM audience_membership_history "
                          "WHERE workspace_id = ? AND audience_id = ? ORDER BY mpid, entered_ms, exited_ms NULLS LAST",
                          [workspace_id, audience_id]).fetchall()


def sizes(cursor: duckdb.DuckDBPyConnection, audience_id: int) -> list[tuple]:
    return cursor.execute("SELECT at_ms, size, adds, drops FROM audience_sizes WHERE audience_id = ? ORDER BY at_ms",
                          [audience_id]).fetchall()


def define(cursor: duckdb.DuckDBPyConnection, audience_id: int, name: str, workspace_id: str = WS) -> None:
    cursor.execute("INSERT INTO audience_definitions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   definition_row(audience_id, workspace_id, name, 0))


# --- applying --------------------------------------------------------------------------------------------------
def test_enter_exit_and_re_enter_keep_every_stay(db):
    cur = db.cursor()
    assert apply(cur, 1, [10, 20, 30], 1_000) == Change(size=3, adds=3, drops=0)
    assert apply(cur, 1, [20, 30, 40], 2_000) == Change(size=3, adds=1, drops=1)
    assert apply(cur, 1, [10, 20, 30, 40], 3_000) == Change(size=4, adds=1, drops=0)  # 10 comes back
    assert stays(cur, 1) == [(10, 1_000, 2_000), (10, 3_000, None), (20, 1_000, None), (30, 1_000, None),
                             (40, 2_000, None)]
    assert current_members(cur, WS, 1).to_list() == [10, 20, 30, 40]
    assert sizes(cur, 1) == [(1_000, 3, 3, 0), (2_000, 3, 1, 1), (3_000, 4, 1, 0)]
    assert apply(cur, 1, [], 4_000) == Change(size=0, adds=0, drops=4)
    assert current_members(cur, WS, 1).len() == 0 and len(stays(cur, 1)) == 5


def test_a_universe_limited_apply_leaves_everyone_else_alone(db):
    cur = db.cursor()
    apply(cur, 1, [1, 2, 3, 4, 5], 1_000)
    # profiles 2, 3 and 6 were evaluated: 2 stays, 3 leaves, 6 joins; 7 is outside the universe and ignored
    assert apply(cur, 1, [2, 6, 7], 2_000, universe=[2, 3, 6]) == Change(size=5, adds=1, drops=1)
    assert current_members(cur, WS, 1).to_list() == [1, 2, 4, 5, 6]
    assert stays(cur, 1) == [(1, 1_000, None), (2, 1_000, None), (3, 1_000, 2_000), (4, 1_000, None),
                             (5, 1_000, None), (6, 2_000, None)]
    # an empty universe changes nothing and records nothing
    assert apply(cur, 1, [8], 3_000, universe=[]) == Change(size=5, adds=0, drops=0)
    assert sizes(cur, 1) == [(1_000, 5, 5, 0), (2_000, 5, 1, 1)]


def test_audiences_and_workspaces_do_not_touch_each_other(db):
    cur = db.cursor()
    apply(cur, 1, [1, 2], 1_000)
    apply(cur, 2, [2, 3], 1_000)
    apply(cur, 1, [9], 1_000, workspace_id=OTHER)
    apply(cur, 1, [], 2_000)
    assert current_members(cur, WS, 2).to_list() == [2, 3]
    assert current_members(cur, OTHER, 1).to_list() == [9]
    assert current_members(cur, WS, 1).to_list() == []


def test_members_may_repeat_or_hold_nulls_and_come_in_any_integer_type(db):
    cur = db.cursor()
    cur.execute("BEGIN")
    change = apply_members(cur, WS, 1, pl.Series([5, None, 3, 5, 3], dtype=pl.UInt32), 1_000)
    cur.execute("COMMIT")
    assert change == Change(size=2, adds=2, drops=0)
    assert stays(cur, 1) == [(3, 1_000, None), (5, 1_000, None)]


def test_size_points_only_when_the_membership_changes_and_never_backwards(db):
    cur = db.cursor()
    assert apply(cur, 1, [], 1_000) == Change(0, 0, 0)  # the first apply records a point even when empty
    assert apply(cur, 1, [], 2_000) == Change(0, 0, 0)  # nothing changed: no point
    apply(cur, 1, [1], 3_000)
    apply(cur, 1, [1, 2], 3_000)  # the same millisecond: one point, adds summed
    apply(cur, 1, [2], 2_500)  # a clock that went back: taken as the latest point's time
    assert sizes(cur, 1) == [(1_000, 0, 0, 0), (3_000, 1, 2, 1)]
    assert stays(cur, 1) == [(1, 3_000, 3_000), (2, 3_000, None)]


def test_an_apply_rolled_back_leaves_nothing(db):
    cur = db.cursor()
    apply(cur, 1, [1, 2], 1_000)
    before = (stays(cur, 1), sizes(cur, 1))
    cur.execute("BEGIN")
    apply_members(cur, WS, 1, members(2, 3), 2_000)
    cur.execute("ROLLBACK")
    assert (stays(cur, 1), sizes(cur, 1)) == before


def test_a_large_apply_matches_set_arithmetic(db):
    cur = db.cursor()
    first = pl.int_range(0, 400_000, step=2, eager=True)  # 200,000 even MPIDs
    second = pl.concat([first.filter(first % 10 != 0), pl.int_range(1, 20_001, step=2, eager=True)])
    assert apply(cur, 7, first.to_list(), 1_000) == Change(200_000, 200_000, 0)
    change = apply(cur, 7, second.to_list(), 2_000)
    assert change == Change(second.len(), 10_000, 40_000)
    assert current_members(cur, WS, 7).to_list() == sorted(second.to_list())


def test_forget_audience_deletes_its_rows_only(db):
    cur = db.cursor()
    apply(cur, 1, [1, 2], 1_000)
    apply(cur, 2, [1], 1_000)
    forget_audience(cur, WS, 1)
    assert stays(cur, 1) == [] and sizes(cur, 1) == []
    assert stays(cur, 2) == [(1, 1_000, None)] and sizes(cur, 2) == [(1_000, 1, 1, 0)]


# --- reading ---------------------------------------------------------------------------------------------------
def test_memberships_of_a_profile(db):
    cur = db.cursor()
    define(cur, 1, "Buyers")
    define(cur, 2, "Sleepers")
    apply(cur, 1, [5], 1_000)
    apply(cur, 2, [5, 6], 1_000)
    apply(cur, 2, [6], 2_000)
    apply(cur, 2, [5, 6], 3_000)
    apply(cur, 3, [5], 1_000)  # no definition row (being deleted): left out
    apply(cur, 1, [5], 1_000, workspace_id=OTHER)
    assert memberships_of(cur, WS, 5) == [Membership(1, "Buyers", 1_000), Membership(2, "Sleepers", 3_000)]
    assert memberships_of(cur, WS, 6) == [Membership(2, "Sleepers", 1_000)]
    assert memberships_of(cur, WS, 7) == []


def test_size_history_within_a_range(db):
    cur = db.cursor()
    for at, mpids in ((1_000, [1]), (2_000, [1, 2]), (3_000, [1, 2, 3]), (4_000, [1])):
        apply(cur, 1, mpids, at)
    assert size_history(cur, WS, 1) == [(1_000, 1), (2_000, 2), (3_000, 3), (4_000, 1)]
    # the size in effect at `since` starts the range
    assert size_history(cur, WS, 1, since_ms=2_500, until_ms=3_500) == [(2_500, 2), (3_000, 3)]
    assert size_history(cur, WS, 1, since_ms=2_000) == [(2_000, 2), (3_000, 3), (4_000, 1)]
    assert size_history(cur, WS, 1, since_ms=500) == [(1_000, 1), (2_000, 2), (3_000, 3), (4_000, 1)]
    assert size_history(cur, WS, 1, until_ms=1_500) == [(1_000, 1)]
    assert size_history(cur, WS, 2) == []


def test_stats_count_adds_and_drops_of_the_last_24_hours(db):
    cur = db.cursor()
    now = 100 * DAY_MS
    define(cur, 1, "Busy")
    define(cur, 2, "Empty")
    define(cur, 3, "Never applied")
    apply(cur, 1, list(range(10)), now - 2 * DAY_MS)        # outside the window
    apply(cur, 1, list(range(2, 12)), now - DAY_MS)         # the window's edge is excluded
    apply(cur, 1, list(range(4, 12)), now - DAY_MS + 1)     # 2 drops
    apply(cur, 1, list(range(4, 15)), now)                  # 3 adds
    apply(cur, 1, [99], now + 1)                            # after `now`: not counted
    apply(cur, 2, [1], now - 3_000)
    apply(cur, 2, [], now - 2_000)
    stats = audience_stats(cur, WS, now)
    assert stats[1] == AudienceStats(1, "Busy", size=1, adds_24h=3, drops_24h=2, volatility=5.0, changed_ms=now + 1)
    # the size is the current one; volatility would divide by zero for an empty audience: NULL
    assert stats[2] == AudienceStats(2, "Empty", 0, 1, 1, None, now - 2_000)
    assert stats[3] == AudienceStats(3, "Never applied", 0, 0, 0, None, None)
    assert audience_stats(cur, WS, now, audience_ids=[2]) == {2: stats[2]}
    assert audience_stats(cur, OTHER, now) == {}


def test_the_stats_view_uses_the_time_of_the_query(db):
    cur = db.cursor()
    now = time.time_ns() // 1_000_000
    define(cur, 1, "Live")
    apply(cur, 1, [1, 2, 3, 4], now - 2 * DAY_MS)
    apply(cur, 1, [1, 2, 3, 5], now - 60_000)
    row = cur.execute("SELECT workspace_id, audience_id, name, size, adds_24h, drops_24h, volatility, changed_ms "
                      "FROM audience_stats").fetchall()
    assert row == [(WS, 1, "Live", 4, 1, 1, 0.5, now - 60_000)]
    function = audience_stats(cur, WS, time.time_ns() // 1_000_000)[1]
    assert (function.size, function.adds_24h, function.drops_24h, function.volatility) == (4, 1, 1, 0.5)


# --- analyst views ---------------------------------------------------------------------------------------------
NEW_VIEWS = ("audiences", "audience_members", "audience_membership_history", "audience_sizes", "audience_stats")


def test_the_views_are_public_commented_and_filtered_to_the_workspace(db):
    cur = db.cursor()
    for workspace_id, audience_id, people in ((WS, 1, [1, 2]), (OTHER, 2, [3])):
        define(cur, audience_id, f"audience {audience_id}", workspace_id)
        apply(cur, audience_id, people, 1_000, workspace_id=workspace_id)
        apply(cur, audience_id, people[:1], 2_000, workspace_id=workspace_id)
    for view in NEW_VIEWS:
        assert PUBLIC_VIEWS[view] == "workspace_id"
        comment = cur.execute("SELECT comment FROM duckdb_views() WHERE view_name = ? UNION ALL "
                              "SELECT comment FROM duckdb_tables() WHERE table_name = ?", [view, view]).fetchall()
        assert comment and comment[0][0], f"{view} has no comment"
        alpha = run_query(db, f"SELECT DISTINCT workspace_id FROM {view}", SimpleNamespace(id=WS, scope=WS))
        assert alpha.table.to_pylist() == [{"workspace_id": WS}], view
        admin = run_query(db, f"SELECT DISTINCT workspace_id FROM {view} ORDER BY 1")
        assert [r["workspace_id"] for r in admin.table.to_pylist()] == sorted([WS, OTHER]), view
    beta = SimpleNamespace(id=OTHER, scope=OTHER)
    assert run_query(db, "SELECT audience_id, mpid FROM audience_members", beta).table.to_pylist() == [
        {"audience_id": 2, "mpid": 3}]
    assert run_query(db, "SELECT count(*) AS n FROM audience_membership_history WHERE mpid IN (1, 2)",
                     beta).table.to_pylist() == [{"n": 0}]
    joined = run_query(db, "SELECT a.name, m.mpid FROM audience_members m JOIN audiences a ON a.id = m.audience_id",
                       SimpleNamespace(id=WS, scope=WS))
    assert joined.table.to_pylist() == [{"name": "audience 1", "mpid": 1}]
    definition = run_query(db, "SELECT definition FROM audiences WHERE id = 1").table.to_pylist()[0]["definition"]
    assert json.loads(definition)["criteria"] == {"identity": {"type": "email", "present": True}}


# --- the Profile API -----------------------------------------------------------------------------------------------
def test_the_profile_api_lists_current_memberships(server: LiveServer, idsync):
    client = idsync()
    mpid = int(client.identify({"customerid": "member-1"})["mpid"])
    other = int(client.identify({"customerid": "member-2"})["mpid"])
    workspace_id = server.service.workspaces.by_api_key(client.auth[0]).id
    url = f"/userprofile/v1/1/2/{workspace_id}/{mpid}"
    assert client.http.get(url, params={"fields": "audience_memberships"}, auth=client.auth).json()[
        "audience_memberships"] == []
    gone = seed_audience(server, workspace_id, "Was here", [mpid], 1_000)
    buyers = seed_audience(server, workspace_id, "Buyers", [mpid, other], 2_000)
    apply_audience(server, workspace_id, gone, [], 3_000)
    seed_audience(server, server.create_workspace().id, "Elsewhere", [mpid], 1_000)
    body = client.http.get(url, params={"fields": "audience_memberships,user_attributes"}, auth=client.auth).json()
    assert body["audience_memberships"] == [
        {"audience_id": buyers, "audience_name": "Buyers", "expiration_timestamp_ms": None,
         "added_timestamp_ms": 2_000}]
    assert "user_identities" not in body


# --- the size chart ------------------------------------------------------------------------------------------------
def chart(points: list[tuple[int, int]], title: str = "Buyers") -> ET.Element:
    return ET.fromstring(size_chart_svg(points, title))


def vertices(root: ET.Element) -> list[tuple[float, float]]:
    [line] = root.iter(f"{SVG}polyline")
    return [tuple(float(v) for v in pair.split(",")) for pair in line.get("points").split()]


def test_the_chart_is_valid_svg_with_one_marker_per_point_and_a_step_line():
    day = 1_763_942_400_000  # 2025-11-24 00:00 UTC
    points = [(day + 3_600_000 * i, size) for i, size in enumerate([120, 150, 150, 90, 2_400, 2_350])]
    root = chart(list(reversed(points)), 'Buyers & "friends" <EU>')
    assert root.tag == f"{SVG}svg"
    assert len(list(root.iter(f"{SVG}circle"))) == len(points)
    line = vertices(root)
    assert len(line) == 2 * len(points) - 1  # a size holds until the next point: a flat then a vertical segment
    assert [x for x, _ in line] == sorted(x for x, _ in line)  # the input order did not matter
    assert line[1][1] == line[0][1] and line[1][0] == line[2][0]
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert 'Buyers & "friends" <EU>' in texts
    assert "2025-11-24" in texts and "2.5k" in texts and "0" in texts  # a date and the sizes axis up to 2,500
    assert {"".join(t.itertext()) for t in root.iter(f"{SVG}title")} >= {"2025-11-24 04:00:00 UTC: 2,400"}


def test_the_chart_of_one_point_none_or_many():
    single = chart([(1_763_942_400_000, 7)])
    assert len(list(single.iter(f"{SVG}circle"))) == 1 and len(vertices(single)) == 1
    empty = chart([])
    assert "no size recorded yet" in ["".join(t.itertext()) for t in empty.iter(f"{SVG}text")]
    many = [(1_763_942_400_000 + 60_000 * i, i % 17) for i in range(MAX_MARKERS + 1)]
    crowded = chart(many)
    assert len(list(crowded.iter(f"{SVG}circle"))) == 0 and len(vertices(crowded)) == 2 * len(many) - 1


# --- a property: the history is what a plain model says -----------------------------------------------------------
apply_steps = st.lists(st.tuples(st.sets(st.integers(1, 12), max_size=10),
                                 st.none() | st.sets(st.integers(1, 12), max_size=8),
                                 st.integers(0, 3)), min_size=1, max_size=8)
audience_ids = iter(range(1_000, 10**9))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=apply_steps)
def test_history_follows_a_plain_model(db, steps):
    cur = db.cursor()
    audience = next(audience_ids)
    open_stays: dict[int, int] = {}
    closed: list[tuple[int, int, int]] = []
    at, last_point = 0, None
    for wanted, universe, gap in steps:
        at += gap
        scope = set(range(1, 13)) if universe is None else universe
        before = dict(open_stays)
        for mpid in sorted(scope):
            if mpid in open_stays and mpid not in wanted:
                closed.append((mpid, open_stays.pop(mpid), at))
            elif mpid not in open_stays and mpid in wanted:
                open_stays[mpid] = at
        adds, drops = len(open_stays.keys() - before.keys()), len(before.keys() - open_stays.keys())
        change = apply(cur, audience, sorted(wanted), at, None if universe is None else sorted(universe))
        assert change == Change(len(open_stays), adds, drops)
        if adds or drops or last_point is None:
            last_point = at
    # a stay may begin and end in the same millisecond as the next one begins: the open one sorts last
    expected = sorted([(m, entered, exited) for m, entered, exited in closed] +
                      [(m, entered, None) for m, entered in open_stays.items()],
                      key=lambda stay: (stay[0], stay[1], stay[2] if stay[2] is not None else float("inf")))
    assert stays(cur, audience) == expected
    assert current_members(cur, WS, audience).to_list() == sorted(open_stays)
    points = sizes(cur, audience)
    assert points[-1][0] == last_point and points[-1][1] == len(open_stays)
    assert sum(p[2] for p in points) == len(expected) and sum(p[3] for p in points) == len(closed)
