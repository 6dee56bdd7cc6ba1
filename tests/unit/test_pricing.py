from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import money
from farmesh.billing.pricing import (
    FEE_RATE_SCALE,
    Work,
    fee_rate_units,
    platform_fee,
    reservation_amount,
    session_cost,
    settlement,
    split,
)


def test_plan_price_is_exact():
    price = money.to_base_units(Decimal("0.0001"))
    assert price == 10**14
    assert money.to_far(session_cost(1000, price)) == Decimal("0.1")


def test_price_finer_than_a_base_unit_is_refused():
    with pytest.raises(ValueError):
        money.to_base_units(Decimal("1e-19"))


@pytest.mark.parametrize("amount", ["-0.0001", "NaN", "sNaN", "Infinity", "1E+39", "1E+999999999", "1.0000000000000000001"])
def test_amounts_that_are_not_exact_base_units_are_refused(amount):
    with pytest.raises(ValueError):
        money.to_base_units(amount)


@given(st.integers(min_value=0, max_value=10**38 - 1))
def test_base_units_round_trip_exactly(units):
    far = money.to_far(units)
    assert money.to_base_units(far) == units
    assert money.to_base_units(money.text(far)) == units


def test_trailing_zeros_and_negative_zero_are_exact():
    assert money.to_base_units("0.000000000000000001000") == 1
    assert money.to_base_units(-Decimal(0)) == 0


def test_split_weights_blocks_times_tokens():
    work = [Work("a", 0, 2, 10), Work("b", 2, 6, 10)]
    assert split(600, work) == [200, 400]


def test_remainder_goes_to_largest_remainder_deterministically():
    work = [Work("a", 0, 1, 1), Work("b", 1, 2, 1), Work("c", 2, 3, 1)]
    assert split(10, work) == [4, 3, 3]


def test_nothing_processed_nothing_to_split():
    assert split(0, [Work("a", 0, 2, 0)]) == [0]
    with pytest.raises(ValueError):
        split(5, [Work("a", 0, 2, 0)])


spans = st.lists(
    st.builds(Work, st.text(min_size=1, max_size=3), st.integers(0, 40), st.integers(41, 80), st.integers(1, 5000)),
    min_size=1, max_size=8,
)


@given(tokens=st.integers(0, 10**6), price=st.integers(0, 10**16), work=spans)
def test_split_is_exact_for_any_session(tokens, price, work):
    cost = session_cost(tokens, price)
    shares = split(cost, work)
    assert sum(shares) == cost
    assert all(s >= 0 for s in shares)
    # each share is within one base unit of its exact proportional value
    total_weight = sum(w.weight for w in work)
    for share, w in zip(shares, work):
        assert abs(share * total_weight - cost * w.weight) < total_weight


# ------------------------------------------------------------------------------------ platform fee and settlement

fee_rates = st.one_of(
    st.just(0), st.just(FEE_RATE_SCALE), st.integers(0, FEE_RATE_SCALE),
    st.decimals(min_value=0, max_value=1, places=4).map(fee_rate_units),
)
any_work = st.lists(
    st.builds(Work, st.text(min_size=1, max_size=3), st.integers(0, 40), st.integers(41, 80), st.integers(0, 5000)),
    min_size=0, max_size=8,
)


@given(tokens=st.integers(0, 10**6), price=st.integers(0, 10**18), rate=fee_rates, work=any_work)
def test_credits_plus_fee_equal_the_debit_exactly(tokens, price, rate, work):
    s = settlement(tokens, price, rate, work)
    assert s.debit == tokens * price
    assert s.credits + s.fee == s.debit
    assert len(s.shares) == len(work) and all(x >= 0 for x in s.shares)
    assert 0 <= s.fee <= s.debit
    if sum(w.weight for w in work):
        assert s.fee == s.debit * rate // FEE_RATE_SCALE  # floor: rounding favours the nodes
        assert s.credits == s.debit - s.fee
        for share, w in zip(s.shares, work):  # each node within one base unit of its exact share
            total_weight = sum(x.weight for x in work)
            assert abs(share * total_weight - s.credits * w.weight) < total_weight
    else:
        assert s.fee == s.debit and s.credits == 0  # nobody to pay: the platform keeps it, nothing is lost


@given(tokens=st.integers(0, 4096), max_tokens=st.integers(1, 4096), price=st.integers(0, 10**16))
def test_a_session_never_costs_more_than_its_reservation(tokens, max_tokens, price):
    delivered = min(tokens, max_tokens)
    assert settlement(delivered, price, 0, [Work("a", 0, 1, 1)]).debit <= reservation_amount(max_tokens, price)


