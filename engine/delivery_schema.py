"""Tables and views of audience delivery (migration 8): connections (audiences/connections.py), what each
destination is known to hold, the durable outbox of pending adds and removes (audiences/outbox.py) and one row
per request sent. docs/delivery.md is the contract; README's SQL section lists the public views.

Plain tables, no journal: connections are written through the group-commit writer like audience definitions,
and the outbox is changed in bulk inside one transaction per diff or acknowledgement.

Every table carries `workspace_id` although the connection implies it: analyst SQL filters a workspace caller's
rows by a column of the row itself, and erasure deletes a person's rows per workspace without a join.
`delivery_connections.credentials_sealed` is readable by no analyst: the public `connections` view leaves it out.
"""

from __future__ import annotations

DAY_MS = 86_400_000

TABLES_DDL = """
CREATE TABLE delivery_connections (
    id BIGINT PRIMARY KEY,
    workspace_id VARCHAR NOT NULL,
    audience_id BIGINT NOT NULL,
    output VARCHAR NOT NULL,
    name VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    settings JSON NOT NULL,
    credentials_sealed VARCHAR NOT NULL,
    remote JSON,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE TABLE delivery_state (
    workspace_id VARCHAR NOT NULL,
    connection_id BIGINT NOT NULL,
    mpid BIGINT NOT NULL,
    identifiers JSON NOT NULL,
    acknowledged_ms BIGINT NOT NULL
);

CREATE TABLE delivery_outbox (
    workspace_id VARCHAR NOT NULL,
    connection_id BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    mpid BIGINT NOT NULL,
    op VARCHAR NOT NULL,
    identifiers JSON NOT NULL,
    attributes JSON,
    changed_ms BIGINT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms BIGINT NOT NULL,
    last_error VARCHAR
);

CREATE TABLE delivery_attempts (
    workspace_id VARCHAR NOT NULL,
    connection_id BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    duration_ms BIGINT,
    deltas INTEGER NOT NULL,
    acknowledged INTEGER NOT NULL,
    retried INTEGER NOT NULL,
    rejected INTEGER NOT NULL,
    status INTEGER,
    error VARCHAR,
    ack_lags_ms BIGINT[]
);
"""


def status_query(now: str) -> str:
    """Per connection of delivery_connections: pending adds and removes, profiles the destination holds, last
    success, the oldest pending change, lag from membership change to acknowledgement (p50 and max over the day
    up to `now`, an SQL expression giving epoch milliseconds), failures of that day and the last error. Shared by
    the `delivery_status` view (now = the query's transaction time) and the outbox's readers (a given time)."""
    return f"""
SELECT c.workspace_id, c.id AS connection_id, c.audience_id, c.output, c.name, c.status,
       coalesce(o.pending_adds, 0)::BIGINT AS pending_adds,
       coalesce(o.pending_removes, 0)::BIGINT AS pending_removes,
       coalesce(o.retrying, 0)::BIGINT AS retrying,
       o.oldest_pending_ms,
       coalesce(s.held, 0)::BIGINT AS held,
       a.last_attempt_ms, a.last_success_ms,
       l.lag_p50_ms, l.lag_max_ms,
       coalesce(d.requests_24h, 0)::BIGINT AS requests_24h,
       coalesce(d.retried_24h, 0)::BIGINT AS retried_24h,
       coalesce(d.rejected_24h, 0)::BIGINT AS rejected_24h,
       e.last_error, e.last_error_ms
FROM delivery_connections c
LEFT JOIN (SELECT connection_id, count(*) FILTER (WHERE op = 'add') AS pending_adds,
                  count(*) FILTER (WHERE op = 'remove') AS pending_removes,
                  count(*) FILTER (WHERE attempts > 0) AS retrying,
                  min(changed_ms) AS oldest_pending_ms
           FROM delivery_outbox GROUP BY connection_id) o ON o.connection_id = c.id
LEFT JOIN (SELECT connection_id, count(*) AS held FROM delivery_state GROUP BY connection_id) s
       ON s.connection_id = c.id
LEFT JOIN (SELECT connection_id, max(at_ms) AS last_attempt_ms,
                  max(at_ms) FILTER (WHERE acknowledged > 0) AS last_success_ms
           FROM delivery_attempts GROUP BY connection_id) a ON a.connection_id = c.id
LEFT JOIN (SELECT connection_id, count(*) AS requests_24h, sum(retried) AS retried_24h,
                  sum(rejected) AS rejected_24h
           FROM delivery_attempts WHERE at_ms > ({now}) - {DAY_MS} AND at_ms <= ({now})
           GROUP BY connection_id) d ON d.connection_id = c.id
LEFT JOIN (SELECT connection_id, quantile_disc(lag, 0.5)::BIGINT AS lag_p50_ms, max(lag)::BIGINT AS lag_max_ms
           FROM (SELECT connection_id, unnest(ack_lags_ms) AS lag FROM delivery_attempts
                 WHERE at_ms > ({now}) - {DAY_MS} AND at_ms <= ({now}))
           GROUP BY connection_id) l ON l.connection_id = c.id
LEFT JOIN (SELECT connection_id, arg_max(error, at_ms) AS last_error, max(at_ms) AS last_error_ms
           FROM delivery_attempts WHERE error IS NOT NULL GROUP BY connection_id) e ON e.connection_id = c.id"""


