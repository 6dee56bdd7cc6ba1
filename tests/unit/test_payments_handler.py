"""The payments group's handler and its weekly close on FastStream's in-memory broker, with in-memory ports: what
is made payable, what is dead-lettered and what each close publishes (watched on the declared publishers of the
router `bind` returned), what is counted. No database."""
from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal
from functools import partial

import pytest
from faststream.kafka import KafkaBroker, KafkaPublishMessage, TestKafkaBroker
from prometheus_client import CollectorRegistry

from consumers.payments import consumer as payments
from consumers.payments.repository import week_start
from consumers.payments.schedule import WeeklyClose
from farmesh.kafka import messaging
from farmesh.runtime.serving import DatabaseWait
from schemas import topics
from schemas.events import DeadLetter
from tests.support.fakes_payments import FakePayments
from tests.support.money import outcome, reservation_for

CLIENT = uuid.UUID("7b0e1b1e-0000-4000-8000-0000000ea7e5")
W10, W11, W12 = "2025-W10", "2025-W11", "2025-W12"
ALPHA, BETA = "QmUnitAlpha", "QmUnitBeta"
WALLETS = {ALPHA: "0xA1", BETA: "0xB2"}
BATCH_CLOSED = {topics.EVENT_TYPE_HEADER: "payments.batch_closed"}


def build(store: FakePayments, registry: CollectorRegistry | None = None,
          *middlewares) -> tuple[KafkaBroker, payments.PaymentsRouter]:
    """A broker with the group bound on `store`, and the router `bind` included (its publishers are the broker's)."""
    broker = messaging.create_broker("127.0.0.1:1", topics.GROUP_PAYMENTS, registry or CollectorRegistry())
    for m in middlewares:
        broker.add_middleware(m)
    return broker, payments.bind(broker, store, registry or CollectorRegistry())


def session(n: int = 0, tokens: int = 4, week: str = W10, **kwargs):
    return outcome(f"payments-unit-{n}", CLIENT, tokens, week_start(week) + timedelta(hours=5 + n),
                   peers=[(ALPHA, 0, 2), (BETA, 2, 4)], **kwargs)


def letters(group: payments.PaymentsRouter) -> list[DeadLetter]:
    return [DeadLetter.model_validate(call.args[0]) for call in group.dead_letters.mock.call_args_list]


