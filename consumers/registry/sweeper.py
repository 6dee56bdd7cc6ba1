"""The registry's clock: publishes a `node.timed_out` decision for each live node silent past the timeout.

The decision is applied when consumed, like any event, so the registry stays a pure function of the topic. It is
published through the registry router's declared publisher (`Registry.decisions`), onto the topic the group reads,
signed with the registry's key (`Registry.key`, consumers/registry/decisions.py): the heartbeat topic is open to
every provider's node, and only signed decisions are applied.
"""
from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from faststream.kafka.publisher import DefaultPublisher

from consumers.registry import rules
from consumers.registry.consumer import Metrics
from consumers.registry.decisions import RegistryKey
from consumers.registry.ports import NodeStore
from farmesh.kafka import messaging
from schemas.events import NodeTimedOut

log = logging.getLogger(__name__)


class Sweeper:
    """Publishes `node.timed_out`, signed with `key`, for live nodes not heard from for `timeout` seconds."""

    def __init__(self, decisions: DefaultPublisher, store: NodeStore, timeout: float, period: float | None = None,
                 metrics: Metrics | None = None, *, key: RegistryKey) -> None:
        self.decisions, self.store, self.timeout, self.metrics, self.key = decisions, store, timeout, metrics, key
        self.period = period if period is not None else min(max(timeout / 4, 0.2), 5.0)
        self._published: dict[str, tuple[Any, float]] = {}

    async def sweep_once(self, now: datetime | None = None) -> list[NodeTimedOut]:
        now = now or datetime.now(timezone.utc)
        due = await self.store.due_for_timeout(now - timedelta(seconds=self.timeout))
        published = []
        for row in due:
            peer, heartbeat_id = row["peer_id"], row["last_heartbeat_id"]
            previous = self._published.get(peer)
            if previous is not None and previous[0] == heartbeat_id and time.monotonic() - previous[1] < self.timeout:
                continue  # decided already; not applied yet
            decision = self.key.sign(NodeTimedOut(peer_id=peer, last_heartbeat_id=heartbeat_id,
                                                  last_seen=row["last_seen"], timeout_seconds=self.timeout))
            await messaging.publish_through(self.decisions, decision, peer)
            self._published[peer] = (heartbeat_id, time.monotonic())
            published.append(decision)
            log.info("node %s timed out: last heartbeat entered the log at %s", peer, row["last_seen"].isoformat())
        if self.metrics is not None:
            self.metrics.timeouts_published.inc(len(published))
            counts = await self.store.count_by_state()
            for state in ("unknown", *rules.LIVE_STATES, "offline"):
                self.metrics.nodes.labels(state).set(counts.get(state, 0))
        return published

    async def run(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("registry sweep failed; retrying", exc_info=True)
            await asyncio.sleep(self.period)
