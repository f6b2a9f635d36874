"""Audience membership with history: applying an evaluation result, and reading members, memberships, sizes and
stats (docs/audiences.md, "Membership contract"; tables in engine/audience_schema.py).

A stay in an audience is one row of `audience_membership_history`: entering adds a row with `exited_ms` NULL,
exiting closes it, entering again adds a new row. Every apply that changes the membership (and the first one of
an audience) records a size point in `audience_sizes`, which is what the 24-hour stats and the size chart read.

The diff is columnar: the current stays come out of DuckDB as Arrow, adds and drops are polars hash lookups
(`is_in`), and only the changed rows go back (an UPDATE by rowid over a registered Arrow table, an INSERT from
one). Measured on 20M history rows, a 1M-member apply with 1,000 changes each way took ~80 ms this way against
~350 ms for the same anti-joins written in SQL as one UPDATE ... NOT IN and one INSERT ... ANTI JOIN: DuckDB then
joins the whole member list twice inside statements that write.

Every function runs on the cursor it is given, inside the caller's transaction. Applies to one audience must not
run concurrently (the group-commit writer runs them one at a time): each one reads the size it adds to.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import duckdb
import polars as pl

from engine.audience_schema import stats_query

_CURRENT = ("FROM audience_membership_history "
            "WHERE workspace_id = $workspace AND audience_id = $audience AND exited_ms IS NULL")


@dataclass(frozen=True)
class Change:
    size: int   # members after the apply, in the whole audience (not only the universe)
    adds: int
    drops: int


@dataclass(frozen=True)
class Membership:
    audience_id: int
    audience_name: str
    entered_ms: int  # when the current stay began


@dataclass(frozen=True)
class AudienceStats:
    audience_id: int
    name: str
    size: int
    adds_24h: int
    drops_24h: int
    volatility: float | None  # (adds_24h + drops_24h) / size; None when the audience is empty
    changed_ms: int | None    # the latest size point; None: never applied


def apply_members(cursor: duckdb.DuckDBPyConnection, workspace_id: str, audience_id: int, members: pl.Series,
                  at_ms: int, universe: list[int] | pl.Series | None = None) -> Change:
    """Make `members` the audience's membership within `universe` (None: every profile), as of `at_ms`.

    Members not yet current enter, current members missing from `members` exit; outside the universe nothing
    changes, and members outside it are ignored. `at_ms` earlier than the audience's latest size point is taken
    as that point's time, so history and sizes never run backwards."""
    wanted = _mpids(members)
    params = {"workspace": workspace_id, "audience": audience_id}
    last_at = cursor.execute("SELECT max(at_ms) FROM audience_sizes "
                             "WHERE workspace_id = $workspace AND audience_id = $audience", params).fetchall()[0][0]
    at = at_ms if last_at is None else max(at_ms, last_at)
    if universe is None:
        current, before = _current_stays(cursor, params, None)
    else:
        scope = _mpids(pl.Series("mpid", universe, dtype=pl.Int64) if isinstance(universe, list) else universe)
        wanted = _semi(wanted, scope)
        current, before = _current_stays(cursor, params, scope)
    # current stays are unique per MPID (one open row each); `members` need not be, so its adds are made unique
    adds = _anti(wanted, current["mpid"]).unique()
    drops = current.filter(~pl.col("mpid").is_in(wanted.implode()))
    _close_stays(cursor, params, drops, at)
    if len(adds):
        with _registered(cursor, "audience_apply_adds", adds.to_frame()):
            cursor.execute("INSERT INTO audience_membership_history "
                           "SELECT $workspace, $audience, mpid, $at, NULL FROM audience_apply_adds",
                           {**params, "at": at}).fetchall()
    change = Change(before + len(adds) - drops.height, len(adds), drops.height)
    if change.adds or change.drops or last_at is None:
        _record_size(cursor, params, at, change, merge=at == last_at)
    return change


def current_members(cursor: duckdb.DuckDBPyConnection, workspace_id: str, audience_id: int) -> pl.Series:
    """The audience's current members: sorted unique MPIDs (`pl.Int64`, named `mpid`)."""
    table = cursor.sql(f"SELECT mpid {_CURRENT} ORDER BY mpid",
                       params={"workspace": workspace_id, "audience": audience_id}).to_arrow_table()
    return pl.from_arrow(table)["mpid"].cast(pl.Int64)


def memberships_of(cursor: duckdb.DuckDBPyConnection, workspace_id: str, mpid: int) -> list[Membership]:
    """The audiences a profile is a member of now, by audience id; an audience without a definition row (being
    deleted) is left out."""
    rows = cursor.execute("""SELECT h.audience_id, d.name, h.entered_ms
                             FROM audience_membership_history h
                             JOIN audience_definitions d ON d.workspace_id = h.workspace_id AND d.id = h.audience_id
                             WHERE h.workspace_id = ? AND h.mpid = ? AND h.exited_ms IS NULL
                             ORDER BY h.audience_id""", [workspace_id, mpid]).fetchall()
    return [Membership(audience_id, name, entered_ms) for audience_id, name, entered_ms in rows]


