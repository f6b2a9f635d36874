"""`idmesh sink`: a local webhook receiver for demos and trying connections out. It checks each request's
X-Idmesh-Signature with the shared secret (audiences/outputs/webhook.py), applies the membership messages as set
operations per audience, and prints one line per message with the audience's size after it; a request with a bad
signature gets a 401 (so idmesh parks those deltas until the connection's secret is fixed).

    idmesh sink --port 9200 --secret demo-webhook-secret
    -> POST http://127.0.0.1:9200/hook    (any path is taken; GET /members answers the member sets as JSON)
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def add_sink_command(subparsers: Any) -> None:  # noqa: ANN401 (argparse's subparsers action has no public type)
    sink = subparsers.add_parser("sink", help="run a local webhook receiver that prints membership changes",
                                 description="Receive webhook membership messages, check their signatures and "
                                             "print them (a demo destination for webhook connections).")
    sink.add_argument("--host", default="127.0.0.1")
    sink.add_argument("--port", type=int, default=9200)
    sink.add_argument("--secret", default=os.environ.get("IDMESH_SINK_SECRET"),
                      help="the connection's credentials.secret (default $IDMESH_SINK_SECRET)")


class Sink:
    """The receiver's state: members per audience (MPIDs as sent, decimal strings)."""

    def __init__(self, secret: str, out: Any = None) -> None:
        self.secret = secret
        self.members: dict[int, set[str]] = {}
        self.names: dict[int, str] = {}
        self._out = out or sys.stdout

    def apply(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            audience, mpid = message["audience_id"], message["mpid"]
            self.names[audience] = message.get("external_name") or str(audience)
            held = self.members.setdefault(audience, set())
            if message["op"] == "add":
                held.add(mpid)
            else:
                held.discard(mpid)
            sign = "+" if message["op"] == "add" else "-"
            ids = ", ".join(f"{k}={v}" for k, v in sorted(message.get("identifiers", {}).items()) if k != "mpid")
            print(f"{sign} {self.names[audience]}: mpid {mpid}{f' ({ids})' if ids else ''} -> {len(held)} members",
                  file=self._out, flush=True)

    def app(self) -> Any:
        import orjson
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        from audiences.outputs import webhook

        async def receive(request: Request) -> JSONResponse:
            if request.method == "GET":
                return JSONResponse({self.names.get(a, str(a)): sorted(m) for a, m in self.members.items()})
            body = await request.body()
            if not webhook.verify(self.secret, request.headers.get(webhook.TIMESTAMP_HEADER),
                                  request.headers.get(webhook.SIGNATURE_HEADER), body):
                print("! a request with a bad or stale signature was refused (401)", file=self._out, flush=True)
                return JSONResponse({"error": "bad signature"}, status_code=401)
            try:
                messages = orjson.loads(body)["messages"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                return JSONResponse({"error": "expected {\"messages\": [...]}"}, status_code=400)
            self.apply(messages)
            return JSONResponse({"received": len(messages)})

        return Starlette(routes=[Route("/{path:path}", receive, methods=["GET", "POST"])])


def sink_command(args: argparse.Namespace) -> int:
    if not args.secret:
        print("idmesh sink: give --secret (the webhook connection's credentials.secret)", file=sys.stderr)
        return 2
    import uvicorn

    print(f"idmesh sink listening at http://{args.host}:{args.port}/hook", flush=True)
    uvicorn.run(Sink(args.secret).app(), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
