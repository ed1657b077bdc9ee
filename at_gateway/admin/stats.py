"""Admin API: ``stats/series``, ``stats/top`` and ``stats/live``, what the dashboard's charts and tables show.

``series`` and ``top`` read the per-minute rollups (``usage_minute``, written by the store's writer with the
request-log rows: see :mod:`at_gateway.store.usage`), never the request log: a window of an hour is at most
an hour of rollup rows, read in primary-key order (the minute first), whatever the log holds. Latency and
time-to-first-token percentiles are estimated from the rollups' fixed buckets (:func:`percentile`: within
one bucket of the exact value). Rows reach the rollups with the store's batch (within ``interval``, 200 ms).

``live`` is what this process answers right now (``services.in_flight``), no database at all; with
``workers: N`` each worker knows only its own, and says so (``"scope": "this worker"``).

Times are Unix seconds, minutes their first second (``t``); a window of ``minutes`` ends with the current
minute, so its last point is still growing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from ..store.usage import ROLLUP_BOUNDS_MS, ROLLUP_BUCKETS
from .api import AdminRequest, Answer, Route
from .reports import _only

MAX_MINUTES = 1440  # a day of minutes: the dashboard shows the last hour
DEFAULT_TOP = 20
MAX_TOP = 100
MAX_LIVE = 1000
#: ``by`` values of stats/top and their rollup columns.
TOP_BY = {"route": "route", "provider": "provider", "key": "key_id", "model": "model"}
_FILTERS = (("route", "route"), ("provider", "provider"), ("model", "model"), ("key", "key_id"))
_LAT = ", ".join(f"sum(lat_{i})" for i in range(ROLLUP_BUCKETS))
_TTFT = ", ".join(f"sum(ttft_{i})" for i in range(ROLLUP_BUCKETS))


def percentile(hist: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (0 < q <= 1) of the durations counted in ``hist`` (one count per bucket of
    :data:`~at_gateway.store.usage.ROLLUP_BOUNDS_MS`, then the overflow bucket), in milliseconds; None
    without samples.

    The nearest-rank value's bucket is found from the counts, and the value interpolated linearly inside
    it (as Prometheus's ``histogram_quantile`` does), so the estimate always lies in the exact value's
    bucket; in the overflow bucket, it is that bucket's lower bound (the last bound)."""
    total = sum(hist)
    if total <= 0:
        return None
    rank = min(total, max(1, math.ceil(round(q * total, 6))))  # rounded first: 0.95 * 20 is 19, not 19.000001
    below = 0
    for i, n in enumerate(hist):
        if n and below + n >= rank:
            lo = ROLLUP_BOUNDS_MS[i - 1] if i > 0 else 0.0
            if i >= len(ROLLUP_BOUNDS_MS):
                return float(lo)
            hi = ROLLUP_BOUNDS_MS[i]
            return lo + (hi - lo) * (rank - below) / n
        below += n
    return float(ROLLUP_BOUNDS_MS[-1])  # not reached: the counts add up to total


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _usd(nanousd: int) -> float:
    """Cost as a number of dollars, for charts (exact decimal strings are the usage endpoint's)."""
    return round(nanousd / 1e9, 9)


