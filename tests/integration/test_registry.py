"""The registry consumer group on the real broker and PostgreSQL, fed by the nodes' own heartbeat publisher.

Each test gets its own heartbeat topic, database, consumer group and registry key (so nothing else on the shared
broker interferes) and ends by rebuilding the registry from its topic into a fresh database: it must equal the live
one. Time-out decisions count only when the registry signed them: a forged one is dead-lettered, live and rebuilt.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

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
from db.migrate import migrate
from farmesh.kafka import messaging
from farmesh.swarm.identity import NodeIdentity, signing_bytes
from producers.node.heartbeat import HeartbeatPublisher, NodeDescription
from farmesh.runtime.settings import Settings
from producers.gateway.app import create_app
from schemas import topics
from schemas.events import DeadLetter, DeviceInfo, NodeTimedOut
from tests.conftest import create_database, drop_database
from tests.support.kafka import read_all, wait_caught_up
from tests.support.services import serve

pytestmark = pytest.mark.integration

TIMEOUT = 2.0   # seconds without a heartbeat before the sweep declares a node offline
INTERVAL = 0.5  # seconds between heartbeats of a running node


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 30.0) -> Any:
    """A bounded wait: the first truthy result of `check`."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what} (last: {result!r})")
        await asyncio.sleep(0.2)


@dataclass
class Node:
    publisher: HeartbeatPublisher
    running: asyncio.Task | None = None
    sent: list[bytes] = field(default_factory=list)

    @property
    def peer_id(self) -> str:
        return self.publisher.identity.peer_id

    async def beat(self, state: str = "online") -> None:
        event = self.publisher.heartbeat(state)  # what the publisher sends, kept for replays
        assert await asyncio.to_thread(self.publisher.beat, state)
        self.sent.append(event.model_dump_json().encode())

    def start(self) -> None:
        async def loop() -> None:
            while True:
                await self.beat("online")
                await asyncio.sleep(INTERVAL)
        self.running = asyncio.create_task(loop())

    async def kill(self) -> None:
        """Stop sending, like a node that died (no offline heartbeat)."""
        if self.running is not None:
            self.running.cancel()
            await asyncio.gather(self.running, return_exceptions=True)


