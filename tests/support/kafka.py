"""Test helpers for a real Kafka-protocol broker."""
from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer

from farmesh.kafka.lag import group_lag


async def wait_caught_up(bootstrap: str, group: str, topic: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (lag := (await group_lag(bootstrap, group, [topic]))[topic]) > 0:
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
