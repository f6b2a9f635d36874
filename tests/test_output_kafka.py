"""Kafka output against librdkafka's mock cluster (inside the confluent-kafka wheel, spec/outputs.md §7): records
arrive keyed by MPID with the webhook's JSON and the connection/audience headers, partitioned like the Java client
(murmur2: aiokafka's partitioner and confluent's murmur2_random agree), and are read back with an aiokafka consumer;
a broker that is down, or goes down, means RetryLater; a missing topic and missing permissions mean Rejected with
the reason; one oversized record is rejected alone; membership changes reach the topic through DeliveryService.

The mock auto-creates topics with 4 partitions and cannot refuse one. Faults come from a second mock cluster made
through librdkafka's C mock API (ctypes on the library the wheel bundles): topic errors in metadata answers, errors
pushed onto produce answers, a broker set down and up."""

from __future__ import annotations

import asyncio
import ctypes
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import confluent_kafka
import orjson
import polars as pl
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from confluent_kafka.admin import AdminClient

from audiences.connections import Connection, ConnectionRegistry, Credentials, check_settings
from audiences.delivery import DeliveryService, default_outputs
from audiences.membership import apply_members
from audiences.outputs import webhook
from audiences.outputs.base import Acknowledged, AudienceRef, Delta, Rejected, RetryLater, RetryPolicy
from audiences.outputs.kafka import KafkaOutput, producer_options
from audiences.registry import AudienceRegistry
from engine.errors import BadRequest
from engine.idsync import IdSyncService
from engine.writer import WriteBatch

AUDIENCE = AudienceRef(12, "Buyers", "ext_buyers")
MOCK_PARTITIONS = 4          # what the mock gives an auto-created topic
SHORT_TIMEOUT_MS = 1500      # a broker that is down is given up on this fast in the fault tests


# --- clusters --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bootstrap() -> Iterator[str]:
    """A one-broker mock cluster, alive while this client is: its bootstrap address from the metadata."""
    holder = AdminClient({"test.mock.num.brokers": "1"})
    metadata = holder.list_topics(timeout=10)
    yield ",".join(f"{b.host}:{b.port}" for b in metadata.brokers.values())
    del holder


class FaultyCluster:
    """A mock cluster of its own with librdkafka's fault injection (rdkafka_mock.h)."""

    PRODUCE = 0                       # Kafka API keys
    UNKNOWN_TOPIC_OR_PART = 3         # Kafka error codes
    NOT_ENOUGH_REPLICAS = 19
    TOPIC_AUTHORIZATION_FAILED = 29

    def __init__(self) -> None:
        libs = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
        lib = ctypes.CDLL(str(next(libs.glob("librdkafka*.so*"))))
        lib.rd_kafka_conf_new.restype = ctypes.c_void_p
        lib.rd_kafka_conf_set.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                          ctypes.c_size_t]
        lib.rd_kafka_new.restype = ctypes.c_void_p
        lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_mock_cluster_new.restype = ctypes.c_void_p
        lib.rd_kafka_mock_cluster_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.rd_kafka_mock_cluster_destroy.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_mock_cluster_bootstraps.restype = ctypes.c_char_p
        lib.rd_kafka_mock_cluster_bootstraps.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_mock_topic_set_error.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        lib.rd_kafka_mock_broker_set_down.argtypes = [ctypes.c_void_p, ctypes.c_int32]
        lib.rd_kafka_mock_broker_set_up.argtypes = [ctypes.c_void_p, ctypes.c_int32]
        self._lib = lib
        errors = ctypes.create_string_buffer(512)
        conf = lib.rd_kafka_conf_new()
        # the handle that owns the cluster connects nowhere; quiet its "no bootstrap.servers" warning
        lib.rd_kafka_conf_set(conf, b"log_level", b"3", errors, len(errors))
        self._handle = lib.rd_kafka_new(0, conf, errors, len(errors))   # RD_KAFKA_PRODUCER, never used
        assert self._handle, errors.value
        self._cluster = lib.rd_kafka_mock_cluster_new(self._handle, 1)
        assert self._cluster
        self.bootstrap: str = lib.rd_kafka_mock_cluster_bootstraps(self._cluster).decode()

    def topic_error(self, topic: str, code: int) -> None:
        """Metadata answers name this error for the topic."""
        self._lib.rd_kafka_mock_topic_set_error(self._cluster, topic.encode(), code)

    def produce_errors(self, *codes: int) -> None:
        """The next produce answers fail with these codes, one per request."""
        self._lib.rd_kafka_mock_push_request_errors(
            ctypes.c_void_p(self._cluster), ctypes.c_int16(self.PRODUCE), ctypes.c_size_t(len(codes)),
            *(ctypes.c_int(code) for code in codes))

    def broker_down(self) -> None:
        self._lib.rd_kafka_mock_broker_set_down(self._cluster, 1)

    def broker_up(self) -> None:
        self._lib.rd_kafka_mock_broker_set_up(self._cluster, 1)

    def close(self) -> None:
        self._lib.rd_kafka_mock_cluster_destroy(self._cluster)
        self._lib.rd_kafka_destroy(self._handle)


