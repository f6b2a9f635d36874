"""Erasure (a DSR of type erasure): remove one person from every table, the identity graph and the alias ledger,
and keep only what stops their data from coming back.

What goes: the profile, its identities, its identity_changes rows, aliases and alias effects naming its MPID,
its user attributes, consent and consent history, its events and the alias copies of them on other profiles,
its batches (their envelopes hold identities and attributes), its calculated attribute values and seeds, its
audience memberships past and present, what destinations were sent about it (delivery_state) and its pending
deliveries (delivery_outbox), access exports made for it, and the MPID and identities in any stored request. Rows
of *other* profiles that name the person lose those names: the MPID in `identity_changes.other_mpid` and in
reasons, the person's values in `identity_changes.value`. A quarantined hub value goes only if no other profile
holds it.

Destinations are told: every connection whose destination holds the person (a delivery_state row) or may hold
them (a pending row already taken for sending, `attempts > 0`: its request may have been applied) gets one outbox
remove flagged `erasure`, naming the exact identifiers held (for a possibly-sent add, what it named; the state's
identifiers ride along in `held_identifiers` when they differ). These rows replace the person's delivery_state
and outbox rows: until the normal flush has them acknowledged they are the only rows naming the person (MPID and
identifiers as sent, hashed or not), and the acknowledgement deletes them (audiences/outbox.py). The diff never
touches them. A pending add that was never taken is dropped: its destination never heard of the person.

What stays: a tombstone per erased identity (engine/tombstones.py) so a later identify, login, modify or batch
ignores it, and the replay keys of the deleted batches (already 64-bit digests) so replaying them stores
nothing. Erased identities are the profile's current ones, the request's, and every value its own ledger
named, except values another profile holds now (a shared device id is theirs too). Audience size points stay:
counts name nobody, and a size that counted the person was true when it was recorded (`audience_stats` counts
the current members, so it drops the person at once). Each erasure adds a row to `erasure_events` (types and
tombstone hashes, no values); its `forwarded_ms` is the erasure's time when removes were queued, NULL when no
destination held the person.

It runs as one writer transaction after folding the journal (`fold_first`), so the base tables hold every
acknowledged row when the deletes run; the in-memory state changes synchronously before the commit is awaited,
so no request planned afterwards can reach the profile. engine/dsr.py runs it holding the computation gate
(engine/computation_gate.py) alone: no calculated attribute computation writes value rows meanwhile, and no
delivery diff, take or acknowledgement (audiences/delivery.py runs them inside the gate) meets its rewrite of the
person's delivery rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb
import orjson

from engine.idsync import IdSyncService
from engine.store import now_ms
from engine.workspaces import Workspace
from engine.writer import WriteBatch
from strategies.model import IdentityKey

# table -> the condition naming the person ($1 is the MPID)
_DELETES = (
    ("profiles_base", "mpid = $1"),
    ("identities_base", "mpid = $1"),
    ("identity_changes_base", "mpid = $1"),
    ("aliases_base", "source_mpid = $1 OR destination_mpid = $1"),
    ("alias_effects", "source_mpid = $1 OR destination_mpid = $1"),
    ("events_base", "mpid = $1 OR copied_from_mpid = $1"),
    ("batches_base", "mpid = $1"),
    ("user_attributes_base", "mpid = $1"),
    ("consent_history_base", "mpid = $1"),
    ("dsr_exports", "mpid = $1"),
    ("calculated_attribute_values", "mpid = $1"),
    ("calculated_attribute_seeds", "mpid = $1"),
    ("audience_membership_history", "mpid = $1"),
)

# One erasure remove per connection whose destination holds the person, or may (a pending row taken for sending):
# named as the possibly-sent add named them, else as held; seq above every row of the connection. $1 MPID, $2 now.
_QUEUE_REMOVES = """
INSERT INTO delivery_outbox (workspace_id, connection_id, seq, mpid, op, identifiers, attributes, changed_ms,
                             attempts, next_attempt_ms, last_error, erasure, held_identifiers)
SELECT workspace_id, connection_id,
       (SELECT coalesce(max(o.seq), 0) + 1 FROM delivery_outbox o WHERE o.connection_id = r.connection_id),
       $1, 'remove', identifiers, NULL, $2, 0, $2, NULL, true,
       CASE WHEN held::VARCHAR IS DISTINCT FROM identifiers::VARCHAR THEN held END
FROM (SELECT coalesce(s.workspace_id, p.workspace_id) AS workspace_id,
             coalesce(s.connection_id, p.connection_id) AS connection_id,
             CASE WHEN p.op = 'add' OR s.identifiers IS NULL THEN p.identifiers ELSE s.identifiers END AS identifiers,
             s.identifiers AS held
      FROM (SELECT * FROM delivery_state WHERE mpid = $1) s
      FULL JOIN (SELECT * FROM delivery_outbox WHERE mpid = $1 AND NOT erasure AND attempts > 0) p
             ON p.connection_id = s.connection_id) r
