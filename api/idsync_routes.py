"""IDSync HTTP API (spec A1): identify, login, logout, search, modify and alias."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from api.auth import authenticate_workspace
from api.body import body_schema, parse_body
from api.models import AliasRequestBody, IdentityRequest, ModifyRequest, SearchRequest
from api.responses import json_response, service_of
from engine.errors import BadRequest
from engine.idsync import IdentityAnswer
from engine.workspaces import Workspace
from strategies.model import Operation

router = APIRouter(tags=["IDSync"])


async def _workspace(request: Request, key_in_path: str | None = None) -> Workspace:
    workspace = await authenticate_workspace(request, service_of(request), key_in_path)
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


async def _alias(request: Request, key_in_path: str | None) -> Response:
    workspace = await _workspace(request, key_in_path)
    body = await parse_body(request, AliasRequestBody)
    if body.api_key is not None and body.api_key != workspace.api_key:
        raise BadRequest("api_key does not match the credentials used", field="api_key")
    await service_of(request).alias(workspace, body.model_dump())
    return Response(status_code=202)


@router.post("/v1/identity/{api_key}/alias", status_code=202, openapi_extra=body_schema(AliasRequestBody))
async def alias_from_native_sdk(request: Request, api_key: str) -> Response:
    return await _alias(request, api_key)


@router.post("/v1/identity/{api_key}/Alias", status_code=202, openapi_extra=body_schema(AliasRequestBody))
async def alias_from_web_sdk(request: Request, api_key: str) -> Response:
    return await _alias(request, api_key)


@router.post("/v1/alias", status_code=202, openapi_extra=body_schema(AliasRequestBody))
async def alias_server_to_server(request: Request) -> Response:
    return await _alias(request, None)
