"""Consumer group `registry`: keeps far_nodes and far_node_state_changes from the heartbeat topic.

Each batch is verified record by record (JSON schema, key = peer id, signature by the key behind the peer id),
then applied in one database transaction with the rows of its peers locked (consumers.registry.rules decides);
offsets are committed only after that commit. Records that are malformed, unsigned, badly signed, stale or
skewed go to the dead-letter topic with the reason, after the commit, and change nothing.

The sweep (`Sweeper`) is the registry's clock: every few seconds it looks for live nodes whose last accepted
heartbeat is older than the timeout and publishes a `node.timed_out` decision for each onto the heartbeat topic,
keyed by peer id. The decision is applied when consumed, like any event, so the table is a pure function of
the topic: replaying it from the beginning (a new group on an empty database) rebuilds the same rows.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.middlewares import AckPolicy
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import ValidationError

from consumers.registry import repository, rules
from farmesh.kafka import messaging
from farmesh.swarm.identity import SignatureError, verify_payload
from schemas import topics
from schemas.events import NodeHeartbeat, NodeTimedOut, node_event_adapter

log = logging.getLogger(__name__)

HEARTBEAT_SCHEMA_VERSION = 2


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter("farmesh_registry_events_total", "Heartbeat-topic events by outcome",
                              ["type", "outcome"], registry=registry)
        self.state_changes = Counter("farmesh_registry_state_changes_total", "Node state changes", ["to_state"],
                                     registry=registry)
        self.timeouts_published = Counter("farmesh_registry_timeouts_published_total",
                                          "Time-out decisions the sweep published", registry=registry)
        self.nodes = Gauge("farmesh_registry_nodes", "Known nodes by state", ["state"], registry=registry)
        self.batch = Histogram("farmesh_registry_batch_size", "Records per consumer batch",
                               buckets=(1, 5, 20, 100, 500), registry=registry)


def log_time(record: Any, fallback: datetime) -> datetime:
    """The record's timestamp (broker log time, or the producer's create time), as an aware datetime."""
    ts = getattr(record, "timestamp", None)
    if ts is None or ts < 0:
        return fallback
    return datetime.fromtimestamp(ts / 1000, tz=timezone.utc)


def check_record(record: Any) -> NodeHeartbeat | NodeTimedOut:
    """Parse and authenticate one record; raises ValueError with the reason a record is refused."""
    try:
        payload = json.loads(record.value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"malformed: not JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise ValueError("malformed: not a JSON object")
    try:
        event = node_event_adapter.validate_python(payload)
    except ValidationError as exc:
        raise ValueError(f"malformed: {exc}") from None
    key = record.key.decode("utf-8", errors="replace") if record.key is not None else None
    if key != event.peer_id:
        raise ValueError(f"record key {key!r} is not the event's peer_id {event.peer_id!r}")
    if isinstance(event, NodeHeartbeat):
        if event.schema_version != HEARTBEAT_SCHEMA_VERSION:
            raise ValueError(f"unsupported heartbeat schema_version {event.schema_version} "
                             f"(this registry reads {HEARTBEAT_SCHEMA_VERSION})")
        try:
            verify_payload(payload)  # the very object the event was built from
        except SignatureError as exc:
            raise ValueError(f"signature: {exc}") from None
    return event


async def apply_records(pool: asyncpg.Pool, records: list[Any], max_skew: timedelta,
                        metrics: Metrics | None = None) -> list[tuple[Any, str]]:
    """Verify and apply records (Kafka ConsumerRecords) in one transaction; returns the refused ones with why."""
    letters: list[tuple[Any, str]] = []
    checked: list[tuple[Any, NodeHeartbeat | NodeTimedOut]] = []
    for record in records:
        try:
            checked.append((record, check_record(record)))
        except ValueError as exc:
            letters.append((record, str(exc)))
            if metrics:
                metrics.events.labels("invalid", "rejected").inc()
    changes: list[rules.StateChange] = []
    if checked:
        async with pool.acquire() as conn, conn.transaction():
            rows = await repository.lock_rows(conn, (e.peer_id for _, e in checked))
            dirty: dict[str, rules.NodeRow] = {}
            for record, event in checked:
                meta = rules.RecordMeta(record.partition, record.offset, log_time(record, event.occurred_at))
                row = rows.get(event.peer_id)
                if isinstance(event, NodeHeartbeat):
                    outcome = rules.apply_heartbeat(row, event, meta, max_skew)
                else:
                    outcome = rules.apply_timeout(row, event, meta)
                if metrics:
                    metrics.events.labels(event.type, outcome.kind).inc()
                if outcome.kind == "applied":
                    assert outcome.row is not None
                    rows[event.peer_id] = dirty[event.peer_id] = outcome.row
                    if outcome.change is not None:
                        changes.append(outcome.change)
                elif outcome.kind in ("stale", "rejected"):
                    letters.append((record, outcome.reason))
                elif outcome.kind == "obsolete":
                    log.info("ignored %s of %s: %s", event.type, event.peer_id, outcome.reason)
            await repository.save(conn, list(dirty.values()), changes)
    for change in changes:
        log.info("node %s: %s -> %s (%s)", change.peer_id, change.from_state, change.to_state, change.reason)
        if metrics:
            metrics.state_changes.labels(change.to_state).inc()
    return letters


def register(broker: KafkaBroker, pool: asyncpg.Pool, registry: CollectorRegistry, *,
             group_id: str = topics.GROUP_REGISTRY, max_skew: float = 60.0, max_records: int = 500,
             topic: str = topics.HEARTBEATS.name) -> Metrics:
    """Subscribe the registry to the heartbeat topic; returns its metrics (the sweep adds to them)."""
    metrics = Metrics(registry)
    skew = timedelta(seconds=max_skew)

    @broker.subscriber(
        topic, group_id=group_id, batch=True, max_records=max_records,
        auto_offset_reset="earliest", ack_policy=AckPolicy.NACK_ON_ERROR,
        title="registry", description="Verifies signed heartbeats and keeps the node registry",
    )
    async def on_node_events(_: list[Any], message: KafkaMessage) -> None:
        records = message.raw_message if isinstance(message.raw_message, (list, tuple)) else (message.raw_message,)
        metrics.batch.observe(len(records))
        letters = await apply_records(pool, list(records), skew, metrics)
        for record, reason in letters:  # after the commit: a failed write redelivers the batch, not the letters
            await messaging.send_dead_letter(broker, group_id, record, reason)

    return metrics


