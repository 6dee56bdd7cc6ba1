"""Run consumer groups in a test's event loop on the real broker, each with its own metrics registry."""
from __future__ import annotations

import contextlib
from typing import AsyncIterator, Callable

from faststream.kafka import KafkaBroker
from prometheus_client import CollectorRegistry

from farmesh.kafka import messaging
Setup = Callable[[KafkaBroker, CollectorRegistry], None]


@contextlib.asynccontextmanager
async def running(kafka_bootstrap: str, groups: dict[str, Setup]) -> AsyncIterator[list[KafkaBroker]]:
    await messaging.ensure_topics(kafka_bootstrap, messaging.mesh_topics(3))
    brokers: list[KafkaBroker] = []
    try:
        for group, setup in groups.items():
            registry = CollectorRegistry()
            broker = messaging.create_broker(kafka_bootstrap, group, registry)
            setup(broker, registry)
            await broker.start()
            brokers.append(broker)
        yield brokers
    finally:
        for broker in brokers:
            await broker.stop()
