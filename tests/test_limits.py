"""Rate limits, quotas and budgets: exact sliding windows (unit, injected clock), calendar periods,
reservations under concurrency, and through the gateway: 429s with OpenAI's headers, streams, budgets,
two workers sharing one limit, on_error."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import httpx
import pytest

from at_gateway.config import Limits, build_config
from at_gateway.http.server import Server
from at_gateway.limits.base import LimitState, duration, render_head, usd
from at_gateway.limits.quota import baseline_from_days, period_bounds, timezone
from at_gateway.limits.shared import SharedLimiter
from at_gateway.limits.window import GRANULES
from at_gateway.service import open_services, server_settings
from at_gateway.store import db
from at_gateway.store.keys import KeyStore
from tests.conftest import GATEWAY_KEY, RunningGateway, base_config, run_gateway
from tests.mock_upstream import MockUpstream, Reply, chat_completion, chunk, stream_of, wait_until
from tests.test_service import gateway_process


class Clock:
    """Monotonic and wall time the test moves by hand."""

    def __init__(self, wall: float = 1_800_000_000.0) -> None:
        self.t = 1000.0
        self.w = wall

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.w

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.w += seconds


def state(clock: Clock, tz: str = "UTC", **kw: Any) -> LimitState:
    return LimitState(tz, clock=clock.now, wall=clock.wall, **kw)


def key(sid: str = "k1", rpm: int | None = None, rph: int | None = None, rpd: int | None = None,
        tpm: int | None = None, tpd: int | None = None, budget: int | None = None,
        period: str | None = None) -> tuple[Any, ...]:
    return (f"key:{sid}", rpm, rph, rpd, tpm, tpd, budget, period)


# -- sliding windows ------------------------------------------------------------------------------
@pytest.mark.parametrize("index,span,limit", [(1, 60.0, 7), (2, 3600.0, 5), (3, 86400.0, 4)])
def test_request_windows_are_exact_sliding_logs(index: int, span: float, limit: int) -> None:
    """Bursty random arrivals over many spans: never more than the limit in any span (closed, of
    length ``span``), and never a refusal while the span before it, widened by one granule (entries
    are coalesced per span / GRANULES, rounded up: a slot frees at most that late), held fewer."""
    clock = Clock()
    st = state(clock)
    limits: list[int | None] = [None, None, None]
    limits[index - 1] = limit
    sub = key("w", *limits)
    rnd = random.Random(index)
    admitted: list[float] = []
    refused: list[float] = []
    for _ in range(3000):
        clock.advance(rnd.choice([0.0, 0.0, rnd.random() * span / limit, rnd.random() * span / 3]))
        verdict = st.admit([sub], 0, 0)
        (admitted if verdict[0] else refused).append(clock.t)
        if verdict[0]:
            st.settle(verdict[0], None, None)
    assert refused and len(admitted) > 5 * limit
    for t in admitted:  # every span ending at an admission (the worst spans) holds at most the limit
        assert sum(1 for u in admitted if t - span <= u <= t) <= limit
    slack = span / GRANULES
    for t in refused:  # and a refusal only when the span before it was full
        assert sum(1 for u in admitted if t - span - slack <= u <= t) >= limit


def test_an_hour_limit_frees_up_per_hour_with_retry_after() -> None:
    clock = Clock()
    st = state(clock)
    sub = key(rph=2)
    assert st.admit([sub], 0, 0)[0]
    clock.advance(600)
    assert st.admit([sub], 0, 0)[0]
    clock.advance(120)  # a minute limit would have freed up by now; an hour limit does not
    refused = st.admit([sub], 0, 0)
    assert refused[0] == 0 and refused[2] == "rate_limit_exceeded"
    assert "requests per hour: 2" in refused[3]
    slack = 3600 / GRANULES  # 60 ms: how late an hour window may free a slot
    assert refused[4] == pytest.approx(3600 - 720, abs=slack)  # the first admission leaves the window then
    assert refused[1][:3] == (2, 0, pytest.approx(3600 - 720, abs=slack))
    clock.advance(3600 - 720 - 1)
    assert st.admit([sub], 0, 0)[0] == 0
    clock.advance(1.001 + slack)
    assert st.admit([sub], 0, 0)[0]


def test_tokens_per_minute_counts_finished_requests_and_reservations() -> None:
    clock = Clock()
    st = state(clock)
    sub = key(tpm=100)
    first = st.admit([sub], 60, 0)[0]
    second = st.admit([sub], 30, 0)[0]  # 60 reserved: 40 left, admitted
    assert first and second
    third = st.admit([sub], 10, 0)  # 90 reserved: 10 left, still above zero
    assert third[0]
    refused = st.admit([sub], 1, 0)  # 100 reserved: nothing left
    assert refused[0] == 0 and "tokens per minute: 100" in refused[3]
    st.settle(first, 20, None)  # actual 20 instead of 60
    st.settle(second, None, None)  # failed: released
    st.settle(third[0], 5, None)
    clock.advance(10)
    got = st.admit([sub], 0, 0)  # 25 in the log: admitted, and it sees them
    assert got[0] and got[1][3:5] == (100, 75)
    st.settle(got[0], 0, None)
    clock.advance(50.5)  # the first settlement was at t=0: gone after 60 s
    assert st.describe(sub)["tokens_per_minute"]["used"] == 0


# -- quotas, budgets, periods -----------------------------------------------------------------------
def test_concurrent_reservations_hold_a_token_quota() -> None:
    clock = Clock()
    st = state(clock)
    sub = key(tpd=1000)
    verdicts = [st.admit([sub], 100, 0) for _ in range(50)]  # 50 in flight, each worst case 100
    tickets = [v[0] for v in verdicts if v[0]]
    assert len(tickets) == 10
    refused = next(v for v in verdicts if not v[0])
    assert refused[2] == "insufficient_quota" and "tokens per day: 1000" in refused[3]
    assert "resets in" in refused[3]
    for t in tickets:
        st.settle(t, 100, None)
    assert st.admit([sub], 1, 0)[0] == 0


def test_a_budget_spends_at_most_one_request_over() -> None:
    clock = Clock()
    st = state(clock)
    sub = key(budget=10_000, period="month")
    spent = 0
    while True:  # one after another: each sees what the last one cost
        v = st.admit([sub], 0, 3_000)
        if not v[0]:
            break
        st.settle(v[0], 10, 3_000)
        spent += 3_000
    assert spent == 12_000  # 3 fit, the 4th was admitted with 1000 left: over by at most the last answer
    assert "budget per month: $0.00001" in v[3] and "spent $0.000012" in v[3]


@pytest.mark.parametrize("period,tz,at,first_day,ends", [
    ("day", "UTC", "2027-03-10T23:59:59+00:00", "2027-03-10", "2027-03-11T00:00:00+00:00"),
    ("day", "Europe/Berlin", "2027-03-10T23:30:00+00:00", "2027-03-11", "2027-03-12T00:00:00+01:00"),
    ("day", "Europe/Berlin", "2027-03-28T00:30:00+01:00", "2027-03-28", "2027-03-29T00:00:00+02:00"),  # 23 h
    ("week", "UTC", "2027-03-14T12:00:00+00:00", "2027-03-08", "2027-03-15T00:00:00+00:00"),  # a Sunday
    ("week", "UTC", "2027-03-15T00:00:00+00:00", "2027-03-15", "2027-03-22T00:00:00+00:00"),  # Monday
    ("month", "UTC", "2027-12-31T23:00:00+00:00", "2027-12-01", "2028-01-01T00:00:00+00:00"),
    ("month", "America/New_York", "2027-03-01T02:00:00+00:00", "2027-02-01", "2027-03-01T00:00:00-05:00"),
])
def test_periods_come_from_the_calendar(period: str, tz: str, at: str, first_day: str, ends: str) -> None:
    got = period_bounds(period, dt.datetime.fromisoformat(at).timestamp(), timezone(tz))
    assert got == (first_day, dt.datetime.fromisoformat(ends).timestamp())


def test_quota_resets_at_the_period_boundary_and_reads_the_store_at_start() -> None:
    midnight = dt.datetime(2027, 3, 11, tzinfo=dt.timezone.utc).timestamp()
    clock = Clock(wall=midnight - 10)
    baseline = baseline_from_days({"key:k1": {"2027-03-10": (900, 0), "2027-03-09": (5000, 0)}})
    st = state(clock, baseline=baseline)
    sub = key(tpd=1000)
    assert st.describe(sub)["tokens_per_day"]["used"] == 900  # today's, from the store; yesterday's not
    t = st.admit([sub], 200, 0)[0]
    assert t and st.admit([sub], 1, 0)[0] == 0
    st.settle(t, 200, None)
    clock.advance(10)  # midnight: a new day, whatever ran before
    d = st.describe(sub)["tokens_per_day"]
    assert (d["used"], d["period_start"], d["resets_in"]) == (0, "2027-03-11", 86400)
    assert st.admit([sub], 1, 0)[0]


def test_a_request_over_midnight_counts_in_the_new_day() -> None:
    clock = Clock(wall=dt.datetime(2027, 3, 11, tzinfo=dt.timezone.utc).timestamp() - 1)
    st = state(clock)
    sub = key(tpd=1000)
    t = st.admit([sub], 500, 0)[0]
    clock.advance(2)
    st.settle(t, 300, None)
    d = st.describe(sub)["tokens_per_day"]
    assert (d["used"], d["reserved"], d["period_start"]) == (300, 0, "2027-03-11")


def test_route_and_key_limits_apply_together_and_a_refusal_takes_nothing() -> None:
    clock = Clock()
    st = state(clock)
    k = key(rpm=5)
    r = ("route:demo", 2, None, None, None, None, None, None)
    assert st.admit([k, r], 0, 0)[0] and st.admit([k, r], 0, 0)[0]
    refused = st.admit([k, r], 0, 0)
    assert refused[0] == 0 and "route 'demo': requests per minute: 2" in refused[3]
    assert st.describe(k)["requests_per_minute"]["used"] == 2  # the refused one is not counted for the key


@pytest.mark.parametrize("seconds,text", [(0.0, "0ms"), (0.0201, "21ms"), (0.9996, "1s"), (1, "1s"), (59.2, "1m0s"),
                                          (360, "6m0s"), (3723, "1h2m3s"), (86400, "24h0m0s")])
def test_reset_durations_in_openai_form(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_headers_and_money_formatting() -> None:
    assert render_head((60, 59, 1.0, None, None, None)) == [
        (b"x-ratelimit-limit-requests", b"60"), (b"x-ratelimit-remaining-requests", b"59"),
        (b"x-ratelimit-reset-requests", b"1s")]
    assert [usd(n) for n in (0, 10 ** 9, 1_500_000_000, 1)] == ["$0.00", "$1.00", "$1.50", "$0.000000001"]


# -- through the gateway ---------------------------------------------------------------------------
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hello limits"}]}


def serving(raw: dict[str, Any]) -> Any:
    """An in-process gateway with this process's services (store, keys, limiter), as ``serve`` builds them."""
    return run_gateway(raw, services=open_services)


