"""The Submitter's rules with in-memory ports (no database, no broker).

A request is held then published, once; a refusal (401, 402, 422, 409, 429) holds and publishes nothing; a
repeated request id with the same parameters answers with that request (its live stream, or its recorded
session), never a second hold or publish; a request the broker did not take is released (503). Request ids are
private to an account: what is held, published and streamed is the mesh's id (accounts.mesh_request_id), and
another account's identical id is another request.
The fake Accounts follows far_reserve's order of checks (migration 007): key, request id, queue, balance.
"""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from farmesh.billing import accounts, pricing
from farmesh.billing.accounts import Client, Reservation, mesh_request_id
from farmesh.runtime.settings import Settings
from producers.gateway.ports import Accounts, Publisher, Sessions
from producers.gateway.streams import ReplyStreams
from producers.gateway.submit import Ask, Finished, Live, Metrics, Refused, Submitter
from schemas import money
from schemas.events import InferenceCancelled, InferenceRequested, Sampling, StreamEnded, TokenChunk, Usage

MODEL = "tiny"
REPLY_TOPIC = "farmesh.inference.replies.test"
PRICE = money.to_base_units(Decimal("0.0001"))  # Settings' default price per token


@dataclass
class Held:
    account_id: uuid.UUID
    model: str
    amount: int
    request_hash: str | None
    deadline: Any
    status: str = "open"


@dataclass
class FakeAccounts:
    """Keys, balances and holds in memory, refusing like far_reserve."""

    clients: dict[str, Client] = field(default_factory=dict)  # by key
    balances: dict[uuid.UUID, int] = field(default_factory=dict)  # base units
    holds: dict[str, Held] = field(default_factory=dict)  # by request id
    calls: list[str] = field(default_factory=list)  # shared with the publisher: the order of side effects
    unreserved_sessions: set[str] = field(default_factory=set)  # sessions recorded with no reservation (legacy)

    def open_account(self, name: str, balance: int) -> str:
        key = f"fmk_{name}"
        self.clients[key] = Client(uuid.uuid4(), name, uuid.uuid4(), key[:12])
        self.balances[self.clients[key].account_id] = balance
        return f"Bearer {key}"

    def available(self, account_id: uuid.UUID) -> int:
        held = sum(h.amount for h in self.holds.values() if h.account_id == account_id and h.status == "open")
        return self.balances[account_id] - held

    async def authenticate(self, authorization: str | None) -> Client:
        key = accounts.bearer_key(authorization)
        if key is None or key not in self.clients:
            raise accounts.Unauthorized("unknown API key")
        return self.clients[key]

    async def reserve(self, authorization: str | None, reservation: Reservation) -> Client:
        client = await self.authenticate(authorization)
        if (held := self.holds.get(reservation.request_id)) is not None:
            if held.account_id != client.account_id:
                raise accounts.DuplicateRequest(f"request_id {reservation.request_id!r} was already used")
            if held.request_hash != reservation.request_hash:
                shown = accounts.client_request_id(reservation.request_id)  # as reserve(): the client's own id
                raise accounts.ParametersDiffer(f"request_id {shown!r} was already used for a "
                                                "request with other parameters; use a new request_id")
            raise accounts.AlreadyRequested(accounts.Existing(reservation.request_id, held.status, held.deadline))
        if reservation.request_id in self.unreserved_sessions:
            raise accounts.DuplicateRequest(f"request_id {reservation.request_id!r} names a session recorded "
                                            "without a reservation")
        pending = sum(1 for h in self.holds.values() if h.model == reservation.model and h.status == "open")
        if reservation.max_pending is not None and pending >= reservation.max_pending:
            raise accounts.QueueFull(reservation.model, pending, reservation.retry_after)
        amount = pricing.reservation_amount(reservation.max_tokens, money.to_base_units(reservation.price))
        if (have := self.available(client.account_id)) < amount:
            raise accounts.InsufficientFunds(amount, max(have, 0))
        self.holds[reservation.request_id] = Held(client.account_id, reservation.model, amount,
                                                  reservation.request_hash, reservation.deadline)
        self.calls.append(f"reserve {reservation.request_id}")
        return client

    async def release(self, request_id: str, reason: str) -> None:
        self.holds[request_id].status = "released"
        self.calls.append(f"release {request_id}")


