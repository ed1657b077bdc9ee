"""The request log and daily usage on real sqlite files: what a request leaves behind, batching, a
restart, a locked or read-only database that never fails a request, the bounds, retention, the
`usage` command."""

from __future__ import annotations

import copy
import io
import json
import logging
import sqlite3
import subprocess
import sys
import time
import zoneinfo
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import httpx
import pytest
import yaml

from at_gateway.app import Gateway
from at_gateway.config import build_config
from at_gateway.context import Attempt, RequestContext
from at_gateway.http.server import Server
from at_gateway.logs import Redactor, setup_logging
from at_gateway.service import open_services, server_settings
from at_gateway.services import Services
from at_gateway.store import db
from at_gateway.store.usage import StoreRecorder, open_db, period_usage
from at_gateway.store.usage_cli import first_day
from tests.conftest import GATEWAY_KEY, base_config
from tests.mock_upstream import MockUpstream, Reply, chat_completion, stream_of, wait_until

H = {"x-api-key": GATEWAY_KEY}
MSG = [{"role": "user", "content": "hello there gateway"}]


class StoreGateway:
    def __init__(self, url: str, gateway: Gateway, logs: io.StringIO) -> None:
        self.url = url
        self.gateway = gateway
        self.logs = logs

    @property
    def recorder(self) -> StoreRecorder:
        store = self.gateway.services.store
        assert isinstance(store, StoreRecorder)
        return store

    def chat(self, model: str = "demo", **extra: Any) -> httpx.Response:
        return httpx.post(self.url + "/v1/chat/completions", headers=H, timeout=10,
                          json={"model": model, "messages": MSG, **extra})


@contextmanager
def store_gateway(raw: dict[str, Any], recorder: Any = None) -> Iterator[StoreGateway]:
    """The in-process gateway with the services ``serve`` gives it (the store opened from the config),
    or with ``recorder`` (a StoreRecorder built by the test); closed like a drain closes them."""
    config = build_config(copy.deepcopy(raw), "test-config")
    logs = io.StringIO()
    setup_logging(config.log_level, Redactor(config.secrets()), logs)
    with anyio.from_thread.start_blocking_portal() as portal:
        services = Services(store=recorder) if recorder is not None else portal.call(open_services, config)

        async def make() -> Gateway:
            return Gateway(config, services=services)

        gateway = portal.call(make)
        server = Server(gateway.handle, server_settings(config))
        future, port = portal.start_task(server.serve)
        try:
            yield StoreGateway(f"http://127.0.0.1:{port}", gateway, logs)
        finally:
            portal.call(server.shutdown)
            future.result(timeout=10)
            portal.call(gateway.aclose)
            portal.call(services.aclose)
    logging.getLogger("at_gateway").handlers.clear()


