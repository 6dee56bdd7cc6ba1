"""An idle consumer waits fetch_max_wait_ms between empty fetches, even on a broker that answers at once."""
from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.consumer.fetcher import Fetcher

from farmesh.kafka import long_poll
from farmesh.kafka.messaging import ensure_topics

pytestmark = pytest.mark.integration


async def test_idle_consumer_fetches_at_most_once_per_max_wait(kafka_bootstrap, monkeypatch):
    long_poll.install()
    assert Fetcher._proc_fetch_request.__farmesh_long_poll__
    fetches = 0
    floored = Fetcher._proc_fetch_request

    async def counting(self, *args):
        nonlocal fetches
        fetches += 1
        return await floored(self, *args)

    monkeypatch.setattr(Fetcher, "_proc_fetch_request", counting)
    topic = f"idle-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_bootstrap, [(topic, 1)])
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, fetch_max_wait_ms=200,
                                auto_offset_reset="latest")
    await consumer.start()
    try:
        await consumer.getmany(timeout_ms=100)  # assignment and first position
        fetches = 0
        await asyncio.sleep(2.0)
    finally:
        await consumer.stop()
    # 2 s at one empty fetch per 200 ms: about 10 (a broker that honours long-poll gives the same).
    assert fetches <= 15, fetches
