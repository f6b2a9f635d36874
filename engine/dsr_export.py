"""Access and portability (DSRs of type access / portability): everything held about one person, as JSON.

Read from the public views, which include the write journal, so the export shows every acknowledged write.
Workspace-scoped data (attributes, consent, events, batches, aliases) is limited to the requesting workspace
(the controller); the profile and its identities are read from the workspace's identity scope. DuckDB turns
each section into JSON itself (`to_json` of whole rows keeps JSON columns as JSON), so Python never loops
over events. Identity types use the IDSync wire spelling, as in the `identities` view.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import orjson

from engine.dsr_model import DsrRecord, rfc3339
from engine.store import now_ms
from engine.workspaces import Workspace

# section -> (query over the public views with $mpid, $workspace and $scope, order of the rows)
SECTIONS: dict[str, tuple[str, str]] = {
    "profile": ("SELECT mpid, created_ms, first_seen_ms, last_seen_ms, status FROM profiles "
                "WHERE mpid = $mpid AND scope = $scope", "mpid"),
    "identities": ("SELECT identity_type, value, raw_value, added_ms FROM identities "
                   "WHERE mpid = $mpid AND scope = $scope", "added_ms, identity_type"),
    "user_attributes": ("SELECT name, value, updated_ms FROM user_attributes "
                        "WHERE mpid = $mpid AND workspace_id = $workspace", "name"),
    "consent": ("SELECT * EXCLUDE (workspace_id, mpid) FROM consent WHERE mpid = $mpid AND workspace_id = $workspace",
                "regulation, purpose"),
    "consent_history": ("SELECT * EXCLUDE (workspace_id, mpid) FROM consent_history "
                        "WHERE mpid = $mpid AND workspace_id = $workspace", "received_ms, regulation, purpose"),
    "events": ("SELECT * EXCLUDE (workspace_id, mpid) FROM events WHERE mpid = $mpid AND workspace_id = $workspace",
               "timestamp_ms, batch_id, event_index"),
    "batches": ("SELECT * EXCLUDE (workspace_id, mpid, batch_key, request_key) FROM batches "
                "WHERE mpid = $mpid AND workspace_id = $workspace", "received_ms, batch_id"),
    "aliases": ("SELECT * EXCLUDE (workspace_id) FROM aliases WHERE workspace_id = $workspace "
                "AND (source_mpid = $mpid OR destination_mpid = $mpid)", "received_ms"),
    "identity_changes": ("SELECT * EXCLUDE (scope, workspace_id, mpid) FROM identity_changes "
                         "WHERE mpid = $mpid AND workspace_id = $workspace", "at_ms"),
}


@dataclass(frozen=True)
class Export:
    content: bytes  # JSON document
    results_count: int


def read_export(connection: duckdb.DuckDBPyConnection, workspace: Workspace, record: DsrRecord, mpid: int | None
                ) -> Export:
    """The export for `record`; with no profile found every section is empty."""
    document: dict[str, object] = {
        "controller_id": workspace.id, "subject_request_id": record.subject_request_id,
        "subject_request_type": record.request_type, "regulation": record.regulation,
        "generated_time": rfc3339(now_ms()), "mpid": None if mpid is None else str(mpid),
    }
    count = 0
    cursor = connection.cursor()  # its own connection: safe beside the writer thread
    try:
        for section, (query, order) in SECTIONS.items():
            rows, text = 0, "[]"
            if mpid is not None:
                values = {"mpid": mpid, "workspace": workspace.id, "scope": workspace.scope}
                rows, text = cursor.execute(  # DuckDB refuses named parameters the query does not use
                    f"SELECT count(*), coalesce(to_json(list(to_json(x) ORDER BY {_qualified(order)})), '[]')::VARCHAR "
                    f"FROM ({query}) AS x", {k: v for k, v in values.items() if f"${k}" in query},
                ).fetchone()
            count += rows
            if section == "profile":
                profiles = orjson.loads(text)
                document[section] = profiles[0] if profiles else None
            else:
                document[section] = orjson.Fragment(text)
    finally:
        cursor.close()
    return Export(orjson.dumps(document), count)


def _qualified(order: str) -> str:
    return ", ".join(f"x.{column.strip()}" for column in order.split(","))
