"""OpenDSR v3 data subject requests (reference §7), mParticle-compatible: `/v3/requests`, `/v3/discovery`.

Requests need the workspace's key + secret (Basic, or an HMAC signature); a key alone is refused, and one
workspace never sees another's requests (404). Discovery and the processor certificate are public: a
controller verifying a callback fetches them without credentials (OpenDSR §8.8), and they say nothing about
any workspace. Answers carry `X-OpenDSR-Signature` over their body, as callbacks do.
"""

from __future__ import annotations

import base64
from typing import Literal

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response

from api.auth import authenticate_workspace
from api.body import body_schema
from api.responses import service_of
from engine.dsr import DsrService
from engine.dsr_model import API_VERSION, rfc3339
from engine.errors import BadRequest, PayloadTooLarge
from engine.store import now_ms
from engine.workspaces import Workspace

router = APIRouter(prefix="/v3", tags=["Data subject requests"])

MAX_BODY_BYTES = 64 * 1024


class SubjectIdentityModel(BaseModel):
    value: str
    encoding: Literal["raw"] = "raw"


class DsrRequestBody(BaseModel):
    """Documentation only: engine/dsr_model.py validates the body and names the field of any problem."""

    model_config = ConfigDict(extra="allow")

    regulation: Literal["gdpr", "ccpa"]
    subject_request_id: str
    subject_request_type: Literal["erasure", "access", "portability"]
    submitted_time: str
    skip_waiting_period: bool = False
    subject_identities: dict[str, SubjectIdentityModel]
    api_version: Literal["3.0"] = "3.0"
    status_callback_urls: list[str] = []
    group_id: str | None = None
    extensions: dict | None = None


def dsr_of(request: Request) -> DsrService:
    return request.app.state.dsr


async def _workspace(request: Request) -> Workspace:
    return await authenticate_workspace(request, service_of(request), allow_key_only=False)


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def signed(request: Request, body: bytes, status: int = 200, media_type: str = "application/json") -> Response:
    callbacks = dsr_of(request).callbacks
    headers = callbacks.headers(body)
    headers.pop("Content-Type")
    return Response(body, status_code=status, media_type=media_type, headers=headers)


@router.post("/requests", status_code=202, openapi_extra=body_schema(DsrRequestBody))
async def create_request(request: Request) -> Response:
    """Submit a request; 202 once it is stored. Processed after the waiting period unless skip_waiting_period."""
    workspace = await _workspace(request)
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"the request is {len(raw)} bytes; at most {MAX_BODY_BYTES} are accepted", field="body")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON", field="body") from None
    dsr = dsr_of(request)
    record = await dsr.submit(workspace, body)
    status = dsr.status_json(record, _base_url(request))
    answer = {"expected_completion_time": status["expected_completion_time"], "received_time": status["received_time"],
              "encoded_request": base64.b64encode(raw).decode(), "subject_request_id": record.subject_request_id,
              "controller_id": record.workspace_id}
    return signed(request, orjson.dumps(answer), 202)


@router.get("/requests")
async def list_requests(request: Request, group_id: str | None = None) -> Response:
    """The workspace's requests (those of one `group_id` when given), oldest first, as a JSON array."""
    workspace = await _workspace(request)
    dsr = dsr_of(request)
    base = _base_url(request)
    records = await dsr.read_all(workspace, group_id)
    return signed(request, orjson.dumps([dsr.status_json(r, base) for r in records]))


@router.get("/requests/{subject_request_id}")
async def get_request(request: Request, subject_request_id: str) -> Response:
    workspace = await _workspace(request)
    dsr = dsr_of(request)
    record = await dsr.read(workspace, subject_request_id)
    return signed(request, orjson.dumps(dsr.status_json(record, _base_url(request))))


@router.delete("/requests/{subject_request_id}", status_code=202)
async def cancel_request(request: Request, subject_request_id: str) -> Response:
    """Cancel a pending request (409 once processing began)."""
    workspace = await _workspace(request)
    received = now_ms()
    record = await dsr_of(request).cancel(workspace, subject_request_id)
    answer = {"controller_id": record.workspace_id, "subject_request_id": record.subject_request_id,
              "received_time": rfc3339(received), "api_version": API_VERSION}
    return signed(request, orjson.dumps(answer), 202)


@router.get("/requests/{subject_request_id}/export")
async def request_export(request: Request, subject_request_id: str) -> Response:
    """The results of a completed access or portability request: everything held about the person, as JSON."""
    workspace = await _workspace(request)
    return signed(request, await dsr_of(request).export(workspace, subject_request_id))


@router.get("/discovery")
@router.get("/discovery/", include_in_schema=False)
async def discovery(request: Request) -> Response:
    """Supported request types, identity types, API versions and where the signing certificate is."""
    return signed(request, orjson.dumps(dsr_of(request).discovery(_base_url(request))))


class PemResponse(Response):
    media_type = "application/x-pem-file"


@router.get("/processor_certificate.pem", response_class=PemResponse)
async def processor_certificate(request: Request) -> Response:
    """The X.509 certificate (PEM) whose key signs callbacks and answers."""
    return PemResponse(dsr_of(request).keys.certificate_pem)
