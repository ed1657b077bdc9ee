"""Failure scopes, the upstream's wait headers (every form, the longest wins, garbage ignored), full-jitter
backoff bounds with an injected random source, and the exponential cooldown's growth and cap."""

from __future__ import annotations

import email.utils

import pytest
from hypothesis import given
from hypothesis import strategies as st

from at_gateway.config import CooldownConfig
from at_gateway.resilience.backoff import KEY, MAX_WAIT, REQUEST, TARGET, backoff, classify, cooldown, retry_after

NOW = 1_800_000_000.0  # a fixed wall clock for HTTP dates


def http_date(offset: float, form: str = "imf") -> str:
    """NOW + offset as each HTTP-date form of RFC 9110 §5.6.7."""
    import time

    t = time.gmtime(NOW + offset)
    if form == "imf":
        return email.utils.formatdate(NOW + offset, usegmt=True)
    if form == "rfc850":
        return time.strftime("%A, %d-%b-%y %H:%M:%S GMT", t)
    return time.strftime("%a %b %e %H:%M:%S %Y", t)  # asctime


# -- classify -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("status", "timeout", "scope"), [
    (429, False, KEY), (401, False, KEY), (403, False, KEY),
    (500, False, TARGET), (502, False, TARGET), (503, False, TARGET), (504, False, TARGET), (599, False, TARGET),
    (408, False, TARGET), (None, False, TARGET), (None, True, TARGET), (200, True, TARGET), (400, True, TARGET),
    (400, False, REQUEST), (404, False, REQUEST), (409, False, REQUEST), (413, False, REQUEST),
    (422, False, REQUEST), (200, False, REQUEST), (302, False, REQUEST), (600, False, REQUEST),
])
def test_classify(status: int | None, timeout: bool, scope: str) -> None:
    assert classify(status, timeout=timeout) == scope


# -- retry_after ----------------------------------------------------------------------------------------------
def h(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(n.encode(), v.encode("latin-1")) for n, v in pairs]


@pytest.mark.parametrize(("headers", "expected"), [
    # Retry-After: delta-seconds
    (h(("retry-after", "5")), 5.0),
    (h(("Retry-After", "120")), 120.0),
    (h(("RETRY-AFTER", " 7 ")), 7.0),
    (h(("retry-after", "0")), 0.0),
    (h(("retry-after", "1.5")), 1.5),  # not RFC, but sent in the wild
    # Retry-After: HTTP-date, all three forms, relative to the wall clock passed in
    (h(("retry-after", http_date(30))), 30.0),
    (h(("retry-after", http_date(90, "rfc850"))), 90.0),
    (h(("retry-after", http_date(45, "asctime"))), 45.0),
    (h(("retry-after", http_date(-60))), 0.0),  # in the past: go now, never negative
    # milliseconds
    (h(("retry-after-ms", "1500")), 1.5),
    (h(("x-ms-retry-after-ms", "250")), 0.25),
    (h(("retry-after-ms", "12.5")), 0.0125),
    # OpenAI's reset durations
    (h(("x-ratelimit-reset-requests", "1m30s")), 90.0),
    (h(("x-ratelimit-reset-tokens", "6ms")), 0.006),
    (h(("x-ratelimit-reset-requests", "20s")), 20.0),
    (h(("x-ratelimit-reset-tokens", "0.5s")), 0.5),
    (h(("x-ratelimit-reset-tokens", "2.5s")), 2.5),
    (h(("x-ratelimit-reset-requests", "1h2m3s")), 3723.0),
    (h(("x-ratelimit-reset-requests", "17")), 17.0),
    (h(("x-ratelimit-reset-tokens", "500us")), 0.0005),
    # the longest wins, whatever the order and the form
    (h(("retry-after", "2"), ("retry-after-ms", "3000")), 3.0),
    (h(("retry-after-ms", "3000"), ("retry-after", "2")), 3.0),
    (h(("x-ratelimit-reset-tokens", "1m"), ("retry-after", "5"), ("x-ratelimit-reset-requests", "6ms")), 60.0),
    (h(("retry-after", http_date(100)), ("x-ms-retry-after-ms", "20000")), 100.0),
    (h(("retry-after", "10"), ("retry-after", "4")), 10.0),
    # garbage is ignored, not fatal, and does not hide a readable one
    (h(("retry-after", "soon")), None),
    (h(("retry-after", "-5")), None),
    (h(("retry-after", "")), None),
    (h(("retry-after", "nan")), None),
    (h(("retry-after", "inf")), None),
    (h(("retry-after", "1e3")), None),
    (h(("retry-after-ms", "abc")), None),
    (h(("x-ratelimit-reset-requests", "1m30")), None),
    (h(("x-ratelimit-reset-requests", "m30s")), None),
    (h(("x-ratelimit-reset-requests", "1m 30s")), None),
    (h(("x-ratelimit-reset-tokens", "5 parsecs")), None),
    (h(("retry-after", "Mon, 32 Foo 2026 99:99:99 GMT")), None),
    (h(("retry-after", "soon"), ("retry-after-ms", "800")), 0.8),
    (h(("retry-after", "\xff\xfe"), ("x-ratelimit-reset-tokens", "3s")), 3.0),
    # nothing sent, or unrelated headers
    ([], None),
    (h(("content-type", "application/json"), ("x-ratelimit-remaining-requests", "0")), None),
    # clamped to a day
    (h(("retry-after", "99999999")), MAX_WAIT),
    (h(("x-ratelimit-reset-requests", "48h")), MAX_WAIT),
], ids=lambda v: repr(v)[:60])
def test_retry_after(headers: list[tuple[bytes, bytes]], expected: float | None) -> None:
    got = retry_after(headers, now_wall=NOW)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=1e-9)


