"""The OpenAI-compatible API with the official `openai` package, on a real broker and PostgreSQL.

Two gateways and two workers (two generations each) run at once; the generator is scripted (it echoes the
prompt's words backwards, a token every few ms) so every client can check it received exactly its own tokens.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from decimal import Decimal

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry

from consumers.inference import consumer as worker
from consumers.inference.repository import PostgresReservations
from consumers.ledger import consumer as ledger
from farmesh.billing import accounts
from farmesh.kafka import messaging
from schemas import money
from consumers.inference.generation import SpanWork
from farmesh.runtime.settings import Settings
from producers.gateway.app import create_app
from producers.gateway.chat import ChatMessage, default_prompt
from schemas import topics
from tests.support.kafka import wait_caught_up
from tests.support.money import audit_breaks, money_env
from tests.support.services import serve
from tests.unit.test_worker import Result

pytestmark = pytest.mark.integration
MODEL = "tiny"
PRICE = Decimal("0.0001")


def echo_tokens(prompt: str, n: int) -> list[str]:
    return [f"{w} " for w in reversed(prompt.split())][:n]


class EchoGenerator:
    """The prompt's words backwards, one token every `delay` s; stops when on_token raises (like Petals)."""

    def __init__(self, delay: float = 0.005) -> None:
        self.delay = delay
        self.runs: list[str] = []
        self.running = self.peak = 0  # generations at once in this worker, and the most seen
        self._lock = threading.Lock()

    def generate_stream(self, prompt, max_new_tokens, on_token, sampling=None, seed_key=""):
        with self._lock:
            self.runs.append(seed_key)
            self.running += 1
            self.peak = max(self.peak, self.running)
        tokens = echo_tokens(prompt, max_new_tokens)
        emitted = 0
        try:
            for i, text in enumerate(tokens):
                on_token(i, 100 + i, text)
                emitted += 1
                time.sleep(self.delay)
        except Exception as exc:
            stopped = RuntimeError(f"generation failed after {emitted} tokens: {exc!r}")
            stopped.partial = self._result(tokens[:emitted], "error")
            raise stopped from exc
        finally:
            with self._lock:
                self.running -= 1
        return self._result(tokens, "length" if len(tokens) == max_new_tokens else "stop")

    @staticmethod
    def _result(tokens, finish):
        n = len(tokens)
        spans = [SpanWork("QmA", 0, 2, 4 + n), SpanWork("QmB", 2, 4, 4 + n)]
        return Result(5, list(range(n)), "".join(tokens), finish, spans)


@pytest.fixture(scope="module")
async def env(tmp_path_factory, postgres_admin_url):
    async with money_env(tmp_path_factory.mktemp("openai"), postgres_admin_url) as e:
        yield e


class Mesh:
    def __init__(self, env, urls, key, account_id, generators, route):
        self.env, self.urls, self.key, self.account_id = env, urls, key, account_id
        self.generators, self.route = generators, route

    def client(self, i: int = 0, key: str | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.urls[i]}/v1", api_key=key or self.key, max_retries=0, timeout=60)


async def start(env, tiny_model_dir, *, gateways=2, workers=2, concurrency=2, max_pending=64, delay=0.005):
    """Gateways, workers and the ledger on env's broker; yields a Mesh (an async context manager)."""
    import contextlib

    @contextlib.asynccontextmanager
    async def running():
        route = {"ok": True}

        async def route_check() -> bool:
            return route["ok"]

        brokers = []
        generators = [EchoGenerator(delay) for _ in range(workers)]
        for g in generators:
            b = messaging.create_broker(env.bootstrap, topics.GROUP_INFERENCE, CollectorRegistry())
            worker.register(b, g, MODEL, CollectorRegistry(), reservations=PostgresReservations(env.pool),
                            concurrency=concurrency)
            brokers.append(b)
        b = messaging.create_broker(env.bootstrap, topics.GROUP_LEDGER, CollectorRegistry())
        ledger.register(b, env.pool, CollectorRegistry())
        brokers.append(b)
        async with env.pool.acquire() as conn:
            issued = await accounts.create_client(conn, f"oa-{uuid.uuid4().hex[:8]}", money.to_base_units(Decimal(10)))
        async with contextlib.AsyncExitStack() as stack:
            for b in brokers:
                await b.start()
                stack.push_async_callback(b.stop)
            urls = []
            for i in range(gateways):
                settings = Settings(kafka_bootstrap=env.bootstrap, database_url=env.database_url, dht_prefix=MODEL,
                                    model=str(tiny_model_dir), max_new_tokens=64, gateway_id=f"gw-{i}",
                                    max_pending_requests=max_pending, retry_after=3)
                urls.append(await stack.enter_async_context(serve(create_app(settings, route_check))))
            yield Mesh(env, urls, issued.key, issued.account_id, generators, route)

    return running()


