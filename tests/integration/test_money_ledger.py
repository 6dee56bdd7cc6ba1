"""The double-entry ledger end to end on the real broker and PostgreSQL: gateway reservations, worker
settlement, ledger postings, payments projection; redelivered and duplicated events; the audit."""
from __future__ import annotations

import asyncio
import functools
import uuid
from datetime import datetime, timezone
from decimal import Decimal

import httpx
import pytest

from consumers.inference import consumer as worker
from consumers.inference.repository import PostgresReservations
from consumers.ledger import consumer as ledger
from consumers.payments import consumer as payments
from farmesh.billing import accounts
from schemas import money
from farmesh.runtime.settings import Settings
from producers.gateway.app import create_app
from schemas import topics
from schemas.events import DeadLetter, InferenceRequested
from tests.support.consumers import running
from tests.support.kafka import read_all, wait_caught_up
from tests.support.money import ScriptedGenerator, audit_breaks, farmesh, money_env, outcome, producer, reserve_for
from tests.support.services import serve
from tests.support.sse import read_events

pytestmark = pytest.mark.integration
MODEL = "tiny"
PRICE = Decimal("0.0002")  # FARMESH_MODEL_PRICES tiny=0.0002 (the default price stays 0.0001)
FEE = Decimal("0.05")


@pytest.fixture(scope="module")
async def env(tmp_path_factory, postgres_admin_url):
    async with money_env(tmp_path_factory.mktemp("money-ledger"), postgres_admin_url) as e:
        yield e


@pytest.fixture(scope="module")
async def mesh(env, tiny_model_dir):
    settings = Settings(kafka_bootstrap=env.bootstrap, database_url=env.database_url, dht_prefix=MODEL, model=str(tiny_model_dir),
                        max_new_tokens=50, model_prices={MODEL: PRICE}, platform_fee=FEE)
    generator = ScriptedGenerator()
    groups = {
        topics.GROUP_INFERENCE: lambda b, r: worker.register(b, generator, MODEL, r, reservations=PostgresReservations(env.pool)),
        topics.GROUP_LEDGER: lambda b, r: ledger.register(b, env.pool, r),
        topics.GROUP_PAYMENTS: lambda b, r: payments.register(b, env.pool, r),
    }
    async with running(env.bootstrap, groups), serve(create_app(settings, lambda: asyncio.sleep(0, True))) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            yield client, generator


async def caught_up(env) -> None:
    await wait_caught_up(env.bootstrap, topics.GROUP_INFERENCE, topics.REQUESTS.name, timeout=120)
    for group in (topics.GROUP_LEDGER, topics.GROUP_PAYMENTS):
        await wait_caught_up(env.bootstrap, group, topics.SESSIONS.name, timeout=120)


