"""The `make run` demo pieces: data/demo.json's audience and webhook connection are created at start-up (once),
and `idmesh sink` checks signatures and keeps the member sets the messages describe."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import httpx
import orjson

from api.config_audiences import ensure_audiences
from api.sink_cli import Sink
from audiences.outputs import webhook

REPO = Path(__file__).parent.parent


def test_the_demo_config_creates_its_audience_and_connection_once(server):
    credentials = server.create_workspace(name="demo-like")
    demo = json.loads((REPO / "data" / "demo.json").read_text())["workspaces"][0]
    entry = {"api_key": credentials.api_key, "audiences": demo["audiences"]}

    def ensure() -> list[str]:
        return asyncio.run_coroutine_threadsafe(ensure_audiences(server.app, [entry]), server.loop).result()

    created = ensure()
    assert [line.split(":")[0] for line in created] == ["audience 'Searchers'",
                                                        "connection 'local sink' (webhook) of audience 'Searchers'"]
    [audience] = server.app.state.audiences.list(credentials.id)
    [connection] = server.app.state.connections.list(credentials.id, audience.id)
    assert (connection.output, connection.options["url"], connection.max_age_seconds) == \
        ("webhook", "http://127.0.0.1:9200/hook", 1)
    assert ensure() == []   # a restart with the same config creates nothing
    assert server.query("SELECT count(*) FROM delivery_connections") == [(1,)]


def _signed(secret: str, messages: list[dict]) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps({"messages": messages})
    stamp = str(int(time.time()))
    return body, {webhook.TIMESTAMP_HEADER: stamp, webhook.SIGNATURE_HEADER: webhook.sign(secret, stamp, body)}


def test_the_sink_applies_signed_messages_and_refuses_others():
    printed = io.StringIO()
    sink = Sink("s3cret", printed)

    async def scenario() -> list[int]:
        transport = httpx.ASGITransport(app=sink.app())
        async with httpx.AsyncClient(transport=transport, base_url="http://sink") as client:
            message = {"audience_id": 1, "external_name": "searchers", "connection_id": 1, "op": "add",
                       "mpid": "42", "identifiers": {"mpid": "42", "email": "a@b.c"}, "attributes": {},
                       "changed_ms": 0}
            body, headers = _signed("s3cret", [message, {**message, "mpid": "43"}])
            ok = await client.post("/hook", content=body, headers=headers)
            body, headers = _signed("s3cret", [{**message, "op": "remove"}])
            removed = await client.post("/hook", content=body, headers=headers)
            body, headers = _signed("wrong", [message])
            refused = await client.post("/hook", content=body, headers=headers)
            members = await client.get("/members")
            assert members.json() == {"searchers": ["43"]}
            return [ok.status_code, removed.status_code, refused.status_code]

    assert asyncio.run(scenario()) == [200, 200, 401]
    assert sink.members == {1: {"43"}}
    lines = printed.getvalue().splitlines()
    assert lines[0] == "+ searchers: mpid 42 (email=a@b.c) -> 1 members"
    assert lines[2] == "- searchers: mpid 42 (email=a@b.c) -> 1 members"
    assert "refused" in lines[3]
