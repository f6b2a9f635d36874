"""Tables of calculated attributes: definitions (engine/ca_registry.py) and values (engine/ca_engine.py)."""

from __future__ import annotations

DEFINITIONS_DDL = """
CREATE TABLE calculated_attributes (
    id BIGINT PRIMARY KEY,
    workspace_id VARCHAR NOT NULL,
    name VARCHAR NOT NULL,
    description VARCHAR,
    draft_definition JSON,
    active_definition JSON,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    activated_ms BIGINT,
    activated_by VARCHAR
);
COMMENT ON TABLE calculated_attributes IS 'Calculated attribute definitions: draft and active, per workspace';
"""

VALUES_DDL = """
CREATE TABLE calculated_attribute_values (
    workspace_id VARCHAR NOT NULL,
    ca_id BIGINT NOT NULL,
    mpid BIGINT NOT NULL,
    value JSON,
    computed_ms BIGINT NOT NULL,
    changes_at_ms BIGINT
);
COMMENT ON TABLE calculated_attribute_values IS
    'Current value of each active calculated attribute per profile (NULL value: none yet, changes_at_ms says when)';
COMMENT ON COLUMN calculated_attribute_values.changes_at_ms IS
    'when time alone changes the value (a window expires or a future-stamped event starts to count)';
"""

SEEDS_DDL = """
CREATE TABLE calculated_attribute_seeds (
    workspace_id VARCHAR NOT NULL,
    ca_id BIGINT NOT NULL,
    mpid BIGINT NOT NULL,
    value JSON NOT NULL,
    as_of_ms BIGINT NOT NULL,
    seed_count BIGINT,
    seed_values JSON,
    PRIMARY KEY (ca_id, mpid)
);
COMMENT ON TABLE calculated_attribute_seeds IS
    'Starting values of calculated attributes as of a date (engine/ca_seeds.py says how later events combine)';
"""
