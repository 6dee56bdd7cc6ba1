"""The gateway's money paths: 401 and 402 charge nothing and queue nothing; a small credit runs out."""
from __future__ import annotations

import asyncio
import uuid
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
from tests.support.consumers import running
from tests.support.kafka import read_all, wait_caught_up
from tests.support.money import audit_breaks, farmesh, money_env
from tests.support.services import serve
from tests.support.sse import read_events
from tests.unit.test_worker import FakeGenerator

pytestmark = pytest.mark.integration
MODEL = "tiny"


@pytest.fixture(scope="module")
async def env(tmp_path_factory, postgres_admin_url):
    async with money_env(tmp_path_factory.mktemp("money-gateway"), postgres_admin_url) as e:
        yield e


@pytest.fixture(scope="module")
async def gateway(env, tiny_model_dir):
    settings = Settings(kafka_bootstrap=env.bootstrap, database_url=env.database_url, dht_prefix=MODEL,
                        model=str(tiny_model_dir))
    groups = {
        topics.GROUP_INFERENCE: lambda b, r: worker.register(b, FakeGenerator(), MODEL, r,  # 3 tokens a request
                                                         reservations=PostgresReservations(env.pool)),
        topics.GROUP_LEDGER: lambda b, r: ledger.register(b, env.pool, r),
        topics.GROUP_PAYMENTS: lambda b, r: payments.register(b, env.pool, r),
    }
    async with running(env.bootstrap, groups), serve(create_app(settings, lambda: asyncio.sleep(0, True))) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            yield client


