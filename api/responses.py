"""What every router needs from the app: its service, the upkeep of derived data, and JSON answers."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request
from starlette.responses import Response

from audiences.upkeep import AudienceUpkeep
from engine.idsync import IdSyncService


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def service_of(request: Request) -> IdSyncService:
    return request.app.state.service


def upkeep_of(request: Request) -> AudienceUpkeep:
    """Calculated attributes and audiences kept up to date after ingest, on schedule and on demand."""
    return request.app.state.upkeep
