"""Issue 12: no money moves without a reservation. Forged events produced straight onto the topics, on the real broker
and PostgreSQL: each is dead-lettered with its reason and changes no balance, no contribution, no payable item; a
forged request is not run and not charged; `farmesh replay --verify` shows a forged outcome in the log (and, had an
old ledger settled one, the difference); `farmesh ledger audit` stays clean."""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from consumers.inference import consumer as worker
from consumers.inference.repository import PostgresReservations
from consumers.ledger import consumer as ledger
from consumers.ledger.repository import record_outcomes
from consumers.payments import consumer as payments
from consumers.payments.repository import record_payable
from farmesh.billing import accounts
from farmesh.kafka import messaging
from schemas import money, topics
from schemas.events import DeadLetter, InferenceRequested, SessionOutcome, session_event_adapter
from tests.support.consumers import running
from tests.support.kafka import read_all, wait_caught_up
from tests.support.money import audit_breaks, farmesh, money_env, outcome, producer, reserve_for
from tests.unit.test_worker import FakeGenerator

pytestmark = pytest.mark.integration
MODEL = "tiny"
PRICE, FEE = Decimal("0.0001"), Decimal("0.05")
INVENTED = "QmInventedPeerWhoNeverServedABlock"


@dataclass
class CountingGenerator(FakeGenerator):
    """The fake generator (3 tokens), remembering every prompt it was asked to run."""

    calls: list[str] = field(default_factory=list)

    def generate_stream(self, prompt, max_new_tokens, on_token, sampling=None, seed_key=""):
        self.calls.append(seed_key)
        return super().generate_stream(prompt, max_new_tokens, on_token, sampling, seed_key)


@pytest.fixture(scope="module")
async def env(tmp_path_factory, postgres_admin_url):
    """A broker and a database of this module's own (the audit and the replay see only what it did), with the
    inference (fake generator), ledger and payments groups running."""
    async with money_env(tmp_path_factory.mktemp("forged"), postgres_admin_url) as e:
        e.generator = CountingGenerator()
        groups = {
            topics.GROUP_INFERENCE: lambda b, r: worker.register(b, e.generator, MODEL, r,
                                                                 reservations=PostgresReservations(e.pool)),
            topics.GROUP_LEDGER: lambda b, r: ledger.register(b, e.pool, r),
            topics.GROUP_PAYMENTS: lambda b, r: payments.register(b, e.pool, r),
        }
        async with running(e.bootstrap, groups):
            yield e


async def client(env, name: str):
    async with env.pool.acquire() as conn:
        return await accounts.create_client(conn, f"{name}-{uuid.uuid4().hex[:6]}", money.to_base_units(Decimal(1)))


async def publish(env, *events, topic: str = topics.SESSIONS.name) -> None:
    p = await producer(env.bootstrap)
    try:
        for e in events:
            await messaging.publish(p, topic, e, e.request_id)
            if isinstance(e, SessionOutcome):  # as a worker publishes them
                for c in e.contribution_events():
                    await messaging.publish(p, topic, c, e.request_id)
    finally:
        await p.stop()


async def caught_up(env) -> None:
    await wait_caught_up(env.bootstrap, topics.GROUP_INFERENCE, topics.REQUESTS.name, timeout=60)
    for group in (topics.GROUP_LEDGER, topics.GROUP_PAYMENTS):
        await wait_caught_up(env.bootstrap, group, topics.SESSIONS.name, timeout=60)


async def letters(env) -> list[DeadLetter]:
    return [DeadLetter.model_validate_json(v) for v in await read_all(env.bootstrap, topics.DEAD_LETTER.name)]


