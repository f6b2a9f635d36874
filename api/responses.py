"""What every router needs from the app: its service, and JSON answers."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request
from starlette.responses import Response

from engine.idsync import IdSyncService


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def service_of(request: Request) -> IdSyncService:
    return request.app.state.service