VIEWS_DDL = f"""
CREATE VIEW connections AS
SELECT id, workspace_id, audience_id, output, name, status, settings, remote, created_ms, updated_ms
FROM delivery_connections;

CREATE VIEW delivery_status AS {status_query("epoch_ms(now())")};
"""

COMMENTS = """
COMMENT ON TABLE delivery_connections IS
    'Audience -> output connections; read them through the connections view (credentials are sealed and left out)';
COMMENT ON COLUMN delivery_connections.credentials_sealed IS
    'the credentials JSON sealed with the server master key (AES-GCM); never returned, never logged';
COMMENT ON VIEW connections IS 'One row per connection of an audience to an output (credentials left out)';
COMMENT ON COLUMN connections.output IS 'braze, facebook, webhook or kafka';
COMMENT ON COLUMN connections.status IS 'active (delivered) or inactive (kept, nothing diffed or sent)';
COMMENT ON COLUMN connections.settings IS
    'identity types, forwarded attributes, consent rules, sampling, upload thresholds, per-output options';
COMMENT ON COLUMN connections.remote IS
    'what the destination created for the connection, e.g. Facebook custom audience ids; NULL until then';
COMMENT ON TABLE delivery_state IS
    'What each destination is known to hold: one row per connection and profile, with the identifiers sent';
COMMENT ON COLUMN delivery_state.identifiers IS 'the identifiers the acknowledged add named, as sent';
COMMENT ON TABLE delivery_outbox IS
    'Pending adds and removes, at most one per connection and profile; a row leaves when acknowledged or rejected';
COMMENT ON COLUMN delivery_outbox.changed_ms IS 'when the membership change behind the row happened';
COMMENT ON COLUMN delivery_outbox.next_attempt_ms IS 'not sent before this time (backoff after a failure)';
COMMENT ON TABLE delivery_attempts IS 'One row per request sent to a destination, with what became of its deltas';
COMMENT ON COLUMN delivery_attempts.status IS 'HTTP status of the answer; NULL when none came (timeout, reset)';
COMMENT ON COLUMN delivery_attempts.ack_lags_ms IS
    'per acknowledged delta: milliseconds from its membership change to this acknowledgement';
COMMENT ON VIEW delivery_status IS
    'Per connection: pending adds and removes, profiles held, last success, lag and failures over the last day';
COMMENT ON COLUMN delivery_status.oldest_pending_ms IS 'changed_ms of the oldest pending row; NULL when none';
COMMENT ON COLUMN delivery_status.held IS 'profiles the destination holds as far as acknowledgements tell';
COMMENT ON COLUMN delivery_status.lag_p50_ms IS
    'median milliseconds from membership change to acknowledgement, deltas acknowledged in the last 24 hours';
COMMENT ON COLUMN delivery_status.last_error IS 'error of the latest request that failed wholly or in part';
"""

MIGRATION_SQL = TABLES_DDL + VIEWS_DDL + COMMENTS

# Migration 9: erasure removes and forwarded attribute values.
# - An erasure (engine/erasure.py) replaces the person's delivery_state rows by outbox removes flagged `erasure`:
#   the diff never touches them (the person is no member of anything any more), an acknowledgement deletes them,
#   and until then they are the only delivery rows naming the person. `held_identifiers` keeps what the state row
#   said when it differs from what the remove names (a possibly-sent add named other identifiers), so an output
#   keyed by identifier removes both although the state row is gone.
# - `delivery_state.attributes_hash`: md5 of the forwarded attributes' JSON text the acknowledged add carried
#   (NULL when it carried none), so the diff re-sends an add when a forwarded value changes.
ERASURE_AND_ATTRIBUTES_SQL = """
ALTER TABLE delivery_outbox ADD COLUMN erasure BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE delivery_outbox ADD COLUMN held_identifiers JSON;
ALTER TABLE delivery_state ADD COLUMN attributes_hash VARCHAR;
COMMENT ON COLUMN delivery_outbox.erasure IS
    'true: a remove queued by an erasure; the only row left naming the person, deleted when acknowledged';
COMMENT ON COLUMN delivery_outbox.held_identifiers IS
    'erasure removes only: the identifiers the erased state row held, when they differ from the ones named';
COMMENT ON COLUMN delivery_state.attributes_hash IS
    'md5 of the forwarded attributes JSON the acknowledged add carried; NULL when none were forwarded';
COMMENT ON TABLE erasure_events IS
    'one row per erasure; forwarded_ms: when removes were queued to the destinations holding the person (NULL: none)';
"""