@pytest.fixture
def faulty() -> Iterator[FaultyCluster]:
    cluster = FaultyCluster()
    yield cluster
    cluster.close()


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- helpers ---------------------------------------------------------------------------------------------------
def fresh_topic() -> str:
    return f"memberships-{uuid.uuid4().hex[:12]}"


def kafka_connection(bootstrap: str, topic: str, connection_id: int = 7, **block: Any) -> Connection:
    settings = check_settings("kafka", {"kafka": {"bootstrap_servers": bootstrap, "topic": topic, **block}})
    return Connection(connection_id, "ws", AUDIENCE.id, "kafka", "stream", "active", settings, Credentials())


def delta(seq: int, mpid: int, op: str = "add", **attributes: Any) -> Delta:
    return Delta(seq, mpid, op, {"mpid": str(mpid), "email": f"p{mpid}@example.com"}, attributes,
                 changed_ms=1_763_900_000_000 + seq)


async def deliver_once(connection: Connection, deltas: list[Delta], **kwargs: Any) -> list[Any]:
    output = KafkaOutput(connection, AUDIENCE, **kwargs)
    try:
        return await output.deliver(connection, deltas)
    finally:
        await output.aclose()


async def read_back(bootstrap: str, topic: str, count: int, wait_seconds: float = 30.0) -> list[Any]:
    """`count` records of the topic, from the start of every partition, read with an aiokafka consumer."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    records: list[Any] = []
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(MOCK_PARTITIONS)])
        deadline = time.monotonic() + wait_seconds   # a backstop against hanging, not a timing check
        while len(records) < count and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    assert len(records) == count, f"read {len(records)} of {count} records from {topic}"
    return sorted(records, key=lambda r: (r.partition, r.offset))


def confluent_partitions(bootstrap: str, topic: str, keys: list[bytes], partitioner: str) -> dict[bytes, int]:
    """Where confluent-kafka's producer puts each key with this partitioner."""
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "partitioner": partitioner})
    placed: dict[bytes, int] = {}

    def report(err: Any, message: Any) -> None:
        assert err is None, err
        placed[message.key()] = message.partition()

    for key in keys:
        producer.produce(topic, key=key, value=b"x", on_delivery=report)
    assert producer.flush(30) == 0
    return placed


# --- records ---------------------------------------------------------------------------------------------------
def test_records_arrive_keyed_by_mpid_with_the_webhook_message_and_headers(bootstrap: str):
    topic = fresh_topic()
    connection = kafka_connection(bootstrap, topic)
    deltas = [delta(1, 8278431810143534355, ltv=120.5), delta(2, 2), delta(3, -77), delta(4, 4, "remove")]
    outcomes = asyncio.run(deliver_once(connection, deltas))
    assert outcomes == [Acknowledged()] * 4

    records = asyncio.run(read_back(bootstrap, topic, 4))
    by_key = {r.key: r for r in records}
    assert set(by_key) == {b"8278431810143534355", b"2", b"-77", b"4"}
    for sent, message in zip(deltas, webhook.messages(connection, AUDIENCE, deltas)):
        record = by_key[str(sent.mpid).encode()]
        assert orjson.loads(record.value) == message
        assert dict(record.headers) == {"idmesh-connection": b"7", "idmesh-audience": b"12",
                                        "idmesh-external-name": b"ext_buyers", "idmesh-op": sent.op.encode(),
                                        "content-type": b"application/json"}
    first = orjson.loads(by_key[b"8278431810143534355"].value)
    assert first == {"audience_id": 12, "external_name": "ext_buyers", "connection_id": 7, "op": "add",
                     "mpid": "8278431810143534355",
                     "identifiers": {"mpid": "8278431810143534355", "email": "p8278431810143534355@example.com"},
                     "attributes": {"ltv": 120.5}, "changed_ms": 1_763_900_000_001}


