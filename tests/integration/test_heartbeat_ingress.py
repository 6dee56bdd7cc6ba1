"""The gateway's heartbeat ingress (POST /api/nodes/heartbeats) on the real broker and PostgreSQL: a provider's
only way in. Its signed heartbeats are published unchanged and the registry records them; everything else — a money
event, a forged time-out, a tampered, unsigned, stale, oversized or too frequent heartbeat — is refused with one
JSON error, and nothing reaches the topics or the ledger.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from consumers.ledger import consumer as ledger
from consumers.registry import consumer as registry
from consumers.registry.decisions import RegistryKey
from farmesh.billing import accounts
from farmesh.runtime.settings import Settings
from farmesh.swarm.identity import NodeIdentity, sign_heartbeat
from producers.gateway.app import create_app
from producers.gateway.heartbeat_ingress import PATH
from producers.node.heartbeat import HeartbeatPublisher, NodeDescription
from schemas import money, topics
from schemas.events import DeviceInfo, NodeTimedOut
from tests.support.consumers import running
from tests.support.kafka import read_all, wait_caught_up
from tests.support.money import audit_breaks, hold, money_env, outcome
from tests.support.services import serve

pytestmark = pytest.mark.integration
MODEL = "tiny"
BURST = 3


@pytest.fixture
async def ingress(tmp_path: Path, postgres_admin_url: str, tiny_model_dir: Path):
    """The gateway (its ingress: burst BURST, then one heartbeat per 10 s per peer), the ledger and the registry, on a
    broker and database of their own."""
    async with money_env(tmp_path, postgres_admin_url) as env:
        settings = Settings(kafka_bootstrap=env.bootstrap, database_url=env.database_url, dht_prefix=MODEL,
                            model=str(tiny_model_dir), heartbeat_rate=0.1, heartbeat_burst=BURST)

        async def route_check() -> bool:
            return True

        key = RegistryKey.create(tmp_path / "registry.key")
        groups = {
            topics.GROUP_LEDGER: lambda b, r: ledger.register(b, env.pool, r),
            topics.GROUP_REGISTRY: lambda b, r: registry.register(b, env.pool, r, key=key),
        }
        async with running(env.bootstrap, groups), serve(create_app(settings, route_check)) as url:
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                yield env, url, http


def provider(tmp_path: Path, url: str, name: str = "node", wallet: str = "wallet-remote") -> HeartbeatPublisher:
    """A provider's heartbeat path as `farmesh node --heartbeat-url` runs it: no broker address at all."""
    identity = NodeIdentity.generate(tmp_path / f"{name}.identity")
    description = NodeDescription(wallet, MODEL, 0, 2, 4, 5.0, "farmesh/test", DeviceInfo(kind="cpu", name="t"), 1.0)
    return HeartbeatPublisher("", identity, description, topic=topics.HEARTBEATS.name, url=url + PATH)


