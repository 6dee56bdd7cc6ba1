"""Apache Kafka as the mesh runs it (farmesh/dev/kafka.py): started from the Maven jars on loopback, restarted on
its data dir with its data, stopped by pid; the mesh's topics created with their configs (the heartbeat topic's log times are
the broker's). Apache Kafka only: skipped, saying so, when FARMESH_TEST_BROKER=noida."""
from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from farmesh.dev.kafka import start_kafka
from farmesh.dev.processes import pid_alive
from farmesh.kafka import messaging
from schemas import topics
from tests.support.kafka import on_kafka, read_all

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _kafka_only() -> None:
    if not on_kafka():
        pytest.skip("Apache Kafka's own behaviour (FARMESH_TEST_BROKER=noida)")


async def test_restart_keeps_ports_and_data_and_stop_leaves_nothing(tmp_path) -> None:
    node = await asyncio.to_thread(start_kafka, tmp_path / "kafka")
    try:
        assert node.bootstrap.startswith("127.0.0.1:")
        assert await messaging.ensure_topics(node.bootstrap, [("kept", 2)]) == ["kept"]
        producer = AIOKafkaProducer(bootstrap_servers=node.bootstrap, enable_idempotence=True)
        await producer.start()
        try:
            await producer.send_and_wait("kept", b"acknowledged", key=b"k")
        finally:
            await producer.stop()
    finally:
        await asyncio.to_thread(node.stop)
    assert not pid_alive(node.pid)
    again = await asyncio.to_thread(start_kafka, tmp_path / "kafka")
    try:
        assert again.bootstrap == node.bootstrap  # same ports, same cluster, same log
        assert await messaging.ensure_topics(again.bootstrap, [("kept", 2)]) == []
        assert await read_all(again.bootstrap, "kept") == [b"acknowledged"]
        await heartbeat_topic_log_times_are_the_brokers(again.bootstrap)
    finally:
        await asyncio.to_thread(again.stop)
    assert not pid_alive(again.pid)


async def heartbeat_topic_log_times_are_the_brokers(bootstrap: str) -> None:
    await messaging.ensure_topics(bootstrap, messaging.mesh_topics(3))
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topics.HEARTBEATS.name)])
        config = {entry[0]: entry[1] for entry in response.resources[0][4]}
    finally:
        await admin.close()
    assert config["message.timestamp.type"] == "LogAppendTime"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:  # a producer claiming another time (a node's clock far off) gets the broker's
        sent = await producer.send_and_wait(topics.HEARTBEATS.name, b"{}", key=b"peer", timestamp_ms=1_000)
    finally:
        await producer.stop()
    assert abs(sent.timestamp / 1000 - time.time()) < 60
