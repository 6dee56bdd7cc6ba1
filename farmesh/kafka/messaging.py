"""Kafka plumbing shared by every service: the broker factory, event publishing, dead letters.

Only standard Kafka semantics are used (the dev broker is noida-db, production is Apache Kafka).
"""
from __future__ import annotations

import asyncio
import logging
import weakref
from functools import partial
from typing import Any, Iterable

from faststream import BaseMiddleware
from faststream.kafka import KafkaBroker, KafkaRouter
from faststream.kafka.publisher import DefaultPublisher
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from farmesh.kafka import long_poll
from schemas import topics
from schemas.events import DeadLetter, Event

log = logging.getLogger(__name__)



# Each service serves its own registry; a broker's dead-letter counter lives in the registry it was made with.
_dead_letter_counters: "weakref.WeakKeyDictionary[KafkaBroker, Counter]" = weakref.WeakKeyDictionary()


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
    counter = _dead_letter_counters.get(broker)
    if counter is not None:
        counter.labels(consumer_group, record.topic).inc()
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


def bootstrap_servers(bootstrap: str) -> list[str]:
    """"host:port,host:port" as a list: FastStream takes one string for ONE server (aiokafka would split it), so a
    cluster's bootstrap (FARMESH_KAFKA_BOOTSTRAP=a:9092,b:9092,c:9092) must reach it as a list."""
    return [server.strip() for server in bootstrap.split(",") if server.strip()]


def create_broker(bootstrap: str, service: str, registry: CollectorRegistry, **kwargs: Any) -> KafkaBroker:
    """A service's broker: idempotent producer, Prometheus and dead-letter middlewares, the long-poll floor."""
    long_poll.install()
    broker = KafkaBroker(
        bootstrap_servers(bootstrap),
        client_id=f"farmesh-{service}",
        enable_idempotence=True,  # retried produce requests never duplicate a record
        middlewares=[
            KafkaPrometheusMiddleware(registry=registry, app_name=f"farmesh-{service}"),
            partial(DeadLetterMiddleware, consumer_group=service),
        ],
        **kwargs,
    )
    _dead_letter_counters[broker] = Counter(
        "farmesh_dead_letters_total", "Records sent to the dead-letter topic", ["consumer_group", "topic"],
        registry=registry,
    )
    return broker


def declare_dead_letters(router: KafkaRouter, group: str, description: str) -> Any:
    """A consumer group's dead letters as a publisher its router declares: sent by `send_dead_letter` or the
    DeadLetterMiddleware (which also count them), declared so the group's contract (AsyncAPI) names them and unit
    tests can watch them (`.mock`)."""
    return router.publisher(topics.DEAD_LETTER.name, schema=DeadLetter, title=f"{topics.DEAD_LETTER.name}:{group}",
                            description=description)


async def publish(broker: KafkaBroker, topic: str, event: Event, key: str) -> None:
    await broker.publish(event, topic, key=key.encode(), headers={topics.EVENT_TYPE_HEADER: event.type})  # type: ignore[attr-defined]


async def publish_through(publisher: DefaultPublisher, event: Event, key: str, topic: str = "") -> None:
    """`publish` through a publisher a router declared (same key, same event-type header).

    `topic`, when given, replaces the publisher's own for this record: FastStream's way to a topic known only at
    run time (a request's reply topic), the publisher still naming the topic family in the AsyncAPI document.
    """
    await publisher.publish(event, topic, key=key.encode(), headers={topics.EVENT_TYPE_HEADER: event.type})  # type: ignore[attr-defined]


async def ensure_topics(
    bootstrap: str,
    specs: Iterable[tuple[str, int]],
    *,
    replication_factor: int = 1,
    timeout: float = 15.0,
) -> list[str]:
    """Create the missing topics with the given partition counts (and a mesh topic's own configs: the heartbeat
    topic's LogAppendTime); existing ones are left alone.

    Returns the names that were created. Idempotent and safe against a concurrent creator.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    wanted = dict(specs)
    for name, partitions in wanted.items():
        if partitions < 1:
            raise ValueError(f"topic {name!r}: partitions must be >= 1, got {partitions}")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    await asyncio.wait_for(admin.start(), timeout)
    try:
        existing = set(await admin.list_topics())
        configs = {t.name: dict(t.config) for t in topics.ALL if t.config}
        missing = [NewTopic(name=n, num_partitions=p, replication_factor=replication_factor,
                            topic_configs=configs.get(n, {}))
                   for n, p in wanted.items() if n not in existing]
        if not missing:
            return []
        response = await admin.create_topics(missing, timeout_ms=int(timeout * 1000))
        created: list[str] = []
        for item in response.topic_errors:
            name, code = item[0], item[1]
            if code == 0:
                created.append(name)
            elif code == TopicAlreadyExistsError.errno:
                continue  # someone else created it meanwhile
            else:
                message = item[2] if len(item) > 2 else ""
                raise for_code(code)(f"creating topic {name!r}: {message or 'error code ' + str(code)}")
        await _until_led(admin, [t.name for t in missing], timeout)
        return created
    finally:
        await admin.close()


async def _until_led(admin: Any, names: list[str], timeout: float) -> None:
    """Wait until every partition of the topics `names` has a leader in the cluster's metadata.

    Apache Kafka answers CreateTopics before its brokers' metadata lists the new partitions: a producer or a
    consumer that asks at once may see no partitions (nothing assigned, nothing counted) for a while."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        described = await admin.describe_topics(names)
        if all(t["error_code"] == 0 and t["partitions"] and all(p["leader"] >= 0 for p in t["partitions"])
               for t in described):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"topics {names} created but without partition leaders after {timeout:.0f} s")
        await asyncio.sleep(0.05)


def mesh_topics(partitions: int) -> list[tuple[str, int]]:
    return [(t.name, partitions) for t in topics.ALL]
