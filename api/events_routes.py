"""Events API (reference §2): `/v2/events`, `/v2/bulkevents` (Basic auth, server to server) and the web SDK's
own upload path `/v3/JS/{api_key}/events` (key only, `text/plain` body)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from pydantic import RootModel
from starlette.responses import Response

from api.auth import authenticate_workspace
from api.body import body_schema
from api.errors import error_response
from api.models import EventBatch
from api.responses import json_response, service_of, upkeep_of
from engine.errors import BadRequest
from engine.ingest import BatchOutcome, EventIngestor, check_bulk_count, check_request_size

router = APIRouter(tags=["Events"])


class BulkBody(RootModel[list[EventBatch]]):
    pass


def ingestor_of(request: Request) -> EventIngestor:
    return request.app.state.ingestor


async def read_json_body(request: Request) -> tuple[Any, int]:
    raw = await request.body()
    check_request_size(len(raw))
    try:
        return orjson.loads(raw), len(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON", field="body") from None


async def _single(request: Request, source: str, key_in_path: str | None = None) -> Response:
    workspace = await authenticate_workspace(request, service_of(request), key_in_path,
                                             allow_key_only=key_in_path is not None)
    batch, size = await read_json_body(request)
    [outcome] = await ingestor_of(request).ingest(workspace, [batch], source, sizes=[size])
    if outcome.error is not None:
        raise outcome.error
    upkeep_of(request).profiles_touched(workspace.id, touched([outcome]))
    return json_response(outcome.as_json(), status=202)


@router.post("/v2/events", status_code=202, openapi_extra=body_schema(EventBatch))
async def events(request: Request) -> Response:
    """One batch. 202 once it is durable; a replayed batch_id / source_request_id is acknowledged, not stored."""
    return await _single(request, "s2s")


@router.post("/v3/JS/{api_key}/events", status_code=202, openapi_extra=body_schema(EventBatch))
async def web_sdk_events(request: Request, api_key: str) -> Response:
    """The web SDK's batch upload: the key in the path is the only credential, as for its IDSync calls."""
    return await _single(request, "web", api_key)


@router.post("/v2/bulkevents", status_code=202, openapi_extra=body_schema(BulkBody))
async def bulk_events(request: Request) -> Response:
    """Up to 100 batches. Each is stored or rejected alone: 202 when none was rejected, 207 when some were,
    400 when all were; `results` reports every batch in order."""
    workspace = await authenticate_workspace(request, service_of(request), allow_key_only=False)
    body, _ = await read_json_body(request)
    outcomes = await ingestor_of(request).ingest(workspace, check_bulk_count(body), "s2s")
    upkeep_of(request).profiles_touched(workspace.id, touched(outcomes))
    return bulk_answer(outcomes)


def touched(outcomes: list[BatchOutcome]) -> list[int]:
    """The profiles whose calculated attributes and real-time audiences an ingest may have changed."""
    return sorted({o.mpid for o in outcomes if o.status == "accepted" and o.mpid is not None})


def bulk_answer(outcomes: list[BatchOutcome]) -> Response:
    results = [o.as_json() for o in outcomes]
    rejected = [o for o in outcomes if o.status == "rejected"]
    if not rejected:
        return json_response({"results": results}, status=202)
    if len(rejected) < len(outcomes):
        return json_response({"results": results}, status=207)
    first = rejected[0].error
    response = error_response(400, first.code, f"no batch was accepted; batch 0: {first.message}",
                              f"[0].{first.field}" if first.field else None)
    body = orjson.loads(response.body)
    body["results"] = results
    return json_response(body, status=400)
