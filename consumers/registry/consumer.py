"""Consumer group `registry`: keeps far_nodes and far_node_state_changes from the heartbeat topic.

Each batch is verified record by record (JSON schema, key = peer id; a heartbeat's signature by the key behind
the peer id, a time-out decision's by one of the registry's own keys), then applied in one database transaction
with the rows of its peers locked (consumers.registry.rules decides); offsets are committed only after that
commit. Records that are malformed, unsigned, badly signed, stale or skewed go to the dead-letter topic with the
reason, after the commit, and change nothing.

The sweep (`Sweeper`) is the registry's clock: every few seconds it looks for live nodes whose last accepted
heartbeat is older than the timeout and publishes a signed `node.timed_out` decision for each onto the heartbeat
topic, keyed by peer id (consumers/registry/decisions.py: anyone may produce to that topic, only the registry can
sign). The decision is applied when consumed, like any event, so the table is a pure function of the topic:
replaying it from the beginning (a new group on an empty database) rebuilds the same rows.

The group is a FastStream `KafkaRouter` (`RegistryRouter`): its subscriber and the publishers it declares for what
it emits (the sweep's decisions, dead letters). The handler is a plain function; what it needs (its `NodeStore`
port, the skew bound, the metrics) is a `Registry` that `register()` puts in the broker's context, where the
handler's `Context(REGISTRY)` parameter finds it, so the unit tests bind an in-memory store instead. A router
belongs to one broker and its subscriber's topic and group are fixed when declared, so `register()` declares one
per broker (a test gives each run its own topic and group); the module's `router` is the group as declared by
default, which the AsyncAPI document (consumers/asyncapi.py) describes.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
from faststream import Context
from faststream.kafka import KafkaBroker, KafkaMessage, KafkaRouter
from faststream.kafka.publisher import DefaultPublisher
from faststream.middlewares import AckPolicy
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import ValidationError

from consumers.registry import rules
from consumers.registry.decisions import DecisionSignatureError, RegistryKey, TrustedKeys
from consumers.registry.ports import NodeStore
from consumers.registry.repository import PostgresNodes
from farmesh.kafka import messaging
from farmesh.swarm.identity import SignatureError, verify_payload
from schemas import topics
from schemas.events import NodeHeartbeat, NodeTimedOut, node_event_adapter

log = logging.getLogger(__name__)

HEARTBEAT_SCHEMA_VERSION = 2
TIMEOUT_SCHEMA_VERSION = 2


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


def check_record(record: Any, trusted: TrustedKeys) -> NodeHeartbeat | NodeTimedOut:
    """Parse and authenticate one record; raises ValueError with the reason a record is refused.

    A heartbeat must be signed by its node (the key behind its peer id), a time-out decision by one of the
    registry's `trusted` keys."""
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
    else:
        if event.schema_version != TIMEOUT_SCHEMA_VERSION:
            raise ValueError(f"unsupported node.timed_out schema_version {event.schema_version} "
                             f"(this registry reads {TIMEOUT_SCHEMA_VERSION}, signed)")
        try:
            trusted.verify(payload)  # the very object the event was built from
        except DecisionSignatureError as exc:
            raise ValueError(f"signature: {exc}") from None
    return event


async def apply_records(store: NodeStore, records: list[Any], max_skew: timedelta, trusted: TrustedKeys,
                        metrics: Metrics | None = None) -> list[tuple[Any, str]]:
    """Verify and apply records (Kafka ConsumerRecords) in one transaction; returns the refused ones with why.
    Time-out decisions count only when signed by one of the `trusted` keys."""
    letters: list[tuple[Any, str]] = []
    checked: list[tuple[Any, NodeHeartbeat | NodeTimedOut]] = []
    for record in records:
        try:
            checked.append((record, check_record(record, trusted)))
        except ValueError as exc:
            letters.append((record, str(exc)))
            if metrics:
                metrics.events.labels("invalid", "rejected").inc()
    changes: list[rules.StateChange] = []
    if checked:
        async with store.transaction() as tx:
            rows = await tx.lock(e.peer_id for _, e in checked)
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
            await tx.save(list(dirty.values()), changes)
    for change in changes:
        log.info("node %s: %s -> %s (%s)", change.peer_id, change.from_state, change.to_state, change.reason)
        if metrics:
            metrics.state_changes.labels(change.to_state).inc()
    return letters