def test_partitions_follow_murmur2_like_the_java_client(bootstrap: str):
    topic = fresh_topic()
    mpids = [1, 2, 3, 42, 1000, -5, 8278431810143534355, *range(100, 140)]
    connection = kafka_connection(bootstrap, topic)
    assert asyncio.run(deliver_once(connection, [delta(i, m) for i, m in enumerate(mpids, 1)])) \
        == [Acknowledged()] * len(mpids)
    records = asyncio.run(read_back(bootstrap, topic, len(mpids)))
    landed = {r.key: r.partition for r in records}
    keys = [str(m).encode() for m in mpids]

    partitions = list(range(MOCK_PARTITIONS))
    murmur2 = DefaultPartitioner()
    assert landed == {key: murmur2(key, partitions, partitions) for key in keys}
    assert landed == confluent_partitions(bootstrap, fresh_topic(), keys, "murmur2_random")
    # the check can fail: librdkafka's default (CRC32) places these keys elsewhere
    assert landed != confluent_partitions(bootstrap, fresh_topic(), keys, "consistent_random")
    assert len(set(landed.values())) == MOCK_PARTITIONS


def test_changes_of_one_member_share_a_partition_in_order(bootstrap: str):
    topic = fresh_topic()
    connection = kafka_connection(bootstrap, topic)

    async def scenario() -> None:
        output = KafkaOutput(connection, AUDIENCE)
        try:
            for seq, op in enumerate(["add", "remove", "add", "remove", "add"], 1):
                assert await output.deliver(connection, [delta(seq, 31337, op), delta(100 + seq, seq)]) \
                    == [Acknowledged()] * 2
        finally:
            await output.aclose()

    asyncio.run(scenario())
    records = [r for r in asyncio.run(read_back(bootstrap, topic, 10)) if r.key == b"31337"]
    assert len({r.partition for r in records}) == 1
    assert [orjson.loads(r.value)["op"] for r in records] == ["add", "remove", "add", "remove", "add"]


# --- faults ----------------------------------------------------------------------------------------------------
def test_a_broker_that_is_down_means_retry_later():
    connection = kafka_connection(f"127.0.0.1:{closed_port()}", fresh_topic())

    async def scenario() -> list[list[Any]]:
        output = KafkaOutput(connection, AUDIENCE, request_timeout_ms=SHORT_TIMEOUT_MS)
        try:
            # tried again on the next delivery with a new producer: still down, still RetryLater
            return [await output.deliver(connection, [delta(1, 1), delta(2, 2)]) for _ in range(2)]
        finally:
            await output.aclose()

    for outcomes in asyncio.run(scenario()):
        assert [type(o) for o in outcomes] == [RetryLater, RetryLater]
        assert "bootstrap" in outcomes[0].reason


def test_a_broker_going_down_means_retry_later_and_coming_back_delivers(faulty: FaultyCluster):
    topic = fresh_topic()
    connection = kafka_connection(faulty.bootstrap, topic)

    async def scenario() -> None:
        output = KafkaOutput(connection, AUDIENCE, request_timeout_ms=SHORT_TIMEOUT_MS)
        try:
            assert await output.deliver(connection, [delta(1, 1)]) == [Acknowledged()]
            faulty.broker_down()
            outcomes = await output.deliver(connection, [delta(2, 2), delta(3, 3)])
            assert [type(o) for o in outcomes] == [RetryLater, RetryLater]
            faulty.broker_up()
            assert await output.deliver(connection, [delta(2, 2), delta(3, 3)]) == [Acknowledged()] * 2
        finally:
            await output.aclose()

    asyncio.run(scenario())
    assert {r.key for r in asyncio.run(read_back(faulty.bootstrap, topic, 3))} == {b"1", b"2", b"3"}


