"""The node registry on a real Petals swarm: the session swarm's nodes publish signed heartbeats to the real
broker; the registry group, the gateway's discovery API and the worker's route preference run here.

Order matters (one module fixture): the last tests kill a node and stop the registry.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from consumers.registry import consumer as registry
from consumers.registry.decisions import RegistryKey, TrustedKeys
from consumers.registry.rebuild import committed_offsets, rebuild
from consumers.registry.sweeper import Sweeper
from consumers.registry.repository import snapshot
from db.views.nodes import online_peers
from db.migrate import migrate
from farmesh.kafka import messaging
from consumers.inference.generation import load_client
from farmesh.swarm.identity import NodeIdentity, signing_bytes
from consumers.inference.routing import RoutePreference
from farmesh.runtime.settings import Settings
from farmesh.swarm.view import SwarmView
from producers.gateway.app import create_app
from schemas import topics
from schemas.events import DeadLetter, NodeTimedOut
from tests.conftest import create_database, drop_database
from tests.support.swarm import wallet_of
from tests.support.kafka import read_all, wait_caught_up
from tests.support.services import serve

if TYPE_CHECKING:
    from tests.support.swarm import Swarm

pytestmark = pytest.mark.e2e

TIMEOUT = 6.0  # the nodes beat every second


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what} (last: {result!r})")
        await asyncio.sleep(0.3)


@dataclass
class Mesh:
    swarm: Swarm
    bootstrap: str
    group: str
    pool: asyncpg.Pool
    http: httpx.AsyncClient
    broker: Any
    sweeper: asyncio.Task
    admin_url: str
    key: RegistryKey  # signs the registry's time-out decisions; only those it signed are applied
    stopped: bool = False

    async def swarm_health(self) -> dict[str, Any]:
        models = (await self.http.get("/api/swarm")).json()["models"]
        return next((m for m in models if m["model"] == self.swarm.dht_prefix), {})

    async def node(self, peer_id: str) -> dict[str, Any]:
        return (await self.http.get(f"/api/nodes/{peer_id}")).json()

    async def publish_raw(self, value: bytes, key: str) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(topics.HEARTBEATS.name, value, key=key.encode())
        finally:
            await producer.stop()

    async def letters(self) -> list[DeadLetter]:
        found = [DeadLetter.model_validate_json(v) for v in await read_all(self.bootstrap, topics.DEAD_LETTER.name)]
        return [d for d in found if d.consumer_group == self.group]

    async def heartbeats_of(self, peer_id: str) -> list[dict[str, Any]]:
        out = []
        for value in await read_until_now(self.bootstrap, topics.HEARTBEATS.name):
            payload = json.loads(value)
            if payload.get("type") == "node.heartbeat" and payload.get("peer_id") == peer_id:
                out.append(payload)
        return out

    async def stop_registry(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.sweeper.cancel()
            await asyncio.gather(self.sweeper, return_exceptions=True)
            await self.broker.stop()


@pytest.fixture(scope="module")
async def mesh(swarm: Swarm, kafka_bootstrap: str, postgres_admin_url: str,
               tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    key = RegistryKey.create(tmp_path_factory.mktemp("registry") / "registry.key")
    url = await create_database(postgres_admin_url)
    await migrate(url)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    group = f"registry-e2e-{uuid.uuid4().hex[:8]}"
    await messaging.ensure_topics(kafka_bootstrap, messaging.mesh_topics(3))
    broker = messaging.create_broker(kafka_bootstrap, topics.GROUP_REGISTRY, CollectorRegistry())
    bound = registry.register(broker, pool, CollectorRegistry(), key=key, group_id=group)
    await broker.start()
    sweeper = asyncio.create_task(Sweeper(bound.decisions, bound.store, TIMEOUT, period=0.5, metrics=bound.metrics,
                                          key=key).run())
    view = await asyncio.to_thread(SwarmView, swarm.initial_peers, swarm.dht_prefix, 4, 0.5)
    settings = Settings(kafka_bootstrap=kafka_bootstrap, database_url=url, model=str(swarm.model_dir),
                        initial_peers=swarm.initial_peers, dht_prefix=swarm.dht_prefix)
    app = create_app(settings, route_check=lambda: asyncio.to_thread(view.full_route),
                     live_coverage=lambda: asyncio.to_thread(view.coverage))
    mesh = None
    try:
        async with serve(app) as http_url, httpx.AsyncClient(base_url=http_url, timeout=60) as http:
            mesh = Mesh(swarm, kafka_bootstrap, group, pool, http, broker, sweeper, postgres_admin_url, key)
            yield mesh
    finally:
        if mesh is not None:
            await mesh.stop_registry()
        else:
            sweeper.cancel()
            await broker.stop()
        view.shutdown()
        await pool.close()
        await drop_database(postgres_admin_url, url)


async def test_both_nodes_appear_online_with_their_blocks(mesh: Mesh) -> None:
    swarm = mesh.swarm

    async def online() -> dict[str, Any] | None:
        r = await mesh.http.get("/api/nodes", params={"model": swarm.dht_prefix, "state": "online"})
        nodes = {n["peer_id"]: n for n in r.json()["nodes"]}
        return nodes if set(nodes) == set(swarm.node_peer_ids) else None

    nodes = await eventually(online, "the swarm's two nodes online in the registry")
    for blocks, process in swarm.nodes.items():
        node = nodes[process.peer_id]
        assert f"{node['start_block']}:{node['end_block']}" == blocks
        assert node["wallet"] == wallet_of(blocks) and node["total_blocks"] == 4
        assert node["device"]["kind"] == "cpu" and "petals/2.2.0" in node["version"]
        assert node["heartbeat_interval"] == 1.0
    health = await eventually(lambda: _when(mesh.swarm_health(), lambda h: h.get("full_coverage")), "full coverage")
    assert health["gaps"] == [] and health["online_nodes"] == 2
    assert [b["online_nodes"] for b in health["blocks"]] == [1, 1, 1, 1]
    # the live DHT agrees, and every server it finds is registered
    assert "dht" in health and health["dht"].get("unregistered_peers") == [], health.get("dht")
    assert {p for b in health["dht"]["blocks"] for p in b["online_peers"]} == set(swarm.node_peer_ids)


async def test_worker_routes_through_registered_nodes_only(mesh: Mesh) -> None:
    swarm = mesh.swarm
    registered = await online_peers(mesh.pool, swarm.dht_prefix)
    assert registered == set(swarm.node_peer_ids)
    # A server for every block that never sends a heartbeat (no wallet): it would be a one-hop route.
    stranger = await asyncio.to_thread(swarm.start_node, "0:4", heartbeats=False)
    client = await asyncio.to_thread(load_client, swarm.model_dir, swarm.initial_peers, swarm.dht_prefix,
                                     request_timeout=10, max_retries=2)
    try:
        preference = RoutePreference(client.model.transformer.h.sequence_manager)
        await eventually(lambda: asyncio.to_thread(
            lambda: all(stranger.peer_id in b for b in preference.block_servers())), "the stranger in the DHT")
        avoided = await asyncio.to_thread(preference.apply, registered)
        assert avoided == {stranger.peer_id}

        for _ in range(3):  # routes are chosen afresh per session
            result = await asyncio.to_thread(client.generate_stream, "Hello mesh", 5, lambda *_: None)
            assert {s.peer_id for s in result.spans} == registered
            assert sorted((s.start_block, s.end_block) for s in result.spans) == [(0, 2), (2, 4)]

        health = await eventually(lambda: _when(mesh.swarm_health(), lambda h: h.get("dht", {}).get(
            "unregistered_peers")), "the stranger shown as unregistered")
        assert health["dht"]["unregistered_peers"] == [stranger.peer_id]
        assert (await mesh.http.get(f"/api/nodes/{stranger.peer_id}")).status_code == 404
    finally:
        await asyncio.to_thread(client.close)
        await asyncio.to_thread(stranger.stop)


async def test_a_forged_heartbeat_does_not_change_the_wallet(mesh: Mesh, tmp_path: Path) -> None:
    victim = mesh.swarm.nodes["0:2"].peer_id
    genuine = (await mesh.heartbeats_of(victim))[-1]
    attacker = NodeIdentity.generate(tmp_path / "attacker.identity")
    own = {**genuine, "wallet": "attacker-wallet", "event_id": str(uuid.uuid4()), "public_key": attacker.public_key_b64}
    own["signature"] = base64.b64encode(attacker.sign(signing_bytes(own))).decode()
    borrowed = {**genuine, "wallet": "attacker-wallet", "event_id": str(uuid.uuid4())}
    borrowed["signature"] = base64.b64encode(attacker.sign(signing_bytes(borrowed))).decode()
    for payload in (own, borrowed):
        await mesh.publish_raw(json.dumps(payload).encode(), victim)
    # and a time-out decision nobody signed, naming the node's latest heartbeat as the registry's would
    latest = (await mesh.heartbeats_of(victim))[-1]
    timed_out = NodeTimedOut(peer_id=victim, last_heartbeat_id=latest["event_id"], last_seen=latest["occurred_at"],
                             timeout_seconds=TIMEOUT, source="attacker")
    await mesh.publish_raw(timed_out.model_dump_json().encode(), victim)

    letters = await eventually(lambda: _when(mesh.letters(), lambda ls: len(
        [d for d in ls if d.key == victim and "attacker-wallet" in d.payload]) >= 2), "both forgeries dead-lettered")
    reasons = [d.reason for d in letters if d.key == victim and "attacker-wallet" in d.payload]
    assert any("belongs to peer" in r for r in reasons) and any("bad signature" in r for r in reasons)
    def forged_timeout(letters: list[DeadLetter]) -> list[DeadLetter]:
        return [d for d in letters if d.key == victim and str(timed_out.event_id) in d.payload]

    letters = await eventually(lambda: _when(mesh.letters(), forged_timeout), "the forged time-out dead-lettered")
    assert "unsigned time-out decision" in forged_timeout(letters)[0].reason
    await wait_caught_up(mesh.bootstrap, mesh.group, topics.HEARTBEATS.name, timeout=30)
    node = await mesh.node(victim)
    assert node["wallet"] == wallet_of("0:2") and node["state"] == "online"
    assert all(h["reason"] == "heartbeat" for h in node["state_history"])  # the forged time-out took nothing offline


async def test_a_killed_node_goes_offline_and_leaves_a_gap_and_a_replay_does_not_revive_it(mesh: Mesh) -> None:
    swarm = mesh.swarm
    process = swarm.nodes["2:4"]
    peer = process.peer_id
    os.killpg(process.pid, signal.SIGKILL)  # a crash: no offline heartbeat
    killed_at = time.monotonic()
    try:
        health = await eventually(lambda: _when(mesh.swarm_health(), lambda h: h.get("gaps") == [2, 3]),
                                  "a gap at blocks 2-3", timeout=TIMEOUT + 30)
        print(f"\ngap shown {time.monotonic() - killed_at:.1f} s after the kill (timeout {TIMEOUT} s)")
        assert health["online_nodes"] == 1 and not health["full_coverage"]
        node = await mesh.node(peer)
        assert node["state"] == "offline" and node["state_history"][-1]["reason"] == "timeout"

        # an old heartbeat of the dead node, published again
        old = next(h for h in await mesh.heartbeats_of(peer) if h["state"] == "online")
        await mesh.publish_raw(json.dumps(old).encode(), peer)
        await eventually(lambda: _when(mesh.letters(), lambda ls: any(
            d.key == peer and "stale" in d.reason for d in ls)), "the replay dead-lettered as stale")
        await wait_caught_up(mesh.bootstrap, mesh.group, topics.HEARTBEATS.name, timeout=30)
        assert (await mesh.node(peer))["state"] == "offline"
        assert (await mesh.swarm_health())["gaps"] == [2, 3]
    finally:
        await asyncio.to_thread(process.stop)


async def test_the_registry_rebuilt_from_the_topic_equals_the_live_one(mesh: Mesh) -> None:
    await mesh.stop_registry()  # its offsets are committed; the remaining node keeps beating meanwhile
    until = await committed_offsets(mesh.bootstrap, mesh.group)
    live = await snapshot(mesh.pool)
    url = await create_database(mesh.admin_url)
    try:
        await migrate(url)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:
            counts = await rebuild(mesh.bootstrap, pool, until=until, trusted=TrustedKeys.of([mesh.key.public_key]))
            rebuilt = await snapshot(pool)
        finally:
            await pool.close()
    finally:
        await drop_database(mesh.admin_url, url)
    print(f"\nrebuilt from {counts['read']} records ({counts['refused']} refused): "
          f"{len(live[0])} nodes, {len(live[1])} state changes")
    assert counts["refused"] >= 3  # the forgeries and the replay
    assert rebuilt == live
    assert {n["peer_id"] for n in live[0]} >= set(mesh.swarm.node_peer_ids)


async def read_until_now(bootstrap: str, topic: str) -> list[bytes]:
    """Every record of `topic` up to its end right now (nodes keep appending while we read)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from farmesh.kafka.log_reader import topic_partitions

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in (await topic_partitions(bootstrap, [topic]))[topic]]
        ends = await consumer.end_offsets(parts)
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        out: list[bytes] = []
        pending = {tp for tp in parts if ends[tp] > 0}
        while pending:
            for tp, records in (await consumer.getmany(*pending, timeout_ms=1000)).items():
                out += [r.value for r in records if r.offset < ends[tp]]
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        return out
    finally:
        await consumer.stop()


async def _when(value: Awaitable[Any], predicate: Callable[[Any], Any]) -> Any:
    result = await value
    return result if result and predicate(result) else None
