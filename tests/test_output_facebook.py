"""Facebook custom audiences output (audiences/outputs/facebook.py) over real HTTP against the fake Graph API
(tests/fakes/facebook.py on a loopback port): one audience per key plus the multi-key one, created once and
found again after a restart (ids in delivery_connections.remote, through the group-commit writer) or after a
lost answer (by description); adds and removes reach the fake's member sets exactly; 10,000-row requests in
sessions; hashes are SHA-256 of the normalized values; value-based rules; usersreplace; deleting downstream;
throttling backed off; an invalid token never retried; code 100 rejects one request's deltas."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import polars as pl
import pytest
from fakes import FakeFacebook, Fault

from audiences import fanout
from audiences.connections import Connection, ConnectionRegistry
from audiences.outputs.base import Acknowledged, AudienceRef, Delta, Rejected, RetryLater
from audiences.outputs.facebook import (
    MULTI_KEY,
    FacebookOutput,
    RegistryRemoteStore,
    delete_downstream,
    graph_failure,
    lookalike_value,
    regain_seconds,
)
from engine import store
from engine.secrets import MasterKey
from engine.writer import GroupCommitWriter

TOKEN = "fb-test-token"
ACCOUNT = "act_1234"
AUDIENCE = AudienceRef(7, "Big spenders", "big_spenders")


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


async def no_sleep(seconds: float) -> None:
    return None


class Env:
    """A real DuckDB file with the delivery tables, the group-commit writer and the connection registry; `restart`
    closes them and loads the registry again from the file, as a new process would."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.key = MasterKey(b"k" * 32)
        self._open()

    def _open(self) -> None:
        self.db = store.open_database(self.path)
        self.writer = GroupCommitWriter(self.db)
        self.registry = ConnectionRegistry(self.key)
        self.registry.load(self.db)

    def close(self) -> None:
        self.writer.close()
        self.db.close()

    def restart(self) -> None:
        self.close()
        self._open()

    def connection(self, fake: FakeFacebook, facebook: dict[str, Any] | None = None,
                   identity_types: list[str] | None = None, forward: dict[str, Any] | None = None,
                   credentials: dict[str, str] | None = None) -> Connection:
        body = {"output": "facebook", "credentials": credentials or {"access_token": TOKEN},
                "settings": {"base_url": fake.base_url,
                             "identity_types": identity_types or ["email", "mobile_number", "ios_idfa"],
                             "forward_attributes": forward or {},
                             "facebook": {"ad_account_id": ACCOUNT, **(facebook or {})}}}
        made, batch = self.registry.plan_create("ws1", AUDIENCE.id, body, known_ca=lambda ca_id: True)
        self.writer.submit(batch).result()
        self.registry.remember(made)
        return made

    def store(self) -> RegistryRemoteStore:
        return RegistryRemoteStore(self.registry, self.writer)

    def stored_remote(self, connection_id: int) -> dict[str, Any] | None:
        [(remote,)] = self.db.execute("SELECT remote FROM delivery_connections WHERE id = ?",
                                      [connection_id]).fetchall()
        return json.loads(remote) if remote else None


@pytest.fixture
def env(tmp_path) -> Iterator[Env]:
    environment = Env(str(tmp_path / "idmesh.duckdb"))
    yield environment
    environment.close()


@pytest.fixture
def fake() -> Iterator[FakeFacebook]:
    with FakeFacebook(access_tokens={TOKEN}) as server:
        yield server


def identifiers(connection: Connection, people: dict[int, dict[str, str]]) -> dict[int, dict[str, str]]:
    """What audiences/fanout.py makes of these people's raw identities (identity type -> raw value)."""
    rows = [(mpid, kind, raw, raw, 1) for mpid, held in people.items() for kind, raw in held.items()]
    frame = pl.DataFrame(rows, schema={"mpid": pl.Int64, "identity_type": pl.String, "value": pl.String,
                                       "raw_value": pl.String, "added_ms": pl.Int64}, orient="row")
    built = fanout.build_identifiers(connection, pl.Series(list(people), dtype=pl.Int64), frame)
    return {mpid: json.loads(text) for mpid, text in built.iter_rows()}


def adds(ids: dict[int, dict[str, str]], values: dict[int, object] | None = None,
         held: dict[int, dict[str, str]] | None = None) -> list[Delta]:
    return [Delta(seq=i, mpid=mpid, op="add", identifiers=found,
                  attributes={"ltv": values[mpid]} if values and mpid in values else {},
                  held_identifiers=(held or {}).get(mpid, {}))
            for i, (mpid, found) in enumerate(sorted(ids.items()), start=1)]