@dataclass
class FakeSessions:
    recorded: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def fetch(self, request_id: str) -> dict[str, Any] | None:
        return self.recorded.get(request_id)


@dataclass
class FakePublisher:
    calls: list[str]
    requests: list[InferenceRequested] = field(default_factory=list)
    cancels: list[InferenceCancelled] = field(default_factory=list)
    down: bool = False

    async def request(self, event: InferenceRequested) -> None:
        if self.down:
            raise ConnectionError("broker unreachable")
        self.requests.append(event)
        self.calls.append(f"publish {event.request_id}")

    async def cancel(self, event: InferenceCancelled) -> None:
        self.cancels.append(event)


class CharTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


@dataclass
class Gateway:
    submitter: Submitter
    accounts: FakeAccounts
    sessions: FakeSessions
    publisher: FakePublisher
    streams: ReplyStreams
    registry: CollectorRegistry

    def count(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels or None) or 0.0


@pytest.fixture
def gateway() -> Gateway:
    settings = Settings(dht_prefix=MODEL, max_new_tokens=200, max_pending_requests=2, retry_after=7)
    registry = CollectorRegistry()
    fake_accounts, sessions, streams = FakeAccounts(), FakeSessions(), ReplyStreams()
    publisher = FakePublisher(fake_accounts.calls)
    ports: tuple[Accounts, Sessions, Publisher] = (fake_accounts, sessions, publisher)  # the fakes fit the ports
    submitter = Submitter(settings, *ports, streams, Metrics(registry), CharTokenizer(), REPLY_TOPIC,
                          stream_timeout=0.5)
    return Gateway(submitter, fake_accounts, sessions, publisher, streams, registry)


def ask(request_id: str, prompt: str = "hi", max_tokens: int = 3, **sampling: Any) -> Ask:
    return Ask(request_id, MODEL, prompt, max_tokens, Sampling(**sampling))


def mesh(gateway: Gateway, name: str, request_id: str) -> str:
    """The mesh's id of `name`'s request `request_id` (what is held, published and streamed)."""
    return mesh_request_id(gateway.accounts.clients[f"fmk_{name}"].account_id, request_id)


async def test_a_request_is_reserved_then_published_once(gateway):
    key = gateway.accounts.open_account("alice", 10 * PRICE)
    answer = await gateway.submitter.submit(ask("r1", seed=3), key)
    r1 = mesh(gateway, "alice", "r1")
    assert r1 == f"r1.{gateway.accounts.clients['fmk_alice'].account_id.hex}"
    assert isinstance(answer, Live) and answer.request_id == "r1" and gateway.streams.get(r1) is answer.stream
    assert gateway.accounts.calls == [f"reserve {r1}", f"publish {r1}"]
    [published] = gateway.publisher.requests
    alice = gateway.accounts.clients["fmk_alice"]
    assert (published.request_id, published.model, published.prompt, published.max_tokens) == (r1, MODEL, "hi", 3)
    assert published.account_id == alice.account_id and published.reply_topic == REPLY_TOPIC
    assert published.price_per_token == Decimal("0.0001") and published.sampling.seed == 3
    assert gateway.accounts.holds[r1].amount == 3 * PRICE and gateway.accounts.available(alice.account_id) == 7 * PRICE
    assert gateway.count("farmesh_gateway_requests_total", outcome="accepted") == 1


async def test_insufficient_balance_is_402_and_publishes_nothing(gateway):
    key = gateway.accounts.open_account("poor", 2 * PRICE)
    with pytest.raises(Refused) as refused:
        await gateway.submitter.submit(ask("r1"), key)
    assert (refused.value.status, refused.value.code, refused.value.native) == \
        (402, "insufficient_quota", "insufficient_funds")
    assert refused.value.extra == {"required_far": "0.0003", "available_far": "0.0002"}
    assert gateway.publisher.requests == [] and gateway.accounts.holds == {}
    assert gateway.streams.get(mesh(gateway, "poor", "r1")) is None
    assert gateway.count("farmesh_gateway_payment_required_total") == 1
    assert gateway.count("farmesh_gateway_requests_total", outcome="insufficient_funds") == 1


