"""The request log and daily usage, written in batches by one thread per process.

The event loop never touches sqlite: :meth:`StoreRecorder.record` builds one tuple of references
from the finished request and appends it to a deque (a few hundred nanoseconds). The writer thread
owns the write connection. It wakes on the first row, collects rows for ``interval`` (200 ms) or
until ``batch_rows`` (64: small batches keep the thread's turns short, which the event loop sharing its
core sees at p99) wait, whichever comes first, and writes them in one transaction: the
request-log rows, the ``usage_daily`` upserts (requests, errors, tokens, cost per day, key,
route, provider and model; the day in ``budget_timezone``, the day the request finished, as the
limiter counts it) and the dashboard's per-minute rollups (``usage_minute``: see :func:`rollup_group`).
JSON (failed attempts, key metadata) is encoded there too, off the loop.

The rollups are what the dashboard's charts and tables read (admin/stats.py), never the raw log: one
row per minute, route, provider, model, key and status class, with requests, errors, fallbacks, tokens,
cost, and latency and time to first token as counts in fixed buckets (:data:`ROLLUP_BOUNDS_MS`), from
which percentiles are estimated to within a bucket. A request counts in the minute it started (the
request log's ``time``), so a rollup is the exact sum of its minute's log rows.

A database that fails (locked past the busy timeout, disk full, read-only, an I/O error) never
fails a request: the writer keeps the rows and retries every ``retry_interval`` (new rows do not
cut that wait short, only a flush or the stop does: each attempt re-sends every waiting row),
logging once a minute how many rows wait and how many were dropped. Waiting log rows are bounded
(``max_rows``); past the bound the oldest are dropped and counted. Usage is never dropped: it is
merged in memory per (day, key, route, provider, model), a few numbers per group (sums saturate at
the 64-bit integer sqlite stores), until it can be written. The rollups are merged likewise, a group
per minute and combination; their groups are bounded too (``max_rollup_groups``: a long outage makes a
group per minute), past it the oldest minutes' groups are dropped and counted (``dropped_rollups``).

A row the database refuses for what it holds (a value sqlite cannot bind, a constraint) fails its
batch, not the store: the batch is then written row by row in one transaction, and a row that
fails alone is dropped and counted (``rejected``, logged once a minute). Token counts are clamped
on the way in (``prices.MAX_TOKENS``), so an upstream's absurd usage is stored, not refused.
``write_errors`` counts the writes that failed (each attempt on a failing database, and each batch
that had to be written row by row): the metrics' ``atg_store_write_errors_total``.

What can be lost: ``kill -9`` loses the rows of the current batch window (at most ``interval``;
more while the database is failing: everything still waiting). A clean stop (SIGTERM drain)
flushes everything before the process exits.
"""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from datetime import date, datetime, timedelta
from datetime import timezone as dt_timezone
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from .db import BUSY_TIMEOUT_MS, MEMORY, StoreError, connect
from .prices import usage_tokens

if TYPE_CHECKING:
    from ..config import Config
    from ..context import RequestContext
    from ..services import Recorder

log = logging.getLogger("at_gateway.store")

#: Paths whose successful answers are not logged (a load balancer's probes would fill the log).
_UNLOGGED = frozenset({"/health", "/v1/health"})