def test_fee_rule_examples():
    price = money.to_base_units(Decimal("0.0001"))
    five_percent = fee_rate_units(Decimal("0.05"))
    s = settlement(3, price, five_percent, [Work("a", 0, 2, 7), Work("b", 2, 4, 7)])
    assert (s.debit, s.fee, s.shares) == (3 * 10**14, 15 * 10**12, [1425 * 10**11, 1425 * 10**11])
    assert platform_fee(7, fee_rate_units(Decimal("0.5"))) == 3  # floor(3.5)
    assert platform_fee(10**18, FEE_RATE_SCALE) == 10**18
    assert settlement(0, price, five_percent, [Work("a", 0, 2, 5)]) == type(s)(0, 0, [0])


@pytest.mark.parametrize("bad", [Decimal("-0.1"), Decimal("1.5"), Decimal("1e-19")])
def test_fee_rates_outside_0_1_or_finer_than_1e_18_are_refused(bad):
    with pytest.raises(ValueError):
        fee_rate_units(bad)


def test_prices_per_model_fee_and_minimum_payout_come_from_the_environment(monkeypatch):
    from farmesh.runtime.settings import Settings

    monkeypatch.setenv("FARMESH_MODEL_PRICES", "llama-70b=0.0005, tiny=0.00001")
    monkeypatch.setenv("FARMESH_PLATFORM_FEE", "0.05")
    monkeypatch.setenv("FARMESH_MIN_PAYOUT", "1.5")
    monkeypatch.delenv("FARMESH_PRICE_PER_TOKEN", raising=False)
    s = Settings()
    assert s.price_for("llama-70b") == Decimal("0.0005") and s.price_for("tiny") == Decimal("0.00001")
    assert s.price_for("other") == Decimal("0.0001")  # the plan's default
    assert (s.platform_fee, s.min_payout) == (Decimal("0.05"), Decimal("1.5"))
    monkeypatch.setenv("FARMESH_MODEL_PRICES", "")
    assert Settings().model_prices == {}
    for name, bad in (("FARMESH_MODEL_PRICES", "tiny"), ("FARMESH_MODEL_PRICES", "tiny=1e-19"),
                      ("FARMESH_PLATFORM_FEE", "1.01"), ("FARMESH_MIN_PAYOUT", "-1")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError):
            Settings()
        monkeypatch.delenv(name)


# ------------------------------------------------------------------------------------ the acceptance rule
#
# farmesh/billing/acceptance.py: an outcome counts only if it matches the reservation the gateway made for its
# request, its contributions being exactly the pricing rule's split of their spans; the winner a consumer group
# already recorded wins.

import uuid  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

from consumers.inference.settlement import settle  # noqa: E402
from db.views.acceptance import Facts  # noqa: E402
from db.views.reservations import Reservation  # noqa: E402
from farmesh.billing.acceptance import judge, money_problem, reservation_problem  # noqa: E402
from schemas.events import InferenceRequested  # noqa: E402

ACCOUNT = uuid.UUID("7b0e1b1e-0000-4000-8000-0000000acce9")
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)


def asked(max_tokens: int = 8, price: Decimal = Decimal("0.0001"), rate: Decimal = Decimal("0.05"),
          request_id: str = "acc-1") -> InferenceRequested:
    return InferenceRequested(request_id=request_id, model="tiny", prompt="p", max_tokens=max_tokens,
                              price_per_token=price, platform_fee_rate=rate, reply_topic="farmesh.inference.replies",
                              account_id=ACCOUNT)


def held(r: InferenceRequested, **kw) -> Reservation:
    terms = dict(request_id=r.request_id, account_id=r.account_id, model=r.model, max_tokens=r.max_tokens,
                 price_per_token=r.price_per_token, platform_fee_rate=r.platform_fee_rate,
                 amount=money.to_far(reservation_amount(r.max_tokens, money.to_base_units(r.price_per_token))),
                 status="open")
    return Reservation(**{**terms, **kw})


def ran(r: InferenceRequested, delivered: int = 3, error: str | None = None, reason="error", worked: bool = True):
    """What a worker publishes for `r` (consumers/inference/settlement.py)."""
    spans = [Work("QmA", 0, 2, 5 + delivered), Work("QmB", 2, 5, 5 + delivered)] if worked else []
    outcome, _ = settle(r, delivered, 5, "x" * delivered, spans, NOW, "w", None if error else "length", error, reason)
    return outcome


distinct_spans = st.lists(
    st.builds(Work, st.sampled_from(["QmA", "QmB", "QmC"]), st.integers(0, 40), st.integers(41, 80),
              st.integers(0, 5000)),
    min_size=0, max_size=6, unique_by=lambda w: (w.peer_id, w.start_block, w.end_block))


@given(tokens=st.integers(0, 600), max_tokens=st.integers(1, 512),
       price=st.decimals(min_value=0, max_value=Decimal("0.01"), places=8),
       rate=st.decimals(min_value=0, max_value=1, places=4), work=distinct_spans, failed=st.booleans())
