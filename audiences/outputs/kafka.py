"""Kafka output: one record per membership change, produced with aiokafka to the topic a connection names.

Record:
    topic      settings.kafka.topic
    key        the MPID as UTF-8 decimal text, e.g. b"8278431810143534355"
    value      JSON, the webhook's message (outputs/webhook.messages), one per record:
               {"audience_id": 12, "external_name": "new_low_sessions", "connection_id": 3, "op": "add",
                "mpid": "8278431810143534355", "identifiers": {"mpid": "...", "email": "..."},
                "attributes": {"ltv": 120.5}, "changed_ms": 1763900000000}
    headers    idmesh-connection (connection id), idmesh-audience (audience id), idmesh-external-name,
               idmesh-op (add | remove), content-type (application/json)

Partitioning is aiokafka's default, murmur2 of the key like the Java client (librdkafka's `murmur2_random`, not
its default `consistent_random`), so every change of one MPID lands in one partition, in order: the producer has
at most one request in flight per partition. Consumers apply `add` and `remove` as set operations keyed by
(audience_id, mpid): delivery is at least once, so a change may arrive twice.

Outcomes, per record: the broker acknowledged it with acks=all -> Acknowledged. No answer in time, a broker that
is down or cannot be reached, a leader moving, too few in-sync replicas -> RetryLater (the outbox backs off).
What sending again cannot fix -> Rejected with the reason, parked until the connection changes: a topic that does
not exist on a cluster that does not create topics, no permission to write to it (topic or cluster ACLs), a
failed SASL handshake once connected, a record larger than the broker or producer take.

Idempotence is off. It works against the librdkafka mock cluster, but aiokafka's idempotent producer never
expires a batch: it retries until the broker takes it, so with a broker gone a delivery (and closing the
producer) would wait forever, where the outbox wants an answer within the request timeout. Duplicates it would
have prevented are harmless here (set operations), and order per partition is kept without it.

Security: `security_protocol` PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL; SASL PLAIN or SCRAM-SHA-256/512 with
the connection's username and password; TLS verifies the broker against the system's CA certificates (no client
certificates). None of it is tested against a broker here (the mock cluster speaks neither), and aiokafka reports
a handshake that fails while bootstrapping as "Unable to bootstrap", which is retried like an unreachable broker.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka import errors as kafka_errors
from aiokafka.helpers import create_ssl_context

from audiences.outputs.base import (
    DEFAULT_TIMEOUT,
    Acknowledged,
    AudienceRef,
    Delta,
    Outcome,
    Rejected,
    RetryLater,
    outcome_of_error,
)
from audiences.outputs.webhook import messages

if TYPE_CHECKING:
    from audiences.connections import Connection

# How long a record may wait for its acknowledgement, and the producer for a topic's metadata; the same bound as
# an HTTP destination's answer (IDMESH_DELIVERY_TIMEOUT_SECONDS).
DEFAULT_REQUEST_TIMEOUT_MS = int((DEFAULT_TIMEOUT.read or 30.0) * 1000)
# Records of one `deliver` call are sent together: a short linger lets the producer fill requests without
# holding a batch back noticeably.
LINGER_MS = 5

# Errors no resend fixes: the configuration (topic, ACLs, credentials, sizes) has to change first.
_REJECTING: tuple[type[BaseException], ...] = (
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.SaslAuthenticationFailed,
    kafka_errors.AuthenticationFailedError,
    kafka_errors.AuthenticationMethodNotSupported,
    kafka_errors.UnsupportedSaslMechanismError,
    kafka_errors.IllegalSaslStateError,
    kafka_errors.InvalidTopicError,
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.InvalidRequiredAcksError,
    kafka_errors.PolicyViolationError,
    ssl.SSLCertVerificationError,
)


def record_key(delta: Delta) -> bytes:
    return str(delta.mpid).encode()


def record_headers(connection: Connection, audience: AudienceRef, delta: Delta) -> list[tuple[str, bytes]]:
    return [("idmesh-connection", str(connection.id).encode()), ("idmesh-audience", str(audience.id).encode()),
            ("idmesh-external-name", audience.external_name.encode()), ("idmesh-op", delta.op.encode()),
            ("content-type", b"application/json")]


def producer_options(connection: Connection, request_timeout_ms: int) -> dict[str, Any]:
    """AIOKafkaProducer's keyword arguments for a connection."""
    settings = connection.options
    protocol = settings["security_protocol"]
    options: dict[str, Any] = {
        "bootstrap_servers": settings["bootstrap_servers"],
        "client_id": f"idmesh-connection-{connection.id}",
        "acks": "all",
        "enable_idempotence": False,
        "linger_ms": LINGER_MS,
        "request_timeout_ms": request_timeout_ms,
        "security_protocol": protocol,
    }
    if protocol.endswith("SSL"):
        options["ssl_context"] = create_ssl_context()
    if protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings["sasl_mechanism"]
        options["sasl_plain_username"] = connection.credentials.get("username")
        options["sasl_plain_password"] = connection.credentials.get("password")
    return options


