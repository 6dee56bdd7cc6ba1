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