async def test_an_unknown_key_is_401_and_publishes_nothing(gateway):
    for authorization in (None, "Bearer fmk_nobody", "Basic fmk_alice"):
        with pytest.raises(Refused) as refused:
            await gateway.submitter.submit(ask("r1"), authorization)
        assert refused.value.status == 401 and refused.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert gateway.publisher.requests == [] and gateway.accounts.holds == {}
    assert gateway.count("farmesh_gateway_unauthorized_total") == 3


async def test_a_repeated_request_answers_with_the_same_request(gateway):
    key = gateway.accounts.open_account("alice", 10 * PRICE)
    first = await gateway.submitter.submit(ask("r1"), key)
    again = await gateway.submitter.submit(ask("r1"), key)  # still streaming here: the same live stream
    r1 = mesh(gateway, "alice", "r1")
    assert isinstance(again, Live) and again.stream is first.stream and again.request_id == "r1"
    assert gateway.accounts.calls == [f"reserve {r1}", f"publish {r1}"] and len(gateway.publisher.requests) == 1
    assert gateway.count("farmesh_gateway_requests_total", outcome="repeated") == 1

    # Once the stream is gone, the recorded session answers (the ledger's record, never a second run).
    gateway.streams.close(r1)
    gateway.sessions.recorded[r1] = {"status": "completed", "finish_reason": "length", "completion": "Hey",
                                       "prompt_tokens": 2, "completion_tokens": 3, "cost": Decimal("0.0003"),
                                       "error": None}
    later = await gateway.submitter.submit(ask("r1"), key)
    assert later == Finished("r1", "completed", "length", "Hey",  # named by the client's id
                             Usage(prompt_tokens=2, completion_tokens=3, cost_far=Decimal("0.0003")), None)
    assert gateway.accounts.calls == [f"reserve {r1}", f"publish {r1}"]
    alice = gateway.accounts.clients["fmk_alice"]
    assert gateway.accounts.available(alice.account_id) == 7 * PRICE  # held once


async def test_a_repeated_id_with_other_parameters_is_refused(gateway):
    key = gateway.accounts.open_account("alice", 10 * PRICE)
    await gateway.submitter.submit(ask("r1"), key)
    for other in (ask("r1", prompt="hello"), ask("r1", max_tokens=4), ask("r1", temperature=0.5, seed=1)):
        with pytest.raises(Refused) as refused:
            await gateway.submitter.submit(other, key)
        assert (refused.value.status, refused.value.code, refused.value.native, refused.value.param) == \
            (422, "idempotency_key_reused", "parameters_differ", "request_id")
        assert "'r1'" in refused.value.message and gateway.accounts.clients["fmk_alice"].account_id.hex \
            not in refused.value.message  # the client's id, not the mesh's
    r1 = mesh(gateway, "alice", "r1")
    assert gateway.accounts.calls == [f"reserve {r1}", f"publish {r1}"]


async def test_another_accounts_id_is_another_request(gateway):
    """Request ids are private: bob's "r1" neither sees nor is blocked by alice's, whoever comes first."""
    alice, bob = gateway.accounts.open_account("alice", 10 * PRICE), gateway.accounts.open_account("bob", 10 * PRICE)
    first = await gateway.submitter.submit(ask("r1"), bob)
    second = await gateway.submitter.submit(ask("r1", prompt="other"), alice)  # other parameters: still its own
    assert isinstance(first, Live) and isinstance(second, Live) and first.stream is not second.stream
    assert first.request_id == second.request_id == "r1"
    a1, b1 = mesh(gateway, "alice", "r1"), mesh(gateway, "bob", "r1")
    assert a1 != b1 and gateway.accounts.calls == [f"reserve {b1}", f"publish {b1}", f"reserve {a1}", f"publish {a1}"]
    assert [e.request_id for e in gateway.publisher.requests] == [b1, a1]
    assert gateway.accounts.holds[a1].account_id == gateway.accounts.clients["fmk_alice"].account_id
    assert gateway.accounts.holds[b1].account_id == gateway.accounts.clients["fmk_bob"].account_id
    await gateway.submitter.drain()