_INSERT_LOG = (
    "INSERT INTO request_log (time, request_id, key_id, method, path, route, provider, model, status, outcome, "
    "attempts, failed_attempts, latency_ms, ttfb_ms, stream, prompt_tokens, completion_tokens, cached_tokens, "
    "reasoning_tokens, cost_nanousd, error, metadata) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
#: The most a request-log row's cost or a usage group's counter holds (2^56: 72 billion nano-dollars is
#: $72M, 7e16 tokens): an absurd value saturates here, so the store can still bind it, and readers'
#: sum() over many such groups stays within sqlite's 64-bit integers instead of failing.
_SUM_MAX = 2**56
_UPSERT_USAGE = (
    "INSERT INTO usage_daily (day, key_id, route, provider, model, requests, errors, prompt_tokens, "
    "completion_tokens, cached_tokens, reasoning_tokens, cost_nanousd, unpriced) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (day, key_id, route, provider, model) DO UPDATE SET "
    "requests = requests + excluded.requests, errors = errors + excluded.errors, "
    f"prompt_tokens = min(prompt_tokens + excluded.prompt_tokens, {_SUM_MAX}), "
    f"completion_tokens = min(completion_tokens + excluded.completion_tokens, {_SUM_MAX}), "
    f"cached_tokens = min(cached_tokens + excluded.cached_tokens, {_SUM_MAX}), "
    f"reasoning_tokens = min(reasoning_tokens + excluded.reasoning_tokens, {_SUM_MAX}), "
    f"cost_nanousd = min(cost_nanousd + excluded.cost_nanousd, {_SUM_MAX}), unpriced = unpriced + excluded.unpriced")

#: The rollups' latency and time-to-first-token buckets, upper bounds in milliseconds (a value counts in the
#: first bucket whose bound it does not exceed; beyond the last, in an overflow bucket). Roughly 1.5x apart
#: where latencies live, so a percentile estimated from them is within a bucket (~50%) of the exact one.
#: The migration (db._V4) has one column per bucket: changing these needs a new migration.
ROLLUP_BOUNDS_MS: tuple[float, ...] = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 1500,
                                       2000, 3000, 5000, 7500, 10000, 15000, 20000, 30000, 60000, 120000)
ROLLUP_BUCKETS = len(ROLLUP_BOUNDS_MS) + 1
#: The counters of a rollup group, in usage_minute's column order after its key.
ROLLUP_COUNTS = ("requests", "errors", "fallbacks", "prompt_tokens", "completion_tokens", "cached_tokens",
                 "reasoning_tokens", "cost_nanousd", "unpriced")
ROLLUP_LAT = len(ROLLUP_COUNTS)  # where the latency buckets start in a group's list
ROLLUP_TTFT = ROLLUP_LAT + ROLLUP_BUCKETS  # where the time-to-first-token buckets start
ROLLUP_WIDTH = ROLLUP_TTFT + ROLLUP_BUCKETS
ROLLUP_KEY = ("minute", "route", "provider", "model", "key_id", "status_class")
ROLLUP_COLUMNS = (*ROLLUP_COUNTS, *(f"lat_{i}" for i in range(ROLLUP_BUCKETS)),
                  *(f"ttft_{i}" for i in range(ROLLUP_BUCKETS)))