async def settled(env) -> None:
    await wait_caught_up(env.bootstrap, topics.GROUP_INFERENCE, topics.REQUESTS.name, timeout=60)
    await wait_caught_up(env.bootstrap, topics.GROUP_LEDGER, topics.SESSIONS.name, timeout=60)


async def test_the_openai_package_streams_chat_and_text_completions(env, tiny_model_dir):
    async with await start(env, tiny_model_dir, gateways=1, workers=1) as mesh:
        client = mesh.client()
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one two three four"}]
        stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True,
                                                      stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        prompt = default_prompt([ChatMessage(**m) for m in messages])
        assert prompt == "Be brief.\n\nUser: one two three four\nAssistant:"
        assert text == "".join(echo_tokens(prompt, 6))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
        assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 6
        assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")

        stream = await client.completions.create(model=MODEL, prompt="alpha beta gamma", max_tokens=5, stream=True)
        pieces = [c async for c in stream]
        assert "".join(c.choices[0].text for c in pieces) == "gamma beta alpha "
        assert pieces[-1].choices[0].finish_reason == "stop" and pieces[0].object == "text_completion"

        whole = await client.completions.create(model=MODEL, prompt="red green blue", max_tokens=2)
        assert whole.choices[0].text == "blue green " and whole.usage.completion_tokens == 2
        chat = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x y"}],
                                                    max_tokens=3)
        assert chat.choices[0].message.content == "Assistant: y x " and chat.choices[0].finish_reason == "length"

        assert [m.id for m in (await client.models.list()).data] == [MODEL]
        mesh.route["ok"] = False  # no full route through the swarm: nothing is servable end to end
        assert (await client.models.list()).data == []


async def test_errors_are_openai_error_objects(env, tiny_model_dir):
    async with await start(env, tiny_model_dir, gateways=1, workers=1) as mesh:
        client = mesh.client()
        with pytest.raises(openai.AuthenticationError) as e:
            await mesh.client(key="fmk_wrong").completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert e.value.status_code == 401 and "unknown API key" in e.value.message
        with pytest.raises(openai.NotFoundError) as e:
            await client.completions.create(model="gpt-9", prompt="hi", max_tokens=2)
        assert e.value.body["code"] == "model_not_found" and "gpt-9" in e.value.message
        for bad, param in [({"temperature": 3}, "temperature"), ({"n": 2}, "n"), ({"max_tokens": 65}, "max_tokens"),
                           ({"top_p": 0}, "top_p"), ({"stop": ["a"] * 5}, "stop"), ({"prompt": "w " * 1100}, "prompt")]:
            with pytest.raises(openai.BadRequestError) as e:
                await client.completions.create(**{"model": MODEL, "prompt": "hi", "max_tokens": 2, **bad})
            assert e.value.status_code == 400 and param in e.value.message, (bad, e.value.message)
            assert e.value.body["type"] == "invalid_request_error"
        async with httpx.AsyncClient(base_url=mesh.urls[0]) as http:
            r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": []},
                                headers={"Authorization": f"Bearer {mesh.key}"})
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        # What the mesh does not implement is refused, never ignored, and the SDK sees which parameter.
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for unsupported, param in (({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
                                    "tools"), ({"response_format": {"type": "json_object"}}, "response_format"),
                                   ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True}, "logprobs")):
            with pytest.raises(openai.BadRequestError) as e:
                await client.chat.completions.create(**chat, **unsupported)
            assert e.value.param == param and "not supported" in e.value.message, e.value.body
        with pytest.raises(openai.BadRequestError) as e:  # strict types: "2" is not a max_tokens
            await client.chat.completions.create(**{**chat, "max_tokens": 2}, extra_body={"max_tokens": "2"})
        assert e.value.body["param"] == "max_tokens"


