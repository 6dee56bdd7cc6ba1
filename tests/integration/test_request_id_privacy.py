"""Request ids are private to an account (issue 12, item 5), against the real broker and PostgreSQL.

The gateway scopes every client's request id by its account (farmesh.billing.accounts.mesh_request_id), so:
two accounts using the same id at the same time are two requests, each served, recorded and charged on its own;
another account's id is, to its caller, an id never used (404 like an unknown one, never a 409 that reveals it);
no account can claim an id before another (B first, then A: both served). Every answer names the client's own id.
The books stay exact (`farmesh ledger audit` exits 0).
"""
from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import httpx
import openai
import pytest

from consumers.inference import consumer as worker
from consumers.inference.generation import SpanWork
from consumers.inference.repository import PostgresReservations
from consumers.ledger import consumer as ledger
from consumers.payments import consumer as payments
from farmesh.billing import accounts
from farmesh.runtime.settings import Settings
from producers.gateway.app import create_app
from schemas import money, topics
from tests.support.consumers import running
from tests.support.kafka import wait_caught_up
from tests.support.money import audit_breaks, farmesh, money_env
from tests.support.services import serve
from tests.support.sse import read_events
from tests.unit.test_worker import Result

pytestmark = pytest.mark.integration
MODEL = "tiny"


class EchoWords:
    """Generates the prompt's first words back (one token each): whose prompt a completion answers shows."""

    def generate_stream(self, prompt, max_new_tokens, on_token, sampling=None, seed_key=""):
        words = [w + " " for w in prompt.split()][:max_new_tokens]
        for i, w in enumerate(words):
            on_token(i, 100 + i, w)
        n = len(words)
        return Result(5, [100 + i for i in range(n)], "".join(words),
                      "length" if n == max_new_tokens else "stop", [SpanWork("peerA", 0, 2, 4 + n),
                                                                     SpanWork("peerB", 2, 4, 4 + n)])


@pytest.fixture(scope="module")
async def env(tmp_path_factory, postgres_admin_url):
    async with money_env(tmp_path_factory.mktemp("request-ids"), postgres_admin_url) as e:
        yield e


@pytest.fixture(scope="module")
async def url(env, tiny_model_dir):
    settings = Settings(kafka_bootstrap=env.bootstrap, database_url=env.database_url, dht_prefix=MODEL,
                        model=str(tiny_model_dir), gateway_id="gw-ids")
    groups = {
        topics.GROUP_INFERENCE: lambda b, r: worker.register(b, EchoWords(), MODEL, r,
                                                         reservations=PostgresReservations(env.pool)),
        topics.GROUP_LEDGER: lambda b, r: ledger.register(b, env.pool, r),
        topics.GROUP_PAYMENTS: lambda b, r: payments.register(b, env.pool, r),
    }
    async with running(env.bootstrap, groups), serve(create_app(settings, lambda: asyncio.sleep(0, True))) as u:
        yield u


async def clients(env, *names: str) -> list[accounts.IssuedKey]:
    async with env.pool.acquire() as conn:
        return [await accounts.create_client(conn, f"{n}-{uuid.uuid4().hex[:6]}", money.SCALE) for n in names]


async def generate(url: str, key: str, request_id: str, prompt: str) -> tuple[int, object]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        async with http.stream("POST", "/api/inference/generate", headers={"Authorization": f"Bearer {key}"},
                               json={"prompt": prompt, "max_tokens": 3, "request_id": request_id}) as response:
            if response.status_code != 200:
                await response.aread()
                return response.status_code, response.json()
            return 200, await read_events(response)


