"""Exact sliding windows: a log of what was admitted, not counters reset on a timer.

A :class:`RequestWindow` keeps the admission time of every request of the last ``span`` seconds, and
admits a request only while fewer than ``limit`` are logged. That is exact: take any span of length
``span`` and the last request admitted in it; every earlier admission of that span lies within
``span`` before it, so it was logged when the last one was admitted, and there were fewer than
``limit`` of them. Hence at most ``limit`` admissions in any span, and a slot frees exactly when the
oldest logged admission leaves the window (an hour limit frees up per hour, never per minute).

A :class:`TokenWindow` logs ``(time, tokens)`` of the requests that finished within ``span`` and
adds what the requests in flight reserved: a request is admitted while that sum is below the limit.
Tokens are known only at the end, so a finished request enters the log at its finish time (every
request sees the tokens of every request that finished before it started) and holds its
reservation from admission until then.

Memory: one float per admitted request still inside the window (so at most ``limit`` of them), one
tuple per finished request inside the token window.
"""

from __future__ import annotations

from collections import deque


class RequestWindow:
    __slots__ = ("span", "times")

    def __init__(self, span: float) -> None:
        self.span = span
        self.times: deque[float] = deque()

    def count(self, now: float) -> int:
        """Admissions in the closed window [now - span, now]."""
        times = self.times
        edge = now - self.span
        while times and times[0] < edge:
            times.popleft()
        return len(times)

    def add(self, now: float) -> None:
        self.times.append(now)

    def frees_in(self, now: float, limit: int) -> float:
        """Seconds until fewer than ``limit`` are logged (0 when that is already so). Call after count()."""
        times = self.times
        over = len(times) - limit
        if over < 0:
            return 0.0
        return max(0.0, times[over] + self.span - now)

    def resets_in(self, now: float) -> float:
        """Seconds until the window is empty again (OpenAI's x-ratelimit-reset-*: back to its initial state)."""
        return max(0.0, self.times[-1] + self.span - now) if self.times else 0.0


class TokenWindow:
    __slots__ = ("span", "log", "total", "reserved")

    def __init__(self, span: float) -> None:
        self.span = span
        self.log: deque[tuple[float, int]] = deque()
        self.total = 0  # tokens in the log
        self.reserved = 0  # worst cases of the requests in flight

    def used(self, now: float) -> int:
        """Tokens of the requests finished within the window plus the reservations in flight."""
        log = self.log
        edge = now - self.span
        while log and log[0][0] < edge:
            self.total -= log.popleft()[1]
        return self.total + self.reserved

    def add(self, now: float, tokens: int) -> None:
        if tokens > 0:
            self.log.append((now, tokens))
            self.total += tokens

    def frees_in(self, now: float, limit: int) -> float:
        """Seconds until the used tokens drop below ``limit``, counting only the log (reservations end
        with their requests, which cannot be foreseen: then one second, a guess). Call after used()."""
        need = self.total + self.reserved - limit + 1
        if need <= 0:
            return 0.0
        freed = 0
        for t, n in self.log:
            freed += n
            if freed >= need:
                return max(0.0, t + self.span - now)
        return 1.0

    def resets_in(self, now: float) -> float:
        return max(0.0, self.log[-1][0] + self.span - now) if self.log else 0.0