async def post(http: httpx.AsyncClient, body: bytes | dict, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await http.post(PATH, content=content, headers={"Content-Type": "application/json", **headers})


async def ledger_state(env) -> tuple:
    async with env.pool.acquire() as conn:
        return (await conn.fetchval("SELECT count(*) FROM far_mesh_sessions"),
                await conn.fetchval("SELECT count(*) FROM far_ledger_entries"),
                tuple(await conn.fetch("SELECT request_id, status FROM far_reservations ORDER BY request_id")))


async def test_a_providers_heartbeats_are_published_unchanged_and_registered(ingress, tmp_path: Path) -> None:
    env, url, http = ingress
    node = provider(tmp_path, url)
    try:
        sent = node.heartbeat("online")
        assert await asyncio.to_thread(node.beat, "online")  # through the publisher's own HTTP path: 202
    finally:
        await asyncio.to_thread(node.close)
    response = await post(http, sent.model_dump_json().encode())
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": True, "peer_id": sent.peer_id, "event_id": str(sent.event_id)}
    assert sent.model_dump_json().encode() in await read_all(env.bootstrap, topics.HEARTBEATS.name)  # byte for byte
    await wait_caught_up(env.bootstrap, topics.GROUP_REGISTRY, topics.HEARTBEATS.name)
    row = await env.pool.fetchrow("SELECT wallet, state, start_block, end_block FROM far_nodes WHERE peer_id = $1",
                                  sent.peer_id)
    assert tuple(row) == ("wallet-remote", "online", 0, 2)
    metrics = (await http.get("/metrics/")).text
    assert 'farmesh_gateway_heartbeats_total{result="accepted"} 2.0' in metrics


async def test_a_money_event_through_the_providers_path_is_refused_and_the_ledger_is_unchanged(
        ingress, tmp_path: Path) -> None:
    """A provider's machine holds no broker credentials, only the ingress: an `inference.completed` that keeps to an
    open reservation's terms (which the ledger would settle, were it on farmesh.sessions) is refused there."""
    env, url, http = ingress
    async with env.pool.acquire() as conn:
        client = await accounts.create_client(conn, f"ingress-{uuid.uuid4().hex[:8]}", money.to_base_units(Decimal(1)))
    forged = outcome(f"forged-{uuid.uuid4().hex[:8]}", client.account_id, 5, datetime.now(timezone.utc))
    await hold(env.pool, forged)
    before = await ledger_state(env)
    node = provider(tmp_path, url)
    try:
        # the same client the node's heartbeats use, pointed at a money event
        refused = await post(http, forged.model_dump_json().encode())
        timed_out = NodeTimedOut(peer_id=node.identity.peer_id, last_heartbeat_id=uuid.uuid4(),
                                 last_seen=datetime.now(timezone.utc), timeout_seconds=1.0)
        forged_decision = await post(http, timed_out.model_dump_json().encode())
    finally:
        await asyncio.to_thread(node.close)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"] == "not_a_heartbeat" and "inference.completed" in refused.json()["detail"]
    assert forged_decision.status_code == 403 and "node.timed_out" in forged_decision.json()["detail"]
    assert await read_all(env.bootstrap, topics.SESSIONS.name, timeout=1.0) == []
    assert await read_all(env.bootstrap, topics.HEARTBEATS.name, timeout=1.0) == []
    await asyncio.sleep(1.0)  # the ledger would have settled it by now
    assert await ledger_state(env) == before
    assert await audit_breaks(env.pool) == []


async def test_abuse_of_the_ingress_is_refused_in_one_json_error(ingress, tmp_path: Path) -> None:
    env, url, http = ingress
    node = provider(tmp_path, url)
    other = provider(tmp_path, url, "other")
    try:
        good = json.loads(node.heartbeat("online").model_dump_json())
        tampered = {**good, "wallet": "0xTHIEF"}  # signed for another wallet
        unsigned = {**good, "signature": None}
        foreign = {**good, "public_key": json.loads(other.heartbeat("online").model_dump_json())["public_key"]}
        an_hour_ago = node.heartbeat("online").model_copy(
            update={"occurred_at": datetime.now(timezone.utc) - timedelta(hours=1)})
        stale = json.loads(sign_heartbeat(node.identity, an_hour_ago).model_dump_json())  # validly signed, old
        cases = [
            (await post(http, b"x" * 20000), 413, "request_too_large"),
            (await http.post(PATH, content=json.dumps(good), headers={"Content-Type": "text/plain"}), 415,
             "unsupported_media_type"),
            (await post(http, b'{"type": "node.heartbeat", '), 422, "invalid_request"),
            (await post(http, b"[1, 2]"), 403, "not_a_heartbeat"),
            (await post(http, {**good, "start_block": 3}), 422, "invalid_request"),
            (await post(http, tampered), 401, "bad_signature"),
            (await post(http, unsigned), 401, "bad_signature"),
            (await post(http, foreign), 401, "bad_signature"),
            (await post(http, stale), 422, "stale"),
        ]
        for response, status, code in cases:
            assert (response.status_code, response.json()["error"]) == (status, code), response.text
            assert "\n" not in response.json()["detail"]
        # the limit counts a peer's verified heartbeats: BURST pass, the next is refused with Retry-After
        statuses = [(await post(http, json.loads(node.heartbeat("online").model_dump_json()))).status_code
                    for _ in range(BURST + 1)]
        assert statuses == [202] * BURST + [429]
        limited = await post(http, json.loads(node.heartbeat("online").model_dump_json()))
        assert limited.json()["error"] == "rate_limited" and int(limited.headers["Retry-After"]) >= 1
        # ... and only that peer's: another one still gets through
        assert (await post(http, json.loads(other.heartbeat("online").model_dump_json()))).status_code == 202
    finally:
        await asyncio.to_thread(node.close)
        await asyncio.to_thread(other.close)
    published = await read_all(env.bootstrap, topics.HEARTBEATS.name)
    assert len(published) == BURST + 1
    assert all(json.loads(v)["wallet"] == "wallet-remote" for v in published)
    await wait_caught_up(env.bootstrap, topics.GROUP_REGISTRY, topics.HEARTBEATS.name)
    assert await env.pool.fetchval("SELECT count(*) FROM far_nodes") == 2
    assert await audit_breaks(env.pool) == []
