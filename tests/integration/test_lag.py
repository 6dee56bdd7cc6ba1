"""Consumer lag is read from the real broker: committed offsets vs end offsets."""
from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client import CollectorRegistry

from farmesh.kafka.lag import LagMonitor
from farmesh.kafka.messaging import ensure_topics

pytestmark = pytest.mark.integration


async def test_lag_counts_what_the_group_has_not_committed(kafka_bootstrap):
    topic, group = f"lag-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_bootstrap, [(topic, 2)])
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    for i in range(5):
        await producer.send_and_wait(topic, b"x", key=str(i).encode())
    await producer.stop()
    registry = CollectorRegistry()
    monitor = LagMonitor(kafka_bootstrap, group, [topic], registry)
    await monitor.refresh()
    assert registry.get_sample_value("farmesh_consumer_lag", {"group": group, "topic": topic}) == 5

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=group,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        got = 0
        while got < 3:
            for records in (await consumer.getmany(timeout_ms=2000, max_records=3 - got)).values():
                got += len(records)
        await consumer.commit()
    finally:
        await consumer.stop()
    await monitor.refresh()
    assert registry.get_sample_value("farmesh_consumer_lag", {"group": group, "topic": topic}) == 2