class KafkaOutput:
    kind = "kafka"

    def __init__(self, connection: Connection, audience: AudienceRef,
                 request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS) -> None:
        self._audience = audience
        self._topic: str = connection.options["topic"]
        self._servers: str = connection.options["bootstrap_servers"]
        self._options = producer_options(connection, request_timeout_ms)
        # A record's future settles within the request timeout (batches expire, idempotence being off); this
        # bound is a backstop, should one not.
        self._wait_seconds = 2 * request_timeout_ms / 1000 + 5
        self._producer: AIOKafkaProducer | None = None

    def batch_limit(self, connection: Connection) -> int:
        return connection.batch_size

    async def deliver(self, connection: Connection, deltas: list[Delta]) -> list[Outcome]:
        if not deltas:
            return []
        try:
            producer = await self._started()
        except Exception as exc:  # no broker answered (or bootstrapping failed): everything waits
            return [self._outcome(exc)] * len(deltas)
        problem = await self._topic_problem(producer)
        if problem is not None:
            return [problem] * len(deltas)

        # every slot is overwritten below; the placeholder only guards against acknowledging by accident
        outcomes: list[Outcome] = [RetryLater("not sent")] * len(deltas)
        pending: dict[asyncio.Future[Any], int] = {}
        for i, (delta, message) in enumerate(zip(deltas, messages(connection, self._audience, deltas))):
            try:
                future = await producer.send(self._topic, key=record_key(delta), value=orjson.dumps(message),
                                             headers=record_headers(connection, self._audience, delta))
            except Exception as exc:  # too large, buffer full past the timeout, producer failed
                outcomes[i] = self._outcome(exc)
                continue
            pending[future] = i
        if pending:
            done, late = await asyncio.wait(pending, timeout=self._wait_seconds)
            for future in done:
                exc = RuntimeError("cancelled") if future.cancelled() else future.exception()
                outcomes[pending[future]] = Acknowledged() if exc is None else self._outcome(exc)
            for future in late:   # it may still be written: at least once, and a resend changes nothing
                future.add_done_callback(_settled)
                outcomes[pending[future]] = RetryLater(f"no acknowledgement from Kafka within "
                                                       f"{self._wait_seconds:g} s")
        return outcomes

    async def aclose(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            # flushes what is still buffered; bounded, since batches expire after the request timeout
            await producer.stop()

    # --- the producer -----------------------------------------------------------------------------------------
    async def _started(self) -> AIOKafkaProducer:
        """The producer, started on first use (on the running loop: the output may be built on another one)."""
        if self._producer is not None:
            return self._producer
        producer = AIOKafkaProducer(**self._options)
        try:
            await producer.start()
        except BaseException:
            await producer.stop()   # closes the client it opened; a later delivery starts afresh
            raise
        self._producer = producer
        return producer

    async def _topic_problem(self, producer: AIOKafkaProducer) -> Outcome | None:
        """Why no record can go to the topic now, or None when its partitions are known. A topic missing from
        metadata the cluster did answer is a configuration error; from metadata it did not answer, a broker
        trouble."""
        try:
            await producer.partitions_for(self._topic)
            return None
        except kafka_errors.UnknownTopicOrPartitionError:
            answered = await producer.client.force_metadata_update()
            if answered and producer.client.cluster.partitions_for_topic(self._topic) is None:
                return Rejected(f"Kafka topic {self._topic!r} does not exist on {self._servers} and the cluster did "
                                "not create it (auto.create.topics.enable is off?): create the topic or fix "
                                "settings.kafka.topic")
            return RetryLater(f"no metadata for Kafka topic {self._topic!r} from {self._servers}")
        except Exception as exc:
            return self._outcome(exc)

    def _outcome(self, exc: BaseException) -> Outcome:
        if isinstance(exc, kafka_errors.ProducerClosed):
            self._producer = None   # stopped under us: the next delivery starts a new one
        if isinstance(exc, kafka_errors.TopicAuthorizationFailedError):
            return Rejected(f"not authorized to write to Kafka topic {self._topic!r} (topic ACLs)")
        if isinstance(exc, kafka_errors.ClusterAuthorizationFailedError):
            return Rejected("not authorized by the Kafka cluster (cluster ACLs)")
        if isinstance(exc, _REJECTING):
            detail = str(exc).strip()
            return Rejected(f"{type(exc).__name__}: {detail}"[:500] if detail else type(exc).__name__)
        if isinstance(exc, Exception):
            return outcome_of_error(exc)
        return RetryLater(type(exc).__name__)


def _settled(future: asyncio.Future[Any]) -> None:
    """Reads the late answer of a record already counted as RetryLater, so asyncio does not report it unread."""
    if not future.cancelled():
        future.exception()