def test_broker_errors_on_produce_retry_later(faulty: FaultyCluster):
    connection = kafka_connection(faulty.bootstrap, fresh_topic())

    async def scenario() -> None:
        output = KafkaOutput(connection, AUDIENCE, request_timeout_ms=SHORT_TIMEOUT_MS)
        try:
            await output.deliver(connection, [delta(1, 1)])   # metadata known, the producer is warm
            # more NOT_ENOUGH_REPLICAS answers than the producer retries before the record expires
            faulty.produce_errors(*[FaultyCluster.NOT_ENOUGH_REPLICAS] * 500)
            outcomes = await output.deliver(connection, [delta(2, 2)])
            assert [type(o) for o in outcomes] == [RetryLater]
            assert "NotEnoughReplicas" in outcomes[0].reason
        finally:
            await output.aclose()

    asyncio.run(scenario())


def test_a_topic_that_does_not_exist_is_rejected_with_the_reason(faulty: FaultyCluster):
    topic = fresh_topic()
    faulty.topic_error(topic, FaultyCluster.UNKNOWN_TOPIC_OR_PART)   # a cluster that does not auto-create it
    connection = kafka_connection(faulty.bootstrap, topic)
    outcomes = asyncio.run(deliver_once(connection, [delta(1, 1), delta(2, 2)], request_timeout_ms=SHORT_TIMEOUT_MS))
    assert [type(o) for o in outcomes] == [Rejected, Rejected]
    assert outcomes[0].reason.startswith(f"Kafka topic {topic!r} does not exist on {faulty.bootstrap}")
    assert "settings.kafka.topic" in outcomes[0].reason


def test_no_permission_to_write_the_topic_is_rejected(faulty: FaultyCluster):
    topic = fresh_topic()
    faulty.topic_error(topic, FaultyCluster.TOPIC_AUTHORIZATION_FAILED)
    connection = kafka_connection(faulty.bootstrap, topic)
    outcomes = asyncio.run(deliver_once(connection, [delta(1, 1)], request_timeout_ms=SHORT_TIMEOUT_MS))
    assert outcomes == [Rejected(f"not authorized to write to Kafka topic {topic!r} (topic ACLs)")]

    # the same refusal in a produce answer, for a topic whose metadata was fine
    other = kafka_connection(faulty.bootstrap, fresh_topic())

    async def scenario() -> list[Any]:
        output = KafkaOutput(other, AUDIENCE, request_timeout_ms=SHORT_TIMEOUT_MS)
        try:
            await output.deliver(other, [delta(1, 1)])
            faulty.produce_errors(FaultyCluster.TOPIC_AUTHORIZATION_FAILED)
            return await output.deliver(other, [delta(2, 2)])
        finally:
            await output.aclose()

    assert [type(o) for o in asyncio.run(scenario())] == [Rejected]


def test_an_oversized_record_is_rejected_alone(bootstrap: str):
    topic = fresh_topic()
    connection = kafka_connection(bootstrap, topic)
    deltas = [delta(1, 1), delta(2, 2, note="x" * 1_100_000), delta(3, 3)]   # above the 1 MiB request limit
    outcomes = asyncio.run(deliver_once(connection, deltas))
    assert outcomes[0] == outcomes[2] == Acknowledged()
    assert isinstance(outcomes[1], Rejected) and outcomes[1].reason.startswith("MessageSizeTooLargeError")
    assert {r.key for r in asyncio.run(read_back(bootstrap, topic, 2))} == {b"1", b"3"}


def test_nothing_to_send_starts_no_producer_and_closing_is_safe():
    connection = kafka_connection(f"127.0.0.1:{closed_port()}", fresh_topic())

    async def scenario() -> None:
        output = KafkaOutput(connection, AUDIENCE)
        assert await output.deliver(connection, []) == []
        await output.aclose()
        await output.aclose()

    asyncio.run(scenario())


# --- settings --------------------------------------------------------------------------------------------------
def test_producer_options_follow_the_settings():
    connection = kafka_connection("a:9092, b:9093", "t")
    options = producer_options(connection, 2000)
    assert options["bootstrap_servers"] == "a:9092,b:9093"
    assert (options["acks"], options["enable_idempotence"], options["request_timeout_ms"]) == ("all", False, 2000)
    assert options["security_protocol"] == "PLAINTEXT" and "sasl_plain_username" not in options

    settings = check_settings("kafka", {"kafka": {"bootstrap_servers": "a:9093", "topic": "t",
                                                  "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512"}})
    secure = Connection(8, "ws", 12, "kafka", "s", "active", settings,
                        Credentials({"username": "idmesh", "password": "pw"}))
    options = producer_options(secure, 2000)
    assert (options["sasl_mechanism"], options["sasl_plain_username"], options["sasl_plain_password"]) \
        == ("SCRAM-SHA-512", "idmesh", "pw")
    assert options["ssl_context"] is not None


