"""The inference handler on FastStream's in-memory broker, with a fake generator and an in-memory `Reservations`
port (what the gateway reserved)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from decimal import Decimal

import pytest
from faststream.kafka import KafkaBroker, TestKafkaBroker
from prometheus_client import CollectorRegistry

from consumers.inference import consumer as worker
from db.views.reservations import Reservation
from farmesh.kafka import messaging
from consumers.inference.generation import SpanWork
from schemas import topics
from schemas.events import (
    DeadLetter,
    InferenceCompleted,
    InferenceFailed,
    InferenceRequested,
    NodeContribution,
    StreamEnded,
    TokenChunk,
    reply_event_adapter,
    session_event_adapter,
)

MODEL = "tiny"
ACCOUNT = uuid.UUID("7b0e1b1e-0000-4000-8000-00000000c11e")


@dataclass
class Result:
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str
    spans: list[SpanWork]


class Partial(RuntimeError):
    def __init__(self, partial: Result) -> None:
        super().__init__("node died")
        self.partial = partial


@dataclass
class FakeGenerator:
    tokens: list[str] = field(default_factory=lambda: ["Hel", "lo", "!"])
    fail_after: int | None = None

    def generate_stream(self, prompt, max_new_tokens, on_token, sampling=None, seed_key=""):
        produced = self.tokens[:max_new_tokens]
        emitted = produced if self.fail_after is None else produced[: self.fail_after]
        for i, t in enumerate(emitted):
            on_token(i, 100 + i, t)
        n = len(emitted)
        spans = [SpanWork("peerA", 0, 2, 4 + n), SpanWork("peerB", 2, 4, 4 + n)]
        result = Result(5, [100 + i for i in range(n)], "".join(emitted), "length", spans)
        if self.fail_after is not None:
            raise Partial(result)
        return result


@dataclass
class Seen:
    """What the worker published, read off its router's declared publishers (their mocks hold each body)."""

    sessions: list
    replies: list
    dead: list[DeadLetter]

    @classmethod
    def of(cls, router: worker.InferenceRouter) -> Seen:  # under the test broker: it resets the mocks as it closes
        def bodies(publisher) -> list:
            return [c.args[0] for c in publisher.mock.call_args_list]

        return cls([session_event_adapter.validate_python(b) for b in bodies(router.outcomes)],
                   [reply_event_adapter.validate_python(b) for b in bodies(router.replies)],
                   [DeadLetter.model_validate(b) for b in bodies(router.dead_letters)])


class FakeReservations:
    """The `Reservations` port in memory: request id -> the gateway's reservation."""

    def __init__(self, *reservations: Reservation) -> None:
        self.held = {r.request_id: r for r in reservations}
        self.asked: list[str] = []

    async def reservation(self, request_id: str) -> Reservation | None:
        self.asked.append(request_id)
        return self.held.get(request_id)


def reserved(r: InferenceRequested, **kw) -> Reservation:
    """The open reservation the gateway made before publishing `r` (`kw`: what differs)."""
    terms = dict(request_id=r.request_id, account_id=r.account_id, model=r.model, max_tokens=r.max_tokens,
                 price_per_token=r.price_per_token, platform_fee_rate=r.platform_fee_rate,
                 amount=r.max_tokens * r.price_per_token, status="open", reply_topic=r.reply_topic)
    return Reservation(**{**terms, **kw})


def build(generator, *reservations: Reservation) -> tuple[KafkaBroker, worker.InferenceRouter]:
    """A worker on the in-memory broker; by default the gateway reserved exactly `request()`."""
    broker = messaging.create_broker("127.0.0.1:1", "inference", CollectorRegistry())
    port = FakeReservations(*(reservations or (reserved(request()),)))
    return broker, worker.register(broker, generator, MODEL, CollectorRegistry(), reservations=port, worker_name="w1")


def request(**kw) -> InferenceRequested:
    base = dict(request_id="r-1", model=MODEL, prompt="Hi", max_tokens=3, price_per_token=Decimal("0.0001"),
                reply_topic=topics.REPLIES.name, account_id=ACCOUNT)
    return InferenceRequested(**{**base, **kw})


async def test_streams_tokens_then_settles_exactly():
    broker, router = build(FakeGenerator())
    async with TestKafkaBroker(broker) as br:
        await br.publish(request(), topics.REQUESTS.name, key=b"r-1")
        seen = Seen.of(router)
        # Keyed by request id, each record naming its event type (a reader skips a type unparsed).
        await router.outcomes.assert_any_call(key=b"r-1", headers={topics.EVENT_TYPE_HEADER: "inference.completed"})
        await router.outcomes.assert_called_with(key=b"r-1", headers={topics.EVENT_TYPE_HEADER: "node.contribution"})
        await router.replies.assert_any_call(key=b"r-1", headers={topics.EVENT_TYPE_HEADER: "inference.token"})
        await router.replies.assert_called_with(key=b"r-1",
                                                headers={topics.EVENT_TYPE_HEADER: "inference.stream_ended"})
    chunks = [e for e in seen.replies if isinstance(e, TokenChunk)]
    assert [c.text for c in chunks] == ["Hel", "lo", "!"]
    assert isinstance(seen.replies[-1], StreamEnded)
    assert seen.replies[-1].usage.completion_tokens == 3
    outcome, *contribs = seen.sessions
    assert isinstance(outcome, InferenceCompleted)
    assert outcome.cost_far == Decimal("0.0003")
    assert outcome.completion == "Hello!"
    assert sum(c.earnings_far for c in outcome.contributions) == outcome.cost_far
    assert all(isinstance(c, NodeContribution) and c.session_event_id == outcome.event_id for c in contribs)
    assert {c.event_id for c in contribs} == {c.contribution_id for c in outcome.contributions}
    assert outcome.account_id == ACCOUNT and outcome.platform_fee_far == 0  # the ledger debits this account


