"""Admin API ``stats/series``, ``stats/top``, ``stats/live`` and ``usage?format=csv`` on a gateway running as
``serve`` runs it (``run_live``: a real sqlite file, real sockets, a mock upstream).

Asserted: real requests (a 200, a fallback, a stream with its time to first token, a 404, a 401) move the
series and the tables as they should; one point per minute with empty minutes as zeros; filters; the live
view lists a request while the upstream holds it, and not after; the CSV export's header, rows, totals and
attachment headers; bad query values 400 ``invalid_query``. And a million generated log rows (with their
rollups and daily usage, written once per module): every call the dashboard makes answers within 1 s through
the running gateway, and the stats queries read the rollups by their primary key.
"""

from __future__ import annotations

import csv
import io
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from at_gateway.admin.reports import explain
from at_gateway.store import db
from at_gateway.store.keys import KeyStore
from at_gateway.store.usage import ROLLUP_BUCKETS, ROLLUP_COLUMNS, bucket_of, day_function
from tests.conftest import GATEWAY_KEY, RunningGateway, base_config, run_live
from tests.mock_upstream import MockUpstream, Reply, stream_of, wait_until

ADMIN = "adm-" + "9a" * 16
V1 = "/admin/api/v1/"
CHAT = "/v1/chat/completions"
ROUTES = [
    {"name": "demo", "steps": [{"provider": "echo", "model": "echo-1"}]},
    {"name": "flaky", "steps": [{"provider": "up1", "model": "broken"}, {"provider": "echo", "model": "echo-1"}]},
    {"name": "streamy", "steps": [{"provider": "up1", "model": "gpt-4o"}]},
    {"name": "slow", "steps": [{"provider": "up2", "model": "slow-1"}]},
]


class Api:
    def __init__(self, gw: RunningGateway, mock: MockUpstream) -> None:
        self.gw = gw
        self.mock = mock
        self.http = httpx.Client(base_url=gw.url + V1, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)

    def get(self, path: str, want: int = 200, **params: Any) -> Any:
        r = self.http.get(path, params=params or None)
        assert r.status_code == want, (r.status_code, r.text)
        return r.json() if r.headers["content-type"].startswith("application/json") else r

    def create(self, name: str) -> tuple[str, str]:
        """A client key made through the admin API (this worker serves it at once): its id and secret."""
        r = self.http.post("clients", json={"name": name})
        assert r.status_code == 201, r.text
        key = r.json()["key"]
        keys = self.gw.gateway.services.keys
        assert keys is not None

        def known() -> bool:  # asked of the key cache, not by a request (a 401 would count in the stats)
            try:
                return keys.verify(key.encode()) is not None
            except Exception:  # noqa: BLE001 (401: not loaded yet)
                return False

        assert wait_until(known)
        return r.json()["id"], key

    def flush(self) -> None:
        store = self.gw.gateway.services.store
        assert store is not None
        self.gw.portal.call(store.flush)


@pytest.fixture
def api(upstream: MockUpstream, tmp_path: Path) -> Iterator[Api]:
    upstream.replies["broken"] = Reply(status=500, body={"error": {"message": "boom"}})
    upstream.replies["gpt-4o"] = Reply(sse=stream_of("hello", "there"))
    raw = base_config(upstream.url, [dict(r) for r in ROUTES], store={"path": str(tmp_path / "gw.db")},
                      admin_token=ADMIN, workers=2)
    with run_live(raw) as gw:
        a = Api(gw, upstream)
        try:
            yield a
        finally:
            a.http.close()


def chat(gw: RunningGateway, model: str, key: str = GATEWAY_KEY, **extra: Any) -> httpx.Response:
    return httpx.post(gw.url + CHAT, headers={"authorization": f"Bearer {key}"}, timeout=30,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}], **extra})