async def session(url: str, key: str, request_id: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        return await http.get(f"/api/sessions/{request_id}", headers={"Authorization": f"Bearer {key}"})


async def settled(env) -> None:
    await wait_caught_up(env.bootstrap, topics.GROUP_INFERENCE, topics.REQUESTS.name, timeout=60)
    for group in (topics.GROUP_LEDGER, topics.GROUP_PAYMENTS):
        await wait_caught_up(env.bootstrap, group, topics.SESSIONS.name, timeout=60)


def text(events) -> str:
    return "".join(data["text"] for event, data in events if event == "token")


async def assert_books_exact(env) -> None:
    assert await audit_breaks(env.pool) == []
    result = await farmesh("ledger", "audit", "--database-url", env.database_url)
    assert result.exit_code == 0, result.output


async def test_two_accounts_use_the_same_id_at_once_and_each_gets_its_own_request(env, url):
    alice, bob = await clients(env, "alice", "bob")
    rid = f"same-{uuid.uuid4().hex[:6]}"
    (a_status, a_events), (b_status, b_events) = await asyncio.gather(
        generate(url, alice.key, rid, "alpha beta gamma delta"), generate(url, bob.key, rid, "one two three four"))
    assert (a_status, b_status) == (200, 200)
    assert (text(a_events), text(b_events)) == ("alpha beta gamma ", "one two three ")
    for events in (a_events, b_events):  # the client's own id, never the mesh's
        assert events[-1][0] == "done" and events[-1][1]["request_id"] == rid
    await settled(env)

    a_id, b_id = (accounts.mesh_request_id(c.account_id, rid) for c in (alice, bob))
    assert a_id == f"{rid}.{alice.account_id.hex}" and accounts.client_request_id(a_id) == rid
    rows = {r["request_id"]: r for r in await env.pool.fetch(
        "SELECT request_id, account_id, status, completion, cost FROM far_mesh_sessions WHERE request_id LIKE $1",
        f"{rid}.%")}
    assert rows.keys() == {a_id, b_id}
    assert (rows[a_id]["account_id"], rows[a_id]["completion"]) == (alice.account_id, "alpha beta gamma ")
    assert (rows[b_id]["account_id"], rows[b_id]["completion"]) == (bob.account_id, "one two three ")
    reservations = dict(await env.pool.fetch(
        "SELECT account_id, status FROM far_reservations WHERE request_id = ANY($1)", [a_id, b_id]))
    assert reservations == {alice.account_id: "settled", bob.account_id: "settled"}
    for issued, words in ((alice, "alpha beta gamma "), (bob, "one two three ")):
        assert await accounts.balance(env.pool, issued.account_id) == (money.SCALE - 3 * 10**14, 0)
        own = await session(url, issued.key, rid)
        assert own.status_code == 200
        body = own.json()
        assert (body["request_id"], body["completion"], body["cost"]) == (rid, words, "0.0003")
        assert {c["request_id"] for c in body["contributions"]} == {rid}
    await assert_books_exact(env)


async def test_another_accounts_id_is_404_exactly_like_an_unknown_one(env, url):
    alice, bob = await clients(env, "alice", "bob")
    rid = f"secret-{uuid.uuid4().hex[:6]}"
    status, _ = await generate(url, alice.key, rid, "private words here")
    assert status == 200
    await settled(env)
    assert (await session(url, alice.key, rid)).status_code == 200
    unknown_id = f"never-{uuid.uuid4().hex[:6]}"
    theirs, unknown = await session(url, bob.key, rid), await session(url, bob.key, unknown_id)
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.json() == {**unknown.json(), "detail": unknown.json()["detail"].replace(unknown_id, rid)}
    # Nor is the mesh's id of Alice's request a way in: to Bob it is one more id of his own, unknown.
    mesh_id = accounts.mesh_request_id(alice.account_id, rid)
    assert (await session(url, bob.key, mesh_id)).status_code == 404
    await assert_books_exact(env)


async def test_a_session_recorded_before_ids_were_scoped_is_shown_to_its_own_account_only(env, url):
    """Unsuffixed ids (sessions recorded before the gateway scoped ids by account): its account reads it, another
    account gets the 404 of an unknown id, and one recorded with no account at all (before accounts) is nobody's."""
    alice, bob = await clients(env, "alice", "bob")
    run = uuid.uuid4().hex[:6]
    owned, unowned = f"old-{run}", f"older-{run}"
    insert = ("INSERT INTO far_mesh_sessions (request_id, event_id, model, status, prompt_tokens, completion_tokens, "
              "completion, error, price_per_token, cost, started_at, finished_at, worker, account_id) "
              "VALUES ($1, $2, $3, 'failed', 1, 0, '', 'old', 0, 0, now(), now(), 'old-worker', $4)")
    await env.pool.execute(insert, owned, uuid.uuid4(), MODEL, alice.account_id)
    await env.pool.execute(insert, unowned, uuid.uuid4(), MODEL, None)
    try:
        mine = await session(url, alice.key, owned)
        assert mine.status_code == 200 and mine.json()["request_id"] == owned
        for key, request_id in ((bob.key, owned), (alice.key, unowned), (bob.key, unowned)):
            assert (await session(url, key, request_id)).status_code == 404
    finally:  # rows of the days before settlement postings: the audit of today's books would count them
        await env.pool.execute("DELETE FROM far_mesh_sessions WHERE request_id = ANY($1::text[])", [owned, unowned])


async def test_no_account_can_claim_an_id_before_another(env, url):
    alice, bob = await clients(env, "alice", "bob")
    rid = f"claimed-{uuid.uuid4().hex[:6]}"
    b_status, b_events = await generate(url, bob.key, rid, "squatter got here")  # Bob first
    a_status, a_events = await generate(url, alice.key, rid, "alice comes later")  # then Alice, the same id
    assert (b_status, a_status) == (200, 200)
    assert (text(b_events), text(a_events)) == ("squatter got here ", "alice comes later ")
    assert a_events[-1][1]["request_id"] == b_events[-1][1]["request_id"] == rid
    # Each account's repeat is still its own idempotent request: the same answer, not generated again.
    again_status, again = await generate(url, alice.key, rid, "alice comes later")
    assert again_status == 200 and text(again) == "alice comes later " and again[-1][1]["request_id"] == rid
    differs_status, differs = await generate(url, alice.key, rid, "something else")
    assert differs_status == 422 and differs["error"] == "parameters_differ" and rid in differs["detail"]
    assert alice.account_id.hex not in differs["detail"]  # the client's id, not the mesh's
    await settled(env)
    for issued in (alice, bob):
        assert await accounts.balance(env.pool, issued.account_id) == (money.SCALE - 3 * 10**14, 0)
    assert await env.pool.fetchval("SELECT count(*) FROM far_mesh_sessions WHERE request_id LIKE $1", f"{rid}.%") == 2
    await assert_books_exact(env)


async def test_openai_idempotency_keys_are_private_too(env, url):
    alice, bob = await clients(env, "alice", "bob")
    key = f"idem-{uuid.uuid4().hex[:6]}"

    async def complete(issued: accounts.IssuedKey, prompt: str):
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=issued.key, max_retries=0, timeout=60)
        return await client.completions.create(model=MODEL, prompt=prompt, max_tokens=2,
                                               extra_headers={"Idempotency-Key": key})

    a, b = await asyncio.gather(complete(alice, "red green blue"), complete(bob, "cats and dogs"))
    assert (a.id, b.id) == (f"cmpl-{key}", f"cmpl-{key}")  # the client's key, never the mesh's id
    assert (a.choices[0].text, b.choices[0].text) == ("red green ", "cats and ")
    again = await complete(bob, "cats and dogs")  # Bob's repeat: his own recorded answer
    assert again.id == f"cmpl-{key}" and again.choices[0].text == "cats and "
    with pytest.raises(openai.UnprocessableEntityError):  # Bob's key for another request: 422, his own conflict
        await complete(bob, "something else")
    await settled(env)
    for issued in (alice, bob):
        assert await accounts.balance(env.pool, issued.account_id) == (money.SCALE - 2 * 10**14, 0)
    await assert_books_exact(env)


async def test_operators_release_by_the_mesh_id(env, url):
    """`farmesh keys release` takes the mesh's id (what the tables and events show)."""
    (carol,) = await clients(env, "carol")
    rid = f"held-{uuid.uuid4().hex[:6]}"
    mesh_id = accounts.mesh_request_id(carol.account_id, rid)
    async with env.pool.acquire() as conn:  # a hold whose request never ran (reserved as the gateway does)
        await accounts.reserve(env.pool, f"Bearer {carol.key}", accounts.Reservation(
            mesh_id, MODEL, 3, Decimal("0.0001"), Decimal("0.05")))
        assert await accounts.reservation_status(conn, mesh_id) == "open"
    result = await farmesh("keys", "release", mesh_id, "--database-url", env.database_url)
    assert result.exit_code == 0, result.output
    assert await accounts.reservation_status(env.pool, mesh_id) == "released"
    assert await accounts.balance(env.pool, carol.account_id) == (money.SCALE, 0)
    await assert_books_exact(env)