def removes(ids: dict[int, dict[str, str]]) -> list[Delta]:
    return [Delta(seq=1000 + i, mpid=mpid, op="remove", identifiers=found)
            for i, (mpid, found) in enumerate(sorted(ids.items()))]


def requests(fake: FakeFacebook, method: str | None = None, suffix: str = "") -> list:
    return [r for r in fake.requests() if (method is None or r.method == method) and r.path.endswith(suffix)]


def run(coroutine):
    return asyncio.run(coroutine)


PEOPLE = {
    1: {"email": " Jane.Doe@Example.com ", "mobile_number": "+1 (650) 555-1212", "ios_idfa": "AB-CD-EF"},
    2: {"email": "bob@example.com"},
    3: {"mobile_number": "0044 20 7946 0000", "ios_idfa": "11-22"},
}


# --- creation ---------------------------------------------------------------------------------------------------

def test_one_audience_per_key_created_once_and_reused_after_a_restart(env: Env, fake: FakeFacebook):
    connection = env.connection(fake, {"customer_file_source": "PARTNER_PROVIDED_ONLY", "multi_key": True},
                                identity_types=["email", "mobile_number", "ios_idfa", "customer_id"])
    people = {mpid: {**held, "customerid": f"user-{mpid}"} for mpid, held in PEOPLE.items()}
    ids = identifiers(connection, people)

    async def first() -> dict[str, str]:
        output = FacebookOutput(connection, AUDIENCE, store=env.store())
        try:
            assert await output.deliver(connection, adds(ids)) == [Acknowledged(200)] * 3
            assert sorted(output.last_report.created) == sorted(["EMAIL_SHA256", "PHONE_SHA256",
                                                                 "MOBILE_ADVERTISER_ID", MULTI_KEY])
            assert await output.deliver(connection, adds(ids)) == [Acknowledged(200)] * 3   # again: no creation
            assert output.last_report.created == []
            return output.audience_ids()
        finally:
            await output.aclose()

    created = run(first())
    assert len(requests(fake, "POST", "/customaudiences")) == 4
    audiences = fake.audiences()
    assert set(audiences) == set(created.values())
    for key, audience_id in created.items():
        view = audiences[audience_id]
        assert view.name == f"big_spenders {key}" and view.customer_file_source == "PARTNER_PROVIDED_ONLY"
        assert view.account_id == "1234" and not view.is_value_based and key in view.description
    # the ids are in delivery_connections.remote, committed
    stored = env.stored_remote(connection.id)
    assert stored["ad_account_id"] == ACCOUNT
    assert {key: entry["id"] for key, entry in stored["audiences"].items()} == created

    env.restart()   # a new process: the registry loads the connection with its remote
    reloaded = env.registry.find(connection.id)
    assert reloaded.remote == stored
    fake.log.clear()

    async def second() -> None:
        output = FacebookOutput(reloaded, AUDIENCE, store=env.store())
        try:
            assert await output.deliver(reloaded, adds(ids)) == [Acknowledged(200)] * 3
            assert output.audience_ids() == created and output.last_report.created == []
        finally:
            await output.aclose()

    run(second())
    assert requests(fake, suffix="/customaudiences") == []   # neither created nor listed
    assert len(fake.audiences()) == 4


def test_a_lost_creation_answer_is_adopted_by_description_not_created_twice(env: Env, fake: FakeFacebook):
    connection = env.connection(fake, identity_types=["email"])
    ids = identifiers(connection, {2: PEOPLE[2]})
    # as if a previous run created it and died before recording its id
    existing = fake.create_audience("1234", "big_spenders EMAIL_SHA256",
                                    description=f"idmesh connection {connection.id} ({connection.created_ms}), "
                                                f"audience {AUDIENCE.id}, EMAIL_SHA256")
    fake.create_audience("1234", "someone else's", description="idmesh connection 99 (1), audience 7, EMAIL_SHA256")

    async def go() -> None:
        output = FacebookOutput(connection, AUDIENCE, store=env.store())
        try:
            assert await output.deliver(connection, adds(ids)) == [Acknowledged(200)]
            assert output.last_report.adopted == ["EMAIL_SHA256"] and output.last_report.created == []
        finally:
            await output.aclose()

    run(go())
    assert requests(fake, "POST", "/customaudiences") == []
    assert fake.members(existing, "EMAIL") == {sha("bob@example.com")}
    assert env.stored_remote(connection.id)["audiences"]["EMAIL_SHA256"]["id"] == existing