def new_key(path: Path, **kw: Any) -> str:
    conn = db.connect(str(path))
    try:
        return KeyStore(conn).create("app", **kw)[1]
    finally:
        conn.close()


def ratelimit_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith("x-ratelimit-") or k == "retry-after"}


def test_route_limit_429_with_headers_and_retry_after(upstream: MockUpstream) -> None:
    routes = [{"name": "demo", "limits": {"rpm": 3}, "steps": [{"provider": "echo", "model": "echo-1"}]}]
    with serving(base_config(upstream.url, routes)) as gw:
        with httpx.Client(base_url=gw.url, headers={"x-api-key": GATEWAY_KEY}) as c:
            seen = [c.post("/v1/chat/completions", json=CHAT) for _ in range(4)]
    assert [r.status_code for r in seen] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in seen] == ["2", "1", "0", "0"]
    assert all(r.headers["x-ratelimit-limit-requests"] == "3" for r in seen)
    last = seen[-1]
    err = last.json()["error"]
    assert (err["code"], err["type"]) == ("rate_limit_exceeded", "rate_limit_error")
    assert "requests per minute: 3" in err["message"]
    assert 59 <= int(last.headers["retry-after"]) <= 60
    assert last.headers["x-ratelimit-reset-requests"] in ("59s", "1m0s")


