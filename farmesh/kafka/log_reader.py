"""Reading a topic's log without a consumer group: from the earliest offset (or a time) to the end seen at
start, partitions assigned, nothing committed, so live groups are never disturbed (replay, analytics)."""
from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any, AsyncIterator


async def topic_partitions(bootstrap: str, topics: list[str], timeout: float = 15.0) -> dict[str, list[int]]:
    """Each topic's partition ids, from the cluster's metadata (an unknown topic: none).

    A consumer that subscribed to nothing knows no topic's partitions: AIOKafkaConsumer.topics() fetches the
    metadata but does not keep it (noida-db's first answer happened to list every topic; Apache Kafka's does
    not). The admin client's DescribeTopics asks for exactly these topics."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="farmesh-partitions",
                                request_timeout_ms=int(timeout * 1000))
    await asyncio.wait_for(admin.start(), timeout)
    try:
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    found = {t["topic"]: sorted(p["partition"] for p in t["partitions"]) for t in described if t["error_code"] == 0}
    return {t: found.get(t, []) for t in topics}


async def read_log_batches(bootstrap: str, topic: str, since: datetime | None, positions: dict[int, tuple[int, int]],
                           timeout: float = 30.0) -> AsyncIterator[list[Any]]:
    """Every record of `topic` from the earliest offset (or the first at/after `since`) to the end offsets
    seen at start, a fetched batch at a time (records of one partition, in log order); group-less (nothing
    committed). `positions` receives partition -> (first offset, end offset)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    try:
        await consumer.start()
        tps = [TopicPartition(topic, p) for p in (await topic_partitions(bootstrap, [topic]))[topic]]
        if not tps:
            return
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        if since is not None:
            found = await consumer.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in tps})
            starts = {tp: (found[tp].offset if found.get(tp) is not None else ends[tp]) for tp in tps}
        for tp in tps:
            consumer.seek(tp, starts[tp])
        positions.update({tp.partition: (starts[tp], ends[tp]) for tp in tps})
        pending = {tp for tp in tps if starts[tp] < ends[tp]}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=1000, max_records=2000)
            if batch:
                deadline = loop.time() + timeout
            for tp, records in batch.items():
                if records and records[-1].offset >= ends[tp]:
                    records = [r for r in records if r.offset < ends[tp]]
                if records:
                    yield records
                if records and records[-1].offset + 1 >= ends[tp]:
                    pending.discard(tp)
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
            # A finished partition is fetched no more: a fetch of finished partitions alone waits out
            # fetch_max_wait_ms, and meanwhile nothing else is fetched from that broker.
            consumer.pause(*(tp for tp in tps if tp not in pending))
            if pending and loop.time() > deadline:
                raise TimeoutError(f"replay: no progress on {sorted(tp.partition for tp in pending)} in {timeout:.0f} s")
    finally:
        await consumer.stop()