_SATURATING = frozenset(("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "cost_nanousd"))
_UPSERT_MINUTE = (
    f"INSERT INTO usage_minute ({', '.join((*ROLLUP_KEY, *ROLLUP_COLUMNS))}) "
    f"VALUES ({', '.join('?' * (len(ROLLUP_KEY) + len(ROLLUP_COLUMNS)))}) "
    f"ON CONFLICT ({', '.join(ROLLUP_KEY)}) DO UPDATE SET "
    + ", ".join(f"{c} = min({c} + excluded.{c}, {_SUM_MAX})" if c in _SATURATING else f"{c} = {c} + excluded.{c}"
                for c in ROLLUP_COLUMNS))
_FIRST_MINUTE = "SELECT min(minute) FROM usage_minute"  # the primary key's first column: one seek
_PRUNE_MINUTES = "DELETE FROM usage_minute WHERE minute < ?"

RollupKey = tuple[int, str, str, str, str, int]


def rollup_group(started: float, route: str | None, provider: str | None, model: str | None, key_id: str | None,
                 status: int) -> RollupKey:
    """The rollup row a request counts in: (minute it started, route, provider, model, key id, status class);
    a missing name is ``''``, the status class is ``status // 100`` (2 for 2xx, 4 for a 429 or a 499)."""
    return (int(started // 60) * 60, route or "", provider or "", model or "", key_id or "", status // 100)


def bucket_of(ms: float) -> int:
    """The index of the bucket (of :data:`ROLLUP_BOUNDS_MS`, or the overflow one) a duration counts in."""
    return bisect_left(ROLLUP_BOUNDS_MS, ms)


_PERIOD_USAGE = {
    column: "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0), coalesce(sum(cost_nanousd), 0) "
            f"FROM usage_daily WHERE {column} = ? AND day >= ?"
    for column in ("key_id", "route")
}


def period_usage(conn: sqlite3.Connection, key_id: str, first_day: str, *, by: str = "key_id") -> tuple[int, int]:
    """``(tokens, cost_nanousd)`` that ``key_id`` (or, with ``by="route"``, a route over every caller) used from
    ``first_day`` (``YYYY-MM-DD``, inclusive) to now, summed over the daily aggregates (tokens = prompt +
    completion; days in ``budget_timezone``).

    For the limiter: a quota period (today, this ISO week, this month) begins on a day, so the period's
    usage is the sum of its days. Rows still waiting in a recorder are not in it.
    """
    row = conn.execute(_PERIOD_USAGE[by], (key_id, first_day)).fetchone()
    return int(row[0]), int(row[1])


def day_function(tz_name: str) -> Callable[[float], str]:
    """Unix time -> ``YYYY-MM-DD`` in ``tz_name`` (``UTC`` or an IANA name).

    The writer asks for every row, and rows come in time order, so the current day's bounds are
    kept and the calendar is consulted only when a row falls outside them (once a day)."""
    if tz_name == "UTC":
        tz: Any = dt_timezone.utc
    else:
        import zoneinfo

        tz = zoneinfo.ZoneInfo(tz_name)
    lo, hi, text = 0.0, -1.0, ""  # the current day: its first second, the next day's first second, its name

    def day(t: float) -> str:
        nonlocal lo, hi, text
        if lo <= t < hi:
            return text
        local = datetime.fromtimestamp(t, tz)
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        nxt = (start + timedelta(days=1)).replace(tzinfo=None)
        lo = start.timestamp()
        hi = nxt.replace(tzinfo=tz).timestamp()  # wall-clock midnight: DST days are 23 or 25 hours
        text = local.strftime("%Y-%m-%d")
        return text

    return day


def today(tz_name: str, now: float | None = None) -> date:
    """Today in ``tz_name``."""
    return date.fromisoformat(day_function(tz_name)(time.time() if now is None else now))


class _Flush:
    """One caller waiting for the writer to finish a round that started after it asked."""

    __slots__ = ("target", "done")

    def __init__(self, target: int) -> None:
        self.target = target
        self.done = threading.Event()


class StoreRecorder:
    """:class:`~at_gateway.services.Recorder` on a sqlite connection that one writer thread owns."""

    def __init__(self, conn: sqlite3.Connection, path: str, *, timezone_name: str = "UTC",
                 retention: float = 30 * 86400.0, interval: float = 0.2, batch_rows: int = 64,
                 max_rows: int = 100_000, retry_interval: float = 1.0, prune_interval: float = 600.0,
                 report_interval: float = 60.0, redact: Callable[[str], str] | None = None,
                 rollups: bool = True, max_rollup_groups: int = 20_000) -> None:
        self.path = path
        self._conn = conn
        self._day = day_function(timezone_name)
        self.retention = retention
        self.interval = interval
        self.batch_rows = batch_rows
        self.max_rows = max_rows
        self.retry_interval = retry_interval
        self.prune_interval = prune_interval
        self.report_interval = report_interval
        self._redact = redact
        self.rollups = rollups  # False: no per-minute rollups (only to measure what they cost)
        self.max_rollup_groups = max_rollup_groups
        self._queue: deque[tuple[Any, ...]] = deque()  # record() appends, the writer pops
        self._wake = threading.Event()
        self._stop = False
        # Writer-thread state: log rows waiting to be written, usage merged per group.
        self._pending: deque[tuple[Any, ...]] = deque()
        self._usage: dict[tuple[str, str, str, str, str], list[int]] = {}
        self._rollups: dict[RollupKey, list[int]] = {}  # per minute and combination; insertion order ~ time
        self._lock = threading.Lock()  # guards the round counters and the flush waiters
        self._rounds_started = 0
        self._flushes: list[_Flush] = []
        self._next_prune = 0.0  # prune once soon after start, then every prune_interval
        self._retry_at = 0.0  # while the database fails: the next attempt (only a flush or the stop is sooner)
        self._closed = False  # the writer has stopped: a flush has nobody to wait for
        # Counters (read by tests, `db info` and, later, metrics).
        self.written = 0
        self.batches = 0  # transactions that wrote rows
        self.dropped = 0  # log rows dropped past max_rows while the database failed
        self.failures = 0  # failed write attempts
        self.rejected = 0  # log rows the database refused on their own (dropped; the others written)
        self.rejected_groups = 0  # usage and rollup groups likewise (none expected: the sums saturate)
        self.dropped_rollups = 0  # rollup groups dropped past max_rollup_groups while the database failed
        self.write_errors = 0  # writes that failed: a failing database's attempts, batches written row by row
        self.last_error: str | None = None
        self._last_reject_report = -1e18
        self._unreported_drops = 0
        self._last_report = -1e18
        self._failing_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="at-gateway-store", daemon=True)
        self._thread.start()

    # -- the event loop's side -------------------------------------------------
    def record(self, ctx: RequestContext) -> None:
        """Queue the finished request; never blocks, never raises, no sqlite, no JSON."""
        route = ctx.route
        if route is None and ctx.status < 400 and ctx.path in _UNLOGGED:
            return
        end = time.perf_counter()
        now = time.time()
        first = ctx.first_byte
        key = ctx.key
        q = self._queue
        # (started, finished, request_id, key_id, method, path, route, provider, model, status, outcome, stream,
        #  attempts, latency_ms, ttfb_ms, error, usage, cost, counted, metadata): references, read later
        q.append((
            now - (end - ctx.started), now, ctx.request_id, ctx.client or None, ctx.method, ctx.path, route,
            ctx.provider, ctx.model, ctx.status, ctx.outcome, ctx.stream, ctx.attempts,
            (end - ctx.started) * 1000.0, (first - ctx.started) * 1000.0 if first is not None else None,
            ctx.error, ctx.usage, ctx.cost_nanousd, route is not None and ctx.client != "",
            key.metadata if key is not None else None,
        ))
        n = len(q)
        if n == 1 or n == self.batch_rows:  # the first row opens a batch window; a full batch ends it
            self._wake.set()

    async def flush(self) -> None:
        """Write everything queued so far (one attempt; what fails stays waiting, see :meth:`waiting`)."""
        await anyio.to_thread.run_sync(self.flush_sync)

    def flush_sync(self, timeout: float | None = None) -> bool:
        """:meth:`flush` for threads: wait for a writer round that starts after this call."""
        with self._lock:
            if self._closed:
                return self.waiting() == 0 and not self._rollups
            waiter = _Flush(self._rounds_started + 1)
            self._flushes.append(waiter)
        self._wake.set()
        waiter.done.wait(timeout)
        return self.waiting() == 0 and not self._rollups

    def waiting(self) -> int:
        """Log rows and usage groups not yet in the database (queued or held after a failure); the rollup
        groups waiting with them are :meth:`rollups_waiting`."""
        return len(self._queue) + len(self._pending) + len(self._usage)

    def rollups_waiting(self) -> int:
        """Rollup groups not yet in the database (held after a failure)."""
        return len(self._rollups)

    async def aclose(self, timeout: float = 10.0) -> None:
        """Flush (retrying a failing database for up to ``timeout`` seconds), then stop the writer; what
        could not be written is logged with its count, never lost silently.

        Cancellable (serve() bounds it after a second stop signal): the retries end, and the writer
        still makes its one last attempt, within a short wait, before it stops."""
        hurried = True
        try:
            with anyio.move_on_after(timeout):
                while not await anyio.to_thread.run_sync(self.flush_sync, None, abandon_on_cancel=True):
                    await anyio.sleep(self.retry_interval)  # pace the retries of a failing database
            hurried = False
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._stop_writer, 1.0 if hurried else _STOP_WAIT)

    def close_sync(self, timeout: float = 10.0) -> None:
        """:meth:`aclose` for threads."""
        deadline = time.monotonic() + timeout
        while not self.flush_sync(max(0.0, deadline - time.monotonic())) and time.monotonic() < deadline:
            time.sleep(min(self.retry_interval, max(0.0, deadline - time.monotonic())))  # pace the retries
        self._stop_writer(_STOP_WAIT)

    def _stop_writer(self, wait: float) -> None:
        """Stop the writer after its last round (at most ``wait`` seconds: a round stuck on a locked
        database is left behind) and say what is not in the database."""
        self._stop = True
        self._wake.set()
        self._thread.join(wait)
        left = len(self._pending) + len(self._queue)
        if left or self._usage or self._rollups:
            log.error("store %s: stopping with %d request-log rows, %d usage groups and %d rollup groups not "
                      "written (%s)", self.path, left, len(self._usage), len(self._rollups),
                      self.last_error or "the database kept failing")

    # -- the writer thread -----------------------------------------------------
    def _run(self) -> None:
        conn = self._conn
        try:
            while True:
                if self._failing_since is not None and (self._pending or self._usage or self._rollups):
                    self._retry_wait()
                else:
                    self._wake.wait(self._idle_timeout())
                    self._wake.clear()
                    if self._queue and not self._stop and not self._flushes:
                        self._batch_window()
                with self._lock:
                    self._rounds_started += 1
                    started = self._rounds_started
                try:
                    self._round(conn)
                    if time.monotonic() >= self._next_prune and not self._pending:
                        self._prune(conn)
                except Exception:  # a bug: keep the thread (and the rows) alive, say it
                    log.exception("store %s: writer round failed", self.path)
                with self._lock:
                    done = [f for f in self._flushes if f.target <= started]
                    self._flushes = [f for f in self._flushes if f.target > started]
                for f in done:
                    f.done.set()
                if self._stop and not self._queue:
                    return
        finally:
            with self._lock:  # nobody may wait for a round that will not come
                self._closed = True
                waiters, self._flushes = self._flushes, []
            for f in waiters:
                f.done.set()
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def _idle_timeout(self) -> float | None:
        if self._queue:
            return 0.0
        if self._pending or self._usage or self._rollups:
            return self.retry_interval
        return max(0.0, self._next_prune - time.monotonic())

    def _retry_wait(self) -> None:
        """While the database fails: wait for the next attempt; new rows queue meanwhile (each attempt
        re-sends every waiting row, so traffic must not make attempts more frequent)."""
        while not self._stop and not self._flushes:
            left = self._retry_at - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(left)
            self._wake.clear()

    def _batch_window(self) -> None:
        """Let rows gather for ``interval`` after the first, or until a batch is full / a flush asks."""
        deadline = time.monotonic() + self.interval
        while len(self._queue) < self.batch_rows and not self._stop and not self._flushes:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(left)
            self._wake.clear()

    def _round(self, conn: sqlite3.Connection) -> None:
        q = self._queue
        pending = self._pending
        usage = self._usage
        rollups = self._rollups if self.rollups else None
        day = self._day
        for i in range(len(q)):
            row = q.popleft()
            try:
                entry = self._log_row(row)
                if rollups is not None:
                    self._merge_rollup(rollups, entry, row[12])
                if row[18]:  # a routed request of a known caller: its usage counts, on the day it finished
                    self._merge_usage(usage, day(row[1]), entry)
            except Exception as exc:  # noqa: BLE001 (a value the writer cannot read: that row alone goes)
                self._rejected(1, 0, exc)
                continue
            pending.append(entry)
            if i & 31 == 31:
                # Hand the GIL back now and then: otherwise the event loop waits out the interpreter's switch
                # interval (5 ms) behind a batch of hundreds of rows, which shows at p99.
                time.sleep(0)
        rollups = self._rollups
        if not pending and not usage and not rollups:
            return
        refused = 0
        try:
            try:
                _write(conn, pending, usage, rollups)
            except Exception as exc:  # noqa: BLE001
                if _database_fault(exc):
                    raise
                # Something in the rows: write them one by one; those that fail alone are dropped.
                self.write_errors += 1
                refused, groups, first = _write_singly(conn, pending, usage, rollups)
                self._rejected(refused, groups, first)
        except Exception as exc:  # noqa: BLE001 (the database failed: keep everything, retry)
            self._failed(exc)
            return
        self.written += len(pending) - refused
        self.batches += 1
        pending.clear()
        usage.clear()
        rollups.clear()
        if self._failing_since is not None:
            log.warning("store %s: the database takes writes again (after %.0fs; %d log rows dropped while it "
                        "failed)", self.path, time.monotonic() - self._failing_since, self._unreported_drops)
            self._failing_since = None
            self._unreported_drops = 0
            self._last_report = -1e18

    def _log_row(self, row: tuple[Any, ...]) -> tuple[Any, ...]:
        """A queued row as request_log's columns: tokens read, JSON encoded (here, off the loop)."""
        (started, _end, request_id, key_id, method, path, route, provider, model, status, outcome, stream,
         attempts, latency, ttfb, error, usage, cost, _counted, metadata) = row
        failed = None
        if attempts:
            bad = [a.public() for a in attempts if not a.ok]
            if bad:
                failed = json.dumps(bad, ensure_ascii=False)
        tokens = usage_tokens(usage) if usage else None
        if error is not None and self._redact is not None:
            error = self._redact(error)
        meta = json.dumps(metadata, ensure_ascii=False, default=str) if metadata else None
        if tokens is None:
            p = c = cached = reasoning = None
        else:
            p, c, cached, reasoning = tokens
        if type(cost) is int and not 0 <= cost <= _SUM_MAX:
            cost = _SUM_MAX if cost > 0 else 0
        return (started, request_id, key_id, method, path, route, provider, model, status, outcome,
                len(attempts), failed, latency, ttfb, 1 if stream else 0, p, c, cached, reasoning, cost, error, meta)

    @staticmethod
    def _merge_usage(usage: dict[tuple[str, str, str, str, str], list[int]], day: str,
                     entry: tuple[Any, ...]) -> None:
        group = (day, entry[2] or "", entry[5] or "", entry[6] or "", entry[7] or "")
        counts = usage.get(group)
        if counts is None:
            counts = usage[group] = [0, 0, 0, 0, 0, 0, 0, 0]
        counts[0] += 1
        if entry[8] >= 400 or entry[9] is not None:
            counts[1] += 1
        if entry[15] is not None:
            counts[2] += entry[15]
            counts[3] += entry[16]
            counts[4] += entry[17]
            counts[5] += entry[18]
            if entry[19] is None:
                counts[7] += 1  # tokens without a price: unpriced, not free
            else:
                counts[6] += entry[19]
            if max(counts[2], counts[3], counts[4], counts[5], counts[6]) > _SUM_MAX:  # saturate (see _SUM_MAX)
                for j in (2, 3, 4, 5, 6):
                    counts[j] = min(counts[j], _SUM_MAX)

    @staticmethod
    def _merge_rollup(rollups: dict[RollupKey, list[int]], entry: tuple[Any, ...], attempts: Any) -> None:
        """Count a request-log row (``entry``, request_log's columns) in its minute's rollup group: a few
        additions and two bisects, in the writer thread (:func:`rollup_group` and :func:`bucket_of`, inlined)."""
        status = entry[8]
        group = (int(entry[0] // 60) * 60, entry[5] or "", entry[6] or "", entry[7] or "", entry[2] or "",
                 status // 100)
        counts = rollups.get(group)
        if counts is None:
            counts = rollups[group] = [0] * ROLLUP_WIDTH
        counts[0] += 1
        if status >= 400 or entry[9] is not None:
            counts[1] += 1
        for a in attempts:
            if a.step:  # the route went past its first step (a fallback, or a hedge)
                counts[2] += 1
                break
        if entry[15] is not None:
            counts[3] += entry[15]
            counts[4] += entry[16]
            counts[5] += entry[17]
            counts[6] += entry[18]
            if entry[19] is None:
                counts[8] += 1
            else:
                counts[7] += entry[19]
            if max(counts[3], counts[4], counts[5], counts[6], counts[7]) > _SUM_MAX:
                for j in (3, 4, 5, 6, 7):
                    counts[j] = min(counts[j], _SUM_MAX)
        counts[ROLLUP_LAT + bisect_left(ROLLUP_BOUNDS_MS, entry[12])] += 1
        if entry[14] and entry[13] is not None:  # time to first token: of streams (a whole answer's is its latency)
            counts[ROLLUP_TTFT + bisect_left(ROLLUP_BOUNDS_MS, entry[13])] += 1

    def _rejected(self, rows: int, groups: int, exc: BaseException | None) -> None:
        """Rows (and usage groups) the database refused on their own: dropped and counted, logged once a minute."""
        if not rows and not groups:
            return
        self.rejected += rows
        self.rejected_groups += groups
        now = time.monotonic()
        if now - self._last_reject_report >= self.report_interval:
            self._last_reject_report = now
            log.error("store %s: %d request-log row(s) and %d usage group(s) could not be written and were "
                      "dropped (%s: %s); %d row(s) and %d group(s) so far, the others are written", self.path, rows,
                      groups, exc.__class__.__name__ if exc else "?", exc, self.rejected, self.rejected_groups)

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.write_errors += 1
        self.last_error = f"{exc.__class__.__name__}: {exc}"
        now = time.monotonic()
        self._retry_at = now + self.retry_interval
        if self._failing_since is None:
            self._failing_since = now
        pending = self._pending
        over = len(pending) - self.max_rows
        if over > 0:  # the oldest log rows go first; the usage aggregates stay
            for _ in range(over):
                pending.popleft()
            self.dropped += over
            self._unreported_drops += over
        rollups = self._rollups
        over = len(rollups) - self.max_rollup_groups
        if over > 0:  # the oldest minutes' groups (a dict keeps the order they were first counted in)
            for group in list(itertools.islice(rollups, over)):
                del rollups[group]
            self.dropped_rollups += over
        if now - self._last_report >= self.report_interval:
            self._last_report = now
            log.error("store %s: cannot write to the database (%s); requests are served, %d request-log rows "
                      "and %d usage groups wait and are retried every %gs, %d oldest log rows dropped so far "
                      "(max_rows %d)", self.path, self.last_error, len(pending), len(self._usage),
                      self.retry_interval, self.dropped, self.max_rows)

    def _prune(self, conn: sqlite3.Connection) -> None:
        """Delete request-log rows and rollups older than the retention, a chunk per transaction (5000 log
        rows, an hour of rollups: readers and the next batch never wait long)."""
        self._next_prune = time.monotonic() + self.prune_interval
        cutoff = time.time() - self.retention
        try:
            while True:
                cur = conn.execute("DELETE FROM request_log WHERE id IN (SELECT id FROM request_log WHERE time < ? "
                                   "ORDER BY time LIMIT 5000)", (cutoff,))
                if cur.rowcount < 5000:
                    break
                if self._queue:  # rows wait: write them first, prune on soon after
                    self._next_prune = time.monotonic() + 1.0
                    return
            while True:
                first = conn.execute(_FIRST_MINUTE).fetchone()[0]
                if first is None or first >= cutoff:
                    break
                conn.execute(_PRUNE_MINUTES, (min(first + 3600, cutoff),))
                if self._queue:
                    self._next_prune = time.monotonic() + 1.0
                    break
        except sqlite3.Error as exc:
            self._failed(exc)


_STOP_WAIT = 6.0  # seconds the last round may take at a clean stop (more than the busy timeout)


def _database_fault(exc: BaseException) -> bool:
    """The database failed (locked, read-only, full, I/O, damaged), not one row: keep the rows and retry."""
    return isinstance(exc, (sqlite3.OperationalError, MemoryError)) or type(exc) is sqlite3.DatabaseError


def _write(conn: sqlite3.Connection, pending: deque[tuple[Any, ...]],
           usage: dict[tuple[str, str, str, str, str], list[int]], rollups: dict[RollupKey, list[int]]) -> None:
    """The batch in one transaction: log rows, daily usage and the minutes' rollups (all or none)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if pending:
            conn.executemany(_INSERT_LOG, pending)
        if usage:
            conn.executemany(_UPSERT_USAGE, [(*k, *v) for k, v in usage.items()])
        if rollups:
            conn.executemany(_UPSERT_MINUTE, [(*k, *v) for k, v in rollups.items()])
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _write_singly(conn: sqlite3.Connection, pending: deque[tuple[Any, ...]],
                  usage: dict[tuple[str, str, str, str, str], list[int]],
                  rollups: dict[RollupKey, list[int]]) -> tuple[int, int, BaseException | None]:
    """The batch row by row in one transaction: a statement that fails alone is skipped (sqlite undoes
    just that statement); a database fault aborts it all. ``(rows, groups, first error)`` skipped."""
    rows = groups = 0
    first: BaseException | None = None
    conn.execute("BEGIN IMMEDIATE")
    try:
        for i, entry in enumerate(pending):
            try:
                conn.execute(_INSERT_LOG, entry)
            except Exception as exc:  # noqa: BLE001
                if _database_fault(exc):
                    raise
                rows += 1
                first = first or exc
            if i & 31 == 31:
                time.sleep(0)  # the GIL, as in a round
        groups_of: list[tuple[str, list[tuple[Any, ...]]]] = [
            (_UPSERT_USAGE, [(*k, *v) for k, v in usage.items()]),
            (_UPSERT_MINUTE, [(*k, *v) for k, v in rollups.items()])]
        for sql, values in groups_of:
            for group in values:
                try:
                    conn.execute(sql, group)
                except Exception as exc:  # noqa: BLE001
                    if _database_fault(exc):
                        raise
                    groups += 1
                    first = first or exc
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return rows, groups, first


def open_db(path: str, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """The store's connection for a writer thread (opened, migrated)."""
    return connect(path, check_same_thread=False, busy_timeout_ms=busy_timeout_ms)


async def open_recorder(config: Config) -> Recorder | None:
    """The store's recorder for this process (the database opened and migrated off the loop).

    ``:memory:`` keeps the log and usage in this process's memory (one database per worker),
    pruned like a file; a file that cannot be used is a start-up error naming it.
    """
    from ..errors import ConfigError
    from ..logs import Redactor

    path = config.store.path
    try:
        conn = await anyio.to_thread.run_sync(open_db, path)
    except StoreError as exc:
        raise ConfigError(config.source, [f"store.path: {exc}"]) from None
    return StoreRecorder(conn, path, timezone_name=config.budget_timezone,
                         retention=config.request_log_retention, redact=Redactor(config.secrets()))


def describe_memory(path: str, workers: int = 1) -> str | None:
    """The start-up warning for a store kept in memory (nothing survives the process; fine for tests
    and throwaway runs, a surprise anywhere else); None for a file."""
    if path != MEMORY:
        return None
    each = (f"; with workers: {workers} each worker has its own memory store (its own request log and usage)"
            if workers > 1 else "")
    return ("store: in memory (store.path: \":memory:\"): client keys, usage and the request log are not kept "
            f"across restarts, and `at-gateway keys/usage/db` cannot see them{each}")