def rows(path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def count(path: Path, table: str = "request_log") -> int:
    return int(rows(path, f"SELECT count(*) FROM {table}")[0][0])  # noqa: S608


def file_config(upstream: MockUpstream, dbp: Path, routes: list[dict[str, Any]] | None = None,
                **top: Any) -> dict[str, Any]:
    return base_config(upstream.url, routes or [
        {"name": "demo", "steps": [{"provider": "echo", "model": "echo-1"}]},
        {"name": "mini", "steps": [{"provider": "up1", "model": "gpt-4o-mini"}]},
        {"name": "fallback", "steps": [{"provider": "up1", "model": "broken"},
                                       {"provider": "up2", "model": "gpt-4o-mini"}]},
        {"name": "dead", "steps": [{"provider": "up1", "model": "broken"}]},
        {"name": "streamy", "steps": [{"provider": "up1", "model": "gpt-4o"}]},
    ], store={"path": str(dbp)}, **top)


def fake_ctx(i: int, route: str | None = "r", client: str = "key0", usage: dict[str, int] | None = None,
             cost: int | None = 100) -> RequestContext:
    ctx = RequestContext(f"req-{i}", method="POST", path="/v1/chat/completions", client=client, route=route,
                         provider="up1", model="m", status=200)
    ctx.usage = usage if usage is not None else {"prompt_tokens": 10, "completion_tokens": 5}
    ctx.cost_nanousd = cost
    ctx.attempts = [Attempt(0, "up1", "m", status=200, ok=True)]
    return ctx


def test_every_request_is_one_log_row_and_counts_in_the_daily_usage(upstream: MockUpstream, tmp_path: Path) -> None:
    dbp = tmp_path / "gw.db"
    upstream.replies["broken"] = Reply(status=500, body={"error": {"message": "boom"}})
    upstream.replies["gpt-4o-mini"] = Reply(body=chat_completion(
        "hi", usage={"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100,
                     "prompt_tokens_details": {"cached_tokens": 200}}))
    upstream.replies["gpt-4o"] = Reply(sse=stream_of("a", "b", "c"))  # 2 prompt, 3 completion tokens
    with store_gateway(file_config(upstream, dbp)) as gw:
        assert gw.chat("demo").status_code == 200
        assert gw.chat("mini").status_code == 200
        assert gw.chat("fallback").status_code == 200
        assert gw.chat("dead").status_code == 502
        with httpx.stream("POST", gw.url + "/v1/chat/completions", headers=H, timeout=10,
                          json={"model": "streamed", "messages": MSG, "stream": True}) as r:
            assert r.status_code == 404  # no such route: logged, not counted as usage
        with httpx.stream("POST", gw.url + "/v1/chat/completions", headers=H, timeout=10, json={
                "model": "streamy", "messages": MSG, "stream": True, "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200
            assert r.read().endswith(b"data: [DONE]\n\n")
        assert httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": "wrong"}, json={}).status_code == 401
        assert httpx.get(gw.url + "/health").status_code == 200  # probes are not logged
        anyio.run(gw.recorder.flush)
        assert count(dbp) == 7
        log = {r[0]: r for r in rows(dbp, "SELECT route, status, key_id, provider, model, attempts, failed_attempts, "
                                          "prompt_tokens, completion_tokens, cached_tokens, cost_nanousd, stream, "
                                          "latency_ms, ttfb_ms, error, request_id, time FROM request_log "
                                          "WHERE route IS NOT NULL AND stream = 0")}
    mini = log["mini"]
    assert mini[1:6] == (200, "key0", "up1", "gpt-4o-mini", 1)
    assert mini[7:11] == (1000, 100, 200, 800 * 150 + 200 * 75 + 100 * 600)  # priced from the table
    assert mini[12] > 0 and mini[13] > 0 and abs(mini[16] - time.time()) < 60
    fallback = log["fallback"]
    assert fallback[5] == 2
    failed = json.loads(fallback[6])
    assert [(a["step"], a["provider"], a["model"], a["status"]) for a in failed] == [(0, "up1", "broken", 500)]
    dead = log["dead"]
    assert dead[1] == 502 and dead[10] is None and dead[14]  # no usage, no cost; the error kept
    assert log["demo"][10] is None  # the echo model has no price: unpriced, not free
    assert rows(dbp, "SELECT status, key_id FROM request_log WHERE status = 401") == [(401, None)]
    assert rows(dbp, "SELECT route, status FROM request_log WHERE status = 404") == [(None, 404)]
    streamed = rows(dbp, "SELECT route, status, stream, prompt_tokens, completion_tokens, cost_nanousd, ttfb_ms "
                         "FROM request_log WHERE stream = 1")
    assert len(streamed) == 1 and streamed[0][:6] == ("streamy", 200, 1, 2, 3, 2 * 2500 + 3 * 10000)
    assert streamed[0][6] > 0

    usage = {(r[0], r[1], r[2]): r[3:] for r in rows(
        dbp, "SELECT route, provider, model, requests, errors, prompt_tokens, completion_tokens, cached_tokens, "
             "cost_nanousd, unpriced, key_id, day FROM usage_daily")}
    assert usage[("mini", "up1", "gpt-4o-mini")][:7] == (1, 0, 1000, 100, 200, 800 * 150 + 200 * 75 + 100 * 600, 0)
    assert usage[("streamy", "up1", "gpt-4o")][:7] == (1, 0, 2, 3, 0, 35_000, 0)
    assert usage[("fallback", "up2", "gpt-4o-mini")][:2] == (1, 0)
    assert usage[("dead", "up1", "broken")][:2] == (1, 1)  # an error, counted
    demo = usage[("demo", "echo", "echo-1")]
    assert demo[0] == 1 and demo[6] == 1  # tokens but no price: unpriced
    assert {u[7] for u in usage.values()} == {"key0"}
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert {u[8] for u in usage.values()} <= {today, time.strftime("%Y-%m-%d", time.gmtime(time.time() - 60))}


def test_a_restart_keeps_the_usage_and_the_log(upstream: MockUpstream, tmp_path: Path) -> None:
    dbp = tmp_path / "gw.db"
    cfg = file_config(upstream, dbp)
    for _ in range(2):  # two lives of the gateway on one file; the drain (aclose) flushes
        with store_gateway(cfg) as gw:
            for _ in range(3):
                assert gw.chat("mini").status_code == 200
    assert count(dbp) == 6
    assert rows(dbp, "SELECT requests, prompt_tokens, completion_tokens FROM usage_daily") == [(6, 18, 6)]
    conn = db.connect(str(dbp))
    try:
        first = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
        assert period_usage(conn, "key0", first) == (24, 6 * (3 * 150 + 600))
        assert period_usage(conn, "nobody", first) == (0, 0)
    finally:
        conn.close()


def test_period_usage_sums_the_days_from_the_first(tmp_path: Path) -> None:
    conn = db.connect(str(tmp_path / "p.db"))
    try:
        conn.executemany(
            "INSERT INTO usage_daily (day, key_id, route, provider, model, requests, prompt_tokens, "
            "completion_tokens, cost_nanousd) VALUES (?, ?, 'r', 'p', ?, 1, ?, ?, ?)",
            [("2026-03-31", "k", "m", 1000, 1000, 5), ("2026-04-01", "k", "m", 10, 1, 7),
             ("2026-04-01", "k", "m2", 20, 2, 11), ("2026-04-02", "k", "m", 30, 3, 13),
             ("2026-04-02", "other", "m", 99, 99, 99)])
        assert period_usage(conn, "k", "2026-04-01") == (66, 31)  # inclusive of the first day, this key only
        assert period_usage(conn, "k", "2026-04-03") == (0, 0)
    finally:
        conn.close()


def test_batches_end_at_batch_rows_or_after_the_interval(tmp_path: Path) -> None:
    dbp = tmp_path / "b.db"
    rec = StoreRecorder(open_db(str(dbp)), str(dbp), interval=30.0, batch_rows=5)
    try:
        for i in range(4):
            rec.record(fake_ctx(i))
        rec.record(fake_ctx(4))  # the fifth row fills the batch: written long before the 30 s interval
        assert wait_until(lambda: rec.written == 5)
        assert rec.batches == 1 and count(dbp) == 5
    finally:
        rec.close_sync()
    rec = StoreRecorder(open_db(str(dbp)), str(dbp), interval=0.05, batch_rows=500)
    try:
        for i in range(3):
            rec.record(fake_ctx(10 + i))
        assert wait_until(lambda: rec.written == 3)  # no flush asked: the interval ended the batch
        assert rec.batches == 1
    finally:
        rec.close_sync()
    rec = StoreRecorder(open_db(str(dbp)), str(dbp), interval=30.0, batch_rows=500)
    for i in range(7):
        rec.record(fake_ctx(20 + i))
    rec.close_sync()  # a clean stop writes what is queued
    assert count(dbp) == 15
    assert rows(dbp, "SELECT sum(requests) FROM usage_daily") == [(15,)]


def held(dbp: Path) -> sqlite3.Connection:
    """Another connection holding the database's write lock (BEGIN EXCLUSIVE) until closed."""
    other = sqlite3.connect(dbp, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")
    return other


def test_a_locked_database_never_fails_a_request_and_its_rows_are_written_once_free(
        upstream: MockUpstream, tmp_path: Path) -> None:
    dbp = tmp_path / "locked.db"
    rec = StoreRecorder(open_db(str(dbp), busy_timeout_ms=50), str(dbp), interval=0.02, retry_interval=0.05)
    with store_gateway(file_config(upstream, dbp), recorder=rec) as gw:
        lock = held(dbp)
        try:
            started = time.perf_counter()
            for _ in range(20):
                assert gw.chat("mini").status_code == 200
            assert time.perf_counter() - started < 5  # no request waited for the lock
            assert wait_until(lambda: rec.failures >= 3)  # tried, failed, retried
            assert count(dbp) == 0
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert wait_until(lambda: rec.waiting() == 0)  # written once the lock is gone, no request needed
        assert count(dbp) == 20
        assert rows(dbp, "SELECT requests FROM usage_daily") == [(20,)]
        errors = [ln for ln in gw.logs.getvalue().splitlines() if "cannot write to the database" in ln]
        assert len(errors) == 1, errors  # once a minute, however many retries failed
        assert "database is locked" in errors[0] and "request-log rows" in errors[0]
        assert "usage groups wait and are retried" in errors[0]
        assert any("takes writes again" in ln for ln in gw.logs.getvalue().splitlines())


def _immutable(paths: list[Path], on: bool) -> bool:
    r = subprocess.run(["chattr", "+i" if on else "-i", *map(str, paths)], capture_output=True)
    return r.returncode == 0


def test_a_read_only_database_never_fails_a_request_and_its_rows_are_written_once_writable(
        upstream: MockUpstream, tmp_path: Path) -> None:
    """Read-only as root: chmod does not stop root, the immutable attribute does (even for files open
    for writing). The -shm file is left alone: it is mapped into memory, and making it immutable
    would not fail writes but crash the process."""
    dbp = tmp_path / "ro.db"
    rec = StoreRecorder(open_db(str(dbp)), str(dbp), interval=0.02, retry_interval=0.05)
    with store_gateway(file_config(upstream, dbp), recorder=rec) as gw:
        assert gw.chat("mini").status_code == 200
        assert wait_until(lambda: rec.written == 1)
        files = [dbp, Path(f"{dbp}-wal")]
        if not _immutable(files, True):
            pytest.skip("chattr +i is not possible here (needs CAP_LINUX_IMMUTABLE and a file system with it)")
        try:
            for _ in range(10):
                assert gw.chat("mini").status_code == 200
            assert wait_until(lambda: rec.failures >= 2)
            assert rec.waiting() > 0
        finally:
            assert _immutable(files, False)
        assert wait_until(lambda: rec.waiting() == 0)
        assert count(dbp) == 11
        assert rows(dbp, "SELECT requests FROM usage_daily") == [(11,)]
        assert rows(dbp, "PRAGMA integrity_check") == [("ok",)]
        errors = [ln for ln in gw.logs.getvalue().splitlines() if "cannot write to the database" in ln]
        assert len(errors) == 1 and "disk I/O error" in errors[0], errors


def test_past_the_bound_the_oldest_log_rows_are_dropped_and_counted_usage_never(tmp_path: Path) -> None:
    dbp = tmp_path / "full.db"
    rec = StoreRecorder(open_db(str(dbp), busy_timeout_ms=20), str(dbp), interval=30.0, max_rows=5,
                        retry_interval=30.0)
    lock = held(dbp)
    try:
        for i in range(12):
            rec.record(fake_ctx(i))
        assert not rec.flush_sync(10)  # one attempt: locked
        assert rec.dropped == 7 and rec.waiting() == 5 + 1  # five log rows and one usage group wait
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert rec.flush_sync(10)
    rec.close_sync()
    assert [r[0] for r in rows(dbp, "SELECT request_id FROM request_log ORDER BY id")] == [
        f"req-{i}" for i in range(7, 12)]  # the newest five
    assert rows(dbp, "SELECT requests, prompt_tokens, completion_tokens, cost_nanousd FROM usage_daily") == [
        (12, 120, 60, 1200)]  # every request's usage, dropped log rows included


def test_old_log_rows_are_pruned_in_the_background(tmp_path: Path) -> None:
    dbp = tmp_path / "old.db"
    conn = db.connect(str(dbp))
    now = time.time()
    conn.executemany("INSERT INTO request_log (time, request_id, status) VALUES (?, ?, 200)",
                     [(now - 40 * 86400, f"old{i}") for i in range(12_000)] + [(now - 60, "recent")])
    conn.close()
    rec = StoreRecorder(open_db(str(dbp)), str(dbp), retention=30 * 86400.0)
    try:
        assert wait_until(lambda: count(dbp) == 1, 10)  # at start, in chunks, no request needed
        assert rows(dbp, "SELECT request_id FROM request_log") == [("recent",)]
    finally:
        rec.close_sync()


def test_the_retention_comes_from_the_config(upstream: MockUpstream, tmp_path: Path) -> None:
    dbp = tmp_path / "gw.db"
    conn = db.connect(str(dbp))
    now = time.time()
    conn.executemany("INSERT INTO request_log (time, request_id, status) VALUES (?, ?, 200)",
                     [(now - 2 * 86400, "two days"), (now - 3600, "an hour")])
    conn.close()
    with store_gateway(file_config(upstream, dbp, request_log={"retention": "24h"})) as gw:
        assert gw.recorder.retention == 86400.0
        assert wait_until(lambda: count(dbp) == 1)  # pruned at start: older than a day
    assert rows(dbp, "SELECT request_id FROM request_log") == [("an hour",)]


def test_the_day_is_the_budget_timezone_day(tmp_path: Path) -> None:
    dbp = tmp_path / "tz.db"
    tz = "Pacific/Kiritimati"  # UTC+14: its day differs from UTC's for 14 hours of every day
    rec = StoreRecorder(open_db(str(dbp)), str(dbp), timezone_name=tz, interval=0.01)
    before = time.time()
    rec.record(fake_ctx(1))
    rec.close_sync()
    after = time.time()
    from datetime import datetime

    days = {datetime.fromtimestamp(t, zoneinfo.ZoneInfo(tz)).strftime("%Y-%m-%d") for t in (before, after)}
    assert rows(dbp, "SELECT day FROM usage_daily")[0][0] in days


def test_the_memory_store_works_and_says_so_at_start(upstream: MockUpstream, tmp_path: Path) -> None:
    with store_gateway(base_config(upstream.url)) as gw:  # store.path ":memory:"
        assert gw.chat("demo").status_code == 200
        anyio.run(gw.recorder.flush)
        assert gw.recorder.written == 1
    from tests.test_service import gateway_process

    for workers in (1, 2):
        run_dir = tmp_path / f"w{workers}"
        run_dir.mkdir()
        with gateway_process(base_config(upstream.url, workers=workers), run_dir) as (proc, url, _, logfile):
            assert httpx.post(url + "/v1/chat/completions", headers=H,
                              json={"model": "demo", "messages": MSG}).is_success
        notes = [json.loads(ln) for ln in logfile.read_text().splitlines() if "store: in memory" in ln]
        assert len(notes) == 1 and notes[0]["level"] == "warning", notes  # once, before any fork
        assert ("each worker has its own memory store" in notes[0]["msg"]) == (workers == 2), notes


def _usage_cli(cfg_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "at_gateway", "usage", "--config", str(cfg_path), *args],
                          capture_output=True, text=True, timeout=30)


def test_the_usage_command_prints_a_table(upstream: MockUpstream, tmp_path: Path) -> None:
    dbp = tmp_path / "gw.db"
    cfg = file_config(upstream, dbp)
    with store_gateway(cfg) as gw:
        for _ in range(3):
            assert gw.chat("mini").status_code == 200
        assert gw.chat("demo").status_code == 200
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    r = _usage_cli(cfg_path, "--by", "route")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].split() == ["route", "requests", "errors", "prompt", "completion", "cached", "reasoning",
                                "cost", "unpriced"]
    table = {ln.split()[0]: ln.split()[1:] for ln in lines[3:]}
    assert table["mini"] == ["3", "0", "9", "3", "0", "0", "$0.000003", "0"]  # 3 x (3 x 150 + 600) nano
    assert table["demo"][0] == "1" and table["demo"][-1] == "1"  # echo: unpriced
    assert table["total"][0] == "4"
    r = _usage_cli(cfg_path, "--by", "day", "--json", "--key", "key0")
    days = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert len(days) == 1 and days[0]["requests"] == 4 and days[0]["cost_nanousd"] == 3150
    r = _usage_cli(cfg_path, "--key", "nobody")
    assert "(no usage in this period)" in r.stdout
    r = _usage_cli(cfg_path, "--since", "soon")
    assert r.returncode == 2 and "--since" in r.stderr


@pytest.mark.parametrize(("since", "expected"), [
    ("1d", "2026-05-10"), ("7d", "2026-05-04"), ("2w", "2026-04-27"), ("2026-01-01", "2026-01-01")])
def test_since_counts_days_with_today(since: str, expected: str) -> None:
    noon = 1778414400.0  # 2026-05-10 12:00 UTC
    assert first_day(since, "UTC", noon).isoformat() == expected


@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Australia/Lord_Howe", "America/Santiago", "Asia/Kolkata"])
def test_the_writers_day_cache_agrees_with_the_calendar(tz: str) -> None:
    """The writer keeps the current day's bounds; across DST changes (23/25-hour days, half-hour
    shifts, midnight changes) and out of order it must name the calendar's day."""
    from datetime import datetime

    from at_gateway.store.usage import day_function

    day = day_function(tz)
    zone = zoneinfo.ZoneInfo(tz)
    start = 1773000000.0  # March 2026: the northern changes; Santiago and Lord Howe change in April
    times = [start + i * 1801.0 for i in range(0, 24 * 2 * 75)]
    times += times[::-7]  # and backwards
    for t in times:
        assert day(t) == datetime.fromtimestamp(t, zone).strftime("%Y-%m-%d"), t


def test_rows_reach_the_file_within_the_batch_interval_so_kill_9_loses_little(
        upstream: MockUpstream, tmp_path: Path) -> None:
    """Without any stop or flush the rows are in the file a batch interval later; a kill -9 then
    loses nothing of them, and a SIGTERM writes what is queued before the process exits."""
    import signal

    from tests.test_service import gateway_process

    dbp = tmp_path / "gw.db"
    with gateway_process(file_config(upstream, dbp), tmp_path) as (proc, url, _, _log):
        for _ in range(5):
            assert httpx.post(url + "/v1/chat/completions", headers=H, json={"model": "mini", "messages": MSG},
                              timeout=10).status_code == 200
        # The bound: rows are in the file one batch interval (200 ms) after they were recorded, plus a
        # margin for a busy machine; what a kill -9 can lose is only what is younger than that.
        assert wait_until(lambda: count(dbp) == 5, 0.2 + 0.6)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert count(dbp) == 5 and rows(dbp, "PRAGMA integrity_check") == [("ok",)]
    with gateway_process(file_config(upstream, dbp), tmp_path) as (proc, url, _, logfile):
        with httpx.Client(timeout=10) as client:
            for _ in range(3):
                assert client.post(url + "/v1/chat/completions", headers=H,
                                   json={"model": "mini", "messages": MSG}).status_code == 200
            proc.send_signal(signal.SIGTERM)  # at once: the rows are still in the batch window
        assert proc.wait(15) == 0
        assert "Traceback" not in logfile.read_text()
    assert count(dbp) == 8
    assert rows(dbp, "SELECT sum(requests) FROM usage_daily") == [(8,)]


@contextmanager
def store_log() -> Iterator[list[str]]:
    """The store's log lines (any level) while the block runs."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.levelname} {record.getMessage()}")

    logger = logging.getLogger("at_gateway.store")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_row_that_cannot_be_written_is_dropped_alone_and_the_store_keeps_writing(tmp_path: Path) -> None:
    """One absurd value must not stop every write: counts past 2^53 (an upstream's usage) are clamped,
    and a row sqlite still cannot take is dropped alone and counted; the rest of its batch is written."""
    dbp = tmp_path / "poison.db"
    rec = StoreRecorder(open_db(str(dbp)), str(dbp), interval=30.0, retry_interval=30.0)
    with store_log() as lines:
        try:
            rec.record(fake_ctx(0, usage={"prompt_tokens": 10**20, "completion_tokens": 1,  # type: ignore[dict-item]
                                          "prompt_tokens_details": {"cached_tokens": 10**30}}, cost=10**25))
            rec.record(fake_ctx(1))
            bad = fake_ctx(2)
            bad.request_id = {"not": "a string"}  # type: ignore[assignment]  # no sqlite type: cannot be bound
            rec.record(bad)
            rec.record(fake_ctx(3))
            assert rec.flush_sync(10)
            assert rec.rejected == 1 and rec.dropped == 0
            for i in range(4, 6):  # and the store goes on writing
                rec.record(fake_ctx(i))
            assert rec.flush_sync(10)
        finally:
            rec.close_sync()
    logged = rows(dbp, "SELECT request_id, prompt_tokens, completion_tokens, cached_tokens, cost_nanousd "
                       "FROM request_log ORDER BY id")
    assert [r[0] for r in logged] == ["req-0", "req-1", "req-3", "req-4", "req-5"]
    assert logged[0][1:] == (2**53, 1, 2**53, 2**56)  # clamped: counts to 2^53, a cost to 2^56
    assert rows(dbp, "SELECT requests, prompt_tokens, cost_nanousd FROM usage_daily") == [
        (6, 2**53 + 50, 2**56)]  # the dropped row's usage counts; sums saturate, never overflow
    rejected = [ln for ln in lines if "could not be written" in ln]
    assert len(rejected) == 1 and "1 request-log row" in rejected[0], lines
    assert not [ln for ln in lines if "cannot write to the database" in ln or "writer round failed" in ln], lines


def test_while_the_database_fails_new_rows_do_not_cut_the_retry_wait_short(tmp_path: Path) -> None:
    """A failing database is retried every retry_interval: traffic does not make it every batch window
    (each retry re-sends every waiting row); a flush still tries at once."""
    dbp = tmp_path / "r.db"
    rec = StoreRecorder(open_db(str(dbp), busy_timeout_ms=0), str(dbp), interval=0.005, retry_interval=30.0)
    assert rec.flush_sync(10)  # the first round (and the start's pruning) done before the lock
    lock = held(dbp)
    n = 1
    try:
        rec.record(fake_ctx(0))
        assert not rec.flush_sync(10)
        assert rec.failures == 1
        end = time.monotonic() + 0.5
        while time.monotonic() < end:  # steady traffic: a new row every millisecond
            rec.record(fake_ctx(n))
            n += 1
            time.sleep(0.001)
        assert rec.failures == 1
        assert not rec.flush_sync(10)  # asked: one attempt now
        assert rec.failures == 2
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert rec.flush_sync(10)
    rec.close_sync()
    assert count(dbp) == n


def test_closing_the_services_flushes_the_store_even_when_another_part_fails_to_close(tmp_path: Path) -> None:
    class Broken:
        async def aclose(self) -> None:
            raise RuntimeError("cannot close")

    dbp = tmp_path / "c.db"
    rec = StoreRecorder(open_db(str(dbp)), str(dbp), interval=30.0)
    rec.record(fake_ctx(0))
    services = Services(store=rec, keys=Broken(), limiter=Broken())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="cannot close"):
        anyio.run(services.aclose)
    assert count(dbp) == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_stop_signal_cuts_the_drain_short_and_still_writes_the_rows(
        upstream: MockUpstream, tmp_path: Path, workers: int) -> None:
    """SIGTERM drains; a second stop signal (the supervisor passes it on as SIGINT) stops the requests
    still running, but what was recorded (the cut request's row too) is written before the exit."""
    import signal
    import threading

    from tests.test_service import gateway_process

    upstream.replies["held"] = Reply(body=chat_completion("late"), delay=30)
    dbp = tmp_path / "gw.db"
    cfg = file_config(upstream, dbp, [{"name": "demo", "steps": [{"provider": "echo", "model": "echo-1"}]},
                                      {"name": "slow", "steps": [{"provider": "up1", "model": "held"}]}],
                      workers=workers)
    with gateway_process(cfg, tmp_path) as (proc, url, _, logfile):
        assert wait_until(lambda: logfile.read_text().count("listening on") == workers, 15)
        outcome: list[Any] = []

        def slow() -> None:
            try:
                outcome.append(httpx.post(url + "/v1/chat/completions", headers=H, timeout=30,
                                          json={"model": "slow", "messages": MSG}).status_code)
            except httpx.HTTPError as exc:
                outcome.append(exc.__class__.__name__)

        t = threading.Thread(target=slow)
        t.start()
        assert wait_until(lambda: any(r.json.get("model") == "held" for r in upstream.received))
        for _ in range(3):
            assert httpx.post(url + "/v1/chat/completions", headers=H, timeout=10,
                              json={"model": "demo", "messages": MSG}).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: logfile.read_text().count("draining (up to") >= workers, 10)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        t.join(30)
        text = logfile.read_text()
        assert "Traceback" not in text and "not written" not in text, text
    assert rows(dbp, "SELECT route, count(*) FROM request_log GROUP BY route ORDER BY route") == [
        ("demo", 3), ("slow", 1)]
    assert rows(dbp, "SELECT sum(requests) FROM usage_daily") == [(4,)]
