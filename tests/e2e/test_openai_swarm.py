"""The OpenAI API on a real Petals swarm: two gateways and two workers (three generations each) at once.

Every one of 20 concurrent chat streams must be exactly the greedy continuation of its own prompt (plain
transformers is the reference); a client that aborts its stream stops the generation within one token and
pays only for the tokens the gateway delivered.
"""
from __future__ import annotations

import asyncio
import uuid

import openai
import pytest
from transformers import AutoTokenizer

from farmesh.billing import accounts
from producers.gateway.chat import ChatMessage, default_prompt
from schemas import topics
from tests.support.kafka import wait_caught_up
from tests.support.money import audit_breaks
from tests.support.openai_mesh import openai_mesh
from tests.support.reference import greedy_ids

pytestmark = pytest.mark.e2e
MAX_TOKENS = 12
STREAMS = 20


@pytest.fixture(scope="module")
async def mesh(swarm, kafka_bootstrap, database_url, db_pool):
    async with openai_mesh(swarm, kafka_bootstrap, database_url, db_pool, name="e2e-openai") as running:
        yield running


def reference(model_dir, tokenizer, prompt: str) -> str:
    return tokenizer.decode(greedy_ids(model_dir, prompt, MAX_TOKENS), skip_special_tokens=True)


async def test_twenty_concurrent_chat_streams_over_two_gateways_each_get_their_own_greedy_text(
        swarm, mesh, kafka_bootstrap, db_pool):
    urls, issued, _ = mesh
    tokenizer = AutoTokenizer.from_pretrained(swarm.model_dir)
    tokenizer.clean_up_tokenization_spaces = False
    clients = [openai.AsyncOpenAI(base_url=f"{u}/v1", api_key=issued.key, max_retries=0, timeout=300) for u in urls]
    questions = [f"Question {i}: what comes after {i} {i + 1}?" for i in range(STREAMS)]

    async def ask(i: int) -> str:
        stream = await clients[i % 2].chat.completions.create(
            model=swarm.dht_prefix, messages=[{"role": "user", "content": questions[i]}], max_tokens=MAX_TOKENS,
            temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert chunks[-1].usage.completion_tokens == MAX_TOKENS or chunks[-2].choices[0].finish_reason == "stop"
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    got = await asyncio.gather(*(ask(i) for i in range(STREAMS)))
    expected = [reference(swarm.model_dir, tokenizer, default_prompt([ChatMessage(role="user", content=q)]))
                for q in questions]
    assert got == expected
    assert len(set(expected)) > 1  # the prompts differ enough for a mix-up to show
    await wait_caught_up(kafka_bootstrap, topics.GROUP_LEDGER, topics.SESSIONS.name, timeout=60)
    assert await audit_breaks(db_pool) == []


async def test_an_aborted_stream_stops_within_a_token_and_pays_only_what_was_delivered(
        swarm, mesh, kafka_bootstrap, db_pool):
    urls, issued, apps = mesh
    client = openai.AsyncOpenAI(base_url=f"{urls[0]}/v1", api_key=issued.key, max_retries=0, timeout=300)
    streamed = apps[0].state.submitter.metrics.tokens
    before = streamed._value.get()
    key = f"abort-{uuid.uuid4().hex[:8]}"
    mesh_id = accounts.mesh_request_id(issued.account_id, key)  # the key, scoped by the account
    stream = await client.completions.create(model=swarm.dht_prefix, prompt="Keep talking about the mesh",
                                             max_tokens=200, temperature=0, stream=True,
                                             extra_headers={"Idempotency-Key": key})
    received = 0
    async for chunk in stream:
        received += 1
        if received == 5:
            break
    await stream.close()  # the client goes away
    for _ in range(300):
        session = await db_pool.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = $1", mesh_id)
        if session is not None:
            break
        await asyncio.sleep(0.1)
    assert session is not None and session["status"] == "cancelled", session
    delivered = streamed._value.get() - before  # tokens the gateway sent this client
    assert 0 <= session["completion_tokens"] - delivered <= 1, (session["completion_tokens"], delivered)
    assert session["completion_tokens"] < 200
    assert session["cost"] == session["completion_tokens"] * session["price_per_token"]
    reservation = await db_pool.fetchrow("SELECT * FROM far_reservations WHERE request_id = $1", mesh_id)
    assert reservation["status"] == "released" and reservation["charged"] == session["cost"]
    assert await audit_breaks(db_pool) == []