async def test_platform_fee_is_taken_before_the_nodes_split():
    asked = request(platform_fee_rate=Decimal("0.1"))
    broker, router = build(FakeGenerator(), reserved(asked))
    async with TestKafkaBroker(broker) as br:
        await br.publish(asked, topics.REQUESTS.name, key=b"r-1")
        seen = Seen.of(router)
    outcome = seen.sessions[0]
    assert outcome.cost_far == Decimal("0.0003") and outcome.platform_fee_far == Decimal("0.00003")
    assert sum(c.earnings_far for c in outcome.contributions) + outcome.platform_fee_far == outcome.cost_far


async def test_failure_charges_only_delivered_tokens():
    broker, router = build(FakeGenerator(fail_after=1))
    async with TestKafkaBroker(broker) as br:
        await br.publish(request(), topics.REQUESTS.name, key=b"r-1")
        seen = Seen.of(router)
    outcome = seen.sessions[0]
    assert isinstance(outcome, InferenceFailed)
    assert outcome.completion_tokens == 1 and outcome.cost_far == Decimal("0.0001")
    assert "node died" in outcome.error
    assert seen.replies[-1].status == "failed"


async def test_wrong_model_fails_without_charge():
    asked = request(model="other")  # reserved for that model by a gateway that serves it, sent to this worker
    broker, router = build(FakeGenerator(), reserved(asked))
    async with TestKafkaBroker(broker) as br:
        await br.publish(asked, topics.REQUESTS.name, key=b"r-1")
        seen = Seen.of(router)
    outcome = seen.sessions[0]
    assert isinstance(outcome, InferenceFailed) and outcome.cost_far == 0 and outcome.contributions == []


@pytest.mark.parametrize("payload", [b"not json", b'{"request_id": "x"}'])
async def test_bad_request_goes_to_dead_letter(payload):
    broker, router = build(FakeGenerator())
    async with TestKafkaBroker(broker) as br:
        await br.publish(payload, topics.REQUESTS.name, key=b"x")
        seen = Seen.of(router)
    assert seen.sessions == [] and len(seen.dead) == 1
    assert seen.dead[0].original_topic == topics.REQUESTS.name
    assert seen.dead[0].payload == payload.decode()


async def test_a_request_cancelled_before_it_runs_is_not_generated_nor_charged():
    from schemas.events import InferenceCancelled

    generator = FakeGenerator()
    broker, router = build(generator)
    async with TestKafkaBroker(broker) as br:
        await br.publish(InferenceCancelled(request_id="r-1", reason="the client disconnected"),
                         topics.CONTROL.name, key=b"r-1")
        await br.publish(request(), topics.REQUESTS.name, key=b"r-1")
        seen = Seen.of(router)
    outcome = seen.sessions[0]
    assert isinstance(outcome, InferenceFailed) and "cancelled" in outcome.error
    assert outcome.completion_tokens == 0 and outcome.cost_far == 0
    assert [e for e in seen.replies if isinstance(e, TokenChunk)] == []
    assert outcome.reason == "cancelled" and outcome.status == "cancelled"
    assert seen.replies[-1].status == "cancelled"


async def test_a_request_picked_up_after_its_deadline_is_expired_not_run_nor_charged():
    from datetime import datetime, timedelta, timezone

    calls: list = []

    @dataclass
    class Recording(FakeGenerator):
        def generate_stream(self, *args, **kw):
            calls.append(args)
            return super().generate_stream(*args, **kw)

    late = request(deadline=datetime.now(timezone.utc) - timedelta(seconds=5))
    broker, router = build(Recording(), reserved(late))
    async with TestKafkaBroker(broker) as br:
        await br.publish(late, topics.REQUESTS.name, key=b"r-1")
        seen = Seen.of(router)
    outcome = seen.sessions[0]
    assert isinstance(outcome, InferenceFailed) and outcome.reason == "expired" and outcome.status == "expired"
    assert outcome.completion_tokens == 0 and outcome.cost_far == 0 and outcome.contributions == []
    assert calls == [] and seen.replies[-1].status == "expired"