@dataclass
class Env:
    bootstrap: str
    topic: str
    group: str
    model: str
    pool: asyncpg.Pool
    http: httpx.AsyncClient
    sweeper: asyncio.Task
    tmp: Path
    admin_url: str
    bound: registry.Registry  # the group as bound to the broker: its store, publisher and key
    nodes: list[Node] = field(default_factory=list)

    @property
    def key(self) -> RegistryKey:
        """The registry's key: signs the sweep's decisions."""
        return self.bound.key

    async def pause_sweep(self) -> None:
        self.sweeper.cancel()
        await asyncio.gather(self.sweeper, return_exceptions=True)

    def resume_sweep(self) -> None:
        self.sweeper = asyncio.create_task(Sweeper(self.bound.decisions, self.bound.store, TIMEOUT, period=0.2,
                                                   metrics=self.bound.metrics, key=self.key).run())

    def node(self, name: str, start: int, end: int, wallet: str) -> Node:
        identity = NodeIdentity.generate(self.tmp / f"{name}.identity")
        description = NodeDescription(wallet, self.model, start, end, 4, 10.0 + start, "farmesh/test",
                                      DeviceInfo(kind="cpu", name="test"), INTERVAL)
        node = Node(HeartbeatPublisher(self.bootstrap, identity, description, topic=self.topic))
        self.nodes.append(node)
        return node

    async def publish_raw(self, value: bytes, key: str) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(self.topic, value, key=key.encode())
        finally:
            await producer.stop()

    async def row(self, peer_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow("SELECT * FROM far_nodes WHERE peer_id = $1", peer_id)

    async def letters(self) -> list[DeadLetter]:
        found = [DeadLetter.model_validate_json(v) for v in await read_all(self.bootstrap, topics.DEAD_LETTER.name)]
        return [d for d in found if d.original_topic == self.topic]

    async def caught_up(self) -> None:
        await wait_caught_up(self.bootstrap, self.group, self.topic, timeout=30)

    async def assert_rebuild_equals_live(self) -> None:
        """Stop deciding, let the live group finish, replay the topic into a new database: the same registry."""
        self.sweeper.cancel()
        await asyncio.gather(self.sweeper, return_exceptions=True)
        for node in self.nodes:
            await node.kill()
        await self.caught_up()
        until = await committed_offsets(self.bootstrap, self.group, self.topic)
        url = await create_database(self.admin_url)
        try:
            await migrate(url)
            pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
            try:
                # verified with the public key alone, as a rebuild elsewhere would (FARMESH_REGISTRY_PUBLIC_KEYS)
                trusted = TrustedKeys.parse([self.key.public_key_text])
                counts = await rebuild(self.bootstrap, pool, topic=self.topic, until=until, trusted=trusted)
                rebuilt = await snapshot(pool)
            finally:
                await pool.close()
        finally:
            await drop_database(self.admin_url, url)
        live = await snapshot(self.pool)
        assert counts["read"] == sum(until.values()) > 0
        assert rebuilt == live
        assert live[0] and live[1]


@pytest.fixture
async def env(kafka_bootstrap: str, empty_database_url: str, postgres_admin_url: str,
              tmp_path: Path, tiny_model_dir: Path) -> AsyncIterator[Env]:
    run = uuid.uuid4().hex[:8]
    topic, group, model = f"farmesh.test.heartbeats.{run}", f"registry-test-{run}", f"model-{run}"
    await messaging.ensure_topics(kafka_bootstrap, [(topic, 3), *messaging.mesh_topics(3)])
    await migrate(empty_database_url)
    pool = await asyncpg.create_pool(empty_database_url, min_size=1, max_size=4)
    key = RegistryKey.create(tmp_path / "registry.key")
    broker = messaging.create_broker(kafka_bootstrap, topics.GROUP_REGISTRY, CollectorRegistry())
    bound = registry.register(broker, pool, CollectorRegistry(), key=key, group_id=group, topic=topic)
    await broker.start()
    sweeper = asyncio.create_task(
        Sweeper(bound.decisions, bound.store, TIMEOUT, period=0.2, metrics=bound.metrics, key=key).run())
    settings = Settings(kafka_bootstrap=kafka_bootstrap, database_url=empty_database_url, dht_prefix=model,
                        model=str(tiny_model_dir))

    async def route_check() -> bool:
        return True

    env: Env | None = None
    try:
        async with serve(create_app(settings, route_check)) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
            env = Env(kafka_bootstrap, topic, group, model, pool, http, sweeper, tmp_path, postgres_admin_url, bound)
            yield env
    finally:
        sweeper.cancel()
        if env is not None:
            env.sweeper.cancel()  # a test may have replaced it (resume_sweep)
        for node in env.nodes if env else []:
            await node.kill()
            await asyncio.to_thread(node.publisher.close)
        await broker.stop()
        await pool.close()


async def swarm_of(env: Env) -> dict[str, Any]:
    models = (await env.http.get("/api/swarm")).json()["models"]
    return next((m for m in models if m["model"] == env.model), {})


async def test_two_nodes_online_full_coverage_then_a_gap_after_the_timeout(env: Env) -> None:
    a, b = env.node("a", 0, 2, "wallet-a"), env.node("b", 2, 4, "wallet-b")
    for node in (a, b):
        await node.beat("joining")
    a.start()
    b.start()

    async def both_online() -> bool:
        r = await env.http.get("/api/nodes", params={"model": env.model, "state": "online"})
        return r.json()["count"] == 2

    await eventually(both_online, "two nodes online")
    nodes = {n["peer_id"]: n for n in (await env.http.get("/api/nodes", params={"model": env.model})).json()["nodes"]}
    assert {(p, n["start_block"], n["end_block"], n["wallet"], n["state"]) for p, n in nodes.items()} == {
        (a.peer_id, 0, 2, "wallet-a", "online"), (b.peer_id, 2, 4, "wallet-b", "online")}
    assert nodes[a.peer_id]["device"] == {"kind": "cpu", "name": "test", "memory_bytes": 0}
    assert nodes[a.peer_id]["heartbeat_interval"] == INTERVAL and nodes[a.peer_id]["throughput"] == 10.0

    health = await swarm_of(env)
    assert (health["full_coverage"], health["gaps"], health["online_nodes"], health["total_blocks"]) == (True, [], 2, 4)
    assert [blk["online_nodes"] for blk in health["blocks"]] == [1, 1, 1, 1]
    assert [blk["throughput"] for blk in health["blocks"]] == [10.0, 10.0, 12.0, 12.0]
    assert (await env.http.get("/api/nodes", params={"state": "bogus"})).status_code == 422

    await asyncio.sleep(INTERVAL * 3)  # a few online heartbeats: uptime to account
    await b.kill()  # no offline heartbeat: only the timeout can tell

    async def gap() -> dict[str, Any] | None:
        h = await swarm_of(env)
        return h if h.get("gaps") == [2, 3] else None

    started = time.monotonic()
    health = await eventually(gap, "a gap where b served", timeout=TIMEOUT + 20)
    print(f"\ngap shown {time.monotonic() - started:.1f} s after b stopped (timeout {TIMEOUT} s)")
    assert health["gap_ranges"] == [[2, 4]] and health["online_nodes"] == 1 and not health["full_coverage"]
    detail = (await env.http.get(f"/api/nodes/{b.peer_id}")).json()
    assert detail["state"] == "offline"
    assert [(c["from_state"], c["to_state"], c["reason"]) for c in detail["state_history"]] == [
        (None, "joining", "heartbeat"), ("joining", "online", "heartbeat"), ("online", "offline", "timeout")]
    assert detail["uptime_seconds"] > 0 and detail["current_uptime_seconds"] == 0
    await env.assert_rebuild_equals_live()


async def test_work_and_earnings_per_node_and_unregistered_work_is_flagged(env: Env) -> None:
    a = env.node("a", 0, 2, "wallet-a")
    await a.beat("online")
    await eventually(lambda: env.row(a.peer_id), "a registered")
    unregistered = "QmUnregisteredPeerThatNeverSentAValidHeartbeat1"
    request_id = f"r-{uuid.uuid4().hex[:8]}"
    await env.pool.execute(
        """INSERT INTO far_mesh_sessions (request_id, event_id, model, status, prompt_tokens, completion_tokens,
               completion, price_per_token, cost, started_at, finished_at, worker)
           VALUES ($1, gen_random_uuid(), $2, 'completed', 5, 3, 'abc', 0.0001, 0.0003, now(), now(), 'w')""",
        request_id, env.model)
    # the ledger's insert: the wallet is the one the registry knows for the peer (none: NULL)
    await env.pool.execute(
        """INSERT INTO far_session_contributions (event_id, request_id, model, peer_id, wallet, start_block,
               end_block, tokens_processed, earnings, occurred_at)
           SELECT gen_random_uuid(), $1, $2, c.peer_id, n.wallet, c.start_block, c.end_block, 7, c.earnings, now()
           FROM (VALUES ($3, 0, 2, 0.000150000000000001::numeric), ($4, 2, 4, 0.000149999999999999::numeric))
                AS c(peer_id, start_block, end_block, earnings)
           LEFT JOIN far_nodes n ON n.peer_id = c.peer_id""",
        request_id, env.model, a.peer_id, unregistered)
    rows = {r["peer_id"]: r for r in await env.pool.fetch(
        "SELECT peer_id, wallet, unregistered FROM far_session_contributions WHERE request_id = $1", request_id)}
    assert (rows[a.peer_id]["wallet"], rows[a.peer_id]["unregistered"]) == ("wallet-a", False)
    assert (rows[unregistered]["wallet"], rows[unregistered]["unregistered"]) == (None, True)

    detail = (await env.http.get(f"/api/nodes/{a.peer_id}")).json()
    assert (detail["tokens_served"], detail["sessions"], detail["earnings"]) == (7, 1, "0.000150000000000001")
    assert Decimal(detail["earnings"]) == Decimal("0.000150000000000001")  # exact, as a string
    assert detail["unregistered_earnings"] == "0"
    missing = await env.http.get(f"/api/nodes/{unregistered}")
    assert missing.status_code == 404
    assert missing.json()["unregistered_work"] == {"contributions": 1, "tokens_served": 7,
                                                   "earnings": "0.000149999999999999"}
    assert (await env.http.get("/api/nodes/QmNobody")).status_code == 404


async def test_forged_unsigned_and_malformed_heartbeats_change_nothing(env: Env) -> None:
    a = env.node("a", 0, 2, "wallet-a")
    await a.beat("online")
    await eventually(lambda: env.row(a.peer_id), "a registered")
    before = dict(await env.row(a.peer_id))

    attacker = NodeIdentity.generate(env.tmp / "attacker.identity")
    claim = a.publisher.heartbeat("online").model_copy(update={"wallet": "attacker-wallet", "signature": None})
    # 1. same peer id, new wallet, signed with the attacker's key (and its public key)
    own = json.loads(claim.model_copy(update={"public_key": attacker.public_key_b64}).model_dump_json())
    own["signature"] = _b64(attacker.sign(signing_bytes(own)))
    # 2. the node's public key, the attacker's signature
    borrowed = json.loads(claim.model_dump_json())
    borrowed["signature"] = _b64(attacker.sign(signing_bytes(borrowed)))
    # 3. a genuine heartbeat whose wallet was changed in flight
    edited = json.loads(a.publisher.heartbeat("online").model_dump_json())
    edited["wallet"] = "attacker-wallet"
    # 4. unsigned, 5. not JSON, 6. keyed under another peer
    unsigned = json.loads(claim.model_copy(update={"public_key": None}).model_dump_json())
    forged = [(own, a.peer_id), (borrowed, a.peer_id), (edited, a.peer_id), (unsigned, a.peer_id)]
    for payload, key in forged:
        await env.publish_raw(json.dumps(payload).encode(), key)
    await env.publish_raw(b"{not json", a.peer_id)
    genuine = json.loads(a.publisher.heartbeat("online").model_dump_json())
    await env.publish_raw(json.dumps(genuine).encode(), "QmSomeoneElse")

    await env.caught_up()
    after = dict(await env.row(a.peer_id))
    assert after == before  # wallet, state, last heartbeat: untouched
    letters = await eventually(lambda: _when(env.letters(), lambda ls: len(ls) >= 6), "six dead letters")
    reasons = [d.reason for d in letters]
    for fragment in ("belongs to peer", "bad signature", "bad signature", "unsigned", "not JSON", "record key"):
        assert any(fragment in r for r in reasons), (fragment, reasons)
        reasons.remove(next(r for r in reasons if fragment in r))
    assert all(d.consumer_group == env.group and d.key in (a.peer_id, "QmSomeoneElse") for d in letters)
    # the node's next real heartbeat still counts
    await a.beat("draining")
    await eventually(lambda: _when(env.row(a.peer_id), lambda r: r["state"] == "draining"), "a draining")
    assert (await env.row(a.peer_id))["wallet"] == "wallet-a"
    await env.assert_rebuild_equals_live()


async def test_a_forged_time_out_leaves_the_node_online_and_the_sweeps_own_still_count(env: Env) -> None:
    a = env.node("a", 0, 2, "wallet-a")  # beats only when told: silent in between
    await a.beat("joining")
    await env.pause_sweep()  # so that only the forgeries could take it offline meanwhile
    await a.beat("online")
    latest = await eventually(lambda: _when(env.row(a.peer_id), lambda r: r and r["state"] == "online"), "a online")
    history = await env.pool.fetch("SELECT * FROM far_node_state_changes WHERE peer_id = $1 ORDER BY id", a.peer_id)

    # time-out decisions naming a's latest heartbeat, exactly as the sweep's would, produced straight onto the topic
    decision = NodeTimedOut(peer_id=a.peer_id, last_heartbeat_id=latest["last_heartbeat_id"],
                            last_seen=latest["last_seen"], timeout_seconds=TIMEOUT, source="attacker")
    attacker = RegistryKey.create(env.tmp / "attacker.key")
    claimed = json.loads(attacker.sign(decision.model_copy(update={"event_id": uuid.uuid4()})).model_dump_json())
    claimed["key_id"] = env.key.key_id  # the registry's key id, the attacker's signature
    earlier = decision.model_copy(update={"event_id": uuid.uuid4(), "last_heartbeat_id": uuid.uuid4()})
    edited = json.loads(env.key.sign(earlier).model_dump_json())
    edited["last_heartbeat_id"] = str(latest["last_heartbeat_id"])  # a genuine decision re-pointed at a's latest
    forged = {
        "unsigned time-out decision": decision.model_dump_json().encode(),
        "not one of the registry's keys": attacker.sign(decision.model_copy(update={"event_id": uuid.uuid4()}))
        .model_dump_json().encode(),
        "bad signature": json.dumps(claimed).encode(),
        "does not verify with the registry's key": json.dumps(edited).encode(),
    }
    for value in forged.values():
        await env.publish_raw(value, a.peer_id)
    await env.caught_up()
    letters = await eventually(lambda: _when(env.letters(), lambda ls: len(ls) >= len(forged)),
                               "every forged time-out dead-lettered")
    by_payload = {d.payload.encode(): d for d in letters}
    for reason, value in forged.items():
        assert reason in by_payload[value].reason, (reason, by_payload[value].reason)
        assert by_payload[value].consumer_group == env.group and by_payload[value].key == a.peer_id
    assert dict(await env.row(a.peer_id)) == dict(latest)  # still online, its row untouched
    assert await env.pool.fetch("SELECT * FROM far_node_state_changes WHERE peer_id = $1 ORDER BY id",
                                a.peer_id) == history

    # the sweep's own, signed decision still takes the silent node offline
    env.resume_sweep()
    await eventually(lambda: _when(env.row(a.peer_id), lambda r: r["state"] == "offline"), "a timed out",
                     timeout=TIMEOUT + 20)
    last = (await env.pool.fetch("SELECT * FROM far_node_state_changes WHERE peer_id = $1 ORDER BY id",
                                 a.peer_id))[-1]
    assert (last["from_state"], last["to_state"], last["reason"]) == ("online", "offline", "timeout")
    applied = next(d for d in map(json.loads, await read_all(env.bootstrap, env.topic))
                   if d.get("event_id") == str(last["event_id"]))
    assert applied["type"] == "node.timed_out" and applied["key_id"] == env.key.key_id and applied["signature"]
    assert len(await env.letters()) == len(forged)  # the sweep's decision was not refused
    await env.assert_rebuild_equals_live()


async def test_a_replayed_old_heartbeat_does_not_bring_an_offline_node_back(env: Env) -> None:
    a = env.node("a", 0, 2, "wallet-a")
    await a.beat("joining")
    a.start()
    await eventually(lambda: _when(env.row(a.peer_id), lambda r: r and r["state"] == "online"), "a online")
    await asyncio.sleep(INTERVAL * 3)
    await a.kill()
    await eventually(lambda: _when(env.row(a.peer_id), lambda r: r["state"] == "offline"), "a timed out",
                     timeout=TIMEOUT + 20)
    offline = dict(await env.row(a.peer_id))
    history = await env.pool.fetch("SELECT * FROM far_node_state_changes WHERE peer_id = $1 ORDER BY id", a.peer_id)

    old_online, last = a.sent[1], a.sent[-1]  # an older accepted heartbeat, and the latest one
    await env.publish_raw(old_online, a.peer_id)
    await env.publish_raw(last, a.peer_id)
    await env.caught_up()
    assert dict(await env.row(a.peer_id)) == offline
    assert await env.pool.fetch("SELECT * FROM far_node_state_changes WHERE peer_id = $1 ORDER BY id",
                                a.peer_id) == history
    stale = await eventually(lambda: _when(env.letters(), lambda ls: [d for d in ls if "stale" in d.reason]),
                             "the replay dead-lettered as stale")
    assert stale[0].payload.encode() == old_online

    await a.beat("online")  # the node itself coming back does count
    await eventually(lambda: _when(env.row(a.peer_id), lambda r: r["state"] == "online"), "a back online")
    await env.assert_rebuild_equals_live()


async def test_clean_shutdown_goes_offline_at_once(env: Env) -> None:
    a = env.node("a", 0, 2, "wallet-a")
    for state in ("joining", "online", "draining", "offline"):
        await a.beat(state)
    row = await eventually(lambda: _when(env.row(a.peer_id), lambda r: r and r["state"] == "offline"), "a offline")
    reasons = [r["reason"] for r in await env.pool.fetch(
        "SELECT reason FROM far_node_state_changes WHERE peer_id = $1 ORDER BY id", a.peer_id)]
    assert reasons == ["heartbeat"] * 4 and row["online_since"] is None
    await env.assert_rebuild_equals_live()


def _b64(raw: bytes) -> str:
    import base64

    return base64.b64encode(raw).decode()


async def _when(value: Awaitable[Any], predicate: Callable[[Any], Any]) -> Any:
    result = await value
    return result if result and predicate(result) else None


def test_rebuild_command_replays_the_heartbeat_topic(kafka_bootstrap: str, empty_database_url: str,
                                                     tmp_path: Path) -> None:
    from click.testing import CliRunner

    from consumers.registry.cli import rebuild_command

    asyncio.run(messaging.ensure_topics(kafka_bootstrap, messaging.mesh_topics(3)))
    identity = NodeIdentity.generate(tmp_path / "node.identity")
    publisher = HeartbeatPublisher(kafka_bootstrap, identity, NodeDescription(
        "wallet-cli", "model-cli", 0, 1, 1, 1.0, "v", DeviceInfo(kind="cpu"), 1.0), topic=topics.HEARTBEATS.name)
    try:
        assert publisher.beat("online")
    finally:
        publisher.close()
    runner = CliRunner()
    args = ["--database-url", empty_database_url, "--kafka-bootstrap", kafka_bootstrap]
    # the live registry's key verifies its time-out decisions; the rebuild never makes one up
    missing = runner.invoke(rebuild_command, [*args, "--registry-key", str(tmp_path / "absent.key")])
    assert missing.exit_code != 0 and "not found" in str(missing.exception) and not (tmp_path / "absent.key").exists()
    RegistryKey.create(tmp_path / "registry.key")
    args += ["--registry-key", str(tmp_path / "registry.key")]
    result = runner.invoke(rebuild_command, args)
    assert result.exit_code == 0, result.output
    assert re.match(r"rebuilt \d+ nodes and \d+ state changes from \d+ records \(\d+ refused\)", result.output)

    async def registered() -> asyncpg.Record | None:
        conn = await asyncpg.connect(empty_database_url)
        try:
            return await conn.fetchrow("SELECT wallet, state FROM far_nodes WHERE peer_id = $1", identity.peer_id)
        finally:
            await conn.close()

    assert tuple(asyncio.run(registered())) == ("wallet-cli", "online")
    again = runner.invoke(rebuild_command, args)  # never into a database that has a registry already
    assert again.exit_code != 0 and "not empty" in again.output