async def test_a_session_recorded_without_a_reservation_is_a_clear_409(gateway):
    key = gateway.accounts.open_account("alice", 10 * PRICE)
    gateway.accounts.unreserved_sessions.add(mesh(gateway, "alice", "old"))
    with pytest.raises(Refused) as refused:
        await gateway.submitter.submit(ask("old"), key)
    assert (refused.value.status, refused.value.native, refused.value.param) == \
        (409, "request_id_conflict", "request_id")
    assert gateway.accounts.calls == [] and gateway.publisher.requests == []


async def test_a_full_queue_is_429_with_retry_after(gateway):
    key = gateway.accounts.open_account("alice", 100 * PRICE)
    for rid in ("r1", "r2"):  # max_pending_requests = 2
        await gateway.submitter.submit(ask(rid), key)
    with pytest.raises(Refused) as refused:
        await gateway.submitter.submit(ask("r3"), key)
    assert (refused.value.status, refused.value.code, refused.value.native) == \
        (429, "rate_limit_exceeded", "rate_limited")
    assert refused.value.headers == {"Retry-After": "7"}
    assert [e.request_id for e in gateway.publisher.requests] == [mesh(gateway, "alice", r) for r in ("r1", "r2")]
    assert mesh(gateway, "alice", "r3") not in gateway.accounts.holds
    assert gateway.count("farmesh_gateway_rate_limited_total") == 1


async def test_checks_refuse_before_anything_is_held(gateway):
    key = gateway.accounts.open_account("alice", 10_000 * PRICE)
    cases = [(Ask("r1", "other-model", "hi", 3), 404, "model"), (ask("r1", max_tokens=201), 400, "max_tokens"),
             (ask("r1", prompt="x" * 1025), 400, "prompt"),
             (Ask("r1", MODEL, "hi", 3, deadline_seconds=3601), 400, "deadline")]
    for bad, status, param in cases:
        with pytest.raises(Refused) as refused:
            await gateway.submitter.submit(bad, key)
        assert (refused.value.status, refused.value.param) == (status, param)
    assert gateway.accounts.calls == [] and gateway.count("farmesh_gateway_requests_total", outcome="invalid") == 4


async def test_a_request_the_broker_did_not_take_is_released(gateway):
    key = gateway.accounts.open_account("alice", 10 * PRICE)
    gateway.publisher.down = True
    with pytest.raises(Refused) as refused:
        await gateway.submitter.submit(ask("r1"), key)
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
    r1 = mesh(gateway, "alice", "r1")
    assert gateway.accounts.calls == [f"reserve {r1}", f"release {r1}"] and gateway.streams.get(r1) is None
    # Its id is spent: a retry is told so instead of waiting for a result that never comes.
    with pytest.raises(Refused) as refused:
        await gateway.submitter.submit(ask("r1"), key)
    assert (refused.value.status, refused.value.code) == (409, "request_not_queued")


async def test_a_reader_that_leaves_early_cancels_once_and_a_finished_one_does_not(gateway):
    key = gateway.accounts.open_account("alice", 10 * PRICE)
    live = await gateway.submitter.submit(ask("r1"), key)
    r1, r2 = mesh(gateway, "alice", "r1"), mesh(gateway, "alice", "r2")
    gateway.streams.deliver(TokenChunk(request_id=r1, index=0, token_id=1, text="a"))
    reader = gateway.submitter.follow(live)
    assert isinstance(await reader.__anext__(), TokenChunk)
    await reader.aclose()  # the client went away
    await gateway.submitter.drain()
    assert [(c.request_id, c.reason) for c in gateway.publisher.cancels] == [(r1, "the client disconnected")]
    assert gateway.streams.get(r1) is None

    done = await gateway.submitter.submit(ask("r2"), key)
    gateway.streams.deliver(TokenChunk(request_id=r2, index=0, token_id=1, text="a"))
    gateway.streams.deliver(StreamEnded(request_id=r2, status="completed", finish_reason="length",
                                        usage=Usage(prompt_tokens=2, completion_tokens=1, cost_far=Decimal("0.0001"))))
    assert [type(e).__name__ for e in [e async for e in gateway.submitter.follow(done)]] == \
        ["TokenChunk", "StreamEnded"]
    await asyncio.sleep(0)
    await gateway.submitter.drain()
    assert len(gateway.publisher.cancels) == 1  # only r1's
    assert gateway.count("farmesh_gateway_time_to_first_token_seconds_count") == 2