async def post(client, body: dict, key: str | None) -> tuple[int, object]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with client.stream("POST", "/api/inference/generate", json=body, headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, response.json()
        return 200, await read_events(response)


async def counter(client, name: str) -> float:
    for line in (await client.get("/metrics/")).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def settled(env) -> None:
    await wait_caught_up(env.bootstrap, topics.GROUP_INFERENCE, topics.REQUESTS.name)
    for group in (topics.GROUP_LEDGER, topics.GROUP_PAYMENTS):
        await wait_caught_up(env.bootstrap, group, topics.SESSIONS.name)


async def queued(env) -> set[str]:
    from schemas.events import InferenceRequested

    return {InferenceRequested.model_validate_json(v).request_id for v in await read_all(env.bootstrap, topics.REQUESTS.name)}


async def test_a_small_credit_runs_requests_until_402(env, gateway):
    async with env.pool.acquire() as conn:  # 0.001 FAR: each request holds 3 x 0.0001 and costs 0.0003
        issued = await accounts.create_client(conn, "small", money.to_base_units(Decimal("0.001")))
    run = uuid.uuid4().hex[:6]
    statuses = []
    refused_before = await counter(gateway, "farmesh_gateway_payment_required_total")
    for i in range(5):
        status, body = await post(gateway, {"prompt": "hi", "max_tokens": 3, "request_id": f"{run}-{i}"}, issued.key)
        statuses.append(status)
        if status == 402:
            refused = body
            break
        assert body[-1][0] == "done" and body[-1][1]["usage"]["cost_far"] == "0.0003"
        await settled(env)  # the next request sees this one's debit instead of its hold
    assert statuses == [200, 200, 200, 402]
    # Each reservation names this gateway's reply topic: the only one a worker streams the request's tokens to.
    held_for = await env.pool.fetch("SELECT reply_topic FROM far_reservations WHERE account_id = $1", issued.account_id)
    assert [r["reply_topic"] for r in held_for] == [topics.reply_topic(Settings().gateway_name)] * 3
    assert await counter(gateway, "farmesh_gateway_payment_required_total") == refused_before + 1
    assert refused["error"] == "insufficient_funds"
    assert (refused["required_far"], refused["available_far"]) == ("0.0003", "0.0001")
    refused_id = accounts.mesh_request_id(issued.account_id, f"{run}-3")  # the mesh's id of the client's {run}-3
    assert refused_id not in await queued(env)  # nothing was published for the refused request
    assert await env.pool.fetchval("SELECT count(*) FROM far_reservations WHERE request_id = $1", refused_id) == 0
    have, reserved = await accounts.balance(env.pool, issued.account_id)
    assert (have, reserved) == (money.to_base_units(Decimal("0.0001")), 0)

    # Credit it, and it works again.
    result = await farmesh("keys", "credit", issued.prefix, "0.0002", "--database-url", env.database_url)
    assert result.exit_code == 0, result.output
    status, _ = await post(gateway, {"prompt": "hi", "max_tokens": 3, "request_id": f"{run}-3"}, issued.key)
    assert status == 200
    await settled(env)
    assert await accounts.balance(env.pool, issued.account_id) == (0, 0)
    assert await audit_breaks(env.pool) == []


async def test_401_for_missing_unknown_and_revoked_keys_charges_and_queues_nothing(env, gateway):
    async with env.pool.acquire() as conn:
        issued = await accounts.create_client(conn, "revoked-soon", money.to_base_units(Decimal(1)))
    before = await accounts.balance(env.pool, issued.account_id)
    refused_before = await counter(gateway, "farmesh_gateway_unauthorized_total")
    run = uuid.uuid4().hex[:6]
    cases = {"missing": None, "unknown": accounts.new_key(), "malformed": "fmk_"}
    results = {name: await post(gateway, {"prompt": "hi", "max_tokens": 3, "request_id": f"{run}-{name}"}, key)
               for name, key in cases.items()}
    async with gateway.stream("POST", "/api/inference/generate", headers={"Authorization": f"Basic {issued.key}"},
                              json={"prompt": "hi", "max_tokens": 3, "request_id": f"{run}-basic"}) as r:
        await r.aread()
        results["basic"] = (r.status_code, r.json())
        assert r.headers["www-authenticate"].startswith("Bearer")
    result = await farmesh("keys", "revoke", issued.prefix, "--database-url", env.database_url)
    assert result.exit_code == 0 and issued.prefix in result.output
    results["revoked"] = await post(gateway, {"prompt": "hi", "max_tokens": 3, "request_id": f"{run}-revoked"},
                                    issued.key)
    for name, (status, body) in results.items():
        assert status == 401 and body["error"] == "unauthorized", (name, body)
    assert "revoked" in results["revoked"][1]["detail"]
    assert not {rid for rid in await queued(env) if rid.startswith(run)}
    assert await env.pool.fetchval("SELECT count(*) FROM far_reservations WHERE request_id LIKE $1", f"{run}-%") == 0
    assert await accounts.balance(env.pool, issued.account_id) == before
    # Sessions are read with a key too, and only the key's own.
    assert (await gateway.get(f"/api/sessions/{run}-missing")).status_code == 401
    assert await counter(gateway, "farmesh_gateway_unauthorized_total") == refused_before + 6
    assert await audit_breaks(env.pool) == []


async def test_a_session_is_visible_to_its_own_key_only(env, gateway):
    async with env.pool.acquire() as conn:
        alice = await accounts.create_client(conn, "alice", money.to_base_units(Decimal(1)))
        bob = await accounts.create_client(conn, "bob", money.to_base_units(Decimal(1)))
    rid = f"alice-{uuid.uuid4().hex[:6]}"
    status, _ = await post(gateway, {"prompt": "hi", "max_tokens": 3, "request_id": rid}, alice.key)
    assert status == 200
    await settled(env)
    own = await gateway.get(f"/api/sessions/{rid}", headers={"Authorization": f"Bearer {alice.key}"})
    assert own.status_code == 200 and own.json()["cost"] == "0.0003"
    other = await gateway.get(f"/api/sessions/{rid}", headers={"Authorization": f"Bearer {bob.key}"})
    assert other.status_code == 404
    unknown = await gateway.get(f"/api/sessions/{rid}-x", headers={"Authorization": f"Bearer {alice.key}"})
    assert (other.status_code, other.json()["error"]) == (unknown.status_code, unknown.json()["error"])
    # Request ids are private to an account: Bob's use of the same id is his own request (not a 409 telling him
    # Alice's exists), charged to him only; Alice's session is untouched.
    status, body = await post(gateway, {"prompt": "hi", "max_tokens": 3, "request_id": rid}, bob.key)
    assert status == 200 and body[-1][0] == "done" and body[-1][1]["request_id"] == rid
    await settled(env)
    assert await accounts.balance(env.pool, bob.account_id) == (money.to_base_units(Decimal("0.9997")), 0)
    assert await accounts.balance(env.pool, alice.account_id) == (money.to_base_units(Decimal("0.9997")), 0)
    assert (await gateway.get(f"/api/sessions/{rid}", headers={"Authorization": f"Bearer {alice.key}"})).json() \
        == own.json()