def test_a_limited_key_gets_the_headers_on_a_stream_head(upstream: MockUpstream, tmp_path: Path) -> None:
    upstream.replies["m"] = Reply(sse=stream_of("a", "b"))
    path = tmp_path / "gw.db"
    k = new_key(path, limits=Limits(rpm=10, tpm=10_000))
    routes = [{"name": "s", "steps": [{"provider": "up1", "model": "m"}]}]
    with serving(base_config(upstream.url, routes, store={"path": str(path)})) as gw:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
            body = json.dumps({"model": "s", "stream": True, "max_tokens": 50,
                               "messages": [{"role": "user", "content": "hi"}]}).encode()
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + k.encode()
                      + b"\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                      % len(body) + body)
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    lines = head.decode().lower().split("\r\n")
    for name in ("x-ratelimit-limit-requests: 10", "x-ratelimit-remaining-requests: 9",
                 "x-ratelimit-limit-tokens: 10000"):
        assert name in lines
    assert any(ln.startswith("x-ratelimit-reset-tokens: ") for ln in lines)
    assert b"data:" in rest and b"x-ratelimit" not in rest


def test_fifty_concurrent_requests_spend_at_most_eleven_requests_worth(upstream: MockUpstream,
                                                                       tmp_path: Path) -> None:
    """Every answer uses its whole max_tokens; a budget that fits 10 of them."""
    upstream.replies["priced"] = Reply(body=chat_completion(usage={"prompt_tokens": 10, "completion_tokens": 1000,
                                                                   "total_tokens": 1010}), delay=0.0)
    path = tmp_path / "gw.db"
    # $1 per million output tokens: 1000 tokens = $0.001 = 1_000_000 nano; input $1 too: 10 tokens = 10_000
    per_request = 1_010_000
    k = new_key(path, budget_nanousd=10 * per_request, budget_period="day")
    routes = [{"name": "p", "steps": [{"provider": "up1", "model": "priced",
                                        "price": {"input": 1, "output": 1}}]}]
    cfg = base_config(upstream.url, routes, store={"path": str(path)})
    req = {"model": "p", "max_tokens": 1000, "messages": [{"role": "user", "content": "x"}]}
    with serving(cfg) as gw:
        with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {k}"}, timeout=20) as c:
            with ThreadPoolExecutor(50) as pool:
                seen = list(pool.map(lambda _: c.post("/v1/chat/completions", json=req), range(50)))
            ok = [r for r in seen if r.status_code == 200]
            refused = [r for r in seen if r.status_code == 429]
            assert len(ok) + len(refused) == 50
            assert 10 <= len(ok) <= 11
            err = refused[0].json()["error"]
            assert err["code"] == "insufficient_quota" and "budget per day" in err["message"]
            info = c.get("/v1/key").json()
    spent = int(float(info["usage"]["budget"]["spent_usd"]) * 10 ** 9)
    assert spent == len(ok) * per_request <= 11 * per_request
    assert info["id"] in k and info["limits"]["budget_period"] == "day"