# --- uploads ----------------------------------------------------------------------------------------------------

def test_hashes_are_sha256_of_normalized_values_and_requests_are_json(env: Env, fake: FakeFacebook):
    connection = env.connection(fake, {"multi_key": True},
                                identity_types=["email", "mobile_number", "ios_idfa", "customer_id"])
    ids = identifiers(connection, {1: {**PEOPLE[1], "customerid": "user-123"}})

    async def go() -> dict[str, str]:
        output = FacebookOutput(connection, AUDIENCE)
        try:
            assert await output.deliver(connection, adds(ids)) == [Acknowledged(200)]
            return output.audience_ids()
        finally:
            await output.aclose()

    created = run(go())
    email, phone = sha("jane.doe@example.com"), sha("16505551212")
    assert email == "86e0b9e56c17cc4d12387e1949b85053fbe73bc3ce5a1188713a9d300cc6133d"   # the spec's example
    assert fake.members(created["EMAIL_SHA256"], "EMAIL") == {email}
    assert fake.members(created["PHONE_SHA256"], "PHONE") == {phone}
    assert fake.members(created["MOBILE_ADVERTISER_ID"], "MADID") == {"ab-cd-ef"}   # lowercase, not hashed
    multi = fake.audience(created[MULTI_KEY])
    assert multi.persons == [{"EXTERN_ID": {"user-123"}, "EMAIL": {email}, "PHONE": {phone}, "MADID": {"ab-cd-ef"}}]
    uploads = requests(fake, "POST", "/users")
    assert len(uploads) == 4
    for request in uploads:
        assert request.headers["content-type"] == "application/json"
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        assert TOKEN not in request.query and TOKEN.encode() not in request.body
    single = next(r.json() for r in uploads if r.path.endswith(f"/{created['EMAIL_SHA256']}/users"))
    assert single["payload"] == {"schema": "EMAIL_SHA256", "is_raw": True, "data": [email]}
    assert single["session"]["batch_seq"] == 1 and single["session"]["last_batch_flag"] is True
    row = next(r.json() for r in uploads if r.path.endswith(f"/{created[MULTI_KEY]}/users"))["payload"]
    assert row["schema"] == ["EXTERN_ID", "EMAIL", "PHONE", "MADID"]
    assert row["data"] == [["user-123", email, phone, "ab-cd-ef"]]


def test_adds_and_removes_reach_the_member_sets_exactly(env: Env, fake: FakeFacebook):
    connection = env.connection(fake, identity_types=["email", "mobile_number"])
    people = {mpid: {"email": f"user{mpid}@example.com", **({"mobile_number": f"+1650555{mpid:04d}"}
                                                            if mpid % 3 else {})} for mpid in range(1, 41)}
    ids = identifiers(connection, people)
    # 5 members change their email (the add names the new one, the held old one must go), 10 leave
    moved_people = {mpid: {**people[mpid], "email": f"new{mpid}@example.com"} for mpid in range(1, 6)}
    moved = identifiers(connection, moved_people)
    leaving = {mpid: ids[mpid] for mpid in range(31, 41)}

    async def go() -> dict[str, str]:
        output = FacebookOutput(connection, AUDIENCE)
        try:
            assert set(await output.deliver(connection, adds(ids))) == {Acknowledged(200)}
            # a remove that names a held value and an add that moves one, in one call, with a resend of the same
            batch = removes(leaving) + adds(moved, held={m: ids[m] for m in moved})
            for _ in range(2):   # at least once: a resend changes nothing
                assert set(await output.deliver(connection, batch)) == {Acknowledged(200)}
            return output.audience_ids()
        finally:
            await output.aclose()

    created = run(go())
    wanted = {mpid: moved.get(mpid, ids[mpid]) for mpid in range(1, 31)}
    assert fake.members(created["EMAIL_SHA256"], "EMAIL") == {found["EMAIL"] for found in wanted.values()}
    assert fake.members(created["PHONE_SHA256"], "PHONE") == {found["PHONE"] for found in wanted.values()
                                                              if "PHONE" in found}
    assert sha("user1@example.com") not in fake.members(created["EMAIL_SHA256"], "EMAIL")
    # within a call, an audience's removes go before its adds
    paths = [(r.method, r.path) for r in requests(fake, suffix="/users")][-4:]
    email_calls = [method for method, path in paths if created["EMAIL_SHA256"] in path]
    assert email_calls == ["DELETE", "POST"]