async def money_state(env) -> tuple:
    """Everything money: balances, sessions, contributions, postings, reservations, payable items."""
    q = {
        "balances": "SELECT account_id, balance FROM far_account_balances ORDER BY account_id",
        "sessions": "SELECT request_id, event_id FROM far_mesh_sessions ORDER BY request_id",
        "contributions": "SELECT event_id, peer_id, earnings FROM far_session_contributions ORDER BY event_id",
        "entries": "SELECT txn_id, account_id, side, amount FROM far_ledger_entries ORDER BY id",
        "reservations": "SELECT request_id, status, charged, settlement_txn FROM far_reservations ORDER BY request_id",
        "payable": "SELECT request_id, event_id FROM far_payment_sessions ORDER BY request_id",
        "items": "SELECT contribution_id, peer_id, amount FROM far_payment_items ORDER BY contribution_id",
    }
    return tuple([[tuple(r) for r in await env.pool.fetch(sql)] for sql in q.values()])


def shifted(o: SessionOutcome) -> SessionOutcome:
    """`o` with half of its last node's share moved to its first node: every sum still adds up (cost, fee,
    earnings), but the shares are not the pricing rule's split of the spans."""
    first, *middle, last = o.contributions
    moved = money.to_far(money.to_base_units(last.earnings_far) // 2)
    return o.model_copy(update={"contributions": [
        first.model_copy(update={"earnings_far": first.earnings_far + moved}), *middle,
        last.model_copy(update={"earnings_far": last.earnings_far - moved})]})


async def assert_audit_clean(env) -> None:
    assert await audit_breaks(env.pool) == []
    result = await farmesh("ledger", "audit", "--database-url", env.database_url)
    assert result.exit_code == 0 and "audit: 0 break(s)" in result.output, result.output


async def test_forged_outcomes_are_dead_lettered_with_their_reason_and_move_nothing(env):
    payer, other = await client(env, "payer"), await client(env, "other")
    now, run = datetime.now(timezone.utc), uuid.uuid4().hex[:6]
    rid = f"{run}-reserved"
    honest = outcome(rid, payer.account_id, 4, now, fee=FEE)
    await reserve_for(env.pool, payer.key, honest, max_tokens=10)  # the gateway held 10 tokens x 0.0001, fee 0.05
    before = await money_state(env)

    forged = {  # what each forgery is refused for (the reason after "not settled: " / "not payable: ")
        "no reservation for request " + f"{run}-made-up":
            outcome(f"{run}-made-up", payer.account_id, 9, now, fee=FEE, peers=[(INVENTED, 0, 4)]),
        f"request {rid} was reserved by account {payer.account_id}, not {other.account_id}":
            outcome(rid, other.account_id, 4, now, fee=FEE),
        "outcome price_per_token 0.01 != the reserved 0.0001": outcome(rid, payer.account_id, 4, now, fee=FEE,
                                                                        price=Decimal("0.01")),
        "outcome platform_fee_rate 0 != the reserved 0.05": outcome(rid, payer.account_id, 4, now),
        "outcome 11 tokens > the 10 reserved": outcome(rid, payer.account_id, 11, now, fee=FEE),
        "contributions are not the pricing rule's split of their spans": shifted(outcome(rid, payer.account_id, 4, now,
                                                                                        fee=FEE)),
    }
    await publish(env, *forged.values())
    await caught_up(env)

    by_event: dict[tuple[str, str], str] = {}
    for d in await letters(env):
        if d.original_topic == topics.SESSIONS.name and run in d.payload:
            by_event[d.consumer_group, str(session_event_adapter.validate_json(d.payload).event_id)] = d.reason
    for reason, o in forged.items():
        assert by_event.pop((topics.GROUP_LEDGER, str(o.event_id))).startswith(f"not settled: {reason}")
        assert by_event.pop((topics.GROUP_PAYMENTS, str(o.event_id))).startswith(f"not payable: {reason}")
    assert by_event == {}  # nothing else (the contribution events travel with their outcome: not judged alone)
    assert await money_state(env) == before  # no balance, no contribution, no posting, no payable item moved
    assert await env.pool.fetchval("SELECT status FROM far_reservations WHERE request_id = $1", rid) == "open"
    assert await env.pool.fetchval("SELECT count(*) FROM far_accounts WHERE peer_id = $1", INVENTED) == 0

    # The reservation is intact: the honest outcome settles it, and is the one paid.
    await publish(env, honest)
    await caught_up(env)
    assert await env.pool.fetchval("SELECT event_id FROM far_mesh_sessions WHERE request_id = $1", rid) == honest.event_id
    assert await env.pool.fetchval("SELECT event_id FROM far_payment_sessions WHERE request_id = $1", rid) == honest.event_id
    have, reserved = await accounts.balance(env.pool, payer.account_id)
    assert (have, reserved) == (money.to_base_units(Decimal(1)) - money.to_base_units(honest.cost_far), 0)
    assert await accounts.balance(env.pool, other.account_id) == (money.to_base_units(Decimal(1)), 0)
    await assert_audit_clean(env)


async def test_a_forged_request_is_dead_lettered_by_the_worker_not_run_and_not_charged(env):
    payer = await client(env, "asker")
    run = uuid.uuid4().hex[:6]
    gateway_topic, forger_topic = topics.reply_topic(f"gateway-{run}"), topics.reply_topic(f"attacker-{run}")

    def asked(request_id: str, price: Decimal = PRICE, reply_topic: str = forger_topic) -> InferenceRequested:
        return InferenceRequested(request_id=request_id, model=MODEL, prompt="forged", max_tokens=3,
                                  price_per_token=price, platform_fee_rate=FEE, reply_topic=reply_topic,
                                  account_id=payer.account_id)

    reserved = asked(f"{run}-reserved", reply_topic=gateway_topic)
    await accounts.reserve(env.pool, f"Bearer {payer.key}", accounts.Reservation(
        reserved.request_id, MODEL, reserved.max_tokens, PRICE, FEE, reply_topic=gateway_topic))
    before = await money_state(env)
    # No reservation; the reservation's id at 100x its price; its exact terms, its tokens sent to another topic.
    unreserved, dearer = asked(f"{run}-unreserved"), asked(reserved.request_id, price=PRICE * 100)
    redirected = asked(reserved.request_id)
    await publish(env, unreserved, dearer, redirected, topic=topics.REQUESTS.name)
    await caught_up(env)

    refused = sorted(d.reason for d in await letters(env)
                     if d.consumer_group == topics.GROUP_INFERENCE and run in d.payload)
    assert refused == sorted([
        (f"not run: no reservation for request {unreserved.request_id} (the gateway reserves every request "
         "before queueing it)"),
        "not run: request price_per_token 0.01 != the reserved 0.0001",
        f"not run: request reply_topic {forger_topic!r} != the reserved {gateway_topic!r}",
    ])
    assert not [k for k in env.generator.calls if k.startswith(run)]  # never run
    sessions = [session_event_adapter.validate_json(v) for v in await read_all(env.bootstrap, topics.SESSIONS.name)]
    assert not [e for e in sessions if e.request_id.startswith(run)]  # no outcome: nothing to charge
    assert await read_all(env.bootstrap, forger_topic, timeout=0.5) == []  # nothing streamed to the named topic
    assert await money_state(env) == before
    assert await env.pool.fetchval("SELECT status FROM far_reservations WHERE request_id = $1",
                                   reserved.request_id) == "open"

    # The request as the gateway reserved it runs, and is charged its 3 tokens.
    await publish(env, reserved, topic=topics.REQUESTS.name)
    await caught_up(env)
    assert env.generator.calls.count(reserved.request_id) == 1
    session = await env.pool.fetchrow("SELECT * FROM far_mesh_sessions WHERE request_id = $1", reserved.request_id)
    assert session["cost"] == 3 * PRICE and session["account_id"] == payer.account_id
    assert await read_all(env.bootstrap, gateway_topic)  # its tokens went to the gateway that reserved it
    await assert_audit_clean(env)


async def test_replay_verify_shows_a_forged_outcome_in_the_log_that_nothing_settled(env):
    payer = await client(env, "replayed")
    run = uuid.uuid4().hex[:6]
    honest = outcome(f"{run}-honest", payer.account_id, 3, datetime.now(timezone.utc), fee=FEE)
    await reserve_for(env.pool, payer.key, honest)
    forged = outcome(f"{run}-forged", payer.account_id, 7, datetime.now(timezone.utc), fee=FEE, peers=[(INVENTED, 0, 4)])
    await publish(env, honest, forged)
    await caught_up(env)

    result = await farmesh("replay", "--verify", "--database-url", env.database_url, "--kafka-bootstrap", env.bootstrap)
    assert result.exit_code == 0, result.output
    assert "verify: 0 difference(s) from the live ledger" in result.output  # the live ledger refused it too
    rejected = [line for line in result.output.splitlines() if line.startswith("REJECTED")]
    assert any(f"no reservation for request {forged.request_id}" in line for line in rejected), result.output
    assert await env.pool.fetchval("SELECT count(*) FROM far_replay.rejected WHERE reason LIKE $1",
                                   f"%{forged.request_id}%") == 1
    assert await env.pool.fetchval("SELECT event_id FROM far_replay.sessions WHERE request_id = $1",
                                   honest.request_id) == honest.event_id
    await assert_audit_clean(env)


async def test_replay_verify_reports_forged_outcomes_an_old_ledger_settled(tmp_path, postgres_admin_url):
    """History written before the rule: an old ledger (and payments group) recorded whatever added up. The replay
    refuses the forged outcomes, so --verify reports each difference, and the audit the settlement without a
    reservation."""
    async with money_env(tmp_path, postgres_admin_url) as env:
        payer = await client(env, "old")
        now, run = datetime.now(timezone.utc), uuid.uuid4().hex[:6]
        honest = outcome(f"{run}-honest", payer.account_id, 3, now, fee=FEE)
        await reserve_for(env.pool, payer.key, honest)
        # A made-up request crediting an invented peer; an inflated share settled before the honest outcome.
        made_up = outcome(f"{run}-made-up", payer.account_id, 5, now, fee=FEE, peers=[(INVENTED, 0, 4)])
        inflated = shifted(outcome(honest.request_id, payer.account_id, 3, now, fee=FEE))
        await publish(env, made_up, inflated, honest)
        async with env.pool.acquire() as conn:  # what the old consumers recorded, in log order, judging nothing
            for o in (made_up, inflated, honest):
                await record_outcomes(conn, [o])
                await record_payable(conn, [o])

        result = await farmesh("replay", "--verify", "--database-url", env.database_url,
                               "--kafka-bootstrap", env.bootstrap)
        assert result.exit_code == 1, result.output
        diffs = [line for line in result.output.splitlines() if line.startswith("DIFF")]
        assert f"DIFF session {made_up.request_id}: only in the live ledger" in "\n".join(diffs), result.output
        assert f"DIFF session {honest.request_id}: only in the live ledger" in "\n".join(diffs)
        assert any(line.startswith(f"DIFF node earnings (ledger credits) {INVENTED}: only in the live ledger")
                   for line in diffs)
        assert any(line.startswith(f"DIFF client charges (ledger debits) {payer.account_id}:") for line in diffs)
        for c in made_up.contributions + inflated.contributions:
            assert f"DIFF contribution {c.contribution_id}: only in the live ledger" in "\n".join(diffs)
            assert f"DIFF payable item (payments group) {c.contribution_id}: only in the live ledger" in "\n".join(diffs)
        rejected = "\n".join(line for line in result.output.splitlines() if line.startswith("REJECTED"))
        assert f"no reservation for request {made_up.request_id}" in rejected
        assert "contributions are not the pricing rule's split of their spans" in rejected
        breaks = await audit_breaks(env.pool)
        assert any(f"session {made_up.request_id}: was settled on {payer.account_id} without a reservation" in b
                   for b in breaks), breaks


# ------------------------------------------------------------------------------------------------ one winner
#
# The ledger and the payments group judge each request on the same facts, so they pick the same winner (payments pays
# exactly what the ledger credits), also when a reservation is released while an outcome is on its way, and when
# they judge the same request at the same moment (db/views/acceptance.py: the reservations are locked, the rest read
# after the lock). Their repositories are called directly here, as their handlers call them.

async def test_a_reservation_released_without_an_outcome_settles_nothing_in_either_group(env):
    from consumers.ledger.repository import settle
    from consumers.payments.repository import judge_and_record

    payer = await client(env, "released")
    o = outcome(f"{uuid.uuid4().hex[:6]}-released", payer.account_id, 2, datetime.now(timezone.utc), fee=FEE)
    await reserve_for(env.pool, payer.key, o)
    assert await accounts.release(env.pool, o.request_id, "released by an operator")
    before = await money_state(env)
    async with env.pool.acquire() as conn:
        by_ledger, by_payments = await settle(conn, [o]), await judge_and_record(conn, [o])
    reason = (f"the reservation of request {o.request_id} was released without an outcome (released by an operator): "
              "nothing may settle it")
    assert by_ledger.rejected == {0: reason} and by_payments.rejected == {0: reason}
    assert await money_state(env) == before
    await assert_audit_clean(env)


async def test_an_outcome_one_group_took_before_the_release_is_taken_by_the_other_too(env):
    """The outcome was on its way when an operator released the reservation: the payments group judged it while the
    reservation was open, the ledger after the release. The ledger follows the payments group's choice (and settles
    the reservation with it), so the work paid is the work credited."""
    from consumers.ledger.repository import settle
    from consumers.payments.repository import judge_and_record

    payer = await client(env, "raced")
    o = outcome(f"{uuid.uuid4().hex[:6]}-raced", payer.account_id, 2, datetime.now(timezone.utc), fee=FEE)
    await reserve_for(env.pool, payer.key, o)
    async with env.pool.acquire() as conn:
        assert (await judge_and_record(conn, [o])).recorded.sessions == 1
        assert await accounts.release(conn, o.request_id, "released by an operator")
        settled = await settle(conn, [o])
    assert settled.rejected == {} and settled.recorded.sessions == 1
    row = await env.pool.fetchrow("SELECT status, settlement_txn, charged FROM far_reservations WHERE request_id = $1",
                                  o.request_id)
    assert tuple(row) == ("settled", o.event_id, o.cost_far)
    await assert_audit_clean(env)


async def test_two_groups_judging_one_request_at_once_pick_the_same_winner(env):
    """Two acceptable outcomes of one request reach the groups in different orders (one was keyed apart from its
    request). The payments group takes the first it saw and holds the reservation; the ledger, judging the same
    request meanwhile, waits, then sees that choice and follows it, although its own batch has the other first. An
    operator's release at that moment waits too, and changes nothing about the winner."""
    from consumers.ledger.repository import settle
    from consumers.payments.repository import judge_and_record

    payer = await client(env, "concurrent")
    rid = f"{uuid.uuid4().hex[:6]}-concurrent"
    first, second = (outcome(rid, payer.account_id, n, datetime.now(timezone.utc), fee=FEE) for n in (2, 3))
    await reserve_for(env.pool, payer.key, first)
    async with env.pool.acquire() as paying, env.pool.acquire() as settling, env.pool.acquire() as operator:
        judging = paying.transaction()
        await judging.start()
        assert (await judge_and_record(paying, [first])).recorded.sessions == 1  # not committed yet
        ledger_batch = asyncio.create_task(settle(settling, [second, first]))
        release = asyncio.create_task(accounts.release(operator, rid, "released by an operator"))
        await asyncio.sleep(0.5)
        assert not ledger_batch.done() and not release.done()  # both wait for the payments group's batch
        await judging.commit()
        settled = await asyncio.wait_for(ledger_batch, 10)
        # Whichever of the two went next: released first, the ledger still follows the payments group's choice
        # (taken while the reservation was open) and settles the reservation with it; settled first, the release
        # finds nothing open.
        await asyncio.wait_for(release, 10)
    assert settled.rejected == {} and (settled.recorded.sessions, settled.recorded.duplicates) == (1, 1)
    assert tuple(await env.pool.fetchrow("SELECT status, settlement_txn FROM far_reservations WHERE request_id = $1",
                                         rid)) == ("settled", first.event_id)
    assert await env.pool.fetchval("SELECT event_id FROM far_mesh_sessions WHERE request_id = $1", rid) == first.event_id
    assert await env.pool.fetchval("SELECT event_id FROM far_payment_sessions WHERE request_id = $1", rid) == first.event_id
    await assert_audit_clean(env)
