"""The delivery outbox on a real DuckDB file: diff cases (add, remove, a change undone before it was sent, re-add,
identifiers changed, consent, sampling, forwarded attributes), taking due batches, acknowledging (state, retry
backoff, rejected rows parked), a diff meeting a request in flight, and a crash between send and acknowledgement
(a child process killed with SIGKILL) that resends and ends in the exact state."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import polars as pl
import pytest

from audiences import fanout, outbox
from audiences.connections import Connection, Credentials, check_settings
from audiences.outputs.base import Acknowledged, Delta, Rejected, RetryLater, RetryPolicy
from engine.store import open_database

WS = "ws1"
AUDIENCE = 7
NO_JITTER = RetryPolicy(base_seconds=2.0, max_seconds=600.0, jitter=0.0)


def webhook(connection_id: int = 1, **settings: object) -> Connection:
    body = {"webhook": {"url": "http://127.0.0.1:9/hook"}, "identity_types": ["email"], **settings}
    checked = check_settings("webhook", body)
    return Connection(connection_id, WS, AUDIENCE, "webhook", f"hook {connection_id}", "active", checked,
                      Credentials({"secret": "s"}), 1, 1)


@pytest.fixture
def db(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    connection = open_database(str(tmp_path / "outbox.duckdb"))
    yield connection
    connection.close()


def wanted(mapping: dict[int, dict[str, str]]) -> pl.DataFrame:
    return pl.DataFrame({"mpid": list(mapping), "identifiers": [_canonical(v) for v in mapping.values()]},
                        schema={"mpid": pl.Int64, "identifiers": pl.String})


def _canonical(identifiers: dict[str, str]) -> str:
    return json.dumps(identifiers, sort_keys=True, separators=(",", ":"))


def diff(db: duckdb.DuckDBPyConnection, connection: Connection, mapping: dict[int, dict[str, str]],
         at_ms: int) -> outbox.DiffResult:
    cursor = db.cursor()
    cursor.begin()
    frame = wanted(mapping)   # with the forwarded attributes as outbox.wanted_identifiers reads them
    frame = frame.join(outbox.forwarded_attributes(cursor, connection, frame["mpid"]), on="mpid", how="left")
    result = outbox.diff_connection(cursor, connection, frame, at_ms)
    cursor.commit()
    cursor.close()
    return result


def ack_all(db: duckdb.DuckDBPyConnection, connection: Connection, deltas: list, outcomes: list | None = None,
            at_ms: int = 10_000) -> outbox.AckResult:
    cursor = db.cursor()
    cursor.begin()
    result = outbox.acknowledge(cursor, connection, deltas, outcomes or [Acknowledged(200)] * len(deltas), at_ms,
                                policy=NO_JITTER)
    cursor.commit()
    cursor.close()
    return result


def pending(db: duckdb.DuckDBPyConnection, connection_id: int = 1) -> dict[int, tuple[str, dict[str, str]]]:
    rows = db.execute("SELECT mpid, op, identifiers FROM delivery_outbox WHERE connection_id = ?",
                      [connection_id]).fetchall()
    return {mpid: (op, json.loads(ids)) for mpid, op, ids in rows}


def held(db: duckdb.DuckDBPyConnection, connection_id: int = 1) -> dict[int, dict[str, str]]:
    rows = db.execute("SELECT mpid, identifiers FROM delivery_state WHERE connection_id = ?",
                      [connection_id]).fetchall()
    return {mpid: json.loads(ids) for mpid, ids in rows}


def take(db: duckdb.DuckDBPyConnection, connection: Connection, at_ms: int = 10_000, limit: int = 1000) -> list:
    """Take a batch for sending, as the delivery service does: taken and marked in one transaction."""
    cursor = db.cursor()
    cursor.begin()
    deltas = outbox.take(cursor, connection, at_ms, limit)
    outbox.mark_sending(cursor, connection.id, deltas)
    cursor.commit()
    cursor.close()
    return deltas


def peek(db: duckdb.DuckDBPyConnection, connection: Connection, at_ms: int = 10_000) -> list:
    """What a flush would take now, without taking it."""
    return outbox.take(db, connection, at_ms, 1000)


def email(n: int) -> dict[str, str]:
    return {"email": f"user{n}@example.com", "mpid": str(n)}


# --- diff cases ---------------------------------------------------------------------------------------------------

def test_new_members_are_added_and_nothing_repeats(db):
    c = webhook()
    assert diff(db, c, {1: email(1), 2: email(2)}, 1000) == outbox.DiffResult(2, 0, 0, 2, 0)
    assert pending(db) == {1: ("add", email(1)), 2: ("add", email(2))}
    seqs = db.execute("SELECT seq FROM delivery_outbox ORDER BY seq").fetchall()
    # the same wanted state again queues nothing and keeps the rows (their seq and change time) as they were
    assert diff(db, c, {1: email(1), 2: email(2)}, 2000) == outbox.DiffResult(0, 0, 0, 2, 0)
    assert db.execute("SELECT seq FROM delivery_outbox ORDER BY seq").fetchall() == seqs
    assert db.execute("SELECT DISTINCT changed_ms FROM delivery_outbox").fetchall() == [(1000,)]


def test_members_that_left_are_removed_with_the_identifiers_sent(db):
    c = webhook()
    diff(db, c, {1: email(1), 2: email(2)}, 1000)
    ack_all(db, c, take(db, c))
    assert held(db) == {1: email(1), 2: email(2)}
    # 2 leaves, and meanwhile its email changed: the remove names what the add named
    result = diff(db, c, {1: email(1)}, 2000)
    assert (result.adds, result.removes, result.cancelled) == (0, 1, 0)
    assert pending(db) == {2: ("remove", email(2))}
    ack_all(db, c, take(db, c))
    assert held(db) == {1: email(1)} and pending(db) == {}


def test_a_member_that_exits_before_its_add_is_sent_is_never_sent(db):
    c = webhook()
    diff(db, c, {1: email(1), 2: email(2)}, 1000)
    result = diff(db, c, {1: email(1)}, 1500)
    assert (result.adds, result.removes, result.cancelled) == (0, 0, 1)
    assert [d.mpid for d in peek(db, c)] == [1]
    # and one that leaves after the add went out (acknowledged) gets a remove
    ack_all(db, c, take(db, c))
    diff(db, c, {}, 2000)
    assert pending(db) == {1: ("remove", email(1))}


def test_re_add_before_the_remove_is_sent_cancels_the_remove(db):
    c = webhook()
    diff(db, c, {1: email(1)}, 1000)
    ack_all(db, c, take(db, c))
    diff(db, c, {}, 2000)
    assert pending(db) == {1: ("remove", email(1))}
    result = diff(db, c, {1: email(1)}, 3000)
    assert (result.adds, result.removes, result.cancelled) == (0, 0, 1)
    assert pending(db) == {} and held(db) == {1: email(1)}
    # re-added after the remove was acknowledged: a fresh add
    diff(db, c, {}, 4000)
    ack_all(db, c, take(db, c))
    assert held(db) == {}
    assert diff(db, c, {1: email(1)}, 5000).adds == 1
    assert pending(db) == {1: ("add", email(1))}


def test_changed_identifiers_queue_an_add_that_knows_what_is_held(db):
    c = webhook()
    diff(db, c, {1: email(1)}, 1000)
    ack_all(db, c, take(db, c))
    new = {"email": "renamed@example.com", "mpid": "1"}
    result = diff(db, c, {1: new}, 2000)
    assert (result.adds, result.removes) == (1, 0)
    [delta] = peek(db, c)
    assert (delta.op, delta.identifiers, delta.held_identifiers) == ("add", new, email(1))
    # changing again before it was sent replaces the pending row, keeping the older change time
    newer = {"email": "again@example.com", "mpid": "1"}
    diff(db, c, {1: newer}, 3000)
    [delta] = peek(db, c)
    assert (delta.identifiers, delta.changed_ms) == (newer, 2000)
    # back to what is held before anything was sent: nothing left to do
    assert diff(db, c, {1: email(1)}, 4000).cancelled == 1
    assert pending(db) == {}
    ack_all(db, c, take(db, c))
    assert held(db) == {1: email(1)}


def test_connections_keep_their_own_rows(db):
    one, two = webhook(1), webhook(2)
    diff(db, one, {1: email(1)}, 1000)
    diff(db, two, {2: email(2)}, 1000)
    assert pending(db, 1) == {1: ("add", email(1))} and pending(db, 2) == {2: ("add", email(2))}
    ack_all(db, one, take(db, one))
    assert held(db, 1) == {1: email(1)} and held(db, 2) == {}
    assert [d.mpid for d in take(db, two)] == [2]


def _seed_profiles(db: duckdb.DuckDBPyConnection, mpids: list[int]) -> None:
    db.executemany("INSERT INTO identities_base VALUES (?, ?, 'email', ?, ?, 0)",
                   [(WS, m, f"user{m}@example.com", f"User{m}@Example.com") for m in mpids])


def _consent(db: duckdb.DuckDBPyConnection, mpid: int, regulation: str, purpose: str, consented: bool,
             at_ms: int) -> None:
    db.execute("INSERT INTO consent_history_base VALUES (?, ?, ?, ?, ?, NULL, ?, NULL, NULL, ?, 'batch')",
               [WS, mpid, regulation, purpose, consented, at_ms, at_ms])


def _wanted(db: duckdb.DuckDBPyConnection, connection: Connection, members: list[int]) -> pl.DataFrame:
    return outbox.wanted_identifiers(db, connection, WS, pl.Series("mpid", members, dtype=pl.Int64))


def test_ccpa_opt_out_is_never_forwarded_and_an_opt_out_after_sending_is_a_remove(db):
    c = webhook()
    _seed_profiles(db, [1, 2, 3])
    _consent(db, 2, "ccpa", "data_sale_opt_out", True, 100)
    assert _wanted(db, c, [1, 2, 3])["mpid"].to_list() == [1, 3]
    cursor = db.cursor()
    outbox.diff_connection(cursor, c, _wanted(db, c, [1, 2, 3]), 1000)
    ack_all(db, c, take(db, c))
    assert sorted(held(db)) == [1, 3]
    _consent(db, 3, "ccpa", "data_sale_opt_out", True, 200)
    outbox.diff_connection(cursor, c, _wanted(db, c, [1, 2, 3]), 2000)
    assert pending(db) == {3: ("remove", {"email": "User3@Example.com", "mpid": "3"})}
    # opting back in (a later answer) makes the profile wanted again
    _consent(db, 2, "ccpa", "data_sale_opt_out", False, 300)
    assert _wanted(db, c, [1, 2, 3])["mpid"].to_list() == [1, 2]


def test_a_required_gdpr_purpose_forwards_only_profiles_that_consented_to_it(db):
    c = webhook(consent={"require_gdpr_purpose": "Advertising"})
    _seed_profiles(db, [1, 2, 3, 4])
    _consent(db, 1, "gdpr", "advertising", True, 100)
    _consent(db, 2, "gdpr", "advertising", False, 100)
    _consent(db, 3, "gdpr", "analytics", True, 100)
    _consent(db, 4, "gdpr", "advertising", True, 100)
    _consent(db, 4, "ccpa", "data_sale_opt_out", True, 100)
    assert _wanted(db, c, [1, 2, 3, 4])["mpid"].to_list() == [1]
    # the latest answer counts
    _consent(db, 1, "gdpr", "advertising", False, 200)
    assert _wanted(db, c, [1, 2, 3, 4]).is_empty()


def test_members_without_an_identifier_the_output_accepts_are_not_wanted(db):
    braze_like = webhook(identity_types=["email"])
    _seed_profiles(db, [1])
    got = _wanted(db, braze_like, [1, 2])   # 2 has no email, but a webhook always sends the mpid
    assert got["mpid"].to_list() == [1, 2]
    assert json.loads(got.filter(pl.col("mpid") == 2)["identifiers"][0]) == {"mpid": "2"}


def test_sampling_is_stable_per_user_and_differs_between_connections(db):
    members = list(range(1, 2001))
    half_1, half_2 = webhook(1, sampling_percent=50), webhook(2, sampling_percent=50)
    first = set(_wanted(db, half_1, members)["mpid"].to_list())
    assert first == set(_wanted(db, half_1, members)["mpid"].to_list())   # stable
    assert 850 < len(first) < 1150
    second = set(_wanted(db, half_2, members)["mpid"].to_list())
    assert first != second
    # a bigger sample of the same connection holds the smaller one: raising the percentage only adds profiles
    bigger = set(_wanted(db, webhook(1, sampling_percent=80), members)["mpid"].to_list())
    assert first < bigger
    buckets = fanout.sample_buckets(1, pl.Series(members))
    assert first == {m for m, b in zip(members, buckets.to_list()) if b < 50}


def test_adds_carry_forwarded_user_and_calculated_attributes(db):
    db.execute("INSERT INTO calculated_attributes VALUES (12, ?, 'ltv', NULL, NULL, '{}', 0, 0, 0, NULL)", [WS])
    db.execute("INSERT INTO calculated_attribute_values VALUES (?, 12, 1, '120.5', 0, NULL)", [WS])
    db.execute("INSERT INTO user_attributes_base VALUES (?, 1, 'tier', '\"gold\"', 0, false), "
               "(?, 1, 'secret', '\"no\"', 0, false), (?, 2, 'tier', '[\"a\", \"b\"]', 0, false)", [WS, WS, WS])
    c = webhook(forward_attributes={"user": ["tier"], "calculated": [12]})
    diff(db, c, {1: email(1), 2: email(2), 3: email(3)}, 1000)
    by_mpid = {d.mpid: d.attributes for d in peek(db, c)}
    assert by_mpid == {1: {"ltv": 120.5, "tier": "gold"}, 2: {"tier": ["a", "b"]}, 3: {}}


def test_a_changed_forwarded_value_is_sent_again_as_an_add(db):
    """A forwarded attribute (here a value-based Facebook audience's calculated LOOKALIKE_VALUE) that changes for a
    member already sent is re-sent: delivery_state keeps the md5 of the attributes acknowledged."""
    db.execute("INSERT INTO calculated_attributes VALUES (12, ?, 'ltv', NULL, NULL, '{}', 0, 0, 0, NULL)", [WS])
    db.execute("INSERT INTO calculated_attribute_values VALUES (?, 12, 1, '120.5', 0, NULL), "
               "(?, 12, 2, '7', 0, NULL)", [WS, WS])
    settings = check_settings("facebook", {"identity_types": ["email"], "facebook": {
        "ad_account_id": "act_1", "value_based": {"calculated_attribute_id": 12}}})
    c = Connection(1, WS, AUDIENCE, "facebook", "fb", "active", settings, Credentials({"access_token": "t"}), 1, 1)
    members = {1: {"EMAIL": "a" * 64}, 2: {"EMAIL": "b" * 64}}
    diff(db, c, members, 1000)
    ack_all(db, c, take(db, c))
    assert db.execute("SELECT count(*) FROM delivery_state WHERE attributes_hash IS NOT NULL").fetchall() == [(2,)]
    assert diff(db, c, members, 2000).adds == 0   # nothing changed: nothing queued
    db.execute("UPDATE calculated_attribute_values SET value = '99' WHERE mpid = 1")
    assert diff(db, c, members, 3000).adds == 1
    [delta] = take(db, c)
    assert (delta.mpid, delta.op, delta.attributes, delta.held_identifiers) == (1, "add", {"ltv": 99}, members[1])
    ack_all(db, c, [delta])
    assert diff(db, c, members, 4000).adds == 0
    # a pending add whose value changes before it goes out is replaced, keeping its change time
    db.execute("UPDATE calculated_attribute_values SET value = '5' WHERE mpid = 2")
    diff(db, c, members, 5000)
    db.execute("UPDATE calculated_attribute_values SET value = '6' WHERE mpid = 2")
    diff(db, c, members, 6000)
    [delta] = peek(db, c)
    assert (delta.mpid, delta.attributes, delta.changed_ms) == (2, {"ltv": 6}, 5000)


def test_a_full_resend_queues_every_wanted_member_once(db):
    c = webhook()
    members = {1: email(1), 2: email(2)}
    diff(db, c, members, 1000)
    ack_all(db, c, take(db, c))
    cursor = db.cursor()
    frame = wanted(members | {3: email(3)})
    result = outbox.diff_connection(cursor, c, frame, 2000, resend=True)
    assert (result.adds, result.removes) == (3, 0) and {d.mpid for d in peek(db, c)} == {1, 2, 3}
    assert outbox.diff_connection(cursor, c, frame, 3000, resend=True).adds == 0   # already pending: kept


def test_erasure_rows_are_left_alone_by_the_diff_and_sent_with_the_held_identifiers(db):
    c = webhook()
    diff(db, c, {1: email(1), 2: email(2)}, 1000)
    ack_all(db, c, take(db, c))
    # what engine/erasure.py leaves for profile 1: one remove flagged erasure, its state row gone
    db.execute("INSERT INTO delivery_outbox (workspace_id, connection_id, seq, mpid, op, identifiers, changed_ms, "
               "next_attempt_ms, erasure, held_identifiers) VALUES (?, 1, 5, 1, 'remove', '{\"email\":\"new\"}', "
               "2000, 2000, true, ?)", [WS, _canonical(email(1))])
    db.execute("DELETE FROM delivery_state WHERE mpid = 1")
    assert outbox.due(db, c, 2000).due   # at once, whatever the thresholds
    diff(db, c, {2: email(2)}, 3000)   # not wanted, not held: a plain pending remove would be dropped here
    [delta] = take(db, c)
    assert (delta.mpid, delta.op, delta.identifiers, delta.held_identifiers) == (1, "remove", {"email": "new"},
                                                                                   email(1))
    # an add of the person acknowledged late (it was in flight during the erasure) does not bring the state back
    late = Delta(seq=1, mpid=1, op="add", identifiers=email(1))
    ack_all(db, c, [late])
    assert 1 not in held(db)
    ack_all(db, c, [delta])
    assert db.execute("SELECT count(*) FROM delivery_outbox WHERE mpid = 1").fetchall() == [(0,)]
    assert 1 not in held(db)


# --- due batches --------------------------------------------------------------------------------------------------

def test_due_by_age_or_by_count(db):
    c = webhook(upload={"max_age_seconds": 60, "max_queued": 3})
    diff(db, c, {1: email(1), 2: email(2)}, 1000)
    assert outbox.due(db, c, 2000) == outbox.Due(False, 2, 0, 61_000)
    assert outbox.due(db, c, 61_000).due
    diff(db, c, {1: email(1), 2: email(2), 3: email(3)}, 3000)
    assert outbox.due(db, c, 3000).due
    empty = webhook(2)
    assert outbox.due(db, empty, 3000) == outbox.Due(False, 0, 0, None)


def test_take_walks_the_queue_in_order_and_in_batches(db):
    c = webhook()
    diff(db, c, {m: email(m) for m in range(1, 8)}, 1000)
    first = outbox.take(db, c, 10_000, 3)
    assert [d.mpid for d in first] == [1, 2, 3]
    second = outbox.take(db, c, 10_000, 3, after_seq=first[-1].seq)
    assert [d.mpid for d in second] == [4, 5, 6]
    assert outbox.take(db, c, 500, 10) == []   # not before the rows' next_attempt_ms


# --- acknowledging ------------------------------------------------------------------------------------------------

def test_retry_later_backs_off_exponentially_and_honours_the_wait_asked_for(db):
    c = webhook()
    diff(db, c, {1: email(1), 2: email(2)}, 1000)
    deltas = take(db, c)
    result = ack_all(db, c, deltas, [RetryLater("HTTP 503", None, 503), RetryLater("HTTP 429", 30.0, 429)], 10_000)
    assert result == outbox.AckResult(0, 2, 0)
    rows = dict(db.execute("SELECT mpid, next_attempt_ms FROM delivery_outbox").fetchall())
    assert rows[1] == 10_000 + 2_000                       # first failure: base_seconds
    assert 10_000 + 30_000 <= rows[2] <= 10_000 + 33_000   # Retry-After, never shortened
    assert outbox.due(db, c, 11_000) == outbox.Due(False, 0, 0, 12_000)
    assert outbox.due(db, c, 12_000).due
    [again] = take(db, c, 12_000)
    assert again.attempts == 1   # counted when it was marked for sending the first time
    ack_all(db, c, [again], [RetryLater("HTTP 503", None, 503)], 12_000)
    assert db.execute("SELECT next_attempt_ms, attempts, last_error FROM delivery_outbox WHERE mpid = 1"
                      ).fetchall() == [(12_000 + 4_000, 2, "HTTP 503")]
    attempts = db.execute("SELECT deltas, acknowledged, retried, rejected, status FROM delivery_attempts "
                          "ORDER BY at_ms").fetchall()
    assert attempts == [(2, 0, 2, 0, 503), (1, 0, 1, 0, 503)]


def test_rejected_rows_are_parked_until_the_member_or_the_connection_changes(db):
    c = webhook()
    diff(db, c, {1: email(1), 2: email(2)}, 1000)
    ack_all(db, c, take(db, c), [Rejected("HTTP 400: bad email", 400), Acknowledged(200)], 10_000)
    assert held(db) == {2: email(2)}
    assert pending(db) == {1: ("add", email(1))}     # parked, not deleted: the next diff does not queue it again
    assert outbox.take(db, c, 10**12, 10) == [] and not outbox.due(db, c, 10**12).due
    assert diff(db, c, {1: email(1), 2: email(2)}, 20_000).adds == 0
    # a connection changed after the rejection unparks it
    assert outbox.unpark(db, c.id, 5_000, 30_000) == 0
    assert outbox.unpark(db, c.id, 15_000, 30_000) == 1
    assert [d.mpid for d in outbox.take(db, c, 30_000, 10)] == [1]
    # a member whose identifiers change gets a fresh add at once
    ack_all(db, c, take(db, c, 30_000), [Rejected("bad", 400)], 31_000)
    diff(db, c, {1: {"email": "fixed@example.com", "mpid": "1"}, 2: email(2)}, 32_000)
    assert [d.identifiers["email"] for d in outbox.take(db, c, 32_000, 10)] == ["fixed@example.com"]
    status = outbox.connection_status(db, 1, 40_000)
    assert status is None   # no delivery_connections row in this test; the view reads connections


def test_a_delta_that_may_have_been_applied_is_never_dropped_silently(db):
    c = webhook()
    diff(db, c, {1: email(1), 2: email(2)}, 1000)
    # a timeout: the destination may or may not have applied the adds
    ack_all(db, c, take(db, c), [RetryLater("ReadTimeout")] * 2, 10_000)
    # 1 leaves: not "cancelled" but a remove of what the add named, even though nothing is held
    result = diff(db, c, {2: email(2)}, 11_000)
    assert (result.adds, result.removes, result.cancelled) == (0, 1, 0)
    assert pending(db) == {1: ("remove", email(1)), 2: ("add", email(2))}
    # and coming back, it gets an add again (the remove may already have gone out meanwhile)
    diff(db, c, {1: email(1), 2: email(2)}, 12_000)
    assert pending(db) == {1: ("add", email(1)), 2: ("add", email(2))}
    # a replacement stays "possibly sent" (due at once, as a retry) until an acknowledgement settles it
    assert db.execute("SELECT min(attempts), max(next_attempt_ms) FROM delivery_outbox").fetchall() == [(1, 12_000)]
    ack_all(db, c, take(db, c, 12_000), at_ms=12_000)
    assert held(db) == {1: email(1), 2: email(2)} and pending(db) == {}
    # once settled, leaving before a send is a plain cancel again
    diff(db, c, {2: email(2)}, 13_000)
    diff(db, c, {1: email(1), 2: email(2)}, 13_500)
    assert pending(db) == {}


def test_a_held_member_whose_remove_may_have_been_applied_is_added_back(db):
    c = webhook()
    diff(db, c, {1: email(1)}, 1000)
    ack_all(db, c, take(db, c))
    diff(db, c, {}, 2000)
    take(db, c)   # the remove goes out; its answer never comes (the process dies)
    diff(db, c, {1: email(1)}, 3000)
    assert pending(db) == {1: ("add", email(1))}


def test_an_acknowledgement_records_what_was_sent_even_if_the_diff_moved_on(db):
    c = webhook()
    diff(db, c, {1: email(1), 2: email(2)}, 1000)
    in_flight = take(db, c)
    # while the request is out, 1 leaves and 2's email changes: the rows in flight are replaced
    diff(db, c, {2: {"email": "new2@example.com", "mpid": "2"}}, 2000)
    replacing = {1: ("remove", email(1)), 2: ("add", {"email": "new2@example.com", "mpid": "2"})}
    assert pending(db) == replacing
    ack_all(db, c, in_flight)
    # the destination holds what was sent; the replacing rows are still pending, and the next diff keeps them
    assert held(db) == {1: email(1), 2: email(2)}
    assert pending(db) == replacing
    assert diff(db, c, {2: {"email": "new2@example.com", "mpid": "2"}}, 3000) == outbox.DiffResult(0, 0, 0, 1, 2)
    assert pending(db) == replacing
    ack_all(db, c, take(db, c))
    assert held(db) == {2: {"email": "new2@example.com", "mpid": "2"}} and pending(db) == {}


def test_acknowledgement_lags_feed_the_status_view(db):
    c = webhook()
    db.execute("INSERT INTO delivery_connections VALUES (1, ?, ?, 'webhook', 'hook', 'active', '{}', 'x', NULL, 0, 0)",
               [WS, AUDIENCE])
    diff(db, c, {1: email(1), 2: email(2), 3: email(3)}, 1000)
    deltas = take(db, c)
    ack_all(db, c, deltas[:2], at_ms=5000)
    status = outbox.connection_status(db, 1, 6000)
    assert (status.pending_adds, status.pending_removes, status.held, status.last_success_ms) == (1, 0, 2, 5000)
    assert (status.lag_p50_ms, status.lag_max_ms, status.requests_24h) == (4000, 4000, 1)
    assert outbox.statuses(db, WS, 6000)[1] == status


# --- kill -9 between send and acknowledgement --------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import polars as pl
    sys.path.insert(0, {tests!r})
    from test_outbox import webhook, wanted, email
    from audiences import outbox
    from engine.store import open_database

    db = open_database({db!r})
    c = webhook()
    cursor = db.cursor()
    cursor.begin()
    outbox.diff_connection(cursor, c, wanted({{m: email(m) for m in {members!r}}}), 1000)
    cursor.commit()
    cursor.begin()
    deltas = outbox.take(cursor, c, 10_000, 1000)
    outbox.mark_sending(cursor, c.id, deltas)
    cursor.commit()
    with open({sink!r}, "a") as sink:   # "send": the destination applies the batch
        for d in deltas:
            sink.write(json.dumps({{"op": d.op, "mpid": d.mpid}}) + "\\n")
    os.kill(os.getpid(), signal.SIGKILL)   # before the acknowledgement commits
""")