@pytest.mark.parametrize("servers", ["h:0", "h:65536", "h", "h:9092,", "h:9092;g:1"])
def test_bootstrap_servers_need_host_and_port(servers: str):
    with pytest.raises(BadRequest) as raised:
        check_settings("kafka", {"kafka": {"bootstrap_servers": servers, "topic": "t"}})
    assert raised.value.field == "settings.kafka.bootstrap_servers"


# --- through the delivery service ------------------------------------------------------------------------------
def test_membership_changes_reach_the_topic_through_the_delivery_service(tmp_path: Path, bootstrap: str):
    assert default_outputs()["kafka"] is KafkaOutput
    service = IdSyncService.open(str(tmp_path / "kafka.duckdb"))

    def commit(batch: WriteBatch) -> None:
        service.writer.submit(batch).result(timeout=30)

    try:
        created, batch = service.workspaces.plan_create("kafka", None)
        commit(batch)
        service.workspaces.remember(created.workspace)
        workspace = created.workspace
        audiences = AudienceRegistry(lambda ws, ca_id: False)
        audience, batch = audiences.plan_create(workspace.id, {
            "name": "streamed", "external_name": "ext_streamed", "type": "standard",
            "criteria": {"identity": {"type": "email", "present": True}}})
        commit(batch)
        audiences.remember(audience)
        connections = ConnectionRegistry(service.master_key)
        topic = fresh_topic()
        connection, batch = connections.plan_create(workspace.id, audience.id, {
            "output": "kafka", "settings": {"identity_types": ["email"],
                                            "kafka": {"bootstrap_servers": bootstrap, "topic": topic}}})
        commit(batch)
        connections.remember(connection)
        delivery = DeliveryService(service.connection, connections, audiences,
                                   lambda ws: service.workspaces.get(ws).scope, service.computation_gate,
                                   policy=RetryPolicy(base_seconds=0.05, max_seconds=0.2))
        service.connection.executemany(
            "INSERT INTO identities_base VALUES (?, ?, 'email', ?, ?, 0)",
            [(workspace.scope, m, f"p{m}@example.com", f"P{m}@Example.com") for m in (1, 2, 3, 4)])

        def members(mpids: list[int]) -> None:
            cursor = service.connection.cursor()
            cursor.begin()
            apply_members(cursor, workspace.id, audience.id, pl.Series("mpid", mpids, dtype=pl.Int64),
                          time.time_ns() // 1_000_000)
            cursor.commit()
            cursor.close()

        async def scenario() -> list[dict[str, Any]]:
            try:
                members([1, 2, 3])
                first = await delivery.run_once()
                assert (first.diffs[connection.id].adds, first.flushes[connection.id].acknowledged) == (3, 3)
                members([2, 3, 4])
                second = await delivery.run_once()
                assert second.flushes[connection.id].acknowledged == 2
            finally:
                await delivery.aclose()
            return [orjson.loads(r.value) | {"key": r.key} for r in await read_back(bootstrap, topic, 5)]

        records = asyncio.run(scenario())
        assert sorted((r["op"], r["mpid"]) for r in records) == [
            ("add", "1"), ("add", "2"), ("add", "3"), ("add", "4"), ("remove", "1")]
        assert all(r["key"] == r["mpid"].encode() and r["audience_id"] == audience.id
                   and r["connection_id"] == connection.id and r["external_name"] == "ext_streamed"
                   for r in records)
        four = next(r for r in records if r["mpid"] == "4")
        assert four["identifiers"] == {"email": "P4@Example.com", "mpid": "4"}
        cursor = service.connection.cursor()
        try:
            assert cursor.execute("SELECT mpid FROM delivery_state ORDER BY mpid").fetchall() == [(2,), (3,), (4,)]
            assert cursor.execute("SELECT count(*) FROM delivery_outbox").fetchall() == [(0,)]
        finally:
            cursor.close()
    finally:
        service.close()
