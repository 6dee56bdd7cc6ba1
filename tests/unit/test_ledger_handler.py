"""The ledger group's handler on FastStream's in-memory broker, with an in-memory LedgerStore: what it records,
what it dead-letters (watched on the declared dead-letter publisher of the router `bind` returned), what it counts.
No database."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from decimal import Decimal
from functools import partial

import pytest
from faststream.kafka import KafkaBroker, KafkaPublishMessage, TestKafkaBroker
from prometheus_client import CollectorRegistry

from consumers.ledger import consumer as ledger
from farmesh.kafka import messaging
from farmesh.runtime.serving import DatabaseWait
from schemas import topics
from schemas.events import DeadLetter
from tests.support.fakes_ledger import FakeLedger
from tests.support.money import outcome, reservation_for

CLIENT = uuid.UUID("7b0e1b1e-0000-4000-8000-0000000ed9e1")
T0 = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)


def build(store: FakeLedger, registry: CollectorRegistry | None = None,
          *middlewares) -> tuple[KafkaBroker, ledger.LedgerRouter]:
    """A broker with the group bound on `store`, and the router `bind` included (its publishers are the broker's)."""
    broker = messaging.create_broker("127.0.0.1:1", topics.GROUP_LEDGER, registry or CollectorRegistry())
    for m in middlewares:
        broker.add_middleware(m)
    return broker, ledger.bind(broker, store, registry or CollectorRegistry())


def session(n: int = 0, tokens: int = 4, **kwargs):
    return outcome(f"ledger-unit-{n}", CLIENT, tokens, T0, i=n, fee=Decimal("0.05"), **kwargs)


def letters(group: ledger.LedgerRouter) -> list[DeadLetter]:
    return [DeadLetter.model_validate(call.args[0]) for call in group.dead_letters.mock.call_args_list]


def counted(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(f"farmesh_ledger_{name}", labels or None)


async def publish(broker, *events) -> None:
    """The events as ONE consumer batch of the sessions topic, each keyed by its request."""
    await broker.publish_batch(*(KafkaPublishMessage(e, key=e.request_id.encode(),
                                                     headers={topics.EVENT_TYPE_HEADER: e.type}) for e in events),
                               topic=topics.SESSIONS.name)


async def test_a_valid_outcome_is_recorded_once():
    good = session()
    store, registry = FakeLedger([CLIENT], [reservation_for(good)]), CollectorRegistry()
    broker, group = build(store, registry)
    async with TestKafkaBroker(broker) as br:
        await messaging.publish(br, topics.SESSIONS.name, good, good.request_id)
        group.dead_letters.mock.assert_not_called()
    assert store.batches == [[good]] and store.sessions == {good.request_id: good}
    assert counted(registry, "sessions_recorded_total") == 1
    assert counted(registry, "contributions_recorded_total") == len(good.contributions)
    assert counted(registry, "settled_sessions_total", result="settled") == 1
    assert registry.get_sample_value("farmesh_node_settled_tokens_total", {"peer_id": good.contributions[0].peer_id}) \
        == good.contributions[0].tokens_processed


async def test_a_redelivered_duplicate_is_not_recorded_twice():
    good, rerun = session(), session(tokens=2)  # rerun: the same request ran again
    store, registry = FakeLedger([CLIENT], [reservation_for(good)]), CollectorRegistry()
    broker, group = build(store, registry)
    async with TestKafkaBroker(broker) as br:
        await publish(br, good, good)          # delivered twice in one batch
        await publish(br, good, rerun)         # and redelivered, with a rerun of the same request
        group.dead_letters.mock.assert_not_called()
    assert len(store.batches) == 2 and store.sessions == {good.request_id: good}  # the first outcome wins
    assert counted(registry, "sessions_recorded_total") == 1
    assert counted(registry, "duplicate_outcomes_total") == 3
    assert counted(registry, "batch_size_sum") == 4


@pytest.mark.parametrize("tamper, reason", [
    (lambda o: o.model_copy(update={"cost_far": o.cost_far + Decimal("0.0001")}), "not settled: cost"),
    (lambda o: o.model_copy(update={"account_id": uuid.uuid4()}), "not settled: unknown client account"),
], ids=["money", "account"])
async def test_an_outcome_that_does_not_add_up_is_dead_lettered_with_its_reason_and_not_recorded(tamper, reason):
    store, registry = FakeLedger([CLIENT], [reservation_for(session(1)), reservation_for(session(2))]), CollectorRegistry()
    bad, good = tamper(session(1)), session(2)
    broker, group = build(store, registry)
    async with TestKafkaBroker(broker) as br:
        await publish(br, bad, good)
        group.dead_letters.mock.assert_called_once()
        (letter,) = letters(group)
    assert letter.reason.startswith(reason) and letter.consumer_group == topics.GROUP_LEDGER
    assert (letter.original_topic, letter.key) == (topics.SESSIONS.name, bad.request_id)
    assert letter.payload == bad.model_dump_json()  # the record as it came
    assert store.sessions == {good.request_id: good}  # the rest of the batch is recorded
    assert counted(registry, "rejected_outcomes_total") == 1 and counted(registry, "sessions_recorded_total") == 1
    assert registry.get_sample_value("farmesh_dead_letters_total",
                                     {"consumer_group": topics.GROUP_LEDGER, "topic": topics.SESSIONS.name}) == 1


async def test_a_record_that_is_no_session_event_is_dead_lettered():
    store = FakeLedger([CLIENT])
    broker, group = build(store)
    async with TestKafkaBroker(broker) as br:
        await br.publish(b'{"type": "inference.completed", "request_id": 7}', topics.SESSIONS.name, key=b"bad")
        group.dead_letters.mock.assert_called_once()
        (letter,) = letters(group)
    assert letter.key == "bad" and letter.reason.startswith("invalid session event") and "request_id" in letter.reason
    assert store.batches == [[]] and store.sessions == {}


async def test_a_failed_write_waits_for_the_database_then_rewinds_the_batch():
    """The service's DatabaseWait middleware covers the router's subscriber: a store error holds the batch until the
    database answers, then re-raises (NACK), and nothing is dead-lettered."""
    probes: list[str] = []

    class Pool:
        async def fetchval(self, query: str) -> int:
            probes.append(query)
            return 1

    store = FakeLedger([CLIENT])
    store.fail = ConnectionResetError("database went away")
    good = session()
    broker, group = build(store, None, partial(DatabaseWait, pool=Pool(), max_wait=1.0))
    async with TestKafkaBroker(broker) as br:
        with pytest.raises(ConnectionResetError):
            await messaging.publish(br, topics.SESSIONS.name, good, good.request_id)
        group.dead_letters.mock.assert_not_called()
    assert probes == ["SELECT 1"] and store.sessions == {}


OTHER = uuid.UUID("7b0e1b1e-0000-4000-8000-0000000e07e2")  # another real client


def shifted(o, base_units: int = 1):
    """`o` with one base unit moved from its last contribution to its first: the sums still add up, the split does
    not (an inflated share for one peer)."""
    first, *middle, last = o.contributions
    step = Decimal(base_units) / 10**18
    return o.model_copy(update={"contributions": [first.model_copy(update={"earnings_far": first.earnings_far + step}),
                                                  *middle, last.model_copy(update={"earnings_far": last.earnings_far - step})]})


# Each forgery of an outcome of the reserved request `ledger-unit-7` (CLIENT, 10 tokens at 0.0001, fee rate 0.05),
# and the start of the reason it is dead-lettered with.
FORGERIES = {
    "made-up request id": (lambda: outcome("ledger-unit-made-up", CLIENT, 4, T0, fee=Decimal("0.05")),
                           "not settled: no reservation for request ledger-unit-made-up"),
    "another account": (lambda: outcome("ledger-unit-7", OTHER, 4, T0, fee=Decimal("0.05")),
                        f"not settled: request ledger-unit-7 was reserved by account {CLIENT}, not {OTHER}"),
    "100x the price": (lambda: outcome("ledger-unit-7", CLIENT, 4, T0, fee=Decimal("0.05"), price=Decimal("0.01")),
                       "not settled: outcome price_per_token 0.01 != the reserved 0.0001"),
    "another fee rate": (lambda: outcome("ledger-unit-7", CLIENT, 4, T0, fee=Decimal("0")),
                         "not settled: outcome platform_fee_rate 0 != the reserved 0.05"),
    "cost above the reservation": (lambda: outcome("ledger-unit-7", CLIENT, 11, T0, fee=Decimal("0.05")),
                                   "not settled: outcome 11 tokens > the 10 reserved"),
    "inflated share": (lambda: shifted(outcome("ledger-unit-7", CLIENT, 4, T0, fee=Decimal("0.05"))),
                       "not settled: contributions are not the pricing rule's split of their spans"),
}


@pytest.mark.parametrize("forge", FORGERIES.values(), ids=FORGERIES.keys())
async def test_an_outcome_that_does_not_match_its_reservation_is_dead_lettered_and_moves_nothing(forge):
    make, reason = forge
    reserved = outcome("ledger-unit-7", CLIENT, 10, T0, fee=Decimal("0.05"))
    store, registry = FakeLedger([CLIENT, OTHER], [reservation_for(reserved, max_tokens=10)]), CollectorRegistry()
    forged = make()
    broker, group = build(store, registry)
    async with TestKafkaBroker(broker) as br:
        await publish(br, forged)
        group.dead_letters.mock.assert_called_once()
        (letter,) = letters(group)
    assert letter.reason.startswith(reason), letter.reason
    assert letter.payload == forged.model_dump_json()
    assert store.sessions == {} and store.owners == {}
    assert store.reservations["ledger-unit-7"].status == "open"
    assert counted(registry, "rejected_outcomes_total") == 1 and counted(registry, "sessions_recorded_total") == 0


async def test_the_honest_outcome_still_settles_after_a_forged_one_was_refused():
    honest = session(8)
    forged = shifted(session(8))
    store, registry = FakeLedger([CLIENT], [reservation_for(honest)]), CollectorRegistry()
    broker, group = build(store, registry)
    async with TestKafkaBroker(broker) as br:
        await publish(br, forged, honest)
        (letter,) = letters(group)
    assert letter.reason.startswith("not settled: contributions are not the pricing rule's split")
    assert store.sessions == {honest.request_id: honest}
    assert store.reservations[honest.request_id].settlement_txn == honest.event_id
