"""Per-key limits: the rule, without I/O (the clock and the counts are passed in).

A key may carry three limits (none: unlimited):

- requests_per_minute: requests admitted in the current minute (UTC, fixed windows);
- tokens_per_minute:   tokens in the current minute, counted on `max_tokens` when a request is admitted and
                       corrected to the tokens delivered when the ledger settles it;
- monthly_budget:      base units the key may spend per calendar month (UTC): what its open reservations hold plus
                       what its settled ones were charged.

`check` says whether one more request (its max_tokens, the amount reserved for it) fits, and if not which limit
refuses it and in how many seconds to retry. The counts come from PostgreSQL (far_rate_counters and the key's
reservations, read under the account's row lock: farmesh/billing/accounts.py), so the limits hold over every gateway.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from schemas import money

MAX_REQUESTS_PER_MINUTE = 1_000_000
MAX_TOKENS_PER_MINUTE = 1_000_000_000
MAX_MONTHLY_BUDGET = 10**12 * money.SCALE  # FAR 10^12 per month: anything larger is a typo


@dataclass(frozen=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    monthly_budget: int | None = None  # base units

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.requests_per_minute, self.tokens_per_minute, self.monthly_budget))

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for each value out of bounds (the APIs answer 422 naming the field)."""
        out = []
        for name, value, top in (("requests_per_minute", self.requests_per_minute, MAX_REQUESTS_PER_MINUTE),
                                 ("tokens_per_minute", self.tokens_per_minute, MAX_TOKENS_PER_MINUTE),
                                 ("monthly_budget_far", self.monthly_budget, MAX_MONTHLY_BUDGET)):
            if value is not None and not 1 <= value <= top:
                shown = money.text(money.to_far(top)) if name == "monthly_budget_far" else str(top)
                out.append((name, f"must be positive and at most {shown} (null: no limit)"))
        return out


@dataclass(frozen=True)
class Usage:
    """What a key has used, as of `now` (the database's clock)."""

    now: datetime
    requests: int = 0  # admitted in now's minute
    tokens: int = 0  # of now's minute (max_tokens until settled, then delivered)
    month_spent: int = 0  # base units: held by open reservations + charged, this calendar month


@dataclass(frozen=True)
class Exceeded:
    limit: str  # requests_per_minute | tokens_per_minute | monthly_budget
    message: str
    retry_after: int  # seconds


def minute_start(now: datetime) -> datetime:
    return now.replace(second=0, microsecond=0)


def month_start(now: datetime) -> datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month(now: datetime) -> datetime:
    start = month_start(now)
    return (start + timedelta(days=32)).replace(day=1)


def _seconds_until(now: datetime, then: datetime) -> int:
    return max(1, math.ceil((then - now).total_seconds()))


def check(limits: Limits, usage: Usage, max_tokens: int, amount: int) -> Exceeded | None:
    """None when a request of `max_tokens` holding `amount` base units fits the key's limits, else the first
    limit it would pass (requests, then tokens, then the monthly budget)."""
    next_minute = _seconds_until(usage.now, minute_start(usage.now) + timedelta(minutes=1))
    if limits.requests_per_minute is not None and usage.requests + 1 > limits.requests_per_minute:
        return Exceeded("requests_per_minute", f"this key may make {limits.requests_per_minute} requests per "
                        f"minute and made {usage.requests} this minute; retry in {next_minute} s", next_minute)
    if limits.tokens_per_minute is not None and usage.tokens + max_tokens > limits.tokens_per_minute:
        return Exceeded("tokens_per_minute", f"this key may use {limits.tokens_per_minute} tokens per minute; "
                        f"{usage.tokens} are counted this minute and this request asks for {max_tokens} "
                        f"(max_tokens); retry in {next_minute} s", next_minute)
    if limits.monthly_budget is not None and usage.month_spent + amount > limits.monthly_budget:
        wait = _seconds_until(usage.now, next_month(usage.now))
        return Exceeded("monthly_budget", f"this key may spend {money.text(money.to_far(limits.monthly_budget))} "
                        f"FAR per month and has spent or holds {money.text(money.to_far(usage.month_spent))} FAR; "
                        f"this request may cost {money.text(money.to_far(amount))} FAR", wait)
    return None