def size_history(cursor: duckdb.DuckDBPyConnection, workspace_id: str, audience_id: int,
                 since_ms: int | None = None, until_ms: int | None = None) -> list[tuple[int, int]]:
    """(at_ms, size) points in time order within [since_ms, until_ms]. With `since_ms`, the size in effect then
    (the latest earlier point) comes first, stamped `since_ms`, so a chart of the range starts at the right
    height; an audience never applied before `since_ms` has no such point."""
    rows = cursor.execute("""SELECT at_ms, size FROM audience_sizes
                             WHERE workspace_id = $workspace AND audience_id = $audience
                               AND at_ms >= coalesce($since, at_ms) AND at_ms <= coalesce($until, at_ms)
                             ORDER BY at_ms""",
                          {"workspace": workspace_id, "audience": audience_id, "since": since_ms,
                           "until": until_ms}).fetchall()
    points = [(at, size) for at, size in rows]
    if since_ms is not None and (not points or points[0][0] > since_ms):
        earlier = cursor.execute("""SELECT size FROM audience_sizes
                                    WHERE workspace_id = ? AND audience_id = ? AND at_ms < ?
                                    ORDER BY at_ms DESC LIMIT 1""", [workspace_id, audience_id, since_ms]).fetchall()
        if earlier and (until_ms is None or since_ms <= until_ms):
            points.insert(0, (since_ms, earlier[0][0]))
    return points


def audience_stats(cursor: duckdb.DuckDBPyConnection, workspace_id: str, at_ms: int,
                   audience_ids: list[int] | None = None) -> dict[int, AudienceStats]:
    """Stats of the workspace's defined audiences (or those of `audience_ids`): adds and drops in the 24 hours up
    to `at_ms`, the current size. The same query as the `audience_stats` view, which uses the time of the query."""
    rows = cursor.execute(f"""SELECT audience_id, name, size, adds_24h, drops_24h, volatility, changed_ms
                              FROM ({stats_query("$at")}) WHERE workspace_id = $workspace
                                AND ($ids IS NULL OR list_contains($ids, audience_id))
                              ORDER BY audience_id""",
                          {"at": at_ms, "workspace": workspace_id, "ids": audience_ids}).fetchall()
    return {row[0]: AudienceStats(*row) for row in rows}


def forget_audience(cursor: duckdb.DuckDBPyConnection, workspace_id: str, audience_id: int) -> None:
    """Delete a deleted audience's history and sizes; its definition row is the registry's to delete."""
    params = {"workspace": workspace_id, "audience": audience_id}
    for table in ("audience_membership_history", "audience_sizes"):
        cursor.execute(f"DELETE FROM {table} WHERE workspace_id = $workspace AND audience_id = $audience",
                       params).fetchall()


def _current_stays(cursor: duckdb.DuckDBPyConnection, params: dict[str, object],
                   scope: pl.Series | None) -> tuple[pl.DataFrame, int]:
    """The audience's open stays as (row, mpid), all or those inside `scope`, and its size. `row` is DuckDB's
    rowid: it lets the UPDATE that closes stays reach them directly instead of scanning the audience again
    (measured with 200 drops among 1M members: ~5 ms against ~20 ms for `mpid IN (...)`)."""
    if scope is None:
        current = pl.from_arrow(cursor.sql(f"SELECT rowid AS row, mpid {_CURRENT}", params=params).to_arrow_table())
        return current, current.height
    with _registered(cursor, "audience_apply_universe", scope.to_frame()):
        current = pl.from_arrow(cursor.sql(f"SELECT rowid AS row, mpid {_CURRENT} "
                                           "AND mpid IN (SELECT mpid FROM audience_apply_universe)",
                                           params=params).to_arrow_table())
    return current, cursor.execute(f"SELECT count(*) {_CURRENT}", params).fetchall()[0][0]


def _close_stays(cursor: duckdb.DuckDBPyConnection, params: dict[str, object], drops: pl.DataFrame, at_ms: int) -> None:
    if not drops.height:
        return
    with _registered(cursor, "audience_apply_drops", drops):
        closed = cursor.execute("UPDATE audience_membership_history SET exited_ms = $at "
                                "WHERE rowid IN (SELECT row FROM audience_apply_drops) AND exited_ms IS NULL "
                                "AND workspace_id = $workspace AND audience_id = $audience",
                                {**params, "at": at_ms}).fetchall()[0][0]
    if closed != drops.height:  # rowids hold within one transaction; between two they may not
        raise RuntimeError(f"audience {params['audience']}: closed {closed} of {drops.height} dropped stays; "
                           "apply_members must run inside a transaction")


def _record_size(cursor: duckdb.DuckDBPyConnection, params: dict[str, object], at_ms: int, change: Change,
                 merge: bool) -> None:
    """One point per audience and millisecond: a second apply within the same millisecond adds to its point."""
    values = {**params, "at": at_ms, "size": change.size, "adds": change.adds, "drops": change.drops}
    if merge:
        cursor.execute("UPDATE audience_sizes SET size = $size, adds = adds + $adds, drops = drops + $drops "
                       "WHERE workspace_id = $workspace AND audience_id = $audience AND at_ms = $at", values).fetchall()
    else:
        cursor.execute("INSERT INTO audience_sizes VALUES ($workspace, $audience, $at, $size, $adds, $drops)",
                       values).fetchall()


def _mpids(series: pl.Series) -> pl.Series:
    return series.cast(pl.Int64).drop_nulls().rename("mpid")


def _anti(left: pl.Series, right: pl.Series) -> pl.Series:
    """MPIDs of `left` not in `right`: a hash lookup, ~9x faster here than a polars anti join of two frames."""
    return left.filter(~left.is_in(right.implode()))


def _semi(left: pl.Series, right: pl.Series) -> pl.Series:
    return left.filter(left.is_in(right.implode()))


@contextmanager
def _registered(cursor: duckdb.DuckDBPyConnection, name: str, frame: pl.DataFrame) -> Iterator[None]:
    # registered by name rather than found by a replacement scan: analyst connections turn those off, and a
    # name cannot pick up a Python variable by accident
    cursor.register(name, frame.to_arrow())
    try:
        yield
    finally:
        cursor.unregister(name)