def test_10000_rows_per_request_in_sessions(env: Env, fake: FakeFacebook):
    connection = env.connection(fake, identity_types=["email"])
    count = 25_000
    deltas = [Delta(seq=i, mpid=i, op="add", identifiers={"EMAIL": sha(f"member{i}@example.com")})
              for i in range(1, count + 1)]
    sessions: list[int] = []

    def session_id() -> int:
        sessions.append(900 + len(sessions))
        return sessions[-1]

    async def go() -> str:
        output = FacebookOutput(connection, AUDIENCE, session_ids=session_id)
        try:
            assert output.batch_limit(connection) >= count   # one call fills several requests of one session
            outcomes = await output.deliver(connection, deltas)
            assert outcomes == [Acknowledged(200)] * count
            assert output.last_report.fills == [10_000, 10_000, 5_000]
            assert output.last_report.num_received == count and output.last_report.invalid_entries == 0
            return output.audience_ids()["EMAIL_SHA256"]
        finally:
            await output.aclose()

    audience_id = run(go())
    uploads = requests(fake, "POST", "/users")
    assert [len(r.json()["payload"]["data"]) for r in uploads] == [10_000, 10_000, 5_000]
    assert [r.json()["session"] for r in uploads] == [
        {"session_id": 900, "batch_seq": seq, "last_batch_flag": seq == 3, "estimated_num_total": count}
        for seq in (1, 2, 3)]
    assert len(fake.members(audience_id, "EMAIL")) == count
    record = fake.audience(audience_id).sessions["900"]
    assert record.batches == {1: 10_000, 2: 10_000, 3: 5_000} and record.last_batch_seq == 3


def test_batch_size_setting_caps_the_rows_per_request(env: Env, fake: FakeFacebook):
    connection = env.connection(fake, {"batch_size": 1000}, identity_types=["email"])
    deltas = [Delta(seq=i, mpid=i, op="add", identifiers={"EMAIL": sha(f"m{i}@x.io")}) for i in range(1, 2501)]

    async def go() -> None:
        output = FacebookOutput(connection, AUDIENCE)
        try:
            assert output.batch_limit(connection) == 5000
            assert set(await output.deliver(connection, deltas)) == {Acknowledged(200)}
            assert output.last_report.fills == [1000, 1000, 500]
        finally:
            await output.aclose()

    run(go())


def test_invalid_entries_are_counted_and_acknowledged(env: Env, fake: FakeFacebook):
    connection = env.connection(fake, identity_types=["email"])
    deltas = [Delta(1, 1, "add", {"EMAIL": sha("ok@example.com")}), Delta(2, 2, "add", {"EMAIL": "not-a-hash"})]

    async def go() -> None:
        output = FacebookOutput(connection, AUDIENCE)
        try:
            assert await output.deliver(connection, deltas) == [Acknowledged(200)] * 2
            assert output.last_report.invalid_entries == 1 and output.totals.invalid_entries == 1
            assert "not-a-hash" in output.last_report.invalid_samples
        finally:
            await output.aclose()

    run(go())


# --- value-based ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("allow_zero", [False, True])
def test_value_based_audiences_send_positive_values_only(env: Env, fake: FakeFacebook, allow_zero: bool):
    connection = env.connection(fake, {"value_based": {"calculated_attribute_id": 12, "allow_zero": allow_zero}},
                                identity_types=["email"], forward={"calculated": [12]})
    values: dict[int, object] = {1: 120.5, 2: 0, 3: -4, 4: "17", 6: "n/a", 7: True}   # 5 has no value
    ids = {mpid: {"EMAIL": sha(f"v{mpid}@example.com")} for mpid in range(1, 8)}

    async def go() -> tuple[list, str]:
        # the calculated attribute's name is not in the connection: the one forwarded non-user attribute is it
        output = FacebookOutput(connection, AUDIENCE)
        try:
            outcomes = await output.deliver(connection, adds(ids, values))
            assert output.last_report.skipped_values == (4 if allow_zero else 5)
            return outcomes, output.audience_ids()["EMAIL_SHA256"]
        finally:
            await output.aclose()

    outcomes, audience_id = run(go())
    sent = {1, 4, 2} if allow_zero else {1, 4}
    assert [isinstance(o, Acknowledged) for o in outcomes] == [mpid in sent for mpid in range(1, 8)]
    assert all("value-based" in o.reason for o in outcomes if isinstance(o, Rejected))
    assert "negative" in outcomes[2].reason
    view = fake.audience(audience_id)
    assert view.is_value_based
    expected = {1: 120.5, 4: 17, 2: 0}
    assert view.values == {("EMAIL", ids[m]["EMAIL"]): expected[m] for m in sent}
    upload = requests(fake, "POST", "/users")[0].json()["payload"]
    assert upload["schema"] == ["EMAIL", "LOOKALIKE_VALUE"]
    assert all(row[1] >= 0 for row in upload["data"])
    assert (creation := requests(fake, "POST", "/customaudiences")[0].json())["is_value_based"] is True
    assert creation["customer_file_source"] == "USER_PROVIDED_ONLY"


