"""Token quotas and budgets over calendar periods, with reservations for the requests in flight.

A period is the current day, ISO week (from Monday) or month in ``budget_timezone`` (UTC by default),
derived from the clock each time it is needed, never reset by a timer job: a reset cannot be missed
or applied twice, and a gateway that was down over midnight starts in the right period.

A request is admitted while ``limit - used - reserved > 0``; it then reserves its worst case (its
prompt estimate plus its ``max_tokens`` cap, priced for budgets), atomically with the check. When it
finishes the reservation is replaced by what it used: its usage when the upstream reported it, its
worst case when it reached an upstream that said nothing (its client left, the stream broke), and
nothing when it never reached one or all its steps failed (released). So requests one after
another overshoot by at most the last answer, concurrent ones by at most one request's worth, never
by the number in flight.

What a quota starts from: the store's daily aggregates for the period (:data:`Baseline`), read
when the quota is first needed in this process (at the key's first request, or when a running
gateway sees a key get a ``tpd`` or budget, or a new budget period), not once at start. From then
on every request of the subject that carries the quota is counted in memory; a new period of a
quota counted all along starts at zero. Not in the figure read: rows the recorder had not written
yet (at most one batch interval) and requests that were already in flight when the quota appeared.
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


#: What the store says was used in a period so far: (subject, first day) -> (tokens, nano-dollars).
#: May raise :class:`NeedBaseline` where it must not read here (on an event loop).
Baseline = Callable[[str, str], "tuple[int, int]"]


class NeedBaseline(Exception):  # noqa: N818 -- a request for a read, not an error
    """A quota is needed whose period usage must first be read from the store, off the event loop."""

    def __init__(self, subject: str, first_day: str) -> None:
        super().__init__(subject, first_day)
        self.item = (subject, first_day)


def no_baseline(subject: str, first_day: str) -> tuple[int, int]:
    return 0, 0


def baseline_from_days(days: Mapping[str, Mapping[str, tuple[int, int]]]) -> Baseline:
    """A baseline from per-subject daily totals ``{subject: {day: (tokens, nanousd)}}`` (tests)."""

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
        self.ends = float("-inf")  # unix time the current period ends
        self.used = 0
        self.reserved = 0

    def roll(self, wall: float, tz: dt.tzinfo) -> None:
        """Enter the period holding ``wall`` when the one counted so far is over: it starts at zero,
        since this quota counted every request that carries it (none of the new period is elsewhere)."""
        if wall < self.ends:
            return
        self.first_day, self.ends = period_bounds(self.period, wall, tz)
        self.used = 0

    def left(self, limit: int) -> int:
        return limit - self.used - self.reserved

    def describe(self, limit: int, wall: float) -> dict[str, Any]:
        return {"limit": limit, "used": self.used, "reserved": self.reserved,
                "remaining": max(0, self.left(limit)), "period": self.period,
                "period_start": self.first_day, "resets_in": max(0, round(self.ends - wall))}
