"""The registry's handler on FastStream's in-memory broker, with an in-memory fake of its store port.

What it emits is read off its router's declared publishers (their mocks): dead letters, and the sweep's time-out
decisions, which the handler applies when they come back on the heartbeat topic like any event -- only those the
registry signed: forged ones (unsigned, another key, tampered) are dead-lettered and change nothing.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from faststream.kafka import KafkaBroker, TestKafkaBroker
from prometheus_client import CollectorRegistry

from consumers.registry import consumer as registry
from consumers.registry.decisions import RegistryKey
from consumers.registry.rules import LIVE_STATES, NodeRow, StateChange
from consumers.registry.sweeper import Sweeper
from farmesh.kafka import messaging
from farmesh.swarm.identity import NodeIdentity, sign_heartbeat
from schemas import topics
from schemas.events import DeadLetter, DeviceInfo, NodeHeartbeat, NodeTimedOut

TOPIC = topics.HEARTBEATS.name


@dataclass
class MemoryNodes:
    """An in-memory `NodeStore`: what a transaction saved is kept only when it ends without an error."""

    rows: dict[str, NodeRow] = field(default_factory=dict)
    changes: list[StateChange] = field(default_factory=list)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Transaction]:
        tx = _Transaction(self)
        yield tx
        self.rows.update(tx.rows)
        known = {c.event_id for c in self.changes}
        self.changes.extend(c for c in tx.changes if c.event_id not in known)

    async def due_for_timeout(self, seen_before: datetime) -> list[dict[str, Any]]:
        return [{"peer_id": r.peer_id, "last_heartbeat_id": r.last_heartbeat_id, "last_seen": r.last_seen}
                for r in sorted(self.rows.values(), key=lambda r: r.peer_id)
                if r.state in LIVE_STATES and r.last_seen < seen_before]

    async def count_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows.values():
            counts[row.state] = counts.get(row.state, 0) + 1
        return counts


@dataclass
class _Transaction:
    store: MemoryNodes
    rows: dict[str, NodeRow] = field(default_factory=dict)
    changes: list[StateChange] = field(default_factory=list)

    async def lock(self, peer_ids: Iterable[str]) -> dict[str, NodeRow]:
        return {p: self.store.rows[p] for p in peer_ids if p in self.store.rows}

    async def save(self, rows: Sequence[NodeRow], changes: Sequence[StateChange]) -> None:
        self.rows.update((r.peer_id, r) for r in rows)
        self.changes.extend(changes)


@pytest.fixture(scope="module")
def registry_key(tmp_path_factory: pytest.TempPathFactory) -> RegistryKey:
    return RegistryKey.create(Path(tmp_path_factory.mktemp("registry")) / "registry.key")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> NodeIdentity:
    return NodeIdentity.generate(Path(tmp_path_factory.mktemp("id")) / "node.identity")


def signed(node: NodeIdentity, **changes) -> NodeHeartbeat:
    fields = dict(peer_id=node.peer_id, wallet="w", model="tiny", start_block=0, end_block=2, total_blocks=4,
                  throughput=1.0, state="online", version="v", device=DeviceInfo(kind="cpu"), interval_seconds=1.0)
    return sign_heartbeat(node, NodeHeartbeat(**{**fields, **changes}))


def build(key: RegistryKey) -> tuple[KafkaBroker, MemoryNodes, registry.Registry, registry.RegistryRouter]:
    broker = messaging.create_broker("127.0.0.1:1", topics.GROUP_REGISTRY, CollectorRegistry())
    store = MemoryNodes()
    bound = registry.bind(broker, store, CollectorRegistry(), key=key)
    group = next(r for r in broker.routers if isinstance(r, registry.RegistryRouter))
    return broker, store, bound, group


async def publish(br: KafkaBroker, value: bytes, key: str, partition: int = 0) -> None:
    """A record as a node's producer sends it: the event's JSON, keyed by the peer id."""
    await br.publish(value, TOPIC, key=key.encode(), partition=partition)


async def test_a_signed_heartbeat_is_applied(node: NodeIdentity, registry_key: RegistryKey) -> None:
    broker, store, _, group = build(registry_key)
    beat = signed(node)
    async with TestKafkaBroker(broker) as br:
        await publish(br, beat.model_dump_json().encode(), node.peer_id)
        assert not group.dead_letters.mock.called
    row = store.rows[node.peer_id]
    assert row.state == "online" and row.wallet == "w" and row.last_heartbeat_id == beat.event_id
    assert [(c.peer_id, c.from_state, c.to_state, c.reason) for c in store.changes] == [
        (node.peer_id, None, "online", "heartbeat")]


def unsigned(node: NodeIdentity) -> bytes:
    return signed(node).model_copy(update={"signature": None}).model_dump_json().encode()


def tampered(node: NodeIdentity) -> bytes:
    payload = json.loads(signed(node).model_dump_json())
    payload["wallet"] = "attacker"  # signed by the node, then changed: the signature no longer covers it
    return json.dumps(payload).encode()


def forged(node: NodeIdentity, tmp_path: Path) -> bytes:
    attacker = NodeIdentity.generate(tmp_path / "attacker.identity")
    return signed(attacker).model_copy(update={"peer_id": node.peer_id}).model_dump_json().encode()


@pytest.mark.parametrize("make, reason", [
    (lambda node, tmp: unsigned(node), "signature: unsigned"),
    (lambda node, tmp: tampered(node), "bad signature"),
    (lambda node, tmp: forged(node, tmp), "belongs to peer"),
], ids=["unsigned", "tampered", "forged"])
async def test_an_unsigned_or_forged_heartbeat_is_dead_lettered_with_the_reason(node, registry_key, tmp_path, make,
                                                                               reason) -> None:
    broker, store, _, group = build(registry_key)
    value = make(node, tmp_path)
    async with TestKafkaBroker(broker) as br:
        await publish(br, value, node.peer_id)
        letters = [DeadLetter.model_validate(c.args[0]) for c in group.dead_letters.mock.call_args_list]
        await group.dead_letters.assert_called_once_with(key=node.peer_id.encode())
    assert len(letters) == 1 and reason in letters[0].reason
    assert letters[0].consumer_group == topics.GROUP_REGISTRY and letters[0].original_topic == TOPIC
    assert letters[0].payload == value.decode()
    assert store.rows == {} and store.changes == []  # it changed nothing


async def test_the_sweeps_time_out_decision_is_applied(node: NodeIdentity, registry_key: RegistryKey) -> None:
    broker, store, bound, group = build(registry_key)
    beat = signed(node)
    sweeper = Sweeper(bound.decisions, store, timeout=20.0, metrics=bound.metrics, key=bound.key)
    async with TestKafkaBroker(broker) as br:
        # The in-memory broker gives every record offset 0: the heartbeat goes to another partition than the
        # decision (0), or the decision would be taken for a redelivery of a record already applied.
        await publish(br, beat.model_dump_json().encode(), node.peer_id, partition=1)
        later = store.rows[node.peer_id].last_seen + timedelta(seconds=21)
        published = await sweeper.sweep_once(now=later)
        # The publisher's topic is the group's own: its mock sees every batch there, the heartbeat's too.
        decisions = [NodeTimedOut.model_validate(body) for c in group.decisions.mock.call_args_list
                     for body in c.args[0] if body["type"] == "node.timed_out"]
        assert not group.dead_letters.mock.called
    assert decisions == published and len(published) == 1
    assert published[0].peer_id == node.peer_id and published[0].last_heartbeat_id == beat.event_id
    assert published[0].key_id == registry_key.key_id and published[0].signature  # signed by the registry
    assert store.rows[node.peer_id].state == "offline"
    assert [(c.from_state, c.to_state, c.reason) for c in store.changes] == [
        (None, "online", "heartbeat"), ("online", "offline", "timeout")]
    assert await sweeper.sweep_once(now=later) == []  # offline: nothing more to decide


def forged_decisions(node: NodeIdentity, beat: NodeHeartbeat, key: RegistryKey, tmp_path: Path) -> dict[str, bytes]:
    """Time-out decisions an attacker who can produce to the heartbeat topic could write, each naming the node's
    latest heartbeat (exactly what a genuine decision would name)."""
    decision = NodeTimedOut(peer_id=node.peer_id, last_heartbeat_id=beat.event_id,
                            last_seen=beat.occurred_at, timeout_seconds=20.0)
    other = RegistryKey.create(tmp_path / "attacker.key")
    claimed = json.loads(other.sign(decision).model_dump_json())
    claimed["key_id"] = key.key_id  # names the registry's key, signed with the attacker's
    # A genuine decision about an earlier heartbeat (obsolete now), re-pointed at the node's latest one.
    earlier = decision.model_copy(update={"last_heartbeat_id": UUID("00000000-0000-4000-8000-00000000abcd")})
    tampered = json.loads(key.sign(earlier).model_dump_json())
    tampered["last_heartbeat_id"] = str(beat.event_id)
    return {
        "unsigned": decision.model_dump_json().encode(),
        "another key": other.sign(decision).model_dump_json().encode(),
        "claims the registry's key": json.dumps(claimed).encode(),
        "tampered": json.dumps(tampered).encode(),
    }


REASONS = {"unsigned": "signature: unsigned time-out decision", "another key": "not one of the registry's keys",
           "claims the registry's key": "bad signature", "tampered": "bad signature"}


@pytest.mark.parametrize("kind", list(REASONS))
async def test_a_forged_time_out_is_dead_lettered_and_the_node_stays_online(node: NodeIdentity,
                                                                            registry_key: RegistryKey,
                                                                            tmp_path: Path, kind: str) -> None:
    broker, store, _, group = build(registry_key)
    beat = signed(node)
    async with TestKafkaBroker(broker) as br:
        await publish(br, beat.model_dump_json().encode(), node.peer_id, partition=1)
        before = store.rows[node.peer_id]
        value = forged_decisions(node, beat, registry_key, tmp_path)[kind]
        await publish(br, value, node.peer_id)  # partition 0: not taken for a redelivery (see above)
        letters = [DeadLetter.model_validate(c.args[0]) for c in group.dead_letters.mock.call_args_list]
        await group.dead_letters.assert_called_once_with(key=node.peer_id.encode())
    assert len(letters) == 1 and REASONS[kind] in letters[0].reason, letters
    assert letters[0].payload == value.decode() and letters[0].consumer_group == topics.GROUP_REGISTRY
    assert store.rows[node.peer_id] == before and before.state == "online"  # it changed nothing
    assert [(c.from_state, c.to_state) for c in store.changes] == [(None, "online")]


async def test_a_genuine_decision_produced_onto_the_topic_applies(node: NodeIdentity, registry_key: RegistryKey) -> None:
    broker, store, _, group = build(registry_key)
    beat = signed(node)
    decision = registry_key.sign(NodeTimedOut(peer_id=node.peer_id, last_heartbeat_id=beat.event_id,
                                              last_seen=beat.occurred_at, timeout_seconds=20.0))
    async with TestKafkaBroker(broker) as br:
        await publish(br, beat.model_dump_json().encode(), node.peer_id, partition=1)
        await publish(br, decision.model_dump_json().encode(), node.peer_id)
        assert not group.dead_letters.mock.called
    assert store.rows[node.peer_id].state == "offline"
    assert [(c.from_state, c.to_state, c.reason, c.event_id) for c in store.changes][-1] == (
        "online", "offline", "timeout", decision.event_id)


async def test_a_registry_with_pinned_keys_applies_a_decision_of_its_previous_key(node: NodeIdentity,
                                                                                  registry_key: RegistryKey,
                                                                                  tmp_path: Path) -> None:
    from consumers.registry.decisions import TrustedKeys

    new = RegistryKey.create(tmp_path / "rotated.key")
    broker = messaging.create_broker("127.0.0.1:1", topics.GROUP_REGISTRY, CollectorRegistry())
    store = MemoryNodes()
    registry.bind(broker, store, CollectorRegistry(), key=new,
                  trusted=TrustedKeys.of([new.public_key, registry_key.public_key]))
    beat = signed(node)
    old = registry_key.sign(NodeTimedOut(peer_id=node.peer_id, last_heartbeat_id=beat.event_id,
                                         last_seen=beat.occurred_at, timeout_seconds=20.0))
    async with TestKafkaBroker(broker) as br:
        await publish(br, beat.model_dump_json().encode(), node.peer_id, partition=1)
        await publish(br, old.model_dump_json().encode(), node.peer_id)
    assert store.rows[node.peer_id].state == "offline"
