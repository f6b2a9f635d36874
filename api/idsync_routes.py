"""IDSync HTTP API (spec A1): identify, login, logout, search, modify and alias."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from api.auth import authenticate_workspace
from api.body import body_schema, parse_body
from api.models import AliasRequestBody, IdentityRequest, ModifyRequest, SearchRequest, UnaliasRequestBody
from api.responses import json_response, service_of
from engine.aliasing import AliasRecord
from engine.errors import BadRequest
from engine.idsync import IdentityAnswer
from engine.workspaces import Workspace
from strategies.model import Operation

router = APIRouter(tags=["IDSync"])


async def _workspace(request: Request, key_in_path: str | None = None, allow_key_only: bool = True) -> Workspace:
    workspace = await authenticate_workspace(request, service_of(request), key_in_path, allow_key_only)
    request.app.state.buckets.take(workspace.id, workspace.settings.rate_limit)
    return workspace


def _identity_body(answer: IdentityAnswer, context: str | None, return_matches: bool) -> dict[str, Any]:
    return {"context": context, "mpid": str(answer.mpid),
            "matched_identities": answer.matched_identities if return_matches else {},
            "is_ephemeral": False, "is_logged_in": answer.is_logged_in}


async def _resolve(request: Request, operation: Operation, read_only: bool, return_matches: bool) -> Response:
    workspace = await _workspace(request)
    body = await parse_body(request, IdentityRequest)
    answer = await service_of(request).resolve(workspace, operation, body.known_identities, body.previous_mpid,
                                             body.effective_request_id(), read_only)
    return json_response(_identity_body(answer, body.context, return_matches))


@router.post("/v1/identify", openapi_extra=body_schema(IdentityRequest))
async def identify(request: Request, read_only: bool = False,
                   return_matches: bool = False) -> Response:
    return await _resolve(request, Operation.IDENTIFY, read_only, return_matches)


@router.post("/v1/login", openapi_extra=body_schema(IdentityRequest))
async def login(request: Request, read_only: bool = False,
                return_matches: bool = False) -> Response:
    return await _resolve(request, Operation.LOGIN, read_only, return_matches)


@router.post("/v1/logout", openapi_extra=body_schema(IdentityRequest))
async def logout(request: Request, read_only: bool = False,
                 return_matches: bool = False) -> Response:
    return await _resolve(request, Operation.LOGOUT, read_only, return_matches)


@router.post("/v1/search", openapi_extra=body_schema(SearchRequest))
async def search(request: Request) -> Response:
    workspace = await _workspace(request)
    body = await parse_body(request, SearchRequest)
    answer = await service_of(request).search(workspace, body.known_identities)
    return json_response(_identity_body(answer, body.context, True))


@router.post("/v1/{mpid}/modify", openapi_extra=body_schema(ModifyRequest))
async def modify(request: Request, mpid: str) -> Response:
    workspace = await _workspace(request)
    body = await parse_body(request, ModifyRequest)
    changes = [c.model_dump() for c in body.identity_changes]
    results = await service_of(request).modify(workspace, mpid, changes, body.request_id or body.requestId)
    return json_response({"change_results": [{"identity_type": r.identity_type, "modified_mpid": str(r.modified_mpid)}
                                     for r in results]})


async def _alias(request: Request, key_in_path: str | None, allow_key_only: bool = True) -> AliasRecord:
    workspace = await _workspace(request, key_in_path, allow_key_only)
    body = await parse_body(request, AliasRequestBody)
    if body.api_key is not None and body.api_key != workspace.api_key:
        raise BadRequest("api_key does not match the credentials used", field="api_key")
    return await service_of(request).alias(workspace, body.model_dump())


def _alias_json(record: AliasRecord) -> dict[str, Any]:
    return {"alias_id": record.alias_id, "status": record.status, "source_mpid": str(record.source_mpid),
            "destination_mpid": str(record.destination_mpid), "start_unixtime_ms": record.start_ms,
            "end_unixtime_ms": record.end_ms}


# response_class: the document then shows a 202 without a body, which is what the SDKs get
@router.post("/v1/identity/{api_key}/alias", status_code=202, response_class=Response,
             openapi_extra=body_schema(AliasRequestBody))
async def alias_from_native_sdk(request: Request, api_key: str) -> Response:
    await _alias(request, api_key)
    return Response(status_code=202)  # the SDKs expect no body


@router.post("/v1/identity/{api_key}/Alias", status_code=202, response_class=Response,
             openapi_extra=body_schema(AliasRequestBody))
async def alias_from_web_sdk(request: Request, api_key: str) -> Response:
    await _alias(request, api_key)
    return Response(status_code=202)


@router.post("/v1/alias", status_code=202, openapi_extra=body_schema(AliasRequestBody))
async def alias_server_to_server(request: Request) -> Response:
    """Server to server: the answer names the alias, so it can be undone with /v1/unalias. Only the SDK paths
    above take a key alone: no SDK calls this one, so a client key, which is public, must not reach it."""
    return json_response(_alias_json(await _alias(request, None, allow_key_only=False)), status=202)


@router.post("/v1/unalias", openapi_extra=body_schema(UnaliasRequestBody))
async def unalias(request: Request) -> Response:
    """idmesh extension: undo aliases named by `alias_id` or by `data.source_mpid` + `data.destination_mpid`;
    removes exactly the events their processing copied and restores the destination's first-seen."""
    workspace = await authenticate_workspace(request, service_of(request), allow_key_only=False)
    body = await parse_body(request, UnaliasRequestBody)
    records = await service_of(request).unalias(workspace, body.model_dump(exclude_none=True))
    return json_response({"unaliased": [_alias_json(r) for r in records]})
