"""Token quotas and budgets over calendar periods, with reservations for the requests in flight.

A period is the current day, ISO week (from Monday) or month in ``budget_timezone`` (UTC by default),
derived from the clock each time it is needed, never reset by a timer job: a reset cannot be missed
or applied twice, and a gateway that was down over midnight starts in the right period.

A request is admitted while ``limit - used - reserved > 0``; it then reserves its worst case (its
prompt estimate plus its ``max_tokens`` cap, priced for budgets), atomically with the check. When it
finishes the reservation is replaced by what it used (a failed request just releases it). So
requests one after another overshoot by at most the last answer, concurrent ones by at most one
request's worth, never by the number in flight.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from typing import Any

PERIODS = ("day", "week", "month")
_UTC = dt.timezone.utc


def timezone(name: str) -> dt.tzinfo:
    if name in ("", "UTC"):
        return _UTC
    import zoneinfo

    return zoneinfo.ZoneInfo(name)


def period_bounds(period: str, wall: float, tz: dt.tzinfo) -> tuple[str, float]:
    """The first day (``YYYY-MM-DD``, as usage_daily names days) of the period holding ``wall``, and the
    unix time at which the period ends."""
    day = dt.datetime.fromtimestamp(wall, tz).date()
    if period == "day":
        start, end = day, day + dt.timedelta(days=1)
    elif period == "week":
        start = day - dt.timedelta(days=day.weekday())
        end = start + dt.timedelta(days=7)
    elif period == "month":
        start = day.replace(day=1)
        end = (start + dt.timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown period {period!r}")
    # Midnight as the zone's wall clock says it (a DST day is 23 or 25 hours long).
    ends = dt.datetime(end.year, end.month, end.day, tzinfo=tz).timestamp()
    return start.isoformat(), ends


#: What a store read at start says was used before: (subject, first day) -> (tokens, nano-dollars).
Baseline = Callable[[str, str], "tuple[int, int]"]


def no_baseline(subject: str, first_day: str) -> tuple[int, int]:
    return 0, 0


def baseline_from_days(days: Mapping[str, Mapping[str, tuple[int, int]]]) -> Baseline:
    """A baseline from per-subject daily totals ``{subject: {day: (tokens, nanousd)}}`` read at start."""

    def baseline(subject: str, first_day: str) -> tuple[int, int]:
        per_day = days.get(subject)
        if not per_day:
            return 0, 0
        tokens = cost = 0
        for day, (t, c) in per_day.items():
            if day >= first_day:
                tokens += t
                cost += c
        return tokens, cost

    return baseline


class Quota:
    """One subject's tokens (``tpd``) or nano-dollars (budget) in the current period."""

    __slots__ = ("subject", "period", "money", "first_day", "ends", "used", "reserved")

    def __init__(self, subject: str, period: str, money: bool) -> None:
        self.subject = subject
        self.period = period
        self.money = money
        self.first_day = ""
        self.ends = float("-inf")  # unix time the current period ends: the first use rolls it
        self.used = 0
        self.reserved = 0

    def roll(self, wall: float, tz: dt.tzinfo, baseline: Baseline) -> None:
        """Enter the period holding ``wall`` when the one counted so far is over."""
        if wall < self.ends:
            return
        self.first_day, self.ends = period_bounds(self.period, wall, tz)
        tokens, cost = baseline(self.subject, self.first_day)
        self.used = cost if self.money else tokens

    def left(self, limit: int) -> int:
        return limit - self.used - self.reserved

    def describe(self, limit: int, wall: float) -> dict[str, Any]:
        return {"limit": limit, "used": self.used, "reserved": self.reserved,
                "remaining": max(0, self.left(limit)), "period": self.period,
                "period_start": self.first_day, "resets_in": max(0, round(self.ends - wall))}