def test_value_based_removes_and_an_explicit_value_attribute(env: Env, fake: FakeFacebook):
    connection = env.connection(fake, {"value_based": {"user_attribute": "ltv"}}, identity_types=["email"])
    ids = {mpid: {"EMAIL": sha(f"w{mpid}@example.com")} for mpid in (1, 2)}

    async def go() -> str:
        output = FacebookOutput(connection, AUDIENCE)
        try:
            assert await output.deliver(connection, adds(ids, {1: 5, 2: 9})) == [Acknowledged(200)] * 2
            assert await output.deliver(connection, removes({1: ids[1]})) == [Acknowledged(200)]
            return output.audience_ids()["EMAIL_SHA256"]
        finally:
            await output.aclose()

    audience_id = run(go())
    assert fake.members(audience_id, "EMAIL") == {ids[2]["EMAIL"]}
    assert lookalike_value("3.0", False) == (3, None) and lookalike_value(float("nan"), True)[0] is None


# --- full resync ------------------------------------------------------------------------------------------------

def test_usersreplace_replaces_every_audience_in_one_session_each(env: Env, fake: FakeFacebook):
    connection = env.connection(fake, {"batch_size": 1000}, identity_types=["email", "mobile_number"])
    before = identifiers(connection, PEOPLE)
    now = {mpid: {"EMAIL": sha(f"r{mpid}@example.com")} for mpid in range(1, 2501)}   # nobody has a phone now
    fake.faults.configure(match=r"usersreplace")
    fake.faults.force(Fault.THROTTLE, None, Fault.SERVER_ERROR)   # batch 1 throttled, batch 2 answered 5xx

    async def go() -> tuple[Any, dict[str, str]]:
        output = FacebookOutput(connection, AUDIENCE, session_ids=iter(range(500, 600)).__next__, sleep=no_sleep)
        try:
            assert set(await output.deliver(connection, adds(before))) == {Acknowledged(200)}
            members = [Delta(0, mpid, "add", found) for mpid, found in now.items()]
            return await output.replace_all(connection, members), output.audience_ids()
        finally:
            await output.aclose()

    result, created = run(go())
    assert result.completed and result.outcomes == [Acknowledged(200)] * 2500
    assert fake.members(created["EMAIL_SHA256"], "EMAIL") == {found["EMAIL"] for found in now.values()}
    assert fake.members(created["PHONE_SHA256"], "PHONE") == set()   # emptied: no member holds a phone now
    email_session = result.sessions["EMAIL_SHA256"]
    replaced = [r.json() for r in requests(fake, "POST", "/usersreplace") if r.status == 200
                and r.json()["session"]["session_id"] == int(email_session)]
    assert sorted((b["session"]["batch_seq"], b["session"]["last_batch_flag"], len(b["payload"]["data"]))
                  for b in replaced) == [(1, False, 1000), (2, False, 1000), (3, True, 500)]
    record = fake.audience(created["EMAIL_SHA256"]).sessions[email_session]
    assert record.status == "finished" and record.last_batch_seq == 3
    assert fake.audience(created["PHONE_SHA256"]).sessions[result.sessions["PHONE_SHA256"]].status == "finished"


def test_usersreplace_value_based_skips_members_without_a_positive_value(env: Env, fake: FakeFacebook):
    connection = env.connection(fake, {"value_based": {"user_attribute": "ltv"}}, identity_types=["email"])
    members = adds({m: {"EMAIL": sha(f"z{m}@x.io")} for m in (1, 2, 3)}, {1: 10, 2: -1, 3: 0})

    async def go() -> Any:
        output = FacebookOutput(connection, AUDIENCE)
        try:
            return await output.replace_all(connection, members), output.audience_ids()["EMAIL_SHA256"]
        finally:
            await output.aclose()

    result, audience_id = run(go())
    assert result.completed and result.report.skipped_values == 2
    assert [type(o) for o in result.outcomes] == [Acknowledged, Rejected, Rejected]
    assert fake.audience(audience_id).values == {("EMAIL", sha("z1@x.io")): 10}


