"""Test helpers for a real Kafka-protocol broker."""
from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient


async def group_lag(bootstrap: str, group: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not parts:
            await consumer.topics()
            parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = await consumer.end_offsets(parts)
        committed = await admin.list_consumer_group_offsets(group)
        return sum(ends[tp] - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0) for tp in parts)
    finally:
        await consumer.stop()
        await admin.close()


async def wait_caught_up(bootstrap: str, group: str, topic: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (lag := await group_lag(bootstrap, group, topic)) > 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"group {group} still {lag} behind on {topic}")
        await asyncio.sleep(0.2)


async def read_all(bootstrap: str, topic: str, timeout: float = 2.0) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        out: list[bytes] = []
        while batch := await consumer.getmany(timeout_ms=int(timeout * 1000)):
            out += [r.value for records in batch.values() for r in records]
        return out
    finally:
        await consumer.stop()
