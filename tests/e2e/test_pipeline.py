"""End to end on real parts: gateway -> Kafka -> worker on a real Petals swarm -> SSE, ledger in PostgreSQL."""
from __future__ import annotations

import asyncio
from decimal import Decimal

import httpx
import pytest
from prometheus_client import CollectorRegistry
from transformers import AutoTokenizer

from consumers.inference import consumer as worker
from consumers.inference.repository import PostgresReservations
from consumers.ledger import consumer as ledger
from farmesh.billing import accounts
from farmesh.kafka import messaging
from schemas import money
from consumers.inference.generation import load_client
from farmesh.runtime.settings import Settings
from farmesh.swarm.view import SwarmView
from producers.gateway.app import create_app
from schemas import topics
from tests.support.kafka import read_all, wait_caught_up
from tests.support.reference import greedy_ids
from tests.support.consumers import running
from tests.support.services import serve
from tests.support.sse import read_events

pytestmark = pytest.mark.e2e

PROMPT = "Hello, how are you?"
MAX_TOKENS = 30


@pytest.fixture(scope="module")
async def gateway(swarm, kafka_bootstrap, database_url, db_pool):
    settings = Settings(kafka_bootstrap=kafka_bootstrap, database_url=database_url, model=str(swarm.model_dir),
                        initial_peers=swarm.initial_peers, dht_prefix=swarm.dht_prefix)
    client = await asyncio.to_thread(load_client, swarm.model_dir, swarm.initial_peers, swarm.dht_prefix,
                                     request_timeout=10, max_retries=2)
    view = await asyncio.to_thread(SwarmView, swarm.initial_peers, swarm.dht_prefix, 4)
    groups = {
        topics.GROUP_INFERENCE: lambda b, r: worker.register(b, client, settings.model_name, r,
                                                         reservations=PostgresReservations(db_pool)),
        topics.GROUP_LEDGER: lambda b, r: ledger.register(b, db_pool, r),
    }
    async with db_pool.acquire() as conn:  # the paying client: every request authenticates
        issued = await accounts.create_client(conn, "e2e-pipeline", money.to_base_units(Decimal(1)))
    try:
        app = create_app(settings, route_check=lambda: asyncio.to_thread(view.full_route))
        async with running(kafka_bootstrap, groups), serve(app) as url:
            async with httpx.AsyncClient(base_url=url, timeout=120,
                                         headers={"Authorization": f"Bearer {issued.key}"}) as http:
                yield http
    finally:
        view.shutdown()
        client.close()


async def test_plan_request_end_to_end(swarm, gateway, kafka_bootstrap, db_pool):
    assert (await gateway.get("/health")).status_code == 200

    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "request_id": "test-001"}
    async with gateway.stream("POST", "/api/inference/generate", json=body) as response:
        assert response.status_code == 200
        events = await read_events(response)
    tokens = [d for e, d in events if e == "token"]
    name, done = events[-1]
    assert name == "done", done

    # The streamed text is exactly what plain transformers generates greedily.
    expected = greedy_ids(swarm.model_dir, PROMPT, MAX_TOKENS)
    tokenizer = AutoTokenizer.from_pretrained(swarm.model_dir)
    assert [t["token_id"] for t in tokens] == expected
    assert "".join(t["text"] for t in tokens) == tokenizer.decode(expected, skip_special_tokens=True)
    prompt_tokens = len(tokenizer(PROMPT).input_ids)
    assert done["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(expected),
                             "cost_far": money.text(Decimal("0.0001") * len(expected))}

    await wait_caught_up(kafka_bootstrap, topics.GROUP_LEDGER, topics.SESSIONS.name)
    session = (await gateway.get("/api/sessions/test-001")).json()
    assert session["status"] == "completed" and session["completion_tokens"] == len(expected)
    # Every token each node processed is accounted for: the prompt, then each generated token but the last.
    contributions = session["contributions"]
    assert sorted((c["peer_id"], c["start_block"], c["end_block"], c["tokens_processed"]) for c in contributions) == sorted(
        (swarm.nodes[blocks].peer_id, int(blocks[0]), int(blocks[2]), prompt_tokens + len(expected) - 1)
        for blocks in ("0:2", "2:4")
    )
    assert sum(Decimal(c["earnings"]) for c in contributions) == Decimal(session["cost"]) == Decimal("0.0001") * len(expected)

    # Feeding the same events again leaves the ledger unchanged.
    before = [dict(r) for r in await db_pool.fetch("SELECT * FROM far_session_contributions ORDER BY id")]
    sessions_before = [dict(r) for r in await db_pool.fetch("SELECT * FROM far_mesh_sessions ORDER BY request_id")]
    replay = messaging.create_broker(kafka_bootstrap, "test-replay", CollectorRegistry())
    await replay.connect()
    try:
        for value in await read_all(kafka_bootstrap, topics.SESSIONS.name):
            await replay.publish(value, topics.SESSIONS.name, key=b"test-001")
    finally:
        await replay.stop()
    await wait_caught_up(kafka_bootstrap, topics.GROUP_LEDGER, topics.SESSIONS.name)
    assert [dict(r) for r in await db_pool.fetch("SELECT * FROM far_session_contributions ORDER BY id")] == before
    assert [dict(r) for r in await db_pool.fetch("SELECT * FROM far_mesh_sessions ORDER BY request_id")] == sessions_before