"""

_KEYS = "(SELECT unnest($1::VARCHAR[]) AS t, unnest($2::VARCHAR[]) AS v) AS k"  # $3: the scope


@dataclass
class ErasurePlan:
    mpid: int
    scope: str
    erased: set[IdentityKey]
    deleted_rows: int = 0  # set by the statement inside the transaction
    digests: list[str] = field(default_factory=list)


def read_ledger_values(connection: duckdb.DuckDBPyConnection, mpid: int) -> list[IdentityKey]:
    """Every (type, value) the profile's own identity_changes rows name: values it holds, held, or was refused."""
    cursor = connection.cursor()
    try:
        rows = cursor.execute("SELECT DISTINCT identity_type, value FROM identity_changes "
                              "WHERE mpid = ? AND identity_type IS NOT NULL AND value IS NOT NULL", [mpid]).fetchall()
    finally:
        cursor.close()
    return [(t, v) for t, v in rows]


def plan_erasure(service: IdSyncService, workspace: Workspace, mpid: int, request_keys: set[IdentityKey],
                 ledger_values: list[IdentityKey], subject_request_id: str) -> tuple[ErasurePlan, WriteBatch]:
    """Forget the profile in memory now and return the transaction that deletes it. The caller commits the
    batch; if that fails it must reload the graphs, aliases and tombstones from the database."""
    graph = service.graph(workspace)
    record = graph.remove_profile(mpid)
    held = set(record.identity_keys()) if record is not None else set()
    erased = {key for key in held | request_keys | set(ledger_values) if not graph.holders(*key)}
    lone_hubs = sorted(key for key in held if key in graph.quarantined and not graph.holders(*key))
    graph.quarantined.difference_update(lone_hubs)
    service.aliases.forget_profile(mpid)
    plan = ErasurePlan(mpid, graph.scope, erased)
    plan.digests = sorted({service.tombstones.digest(graph.scope, t, v) for t, v in erased})
    for digest in plan.digests:
        service.tombstones.add(graph.scope, digest)
    at = now_ms()
    erased_keys = sorted(erased)

    def erase(cur: duckdb.DuckDBPyConnection) -> None:
        # the replay keys outlive the batches, so a replay is still answered `duplicate`
        cur.execute("""INSERT INTO erased_replay_keys
                       SELECT workspace_id, batch_key FROM batches_base WHERE mpid = $1
                       UNION ALL SELECT workspace_id, request_key FROM batches_base
                       WHERE mpid = $1 AND request_key IS NOT NULL""", [mpid])
        deleted = 0
        for table, condition in _DELETES:
            deleted += cur.execute(f"DELETE FROM {table} WHERE {condition}", [mpid]).fetchone()[0]
        # what destinations hold becomes removes to send: the only delivery rows left naming the person
        queued = cur.execute(_QUEUE_REMOVES, [mpid, at]).fetchone()[0]
        deleted += cur.execute("DELETE FROM delivery_state WHERE mpid = $1", [mpid]).fetchone()[0]
        deleted += cur.execute("DELETE FROM delivery_outbox WHERE mpid = $1 AND NOT erasure", [mpid]).fetchone()[0]
        # other profiles' ledger rows keep what happened to them, without naming the person
        cur.execute("UPDATE identity_changes_base SET other_mpid = NULL WHERE other_mpid = $1", [mpid])
        cur.execute("UPDATE identity_changes_base SET reason = replace(reason, $1, '(erased)') "
                    "WHERE contains(reason, $1)", [str(mpid)])
        if erased_keys:
            types, values = [t for t, _ in erased_keys], [v for _, v in erased_keys]
            cur.execute(f"""UPDATE identity_changes_base SET value = NULL WHERE scope = $3 AND EXISTS
                            (SELECT 1 FROM {_KEYS} WHERE k.t = identity_type AND k.v = value)""",
                        [types, values, plan.scope])
        if lone_hubs:
            cur.execute(f"""DELETE FROM hub_values_base WHERE scope = $3 AND EXISTS
                            (SELECT 1 FROM {_KEYS} WHERE k.t = identity_type AND k.v = value)""",
                        [[t for t, _ in lone_hubs], [v for _, v in lone_hubs], plan.scope])
        cur.execute("UPDATE dsr_requests SET mpid = NULL, subject_identities = NULL WHERE mpid = $1", [mpid])
        cur.execute("INSERT INTO erased_identities SELECT $1, unnest($2::VARCHAR[]), $3", [plan.scope, plan.digests, at])
        cur.execute("INSERT INTO erasure_events VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [workspace.id, subject_request_id, at, orjson.dumps(sorted({t for t, _ in erased})).decode(),
                     orjson.dumps(plan.digests).decode(), deleted, at if queued else None])
        plan.deleted_rows = deleted

    batch = WriteBatch(fold_first=True)
    batch.statements.append(erase)
    return plan, batch