# --- deleting downstream ----------------------------------------------------------------------------------------

def test_delete_downstream_deletes_every_created_audience(env: Env, fake: FakeFacebook):
    connection = env.connection(fake, {"multi_key": True})
    ids = identifiers(connection, PEOPLE)

    async def create() -> dict[str, str]:
        output = FacebookOutput(connection, AUDIENCE, store=env.store())
        try:
            await output.deliver(connection, adds(ids))
            return output.audience_ids()
        finally:
            await output.aclose()

    created = run(create())
    assert len(created) == 4
    stored = env.registry.find(connection.id)   # what the connections code holds when it deletes
    gone_already = created["PHONE_SHA256"]
    httpx.delete(f"{fake.base_url}/v25.0/{gone_already}", headers={"Authorization": f"Bearer {TOKEN}"})
    result = run(delete_downstream(stored))
    assert sorted(result.deleted) == sorted(created.values()) and result.failed == {}
    assert fake.audiences() == {}
    assert all(fake.audience(i).deleted for i in created.values())


def test_delete_downstream_respects_the_setting_and_reports_failures(env: Env, fake: FakeFacebook):
    kept = env.connection(fake, {"delete_on_audience_delete": False}, identity_types=["email"])
    audience_id = fake.create_audience("1234", "kept")
    with_remote = Connection(**{**kept.__dict__, "remote": {"ad_account_id": ACCOUNT,
                                                           "audiences": {"EMAIL_SHA256": {"id": audience_id}}}})
    assert run(delete_downstream(with_remote)).skipped
    assert not fake.audience(audience_id).deleted
    fake.configure(access_tokens={"another"})
    result = run(delete_downstream(with_remote, force=True, sleep=no_sleep))
    assert result.deleted == [] and "access token" in result.failed[audience_id]


# --- failures ---------------------------------------------------------------------------------------------------

def test_throttling_is_backed_off_then_succeeds(env: Env, fake: FakeFacebook):
    connection = env.connection(fake, identity_types=["email"])
    ids = {mpid: {"EMAIL": sha(f"t{mpid}@example.com")} for mpid in (1, 2, 3)}
    now = [0.0]

    async def go() -> str:
        output = FacebookOutput(connection, AUDIENCE, clock=lambda: now[0])
        try:
            # a throttling answer (code 17/613/80003, HTTP 400) with no wait: the outbox's backoff decides
            fake.faults.configure(match=r"/users$")
            fake.faults.force(Fault.THROTTLE)
            outcomes = await output.deliver(connection, adds(ids))
            assert all(isinstance(o, RetryLater) and o.after_seconds is None and "throttled" in o.reason
                       for o in outcomes)
            assert await output.deliver(connection, adds(ids)) == [Acknowledged(200)] * 3
            # the account's budget spent: the usage header says when access comes back, in minutes
            fake.configure(rate_limit=1, rate_window_seconds=600)
            assert set(await output.deliver(connection, adds(ids))) == {Acknowledged(200)}
            sent = len(fake.requests())
            outcomes = await output.deliver(connection, adds(ids))
            wait = outcomes[0].after_seconds   # whole minutes until the fake's window ends, 10 at most
            assert wait in {60.0 * minutes for minutes in range(1, 11)}
            assert all(isinstance(o, RetryLater) and o.after_seconds == wait for o in outcomes)
            assert len(fake.requests()) == sent + 1
            # until then nothing is sent at all
            now[0] += wait - 1
            outcomes = await output.deliver(connection, adds(ids))
            assert all(isinstance(o, RetryLater) and 0 < o.after_seconds <= 1 for o in outcomes)
            assert len(fake.requests()) == sent + 1
            now[0] += 2
            fake.configure(rate_limit=190_000)
            assert await output.deliver(connection, adds(ids)) == [Acknowledged(200)] * 3
            return output.audience_ids()["EMAIL_SHA256"]
        finally:
            await output.aclose()

    audience_id = run(go())
    assert fake.members(audience_id, "EMAIL") == {found["EMAIL"] for found in ids.values()}