def totals(points: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("requests", "errors", "fallbacks", "prompt_tokens", "completion_tokens")
    return {k: sum(p[k] for p in points) for k in keys}


def test_real_requests_move_the_series(api: Api) -> None:
    gw = api.gw
    for _ in range(3):
        assert chat(gw, "demo").status_code == 200
    assert chat(gw, "flaky").status_code == 200  # step 0 answers 500, step 1 serves it: a fallback
    with httpx.stream("POST", gw.url + CHAT, headers={"authorization": f"Bearer {GATEWAY_KEY}"}, timeout=30,
                      json={"model": "streamy", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status_code == 200 and b"hello" in r.read()
    assert chat(gw, "no-such-route").status_code == 404
    assert chat(gw, "demo", key="wrong-key").status_code == 401
    api.get("clients")  # admin calls are not requests of the gateway's users: not counted
    api.flush()
    s = api.get("stats/series", minutes=5)
    assert s["object"] == "series" and s["step"] == 60
    points = s["points"]
    assert len(points) == 5 and [p["t"] for p in points] == list(range(s["from"], s["to"] + 60, 60))
    assert s["to"] == int(time.time() // 60) * 60 or s["to"] == int(time.time() // 60) * 60 - 60
    assert set(points[0]) == {"t", "requests", "errors", "fallbacks", "p50_ms", "p95_ms", "ttft_p50_ms",
                              "ttft_p95_ms", "prompt_tokens", "completion_tokens", "cost_usd"}
    got = totals(points)
    assert got["requests"] == 7 and got["errors"] == 2 and got["fallbacks"] == 1
    assert got["prompt_tokens"] > 0 and got["completion_tokens"] > 0
    busy = [p for p in points if p["requests"]]
    assert all(p["p50_ms"] is not None and p["p95_ms"] >= p["p50_ms"] for p in busy)
    assert any(p["ttft_p50_ms"] is not None for p in busy), "the stream's time to first token"
    empty = [p for p in points if not p["requests"]]
    assert all(p == {**p, "errors": 0, "p50_ms": None, "ttft_p95_ms": None, "cost_usd": 0.0} for p in empty)
    # Filters: one route; one provider.
    assert totals(api.get("stats/series", minutes=5, route="demo")["points"])["requests"] == 3
    assert totals(api.get("stats/series", minutes=5, route="flaky")["points"])["fallbacks"] == 1
    assert totals(api.get("stats/series", minutes=5, provider="up1")["points"])["requests"] == 1  # the stream
    assert totals(api.get("stats/series", minutes=5, key="key0")["points"])["requests"] == 6
    assert totals(api.get("stats/series", minutes=5, route="nope")["points"])["requests"] == 0
    assert len(api.get("stats/series")["points"]) == 60  # the default window: an hour


def test_top_tables(api: Api) -> None:
    gw = api.gw
    key_id, key = api.create("the-app")
    assert chat(gw, "demo", key=key).status_code == 200
    for _ in range(2):
        assert chat(gw, "demo").status_code == 200
    assert chat(gw, "flaky").status_code == 200
    assert chat(gw, "no-such-route").status_code == 404
    api.flush()
    routes = api.get("stats/top", by="route")
    assert routes["object"] == "list" and routes["by"] == "route"
    rows = {r["name"]: r for r in routes["data"]}
    assert [r["name"] for r in routes["data"]][0] == "demo"  # most requests first
    assert rows["demo"]["requests"] == 3 and rows["demo"]["errors"] == 0 and rows["demo"]["tokens"] > 0
    assert rows["demo"]["p95_ms"] is not None and isinstance(rows["demo"]["cost_usd"], float)
    assert rows["flaky"]["requests"] == 1
    assert rows[None]["requests"] == 1 and rows[None]["errors"] == 1  # the unknown route's 404
    providers = {r["name"]: r["requests"] for r in api.get("stats/top", by="provider")["data"]}
    assert providers == {"echo": 4, None: 1}
    keys = {r["name"]: r for r in api.get("stats/top", by="key", minutes=10)["data"]}
    assert keys[key_id]["key_name"] == "the-app" and keys[key_id]["requests"] == 1
    assert keys["key0"]["requests"] == 4 and keys["key0"]["key_name"] is None
    assert [r["name"] for r in api.get("stats/top", by="model", limit=1)["data"]] == ["echo-1"]


def test_live_lists_what_is_in_flight_now(api: Api) -> None:
    release = threading.Event()

    def slow(_: Any) -> Reply:
        release.wait(10)
        return Reply(body={"id": "x", "object": "chat.completion", "created": 1, "model": "slow-1",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": "late"},
                                        "finish_reason": "stop"}]})

    api.mock.replies["slow-1"] = slow  # the upstream answers "slow-1" once released
    done: list[int] = []
    t = threading.Thread(target=lambda: done.append(chat(api.gw, "slow").status_code))
    t.start()
    try:
        assert wait_until(lambda: api.get("stats/live")["in_flight"] == 1)
        live = api.get("stats/live")
        assert live["scope"] == "this worker"  # workers: 2: each worker knows its own
        (item,) = live["requests"]
        assert item["route"] == "slow" and item["provider"] == "up2" and item["client"] == "key0"
        assert item["stream"] is False and item["door"] is None and item["age_ms"] >= 0
        assert item["path"] == CHAT and isinstance(item["request_id"], str)
    finally:
        release.set()
        t.join(10)
    assert done == [200]
    assert wait_until(lambda: api.get("stats/live")["in_flight"] == 0)
    assert api.get("stats/live")["requests"] == []


def test_the_usage_export_is_csv(api: Api) -> None:
    gw = api.gw
    key_id, key = api.create("=cmd|' /C calc'!A0")  # a spreadsheet formula as a name
    assert chat(gw, "demo", key=key).status_code == 200
    for _ in range(2):
        assert chat(gw, "demo").status_code == 200
    api.flush()
    r = api.http.get("usage", params={"format": "csv"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/csv; charset=utf-8"
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["content-disposition"].startswith('attachment; filename="at-gateway-usage-')
    lines = list(csv.reader(io.StringIO(r.text)))
    assert lines[0] == ["day", "key", "key_name", "route", "provider", "model", "requests", "errors",
                        "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "tokens",
                        "cost_usd", "unpriced"]
    body = [dict(zip(lines[0], line, strict=True)) for line in lines[1:]]
    assert sum(int(b["requests"]) for b in body) == api.get("usage")["total"]["requests"] == 3
    mine = next(b for b in body if b["key"] == key_id)
    assert mine["key_name"] == "'=cmd|' /C calc'!A0"  # not a formula when opened in a spreadsheet
    assert r.text.endswith("\r\n") and "\r\n" in r.text
    # group_by and the filters apply as in the JSON answer.
    lines = list(csv.reader(io.StringIO(api.http.get("usage", params={"format": "csv", "group_by": "route"}).text)))
    assert lines[0][:2] == ["route", "requests"] and [line[0] for line in lines[1:]] == ["demo"]
    assert api.get("usage", want=400, format="xml")["error"]["code"] == "invalid_query"
    assert api.get("usage", want=400, format="csv", cursor="x")["error"]["code"] == "invalid_query"


@pytest.mark.parametrize(("path", "params"), [
    ("stats/series", {"minutes": "0"}), ("stats/series", {"minutes": "100000"}), ("stats/series", {"minutes": "x"}),
    ("stats/series", {"bucket": "1"}), ("stats/top", {"by": "colour"}), ("stats/top", {"limit": "0"}),
    ("stats/top", {"minutes": "-5"}), ("stats/live", {"limit": "nope"}), ("stats/live", {"route": "demo"}),
])
def test_bad_query_values_are_400(api: Api, path: str, params: dict[str, str]) -> None:
    err = api.get(path, want=400, **params)["error"]
    assert err["code"] == "invalid_query" and err["message"]


def test_stats_need_an_admin_token(api: Api) -> None:
    for path in ("stats/series", "stats/top", "stats/live"):
        r = httpx.get(api.gw.url + V1 + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_token"


# -- a million rows ------------------------------------------------------------------------------------------

N_ROWS = 1_000_000
SPAN = 7 * 86400  # the rows cover the last week
LIMIT_S = 1.0  # the issue: every page answers within a second


def _generate(path: Path) -> dict[str, Any]:
    """1,000,000 request-log rows over the last week (about 100 a minute, from 40 combinations of key, route,
    provider and model), their rollups and daily usage, and 50 keys, written straight into the file: the rows by
    one INSERT ... SELECT (a recursive counter, in sqlite's C), the aggregates by the same formulas in Python."""
    conn = db.connect(str(path))
    keys = KeyStore(conn)
    key_ids: list[str | None] = [keys.create(f"app-{i}")[0].key.id for i in range(50)]
    rnd = random.Random(7)
    combos = [(rnd.choice([*key_ids, None]), rnd.choice(("demo", "chat-big", "chat-small", "embed", "flaky", "vision")),
               *rnd.choice((("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet"),
                            ("gemini", "gemini-flash")))) for _ in range(40)]
    latencies = [round(rnd.lognormvariate(5.5, 1.0), 3) for _ in range(4096)]
    start, step = time.time() - SPAN, SPAN / N_ROWS
    started = time.perf_counter()
    conn.execute("BEGIN")
    conn.execute("CREATE TEMP TABLE combos (n INTEGER PRIMARY KEY, key_id, route, provider, model)")
    conn.executemany("INSERT INTO combos VALUES (?, ?, ?, ?, ?)", [(i, *c) for i, c in enumerate(combos)])
    conn.execute("CREATE TEMP TABLE latencies (n INTEGER PRIMARY KEY, ms REAL)")
    conn.executemany("INSERT INTO latencies VALUES (?, ?)", list(enumerate(latencies)))
    # status: 95 % 200, then 429, 500 and 401 (i * 37 % 100 walks every value once per hundred rows)
    conn.execute(
        f"WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {N_ROWS - 1}) "  # noqa: S608
        "INSERT INTO request_log (time, request_id, key_id, method, path, route, provider, model, status, attempts, "
        "failed_attempts, latency_ms, ttfb_ms, stream, prompt_tokens, completion_tokens, cost_nanousd, error) "
        f"SELECT {start!r} + i * {step!r}, 'r' || i, c.key_id, 'POST', '{CHAT}', c.route, c.provider, c.model, "
        "CASE WHEN i * 37 % 100 < 95 THEN 200 WHEN i * 37 % 100 < 97 THEN 429 WHEN i * 37 % 100 < 99 THEN 500 "
        "ELSE 401 END AS status, 1, NULL, l.ms, l.ms * 0.3, i & 1, 120, 40, 3000, NULL "
        "FROM n JOIN combos c ON c.n = i * 7919 % 40 JOIN latencies l ON l.n = (i & 4095)")
    logged = time.perf_counter() - started
    rollups: dict[tuple[Any, ...], list[int]] = {}
    usage: dict[tuple[Any, ...], list[int]] = {}
    day = day_function("UTC")
    buckets = [bucket_of(ms) for ms in latencies]
    ttft = [bucket_of(ms * 0.3) for ms in latencies]
    statuses = [200 if j < 95 else 429 if j < 97 else 500 if j < 99 else 401 for j in range(100)]
    width = len(ROLLUP_COLUMNS)
    for i in range(N_ROWS):
        t = start + i * step
        key_id, route, provider, model = combos[i * 7919 % 40]
        status = statuses[i * 37 % 100]
        group = (int(t // 60) * 60, route, provider, model, key_id or "", status // 100)
        counts = rollups.get(group)
        if counts is None:
            counts = rollups[group] = [0] * width
        counts[0] += 1
        if status >= 400:
            counts[1] += 1
        counts[3] += 120
        counts[4] += 40
        counts[7] += 3000
        counts[9 + buckets[i & 4095]] += 1
        if i & 1:
            counts[9 + ROLLUP_BUCKETS + ttft[i & 4095]] += 1
        if key_id is not None:
            ugroup = (day(t), key_id, route, provider, model)
            u = usage.get(ugroup)
            if u is None:
                u = usage[ugroup] = [0] * 8
            u[0] += 1
            u[1] += status >= 400
            u[2] += 120
            u[3] += 40
            u[6] += 3000
    conn.executemany(f"INSERT INTO usage_minute VALUES ({', '.join('?' * (6 + width))})",  # noqa: S608
                     [(*k, *v) for k, v in rollups.items()])
    conn.executemany("INSERT INTO usage_daily VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     [(*k, *v) for k, v in usage.items()])
    conn.execute("COMMIT")
    took = time.perf_counter() - started
    tables = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # noqa: S608
              for t in ("request_log", "usage_minute", "usage_daily", "keys")}
    check = conn.execute("SELECT sum(requests), sum(errors) FROM usage_minute").fetchone()
    assert check == conn.execute("SELECT count(*), sum(status >= 400) FROM request_log").fetchone()
    conn.close()
    return {"log_s": logged, "total_s": took, "counts": tables, "key": next(k for k, *_ in combos if k)}


@pytest.fixture(scope="module")
def million(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningGateway, dict[str, Any], Path]]:
    path = tmp_path_factory.mktemp("million") / "gw.db"
    made = _generate(path)
    raw = base_config("http://127.0.0.1:9", [dict(r) for r in ROUTES[:1]], store={"path": str(path)},
                      admin_token=ADMIN)
    with run_live(raw) as gw:
        yield gw, made, path


CALLS = [
    ("stats/series", {}), ("stats/series", {"route": "flaky"}), ("stats/series", {"key": "{key}"}),
    ("stats/series", {"minutes": "1440"}), ("stats/top", {"by": "route"}), ("stats/top", {"by": "provider"}),
    ("stats/top", {"by": "key"}), ("stats/top", {"by": "model", "minutes": "1440"}), ("stats/live", {}),
    ("requests", {}), ("requests", {"key": "{key}"}), ("requests", {"route": "vision"}),
    ("requests", {"status": "5xx"}), ("requests", {"status": "502"}), ("requests", {"status": "404"}),
    ("requests", {"route": "no-such-route"}), ("requests", {"since": "3d", "until": "2d"}),
    ("requests", {"key": "{key}", "route": "embed", "status": "4xx"}),
    ("requests", {"route": "demo", "status": "200", "since": "6d"}), ("requests", {"limit": "1000"}),
    ("usage", {}), ("usage", {"group_by": "key", "since": "7d"}), ("usage", {"group_by": "day,route,model"}),
    ("usage", {"format": "csv"}), ("clients", {}), ("session", {}), ("health", {}),
]


def test_a_million_rows_every_dashboard_call_answers_within_a_second(
        million: tuple[RunningGateway, dict[str, Any], Path], capsys: pytest.CaptureFixture[str]) -> None:
    gw, made, _ = million
    assert made["counts"]["request_log"] == N_ROWS
    assert made["total_s"] < 60
    timings = {}
    with httpx.Client(base_url=gw.url + V1, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30) as http:
        assert http.get("health").status_code == 200  # connected, warm
        for path, params in CALLS:
            params = {k: v.replace("{key}", made["key"]) for k, v in params.items()}
            # The best of up to three tries: what the call costs, not what a busy machine (the suite's other
            # workers) added to one of them. A call that is slow every time still fails.
            took = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                r = http.get(path, params=params)
                took = min(took, time.perf_counter() - started)
                assert r.status_code == 200, (path, params, r.text[:300])
                if took < LIMIT_S:
                    break
            timings[f"{path} {params}"] = took
    slow = {k: round(v, 3) for k, v in timings.items() if v >= LIMIT_S}
    with capsys.disabled():
        print(f"\nmillion rows: generated in {made['total_s']:.1f}s (log rows {made['log_s']:.1f}s), "
              f"{made['counts']}")
        for name, took in sorted(timings.items(), key=lambda kv: -kv[1]):
            print(f"  {took * 1000:7.1f} ms  {name}")
    assert not slow, slow


def test_a_million_rows_the_stats_read_the_rollups_by_their_primary_key(
        million: tuple[RunningGateway, dict[str, Any], Path]) -> None:
    _, made, path = million
    conn = sqlite3.connect(path)
    try:
        t1 = int(time.time() // 60) * 60
        series = explain(conn, "SELECT minute, sum(requests) FROM usage_minute WHERE minute BETWEEN ? AND ? "
                               "AND route = ? GROUP BY minute", (t1 - 3540, t1, "demo"))
        assert "SEARCH usage_minute USING PRIMARY KEY (minute>? AND minute<?)" in series, series
        assert "TEMP B-TREE" not in series, series  # grouped in the key's order
        top = explain(conn, "SELECT key_id, sum(requests) AS n FROM usage_minute WHERE minute BETWEEN ? AND ? "
                            "GROUP BY key_id ORDER BY n DESC LIMIT 20", (t1 - 3540, t1))
        assert "SEARCH usage_minute USING PRIMARY KEY (minute>? AND minute<?)" in top, top
        # An hour of rollups is a few thousand rows whatever the log holds.
        n = conn.execute("SELECT count(*) FROM usage_minute WHERE minute >= ?", (t1 - 3540,)).fetchone()[0]
        assert 0 < n < 60 * 100
    finally:
        conn.close()