def _destination(sink: Path) -> set[int]:
    members: set[int] = set()
    for line in sink.read_text().splitlines():
        message = json.loads(line)
        (members.add if message["op"] == "add" else members.discard)(message["mpid"])
    return members


def test_a_crash_between_send_and_acknowledgement_resends_and_ends_exact(tmp_path: Path):
    path, sink = str(tmp_path / "crash.duckdb"), tmp_path / "sink.jsonl"
    open_database(path).close()
    child = _CHILD.format(tests=str(Path(__file__).parent), db=path, members=[1, 2, 3], sink=str(sink))
    done = subprocess.run([sys.executable, "-c", child], cwd=Path(__file__).parent.parent, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert _destination(sink) == {1, 2, 3}
    db = open_database(path)
    try:
        c = webhook()
        assert held(db) == {} and sorted(pending(db)) == [1, 2, 3]   # the diff survived, the ack never happened
        # the membership moved on meanwhile: 3 left, 4 came
        diff(db, c, {1: email(1), 2: email(2), 4: email(4)}, 20_000)
        for _ in range(3):   # resend what is pending until nothing is; the destination applies sets
            deltas = take(db, c, 30_000)
            with sink.open("a") as out:
                for d in deltas:
                    out.write(json.dumps({"op": d.op, "mpid": d.mpid}) + "\n")
            ack_all(db, c, deltas, at_ms=30_000)
            diff(db, c, {1: email(1), 2: email(2), 4: email(4)}, 30_000)
        assert pending(db) == {}
        assert held(db) == {1: email(1), 2: email(2), 4: email(4)}
        assert _destination(sink) == {1, 2, 4}
    finally:
        db.close()


def test_no_pending_rows_are_left_for_a_diff_rolled_back(tmp_path: Path):
    db = open_database(str(tmp_path / "rollback.duckdb"))
    try:
        c = webhook()
        cursor = db.cursor()
        cursor.begin()
        outbox.diff_connection(cursor, c, wanted({1: email(1)}), 1000)
        cursor.rollback()
        assert pending(db) == {}
    finally:
        db.close()

