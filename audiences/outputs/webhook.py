"""Webhook output: membership changes POSTed as JSON batches to a URL the connection names, signed with
HMAC-SHA256 so the receiver can tell they came from this idmesh and were not replayed later.

Request:
    POST <settings.webhook.url>
    Content-Type: application/json
    X-Idmesh-Timestamp: <unix seconds>
    X-Idmesh-Signature: sha256=<hex HMAC-SHA256(credentials.secret, "<timestamp>." + body)>
    X-Idmesh-Delivery: <connection id>-<first seq>-<last seq>   (names the outbox rows the batch carries)

    {"messages": [{"audience_id": 12, "external_name": "new_low_sessions", "connection_id": 3, "op": "add",
                   "mpid": "8278431810143534355", "identifiers": {"mpid": "...", "email": "..."},
                   "attributes": {"ltv": 120.5}, "changed_ms": 1763900000000}, ...]}

`mpid` is a decimal string, as IDSync answers it (JavaScript numbers lose 64-bit integers). Any 2xx acknowledges
the whole batch; 408, 425, 429 and 5xx (or no answer) retry it, honouring Retry-After; any other status rejects
it. Delivery is at least once: a receiver applies `add` and `remove` as set operations keyed by (audience_id,
mpid), so a resend changes nothing. A resend may group deltas differently (retries, rows replaced meanwhile), so
X-Idmesh-Delivery identifies a request's rows for logs, not a whole change to deduplicate on.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from audiences.outputs.base import AudienceRef, Delta, Outcome, http_client, outcome_of_error, outcome_of_status

if TYPE_CHECKING:
    from audiences.connections import Connection

SIGNATURE_HEADER = "X-Idmesh-Signature"
TIMESTAMP_HEADER = "X-Idmesh-Timestamp"
DELIVERY_HEADER = "X-Idmesh-Delivery"
# a receiver refuses signatures older than this: a captured request cannot be replayed much later
DEFAULT_TOLERANCE_SECONDS = 300


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Idmesh-Signature value for a body sent at `timestamp` (unix seconds, as text)."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(secret: str, timestamp: str | None, signature: str | None, body: bytes,
           tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS, now: float | None = None) -> bool:
    """What a receiver checks: the signature matches the body and timestamp (compared in constant time), and
    the timestamp is within `tolerance_seconds` of now."""
    if not timestamp or not signature:
        return False
    try:
        sent = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - sent) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def messages(connection: Connection, audience: AudienceRef, deltas: list[Delta]) -> list[dict[str, Any]]:
    return [{"audience_id": audience.id, "external_name": audience.external_name, "connection_id": connection.id,
             "op": delta.op, "mpid": str(delta.mpid), "identifiers": delta.identifiers,
             "attributes": delta.attributes, "changed_ms": delta.changed_ms} for delta in deltas]


class WebhookOutput:
    kind = "webhook"

    def __init__(self, connection: Connection, audience: AudienceRef, client: httpx.AsyncClient | None = None) -> None:
        self._audience = audience
        self._url = connection.options["url"]
        self._secret = connection.credentials["secret"]
        self._client = client or http_client()

    def batch_limit(self, connection: Connection) -> int:
        return connection.batch_size

    async def deliver(self, connection: Connection, deltas: list[Delta]) -> list[Outcome]:
        if not deltas:
            return []
        body = orjson.dumps({"messages": messages(connection, self._audience, deltas)})
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: timestamp,
                   SIGNATURE_HEADER: sign(self._secret, timestamp, body),
                   DELIVERY_HEADER: f"{connection.id}-{deltas[0].seq}-{deltas[-1].seq}"}
        try:
            response = await self._client.post(self._url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return [outcome_of_error(exc)] * len(deltas)
        return [outcome_of_status(response)] * len(deltas)

    async def aclose(self) -> None:
        await self._client.aclose()