def test_v1_key_answers_the_keys_own_limits_and_usage(upstream: MockUpstream, tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    k = new_key(path, limits=Limits(rpm=5, tpd=1000))
    with serving(base_config(upstream.url, store={"path": str(path)}, limits={"rph": 100})) as gw:
        with httpx.Client(base_url=gw.url, headers={"x-api-key": k}) as c:
            assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
            info = c.get("/v1/key").json()
            operator = c.get("/v1/key", headers={"x-api-key": GATEWAY_KEY}).json()
            nobody = c.get("/v1/key", headers={"x-api-key": "atg_nope_nope"})
    assert info["limits"] == {"rpm": 5, "rph": 100, "tpd": 1000}  # its own, and the config's default
    assert info["usage"]["requests_per_minute"]["remaining"] == 4
    assert info["usage"]["requests_per_hour"]["used"] == 1
    assert info["usage"]["tokens_per_day"]["used"] > 0
    assert k.split("_", 2)[2] not in json.dumps(info)  # never the secret (atg_<id>_<secret>; the secret may hold "_")
    assert operator["operator"] is True and operator["limits"] == {}
    assert nobody.status_code == 401


def test_usage_survives_a_restart_for_quotas(upstream: MockUpstream, tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    k = new_key(path, limits=Limits(tpd=12))
    cfg = base_config(upstream.url, store={"path": str(path)})
    big = {"model": "demo", "messages": [{"role": "user", "content": "one two three four five"}]}  # 10 tokens
    with serving(cfg) as gw:
        assert httpx.post(gw.url + "/v1/chat/completions", json=big, headers={"x-api-key": k}).status_code == 200
    with serving(cfg) as gw:  # a new process's limiter reads what the store kept
        with httpx.Client(base_url=gw.url, headers={"x-api-key": k}) as c:
            assert c.get("/v1/key").json()["usage"]["tokens_per_day"]["used"] == 10
            assert c.post("/v1/chat/completions", json=big).status_code == 200  # 2 left: admitted
            r = c.post("/v1/chat/completions", json=big)
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"


@pytest.mark.parametrize("on_error,status", [("open", 200), ("closed", 503)])
def test_an_unreachable_shared_limiter_follows_on_error(upstream: MockUpstream, tmp_path: Path,
                                                         on_error: str, status: int) -> None:
    routes = [{"name": "demo", "limits": {"rpm": 1}, "steps": [{"provider": "echo", "model": "echo-1"}]}]
    config = build_config(base_config(upstream.url, routes, limits={"on_error": on_error}), "t")
    hub_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    hub_end.close()  # the supervisor is gone

    async def main() -> list[int]:
        from at_gateway.app import Gateway
        from at_gateway.services import Services

        gw = Gateway(config, services=Services(limiter=SharedLimiter(config, worker_end)))
        server = Server(gw.handle, server_settings(config))
        async with anyio.create_task_group() as tg:
            port = await tg.start(server.serve)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                         headers={"x-api-key": GATEWAY_KEY}) as c:
                got = [(await c.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(3)]
            server.shutdown()
        await gw.aclose()
        await gw.services.aclose()
        return got

    assert anyio.run(main) == [status] * 3  # open: no silent per-process limit of 1 either


def test_two_workers_share_one_limit(upstream: MockUpstream, tmp_path: Path) -> None:
    """A burst of three times the limit over two workers (new connections, spread by the kernel)."""
    routes = [{"name": "demo", "limits": {"rpm": 10}, "steps": [{"provider": "echo", "model": "echo-1"}]}]
    cfg = base_config(upstream.url, routes, workers=2, store={"path": str(tmp_path / "gw.db")})
    with gateway_process(cfg, tmp_path) as (proc, url, _, logfile):
        assert wait_until(lambda: logfile.read_text().count("listening on") == 2, 15), logfile.read_text()

        def one(_: int) -> tuple[int, str]:
            r = httpx.post(url + "/v1/chat/completions", json=CHAT, headers={"x-api-key": GATEWAY_KEY},
                           timeout=10)
            return r.status_code, r.headers.get("x-ratelimit-remaining-requests", "")

        with ThreadPoolExecutor(10) as pool:
            seen = list(pool.map(one, range(30)))
        statuses = [s for s, _ in seen]
        assert statuses.count(200) == 10 and statuses.count(429) == 20
        assert sorted(int(rem) for s, rem in seen if s == 200) == list(range(10))  # one count, not two
        proc.terminate()
        assert proc.wait(15) == 0
        assert "Traceback" not in logfile.read_text()


def test_a_dead_workers_reservations_are_released() -> None:
    from at_gateway.limits.shared import Hub

    config = build_config(base_config("http://127.0.0.1:9"), "t")
    hub = Hub(LimitState())
    hub_end, worker_end = hub.open()
    hub.attach(4242, hub_end)
    sub = key(tpd=100)

    async def main() -> Any:
        lim = SharedLimiter(config, worker_end)
        loop = __import__("asyncio").get_running_loop()
        loop.call_soon(hub.serve, 4242)  # the supervisor answers once the worker waits
        verdict = await lim.decide([sub], 80, 0)
        await lim.aclose()
        return verdict

    verdict = anyio.run(main)
    assert verdict[0] and hub.state.describe(sub)["tokens_per_day"]["reserved"] == 80
    hub.detach(4242)  # the worker died with that request in flight
    assert hub.state.describe(sub)["tokens_per_day"]["reserved"] == 0
    assert hub.state.admit([sub], 80, 0)[0]


# -- review fixes ----------------------------------------------------------------------------------
def _raw_chat(port: int, key_: str, body: dict[str, Any]) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key_.encode()
              + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    return s


def _tpd(gw: RunningGateway, key_: str) -> dict[str, Any]:
    got: dict[str, Any] = httpx.get(gw.url + "/v1/key", headers={"x-api-key": key_}).json()["usage"]["tokens_per_day"]
    return got


@pytest.mark.parametrize("case", ["stream, usage not seen", "stream, usage seen", "not streaming", "steps failed"])
def test_a_client_that_leaves_is_charged_what_the_upstream_generated(upstream: MockUpstream, tmp_path: Path,
                                                                    case: str) -> None:
    """A request sent upstream that loses its client is charged its usage when the upstream reported it,
    else its worst case; one whose steps all failed upstream releases its reservation."""
    from at_gateway.limits.base import estimate_prompt_tokens

    hold = __import__("threading").Event()
    words = [f"w{i}" for i in range(6)]
    events = stream_of(*words)
    if case == "stream, usage not seen":  # the client leaves after 3 chunks, before the usage chunk
        upstream.replies["m"] = Reply(sse=events, hold=hold, hold_after=4)
    elif case == "stream, usage seen":  # the usage chunk came, then the upstream stalls, then the client leaves
        upstream.replies["m"] = Reply(sse=[*events, chunk("late")], hold=hold, hold_after=len(events))
    elif case == "not streaming":
        upstream.replies["m"] = Reply(body=chat_completion(), delay=10)
    else:
        upstream.replies["m"] = Reply(status=500, body={"error": {"message": "boom"}})
    path = tmp_path / "gw.db"
    k = new_key(path, limits=Limits(tpd=10_000))
    routes = [{"name": "s", "steps": [{"provider": "up1", "model": "m"}]}]
    body: dict[str, Any] = {"model": "s", "max_tokens": 300, "messages": [{"role": "user", "content": "hi there"}],
                            "stream": case.startswith("stream"), "stream_options": {"include_usage": True}}
    worst = estimate_prompt_tokens(body) + 300
    expected = {"stream, usage not seen": worst, "stream, usage seen": 2 + len(words), "not streaming": worst,
                "steps failed": 0}[case]
    try:
        with serving(base_config(upstream.url, routes, store={"path": str(path)})) as gw:
            s = _raw_chat(gw.port, k, body)
            if case == "stream, usage not seen":
                raw = b""
                while raw.count(b"data:") < 3:
                    raw += s.recv(65536)
            elif case == "stream, usage seen":
                raw = b""
                while b'"usage"' not in raw:
                    raw += s.recv(65536)
            elif case == "not streaming":
                assert wait_until(lambda: len(upstream.received) == 1)
            else:
                assert s.recv(65536).startswith(b"HTTP/1.1 502")
            s.close()
            assert wait_until(lambda: _tpd(gw, k)["reserved"] == 0)
            assert _tpd(gw, k)["used"] == expected
    finally:
        hold.set()


def test_a_verdict_that_arrives_as_its_request_is_cancelled_is_released() -> None:
    """The verdict resolves the future and the task is cancelled in the same loop turn: the ticket
    the supervisor issued must still be settled (released)."""
    import asyncio

    from at_gateway.limits.shared import Hub

    config = build_config(base_config("http://127.0.0.1:9"), "t")
    hub = Hub(LimitState())
    hub_end, worker_end = hub.open()
    hub.attach(1, hub_end)
    sub = key(tpd=100)

    async def main() -> None:
        lim = SharedLimiter(config, worker_end)
        task = asyncio.ensure_future(lim.decide([sub], 80, 0))
        await asyncio.sleep(0)  # the admission datagram is sent, the task waits
        hub.serve(1)  # admitted, 80 reserved
        lim._readable()  # the reader callback resolves the future...
        task.cancel()  # ...and the client leaves in the same turn
        with pytest.raises(asyncio.CancelledError):
            await task
        hub.serve(1)  # whatever the worker sent since
        await lim.aclose()

    anyio.run(main)
    assert hub.state.describe(sub)["tokens_per_day"]["reserved"] == 0
    assert hub.ends[1][1] == set()


def test_a_quota_that_appears_later_reads_the_store_again() -> None:
    """A quota first needed after start (or again, after a spell without it) starts from what the store
    says the key used in the period, not from a snapshot taken at start."""
    clock = Clock()
    store = {"key:k1": 0}
    reads: list[str] = []

    def baseline(subject: str, first_day: str) -> tuple[int, int]:
        reads.append(subject)
        return store.get(subject, 0), 0

    st = state(clock, baseline=baseline)
    with_tpd, without = key(rpm=1000, tpd=1000), key(rpm=1000)
    st.settle(st.admit([with_tpd], 10, 0)[0], 100, None)
    store["key:k1"] += 100  # what the recorder writes
    for _ in range(5):  # the tpd is removed for a while: these are counted by the store only
        st.settle(st.admit([without], 10, 0)[0], 50, None)
        store["key:k1"] += 50
    assert st.describe(with_tpd)["tokens_per_day"]["used"] == 350
    assert reads == ["key:k1", "key:k1"]


def test_a_quota_added_to_a_running_gateway_counts_the_day_so_far(upstream: MockUpstream, tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    k = new_key(path)  # no limits: its requests never reach the limiter
    key_id = k.split("_")[1]
    big = {"model": "demo", "messages": [{"role": "user", "content": "one two three four five"}]}  # 10 tokens
    with serving(base_config(upstream.url, store={"path": str(path)})) as gw:
        with httpx.Client(base_url=gw.url, headers={"x-api-key": k}) as c:
            for _ in range(3):
                assert c.post("/v1/chat/completions", json=big).status_code == 200
            gw.portal.call(gw.gateway.services.store.flush)
            conn = db.connect(str(path))
            try:
                KeyStore(conn).update(key_id, limits={"tpd": 35})
            finally:
                conn.close()
            assert wait_until(lambda: c.get("/v1/key").json()["limits"].get("tpd") == 35)
            assert c.get("/v1/key").json()["usage"]["tokens_per_day"]["used"] == 30
            assert c.post("/v1/chat/completions", json=big).status_code == 200  # 5 left
            assert c.post("/v1/chat/completions", json=big).status_code == 429


def test_the_supervisor_reads_a_new_quota_from_the_store(tmp_path: Path) -> None:
    from at_gateway.limits import new_state

    path = tmp_path / "gw.db"
    cfg = build_config(base_config("http://127.0.0.1:9", store={"path": str(path)}), "t")
    st = new_state(cfg)  # what the supervisor holds for workers: N
    day = dt.datetime.now(dt.timezone.utc).date().isoformat()
    conn = db.connect(str(path))
    try:
        conn.execute("INSERT INTO usage_daily (day, key_id, route, provider, model, prompt_tokens, completion_tokens,"
                     " cost_nanousd) VALUES (?, 'k1', 'demo', 'echo', 'echo-1', 40, 2, 7)", (day,))
    finally:
        conn.close()
    d = st.describe(key(tpd=100, budget=1000, period="day"))
    assert d["tokens_per_day"]["used"] == 42 and d["budget"]["spent_usd"] == "0.000000007"


def test_a_refusal_is_cheap_with_a_long_tpm_log_and_reservations_over_the_limit() -> None:
    import time

    clock = Clock()
    st = state(clock)
    sub = key(tpm=1_000_000)
    for _ in range(200_000):  # 10k requests/s for 20 s
        st.settle(st.admit([sub], 1, 0)[0], 2, None)
        clock.advance(0.0001)
    assert st.admit([sub], 2_000_000, 0)[0]  # in flight: its reservation is over the limit by itself
    spent = []
    for _ in range(20):
        t0 = time.perf_counter()
        v = st.admit([sub], 1, 0)
        spent.append(time.perf_counter() - t0)
        assert v[0] == 0 and v[2] == "rate_limit_exceeded"
    assert sorted(spent)[10] < 0.002, spent


def test_the_tpm_retry_after_is_when_enough_tokens_leave() -> None:
    """Retry-After for tokens per minute: when enough logged tokens leave the window for the used
    amount (log + reservations) to drop below the limit; a guess of 1 s when the log cannot."""
    clock = Clock()
    st = state(clock)
    sub = key(tpm=100)
    for tokens in (40, 40):  # at t = 0 and 10
        st.settle(st.admit([sub], 0, 0)[0], tokens, None)
        clock.advance(10)
    assert st.admit([sub], 61, 0)[0]  # t = 20: 80 logged, admitted, 141 used or reserved
    clock.advance(10)
    v = st.admit([sub], 1, 0)  # 42 must leave: both entries, the second at t = 10 + 60
    assert v[0] == 0 and v[4] == pytest.approx(40.0) and v[1][5] == pytest.approx(40.0)
    assert st.admit([sub], 100, 0)[0] == 0
    big = st.admit([key("k2", tpm=100)], 500, 0)[0]  # a reservation over the limit by itself
    assert big
    v = st.admit([key("k2", tpm=100)], 1, 0)
    assert v[0] == 0 and v[4] == 1.0


def test_windows_coalesce_a_burst_into_one_entry_per_granule() -> None:
    """Memory: a burst inside one millisecond is one entry in each log, however many requests."""
    import tracemalloc

    clock = Clock()
    st = state(clock)
    sub = key(rpm=10 ** 9, rph=10 ** 9, rpd=10 ** 9, tpm=10 ** 12)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            st.settle(st.admit([sub], 1, 0)[0], 3, None)
            if i % 50 == 49:
                clock.advance(0.001)  # 50 requests per millisecond: 400 ms
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 150_000, grown  # an object per request and window would be ~2.5 MB
    d = st.describe(sub)
    assert d["requests_per_minute"]["used"] == 20_000 and d["tokens_per_minute"]["used"] == 60_000


def _fds(pid: int | str = "self") -> list[str]:
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out.append(str(fd.readlink()))
        except OSError:
            pass
    return out


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to see the workers")
@pytest.mark.parametrize("hub", [True, False])
def test_workers_get_their_own_process_group_and_none_of_the_supervisors_descriptors(
        upstream: MockUpstream, tmp_path: Path, hub: bool) -> None:
    """A terminal's Ctrl-C reaches the supervisor only (it drains the workers once); a worker holds no
    epoll of the supervisor's loop (hub mode: the limiter hub's selector)."""
    store = {"path": str(tmp_path / "gw.db")} if hub else {"path": ":memory:"}
    cfg = base_config(upstream.url, workers=2, store=store)
    with gateway_process(cfg, tmp_path) as (proc, url, _, logfile):
        assert wait_until(lambda: logfile.read_text().count("listening on") == 2, 15), logfile.read_text()
        workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert len(workers) == 2
        for pid in workers:
            assert os.getpgid(pid) == pid != os.getpgid(proc.pid)
            # its own event loop's epoll only
            assert sum(1 for f in _fds(pid) if "eventpoll" in f) == 1, _fds(pid)
        proc.terminate()
        assert proc.wait(15) == 0


def test_a_failed_fork_leaves_no_socket_pair_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    from at_gateway.limits.shared import Hub
    from at_gateway.workers import Supervisor

    config = build_config(base_config("http://127.0.0.1:9"), "t")
    sup = Supervisor(config, lambda *a, **k: 0, hub=Hub(LimitState()))
    before = len(_fds())

    def no_fork() -> int:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    with pytest.raises(OSError) as failed:
        sup._spawn()
    # The traceback (kept alive here, as a logged error would) must hold no open socket either.
    assert len(_fds()) == before and sup.hub is not None and sup.hub.ends == {}, failed


def test_answers_before_admission_carry_the_keys_headers(upstream: MockUpstream, tmp_path: Path) -> None:
    """Every answer to a limited key has the x-ratelimit-* headers, also those given before admission
    (a peek: nothing is counted); an operator key's answers have none."""
    path = tmp_path / "gw.db"
    k = new_key(path, limits=Limits(rpm=10, tpm=10_000), routes=("demo",))
    routes = [{"name": "demo", "steps": [{"provider": "echo", "model": "echo-1"}]},
              {"name": "other", "steps": [{"provider": "echo", "model": "echo-1"}]}]
    msgs = [{"role": "user", "content": "x"}]
    with serving(base_config(upstream.url, routes, store={"path": str(path)})) as gw:
        with httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {k}"}) as c:
            assert c.post("/v1/chat/completions", json={"model": "demo", "messages": msgs}).status_code == 200
            seen = [c.post("/v1/chat/completions", json={"model": "demo"}),
                    c.post("/v1/chat/completions", content=b"{nope"),
                    c.post("/v1/chat/completions", json={"model": "nope", "messages": msgs}),
                    c.post("/v1/chat/completions", json={"model": "other", "messages": msgs}),
                    c.get("/v1/models"), c.get("/v1/models/demo"), c.get("/v1/key")]
            operator = c.get("/v1/models", headers={"authorization": f"Bearer {GATEWAY_KEY}"})
            after = c.post("/v1/chat/completions", json={"model": "demo", "messages": msgs})
    assert [r.status_code for r in seen] == [400, 400, 404, 403, 200, 200, 200]
    for r in seen:
        h = ratelimit_headers(r)
        assert (h.get("x-ratelimit-limit-requests"), h.get("x-ratelimit-remaining-requests")) == ("10", "9"), r
        assert h.get("x-ratelimit-limit-tokens") == "10000" and "x-ratelimit-reset-tokens" in h
    assert ratelimit_headers(operator) == {}
    assert after.headers["x-ratelimit-remaining-requests"] == "8"  # the peeks took nothing


def test_a_peek_through_the_supervisor() -> None:
    from at_gateway.limits.shared import Hub

    config = build_config(base_config("http://127.0.0.1:9"), "t")
    hub = Hub(LimitState())
    hub_end, worker_end = hub.open()
    hub.attach(7, hub_end)
    sub = key(rpm=5)

    async def main() -> Any:
        lim = SharedLimiter(config, worker_end)
        loop = __import__("asyncio").get_running_loop()
        loop.call_soon(hub.serve, 7)
        head = await lim.peek_subject(sub)
        await lim.aclose()
        return head

    assert render_head(anyio.run(main))[:2] == [(b"x-ratelimit-limit-requests", b"5"),
                                               (b"x-ratelimit-remaining-requests", b"5")]


def test_tokens_count_prompt_plus_completion_as_the_store_does(upstream: MockUpstream, tmp_path: Path) -> None:
    upstream.replies["m"] = Reply(body=chat_completion(usage={"prompt_tokens": 3, "completion_tokens": 4,
                                                              "total_tokens": 100}))
    path = tmp_path / "gw.db"
    k = new_key(path, limits=Limits(tpd=1000))
    routes = [{"name": "s", "steps": [{"provider": "up1", "model": "m"}]}]
    with serving(base_config(upstream.url, routes, store={"path": str(path)})) as gw:
        assert httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": k},
                          json={"model": "s", "messages": [{"role": "user", "content": "x"}]}).status_code == 200
        assert _tpd(gw, k)["used"] == 7


def test_a_budget_on_a_route_with_an_unpriced_step_is_named_once(upstream: MockUpstream, tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    k = new_key(path, budget_nanousd=10 ** 9, budget_period="day")
    routes = [{"name": "mystery", "steps": [{"provider": "up1", "model": "no-such-model-priced"}]}]
    with serving(base_config(upstream.url, routes, store={"path": str(path)})) as gw:
        for _ in range(2):
            assert httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": k},
                              json={"model": "mystery", "messages": [{"role": "user", "content": "x"}]}
                              ).status_code == 200
        warned = [ln for ln in gw.log_lines() if "unpriced" in ln and "mystery" in ln]
    assert len(warned) == 1, gw.log_lines()


def test_route_limits_without_a_limiter_are_named_not_silently_ignored(upstream: MockUpstream) -> None:
    """What a reload adding routes[].limits to a gateway started without a limiter gives: a warning."""
    from tests.conftest import run_gateway

    routes = [{"name": "demo", "limits": {"rpm": 1}, "steps": [{"provider": "echo", "model": "echo-1"}]}]
    with run_gateway(base_config(upstream.url, routes)) as gw:  # services without a limiter, as after a reload
        for _ in range(2):
            assert httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                              json=CHAT).status_code == 200
        warned = [ln for ln in gw.log_lines() if "not enforced" in ln]
    assert len(warned) == 1 and "demo" in warned[0], gw.log_lines()


def test_a_store_baseline_sums_a_key_alone_and_a_route_over_every_caller(tmp_path: Path) -> None:
    """A key's quota counts that key's days; a route cap (routes[].limits) counts every caller of the route."""
    from at_gateway.limits import StoreBaseline

    path = tmp_path / "gw.db"
    day = dt.datetime.now(dt.timezone.utc).date().isoformat()
    conn = db.connect(str(path))
    try:
        for key_id, route, tokens in (("k1", "demo", 40), ("k2", "demo", 5), ("k1", "other", 100)):
            conn.execute("INSERT INTO usage_daily (day, key_id, route, provider, model, prompt_tokens, "
                         "completion_tokens, cost_nanousd) VALUES (?, ?, ?, 'echo', 'e', ?, 1, 3)",
                         (day, key_id, route, tokens))
    finally:
        conn.close()
    read = StoreBaseline(str(path), inline=True).read
    assert read("key:k1", day) == (142, 6)
    assert read("route:demo", day) == (47, 6)
    assert read("route:demo", "9999-12-31") == (0, 0)


@pytest.mark.parametrize("body, at_least", [
    ({"model": "m", "input": "x" * 400}, 100),  # embeddings
    ({"model": "m", "input": ["x" * 200, "y" * 200]}, 100),
    ({"model": "m", "input": [[1] * 100]}, 100),  # token ids: about one token each
    ({"model": "m", "prompt": "z" * 800}, 200),  # legacy completions
    ({"model": "m", "prompt": [5] * 50}, 50),
])
def test_embeddings_and_completions_bodies_are_estimated_from_their_text(body: dict[str, Any], at_least: int) -> None:
    from at_gateway.limits.base import estimate_prompt_tokens

    assert estimate_prompt_tokens(body) >= at_least
