from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from farmesh import money
from farmesh.pricing import Work, session_cost, split


def test_plan_price_is_exact():
    price = money.to_base_units(Decimal("0.0001"))
    assert price == 10**14
    assert money.to_far(session_cost(1000, price)) == Decimal("0.1")


def test_price_finer_than_a_base_unit_is_refused():
    with pytest.raises(ValueError):
        money.to_base_units(Decimal("1e-19"))


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