async def test_a_repeated_idempotency_key_is_generated_and_charged_once(env, tiny_model_dir):
    async with await start(env, tiny_model_dir, gateways=2, workers=1) as mesh:
        key = f"idem-{uuid.uuid4().hex[:8]}"
        ask = dict(model=MODEL, prompt="one two three", max_tokens=3, extra_headers={"Idempotency-Key": key})
        first = await mesh.client(0).completions.create(**ask)
        again_here = await mesh.client(0).completions.create(**ask)
        again_there = await mesh.client(1).completions.create(**ask)  # the other gateway: from the ledger
        stream = await mesh.client(1).completions.create(**ask, stream=True)
        streamed = "".join([c.choices[0].text async for c in stream])
        assert first.choices[0].text == again_here.choices[0].text == again_there.choices[0].text == streamed
        assert first.id == again_there.id == f"cmpl-{key}"
        with pytest.raises(openai.UnprocessableEntityError):  # the same key for another request
            await mesh.client(0).completions.create(**{**ask, "prompt": "something else"})
        await settled(env)
        mesh_id = accounts.mesh_request_id(mesh.account_id, key)  # the key, scoped by the account
        assert sum(g.runs.count(mesh_id) for g in mesh.generators) == 1
        sessions = await env.pool.fetchval("SELECT count(*) FROM far_mesh_sessions WHERE request_id = $1", mesh_id)
        debits = await env.pool.fetchval(
            "SELECT count(*) FROM far_ledger_entries e JOIN far_ledger_transactions t USING (txn_id) "
            "WHERE t.request_id = $1 AND e.side = 'debit'", mesh_id)
        have, reserved = await accounts.balance(env.pool, mesh.account_id)
        assert (sessions, debits, reserved) == (1, 1, 0)
        assert money.to_far(have) == Decimal(10) - 3 * PRICE
        assert await audit_breaks(env.pool) == []


async def test_two_gateways_two_workers_twenty_concurrent_streams_each_get_their_own(env, tiny_model_dir):
    async with await start(env, tiny_model_dir, gateways=2, workers=2, concurrency=2, delay=0.01) as mesh:
        clients = [mesh.client(0), mesh.client(1)]

        async def one(i: int) -> tuple[str, str]:
            words = " ".join(f"w{i}-{j}" for j in range(12))
            stream = await clients[i % 2].chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": words}], max_tokens=10, stream=True)
            got = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            return got, "".join(echo_tokens(f"User: {words}\nAssistant:", 10))

        results = await asyncio.gather(*(one(i) for i in range(20)))
        assert all(got == expected for got, expected in results)
        await settled(env)
        assert all(g.runs for g in mesh.generators), "both workers ran requests"
        # Concurrent generations in one worker, never more than its concurrency (3 partitions over 4 consumers:
        # one worker may hold a single partition).
        assert max(g.peak for g in mesh.generators) == 2 and all(g.peak <= 2 for g in mesh.generators)
        assert await audit_breaks(env.pool) == []


async def test_a_full_queue_is_429_with_retry_after(env, tiny_model_dir):
    async with await start(env, tiny_model_dir, gateways=2, workers=1, concurrency=1, max_pending=2,
                           delay=0.05) as mesh:
        opened = [await mesh.client(i % 2).completions.create(model=MODEL, prompt="a " * 40, max_tokens=40,
                                                               stream=True) for i in range(2)]
        with pytest.raises(openai.RateLimitError) as e:  # two pending over both gateways: the bound
            await mesh.client(1).completions.create(model=MODEL, prompt="b", max_tokens=2)
        assert e.value.response.headers["retry-after"] == "3" and "pending" in e.value.message
        for stream in opened:
            assert len("".join([c.choices[0].text async for c in stream])) > 0
        await settled(env)
        again = await mesh.client(1).completions.create(model=MODEL, prompt="c d", max_tokens=2)
        assert again.choices[0].text == "d c "


async def test_a_request_no_worker_starts_before_its_deadline_expires_uncharged(env, tiny_model_dir):
    async with await start(env, tiny_model_dir, gateways=1, workers=1, concurrency=1, delay=0.05) as mesh:
        busy = await mesh.client().completions.create(model=MODEL, prompt="z " * 40, max_tokens=40, stream=True)
        await asyncio.sleep(0.3)  # the only generation slot is taken for ~2 s
        key = f"late-{uuid.uuid4().hex[:8]}"
        with pytest.raises(openai.APIStatusError) as e:
            await mesh.client().completions.create(model=MODEL, prompt="too late", max_tokens=5,
                                                   extra_headers={"Idempotency-Key": key, "X-Farmesh-Deadline": "0.5"})
        assert e.value.status_code == 504 and e.value.body["code"] == "expired"
        assert len("".join([c.choices[0].text async for c in busy])) > 0
        await settled(env)
        mesh_id = accounts.mesh_request_id(mesh.account_id, key)
        session = await env.pool.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = $1", mesh_id)
        reservation = await env.pool.fetchrow("SELECT * FROM far_reservations WHERE request_id = $1", mesh_id)
        assert session["status"] == "expired" and session["completion_tokens"] == 0 and session["cost"] == 0
        assert reservation["status"] == "released" and reservation["charged"] == 0
        assert all(mesh_id not in g.runs for g in mesh.generators)  # never generated
        assert await audit_breaks(env.pool) == []