async def generate(client, key: str, body: dict) -> tuple[int, object]:
    async with client.stream("POST", "/api/inference/generate", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, response.json()
        return 200, await read_events(response)


async def test_fifty_sessions_with_redelivered_and_duplicated_events_audit_clean(env, mesh):
    client, generator = mesh
    async with env.pool.acquire() as conn:
        issued = await accounts.create_client(conn, "fifty", money.to_base_units(Decimal(1)))
    run = uuid.uuid4().hex[:6]
    mesh_id = functools.partial(accounts.mesh_request_id, issued.account_id)  # the gateway scopes each client id
    bodies = [{"prompt": f"session {i}", "max_tokens": 6, "request_id": f"{run}-{i}"} for i in range(50)]
    results = []
    for chunk in range(0, 50, 10):
        results += await asyncio.gather(*(generate(client, issued.key, b) for b in bodies[chunk:chunk + 10]))
    assert [status for status, _ in results] == [200] * 50
    ended = [events[-1] for _, events in results]
    assert sum(name == "error" for name, _ in ended) == 5  # sessions 3, 13, 23, ... broke mid-generation

    # Redelivery: every request is delivered again, a second outcome per request arrives (a request that ran
    # again) and every session event is delivered twice more. Nothing may be posted twice.
    await caught_up(env)
    first = await money_state(env.pool, run)
    again = await producer(env.bootstrap)
    try:
        for value in await read_all(env.bootstrap, topics.REQUESTS.name):
            await again.publish(value, topics.REQUESTS.name)
        await caught_up(env)
        # A request whose reservation is closed already ran: delivered again, it is not run again (issue 12: a
        # worker runs only what matches an open reservation), and says why on the dead-letter topic.
        assert len(generator.calls) == 50
        refused = [d for d in map(DeadLetter.model_validate_json, await read_all(env.bootstrap, topics.DEAD_LETTER.name))
                   if d.consumer_group == topics.GROUP_INFERENCE and f'"request_id":"{run}-' in d.payload]
        assert sorted(InferenceRequested.model_validate_json(d.payload).request_id for d in refused) == \
            sorted(mesh_id(b["request_id"]) for b in bodies)
        assert {d.reason.split(" is ")[1].split()[0].rstrip(":") for d in refused} == {"settled", "released"}
        # What a second run of each request would publish: acceptable (the reserved terms), and it loses.
        reruns = [outcome(mesh_id(f"{run}-{i}"), issued.account_id, 1 + i % 6, datetime.now(timezone.utc), i=i + 1, price=PRICE,
                          fee=FEE) for i in range(50)]
        for o in reruns:
            await again.publish(o, topics.SESSIONS.name, key=o.request_id.encode())
        session_records = await read_all(env.bootstrap, topics.SESSIONS.name)
        for _ in range(2):
            for value in session_records:
                await again.publish(value, topics.SESSIONS.name)
    finally:
        await again.stop()
    await caught_up(env)
    assert len(generator.calls) == 50  # each request really ran once
    assert await money_state(env.pool, run) == first
    assert not [d for d in map(DeadLetter.model_validate_json, await read_all(env.bootstrap, topics.DEAD_LETTER.name))
                if d.consumer_group != topics.GROUP_INFERENCE and (d.key or "").startswith(f"{run}-")]

    sessions = {r["request_id"]: r for r in await env.pool.fetch(
        "SELECT * FROM far_mesh_sessions WHERE request_id LIKE $1", f"{run}-%")}
    assert len(sessions) == 50
    for i, (status, events) in enumerate(results):
        s = sessions[mesh_id(f"{run}-{i}")]
        delivered = sum(name == "token" for name, _ in events)
        assert s["completion_tokens"] == delivered and s["cost"] == delivered * PRICE  # only delivered tokens
        assert s["platform_fee"] == money.to_far(money.to_base_units(s["cost"]) * 5 // 100)
        assert s["status"] == ("failed" if i % 10 == 3 else "completed")
        assert s["account_id"] == issued.account_id
    spent = sum(s["cost"] for s in sessions.values())
    have, reserved = await accounts.balance(env.pool, issued.account_id)
    assert (money.to_far(have), reserved) == (Decimal(1) - spent, 0)  # every reservation closed
    statuses = {r["status"]: r["n"] for r in await env.pool.fetch(
        "SELECT status, count(*) AS n FROM far_reservations WHERE request_id LIKE $1 GROUP BY status", f"{run}-%")}
    assert statuses == {"settled": 45, "released": 5}
    fees = await env.pool.fetchval("SELECT balance FROM far_account_balances WHERE kind = 'platform'")
    assert fees == sum(s["platform_fee"] for s in sessions.values()) > 0
    # The payments group chose the same outcome as the ledger for every request.
    assert await env.pool.fetchval(
        "SELECT count(*) FROM far_payment_sessions p JOIN far_mesh_sessions s USING (request_id) "
        "WHERE p.event_id <> s.event_id") == 0

    assert await audit_breaks(env.pool) == []
    result = await farmesh("ledger", "audit", "--database-url", env.database_url)
    assert result.exit_code == 0, result.output
    assert "audit: 0 break(s)" in result.output


async def money_state(pool, run: str) -> tuple:
    """Everything the money tables hold about this run's sessions (compared before/after redelivery)."""
    entries = await pool.fetch(
        "SELECT e.txn_id, e.account_id, e.side, e.amount, e.contribution_id FROM far_ledger_entries e "
        "JOIN far_ledger_transactions t USING (txn_id) WHERE t.request_id LIKE $1 ORDER BY e.id", f"{run}-%")
    reservations = await pool.fetch("SELECT * FROM far_reservations WHERE request_id LIKE $1 ORDER BY request_id", f"{run}-%")
    items = await pool.fetch("SELECT * FROM far_payment_items WHERE request_id LIKE $1 ORDER BY contribution_id", f"{run}-%")
    balances = await pool.fetch("SELECT * FROM far_account_balances ORDER BY account_id")
    return [dict(r) for r in entries], [dict(r) for r in reservations], [dict(r) for r in items], [dict(r) for r in balances]


async def test_outcomes_whose_money_does_not_add_up_are_dead_lettered_and_post_nothing(env, mesh):
    from datetime import datetime, timezone

    async with env.pool.acquire() as conn:
        issued = await accounts.create_client(conn, "bad-money", money.to_base_units(Decimal(1)))
    now = datetime.now(timezone.utc)
    run = uuid.uuid4().hex[:6]
    good = outcome(f"{run}-good", issued.account_id, 4, now)
    padded = outcome(f"{run}-padded", issued.account_id, 4, now)
    padded = padded.model_copy(update={"cost_far": padded.cost_far + Decimal("0.0001")})  # charges a token too many
    stranger = outcome(f"{run}-stranger", uuid.uuid4(), 4, now)  # no such client account
    for o in (good, padded):
        await reserve_for(env.pool, issued.key, o)
    publisher = await producer(env.bootstrap)
    try:
        for o in (padded, stranger, good):
            await publisher.publish(o, topics.SESSIONS.name, key=o.request_id.encode())
    finally:
        await publisher.stop()
    for group in (topics.GROUP_LEDGER, topics.GROUP_PAYMENTS):
        await wait_caught_up(env.bootstrap, group, topics.SESSIONS.name)
    recorded = {r["request_id"] for r in await env.pool.fetch(
        "SELECT request_id FROM far_mesh_sessions WHERE request_id LIKE $1", f"{run}-%")}
    assert recorded == {good.request_id}
    assert await env.pool.fetchval("SELECT count(*) FROM far_payment_items WHERE request_id LIKE $1", f"{run}-%") == 2
    letters = [DeadLetter.model_validate_json(v) for v in await read_all(env.bootstrap, topics.DEAD_LETTER.name)]
    mine = {(d.consumer_group, d.key) for d in letters if d.key and d.key.startswith(run)}
    assert mine == {(g, f"{run}-{k}") for g in ("ledger", "payments") for k in ("padded", "stranger")}
    # The reservation of the refused outcome stays open (held, never charged); release it like an operator would.
    released = await farmesh("keys", "release", padded.request_id, "--database-url", env.database_url)
    assert released.exit_code == 0 and "released" in released.output
    assert await accounts.balance(env.pool, issued.account_id) == (money.to_base_units(Decimal(1)) - 4 * 10**14, 0)
    assert await audit_breaks(env.pool) == []
