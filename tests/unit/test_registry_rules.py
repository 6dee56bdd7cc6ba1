"""The registry's pure rules: staleness by the per-peer stream, skew, time-outs, uptime, idempotence, replay."""
from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.registry.rules import NodeRow, Outcome, RecordMeta, apply_heartbeat, apply_timeout, due_for_timeout
from schemas.events import DeviceInfo, NodeHeartbeat, NodeTimedOut

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
SKEW = timedelta(seconds=60)
PEER = "QmPeer"


def hb(seconds: float, state: str = "online", wallet: str = "w1", **changes) -> NodeHeartbeat:
    fields = dict(
        peer_id=PEER, wallet=wallet, model="tiny", start_block=0, end_block=2, total_blocks=4, throughput=1.0,
        state=state, version="v", device=DeviceInfo(kind="cpu"), interval_seconds=1.0, public_key="pk",
        signature="sig", occurred_at=T0 + timedelta(seconds=seconds))
    return NodeHeartbeat(**{**fields, **changes})


def at(offset: int, seconds: float, partition: int = 0) -> RecordMeta:
    return RecordMeta(partition, offset, T0 + timedelta(seconds=seconds))


def timeout(row: NodeRow, seconds: float) -> NodeTimedOut:
    return NodeTimedOut(peer_id=PEER, last_heartbeat_id=row.last_heartbeat_id, last_seen=row.last_seen,
                        timeout_seconds=5, occurred_at=T0 + timedelta(seconds=seconds))


def applied(outcome: Outcome) -> NodeRow:
    assert outcome.kind == "applied", outcome
    assert outcome.row is not None
    return outcome.row


def test_first_heartbeat_registers_the_node() -> None:
    first = hb(0, "joining")
    out = apply_heartbeat(None, first, at(0, 0.1), SKEW)
    row = applied(out)
    assert (row.state, row.wallet, row.start_block, row.end_block, row.total_blocks) == ("joining", "w1", 0, 2, 4)
    assert row.first_seen == row.last_seen == T0 + timedelta(seconds=0.1)  # log time
    assert row.last_heartbeat_at == first.occurred_at and row.last_heartbeat_id == first.event_id
    assert out.change is not None and (out.change.from_state, out.change.to_state, out.change.reason) == (None, "joining", "heartbeat")
    assert out.change.at == first.occurred_at and out.change.event_id == first.event_id


def test_state_changes_and_uptime() -> None:
    row = applied(apply_heartbeat(None, hb(0, "joining"), at(0, 0), SKEW))
    row = applied(out := apply_heartbeat(row, hb(3, "online"), at(1, 3), SKEW))
    assert out.change and out.change.from_state == "joining" and row.online_since == T0 + timedelta(seconds=3)
    row = applied(out := apply_heartbeat(row, hb(8, "online"), at(2, 8), SKEW))
    assert out.change is None and row.state_changed_at == T0 + timedelta(seconds=3)  # no change, no history
    row = applied(apply_heartbeat(row, hb(13, "draining"), at(3, 13), SKEW))
    assert row.uptime_seconds == 10.0 and row.online_since is None
    row = applied(apply_heartbeat(row, hb(14, "offline"), at(4, 14), SKEW))
    assert row.uptime_seconds == 10.0 and row.state == "offline"
    row = applied(apply_heartbeat(row, hb(20, "online"), at(5, 20), SKEW))  # back after a clean restart
    row = applied(apply_heartbeat(row, hb(25, "online"), at(6, 25), SKEW))
    assert row.online_since == T0 + timedelta(seconds=20) and row.uptime_seconds == 10.0
    row = applied(apply_timeout(row, timeout(row, 40), at(7, 40)))
    assert row.uptime_seconds == 15.0  # the online period ends with the last heartbeat sent


def test_replayed_or_reordered_heartbeats_are_stale() -> None:
    old = hb(0)
    row = applied(apply_heartbeat(None, old, at(0, 0), SKEW))
    row = applied(apply_heartbeat(row, hb(5, wallet="w2"), at(1, 5), SKEW))
    # the old heartbeat published again (a new record): stale, whatever its log time
    out = apply_heartbeat(row, old, at(9, 6), SKEW)
    assert out.kind == "stale" and "not newer" in out.reason
    # same event time as the last accepted one is not newer either
    assert apply_heartbeat(row, hb(5, wallet="w3"), at(10, 7), SKEW).kind == "stale"
    assert row.wallet == "w2"


def test_redelivery_is_recognised_and_ignored_silently() -> None:
    first, second = hb(0), hb(5)
    row = applied(apply_heartbeat(None, first, at(0, 0), SKEW))
    row = applied(apply_heartbeat(row, second, at(1, 5), SKEW))
    assert apply_heartbeat(row, second, at(1, 5), SKEW).kind == "duplicate"  # same event id
    assert apply_heartbeat(row, first, at(0, 0), SKEW).kind == "duplicate"   # same or earlier log position
    assert apply_heartbeat(row, first, at(0, 0, partition=3), SKEW).kind == "stale"  # elsewhere: a copy


def test_clock_skew_against_log_time() -> None:
    future = apply_heartbeat(None, hb(120), at(0, 0), SKEW)
    assert future.kind == "rejected" and "ahead of" in future.reason
    late = apply_heartbeat(None, hb(0), at(0, 120), SKEW)
    assert late.kind == "rejected" and "behind" in late.reason
    assert apply_heartbeat(None, hb(59), at(0, 0), SKEW).kind == "applied"


