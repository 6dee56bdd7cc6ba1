"""Gateway -> Kafka -> worker (fake generator) -> Kafka -> SSE, and the ledger behind it."""
from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import httpx
import pytest

from consumers.inference import consumer as worker
from consumers.inference.repository import PostgresReservations
from consumers.ledger import consumer as ledger
from farmesh.billing import accounts
from schemas import money
from farmesh.runtime.settings import Settings
from producers.gateway.app import create_app
from schemas import topics
from tests.support.consumers import running
from tests.support.services import serve
from tests.support.sse import read_events
from tests.unit.test_worker import FakeGenerator

pytestmark = pytest.mark.integration
MODEL = "tiny"


@pytest.fixture
async def mesh(kafka_bootstrap, database_url, db_pool, tiny_model_dir):
    settings = Settings(kafka_bootstrap=kafka_bootstrap, database_url=database_url, dht_prefix=MODEL, max_new_tokens=200,
                        model=str(tiny_model_dir))
    route = {"ok": True}

    async def route_check() -> bool:
        return route["ok"]

    groups = {
        topics.GROUP_INFERENCE: lambda b, r: worker.register(b, FakeGenerator(), MODEL, r, reservations=PostgresReservations(db_pool)),
        topics.GROUP_LEDGER: lambda b, r: ledger.register(b, db_pool, r),
    }
    async with db_pool.acquire() as conn:  # a client account with credit; every request authenticates
        issued = await accounts.create_client(conn, f"gateway-{uuid.uuid4().hex[:8]}", money.to_base_units(Decimal(1)))
    async with running(kafka_bootstrap, groups), serve(create_app(settings, route_check)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30,
                                     headers={"Authorization": f"Bearer {issued.key}"}) as client:
            yield client, route


async def generate(client, body):
    async with client.stream("POST", "/api/inference/generate", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return response.status_code, response.json()
        return 200, await read_events(response)


async def test_plan_request_streams_tokens_and_is_recorded(mesh):
    client, _ = mesh
    rid = f"test-{uuid.uuid4().hex[:8]}"
    status, events = await generate(client, {"prompt": "Hello, how are you?", "max_tokens": 100, "request_id": rid})
    assert status == 200
    assert [e for e, _ in events] == ["token", "token", "token", "done"]
    assert "".join(d["text"] for e, d in events if e == "token") == "Hello!"
    done = events[-1][1]
    assert done["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "cost_far": "0.0003"}
    for _ in range(100):
        r = await client.get(f"/api/sessions/{rid}")
        if r.status_code == 200:
            break
        await asyncio.sleep(0.1)
    session = r.json()
    assert session["status"] == "completed" and session["completion"] == "Hello!"
    assert len(session["contributions"]) == 2
    assert sum(Decimal(c["earnings"]) for c in session["contributions"]) == Decimal("0.0003")
    # the same request again answers with the recorded result: never generated or charged twice
    status, again = await generate(client, {"prompt": "Hello, how are you?", "max_tokens": 100, "request_id": rid})
    assert status == 200 and [e for e, _ in again] == ["token", "done"]
    assert again[0][1]["text"] == "Hello!" and again[0][1]["replayed"] is True
    assert again[-1][1]["usage"] == done["usage"]
    # the same id for another request is refused with a clear message
    status, body = await generate(client, {"prompt": "Hello", "max_tokens": 3, "request_id": rid})
    assert status == 422 and body["error"] == "parameters_differ" and rid in body["detail"]
    # time to first token was observed once: for the generated request, not for its replay
    metrics = (await client.get("/metrics/")).text
    assert "farmesh_gateway_time_to_first_token_seconds_count 1.0" in metrics


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": "", "max_tokens": 3}, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 201}, "at most 200"),
    ({"prompt": "hi", "max_tokens": 3, "request_id": "bad id!"}, "request_id"),
    ({"prompt": "hi", "max_tokens": 3, "temperature": 2.5}, "temperature"),
    ({"prompt": "hi", "max_tokens": 3, "model": "nope"}, "nope"),
    ({"prompt": "hi " * 1100, "max_tokens": 3}, "tokens"),
])
async def test_bad_input_is_a_clear_4xx(mesh, body, fragment):
    client, _ = mesh
    r = await client.post("/api/inference/generate", json=body)
    assert r.status_code == (404 if "model" in body else 422) and fragment in r.text


async def test_unknown_session_is_404(mesh):
    client, _ = mesh
    r = await client.get("/api/sessions/nope")
    assert r.status_code == 404 and "nope" in r.json()["detail"]


async def test_health_needs_a_full_route(mesh):
    client, route = mesh
    r = await client.get("/health")
    assert r.status_code == 200 and r.json()["checks"] == {"broker": True, "database": True, "swarm": True}
    route["ok"] = False
    r = await client.get("/health")
    assert r.status_code == 503 and r.json()["checks"]["swarm"] is False
    metrics = (await client.get("/metrics/")).text
    assert "farmesh_gateway_requests_total" in metrics
