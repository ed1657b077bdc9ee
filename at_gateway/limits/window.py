"""Exact sliding windows: a log of what was admitted, not counters reset on a timer.

A :class:`RequestWindow` logs the admission time of every request of the last ``span`` seconds, and
admits a request only while fewer than ``limit`` are logged. That is exact: take any span of length
``span`` and the last request admitted in it; every earlier admission of that span lies within
``span`` before it, so it was logged when the last one was admitted, and there were fewer than
``limit`` of them. Hence at most ``limit`` admissions in any span, and a slot frees when the oldest
logged admission leaves the window (an hour limit frees up per hour, never per minute).

A :class:`TokenWindow` logs ``(time, tokens)`` of the requests that finished within ``span`` and
adds what the requests in flight reserved: a request is admitted while that sum is below the limit.
Tokens are known only at the end, so a finished request enters the log at its finish time (every
request sees the tokens of every request that finished before it started) and holds its
reservation from admission until then.

Memory and time. Entries are coalesced per *granule* of ``span / 60000`` (1 ms for a minute, 60 ms
for an hour, 1.44 s for a day): an entry's time is its granule's end, the time rounded *up*. That
only makes an entry leave the window later than it would, so the bound above still holds (never
over), and a slot frees at most one granule late. A log so holds at most 60,001 entries, however
high the limit or the rate: two 8-byte integers each (the granule and the running total up to it),
in arrays, not one Python object per request. Expiry is a binary search, and the running totals
make "when will enough have left" a binary search too: O(log n) per admission, whatever the log.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from math import ceil

#: Granules per window: the bound on a log's entries, and how late (span / GRANULES) a slot may free.
GRANULES = 60_000


class _Log:
    """Granule numbers with running totals, oldest first; entries before ``head`` have left."""

    __slots__ = ("span", "per_s", "grains", "sums", "head", "gone", "added")

    def __init__(self, span: float) -> None:
        self.span = span
        self.per_s = GRANULES / span  # granules per second
        self.grains = array("q")  # granule numbers, ascending
        self.sums = array("q")  # the running total up to and including each entry
        self.head = 0  # the first entry still inside the window
        self.gone = 0  # the running total of what has left the window
        self.added = 0  # the running total of everything logged

    def _expire(self, now: float) -> int:
        """Drop what left the window; what the window holds."""
        grains = self.grains
        head = self.head
        n = len(grains)
        # An entry (granule g, ending at g / per_s) leaves once that end is before now - span.
        edge = (now - self.span) * self.per_s
        if head < n and grains[head] < edge:
            head = bisect_left(grains, edge, head)
            self.gone = self.sums[head - 1]
            if head == n or (head >= 1024 and head * 4 >= n):  # compact: amortised O(1) per entry
                del grains[:head]
                del self.sums[:head]
                head = 0
            self.head = head
        return self.added - self.gone

    def _log(self, now: float, amount: int) -> None:
        # (Invariant: an emptied log is compacted, so a non-empty one has live entries up to its end.)
        at = now * self.per_s
        grains = self.grains
        self.added += amount
        if grains and grains[-1] >= at:  # the same granule (or the clock stood still)
            self.sums[-1] = self.added
        else:
            grains.append(ceil(at))
            self.sums.append(self.added)

    def _leaves_in(self, now: float, amount: int) -> float | None:
        """Seconds until ``amount`` of what is logged has left the window; None when less is logged."""
        if amount > self.added - self.gone:
            return None
        i = bisect_left(self.sums, self.gone + amount, self.head)
        return max(0.0, self.grains[i] / self.per_s + self.span - now)

    def oldest(self) -> float | None:
        """When the oldest entry still logged was (its granule's end)."""
        return self.grains[self.head] / self.per_s if self.grains else None

    def _resets_in(self, now: float) -> float:
        if not self.grains:
            return 0.0
        return max(0.0, self.grains[-1] / self.per_s + self.span - now)

    def __len__(self) -> int:
        """Entries held (granules), not requests."""
        return len(self.grains) - self.head


class RequestWindow(_Log):
    __slots__ = ()

    #: Admissions in the closed window [now - span, now] (granules rounded up).
    count = _Log._expire

    def add(self, now: float) -> None:
        # _log(now, 1), inlined: once per admission and window
        at = now * self.per_s
        grains = self.grains
        self.added += 1
        if grains and grains[-1] >= at:
            self.sums[-1] = self.added
        else:
            grains.append(ceil(at))
            self.sums.append(self.added)

    def frees_in(self, now: float, limit: int) -> float:
        """Seconds until fewer than ``limit`` are logged (0 when that is already so). Call after count()."""
        over = self.added - self.gone - limit + 1
        if over <= 0:
            return 0.0
        got = self._leaves_in(now, over)
        return 0.0 if got is None else got

    def resets_in(self, now: float) -> float:
        """Seconds until the window is empty again (OpenAI's x-ratelimit-reset-*: back to its initial state)."""
        return self._resets_in(now)


class TokenWindow(_Log):
    __slots__ = ("reserved",)

    def __init__(self, span: float) -> None:
        super().__init__(span)
        self.reserved = 0  # worst cases of the requests in flight

    @property
    def total(self) -> int:
        """Tokens in the log (after the last :meth:`used`)."""
        return self.added - self.gone

    def used(self, now: float) -> int:
        """Tokens of the requests finished within the window plus the reservations in flight."""
        grains = self.grains
        if grains and grains[self.head] < (now - self.span) * self.per_s:
            self._expire(now)
        return self.added - self.gone + self.reserved

    def add(self, now: float, tokens: int) -> None:
        if tokens > 0:
            self._log(now, tokens)

    def frees_in(self, now: float, limit: int) -> float:
        """Seconds until the used tokens drop below ``limit``, counting only the log (reservations end
        with their requests, which cannot be foreseen: when the log alone cannot free enough, one
        second, a guess). Call after used()."""
        need = self.added - self.gone + self.reserved - limit + 1
        if need <= 0:
            return 0.0
        got = self._leaves_in(now, need)
        return 1.0 if got is None else got

    def resets_in(self, now: float) -> float:
        return self._resets_in(now)