REGISTRY = "registry"  # the key of the handler's Registry in its broker's context


@dataclass
class Registry:
    """The registry group bound to one broker by `register()`: what its handler needs, and the router's publisher
    of time-out decisions with the key that signs them, for the sweep (consumers/registry/sweeper.py)."""

    store: NodeStore
    max_skew: timedelta
    metrics: Metrics
    group_id: str  # the consumer group its dead letters name
    decisions: DefaultPublisher
    key: RegistryKey  # signs the sweep's decisions
    trusted: TrustedKeys  # whose decisions are applied


async def on_node_events(_: list[Any], message: KafkaMessage, broker: KafkaBroker = Context(),
                         registry: Registry = Context(REGISTRY)) -> None:
    """Apply a consumer batch of the heartbeat topic; dead-letter what was refused, with why."""
    records = message.raw_message if isinstance(message.raw_message, (list, tuple)) else (message.raw_message,)
    registry.metrics.batch.observe(len(records))
    letters = await apply_records(registry.store, list(records), registry.max_skew, registry.trusted,
                                  registry.metrics)
    for record, reason in letters:  # after the commit: a failed write redelivers the batch, not the letters
        await messaging.send_dead_letter(broker, registry.group_id, record, reason)


class RegistryRouter(KafkaRouter):
    """The group: its subscriber on the heartbeat topic and its declared publishers."""

    def __init__(self, *, group_id: str = topics.GROUP_REGISTRY, topic: str = topics.HEARTBEATS.name,
                 max_records: int = 500) -> None:
        super().__init__()
        self.decisions = self.publisher(
            topic, title=f"{topic}:{topics.GROUP_REGISTRY}", schema=NodeTimedOut,
            description="The sweep's node.timed_out decisions, keyed by peer id, signed with the registry's "
                        "Ed25519 key (key_id, signature), applied when consumed like any event (the registry stays "
                        "a pure function of the topic); unsigned or foreign-signed ones are dead-lettered",
        )
        self.dead_letters = messaging.declare_dead_letters(
            self, topics.GROUP_REGISTRY,
            "Heartbeat-topic records refused (malformed, unsigned, badly signed, stale, skewed; "
            "time-out decisions not signed by the registry), with why",
        )
        self.subscriber(
            topic, group_id=group_id, batch=True, max_records=max_records,
            auto_offset_reset="earliest", ack_policy=AckPolicy.NACK_ON_ERROR,
            title="registry", description="Verifies signed heartbeats and keeps the node registry",
        )(on_node_events)


router = RegistryRouter()  # the group as declared by default (the AsyncAPI document); register() makes its own


def bind(broker: KafkaBroker, store: NodeStore, registry: CollectorRegistry, *, key: RegistryKey,
         trusted: TrustedKeys | None = None, group_id: str = topics.GROUP_REGISTRY, max_skew: float = 60.0,
         max_records: int = 500, topic: str = topics.HEARTBEATS.name) -> Registry:
    """The group on `broker`, on any `NodeStore`: a router of its own included, its `Registry` in the context.

    `key` signs its decisions; `trusted` (default: that key alone) are the keys whose decisions it applies."""
    group = RegistryRouter(group_id=group_id, topic=topic, max_records=max_records)
    bound = Registry(store, timedelta(seconds=max_skew), Metrics(registry), group_id, group.decisions, key,
                     trusted if trusted is not None else TrustedKeys.of([key.public_key]))
    broker.context.set_global(REGISTRY, bound)
    broker.include_router(group)
    return bound


def register(broker: KafkaBroker, pool: asyncpg.Pool, registry: CollectorRegistry, *, key: RegistryKey,
             trusted: TrustedKeys | None = None, group_id: str = topics.GROUP_REGISTRY, max_skew: float = 60.0,
             max_records: int = 500, topic: str = topics.HEARTBEATS.name) -> Registry:
    """The group on `broker`, keeping the registry in `pool`'s database (the service's set-up, and the tests')."""
    return bind(broker, PostgresNodes(pool), registry, key=key, trusted=trusted, group_id=group_id,
                max_skew=max_skew, max_records=max_records, topic=topic)