def test_every_outcome_a_worker_publishes_for_a_reserved_request_is_accepted_and_a_moved_unit_is_not(
        tokens, max_tokens, price, rate, work, failed):
    r = asked(max_tokens, price, rate)
    delivered = min(tokens, max_tokens)
    o, _ = settle(r, delivered, 5, "x", work, NOW, "w", None if failed else "length", "broke" if failed else None)
    assert money_problem(o) is None and reservation_problem(o, held(r)) is None
    if len(o.contributions) >= 2 and o.contributions[-1].earnings_far > 0:
        unit = Decimal(1) / 10**18
        first, *middle, last = o.contributions
        shifted = o.model_copy(update={"contributions": [
            first.model_copy(update={"earnings_far": first.earnings_far + unit}), *middle,
            last.model_copy(update={"earnings_far": last.earnings_far - unit})]})
        assert money_problem(shifted) is None  # it still adds up...
        assert reservation_problem(shifted, held(r)).startswith("contributions are not the pricing rule's split")


def test_an_expired_request_never_ran_so_its_outcome_delivers_nothing():
    r = asked()
    expired = ran(r, 0, "RequestExpired: late", "expired", worked=False)  # as the worker settles it: no spans
    assert money_problem(expired) is None and reservation_problem(expired, held(r)) is None
    padded = ran(r, 2, "RequestExpired: late", "expired")
    assert money_problem(padded) == "an expired request never ran: it delivers no tokens and no work"


def facts(*reservations: Reservation, taken: dict | None = None) -> Facts:
    return Facts({x.request_id: x for x in reservations}, taken or {}, {ACCOUNT}, {})


def test_the_states_of_a_reservation_and_which_outcome_wins():
    r = asked()
    first, rerun = ran(r), ran(r, 5)  # a redelivered request ran twice: both are acceptable
    # open: the first wins where it is recorded (both handed on; the recording keeps the first)
    verdict = judge([first, rerun], facts(held(r)))
    assert (verdict.rejected, verdict.losers) == ({}, set())
    # settled by the first (the payments group or a replay judging after the ledger): the first, and only it
    settled = held(r, status="settled", settlement_txn=first.event_id)
    verdict = judge([rerun, first], facts(settled, taken={r.request_id: {first.event_id}}))
    assert (verdict.rejected, verdict.losers, verdict.accepted([rerun, first])) == ({}, {0}, [first])
    # released BY a failed outcome: that outcome is the winner (its delivered tokens are charged and paid)
    broke = ran(r, 2, "node died")
    closed = held(r, status="released", settlement_txn=broke.event_id, reason="session failed")
    verdict = judge([broke, rerun], facts(closed, taken={r.request_id: {broke.event_id}}))
    assert verdict.accepted([broke, rerun]) == [broke] and verdict.rejected == {}
    # released with NO outcome (withdrawn): nothing settles it...
    withdrawn = held(r, status="released", reason="released by an operator")
    verdict = judge([first], facts(withdrawn))
    assert verdict.rejected[0] == (f"the reservation of request {r.request_id} was released without an outcome "
                                   "(released by an operator): nothing may settle it")
    # ...unless a group recorded an outcome while it was open: then every consumer takes that one (the others lose)
    verdict = judge([rerun, first], facts(withdrawn, taken={r.request_id: {first.event_id}}))
    assert (verdict.rejected, verdict.losers, verdict.accepted([rerun, first])) == ({}, {0}, [first])
    # a winner recorded by the other group wins even where the log shows another acceptable outcome first
    verdict = judge([rerun, first], facts(held(r), taken={r.request_id: {first.event_id}}))
    assert (verdict.losers, verdict.accepted([rerun, first])) == ({0}, [first])


def test_what_the_rule_refuses_and_why():
    r = asked()
    o = ran(r)
    other = uuid.uuid4()
    assert judge([o], Facts({}, {}, {ACCOUNT}, {})).rejected[0].startswith("no reservation for request acc-1")
    assert judge([o.model_copy(update={"account_id": other})], Facts({}, {}, {ACCOUNT, other}, {})).rejected[0] \
        .startswith("no reservation")
    assert reservation_problem(o, held(r, account_id=other)) == f"request acc-1 was reserved by account {other}, not {ACCOUNT}"
    assert reservation_problem(o, held(r, model="big")) == "request acc-1 was reserved for model 'big', not 'tiny'"
    assert reservation_problem(o, held(r, price_per_token=Decimal("0.000001"))) == \
        "outcome price_per_token 0.0001 != the reserved 0.000001"
    assert reservation_problem(o, held(r, platform_fee_rate=Decimal("0.1"))) == \
        "outcome platform_fee_rate 0.05 != the reserved 0.1"
    assert reservation_problem(o, held(r, max_tokens=2)) == "outcome 3 tokens > the 2 reserved"
    assert reservation_problem(o, held(r, amount=Decimal("0.0002"))) == "cost 0.0003 > the reserved 0.0002"
    # the same price written differently is the same price
    assert reservation_problem(o, held(r, price_per_token=Decimal("0.000100000000000000"))) is None