def test_a_different_public_key_is_refused() -> None:
    row = applied(apply_heartbeat(None, hb(0), at(0, 0), SKEW))
    out = apply_heartbeat(row, hb(5, wallet="evil", public_key="another"), at(1, 5), SKEW)
    assert out.kind == "rejected" and "pinned" in out.reason


def test_time_out_applies_only_to_the_heartbeat_it_names() -> None:
    row = applied(apply_heartbeat(None, hb(0), at(0, 0), SKEW))
    decision = timeout(row, 30)
    row2 = applied(apply_heartbeat(row, hb(28), at(1, 28), SKEW))  # a heartbeat got in first
    assert apply_timeout(row2, decision, at(2, 30)).kind == "obsolete"
    out = apply_timeout(row, decision, at(1, 30))
    offline = applied(out)
    assert offline.state == "offline" and offline.last_heartbeat_id == row.last_heartbeat_id
    assert out.change and (out.change.from_state, out.change.to_state, out.change.reason, out.change.at) == (
        "online", "offline", "timeout", decision.occurred_at)
    assert apply_timeout(offline, timeout(row, 31), at(5, 31)).kind == "obsolete"   # offline already
    assert apply_timeout(offline, decision, at(1, 30)).kind == "duplicate"         # redelivered
    assert apply_timeout(None, decision, at(0, 30)).kind == "obsolete"


def test_a_replayed_heartbeat_does_not_bring_a_timed_out_node_back() -> None:
    old = hb(0)
    row = applied(apply_heartbeat(None, old, at(0, 0), SKEW))
    row = applied(apply_heartbeat(row, last := hb(5), at(1, 5), SKEW))
    row = applied(apply_timeout(row, timeout(row, 30), at(2, 30)))
    assert apply_heartbeat(row, old, at(3, 31), SKEW).kind == "stale"
    # the very last accepted heartbeat again: a duplicate by event id, ignored all the same
    assert apply_heartbeat(row, last, at(4, 32), SKEW).kind == "duplicate"
    assert applied(apply_heartbeat(row, hb(33), at(5, 33), SKEW)).state == "online"  # a fresh one does


def test_due_for_timeout() -> None:
    row = applied(apply_heartbeat(None, hb(0), at(0, 0), SKEW))
    assert not due_for_timeout(row, T0 + timedelta(seconds=5), timedelta(seconds=5))
    assert due_for_timeout(row, T0 + timedelta(seconds=5.1), timedelta(seconds=5))
    assert not due_for_timeout(dataclasses.replace(row, state="offline"), T0 + timedelta(days=1), timedelta(seconds=5))


# A node's stream: heartbeats with increasing times, replays of its first one, and time-outs, in log order.
events = st.lists(st.tuples(st.sampled_from(["hb", "replay", "timeout"]),
                            st.sampled_from(["joining", "online", "draining", "offline"]),
                            st.floats(0.5, 20)), min_size=1, max_size=25)


def apply(row, event, meta):
    if isinstance(event, NodeHeartbeat):
        return apply_heartbeat(row, event, meta, SKEW)
    return apply_timeout(row, event, meta)


def live(stream) -> tuple[list, NodeRow | None]:
    """The log as the live registry makes it: a time-out names the node's latest heartbeat when decided."""
    row, sent, clock, log = None, [], 0.0, []
    for kind, state, gap in stream:
        clock += gap
        if kind == "hb":
            event = hb(clock, state)
            sent.append(event)
        elif kind == "replay" and sent:
            event = sent[0]
        elif kind == "timeout" and row is not None and row.state != "offline":
            event = timeout(row, clock)
        else:
            continue
        meta = at(len(log), clock)
        log.append((event, meta))
        out = apply(row, event, meta)
        if out.kind == "applied":
            row = out.row
    return log, row


def replay(log, redeliver_from: int | None = None) -> tuple[NodeRow | None, list]:
    positions = list(range(len(log)))
    if redeliver_from is not None:  # a consumer crash: everything from there is delivered again
        positions += list(range(min(redeliver_from, len(log)), len(log)))
    row, history = None, []
    for i in positions:
        out = apply(row, *log[i])
        if out.kind == "applied":
            row = out.row
            if out.change:
                history.append(out.change)
    return row, history


def run(stream) -> tuple[NodeRow | None, list]:
    return replay(live(stream)[0])


@settings(max_examples=150, deadline=None)
@given(events, st.integers(0, 25))
def test_replaying_is_deterministic_and_redelivery_changes_nothing(stream, cut) -> None:
    log, live_row = live(stream)
    once = replay(log)
    assert once[0] == live_row  # rebuilt from the log = what the live registry holds
    assert replay(log) == once
    assert replay(log, redeliver_from=cut) == once
    row, history = once
    if row is not None:
        assert row.uptime_seconds >= 0
        assert history[-1].to_state == row.state
        assert all(a.to_state == b.from_state for a, b in zip(history, history[1:], strict=False))


def test_event_ids_are_unique_per_change() -> None:
    row, history = run([("hb", "joining", 1), ("hb", "online", 1), ("timeout", "online", 30), ("hb", "online", 1)])
    assert [h.to_state for h in history] == ["joining", "online", "offline", "online"]
    assert len({h.event_id for h in history}) == len(history)
    assert isinstance(history[0].event_id, uuid.UUID)
