"""Classifying failures, reading how long an upstream asks to wait, and backoff.

Pure functions: no clock of their own (the wall time for an HTTP date is passed in or read once), so the
tests drive every case without sleeping.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import random
import re
import time
from collections.abc import Callable, Iterable

from ..config import CooldownConfig

KEY, TARGET, REQUEST = "key", "target", "request"  # the three scopes of a failure

# An upstream asking for more than a day is clamped to a day: a garbage or hostile header must not bench a
# key for years (the state outlives reloads), and no real rate limit resets later than daily.
MAX_WAIT = 86400.0

_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")
# OpenAI's x-ratelimit-reset-* are Go durations ("1m30s", "6ms", "0.5s", "1h2m3.5s"); "d" is accepted too.
_PIECE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|us|µs|μs|ns|h|m|s|d)")
_UNIT = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6,
         "ns": 1e-9}


def classify(status: int | None, *, timeout: bool = False) -> str:
    """``KEY`` for 429/401/403, ``TARGET`` for 5xx, 408, timeouts and connection errors (``status`` None),
    ``REQUEST`` for any other 4xx (and anything else: never retried).

    A timeout is the target's fault whatever status came with it (a 200 whose body stalled is still slow)."""
    if timeout or status is None:
        return TARGET
    if status in (429, 401, 403):
        return KEY
    if status == 408 or 500 <= status <= 599:
        return TARGET
    return REQUEST


def _seconds(text: str) -> float | None:
    """A non-negative decimal number of seconds (``Retry-After: 5``; ``1.5`` is tolerated), else None."""
    return float(text) if _NUMBER.fullmatch(text) else None


def _http_date(text: str, now_wall: float) -> float | None:
    """Seconds from ``now_wall`` to an HTTP-date (RFC 9110 §5.6.7: IMF-fixdate, RFC 850 or asctime; all three
    are read by :func:`email.utils.parsedate_to_datetime`). A date without a zone is GMT, as the RFC says."""
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:  # Python 3.10 returns None for some unreadable dates
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp() - now_wall


def _duration(text: str) -> float | None:
    """A Go-style duration (``1m30s``, ``6ms``, ``20s``, ``0.5s``) or a bare number of seconds."""
    plain = _seconds(text)
    if plain is not None:
        return plain
    pos, total = 0, 0.0
    for m in _PIECE.finditer(text):
        if m.start() != pos:
            return None  # something between the pieces: not a duration
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    return total if pos == len(text) and pos else None


def retry_after(headers: Iterable[tuple[bytes, bytes]], now_wall: float | None = None) -> float | None:
    """Seconds the upstream asks to wait: the longest of ``Retry-After`` (seconds or an HTTP date),
    ``retry-after-ms``, ``x-ms-retry-after-ms``, ``x-ratelimit-reset-requests`` / ``-tokens`` (OpenAI's
    ``1m30s``, ``6ms``, ``2.5s`` or a number); None when none is sent or readable. Never negative.

    The longest, because each header names a different limit and the request can go only when all of them
    allow it. A date in the past reads as 0 (go now); unreadable values are ignored, not fatal; more than
    :data:`MAX_WAIT` is clamped to it. ``now_wall`` is ``time.time()`` (an HTTP date is wall-clock)."""
    best: float | None = None
    for raw_name, raw_value in headers:
        name = raw_name.lower()
        value = raw_value.decode("latin-1").strip()
        if name == b"retry-after":
            wait = _seconds(value)
            if wait is None:
                wait = _http_date(value, time.time() if now_wall is None else now_wall)
        elif name in (b"retry-after-ms", b"x-ms-retry-after-ms"):
            wait = _seconds(value)
            wait = None if wait is None else wait / 1000.0
        elif name in (b"x-ratelimit-reset-requests", b"x-ratelimit-reset-tokens"):
            wait = _duration(value)
        else:
            continue
        if wait is None or not math.isfinite(wait):
            continue
        wait = min(max(wait, 0.0), MAX_WAIT)
        if best is None or wait > best:
            best = wait
    return best


def backoff(attempt: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)] (``attempt`` 0 for the first retry).

    Full jitter (AWS's "Exponential Backoff And Jitter") spreads the retries of many clients that failed
    together over the whole interval, instead of sending them back in one wave."""
    return rand() * _ceiling(attempt, base, cap)


def cooldown(consecutive: int, cfg: CooldownConfig) -> float:
    """The exponential cooldown after ``consecutive`` (>= 1) failures: initial, 2x, 4x ... capped at max."""
    return _ceiling(consecutive - 1, cfg.initial, cfg.max)


def _ceiling(exponent: int, base: float, cap: float) -> float:
    """``min(cap, base * 2**exponent)`` without overflowing for a large exponent."""
    exponent = max(0, exponent)
    if base <= 0:
        return 0.0
    if exponent >= 1000:  # 2.0**1024 overflows; any base > 0 reached the cap long before
        return cap
    return min(cap, base * 2.0**exponent)
