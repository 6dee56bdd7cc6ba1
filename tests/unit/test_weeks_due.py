"""Which ISO weeks the payments service closes, and when (consumers/payments/schedule.py, pure)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from consumers.payments.repository import iso_week, week_start
from consumers.payments.schedule import week_end, weeks_due

HOUR = 3600.0


def at(week: str, seconds: float = 0.0) -> datetime:
    return week_start(week) + timedelta(seconds=seconds)


def test_the_previous_week_is_due_once_the_grace_has_passed() -> None:
    # 2026-W48 started Monday 2026-11-23 00:00 UTC; W47 ended then.
    assert weeks_due(at("2026-W48", HOUR - 1), HOUR, "2026-W46") == []
    assert weeks_due(at("2026-W48", HOUR), HOUR, "2026-W46") == ["2026-W47"]
    assert weeks_due(at("2026-W48", 6 * 86400), HOUR, "2026-W46") == ["2026-W47"]
    assert weeks_due(at("2026-W48", HOUR), 0, "2026-W47") == []  # closed already: nothing to do (idempotent)
    assert weeks_due(at("2026-W48"), 0, "2026-W46") == ["2026-W47"]  # no grace: at the very end of the week


def test_nothing_closed_yet_closes_only_the_latest_ended_week() -> None:
    assert weeks_due(at("2026-W48", 2 * HOUR), HOUR, None) == ["2026-W47"]
    assert weeks_due(at("2026-W48", 30), HOUR, None) == ["2026-W46"]  # W47's grace is still running


def test_missed_weeks_close_in_order_across_the_year() -> None:
    # 2026 has 53 ISO weeks; 2027-W01 starts Monday 2027-01-04.
    assert weeks_due(at("2027-W02", HOUR), HOUR, "2026-W51") == ["2026-W52", "2026-W53", "2027-W01"]
    assert weeks_due(at("2027-W01", HOUR), HOUR, "2026-W52") == ["2026-W53"]


def test_a_week_closed_ahead_of_the_clock_is_never_closed_again() -> None:
    assert weeks_due(at("2026-W48", HOUR), HOUR, "2026-W50") == []


@pytest.mark.parametrize("grace", [0.0, 59.0, HOUR, 86400.0, 6.5 * 86400])
def test_a_week_is_due_exactly_when_it_ended_grace_ago(grace: float) -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for hours in range(0, 24 * 7 * 3, 5):
        now = start + timedelta(hours=hours, seconds=17)
        (due,) = weeks_due(now, grace, None)
        assert week_end(due) + timedelta(seconds=grace) <= now, (now, due)
        assert week_end(iso_week(week_end(due))) + timedelta(seconds=grace) > now, (now, due)  # the next is not
