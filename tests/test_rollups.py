"""The dashboard's per-minute rollups (``usage_minute``), written by the store's writer with the request-log rows
in the same transaction, on real sqlite files.

Asserted: every rollup equals the sums computed from the raw log rows it stands for (requests, errors,
fallbacks, tokens, cost, unpriced, the latency and time-to-first-token buckets), grouped by minute, route,
provider, model, key and status class; percentiles estimated from the buckets are within one bucket of the
exact ones; a failing database writes neither the rows nor their rollups, keeps the rollups (bounded,
the oldest minutes dropped and counted) and counts its failed writes (``write_errors``); old rollups are
pruned with the log's retention; the migration adds the tables to an existing database.
"""

from __future__ import annotations

import json
import math
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from at_gateway.admin.stats import percentile
from at_gateway.context import Attempt, RequestContext
from at_gateway.store import db
from at_gateway.store.usage import (
    ROLLUP_BOUNDS_MS,
    ROLLUP_BUCKETS,
    ROLLUP_COLUMNS,
    ROLLUP_KEY,
    StoreRecorder,
    bucket_of,
    open_db,
    rollup_group,
)
from tests.mock_upstream import wait_until

BUCKETS = ROLLUP_BUCKETS
LAT, TTFT = 9, 9 + BUCKETS  # where the buckets start in a rollup's counts (after the nine counters)


def make_ctx(i: int, *, route: str | None = "r", provider: str | None = "up1", model: str | None = "m",
             client: str = "key0", status: int = 200, latency: float = 0.05, ttft: float | None = None,
             stream: bool = False, usage: dict[str, Any] | None = None, cost: int | None = None,
             fallback: bool = False, outcome: int | None = None) -> RequestContext:
    """A finished request as the gateway hands it to the recorder: ``latency`` seconds since it started (so it
    started ``latency`` seconds ago: long latencies put it in earlier minutes), ``ttft`` after the start."""
    ctx = RequestContext(f"req-{i}", method="POST", path="/v1/chat/completions", client=client, route=route,
                         provider=provider, model=model, status=status, stream=stream, outcome=outcome)
    ctx.started = time.perf_counter() - latency
    if ttft is not None:
        ctx.first_byte = ctx.started + ttft
    ctx.usage = usage
    ctx.cost_nanousd = cost
    ctx.attempts = ([Attempt(0, "up1", "broken", status=500), Attempt(1, provider or "", model or "", 200, ok=True)]
                    if fallback else [Attempt(0, provider or "", model or "", status=status, ok=status < 400)])
    return ctx


