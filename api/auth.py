"""Who is calling: workspace credentials (Basic, HMAC, key-only; spec B§2) and the admin bearer token."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from fastapi import Request

from engine.errors import Forbidden, Unauthorized
from engine.idsync import IdSyncService
from engine.workspaces import Workspace


async def authenticate_workspace(request: Request, service: IdSyncService, key_in_path: str | None = None,
                                 allow_key_only: bool = True) -> Workspace:
    """Resolve the calling workspace or raise 401. Never logs or echoes a secret. `allow_key_only=False` is
    for endpoints that read data or accept server-to-server writes: a client key alone is public."""
    authorization = request.headers.get("authorization", "")
    if authorization[:6].lower() == "basic ":
        key, secret = _basic_credentials(authorization[6:])
        workspace = service.workspaces.by_api_key(key)
        if workspace is None or not service.workspaces.check_secret(workspace, secret):
            raise Unauthorized("invalid API key or secret")
        return workspace
    key = request.headers.get("x-mp-key") or key_in_path
    if not key:
        raise Unauthorized("missing credentials: use Basic auth, an HMAC signature, or x-mp-key")
    workspace = service.workspaces.by_api_key(key)
    if workspace is None:
        raise Unauthorized("invalid API key")
    signature = request.headers.get("x-mp-signature")
    if signature:
        await _check_signature(request, service, workspace, signature)
        return workspace
    if not allow_key_only:
        raise Unauthorized("this endpoint needs the API secret: use Basic auth or an HMAC signature")
    if not workspace.settings.key_only_auth:
        raise Unauthorized("key-only authentication is disabled for this workspace; sign the request")
    return workspace


def _basic_credentials(encoded: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthorized("malformed Basic credentials") from None
    key, sep, secret = decoded.partition(":")
    if not sep:
        raise Unauthorized("malformed Basic credentials")
    return key, secret


async def _check_signature(request: Request, service: IdSyncService, workspace: Workspace, signature: str
                           ) -> None:
    """HMAC-SHA256(secret, METHOD\\nDATE\\nPATH+BODY) over the uncompressed body; Android signs path+query."""
    date = request.headers.get("date", "")
    body = (await request.body()).decode("utf-8", errors="replace")
    secret = service.workspaces.hmac_secret(workspace).encode()
    path = request.url.path
    candidates = [path] + ([f"{path}?{request.url.query}"] if request.url.query else [])
    for signed_path in candidates:
        message = f"{request.method}\n{date}\n{signed_path}{body}".encode()
        expected = hmac.new(secret, message, hashlib.sha256).hexdigest()
        # as bytes: compare_digest refuses str with non-ASCII characters, and the header may hold any latin-1
        if hmac.compare_digest(expected.encode(), signature.strip().lower().encode()):
            return
    raise Unauthorized("the request signature does not match")


def check_admin(request: Request, admin_token: str) -> bool:
    authorization = request.headers.get("authorization", "")
    if authorization[:7].lower() != "bearer ":
        return False
    return hmac.compare_digest(authorization[7:].strip().encode(), admin_token.encode())


async def admin_or_own_workspace(request: Request, workspace_id: str) -> Workspace:
    """The admin token sees every workspace; a workspace's own key + secret see only that workspace. A client
    key alone never reads data (reference §2: client keys cannot read)."""
    service: IdSyncService = request.app.state.service
    if check_admin(request, request.app.state.admin_token):
        return service.workspaces.get(workspace_id)
    workspace = await authenticate_workspace(request, service, allow_key_only=False)
    if workspace.id != workspace_id:
        raise Forbidden("these credentials belong to another workspace")
    return workspace