def counted(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(f"farmesh_payments_{name}")


async def publish(broker, *events) -> None:
    """The events as ONE consumer batch of the sessions topic, each keyed by its request."""
    await broker.publish_batch(*(KafkaPublishMessage(e, key=e.request_id.encode(),
                                                     headers={topics.EVENT_TYPE_HEADER: e.type}) for e in events),
                               topic=topics.SESSIONS.name)


async def test_a_valid_outcome_is_recorded_once():
    good = session()
    store, registry = FakePayments([CLIENT], reservations=[reservation_for(good)]), CollectorRegistry()
    broker, group = build(store, registry)
    async with TestKafkaBroker(broker) as br:
        await messaging.publish(br, topics.SESSIONS.name, good, good.request_id)
        group.dead_letters.mock.assert_not_called()
        group.batch_closed.mock.assert_not_called()
    assert store.batches == [[good]] and store.sessions == {good.request_id: good}
    assert set(store.items) == {c.contribution_id for c in good.contributions}
    assert (counted(registry, "sessions_recorded_total"), counted(registry, "items_recorded_total")) == (1, 2)


async def test_a_redelivered_duplicate_is_not_recorded_twice():
    good, rerun = session(), session(tokens=2)  # rerun: the same request ran again (other contributions)
    store, registry = FakePayments([CLIENT], reservations=[reservation_for(good)]), CollectorRegistry()
    broker, group = build(store, registry)
    async with TestKafkaBroker(broker) as br:
        await publish(br, good, good)
        await publish(br, good, rerun)
        group.dead_letters.mock.assert_not_called()
    assert store.sessions == {good.request_id: good}  # the first outcome wins: the work the ledger credits
    assert set(store.items) == {c.contribution_id for c in good.contributions}
    assert (counted(registry, "sessions_recorded_total"), counted(registry, "duplicate_outcomes_total")) == (1, 3)
    assert counted(registry, "batch_size_sum") == 4


@pytest.mark.parametrize("tamper, reason", [
    (lambda o: o.model_copy(update={"platform_fee_far": Decimal("0.0001")}), "not payable: platform fee"),
    (lambda o: o.model_copy(update={"account_id": uuid.uuid4()}), "not payable: unknown client account"),
], ids=["money", "account"])
async def test_an_outcome_that_does_not_add_up_is_dead_lettered_with_its_reason_and_not_recorded(tamper, reason):
    store, registry = FakePayments([CLIENT], reservations=[reservation_for(session(n)) for n in (1, 2)]), CollectorRegistry()
    good, bad = session(1), tamper(session(2))
    broker, group = build(store, registry)
    async with TestKafkaBroker(broker) as br:
        await publish(br, good, bad)
        await group.dead_letters.assert_called_once_with(key=bad.request_id.encode())
        (letter,) = letters(group)
    assert letter.reason.startswith(reason) and letter.consumer_group == topics.GROUP_PAYMENTS
    assert letter.original_topic == topics.SESSIONS.name and letter.payload == bad.model_dump_json()
    assert store.sessions == {good.request_id: good}
    assert not {c.contribution_id for c in bad.contributions} & set(store.items)
    assert (counted(registry, "rejected_outcomes_total"), counted(registry, "sessions_recorded_total")) == (1, 1)


async def test_a_record_that_is_no_session_event_is_dead_lettered():
    store = FakePayments([CLIENT])
    broker, group = build(store)
    async with TestKafkaBroker(broker) as br:
        await br.publish(b"not json", topics.SESSIONS.name, key=b"bad")
        await group.dead_letters.assert_called_once_with(key=b"bad")
        (letter,) = letters(group)
    assert letter.reason.startswith("invalid session event") and letter.payload == "not json"
    assert store.batches == [[]] and store.sessions == {}


async def test_a_failed_write_waits_for_the_database_then_rewinds_the_batch():
    probes: list[str] = []

    class Pool:
        async def fetchval(self, query: str) -> int:
            probes.append(query)
            return 1

    store = FakePayments([CLIENT])
    store.fail = ConnectionResetError("database went away")
    good = session()
    broker, group = build(store, None, partial(DatabaseWait, pool=Pool(), max_wait=1.0))
    async with TestKafkaBroker(broker) as br:
        with pytest.raises(ConnectionResetError):
            await messaging.publish(br, topics.SESSIONS.name, good, good.request_id)
        group.dead_letters.mock.assert_not_called()
    assert probes == ["SELECT 1"] and store.sessions == {}


async def test_the_weekly_close_publishes_each_due_batch_once_in_order_on_the_declared_publisher():
    w10, w11 = session(1, week=W10), session(2, week=W11)
    store, registry = FakePayments([CLIENT], WALLETS, [reservation_for(w10), reservation_for(w11)]), CollectorRegistry()
    broker, group = build(store)
    closer = WeeklyClose(store, group.batch_closed, registry, grace=600.0, min_payout=0)  # the bound router's
    async with TestKafkaBroker(broker) as br:
        await publish(br, w10, w11)
        # Down over two weeks: W10 (nothing closed yet: the latest ended week only), then W11 and W12, in order.
        (first,) = await closer.close_due(week_start(W11) + timedelta(seconds=600))
        await group.batch_closed.assert_called_once_with(first.event, key=W10.encode(), headers=BATCH_CLOSED)
        assert first.event.total_far == w10.cost_far  # no fee: the nodes earn the whole cost
        done = await closer.close_due(week_start("2025-W13") + timedelta(seconds=600))
        assert [c.event.week for c in done] == [W11, W12] and done[0].event.total_far == w11.cost_far
        published = [call.args[0]["week"] for call in group.batch_closed.mock.call_args_list]
        assert published == [W10, W11, W12]
        await group.batch_closed.assert_called_with(done[1].event, key=W12.encode(), headers=BATCH_CLOSED)
        # Checked again: nothing is due, nothing is published.
        assert await closer.close_due(week_start("2025-W13") + timedelta(days=3)) == []
        assert group.batch_closed.mock.call_count == 3
    assert registry.get_sample_value("farmesh_payments_batch_lines_total") == 4  # two wallets, two weeks with work


async def test_a_forged_outcome_is_not_payable_and_the_reserved_one_is():
    """Work is payable only for what the gateway reserved, split as the pricing rule splits it: an outcome of a
    request nobody reserved, or with one node's share inflated, is dead-lettered and pays nobody."""
    honest = session(3)
    first, last = honest.contributions
    inflated = honest.model_copy(update={"event_id": uuid.uuid4(), "contributions": [
        first.model_copy(update={"contribution_id": uuid.uuid4(), "earnings_far": first.earnings_far + last.earnings_far}),
        last.model_copy(update={"contribution_id": uuid.uuid4(), "earnings_far": Decimal(0)})]})
    unreserved = session(4)
    store, registry = FakePayments([CLIENT], WALLETS, [reservation_for(honest)]), CollectorRegistry()
    broker, group = build(store, registry)
    async with TestKafkaBroker(broker) as br:
        await publish(br, inflated, unreserved, honest)
        reasons = [letter.reason for letter in letters(group)]
    assert len(reasons) == 2
    assert reasons[0].startswith("not payable: contributions are not the pricing rule's split of their spans")
    assert reasons[1].startswith(f"not payable: no reservation for request {unreserved.request_id}")
    assert store.sessions == {honest.request_id: honest}
    assert set(store.items) == {c.contribution_id for c in honest.contributions}
    assert (counted(registry, "rejected_outcomes_total"), counted(registry, "sessions_recorded_total")) == (2, 1)
