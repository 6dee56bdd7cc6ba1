"""The per-key limit rule (farmesh.billing.limits): pure, the clock passed in."""
from __future__ import annotations

from datetime import datetime, timezone

from farmesh.billing.limits import Limits, Usage, check, next_month
from schemas import money

NOW = datetime(2026, 12, 31, 23, 59, 45, 500000, tzinfo=timezone.utc)


def test_no_limits_admit_anything() -> None:
    assert not Limits().any
    assert check(Limits(), Usage(NOW, 10**6, 10**9, 10**30), 10**6, 10**30) is None


def test_requests_per_minute_refuses_the_one_past_it_until_the_next_minute() -> None:
    assert check(Limits(requests_per_minute=2), Usage(NOW, requests=1), 5, 0) is None
    over = check(Limits(requests_per_minute=2), Usage(NOW, requests=2), 5, 0)
    assert over is not None and over.limit == "requests_per_minute" and over.retry_after == 15


def test_tokens_per_minute_counts_the_requests_max_tokens() -> None:
    assert check(Limits(tokens_per_minute=30), Usage(NOW, tokens=20), 10, 0) is None
    over = check(Limits(tokens_per_minute=30), Usage(NOW, tokens=21), 10, 0)
    assert over is not None and over.limit == "tokens_per_minute" and "max_tokens" in over.message


def test_the_monthly_budget_counts_what_is_held_and_charged_and_resets_next_month() -> None:
    budget = Limits(monthly_budget=5 * money.SCALE)
    assert check(budget, Usage(NOW, month_spent=4 * money.SCALE), 1, money.SCALE) is None
    over = check(budget, Usage(NOW, month_spent=4 * money.SCALE + 1), 1, money.SCALE)
    assert over is not None and over.limit == "monthly_budget" and over.retry_after == 15
    assert next_month(NOW) == datetime(2027, 1, 1, tzinfo=timezone.utc)


def test_out_of_bounds_values_name_their_field() -> None:
    assert [f for f, _ in Limits(0, 10**10, -1).problems()] == ["requests_per_minute", "tokens_per_minute",
                                                                 "monthly_budget_far"]
    assert Limits(1, 1, 1).problems() == []