async def test_sampling_and_the_request_id_reach_the_generator():
    from datetime import datetime, timedelta, timezone

    from schemas.events import Sampling

    got: dict = {}

    @dataclass
    class Recording(FakeGenerator):
        def generate_stream(self, prompt, max_new_tokens, on_token, sampling=None, seed_key=""):
            got.update(sampling=sampling, seed_key=seed_key)
            return super().generate_stream(prompt, max_new_tokens, on_token)

    sampling = Sampling(temperature=0.7, top_p=0.9, top_k=5, seed=11, stop=["\n"])
    soon = datetime.now(timezone.utc) + timedelta(seconds=60)
    asked = request(sampling=sampling, deadline=soon)
    broker, router = build(Recording(), reserved(asked))
    async with TestKafkaBroker(broker) as br:
        await br.publish(asked, topics.REQUESTS.name, key=b"r-1")
        seen = Seen.of(router)
    assert got == {"sampling": sampling, "seed_key": "r-1"}
    assert isinstance(seen.sessions[0], InferenceCompleted)


async def test_replies_go_to_the_reply_topic_the_request_names():
    """Each gateway reads its own reply topic: the declared `replies` publisher sends to the request's."""
    own = topics.reply_topic("gw-7")
    asked = request(reply_topic=own)
    broker, router = build(FakeGenerator(), reserved(asked))

    @broker.subscriber(own)  # the gateway gw-7
    async def gateway(body: dict) -> None: ...

    async with TestKafkaBroker(broker) as br:
        await br.publish(asked, topics.REQUESTS.name, key=b"r-1")
        got = [reply_event_adapter.validate_python(c.args[0]) for c in gateway.mock.call_args_list]
        assert not router.replies.mock.called  # nothing on the family's bare name
    assert [e.text for e in got if isinstance(e, TokenChunk)] == ["Hel", "lo", "!"]
    assert isinstance(got[-1], StreamEnded) and got[-1].status == "completed"


OTHER_ACCOUNT = uuid.UUID("7b0e1b1e-0000-4000-8000-0000000e07e2")

# (what the gateway reserved for r-1, what arrives on the requests topic, the start of the dead letter's reason)
REFUSED = {
    "no reservation": (None, request(), "not run: no reservation for request r-1"),
    "100x the price": (reserved(request()), request(price_per_token=Decimal("0.01")),
                       "not run: request price_per_token 0.01 != the reserved 0.0001"),
    "another account": (reserved(request()), request(account_id=OTHER_ACCOUNT),
                        f"not run: request r-1 was reserved by account {ACCOUNT}, not {OTHER_ACCOUNT}"),
    "another model": (reserved(request(), model="big"), request(),
                      "not run: request r-1 was reserved for model 'big', not 'tiny'"),
    "another fee rate": (reserved(request()), request(platform_fee_rate=Decimal("0.5")),
                         "not run: request platform_fee_rate 0.5 != the reserved 0"),
    "more tokens than reserved": (reserved(request()), request(max_tokens=30), "not run: request 30 tokens > the 3 reserved"),
    "more than the amount held": (reserved(request(), amount=Decimal("0.0002")), request(),
                                  "not run: request may cost 0.0003 > the reserved 0.0002"),
    "another reply topic": (reserved(request()), request(reply_topic=topics.reply_topic("forger")),
                            (f"not run: request reply_topic {topics.reply_topic('forger')!r} != the reserved "
                             f"{topics.REPLIES.name!r}")),
    "already settled": (reserved(request(), status="settled", settlement_txn=uuid.uuid4()), request(),
                        "not run: the reservation of request r-1 is settled: it is not run again"),
    "released by an operator": (reserved(request(), status="released", reason="operator"), request(),
                                "not run: the reservation of request r-1 is released (operator)"),
}


@pytest.mark.parametrize("held, asked, reason", REFUSED.values(), ids=REFUSED.keys())
async def test_a_request_that_matches_no_open_reservation_is_dead_lettered_not_run_nor_charged(held, asked, reason):
    calls: list = []

    @dataclass
    class Recording(FakeGenerator):
        def generate_stream(self, *args, **kw):
            calls.append(args)
            return super().generate_stream(*args, **kw)

    broker = messaging.create_broker("127.0.0.1:1", "inference", CollectorRegistry())
    port, registry = FakeReservations(*([held] if held else [])), CollectorRegistry()
    router = worker.register(broker, Recording(), MODEL, registry, reservations=port, worker_name="w1")
    async with TestKafkaBroker(broker) as br:
        await br.publish(asked, topics.REQUESTS.name, key=b"r-1")
        seen = Seen.of(router)
    assert port.asked == ["r-1"] and calls == []
    assert seen.sessions == [] and seen.replies == []  # no outcome (nothing charged), nothing streamed
    (letter,) = seen.dead
    assert letter.reason.startswith(reason), letter.reason
    assert (letter.consumer_group, letter.original_topic, letter.key) == (topics.GROUP_INFERENCE, topics.REQUESTS.name, "r-1")
    assert letter.payload == asked.model_dump_json()
    assert registry.get_sample_value("farmesh_worker_refused_requests_total") == 1
