"""Accept gzip-compressed request bodies (Android sends `Content-Encoding: gzip`).

Pure ASGI so the route, and the HMAC check, see the uncompressed JSON the SDK signed.
"""

from __future__ import annotations

import zlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response

MAX_BODY_BYTES = 4 * 1024 * 1024


class GzipRequestMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if headers.get(b"content-encoding", b"").strip().lower() != b"gzip":
            await self.app(scope, receive, send)
            return
        compressed = bytearray()
        while True:
            message = await receive()
            compressed += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            inflater = zlib.decompressobj(wbits=31)
            body = inflater.decompress(bytes(compressed), MAX_BODY_BYTES + 1)
        except zlib.error:
            await error_response(400, "BAD_REQUEST", "the gzip body could not be decompressed", "body")(
                scope, receive, send)
            return
        if len(body) > MAX_BODY_BYTES or inflater.unconsumed_tail:
            await error_response(413, "BAD_REQUEST", "the decompressed body is too large", "body")(
                scope, receive, send)
            return
        new_headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")]
        new_headers.append((b"content-length", str(len(body)).encode()))
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(dict(scope, headers=new_headers), replay, send)
