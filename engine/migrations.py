"""Versioned schema migrations. Append new ones; never edit an applied one.

Writes land in `write_journal` and are folded into the `*_base` tables; the public names are views over both
(see engine/journal.py). A migration that changes the journal layout must recreate the views.
"""

from __future__ import annotations

from engine import audience_schema, ca_schema, delivery_schema, dsr_store, event_journal
from engine.journal import JOURNAL_DDL, view_statements

_COMMENTS = """
COMMENT ON COLUMN workspaces.secret_hash IS 'SHA-256 of the API secret; the secret itself is never stored in clear';
COMMENT ON COLUMN workspaces.secret_sealed IS 'API secret sealed with the server master key (AES-GCM), for HMAC auth';
COMMENT ON VIEW profiles IS 'One row per person (MPID)';
COMMENT ON COLUMN profiles.scope IS 'identity scope: the workspace id whose identity graph holds the profile';
COMMENT ON COLUMN profiles.status IS
    'active, or orphaned: lost its last identifier to a unique-id steal, never returned';
COMMENT ON COLUMN identities.identity_type IS 'IDSync wire spelling, e.g. customerid, email, ios_idfv';
COMMENT ON COLUMN identities.value IS 'normalized value used for matching';
COMMENT ON COLUMN identities.raw_value IS 'value as the client sent it, kept for outputs';
COMMENT ON VIEW identity_changes IS
    'Ledger of every profile creation and identity add/remove/steal/orphan/skip, with why';
COMMENT ON COLUMN identity_changes.change IS
    'create, add, remove, steal (taken from other_mpid), orphan, skip (not added), quarantine';
COMMENT ON VIEW aliases IS 'Alias ledger: every accepted alias request, pending until processed_ms';
COMMENT ON COLUMN aliases.status IS 'pending (waits for process_after_ms), then processed: first-seen copied';
COMMENT ON VIEW hub_values IS
    'Identity values shared by more profiles than the hub limit: quarantined, never used to match';
"""

MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "identity core", """
CREATE TABLE workspaces (
    id VARCHAR PRIMARY KEY,
    name VARCHAR NOT NULL,
    api_key VARCHAR NOT NULL UNIQUE,
    secret_hash VARCHAR NOT NULL,
    secret_sealed VARCHAR NOT NULL,
    settings JSON NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE TABLE profiles_base (
    scope VARCHAR NOT NULL,
    mpid BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL,
    status VARCHAR NOT NULL
);

CREATE TABLE identities_base (
    scope VARCHAR NOT NULL,
    mpid BIGINT NOT NULL,
    identity_type VARCHAR NOT NULL,
    value VARCHAR NOT NULL,
    raw_value VARCHAR NOT NULL,
    added_ms BIGINT NOT NULL
);

CREATE TABLE identity_changes_base (
    at_ms BIGINT NOT NULL,
    scope VARCHAR NOT NULL,
    workspace_id VARCHAR NOT NULL,
    request_id VARCHAR,
    operation VARCHAR NOT NULL,
    strategy VARCHAR NOT NULL,
    mpid BIGINT NOT NULL,
    change VARCHAR NOT NULL,
    identity_type VARCHAR,
    value VARCHAR,
    reason VARCHAR NOT NULL,
    other_mpid BIGINT
);

CREATE TABLE aliases_base (
    alias_id VARCHAR NOT NULL,
    workspace_id VARCHAR NOT NULL,
    request_id VARCHAR,
    source_mpid BIGINT NOT NULL,
    destination_mpid BIGINT NOT NULL,
    start_ms BIGINT NOT NULL,
    end_ms BIGINT NOT NULL,
    alias_scope VARCHAR,
    environment VARCHAR,
    received_ms BIGINT NOT NULL,
    process_after_ms BIGINT NOT NULL,
    status VARCHAR NOT NULL,
    processed_ms BIGINT
);

CREATE TABLE hub_values_base (
    scope VARCHAR NOT NULL,
    identity_type VARCHAR NOT NULL,
    value VARCHAR NOT NULL,
    profile_count INTEGER NOT NULL,
    quarantined_ms BIGINT NOT NULL
);
""" + JOURNAL_DDL + ";\n".join(view_statements()) + ";\n" + _COMMENTS),
    (2, "events, user attributes, consent", event_journal.TABLES_DDL + ";\n".join(event_journal.view_statements())
     + ";\n" + event_journal.COMMENTS),
    (3, "data subject requests, erasure tombstones", dsr_store.TABLES_DDL),
    (4, "calculated attributes", ca_schema.DEFINITIONS_DDL + ca_schema.VALUES_DDL),
    (5, "calculated attribute seeds", ca_schema.SEEDS_DDL),
    (6, "events: arrival order stored", event_journal.arrival_migration()),
    (7, "audiences: definitions, membership history, sizes", audience_schema.MIGRATION_SQL),
    (8, "delivery: connections, state, outbox, attempts", delivery_schema.MIGRATION_SQL),
    (9, "delivery: erasure removes, forwarded attribute hashes", delivery_schema.ERASURE_AND_ATTRIBUTES_SQL),
]
