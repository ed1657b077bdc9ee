"""Admin API ``usage``, ``requests`` and ``audit`` on a gateway running as ``serve`` runs it (``run_live``, a real
sqlite file).

Rows come two ways: real chat calls through the gateway (echo provider, route ``demo``; a fallback route whose
first step is a mock upstream answering 500), and rows written into the database file by the test, where
exact times, ties and many combinations are needed. Asserted: every endpoint's status and body; filters;
pages walking every row once, in order, while new rows arrive; exact decimal costs; bad query values 400
``invalid_query``; the plan sqlite chooses for each query (its index, no sort of the whole log); and the CSV
export written in a thread, never on the event loop.
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import json
import sqlite3
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from at_gateway.admin.reports import explain, requests_sql, usage_sql
from at_gateway.store import db
from tests.conftest import GATEWAY_KEY, base_config, run_live
from tests.mock_upstream import MockUpstream, Reply, wait_until
from tests.test_admin_clients import ADMIN, CHAT, ROUTES, Admin, chat, secret_of, status_within

ADMIN2 = "adm-" + "d4" * 16
FLAKY = {"name": "flaky", "steps": [{"provider": "up1", "model": "broken"}, {"provider": "echo", "model": "echo-1"}]}


@pytest.fixture
def admin(upstream: MockUpstream, tmp_path: Path) -> Iterator[Admin]:
    raw = base_config(upstream.url, [*(dict(r) for r in ROUTES), FLAKY], store={"path": str(tmp_path / "gw.db")},
                      admin_tokens=[ADMIN, ADMIN2])
    with run_live(raw) as gw:
        api = Admin(gw, tmp_path / "gw.db")
        try:
            yield api
        finally:
            api.http.close()


def iso(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def today(offset: int = 0) -> str:
    return (dt.datetime.now(dt.timezone.utc).date() + dt.timedelta(days=offset)).isoformat()


# -- requests: real calls through the gateway ----------------------------------------------------------------

def test_chat_calls_through_the_gateway_appear_in_requests_newest_first(admin: Admin) -> None:
    d, key = admin.create(name="caller")
    status_within(admin.gw, key, 200)
    sent = []
    for i in range(3):
        r = httpx.post(admin.gw.url + CHAT, headers={"authorization": f"Bearer {key}", "x-request-id": f"req-{i}"},
                       json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
        assert r.status_code == 200 and r.headers["x-request-id"] == f"req-{i}"
        sent.append(f"req-{i}")
    assert chat(admin.gw, GATEWAY_KEY).status_code == 200
    assert chat(admin.gw, key, "no-such-route").status_code == 404
    admin.ok("GET", "clients")  # admin calls are not request-log rows
    admin.flush()
    rows = admin.ok("GET", "requests")["data"]
    mine = [r for r in rows if r["key"] == d["id"]]
    assert [r["id"] for r in mine if r["status"] == 200][:3] == sent[::-1], "newest first"
    assert all(not r["path"].startswith("/admin") for r in rows)
    first = next(r for r in mine if r["id"] == "req-0")
    assert first | {"time": None, "latency_ms": None, "ttfb_ms": None, "prompt_tokens": None,
                    "completion_tokens": None} == {
        "object": "request", "id": "req-0", "time": None, "key": d["id"], "key_name": "caller", "method": "POST",
        "path": CHAT, "route": "demo", "provider": "echo", "model": "echo-1", "status": 200, "outcome": None,
        "stream": False, "attempts": 1, "latency_ms": None, "ttfb_ms": None, "prompt_tokens": None,
        "completion_tokens": None, "cached_tokens": 0, "reasoning_tokens": 0, "cost_nanousd": None,
        "cost_usd": None, "error": None, "metadata": None}
    assert first["latency_ms"] > 0 and first["prompt_tokens"] >= 1
    assert abs(dt.datetime.fromisoformat(first["time"].replace("Z", "+00:00")).timestamp() - time.time()) < 60
    refused = [r["status"] for r in admin.ok("GET", "requests", status="4xx")["data"]]
    assert refused.count(404) == 1 and set(refused) <= {401, 404}  # 401: polls before the key cache had the key
    assert [r["status"] for r in admin.ok("GET", "requests", status="404")["data"]] == [404]
    assert {r["id"] for r in admin.ok("GET", "requests", key=d["id"], status="200")["data"]} == set(sent) | {
        r["id"] for r in mine if r["status"] == 200}
    assert [r["key"] for r in admin.ok("GET", "requests", key="key0")["data"]] == ["key0"]  # the config's api_key
    one = admin.ok("GET", "requests/req-1")
    assert one == {**next(r for r in rows if r["id"] == "req-1"), "failed_attempts": []}
    admin.error("GET", "requests/no-such-request", want=404, code="request_not_found")
    assert secret_of(key) not in json.dumps(rows) + json.dumps(one) + admin.gw.logs.getvalue()


def test_a_fallback_shows_its_failed_attempt_decoded(admin: Admin, upstream: MockUpstream) -> None:
    upstream.replies["broken"] = Reply(status=500, body={"error": {"message": "boom", "type": "server_error"}})
    r = httpx.post(admin.gw.url + CHAT, headers={"authorization": f"Bearer {GATEWAY_KEY}", "x-request-id": "fb-1"},
                   json={"model": "flaky", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert r.status_code == 200, r.text
    assert wait_until(lambda: admin.call("GET", "requests/fb-1").status_code == 200)
    one = admin.ok("GET", "requests/fb-1")
    assert one["attempts"] == 2 and one["provider"] == "echo" and one["route"] == "flaky"
    [failed] = one["failed_attempts"]
    assert failed["provider"] == "up1" and failed["model"] == "broken" and failed["status"] == 500
    assert "failed_attempts" not in admin.ok("GET", "requests", route="flaky")["data"][0]


# -- requests: rows written by the test ------------------------------------------------------------------------

BASE = 1_900_000_000.0  # 2030-03-17: after anything the gateway itself writes in a test


def seed_requests(path: Path, n: int = 40) -> list[dict[str, Any]]:
    """``n`` request-log rows with ties on time (three rows per time), several keys, routes, providers and
    statuses; newest first as the API must answer them."""
    rows = []
    conn = db.connect(str(path))
    try:
        with conn:
            conn.execute("BEGIN")
            for i in range(n):
                row = {"time": BASE + i // 3, "id": f"s-{i:03d}", "key": ("ka", "kb", None)[i % 3],
                       "route": ("r1", "r2")[i % 2], "provider": ("p1", "p2", "p3", "p1")[i % 4],
                       "model": ("m1", "m2")[i % 5 == 0], "status": (200, 200, 429, 502, 404, 201, 503)[i % 7]}
                cur = conn.execute(
                    "INSERT INTO request_log (time, request_id, key_id, method, path, route, provider, model, status, "
                    "attempts, failed_attempts, latency_ms, stream, cost_nanousd, metadata) "
                    "VALUES (?, ?, ?, 'POST', '/v1/chat/completions', ?, ?, ?, ?, 1, ?, 1.5, 0, ?, ?)",
                    (row["time"], row["id"], row["key"], row["route"], row["provider"], row["model"], row["status"],
                     json.dumps([{"step": 0, "status": 500}]) if i % 7 == 3 else None, i * 250 if i % 2 else None,
                     json.dumps({"n": i}) if i % 4 == 0 else None))
                row["rowid"] = cur.lastrowid
                rows.append(row)
    finally:
        conn.close()
    return sorted(rows, key=lambda r: (r["time"], r["rowid"]), reverse=True)


REQUEST_FILTERS: list[tuple[dict[str, str], Any]] = [
    ({}, lambda r: True),
    ({"key": "ka"}, lambda r: r["key"] == "ka"),
    ({"route": "r2"}, lambda r: r["route"] == "r2"),
    ({"provider": "p1"}, lambda r: r["provider"] == "p1"),
    ({"model": "m2"}, lambda r: r["model"] == "m2"),
    ({"status": "200"}, lambda r: r["status"] == 200),
    ({"status": "2xx"}, lambda r: 200 <= r["status"] < 300),
    ({"status": "5XX"}, lambda r: r["status"] >= 500),
    ({"status": "4xx", "key": "kb"}, lambda r: 400 <= r["status"] < 500 and r["key"] == "kb"),
    ({"key": "ka", "route": "r1", "provider": "p1"}, lambda r: (r["key"], r["route"], r["provider"]) == ("ka", "r1",
                                                                                                         "p1")),
    ({"since": str(BASE + 5)}, lambda r: r["time"] >= BASE + 5),
    ({"until": str(BASE + 5)}, lambda r: r["time"] < BASE + 5),
    ({"since": iso(BASE + 2), "until": iso(BASE + 7)}, lambda r: BASE + 2 <= r["time"] < BASE + 7),
    ({"since": iso(BASE + 2).replace(".000Z", "+00:00"), "key": "ka"},
     lambda r: r["time"] >= BASE + 2 and r["key"] == "ka"),
    ({"key": "nobody"}, lambda r: False),
    ({"until": "1h"}, lambda r: False),  # an hour ago: the seeded rows are in 2030
    ({"since": "1h"}, lambda r: True),
    ({"status": "100"}, lambda r: False),
]


def test_requests_filters_and_pages_walk_every_row_once_in_time_then_id_order(admin: Admin) -> None:
    seeded = seed_requests(admin.db_path)
    for params, keep in REQUEST_FILTERS:
        want = [r["id"] for r in seeded if keep(r)]
        for limit in (1, 2, 3, 7, 1000):
            got = [r["id"] for r in admin.walk("requests", limit, **params)]
            assert got == want, (params, limit)
    first = admin.ok("GET", "requests", limit=4)
    assert [r["id"] for r in first["data"]] == [r["id"] for r in seeded[:4]]
    assert first["data"][0]["time"] == iso(seeded[0]["time"]) and first["data"][0]["cost_usd"] == "0.000009750"


def test_rows_arriving_while_a_client_walks_the_pages_neither_repeat_nor_hide_older_ones(admin: Admin) -> None:
    seeded = seed_requests(admin.db_path, 20)
    page = admin.ok("GET", "requests", limit=5)
    got = [r["id"] for r in page["data"]]
    conn = sqlite3.connect(admin.db_path)
    with conn:  # newer rows, and one at the very time of the last row given (a tie, with a higher id)
        for i, t in enumerate((BASE + 100, BASE + 101, seeded[4]["time"])):
            conn.execute("INSERT INTO request_log (time, request_id, status) VALUES (?, ?, 200)", (t, f"new-{i}"))
    conn.close()
    cursor = page["next_cursor"]
    while cursor:
        page = admin.ok("GET", "requests", limit=5, cursor=cursor)
        got += [r["id"] for r in page["data"]]
        cursor = page["next_cursor"]
    assert got == [r["id"] for r in seeded]
    assert [r["id"] for r in admin.ok("GET", "requests", limit=3)["data"]] == ["new-1", "new-0", seeded[0]["id"]]


def test_request_detail_decodes_failed_attempts_and_metadata(admin: Admin) -> None:
    seed_requests(admin.db_path, 8)
    one = admin.ok("GET", "requests/s-003")
    assert one["failed_attempts"] == [{"step": 0, "status": 500}] and one["status"] == 502
    assert admin.ok("GET", "requests/s-004")["metadata"] == {"n": 4}
    assert admin.ok("GET", "requests/s-000")["failed_attempts"] == []


# -- usage -------------------------------------------------------------------------------------------------

USAGE_ROWS = [  # day offset, key, route, provider, model, requests, errors, prompt, completion, cost (nano), unpriced
    (0, "ka", "r1", "p1", "m1", 3, 1, 30, 10, 100_000_000, 0),
    (0, "ka", "r2", "p2", "m2", 1, 0, 5, 5, 100_000_000, 0),
    (0, "kb", "r1", "p1", "m1", 2, 0, 20, 2, 100_000_001, 0),
    (-1, "ka", "r1", "p1", "m1", 4, 2, 40, 4, 1, 0),
    (-1, "kb", "r2", "p1", "m3", 1, 1, 1, 1, 0, 1),
    (-3, "ka", "r1", "p2", "m1", 5, 0, 50, 50, 750, 0),
    (-10, "kb", "r1", "p1", "m1", 7, 0, 70, 7, 2_000_000_000, 2),
]
_N = ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_nanousd", "unpriced")


def seed_usage(path: Path, key_names: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    conn = db.connect(str(path))
    try:
        with conn:
            for off, key, route, provider, model, *nums in USAGE_ROWS:
                k = key_names.get(key, key)
                conn.execute("INSERT INTO usage_daily (day, key_id, route, provider, model, requests, errors, "
                             "prompt_tokens, completion_tokens, cost_nanousd, unpriced) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (today(off), k, route, provider, model, *nums))
                rows.append({"day": today(off), "key": k, "alias": key, "route": route, "provider": provider,
                             "model": model, **dict(zip(_N, nums, strict=True))})
    finally:
        conn.close()
    return rows


def expected_usage(rows: list[dict[str, Any]], groups: list[str], keep: Any) -> list[dict[str, Any]]:
    out: dict[tuple[str, ...], dict[str, int]] = {}
    for r in rows:
        if keep(r):
            g = out.setdefault(tuple(r[n] for n in groups), dict.fromkeys(_N, 0))
            for n in _N:
                g[n] += r[n]
    return [{**dict(zip(groups, k, strict=True)), **v} for k, v in sorted(out.items())]


USAGE_CASES: list[tuple[dict[str, str], list[str], Any]] = [
    ({}, ["day"], lambda r: True),
    ({"group_by": "route"}, ["route"], lambda r: True),
    ({"group_by": "provider"}, ["provider"], lambda r: True),
    ({"group_by": "model"}, ["model"], lambda r: True),
    ({"group_by": "day,route"}, ["day", "route"], lambda r: True),
    ({"group_by": "route, day"}, ["route", "day"], lambda r: True),
    ({"group_by": "key,route,provider,model,day"}, ["key", "route", "provider", "model", "day"], lambda r: True),
    ({"since": "1d"}, ["day"], lambda r: r["day"] == today()),
    ({"since": "2d", "group_by": "key"}, ["key"], lambda r: r["day"] >= today(-1)),
    ({"since": "1w"}, ["day"], lambda r: r["day"] >= today(-6)),
    ({"since": today(-3), "until": today(-1)}, ["day"], lambda r: today(-3) <= r["day"] <= today(-1)),
    ({"until": today(-1) + "T23:59:59Z"}, ["day"], lambda r: r["day"] <= today(-1)),
    ({"since": str(time.time() - 86400 * 3)}, ["day"], lambda r: r["day"] >= today(-3)),
    ({"key": "ka", "group_by": "route"}, ["route"], lambda r: r["alias"] == "ka"),
    ({"route": "r1", "provider": "p1", "group_by": "key"}, ["key"], lambda r: (r["route"], r["provider"]) ==
     ("r1", "p1")),
    ({"model": "m3"}, ["day"], lambda r: r["model"] == "m3"),
    ({"route": "nowhere"}, ["day"], lambda r: False),
]


def test_usage_groups_filters_and_exact_costs(admin: Admin) -> None:
    d, _ = admin.create(name="alpha")
    seeded = seed_usage(admin.db_path, {"ka": d["id"]})
    for params, groups, keep in USAGE_CASES:
        query = {k: (d["id"] if v == "ka" else v) for k, v in params.items()}
        want = expected_usage(seeded, groups, keep)
        for limit in (1, 2, 1000):
            got = admin.walk("usage", limit, **query)
            assert [{k: g[k] for k in (*groups, *_N)} for g in got] == want, (params, limit)
            for g in got:
                assert g["cost_usd"] == f"{Decimal(g['cost_nanousd']).scaleb(-9):f}"
                assert g["tokens"] == g["prompt_tokens"] + g["completion_tokens"]
                assert set(g) >= {"cached_tokens", "reasoning_tokens"}
                if "key" in groups:
                    assert g["key_name"] == ("alpha" if g["key"] == d["id"] else None)
        page = admin.ok("GET", "usage", **query)
        total = {n: sum(w[n] for w in want) for n in _N}
        assert {n: page["total"][n] for n in _N} == total, params
        assert page["group_by"] == groups


def test_usage_costs_are_exact_decimal_strings(admin: Admin) -> None:
    seed_usage(admin.db_path, {})
    page = admin.ok("GET", "usage", group_by="day", since="1d")
    assert page["data"][0]["cost_usd"] == "0.300000001" and page["data"][0]["cost_nanousd"] == 300_000_001
    assert page["since"] == today() and page["until"] is None
    days = {r["day"]: r["cost_usd"] for r in admin.ok("GET", "usage")["data"]}
    assert days == {today(): "0.300000001", today(-1): "0.000000001", today(-3): "0.000000750",
                    today(-10): "2.000000000"}
    assert admin.ok("GET", "usage")["total"]["cost_usd"] == "2.300000752"
    assert admin.ok("GET", "usage", route="nowhere")["total"]["cost_usd"] == "0.000000000"


def test_usage_counts_real_chat_calls(admin: Admin) -> None:
    d, key = admin.create(name="caller")
    status_within(admin.gw, key, 200)
    assert chat(admin.gw, key).status_code == 200
    admin.flush()
    [row] = admin.ok("GET", "usage", group_by="key,route,provider,model", key=d["id"])["data"]
    assert row["key"] == d["id"] and row["key_name"] == "caller" and row["route"] == "demo"
    assert row["provider"] == "echo" and row["model"] == "echo-1" and row["requests"] == 2
    assert row["unpriced"] == 2 and row["cost_usd"] == "0.000000000"


# -- audit ----------------------------------------------------------------------------------------------------

def test_audit_lists_admin_writes_newest_first_with_filters_and_pages(admin: Admin) -> None:
    ids = [admin.create(name=f"k{i}")[0]["id"] for i in range(5)]
    other = httpx.post(admin.gw.url + "/admin/api/v1/clients", json={"name": "by-token1"},
                       headers={"authorization": f"Bearer {ADMIN2}"})
    assert other.status_code == 201
    ids.append(other.json()["id"])
    admin.ok("PATCH", f"clients/{ids[0]}", {"limits": {"rpm": 9}})
    admin.ok("POST", f"clients/{ids[1]}/rotate")
    admin.ok("DELETE", f"clients/{ids[0]}")
    rows = admin.ok("GET", "audit")["data"]
    actions = [(r["action"], r["object"]) for r in rows]
    assert actions == [("client.revoke", ids[0]), ("client.rotate", ids[1]), ("client.update", ids[0]),
                       ("client.create", ids[5]), *(("client.create", i) for i in reversed(ids[:5]))]
    assert all(isinstance(r["id"], str) for r in rows) and len({r["id"] for r in rows}) == len(rows)
    assert [r["actor"] for r in rows].count("token1") == 1 and rows[3]["actor"] == "token1"
    assert rows[2]["change"] == {"limits": {"from": {}, "to": {"rpm": 9}}}
    assert rows[0]["change"] == {"state": {"from": "active", "to": "revoked"}}
    times = [r["time"] for r in rows]
    assert times == sorted(times, reverse=True)
    mid = dt.datetime.fromisoformat(rows[3]["time"].replace("Z", "+00:00")).timestamp()
    cases: list[tuple[dict[str, str], list[int]]] = [
        ({}, list(range(9))),
        ({"action": "client.create"}, [3, 4, 5, 6, 7, 8]),
        ({"action": "client"}, list(range(9))),  # a family
        ({"action": "client.cr"}, []),
        ({"object": ids[0]}, [0, 2, 8]),
        ({"actor": "token1"}, [3]),
        ({"actor": "token0", "action": "client.create"}, [4, 5, 6, 7, 8]),
        ({"since": str(mid)}, [i for i in range(9) if rows[i]["time"] >= rows[3]["time"]]),
        ({"until": rows[3]["time"]}, [i for i in range(9) if rows[i]["time"] < rows[3]["time"]]),
        ({"since": "1h"}, list(range(9))),
        ({"until": "2000-01-01"}, []),
    ]
    for params, want in cases:
        for limit in (1, 2, 4, 1000):
            got = admin.walk("audit", limit, **params)
            assert [r["id"] for r in got] == [rows[i]["id"] for i in want], (params, limit)


# -- bad query values ------------------------------------------------------------------------------------------

BAD_QUERIES = [
    ("usage", {"group_by": "week"}),
    ("usage", {"group_by": "day,day"}),
    ("usage", {"group_by": ""}),
    ("usage", {"group_by": "day,"}),
    ("usage", {"since": "yesterday"}),
    ("usage", {"since": "0d"}),
    ("usage", {"until": "2026-13-01"}),
    ("usage", {"since": "nan"}),
    ("usage", {"since": "1e300"}),
    ("usage", {"limit": "0"}),
    ("usage", {"cursor": "WzFd"}),  # [1]: not this group_by's cursor
    ("usage", {"key_id": "x"}),  # a misspelt filter
    ("requests", {"status": "600"}),
    ("requests", {"status": "abc"}),
    ("requests", {"status": "20"}),
    ("requests", {"status": "4x"}),
    ("requests", {"since": "last week"}),
    ("requests", {"until": "inf"}),
    ("requests", {"since": "nan"}),
    ("requests", {"limit": "-1"}),
    ("requests", {"limit": "1001"}),
    ("requests", {"cursor": "@@"}),
    ("requests", {"cursor": "WyJhIiwxXQ"}),  # ["a",1]
    ("requests", {"staus": "500"}),
    ("requests/s-1", {"x": "1"}),
    ("audit", {"since": "tomorrow"}),
    ("audit", {"cursor": "WyJhIl0"}),  # ["a"]
    ("audit", {"limit": "many"}),
    ("audit", {"object_id": "x"}),
]


@pytest.mark.parametrize(("path", "params"), BAD_QUERIES, ids=[f"{p}-{'-'.join(q)}" for p, q in BAD_QUERIES])
def test_bad_query_values_are_400_invalid_query(admin: Admin, path: str, params: dict[str, str]) -> None:
    admin.error("GET", path, want=400, code="invalid_query", **params)


DEEP_CURSOR = base64.urlsafe_b64encode(b"[" * 3000).decode().rstrip("=")  # a RecursionError in json, once a 500
LONG_CURSOR = base64.urlsafe_b64encode(json.dumps(["x" * 600]).encode()).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [DEEP_CURSOR, LONG_CURSOR, base64.urlsafe_b64encode(b"[" * 300).decode()],
                         ids=["nested-3000", "longer-than-512", "nested-short"])
@pytest.mark.parametrize("path", ["clients", "audit", "requests", "usage", "providers", "routes"])
def test_a_deep_or_long_cursor_is_400_not_a_500(admin: Admin, path: str, cursor: str) -> None:
    err = admin.error("GET", path, want=400, code="invalid_query", cursor=cursor)
    assert "cursor" in err["message"]
    assert not [ln for ln in admin.gw.log_lines() if "Traceback" in ln or "RecursionError" in ln]


def test_a_cursor_from_one_group_by_is_refused_by_another(admin: Admin) -> None:
    seed_usage(admin.db_path, {})
    cursor = admin.ok("GET", "usage", group_by="day,route", limit=1)["next_cursor"]
    assert cursor
    admin.error("GET", "usage", group_by="day", cursor=cursor, want=400, code="invalid_query")


# -- query plans -----------------------------------------------------------------------------------------------

PLANS = [  # (filters, status, since, until, after) -> the index the request-log query must walk
    ([], None, None, None, None, "request_log_time"),
    ([], None, BASE, BASE + 9, [BASE + 5, 7], "request_log_time"),
    ([("r.route = ?", "r1"), ("r.provider = ?", "p")], ("r.status BETWEEN ? AND ?", [500, 599]), None, None,
     [BASE, 3], "request_log_time"),
    ([("r.key_id = ?", "ka")], None, None, None, None, "request_log_key_time"),
    ([("r.key_id = ?", "ka"), ("r.route = ?", "r1")], ("r.status = ?", [200]), BASE, None, [BASE + 5, 7],
     "request_log_key_time"),
]


@pytest.mark.parametrize(("filters", "status", "since", "until", "after", "index"), PLANS)
def test_the_request_log_query_walks_an_index_in_order(tmp_path: Path, filters: list[tuple[str, Any]],
                                                      status: Any, since: Any, until: Any, after: Any,
                                                      index: str) -> None:
    conn = db.connect(str(tmp_path / "plan.db"))
    try:
        seed = [(BASE + i, f"r{i}", ("ka", "kb")[i % 2], 200) for i in range(200)]
        with conn:
            conn.executemany("INSERT INTO request_log (time, request_id, key_id, status) VALUES (?, ?, ?, ?)", seed)
        conn.execute("ANALYZE")
        plan = explain(conn, *requests_sql(filters, status, since, until, after, 50))
    finally:
        conn.close()
    assert f"USING INDEX {index}" in plan or f"USING COVERING INDEX {index}" in plan, plan
    assert "TEMP B-TREE" not in plan, plan  # the order is the index's: no sort of the whole log
    assert "SEARCH k USING INDEX sqlite_autoindex_keys_1" in plan or "PRIMARY KEY" in plan, plan


def test_the_usage_query_uses_the_day_or_the_key_index(tmp_path: Path) -> None:
    conn = db.connect(str(tmp_path / "plan.db"))
    try:
        groups = [(f"2026-01-{d:02d}", f"k{k}") for d, k in itertools.product(range(1, 29), range(20))]
        with conn:
            conn.executemany("INSERT INTO usage_daily (day, key_id, route, provider, model) "
                             "VALUES (?, ?, 'r', 'p', 'm')", groups)
        conn.execute("ANALYZE")
        by_day = explain(conn, *usage_sql(["day"], "2026-01-10", None, {}, None, 50))
        by_key = explain(conn, *usage_sql(["route"], "2026-01-10", None, {"key_id": "k3"}, None, 50))
    finally:
        conn.close()
    assert "sqlite_autoindex_usage_daily_1" in by_day and "TEMP B-TREE" not in by_day, by_day
    assert "usage_daily_key_day" in by_key, by_key


# -- the CSV export: written in a thread, not on the event loop -------------------------------------------------

def test_the_csv_export_is_written_off_the_event_loop(admin: Admin, monkeypatch: pytest.MonkeyPatch) -> None:
    """At its cap (200,000 groups) writing the CSV takes seconds: on the event loop every request of this worker
    would wait for it. Each cell is written where the export runs: never in a thread running the loop."""
    import asyncio

    from at_gateway.admin import reports

    where: list[bool] = []
    cell = reports._cell

    def recorded(value: Any) -> Any:
        try:
            asyncio.get_running_loop()
            where.append(True)
        except RuntimeError:
            where.append(False)
        return cell(value)

    monkeypatch.setattr(reports, "_cell", recorded)
    conn = db.connect(str(admin.db_path))
    try:
        with conn:
            conn.executemany("INSERT INTO usage_daily (day, key_id, route, provider, model, requests) "
                             "VALUES (?, 'k', 'r', 'p', ?, 1)", [(today(), f"=m-{i}") for i in range(500)])
    finally:
        conn.close()
    r = admin.http.get("usage", params={"format": "csv", "group_by": "model"})
    assert r.status_code == 200 and r.headers["content-type"] == "text/csv; charset=utf-8"
    lines = r.text.splitlines()
    assert lines[0].startswith("model,requests") and len(lines) == 501 and lines[1].startswith("'=m-")
    assert len(where) >= 500 and not any(where), "cells were written on the event loop"
