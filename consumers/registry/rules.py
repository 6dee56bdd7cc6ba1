"""The registry's rules, as pure functions: how one event changes one node's row.

Every decision depends only on the node's row and the event with its log position and log time, never on
the registry's wall clock, so replaying the heartbeat topic from the beginning makes the same decisions and
rebuilds the same table (state history included). Signatures are checked before (farmesh.swarm.identity).

Heartbeat, in this order:
  duplicate  not newer than the last accepted heartbeat, and it *is* that heartbeat (same event id) or a record
             at or before the last applied log position (a redelivery): ignored silently;
  stale      not newer than the last accepted heartbeat (a replay): dead-lettered;
  skewed     event time more than `max_skew` away from its log time (a clock far off, or a delayed replay of an
             old heartbeat): dead-lettered;
  key        a public key other than the pinned one (cannot verify for the same peer id): dead-lettered;
  applied    upsert, state change recorded, uptime accounted.
Time-out decision (node.timed_out): applied only while the heartbeat it names is still the node's latest and
the node is not offline already; otherwise it is obsolete (a newer heartbeat arrived) and ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal
from uuid import UUID

from schemas.events import NodeHeartbeat, NodeTimedOut

LIVE_STATES = ("joining", "online", "draining")
Kind = Literal["applied", "duplicate", "stale", "rejected", "obsolete"]


@dataclass(frozen=True)
class RecordMeta:
    """Where an event sits in the log: partition, offset and the record's timestamp (log time)."""

    partition: int
    offset: int
    log_time: datetime


@dataclass(frozen=True)
class NodeRow:
    """One far_nodes row (the columns the registry maintains)."""

    peer_id: str
    wallet: str
    model: str
    start_block: int
    end_block: int
    total_blocks: int
    throughput: float
    state: str
    version: str
    device: dict[str, Any]
    public_key: str
    heartbeat_interval: float
    first_seen: datetime
    last_seen: datetime
    last_heartbeat_at: datetime
    last_heartbeat_id: UUID
    state_changed_at: datetime
    online_since: datetime | None
    uptime_seconds: float
    last_partition: int
    last_offset: int

    COLUMNS = (
        "peer_id", "wallet", "model", "start_block", "end_block", "total_blocks", "throughput", "state", "version",
        "device", "public_key", "heartbeat_interval", "first_seen", "last_seen", "last_heartbeat_at",
        "last_heartbeat_id", "state_changed_at", "online_since", "uptime_seconds", "last_partition", "last_offset",
    )

    def values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, c) for c in self.COLUMNS)


@dataclass(frozen=True)
class StateChange:
    peer_id: str
    from_state: str | None
    to_state: str
    at: datetime
    event_id: UUID
    reason: Literal["heartbeat", "timeout"]


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    reason: str = ""
    row: NodeRow | None = None
    change: StateChange | None = None


def _is_redelivery(row: NodeRow, event_id: UUID, meta: RecordMeta) -> bool:
    return event_id == row.last_heartbeat_id or (meta.partition == row.last_partition and meta.offset <= row.last_offset)


def _online_seconds(since: datetime | None, until: datetime) -> float:
    return max((until - since).total_seconds(), 0.0) if since is not None else 0.0


def apply_heartbeat(row: NodeRow | None, hb: NodeHeartbeat, meta: RecordMeta, max_skew: timedelta) -> Outcome:
    """The row after a heartbeat whose signature was already verified."""
    if row is not None and hb.occurred_at <= row.last_heartbeat_at:
        if _is_redelivery(row, hb.event_id, meta):
            return Outcome("duplicate", "already applied")
        return Outcome("stale", f"stale heartbeat: occurred_at {hb.occurred_at.isoformat()} is not newer than the "
                                f"last accepted one ({row.last_heartbeat_at.isoformat()}); replayed or reordered")
    skew = hb.occurred_at - meta.log_time
    if abs(skew) > max_skew:
        direction = "ahead of" if skew > timedelta(0) else "behind"
        return Outcome("rejected", f"heartbeat time {hb.occurred_at.isoformat()} is {abs(skew).total_seconds():.0f} s "
                                   f"{direction} its log time {meta.log_time.isoformat()} (max skew "
                                   f"{max_skew.total_seconds():.0f} s): clock off or a delayed replay")
    if row is not None and row.public_key != hb.public_key:
        return Outcome("rejected", "public key differs from the key pinned for this peer")

    previous = row.state if row is not None else None
    online_since = row.online_since if row is not None else None
    uptime = row.uptime_seconds if row is not None else 0.0
    if previous == "online" and hb.state != "online":
        uptime += _online_seconds(online_since, hb.occurred_at)
        online_since = None
    elif hb.state == "online" and previous != "online":
        online_since = hb.occurred_at
    changed = previous != hb.state
    new = NodeRow(
        peer_id=hb.peer_id, wallet=hb.wallet, model=hb.model, start_block=hb.start_block, end_block=hb.end_block,
        total_blocks=hb.total_blocks, throughput=hb.throughput, state=hb.state, version=hb.version,
        device=hb.device.model_dump(mode="json"), public_key=hb.public_key or "",
        heartbeat_interval=hb.interval_seconds,
        first_seen=row.first_seen if row is not None else meta.log_time,
        last_seen=meta.log_time, last_heartbeat_at=hb.occurred_at, last_heartbeat_id=hb.event_id,
        state_changed_at=hb.occurred_at if changed else row.state_changed_at,  # type: ignore[union-attr]
        online_since=online_since, uptime_seconds=uptime, last_partition=meta.partition, last_offset=meta.offset,
    )
    change = StateChange(hb.peer_id, previous, hb.state, hb.occurred_at, hb.event_id, "heartbeat") if changed else None
    return Outcome("applied", row=new, change=change)


def apply_timeout(row: NodeRow | None, decision: NodeTimedOut, meta: RecordMeta) -> Outcome:
    """The row after the registry's decision that the node's heartbeats stopped."""
    if row is None:
        return Outcome("obsolete", "time-out for a peer the registry does not know")
    if meta.partition == row.last_partition and meta.offset <= row.last_offset:
        return Outcome("duplicate", "already applied")
    if row.state == "offline":
        return Outcome("obsolete", "the node is offline already")
    if decision.last_heartbeat_id != row.last_heartbeat_id:
        return Outcome("obsolete", "a newer heartbeat arrived after the decision")
    uptime = row.uptime_seconds
    if row.state == "online":
        # The online period ends with the last heartbeat the node sent.
        uptime += _online_seconds(row.online_since, row.last_heartbeat_at)
    new = dataclasses.replace(
        row, state="offline", state_changed_at=decision.occurred_at, online_since=None, uptime_seconds=uptime,
        last_partition=meta.partition, last_offset=meta.offset,
    )
    return Outcome("applied", row=new,
                   change=StateChange(row.peer_id, row.state, "offline", decision.occurred_at, decision.event_id, "timeout"))


def due_for_timeout(row: NodeRow, now: datetime, timeout: timedelta) -> bool:
    """Whether the sweep should declare a live node timed out: nothing heard for `timeout` (log time)."""
    return row.state in LIVE_STATES and now - row.last_seen > timeout