def test_an_invalid_token_is_rejected_and_never_retried(env: Env, fake: FakeFacebook):
    connection = env.connection(fake, {"multi_key": True}, credentials={"access_token": "expired"})
    ids = identifiers(connection, PEOPLE)

    async def go() -> list:
        output = FacebookOutput(connection, AUDIENCE, sleep=no_sleep)
        try:
            return await output.deliver(connection, adds(ids))
        finally:
            await output.aclose()

    outcomes = run(go())
    assert all(isinstance(o, Rejected) and "code 190" in o.reason and "credentials.access_token" in o.reason
               for o in outcomes)
    assert len(fake.requests()) == 1   # the first request failed; nothing else was tried

    # with audiences in place, an upload refused for the token stops the call too
    good = env.connection(fake, identity_types=["email", "mobile_number"])
    good_ids = identifiers(good, PEOPLE)

    async def again() -> list:
        output = FacebookOutput(good, AUDIENCE)
        try:
            await output.deliver(good, adds(good_ids))
            fake.configure(access_tokens={"rotated"})
            fake.log.clear()
            return await output.deliver(good, adds(good_ids))
        finally:
            await output.aclose()

    outcomes = run(again())
    assert all(isinstance(o, Rejected) and "code 190" in o.reason for o in outcomes)
    assert len(fake.requests()) == 1


def test_code_100_rejects_only_that_requests_deltas(env: Env, fake: FakeFacebook):
    connection = env.connection(fake, identity_types=["email", "mobile_number"])
    fake.configure(max_rows=2)   # the fake refuses more than 2 rows with code 100
    ids = {1: {"EMAIL": sha("a@x.io")}, 2: {"EMAIL": sha("b@x.io")}, 3: {"EMAIL": sha("c@x.io")},
           4: {"PHONE": sha("15550001")}}

    async def go() -> tuple[list, dict[str, str]]:
        output = FacebookOutput(connection, AUDIENCE)
        try:
            return await output.deliver(connection, adds(ids)), output.audience_ids()
        finally:
            await output.aclose()

    outcomes, created = run(go())
    assert all(isinstance(o, Rejected) and "code 100" in o.reason for o in outcomes[:3])
    assert outcomes[3] == Acknowledged(200)
    assert fake.members(created["PHONE_SHA256"], "PHONE") == {sha("15550001")}
    assert fake.members(created["EMAIL_SHA256"], "EMAIL") == set()


def test_an_audience_deleted_outside_is_created_again(env: Env, fake: FakeFacebook):
    connection = env.connection(fake, identity_types=["email"])
    ids = {1: {"EMAIL": sha("g@x.io")}}

    async def go() -> tuple[str, str]:
        output = FacebookOutput(connection, AUDIENCE, store=env.store())
        try:
            await output.deliver(connection, adds(ids))
            first = output.audience_ids()["EMAIL_SHA256"]
            httpx.delete(f"{fake.base_url}/v25.0/{first}", headers={"Authorization": f"Bearer {TOKEN}"})
            outcomes = await output.deliver(connection, adds(ids))
            assert isinstance(outcomes[0], RetryLater) and "gone" in outcomes[0].reason
            assert await output.deliver(connection, adds(ids)) == [Acknowledged(200)]
            return first, output.audience_ids()["EMAIL_SHA256"]
        finally:
            await output.aclose()

    first, second = run(go())
    assert first != second and fake.members(second, "EMAIL") == {sha("g@x.io")}
    assert env.stored_remote(connection.id)["audiences"]["EMAIL_SHA256"]["id"] == second


def test_app_secret_proof_is_sent(env: Env, fake: FakeFacebook):
    fake.configure(app_secret="shh")
    connection = env.connection(fake, identity_types=["email"],
                                credentials={"access_token": TOKEN, "app_secret": "shh"})

    async def go() -> list:
        output = FacebookOutput(connection, AUDIENCE)
        try:
            return await output.deliver(connection, adds({1: {"EMAIL": sha("p@x.io")}}))
        finally:
            await output.aclose()

    assert run(go()) == [Acknowledged(200)]


def test_transport_errors_and_5xx_are_retried(env: Env, fake: FakeFacebook):
    connection = env.connection(fake, identity_types=["email"])
    ids = {1: {"EMAIL": sha("q@x.io")}}
    fake.faults.configure(match=r"/users$", delay_seconds=0.0)

    async def go() -> None:
        output = FacebookOutput(connection, AUDIENCE)
        try:
            for fault in (Fault.SERVER_ERROR, Fault.RESET, Fault.RESET_APPLIED):
                fake.faults.force(fault)
                outcome = (await output.deliver(connection, adds(ids)))[0]
                assert isinstance(outcome, RetryLater), (fault, outcome)
            assert await output.deliver(connection, adds(ids)) == [Acknowledged(200)]
        finally:
            await output.aclose()

    run(go())


