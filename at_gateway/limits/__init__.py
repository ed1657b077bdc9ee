"""Rate limits, token quotas and budgets: per client key (its own limits, else ``limits:``) and per
route (a global cap over every caller).

- :mod:`.window`: exact sliding logs (requests per minute/hour/day, tokens per minute);
- :mod:`.quota`: tokens per day and budgets over calendar periods, with reservations in flight;
- :mod:`.base`: the state that decides (:class:`LimitState`) and the worker's side (headers, 429s);
- :mod:`.local`: ``workers: 1``, the state in the worker; :mod:`.shared`: ``workers: N``, the state
  in the supervisor, asked over a socket pair (a later Redis limiter goes behind the same interface).
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING

from .base import LimitState
from .quota import Baseline, baseline_from_days, no_baseline, timezone

if TYPE_CHECKING:
    from ..config import Config
    from ..services import Limiter

log = logging.getLogger("at_gateway.limits")

__all__ = ["LimitState", "limits_possible", "load_baseline", "new_state", "open_limiter"]


def limits_possible(config: Config) -> bool:
    """Whether any request can meet a limit: a store file (its client keys may have limits, or get the
    ``limits:`` defaults), or a route with ``limits``."""
    return config.store.path != ":memory:" or any(r.limits is not None for r in config.routes.values())


def load_baseline(config: Config, wall: float | None = None) -> Baseline:
    """What each key and route used in the days the current periods cover (up to 31 days back), read
    once at start from the daily aggregates, so quotas and budgets survive restarts."""
    if config.store.path == ":memory:":
        return no_baseline
    import datetime as dt

    from ..store.db import connect

    wall = time.time() if wall is None else wall
    first = (dt.datetime.fromtimestamp(wall, timezone(config.budget_timezone)).date()
             - dt.timedelta(days=31)).isoformat()
    days: dict[str, dict[str, tuple[int, int]]] = {}
    conn = connect(config.store.path)
    try:
        for column, prefix in (("key_id", "key:"), ("route", "route:")):
            rows = conn.execute(
                f"SELECT {column}, day, SUM(prompt_tokens + completion_tokens), SUM(cost_nanousd) "  # noqa: S608
                f"FROM usage_daily WHERE day >= ? GROUP BY {column}, day", (first,))
            for name, day, tokens, cost in rows:
                days.setdefault(prefix + str(name), {})[str(day)] = (int(tokens or 0), int(cost or 0))
    finally:
        conn.close()
    return baseline_from_days(days)


def new_state(config: Config) -> LimitState:
    return LimitState(config.budget_timezone, baseline=load_baseline(config))


async def open_limiter(config: Config, channel: socket.socket | None = None) -> Limiter | None:
    """The limiter for this process; None when no limit can apply. ``channel``: this worker's socket to
    the supervisor that holds the state shared by all workers."""
    if channel is not None:
        from .shared import SharedLimiter

        return SharedLimiter(config, channel)
    if not limits_possible(config):
        return None
    import anyio.to_thread

    from .local import LocalLimiter

    state = await anyio.to_thread.run_sync(new_state, config)  # one read of the store, off the loop
    return LocalLimiter(config, state)
