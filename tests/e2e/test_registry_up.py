"""How the node registry is checked: `farmesh up` as a user runs it, then discovery, forgery, a killed node, a
replay, and the registry rebuilt from the topic, all against the mesh's own processes (stopped by pid)."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer

from consumers.registry.decisions import registry_keys
from consumers.registry.rebuild import committed_offsets, rebuild
from consumers.registry.repository import snapshot
from db.migrate import migrate
from farmesh.swarm.identity import NodeIdentity, signing_bytes
from farmesh.dev.local_services import pid_alive
from schemas import topics
from schemas.events import DeadLetter, NodeTimedOut
from tests.conftest import create_database, drop_database
from tests.e2e.test_registry_swarm import read_until_now
from tests.integration.test_discovery_status import CHROMIUM, render
from tests.support.kafka import read_all, test_broker, wait_caught_up

pytestmark = pytest.mark.e2e

TIMEOUT = 6  # FARMESH_NODE_TIMEOUT for this mesh; heartbeats every second
MODEL = "farmesh-tiny"
PIDS = re.compile(r"\(pid (\d+)\)")


async def eventually(check, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what} (last: {result!r})")
        await asyncio.sleep(0.3)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMESH_")}
    return {**env, "FARMESH_DATA_DIR": str(tmp_path / "data"), "FARMESH_LOG_LEVEL": "WARNING", **extra}


async def test_up_registers_its_nodes_and_shows_a_killed_one_offline(tmp_path: Path, empty_database_url: str,
                                                                     postgres_admin_url: str) -> None:
    database_url = empty_database_url
    errors = tmp_path / "up.err"
    with open(errors, "w") as err:
        up = subprocess.Popen(
            [sys.executable, "-m", "farmesh.cli", "up", "--gateway-port", "0", "--model", "tiny"],
            env=_env(tmp_path, FARMESH_DATABASE_URL=database_url, FARMESH_BROKER=test_broker(), FARMESH_NODE_TIMEOUT=str(TIMEOUT),
                     FARMESH_HEARTBEAT_INTERVAL="1"),
            stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
        )
    child_pids: list[int] = []
    try:
        started = time.monotonic()
        line = up.stdout.readline()  # blocks until ready (or exit)
        assert line.startswith("ready gateway=http://127.0.0.1:"), (line, errors.read_text()[-3000:])
        print(f"\nfarmesh up ready in {time.monotonic() - started:.0f} s: {line.strip()}")
        fields = dict(f.split("=", 1) for f in line.split()[1:])
        gateway, status_url = fields["gateway"], fields["status"]
        log = errors.read_text()
        child_pids = [int(p) for p in PIDS.findall(log)]
        bootstrap = re.search(r" broker at (\S+) \(pid", log)[1]  # noida-db's or Apache Kafka's
        nodes = {m[2]: (m[1], int(m[3])) for m in re.finditer(r"node (\S+) serves blocks (\d+:\d+).*\(pid (\d+)\)", log)}
        assert set(nodes) == {"0:2", "2:4"}, log
        (peer0, pid0), (peer1, pid1) = nodes["0:2"], nodes["2:4"]

        async with httpx.AsyncClient(base_url=gateway, timeout=60) as http:
            # 2 online nodes, no gaps (farmesh up waited for the registry to see them)
            swarm = next(m for m in (await http.get("/api/swarm")).json()["models"] if m["model"] == MODEL)
            assert (swarm["online_nodes"], swarm["gaps"], swarm["full_coverage"]) == (2, [], True)
            assert swarm["dht"]["unregistered_peers"] == []
            listed = {n["peer_id"]: n for n in (await http.get("/api/nodes")).json()["nodes"]}
            assert {p: (n["state"], n["start_block"], n["end_block"], n["wallet"]) for p, n in listed.items()} == {
                peer0: ("online", 0, 2, "demo-wallet-0"), peer1: ("online", 2, 4, "demo-wallet-1")}
            assert all(n["throughput"] > 0 and n["device"]["kind"] == "cpu" for n in listed.values())
            if Path(CHROMIUM).exists():
                dom = await asyncio.to_thread(render, status_url)
                assert f'data-model="{MODEL}" data-gaps="" data-online-nodes="2"' in dom, dom[-2000:]

            # a forged heartbeat straight to the topic: same peer id, another key, another wallet
            wallet_before = await _wallet(database_url, peer0)
            genuine = json.loads(next(v for v in reversed(await read_until_now(bootstrap, topics.HEARTBEATS.name))
                                      if json.loads(v).get("peer_id") == peer0))
            attacker = NodeIdentity.generate(tmp_path / "attacker.identity")
            forged = {**genuine, "wallet": "attacker-wallet", "event_id": str(uuid.uuid4()),
                      "public_key": attacker.public_key_b64}
            forged["signature"] = base64.b64encode(attacker.sign(signing_bytes(forged))).decode()
            await _publish(bootstrap, json.dumps(forged).encode(), peer0)
            letter = await eventually(lambda: _letter(bootstrap, peer0, "attacker-wallet"), "the forgery dead-lettered")
            assert "belongs to peer" in letter.reason and letter.consumer_group == topics.GROUP_REGISTRY
            assert await _wallet(database_url, peer0) == wallet_before == "demo-wallet-0"

            # a forged time-out straight to the topic (unsigned, naming peer0's latest heartbeat): dead-lettered,
            # peer0 stays online; the mesh's registry signs its own decisions with the key in its data dir
            key_path = (tmp_path / "data" / "registry.key").resolve()
            assert key_path.exists() and f"FARMESH_REGISTRY_KEY={key_path}" in (tmp_path / "data" / "mesh.env").read_text()
            forged_timeout = NodeTimedOut(peer_id=peer0, last_heartbeat_id=genuine["event_id"],
                                          last_seen=genuine["occurred_at"], timeout_seconds=TIMEOUT, source="attacker")
            await _publish(bootstrap, forged_timeout.model_dump_json().encode(), peer0)
            letter = await eventually(lambda: _letter(bootstrap, peer0, str(forged_timeout.event_id)),
                                      "the forged time-out dead-lettered")
            assert "unsigned time-out decision" in letter.reason
            await wait_caught_up(bootstrap, topics.GROUP_REGISTRY, topics.HEARTBEATS.name)
            node0 = (await http.get(f"/api/nodes/{peer0}")).json()
            assert node0["state"] == "online" and all(h["reason"] == "heartbeat" for h in node0["state_history"])

            # kill a node: offline and a gap within the timeout (bounded wait; the elapsed time is printed)
            os.killpg(pid1, signal.SIGKILL)
            killed = time.monotonic()

            async def gap() -> Any:
                m = next(m for m in (await http.get("/api/swarm")).json()["models"] if m["model"] == MODEL)
                return m if m["gaps"] == [2, 3] else None

            swarm = await eventually(gap, "a gap at blocks 2-3", timeout=TIMEOUT + 30)
            print(f"gap shown {time.monotonic() - killed:.1f} s after kill -9 (FARMESH_NODE_TIMEOUT={TIMEOUT})")
            assert swarm["online_nodes"] == 1
            node1 = (await http.get(f"/api/nodes/{peer1}")).json()
            assert node1["state"] == "offline" and node1["state_history"][-1]["reason"] == "timeout"
            assert up.poll() is None, "a provider node leaving must not stop the mesh"
            if Path(CHROMIUM).exists():
                dom = await asyncio.to_thread(render, status_url)
                assert f'data-model="{MODEL}" data-gaps="2,3" data-online-nodes="1"' in dom, dom[-2000:]

            # a replayed old heartbeat does not bring it back
            old = next(v for v in await read_until_now(bootstrap, topics.HEARTBEATS.name)
                       if json.loads(v).get("peer_id") == peer1 and json.loads(v)["state"] == "online")
            await _publish(bootstrap, old, peer1)
            letter = await eventually(lambda: _letter(bootstrap, peer1, None, "stale"), "the replay dead-lettered")
            await wait_caught_up(bootstrap, topics.GROUP_REGISTRY, topics.HEARTBEATS.name)
            assert (await http.get(f"/api/nodes/{peer1}")).json()["state"] == "offline"

            # the other node leaves cleanly: draining, then offline, at once
            os.kill(pid0, signal.SIGTERM)
            await eventually(lambda: _when_state(http, peer0, "offline"), "node 0 offline after SIGTERM")
            history = (await http.get(f"/api/nodes/{peer0}")).json()["state_history"]
            assert [h["to_state"] for h in history][-2:] == ["draining", "offline"]

        # nothing moves any more: the registry rebuilt from the topic equals the live table
        await wait_caught_up(bootstrap, topics.GROUP_REGISTRY, topics.HEARTBEATS.name)
        until = await committed_offsets(bootstrap, topics.GROUP_REGISTRY)
        live_pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
        rebuilt_url = await create_database(postgres_admin_url)
        try:
            live = await snapshot(live_pool)
            await migrate(rebuilt_url)
            pool = await asyncpg.create_pool(rebuilt_url, min_size=1, max_size=1)
            try:
                _, trusted = registry_keys(tmp_path / "data" / "registry.key", [], signing=False)
                counts = await rebuild(bootstrap, pool, until=until, trusted=trusted)
                rebuilt = await snapshot(pool)
            finally:
                await pool.close()
        finally:
            await live_pool.close()
            await drop_database(postgres_admin_url, rebuilt_url)
        print(f"rebuilt from {counts['read']} records ({counts['refused']} refused)")
        assert rebuilt == live and len(live[0]) == 2
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=90)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        child_pids = [int(p) for p in PIDS.findall(errors.read_text())]
        leftovers = [p for p in child_pids if pid_alive(p)]
        for pid in leftovers:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert up.returncode == 0, errors.read_text()[-3000:]
    assert leftovers == [], f"processes left running: {leftovers}"


async def test_up_stopped_leaves_its_nodes_offline(tmp_path: Path, empty_database_url: str) -> None:
    """SIGTERM to `farmesh up` with both nodes online: the nodes leave (draining, then offline heartbeats) and
    the registry records them before it stops, so far_nodes does not show a stopped mesh's nodes online."""
    database_url = empty_database_url
    errors = tmp_path / "up.err"
    with open(errors, "w") as err:
        up = subprocess.Popen(  # the default node time-out (20 s): an offline here can only be the heartbeat's
            [sys.executable, "-m", "farmesh.cli", "up", "--gateway-port", "0", "--model", "tiny"],
            env=_env(tmp_path, FARMESH_DATABASE_URL=database_url, FARMESH_BROKER=test_broker(), FARMESH_HEARTBEAT_INTERVAL="1"),
            stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
        )
    leftovers: list[int] = []
    try:
        line = up.stdout.readline()  # blocks until ready (or exit)
        assert line.startswith("ready gateway=http://127.0.0.1:"), (line, errors.read_text()[-3000:])
        peers = set(re.findall(r"node (\S+) serves blocks", errors.read_text()))
        assert len(peers) == 2
        conn = await asyncpg.connect(database_url)
        try:
            assert {r["peer_id"]: r["state"] for r in await conn.fetch("SELECT peer_id, state FROM far_nodes")} \
                == {p: "online" for p in peers}
        finally:
            await conn.close()
        stopping = time.monotonic()
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=90)
        print(f"\nfarmesh up stopped {time.monotonic() - stopping:.1f} s after SIGTERM")
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        child_pids = [int(p) for p in PIDS.findall(errors.read_text())]
        leftovers = [p for p in child_pids if pid_alive(p)]
        for pid in leftovers:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    log = errors.read_text()
    assert up.returncode == 0, log[-3000:]
    assert leftovers == [], f"processes left running: {leftovers}"
    assert "the registry recorded 2 node(s) offline" in log, log[-3000:]
    # The database outlives the mesh (an external one here): what the registry recorded before it stopped.
    conn = await asyncpg.connect(database_url)
    try:
        nodes = {r["peer_id"]: r["state"] for r in await conn.fetch("SELECT peer_id, state FROM far_nodes")}
        changes = await conn.fetch("SELECT peer_id, from_state, to_state, reason FROM far_node_state_changes "
                                   "ORDER BY id")
    finally:
        await conn.close()
    assert nodes == {p: "offline" for p in peers}
    for peer in peers:
        mine = [(c["from_state"], c["to_state"], c["reason"]) for c in changes if c["peer_id"] == peer]
        assert mine[-2:] == [("online", "draining", "heartbeat"), ("draining", "offline", "heartbeat")], mine


async def _wallet(database_url: str, peer_id: str) -> str | None:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SELECT wallet FROM far_nodes WHERE peer_id = $1", peer_id)
    finally:
        await conn.close()


async def _publish(bootstrap: str, value: bytes, key: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topics.HEARTBEATS.name, value, key=key.encode())
    finally:
        await producer.stop()


async def _letter(bootstrap: str, key: str, payload_has: str | None, reason_has: str = "") -> DeadLetter | None:
    for value in await read_all(bootstrap, topics.DEAD_LETTER.name, timeout=1.0):
        letter = DeadLetter.model_validate_json(value)
        if letter.key == key and (payload_has is None or payload_has in letter.payload) and reason_has in letter.reason:
            return letter
    return None


async def _when_state(http: httpx.AsyncClient, peer: str, state: str) -> bool:
    return (await http.get(f"/api/nodes/{peer}")).json().get("state") == state