def rows(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def stored_rollups(path: Path) -> dict[tuple[Any, ...], list[int]]:
    n = len(ROLLUP_KEY)
    return {tuple(r[:n]): list(r[n:]) for r in rows(
        path, f"SELECT {', '.join((*ROLLUP_KEY, *ROLLUP_COLUMNS))} FROM usage_minute")}  # noqa: S608


def sums_of_the_log(path: Path, fallbacks: set[str]) -> dict[tuple[Any, ...], list[int]]:
    """The rollups as the raw rows say they must be: computed here, row by row, from request_log."""
    out: dict[tuple[Any, ...], list[int]] = {}
    for (t, route, provider, model, key_id, status, outcome, latency, ttfb, stream, p, c, cached, reasoning, cost,
         request_id) in rows(path, "SELECT time, route, provider, model, key_id, status, outcome, latency_ms, "
                                   "ttfb_ms, stream, prompt_tokens, completion_tokens, cached_tokens, "
                                   "reasoning_tokens, cost_nanousd, request_id FROM request_log"):
        group = (int(t // 60) * 60, route or "", provider or "", model or "", key_id or "", status // 100)
        counts = out.setdefault(group, [0] * (9 + 2 * BUCKETS))
        counts[0] += 1
        counts[1] += status >= 400 or outcome is not None
        counts[2] += request_id in fallbacks
        if p is not None:
            counts[3] += p
            counts[4] += c
            counts[5] += cached
            counts[6] += reasoning
            if cost is None:
                counts[8] += 1
            else:
                counts[7] += cost
        counts[LAT + sum(1 for b in ROLLUP_BOUNDS_MS if latency > b)] += 1
        if stream and ttfb is not None:
            counts[TTFT + sum(1 for b in ROLLUP_BOUNDS_MS if ttfb > b)] += 1
    return out


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[tuple[StoreRecorder, Path]]:
    dbp = tmp_path / "gw.db"
    rec = StoreRecorder(open_db(str(dbp)), str(dbp), interval=30.0, batch_rows=64)
    try:
        yield rec, dbp
    finally:
        rec.close_sync()


def test_rollups_equal_the_sums_of_the_log_rows_they_stand_for(recorder: tuple[StoreRecorder, Path]) -> None:
    rec, dbp = recorder
    rnd = random.Random(13)
    fallbacks = set()
    for i in range(600):
        status = rnd.choice((200, 200, 200, 200, 201, 400, 401, 429, 499, 500, 503))
        stream = rnd.random() < 0.4
        # Most finish within seconds; some ran for minutes (they count in the minute they started).
        latency = rnd.choice((rnd.uniform(0.0001, 3.0), rnd.uniform(0.0005, 0.2), rnd.uniform(30, 400)))
        usage = None if status >= 400 or rnd.random() < 0.1 else {
            "prompt_tokens": rnd.randrange(1, 5000), "completion_tokens": rnd.randrange(0, 900),
            "prompt_tokens_details": {"cached_tokens": rnd.randrange(0, 50)},
            "completion_tokens_details": {"reasoning_tokens": rnd.randrange(0, 30)}}
        fallback = status < 400 and rnd.random() < 0.2
        ctx = make_ctx(i, route=rnd.choice(("demo", "other", None)), provider=rnd.choice(("up1", "up2")),
                       model=rnd.choice(("m1", "m2")), client=rnd.choice(("key0", "k_abc", "")), status=status,
                       latency=latency, ttft=latency * rnd.uniform(0.05, 1.0) if rnd.random() < 0.9 else None,
                       stream=stream, usage=usage, cost=rnd.choice((None, rnd.randrange(0, 10**7))),
                       fallback=fallback, outcome=502 if stream and status == 200 and rnd.random() < 0.1 else None)
        if fallback:
            fallbacks.add(ctx.request_id)
        rec.record(ctx)
    assert rec.flush_sync(10)
    stored = stored_rollups(dbp)
    expected = sums_of_the_log(dbp, fallbacks)
    assert len({k[0] for k in expected}) >= 4, "the rows span several minutes"
    assert stored == expected
    assert sum(v[0] for v in stored.values()) == 600
    assert {k[5] for k in stored} == {2, 4, 5}  # status classes
    assert rows(dbp, "SELECT count(*) FROM request_log") == [(600,)]


def test_every_request_of_a_minute_lands_in_one_row_per_combination(recorder: tuple[StoreRecorder, Path]) -> None:
    """Rows of one combination in one minute, over several batches, add up in one row (the upsert)."""
    rec, dbp = recorder
    for i in range(5):
        rec.record(make_ctx(i, latency=0.004, usage={"prompt_tokens": 10, "completion_tokens": 5}, cost=100))
        assert rec.flush_sync(10)  # a batch each
    minutes = {int(t // 60) * 60 for (t,) in rows(dbp, "SELECT time FROM request_log")}  # one, or two if it turned
    got = stored_rollups(dbp)
    assert set(got) == {(m, "r", "up1", "m", "key0", 2) for m in minutes}
    counts = [sum(c) for c in zip(*got.values(), strict=True)]
    assert counts[:9] == [5, 0, 0, 50, 25, 0, 0, 500, 0]
    assert counts[LAT + bucket_of(4.0)] == 5 and sum(counts[TTFT:]) == 0  # not a stream: no TTFT


# -- percentiles from the buckets ---------------------------------------------------------------------------

def exact(values: list[float], q: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


DISTRIBUTIONS = {
    "uniform-ms": lambda r: r.uniform(0.2, 40),
    "lognormal": lambda r: r.lognormvariate(math.log(400), 1.0),
    "bimodal": lambda r: r.choice((r.uniform(3, 8), r.uniform(2000, 9000))),
    "constant": lambda r: 123.0,
    "tail-past-the-last-bound": lambda r: r.choice((r.uniform(50, 80), r.uniform(130_000, 500_000))),
    "sub-millisecond": lambda r: r.uniform(0.01, 0.9),
}


@pytest.mark.parametrize("name", DISTRIBUTIONS)
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_percentiles_from_the_buckets_are_within_one_bucket_of_the_exact_ones(name: str, n: int) -> None:
    rnd = random.Random(f"{name}-{n}")
    values = [DISTRIBUTIONS[name](rnd) for _ in range(n)]
    hist = [0] * BUCKETS
    for v in values:
        hist[bucket_of(v)] += 1
    for q in (0.5, 0.9, 0.95, 0.99):
        got = percentile(hist, q)
        assert got is not None
        want = exact(values, q)
        assert abs(bucket_of(got) - bucket_of(want)) <= 1, (q, got, want)
        assert 0 <= got <= max(ROLLUP_BOUNDS_MS[-1], want)  # the overflow bucket says its lower bound


def test_no_samples_is_no_percentile() -> None:
    assert percentile([0] * BUCKETS, 0.5) is None


# -- a failing database ---------------------------------------------------------------------------------------

def held(dbp: Path) -> sqlite3.Connection:
    other = sqlite3.connect(dbp, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")
    return other


def test_rollups_are_written_with_their_rows_or_not_at_all_and_failed_writes_are_counted(tmp_path: Path) -> None:
    dbp = tmp_path / "locked.db"
    rec = StoreRecorder(open_db(str(dbp), busy_timeout_ms=20), str(dbp), interval=30.0, retry_interval=30.0)
    try:
        assert rec.flush_sync(10) and rec.write_errors == 0
        lock = held(dbp)
        try:
            for i in range(10):
                rec.record(make_ctx(i))
            assert not rec.flush_sync(10)
            assert not rec.flush_sync(10)
            assert rec.write_errors == 2 and rec.rollups_waiting() == 1
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert rows(dbp, "SELECT count(*) FROM request_log") == [(0,)]
        assert rows(dbp, "SELECT count(*) FROM usage_minute") == [(0,)]
        assert rec.flush_sync(10)
        assert rec.rollups_waiting() == 0 and rec.write_errors == 2
        assert rows(dbp, "SELECT sum(requests) FROM usage_minute") == [(10,)]
        assert rows(dbp, "SELECT count(*) FROM request_log") == [(10,)]
    finally:
        rec.close_sync()


def test_past_the_bound_the_oldest_minutes_rollups_are_dropped_and_counted(tmp_path: Path) -> None:
    dbp = tmp_path / "bound.db"
    rec = StoreRecorder(open_db(str(dbp), busy_timeout_ms=20), str(dbp), interval=30.0, retry_interval=30.0,
                        max_rollup_groups=2)
    lock = held(dbp)
    try:
        for i, (route, latency) in enumerate((("oldest", 250.0), ("old", 130.0), ("new", 0.01), ("newer", 0.01))):
            rec.record(make_ctx(i, route=route, latency=latency))
        assert not rec.flush_sync(10)
        assert rec.dropped_rollups == 2 and rec.rollups_waiting() == 2
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert rec.flush_sync(10)
    rec.close_sync()
    assert sorted(r[0] for r in rows(dbp, "SELECT route FROM usage_minute")) == ["new", "newer"]
    assert rows(dbp, "SELECT count(*) FROM request_log") == [(4,)]  # the log rows are all there


def test_a_row_written_alone_counts_as_a_write_error_and_its_batch_rollups_are_written(tmp_path: Path) -> None:
    dbp = tmp_path / "poison.db"
    rec = StoreRecorder(open_db(str(dbp)), str(dbp), interval=30.0, retry_interval=30.0)
    try:
        rec.record(make_ctx(0))
        bad = make_ctx(1)
        bad.request_id = {"not": "bindable"}  # type: ignore[assignment]
        rec.record(bad)
        rec.record(make_ctx(2))
        assert rec.flush_sync(10)
        assert rec.rejected == 1 and rec.write_errors == 1
    finally:
        rec.close_sync()
    assert rows(dbp, "SELECT count(*) FROM request_log") == [(2,)]
    # Like the daily usage, the rollups count every request, the one whose log row was dropped too.
    assert rows(dbp, "SELECT sum(requests) FROM usage_minute") == [(3,)]


def test_without_rollups_only_the_log_and_usage_are_written(tmp_path: Path) -> None:
    """``rollups=False`` exists to measure what they cost on the write path (see the report's benchmark)."""
    dbp = tmp_path / "plain.db"
    rec = StoreRecorder(open_db(str(dbp)), str(dbp), interval=30.0, rollups=False)
    try:
        for i in range(3):
            rec.record(make_ctx(i, usage={"prompt_tokens": 1, "completion_tokens": 1}))
        assert rec.flush_sync(10)
    finally:
        rec.close_sync()
    assert rows(dbp, "SELECT count(*) FROM request_log") == [(3,)]
    assert rows(dbp, "SELECT count(*) FROM usage_minute") == [(0,)]


# -- retention and the migration --------------------------------------------------------------------------------

def test_old_rollups_are_pruned_with_the_logs_retention(tmp_path: Path) -> None:
    dbp = tmp_path / "old.db"
    conn = db.connect(str(dbp))
    now = time.time()
    minutes = [int((now - 40 * 86400) // 60) * 60 + 60 * i for i in range(3 * 60)] + [int(now // 60) * 60]
    conn.executemany("INSERT INTO usage_minute (minute, route, provider, model, key_id, status_class, requests) "
                     "VALUES (?, 'r', 'p', 'm', 'k', 2, 1)", [(m,) for m in minutes])
    conn.close()
    rec = StoreRecorder(open_db(str(dbp)), str(dbp), retention=30 * 86400.0)
    try:
        assert wait_until(lambda: rows(dbp, "SELECT count(*) FROM usage_minute") == [(1,)], 10)
        assert rows(dbp, "SELECT minute FROM usage_minute") == [(minutes[-1],)]
    finally:
        rec.close_sync()


def test_an_existing_database_gets_the_rollup_and_session_tables(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    conn = db.connect(str(path), migrations=db.MIGRATIONS[:3])
    conn.execute("INSERT INTO request_log (time, request_id, status) VALUES (1, 'old', 200)")
    conn.close()
    conn = db.connect(str(path))
    try:
        assert db.schema_version(conn) == db.SCHEMA_VERSION >= 4
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"usage_minute", "admin_sessions_revoked"} <= tables
        columns = [r[1] for r in conn.execute("PRAGMA table_info(usage_minute)")]
        assert columns == [*ROLLUP_KEY, *ROLLUP_COLUMNS]
        plan = " ".join(str(r[-1]) for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT sum(requests) FROM usage_minute WHERE minute BETWEEN 0 AND 60"))
        assert "SEARCH usage_minute USING PRIMARY KEY (minute>? AND minute<?)" in plan, plan
        assert conn.execute("SELECT request_id FROM request_log").fetchall() == [("old",)]
    finally:
        conn.close()
    assert list(tmp_path.glob("v3.db.v3-*.bak")), "a backup copy before the migration"


def test_the_bucket_bounds_match_the_schema() -> None:
    assert BUCKETS == len(ROLLUP_BOUNDS_MS) + 1 == 27
    assert list(ROLLUP_BOUNDS_MS) == sorted(set(ROLLUP_BOUNDS_MS))
    assert [bucket_of(v) for v in (0, 1, 1.0001, 120000, 120000.5)] == [0, 0, 1, BUCKETS - 2, BUCKETS - 1]
    assert json.dumps(ROLLUP_BOUNDS_MS)  # the stats API may hand them to the page
    assert rollup_group(125.5, None, "p", "m", None, 429) == (120, "", "p", "m", "", 4)