class RecordingTokenizer(CharTokenizer):
    """Records the thread each prompt is tokenized on."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def encode(self, text: str) -> list[int]:
        import threading

        self.threads.append(threading.current_thread().name)
        return super().encode(text)


async def test_the_key_is_checked_before_any_rendering_or_tokenization(gateway):
    tokenizer = RecordingTokenizer()
    gateway.submitter.tokenizer = tokenizer
    rendered: list[str] = []

    def render() -> str:  # what a chat request hands over: rendered only for a known key
        import threading

        rendered.append(threading.current_thread().name)
        return "User: hi\nAssistant:"

    for authorization in (None, "Bearer fmk_nobody"):
        with pytest.raises(Refused) as refused:
            await gateway.submitter.submit(Ask("r1", MODEL, render, 3), authorization)
        assert refused.value.status == 401
    assert rendered == [] and tokenizer.threads == [] and gateway.accounts.calls == []

    key = gateway.accounts.open_account("alice", 10 * PRICE)
    answer = await gateway.submitter.submit(Ask("r1", MODEL, render, 3), key)
    assert isinstance(answer, Live) and gateway.publisher.requests[0].prompt == "User: hi\nAssistant:"
    # Both ran on the gateway's prompt pool, off the event loop's thread.
    assert len(rendered) == len(tokenizer.threads) == 1
    assert all(name.startswith("farmesh-prompts") for name in rendered + tokenizer.threads)
    # The fingerprint is the rendered prompt's: the same chat repeated is the same request.
    again = await gateway.submitter.submit(Ask("r1", MODEL, "User: hi\nAssistant:", 3), key)
    r1 = mesh(gateway, "alice", "r1")
    assert again.stream is answer.stream and gateway.accounts.calls == [f"reserve {r1}", f"publish {r1}"]
    await gateway.submitter.drain()


async def test_a_prompt_no_event_could_carry_is_refused_before_anything_is_held(gateway):
    key = gateway.accounts.open_account("alice", 10 * PRICE)
    gateway.submitter.settings = gateway.submitter.settings.model_copy(update={"max_prompt_tokens": 10**6})

    def refuse() -> str:
        raise Refused(400, "invalid_value", "the chat template refused the messages", param="messages")

    cases = [(Ask("r1", MODEL, lambda: "x" * 100_001, 3), "context_length_exceeded", "prompt"),
             (Ask("r1", MODEL, lambda: "", 3), "invalid_value", "prompt"),
             (Ask("r1", MODEL, refuse, 3), "invalid_value", "messages"),
             (Ask("r1", MODEL, "hi", 3, deadline_seconds=float("nan")), "invalid_value", "deadline")]
    for bad, code, param in cases:
        with pytest.raises(Refused) as refused:
            await gateway.submitter.submit(bad, key)
        assert (refused.value.status, refused.value.code, refused.value.param) == (400, code, param)
    assert gateway.accounts.calls == [] and gateway.publisher.requests == []
    assert gateway.count("farmesh_gateway_requests_total", outcome="invalid") == 4
    await gateway.submitter.drain()


def test_mesh_request_ids_are_scoped_by_account_and_invertible():
    alice, bob = uuid.uuid4(), uuid.uuid4()
    assert mesh_request_id(alice, "r1") == mesh_request_id(alice, "r1") == f"r1.{alice.hex}"  # every gateway agrees
    assert mesh_request_id(alice, "r1") != mesh_request_id(bob, "r1")
    # One-to-one whatever the client's id holds: an id that looks like another account's mesh id stays apart.
    lookalike = mesh_request_id(alice, f"r1.{bob.hex}")
    assert lookalike != mesh_request_id(bob, "r1") and lookalike.endswith(alice.hex)
    for client_id in ("r1", f"r1.{bob.hex}", "a", "x" * 128):
        assert accounts.client_request_id(mesh_request_id(alice, client_id)) == client_id
    assert accounts.client_request_id("legacy-id") == "legacy-id"  # unscoped: its own