def test_retry_after_date_uses_the_wall_clock_when_none_is_passed() -> None:
    import time

    got = retry_after(h(("retry-after", email.utils.formatdate(time.time() + 120, usegmt=True))))
    assert got is not None and 110 <= got <= 120


# -- backoff --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("attempt", "base", "cap", "ceiling"), [
    (0, 0.5, 8.0, 0.5), (1, 0.5, 8.0, 1.0), (2, 0.5, 8.0, 2.0), (3, 0.5, 8.0, 4.0), (4, 0.5, 8.0, 8.0),
    (5, 0.5, 8.0, 8.0), (60, 0.5, 8.0, 8.0), (5000, 0.5, 8.0, 8.0), (-1, 0.5, 8.0, 0.5), (3, 0.0, 8.0, 0.0),
    (2, 1.0, 3.0, 3.0),
])
def test_backoff_is_full_jitter_under_the_capped_exponential(attempt: int, base: float, cap: float,
                                                             ceiling: float) -> None:
    assert backoff(attempt, base, cap, rand=lambda: 0.0) == 0.0
    assert backoff(attempt, base, cap, rand=lambda: 0.5) == pytest.approx(ceiling / 2)
    top = backoff(attempt, base, cap, rand=lambda: 1.0 - 2**-53)
    assert top <= ceiling and top == pytest.approx(ceiling)


@given(st.integers(-5, 2000), st.floats(0, 100), st.floats(0, 1000), st.floats(0, 1, exclude_max=True))
def test_backoff_never_leaves_its_bounds(attempt: int, base: float, cap: float, r: float) -> None:
    wait = backoff(attempt, base, cap, rand=lambda: r)
    assert 0.0 <= wait <= cap
    if attempt <= 0:
        assert wait <= base  # the first retry waits at most the base
    assert backoff(attempt + 1, base, cap, rand=lambda: r) >= wait  # never shorter for a later attempt


# -- cooldown -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cfg", "expected"), [
    (CooldownConfig(), [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]),
    (CooldownConfig(initial=0.5, max=3.0), [0.5, 1.0, 2.0, 3.0, 3.0]),
    (CooldownConfig(initial=5.0, max=5.0), [5.0, 5.0, 5.0]),
])
def test_cooldown_doubles_to_its_cap(cfg: CooldownConfig, expected: list[float]) -> None:
    assert [cooldown(n, cfg) for n in range(1, len(expected) + 1)] == expected
    assert cooldown(0, cfg) == cfg.initial  # "at least one": 0 reads as the first
    assert cooldown(10**9, cfg) == cfg.max  # no overflow
