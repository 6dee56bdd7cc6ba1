"""SmolLM2-135M-Instruct, the real model, through a swarm of two nodes (blocks 0:15 and 15:30).

Where meaning matters: the swarm must compute exactly what plain transformers computes on the imported
checkpoint (greedy and seeded sampling, raw text and chat), the chat answers must be right, generation ends
at the model's end-of-turn token without showing it, and the official `openai` client gets a streamed answer
whose usage, cost and per-node contributions (over all 30 blocks) add up exactly.
"""
from __future__ import annotations

from decimal import Decimal

import openai
import pytest

from consumers.inference.generation import load_client
from farmesh.models import smollm2
from producers.gateway.chat import ChatMessage, render
from schemas import topics
from schemas.events import Sampling
from tests.support.kafka import wait_caught_up
from tests.support.money import audit_breaks
from tests.support.openai_mesh import openai_mesh
from tests.support.reference import greedy_ids, sampled_ids
from tests.support.swarm import running_swarm

pytestmark = pytest.mark.e2e
MODEL = smollm2.MODEL_ID
BLOCKS = ("0:15", "15:30")
MAX_NEW_TOKENS = 24
PRICE = Decimal("0.00025")  # FARMESH_MODEL_PRICES for this model (the default price is 0.0001)


@pytest.fixture(scope="module")
def real_swarm(smollm2_dir, tmp_path_factory, kafka_bootstrap):
    with running_swarm(smollm2_dir, tmp_path_factory.mktemp("real-swarm"), kafka_bootstrap, dht_prefix=MODEL,
                       node_blocks=BLOCKS) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def client(real_swarm):
    with load_client(real_swarm.model_dir, real_swarm.initial_peers, MODEL, request_timeout=30,
                     max_retries=2) as c:
        yield c


def chat(client, question: str) -> str:
    return render([ChatMessage(role="user", content=question)], client.tokenizer)


def test_greedy_through_the_swarm_equals_plain_transformers(client, smollm2_dir) -> None:
    prompts = ["The capital of France is", "def fibonacci(n):", chat(client, "What is the capital of France?"),
               chat(client, "Name one colour of the rainbow.")]
    for prompt in prompts:
        result = client.generate_stream(prompt, MAX_NEW_TOKENS, lambda *_: None)
        assert result.token_ids == greedy_ids(smollm2_dir, prompt, MAX_NEW_TOKENS), prompt
    answer = client.generate_stream(prompts[2], MAX_NEW_TOKENS, lambda *_: None)
    print(f"\n{answer.text!r} ({answer.finish_reason})")
    assert "Paris" in answer.text
    # Ended by the model's end-of-turn token (<|im_end|>, its eos): counted and delivered, never shown.
    assert answer.finish_reason == "stop" and answer.token_ids[-1] == client.tokenizer.eos_token_id == 2
    assert "<|im_end|>" not in answer.text and answer.text == answer.text.strip()


def test_seeded_sampling_through_the_swarm_equals_the_reference(client, smollm2_dir) -> None:
    sampling = Sampling(temperature=0.8, top_p=0.95, top_k=40, seed=11)
    prompt = chat(client, "Write a short sentence about the sea.")
    result = client.generate_stream(prompt, MAX_NEW_TOKENS, lambda *_: None, sampling=sampling, seed_key="real-1")
    assert result.token_ids == sampled_ids(smollm2_dir, prompt, MAX_NEW_TOKENS, sampling, "real-1")
    assert result.token_ids != greedy_ids(smollm2_dir, prompt, MAX_NEW_TOKENS)  # really sampled


async def test_the_openai_client_streams_a_chat_answer_with_exact_usage_cost_and_contributions(
        real_swarm, kafka_bootstrap, database_url, db_pool) -> None:
    async with openai_mesh(real_swarm, kafka_bootstrap, database_url, db_pool, name="e2e-real", workers=1,
                           gateways=1, concurrency=1, model_prices={MODEL: PRICE}) as (urls, issued, _):
        api = openai.AsyncOpenAI(base_url=f"{urls[0]}/v1", api_key=issued.key, max_retries=0, timeout=300)
        assert [m.id for m in (await api.models.list()).data] == [MODEL]
        stream = await api.chat.completions.create(
            model=MODEL, max_tokens=40, temperature=0, stream=True, stream_options={"include_usage": True},
            extra_headers={"Idempotency-Key": "real-chat-1"},
            messages=[{"role": "system", "content": "You are a concise assistant."},
                      {"role": "user", "content": "What is the capital of France?"}])
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        print(f"\n{text!r}")
        assert "Paris" in text and "<|im_end|>" not in text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        usage = chunks[-1].usage
        await wait_caught_up(kafka_bootstrap, topics.GROUP_LEDGER, topics.SESSIONS.name, timeout=60)
    from farmesh.billing.accounts import mesh_request_id

    request_id = mesh_request_id(issued.account_id, "real-chat-1")
    session = await db_pool.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = $1", request_id)
    assert (session["model"], session["status"], session["finish_reason"]) == (MODEL, "completed", "stop")
    assert (session["prompt_tokens"], session["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
    assert session["price_per_token"] == PRICE  # the model's own price, fixed when the gateway accepted it
    assert session["cost"] == usage.completion_tokens * PRICE
    rows = await db_pool.fetch("SELECT start_block, end_block, tokens_processed, earnings FROM "
                               "far_session_contributions WHERE request_id = $1 ORDER BY start_block", request_id)
    # Every one of the 30 blocks served, once, for every position: the prompt, then each token but the last.
    assert [(r["start_block"], r["end_block"]) for r in rows] == [(0, 15), (15, 30)]
    assert {r["tokens_processed"] for r in rows} == {usage.prompt_tokens + usage.completion_tokens - 1}
    assert sum(r["earnings"] for r in rows) == session["cost"]  # no platform fee configured: all to the nodes
    assert await audit_breaks(db_pool) == []