def test_a_failed_request_does_not_hold_back_the_others_of_the_call(env: Env, fake: FakeFacebook):
    """Rows of different requests are independent: a 5xx, a reset or a timeout retries that request's rows, and
    the call's other requests still go out, so rows later in a call are not left unsent (yet counted as attempted,
    their backoff growing) whenever an earlier request meets a passing failure. Throttling still stops the call."""
    connection = env.connection(fake, {"batch_size": 2}, identity_types=["email"])
    ids = {m: {"EMAIL": sha(f"r{m}@x.io")} for m in range(1, 9)}   # four requests of two rows
    fake.faults.configure(match=r"/users$", delay_seconds=0.0)

    async def go() -> list[list]:
        output = FacebookOutput(connection, AUDIENCE)
        try:
            answers = []
            for fault in (Fault.SERVER_ERROR, Fault.RESET, Fault.THROTTLE):
                fake.faults.force(None, fault)
                answers.append(await output.deliver(connection, adds(ids)))
            return answers
        finally:
            await output.aclose()

    server_error, reset, throttle = [[type(o).__name__ for o in outcomes] for outcomes in run(go())]
    assert server_error == reset == ["Acknowledged"] * 2 + ["RetryLater"] * 2 + ["Acknowledged"] * 4
    assert throttle == ["Acknowledged"] * 2 + ["RetryLater"] * 6
    assert [len(r.json()["payload"]["data"]) for r in requests(fake, "POST", "/users")] == [2] * 10


def test_usage_header_and_error_classification():
    def answer(status: int, body: dict, headers: dict | None = None) -> httpx.Response:
        return httpx.Response(status, json=body, headers=headers or {})

    usage = {"x-business-use-case-usage": json.dumps(
        {"1234": [{"type": "custom_audience", "call_count": 100, "estimated_time_to_regain_access": 3}]})}
    assert regain_seconds(answer(400, {}, usage)) == 180.0
    assert regain_seconds(answer(400, {}, {"x-business-use-case-usage": "nope"})) is None
    for code in (4, 17, 32, 613, 80000, 80003, 80014):
        failure = graph_failure(answer(400, {"error": {"code": code, "message": "slow down"}}, usage), "upload")
        assert isinstance(failure.outcome, RetryLater) and failure.outcome.after_seconds == 180.0 and failure.stop
    token = graph_failure(answer(400, {"error": {"code": 190, "message": "Invalid OAuth access token"}}), "upload")
    assert isinstance(token.outcome, Rejected) and token.stop
    bad_row = graph_failure(answer(400, {"error": {"code": 100, "message": "Invalid parameter"}}), "upload")
    assert isinstance(bad_row.outcome, Rejected) and not bad_row.stop and not bad_row.gone
    gone = graph_failure(answer(400, {"error": {"code": 100, "error_subcode": 33, "message": "x"}}), "upload")
    assert gone.gone and isinstance(gone.outcome, RetryLater)
    for body in ({"error": {"code": 2, "message": "x"}}, {"error": {"code": 2650, "message": "replace runs"}}):
        assert isinstance(graph_failure(answer(400, body), "upload").outcome, RetryLater)
    assert isinstance(graph_failure(answer(503, {}), "upload").outcome, RetryLater)
    assert isinstance(graph_failure(answer(403, {"error": {"code": 200, "message": "no"}}), "x").outcome, Rejected)


def test_without_a_store_a_new_output_finds_the_audiences_before_removing(env: Env, fake: FakeFacebook):
    connection = env.connection(fake, identity_types=["email"])
    ids = {1: {"EMAIL": sha("s1@x.io")}, 2: {"EMAIL": sha("s2@x.io")}}

    async def go() -> str:
        first = FacebookOutput(connection, AUDIENCE)   # ids in memory only
        try:
            await first.deliver(connection, adds(ids))
            audience_id = first.audience_ids()["EMAIL_SHA256"]
        finally:
            await first.aclose()
        second = FacebookOutput(connection, AUDIENCE)   # a restart that recorded nothing
        try:
            assert await second.deliver(connection, removes({1: ids[1]})) == [Acknowledged(200)]
            assert second.last_report.adopted == ["EMAIL_SHA256"] and second.last_report.requests == 1
        finally:
            await second.aclose()
        return audience_id

    audience_id = run(go())
    assert fake.members(audience_id, "EMAIL") == {sha("s2@x.io")} and len(fake.audiences()) == 1
