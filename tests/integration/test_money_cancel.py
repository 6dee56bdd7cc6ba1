"""A client that goes away mid-stream: the gateway cancels the request, the worker stops, and only the
tokens delivered until then are charged (and paid to the nodes)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from decimal import Decimal

import httpx
import pytest

from consumers.inference import consumer as worker
from consumers.inference.repository import PostgresReservations
from consumers.ledger import consumer as ledger
from farmesh.billing import accounts
from schemas import money
from consumers.inference.generation import SpanWork
from farmesh.runtime.settings import Settings
from producers.gateway.app import create_app
from schemas import topics
from tests.support.consumers import running
from tests.support.kafka import wait_caught_up
from tests.support.money import audit_breaks, money_env
from tests.support.services import serve
from tests.unit.test_worker import Result

pytestmark = pytest.mark.integration
MODEL = "tiny"
MAX_TOKENS = 400


class SlowGenerator:
    """A token every 20 ms, up to max_new_tokens; stops (like the Petals client) when on_token raises."""

    def generate_stream(self, prompt, max_new_tokens, on_token, sampling=None, seed_key=""):
        emitted = 0
        try:
            for i in range(max_new_tokens):
                on_token(i, 100 + i, "x")
                emitted += 1
                time.sleep(0.02)
        except Exception as exc:  # like consumers.inference.generation.GenerationError: the cause, and what was done
            stopped = RuntimeError(f"generation failed after {emitted} tokens: {exc!r}")
            stopped.partial = self._result(emitted)
            raise stopped from exc
        return self._result(emitted)

    @staticmethod
    def _result(n):
        spans = [SpanWork("QmA", 0, 2, 4 + n), SpanWork("QmB", 2, 4, 4 + n)]
        return Result(5, list(range(n)), "x" * n, "length", spans)


@pytest.fixture(scope="module")
async def env(tmp_path_factory, postgres_admin_url):
    async with money_env(tmp_path_factory.mktemp("money-cancel"), postgres_admin_url) as e:
        yield e


async def test_a_client_that_disconnects_pays_only_for_what_was_delivered(env, tiny_model_dir):
    settings = Settings(kafka_bootstrap=env.bootstrap, database_url=env.database_url, dht_prefix=MODEL, model=str(tiny_model_dir),
                        max_new_tokens=MAX_TOKENS)
    groups = {
        topics.GROUP_INFERENCE: lambda b, r: worker.register(b, SlowGenerator(), MODEL, r, reservations=PostgresReservations(env.pool)),
        topics.GROUP_LEDGER: lambda b, r: ledger.register(b, env.pool, r),
    }
    async with env.pool.acquire() as conn:
        issued = await accounts.create_client(conn, "leaver", money.to_base_units(Decimal(1)))
    rid = f"leave-{uuid.uuid4().hex[:6]}"
    async with running(env.bootstrap, groups), serve(create_app(settings, lambda: asyncio.sleep(0, True))) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            body = {"prompt": "tell me everything", "max_tokens": MAX_TOKENS, "request_id": rid}
            async with client.stream("POST", "/api/inference/generate", json=body,
                                     headers={"Authorization": f"Bearer {issued.key}"}) as response:
                assert response.status_code == 200
                seen = 0
                async for line in response.aiter_lines():
                    if line.startswith("data:") and "token_id" in json.loads(line[5:]):
                        seen += 1
                        if seen == 2:
                            break  # the client goes away
        await wait_caught_up(env.bootstrap, topics.GROUP_INFERENCE, topics.REQUESTS.name, timeout=60)
        await wait_caught_up(env.bootstrap, topics.GROUP_LEDGER, topics.SESSIONS.name)
    mesh_id = accounts.mesh_request_id(issued.account_id, rid)  # the client's rid, scoped by its account
    session = await env.pool.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = $1", mesh_id)
    assert session["status"] == "cancelled" and "cancelled: the client disconnected" in session["error"]
    assert 2 <= session["completion_tokens"] < MAX_TOKENS
    assert session["cost"] == session["completion_tokens"] * Decimal("0.0001")
    reservation = await env.pool.fetchrow("SELECT * FROM far_reservations WHERE request_id = $1", mesh_id)
    assert reservation["status"] == "released" and reservation["charged"] == session["cost"]
    have, reserved = await accounts.balance(env.pool, issued.account_id)
    assert money.to_far(have) == Decimal(1) - session["cost"] and reserved == 0
    assert await audit_breaks(env.pool) == []
