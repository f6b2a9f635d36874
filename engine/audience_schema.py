"""Tables and views of audiences (migration 7): definitions (audiences/registry.py), membership with history and
size points (audiences/membership.py). docs/audiences.md is the contract; README's SQL section lists the views.

The tables are plain (no journal): the registry writes definitions through the group-commit writer, and
memberships are applied in bulk inside one transaction, where a journal would only add a copy.
"""

from __future__ import annotations

DAY_MS = 86_400_000

TABLES_DDL = """
CREATE TABLE audience_definitions (
    id BIGINT PRIMARY KEY,
    workspace_id VARCHAR NOT NULL,
    name VARCHAR NOT NULL,
    external_name VARCHAR NOT NULL,
    description VARCHAR,
    type VARCHAR NOT NULL,
    refresh_minutes INTEGER,
    definition JSON NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE TABLE audience_membership_history (
    workspace_id VARCHAR NOT NULL,
    audience_id BIGINT NOT NULL,
    mpid BIGINT NOT NULL,
    entered_ms BIGINT NOT NULL,
    exited_ms BIGINT
);

CREATE TABLE audience_sizes (
    workspace_id VARCHAR NOT NULL,
    audience_id BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    size BIGINT NOT NULL,
    adds BIGINT NOT NULL,
    drops BIGINT NOT NULL
);
"""


def stats_query(now: str) -> str:
    """Per audience of audience_definitions: current size, adds and drops in the 24 hours up to `now` (an SQL
    expression giving epoch milliseconds), volatility, and when the membership last changed. Shared by the
    `audience_stats` view (now = the query's transaction time) and audiences.membership.audience_stats (a
    given time, so tests and callers pick the window)."""
    return f"""
SELECT d.workspace_id, d.id AS audience_id, d.name,
       coalesce(m.size, 0) AS size,
       coalesce(w.adds, 0)::BIGINT AS adds_24h,
       coalesce(w.drops, 0)::BIGINT AS drops_24h,
       CASE WHEN coalesce(m.size, 0) = 0 THEN NULL
            ELSE (coalesce(w.adds, 0) + coalesce(w.drops, 0))::DOUBLE / m.size END AS volatility,
       p.changed_ms
FROM audience_definitions d
LEFT JOIN (SELECT workspace_id, audience_id, count(*) AS size FROM audience_membership_history
           WHERE exited_ms IS NULL GROUP BY ALL) m ON m.workspace_id = d.workspace_id AND m.audience_id = d.id
LEFT JOIN (SELECT workspace_id, audience_id, sum(adds) AS adds, sum(drops) AS drops FROM audience_sizes
           WHERE at_ms > ({now}) - {DAY_MS} AND at_ms <= ({now}) GROUP BY ALL) w
       ON w.workspace_id = d.workspace_id AND w.audience_id = d.id
LEFT JOIN (SELECT workspace_id, audience_id, max(at_ms) AS changed_ms FROM audience_sizes GROUP BY ALL) p
       ON p.workspace_id = d.workspace_id AND p.audience_id = d.id"""


VIEWS_DDL = f"""
CREATE VIEW audiences AS
SELECT id, workspace_id, name, external_name, description, type, refresh_minutes, definition, created_ms, updated_ms
FROM audience_definitions;

CREATE VIEW audience_members AS
SELECT workspace_id, audience_id, mpid, entered_ms FROM audience_membership_history WHERE exited_ms IS NULL;

CREATE VIEW audience_stats AS {stats_query("epoch_ms(now())")};
"""

COMMENTS = """
COMMENT ON TABLE audience_definitions IS 'Audience definitions per workspace (read them through the audiences view)';
COMMENT ON VIEW audiences IS 'One row per audience: names, type, refresh interval and the definition JSON';
COMMENT ON COLUMN audiences.external_name IS 'the name partners (outputs) see';
COMMENT ON COLUMN audiences.type IS 'real_time (updated on every ingested batch) or standard (on schedule or on demand)';
COMMENT ON COLUMN audiences.refresh_minutes IS 'standard audiences: minutes between evaluations; NULL for real_time';
COMMENT ON COLUMN audiences.definition IS 'the definition as accepted, criteria included (docs/audiences.md)';
COMMENT ON TABLE audience_membership_history IS
    'Every stay of a profile in an audience: a new row each time it enters, closed when it exits';
COMMENT ON COLUMN audience_membership_history.exited_ms IS 'NULL while the profile is a member';
COMMENT ON VIEW audience_members IS 'Current members: one row per audience and profile';
COMMENT ON COLUMN audience_members.entered_ms IS 'when the current stay began';
COMMENT ON TABLE audience_sizes IS
    'Audience size after each evaluation that changed the membership (and after the first), with its adds and drops';
COMMENT ON VIEW audience_stats IS 'Per audience: current size, adds and drops in the last 24 hours, volatility';
COMMENT ON COLUMN audience_stats.volatility IS
    '(adds_24h + drops_24h) / size; NULL when the audience is empty (a ratio to nothing is undefined)';
COMMENT ON COLUMN audience_stats.changed_ms IS 'when the membership last changed (NULL: never evaluated)';
"""

MIGRATION_SQL = TABLES_DDL + VIEWS_DDL + COMMENTS
