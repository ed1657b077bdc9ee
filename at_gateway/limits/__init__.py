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
import sqlite3
import threading
import time
from typing import TYPE_CHECKING

from .base import LimitState
from .quota import Baseline, NeedBaseline, no_baseline

if TYPE_CHECKING:
    from ..config import Config
    from ..services import Limiter

log = logging.getLogger("at_gateway.limits")

__all__ = ["LimitState", "StoreBaseline", "limits_possible", "new_state", "open_limiter"]


def limits_possible(config: Config) -> bool:
    """Whether any request can meet a limit: a store file (its client keys may have limits, or get the
    ``limits:`` defaults), or a route with ``limits``."""
    return config.store.path != ":memory:" or any(r.limits is not None for r in config.routes.values())


class StoreBaseline:
    """What the store's daily aggregates say a subject used in a period: read when a quota is first
    needed (see :mod:`.quota`), one indexed query per key and period, on a read connection of its own.

    ``inline``: read right away (the supervisor of ``workers: N``, which runs no event loop), on a
    connection opened for that read and closed after it, so none is inherited by the workers it
    forks later; else raise :class:`NeedBaseline`, and the caller reads with :meth:`read` on a thread
    and hands the figure over in :attr:`ready` before asking again (``workers: 1``: never a query
    on the loop; the connection is kept).
    """

    def __init__(self, path: str, *, inline: bool) -> None:
        self.path = path
        self.inline = inline
        self.ready: dict[tuple[str, str], tuple[int, int]] = {}  # read, waiting for the quota it is for
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # reads may come from more than one thread
        self._failed_at = float("-inf")

    def __call__(self, subject: str, first_day: str) -> tuple[int, int]:
        got = self.ready.pop((subject, first_day), None)
        if got is not None:
            return got
        if not self.inline:
            raise NeedBaseline(subject, first_day)
        return self.read(subject, first_day)

    def read(self, subject: str, first_day: str) -> tuple[int, int]:
        """``(tokens, nano-dollars)`` of ``subject`` from ``first_day`` on; (0, 0) when the store cannot
        be read (logged at most once a minute: the quota then counts from now)."""
        from ..store.db import StoreError, connect
        from ..store.usage import period_usage

        kind, _, name = subject.partition(":")
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = connect(self.path, migrate=False)
                return period_usage(self._conn, name, first_day, by="key_id" if kind == "key" else "route")
            except (sqlite3.Error, StoreError) as exc:
                self._drop()
                now = time.monotonic()
                if now - self._failed_at >= 60:
                    self._failed_at = now
                    log.warning("limits: cannot read %s's usage since %s from the store (%s); its quota counts "
                                "from now", subject, first_day, exc)
                return 0, 0
            finally:
                if self.inline:
                    self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()


def new_state(config: Config, *, inline: bool = True) -> LimitState:
    """The limiter state; quotas read their period's usage from the store when first needed."""
    baseline: Baseline = no_baseline
    if config.store.path != ":memory:":
        baseline = StoreBaseline(config.store.path, inline=inline)
    return LimitState(config.budget_timezone, baseline=baseline)


async def open_limiter(config: Config, channel: socket.socket | None = None) -> Limiter | None:
    """The limiter for this process; None when no limit can apply. ``channel``: this worker's socket to
    the supervisor that holds the state shared by all workers."""
    if channel is not None:
        from .shared import SharedLimiter

        return SharedLimiter(config, channel)
    if not limits_possible(config):
        return None
    from .local import LocalLimiter

    return LocalLimiter(config, new_state(config, inline=False))