def _window(req: AdminRequest) -> tuple[int, int]:
    """``(first minute, last minute)`` of the ``minutes`` query parameter (default 60), the last one now."""
    minutes = req.q_int("minutes", 60, 1, MAX_MINUTES) or 60
    last = int(time.time() // 60) * 60
    return last - (minutes - 1) * 60, last


def _where(req: AdminRequest, t0: int, t1: int) -> tuple[str, list[Any]]:
    where = ["minute BETWEEN ? AND ?"]
    args: list[Any] = [t0, t1]
    for name, col in _FILTERS:
        if name in req.query:
            where.append(f"{col} = ?")
            args.append(req.query[name])
    return " WHERE " + " AND ".join(where), args


# -- series ----------------------------------------------------------------------------------------------

async def series(req: AdminRequest) -> Answer:
    """``GET stats/series?minutes=60&route=&provider=&model=&key=``: one point per minute of the window (empty
    minutes as zeros): requests, errors, fallbacks, p50/p95 latency and time to first token, tokens, cost."""
    _only(req, ("minutes", *(name for name, _ in _FILTERS)))
    t0, t1 = _window(req)
    where, args = _where(req, t0, t1)
    # Index: usage_minute's primary key (minute, ...): the window's rows in order, grouped as they come.
    sql = ("SELECT minute, sum(requests), sum(errors), sum(fallbacks), sum(prompt_tokens), sum(completion_tokens), "
           f"sum(cost_nanousd), {_LAT}, {_TTFT} FROM usage_minute{where} GROUP BY minute")  # noqa: S608
    catalog = req.catalog

    def read() -> list[tuple[Any, ...]]:
        return list(catalog.conn.execute(sql, args).fetchall())

    found = {r[0]: r for r in await req.db(read)}
    points = []
    lat, ttft = 7, 7 + ROLLUP_BUCKETS
    for t in range(t0, t1 + 60, 60):
        r = found.get(t)
        if r is None:
            points.append({"t": t, "requests": 0, "errors": 0, "fallbacks": 0, "p50_ms": None, "p95_ms": None,
                           "ttft_p50_ms": None, "ttft_p95_ms": None, "prompt_tokens": 0, "completion_tokens": 0,
                           "cost_usd": 0.0})
            continue
        lh, th = r[lat:ttft], r[ttft:]
        points.append({"t": t, "requests": int(r[1]), "errors": int(r[2]), "fallbacks": int(r[3]),
                       "p50_ms": _ms(percentile(lh, 0.5)), "p95_ms": _ms(percentile(lh, 0.95)),
                       "ttft_p50_ms": _ms(percentile(th, 0.5)), "ttft_p95_ms": _ms(percentile(th, 0.95)),
                       "prompt_tokens": int(r[4]), "completion_tokens": int(r[5]), "cost_usd": _usd(int(r[6]))})
    return Answer({"object": "series", "step": 60, "from": t0, "to": t1, "points": points})


# -- top -------------------------------------------------------------------------------------------------

async def top(req: AdminRequest) -> Answer:
    """``GET stats/top?by=route|provider|key|model&minutes=60&limit=20`` (and the series' filters): the busiest
    routes (providers, keys, models) of the window, most requests first, with errors, p95 latency, tokens and
    cost. A request without one (an unknown route's 404, a 401 before any key) is the row named null."""
    _only(req, ("by", "minutes", "limit", *(name for name, _ in _FILTERS)))
    by = req.q_str("by", "route", TOP_BY) or "route"
    col = TOP_BY[by]
    limit = req.q_int("limit", DEFAULT_TOP, 1, MAX_TOP) or DEFAULT_TOP
    t0, t1 = _window(req)
    where, args = _where(req, t0, t1)
    # Index: the primary key's minute range; the groups (a few per route, key...) sorted in a temporary b-tree.
    sql = (f"SELECT {col}, sum(requests) AS n, sum(errors), sum(prompt_tokens) + sum(completion_tokens), "
           f"sum(cost_nanousd), {_LAT} FROM usage_minute{where} GROUP BY {col} "  # noqa: S608
           f"ORDER BY n DESC, {col} LIMIT ?")
    catalog = req.catalog

    def read() -> tuple[list[tuple[Any, ...]], dict[str, str]]:
        conn = catalog.conn
        found = conn.execute(sql, [*args, limit]).fetchall()
        names: dict[str, str] = {}
        ids = [r[0] for r in found if r[0]]
        if by == "key" and ids:
            names = dict(conn.execute(f"SELECT id, name FROM keys WHERE id IN ({','.join('?' * len(ids))})",  # noqa: S608
                                      ids).fetchall())
        return found, names

    found, names = await req.db(read)
    data = []
    for r in found:
        item: dict[str, Any] = {"name": r[0] or None, "requests": int(r[1]), "errors": int(r[2]),
                                "p95_ms": _ms(percentile(r[5:], 0.95)), "tokens": int(r[3]),
                                "cost_usd": _usd(int(r[4]))}
        if by == "key":
            item["key_name"] = names.get(r[0])
        data.append(item)
    return Answer({"object": "list", "by": by, "from": t0, "to": t1, "data": data})


# -- live ------------------------------------------------------------------------------------------------

async def live(req: AdminRequest) -> Answer:
    """``GET stats/live?limit=100``: the requests this process is answering now, the oldest first (admin calls,
    the dashboard's own polling among them, are not shown)."""
    _only(req, ("limit",))
    limit = req.q_int("limit", 100, 1, MAX_LIVE) or 100
    gateway = req.gateway
    now = time.perf_counter()
    running = sorted((ctx for ctx in list(gateway.services.in_flight.values()) if not ctx.unlogged),
                     key=lambda ctx: ctx.started)
    body: dict[str, Any] = {
        "in_flight": len(running),
        "requests": [{"request_id": ctx.request_id, "method": ctx.method, "path": ctx.path, "route": ctx.route,
                      "provider": ctx.provider, "model": ctx.model, "client": ctx.client or None,
                      "stream": ctx.stream, "door": ctx.door.name if ctx.door is not None else None,
                      "age_ms": round((now - ctx.started) * 1000, 1)}
                     for ctx in running[:limit]],
    }
    if gateway.config.workers > 1:
        body["scope"] = "this worker"
    return Answer(body)


ROUTES: list[Route] = [
    ("GET", ("stats", "series"), series),
    ("GET", ("stats", "top"), top),
    ("GET", ("stats", "live"), live),
]

__all__ = ["MAX_MINUTES", "ROUTES", "TOP_BY", "percentile"]
