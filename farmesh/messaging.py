"""Kafka plumbing shared by every service: the broker factory, event publishing, dead letters.

Only standard Kafka semantics are used (the dev broker is noida-db, production is Apache Kafka).
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Iterable

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from faststream import BaseMiddleware
from faststream.kafka import KafkaBroker
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from schemas import topics
from schemas.events import DeadLetter, Event

log = logging.getLogger(__name__)

DEAD_LETTERS = Counter(
    "farmesh_dead_letters_total", "Records sent to the dead-letter topic", ["consumer_group", "topic"],
)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="backslashreplace")


async def send_dead_letter(broker: KafkaBroker, consumer_group: str, record: Any, reason: str) -> None:
    """Park a record we cannot accept, with why; its offset may then be committed."""
    letter = DeadLetter(
        consumer_group=consumer_group,
        original_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=_text(record.key),
        payload=_text(record.value) or "",
        reason=reason[:2000],
    )
    await broker.publish(letter, topics.DEAD_LETTER.name, key=record.key)
    DEAD_LETTERS.labels(consumer_group, record.topic).inc()
    log.warning("dead-lettered %s[%s]@%s: %s", record.topic, record.partition, record.offset, reason[:200])


class DeadLetterMiddleware(BaseMiddleware):
    """A message that does not validate against its schema goes to the dead-letter topic."""

    def __init__(self, msg: Any, /, *, context: Any, consumer_group: str) -> None:
        super().__init__(msg, context=context)
        self.consumer_group = consumer_group

    async def consume_scope(self, call_next: Any, msg: Any) -> Any:
        try:
            return await call_next(msg)
        except ValidationError as exc:
            await send_dead_letter(self.context.get("broker"), self.consumer_group, msg.raw_message, str(exc))
            return None


def create_broker(bootstrap: str, service: str, registry: CollectorRegistry, **kwargs: Any) -> KafkaBroker:
    return KafkaBroker(
        bootstrap,
        client_id=f"farmesh-{service}",
        enable_idempotence=True,  # retried produce requests never duplicate a record
        middlewares=[
            KafkaPrometheusMiddleware(registry=registry, app_name=f"farmesh-{service}"),
            partial(DeadLetterMiddleware, consumer_group=service),
        ],
        **kwargs,
    )


async def publish(broker: KafkaBroker, topic: str, event: Event, key: str) -> None:
    await broker.publish(event, topic, key=key.encode(), headers={"event-type": event.type})  # type: ignore[attr-defined]


async def ensure_topics(bootstrap: str, partitions: int, names: Iterable[str] | None = None) -> list[str]:
    """Create the mesh's topics that are missing; existing ones are left as they are."""
    wanted = list(names) if names is not None else [t.name for t in topics.ALL]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="farmesh-admin")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in wanted if n not in existing]
        if missing:
            try:
                await admin.create_topics([NewTopic(n, partitions, 1) for n in missing])
            except TopicAlreadyExistsError:
                pass  # another service created them first
        return missing
    finally:
        await admin.close()
