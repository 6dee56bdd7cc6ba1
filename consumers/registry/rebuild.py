"""The registry rebuilt from the heartbeat topic alone (`farmesh registry rebuild`): the same rules over the whole
topic into an empty database, publishing nothing. Time-out decisions are verified with the live registry's keys
(consumers/registry/decisions.py), so a forged one is refused here exactly as it was live."""
from __future__ import annotations

import logging
from datetime import timedelta

import asyncpg

from consumers.registry.consumer import apply_records
from consumers.registry.decisions import TrustedKeys
from consumers.registry.repository import PostgresNodes
from farmesh.kafka.log_reader import topic_partitions
from schemas import topics

log = logging.getLogger(__name__)


async def committed_offsets(bootstrap: str, group_id: str, topic: str = topics.HEARTBEATS.name) -> dict[int, int]:
    """The next offset `group_id` will read in each partition of `topic` (what it has applied)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group_id)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in committed.items() if tp.topic == topic and meta.offset >= 0}


async def rebuild(bootstrap: str, pool: asyncpg.Pool, *, trusted: TrustedKeys, topic: str = topics.HEARTBEATS.name,
                  until: dict[int, int] | None = None, max_skew: float = 60.0, batch: int = 500) -> dict[str, int]:
    """Replay the heartbeat topic from the beginning into `pool`'s (migrated, empty) registry tables.

    Reads each partition up to `until` (default: its end now), exactly as the consumer group would have, with
    the same rules; nothing is published (no time-outs, no dead letters). Time-out decisions count only when
    signed by one of the `trusted` keys (the live registry's). With `until` = a live group's committed offsets,
    the result equals that group's table. Returns counts of records read and refused.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    read = refused = 0
    try:
        await consumer.start()  # in the try: a consumer that failed to start is still stopped (no "Unclosed" noise)
        partitions = [TopicPartition(topic, p) for p in (await topic_partitions(bootstrap, [topic]))[topic]]
        ends = await consumer.end_offsets(partitions)
        stop = {tp: (ends[tp] if until is None else min(until.get(tp.partition, 0), ends[tp])) for tp in partitions}
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        skew, store = timedelta(seconds=max_skew), PostgresNodes(pool)
        pending = {tp for tp in partitions if stop[tp] > 0}
        for tp in partitions:
            if stop[tp] > 0 and await consumer.position(tp) >= stop[tp]:
                pending.discard(tp)
        while pending:
            fetched = await consumer.getmany(*pending, timeout_ms=1000, max_records=batch)
            for tp, records in fetched.items():
                records = [r for r in records if r.offset < stop[tp]]
                if records:
                    refused += len(await apply_records(store, records, skew, trusted))
                    read += len(records)
                if await consumer.position(tp) >= stop[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()
    return {"read": read, "refused": refused}
