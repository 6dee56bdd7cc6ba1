"""Consumer lag per group: how far a group's committed offsets are behind the end of its topics.

FastStream's Prometheus middleware measures what a consumer processes, not what it has yet to read,
so lag is read from the broker (committed vs end offsets) and exported as a gauge.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import CollectorRegistry, Gauge

from farmesh.kafka.log_reader import topic_partitions

log = logging.getLogger(__name__)


async def group_lag(bootstrap: str, group: str, topics: Iterable[str]) -> dict[str, int]:
    """Messages not yet committed by `group`, per topic (a partition never committed counts from 0)."""
    topics = list(topics)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="farmesh-lag")
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, client_id="farmesh-lag")
    await admin.start()
    await consumer.start()
    try:
        partitions = [TopicPartition(t, p) for t, ps in (await topic_partitions(bootstrap, topics)).items() for p in ps]
        ends = await consumer.end_offsets(partitions) if partitions else {}
        committed = await admin.list_consumer_group_offsets(group)
        lag: dict[str, int] = {t: 0 for t in topics}
        for tp in partitions:
            done = committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0
            lag[tp.topic] += max(ends[tp] - done, 0)
        return lag
    finally:
        await consumer.stop()
        await admin.close()


class LagMonitor:
    """Refreshes `farmesh_consumer_lag{group,topic}` every `interval` seconds while the service runs."""

    def __init__(self, bootstrap: str, group: str, topics: Iterable[str], registry: CollectorRegistry,
                 interval: float = 10.0) -> None:
        self.bootstrap, self.group, self.topics, self.interval = bootstrap, group, list(topics), interval
        self.gauge = Gauge("farmesh_consumer_lag", "Messages the consumer group has not committed yet",
                           ["group", "topic"], registry=registry)
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        for topic, lag in (await group_lag(self.bootstrap, self.group, self.topics)).items():
            self.gauge.labels(self.group, topic).set(lag)

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # the broker may be restarting; the next round will tell
                log.warning("consumer lag of %s unavailable: %s", self.group, exc)
            await asyncio.sleep(self.interval)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
