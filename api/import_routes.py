"""Admin import endpoint: Events API batches for any workspace, stored with source `import`.

`idmesh import` sends a CSV file's rows here while a server owns the database (DuckDB allows one writing
process); with no server running it writes to the file itself through the same ingestor.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from api.auth import check_admin
from api.body import body_schema
from api.events_routes import BulkBody, bulk_answer, ingestor_of, read_json_body, touched
from api.responses import service_of, upkeep_of
from engine.csv_import import SOURCE
from engine.errors import Unauthorized
from engine.ingest import check_bulk_count

router = APIRouter(prefix="/platform/v2", tags=["Platform"])


@router.post("/workspaces/{workspace_id}/events", status_code=202, openapi_extra=body_schema(BulkBody))
async def import_events(request: Request, workspace_id: str) -> Response:
    """Up to 100 batches for the workspace, each stored or rejected alone, answered as /v2/bulkevents answers
    (202, 207 or 400, with `results` in order). Needs the admin bearer token: workspace keys cannot import."""
    if not check_admin(request, request.app.state.admin_token):
        raise Unauthorized("this endpoint needs the admin bearer token")
    workspace = service_of(request).workspaces.get(workspace_id)
    body, _ = await read_json_body(request)
    outcomes = await ingestor_of(request).ingest(workspace, check_bulk_count(body), SOURCE)
    upkeep_of(request).profiles_touched(workspace.id, touched(outcomes))
    return bulk_answer(outcomes)
