"""Issue 11 through real sockets: retries, several keys, circuit breakers, hedged steps, ``models`` lists,
``allow_direct`` and ``max_concurrency``, each asserted by what the client got (status, body, headers), the
request log's line, and what the mock upstream received (which key, when).

Cooldowns and circuits run on a fake clock (``Services(clock=...)``): moving it is how time passes for them,
never a sleep. Deadlines and backoff sleeps are real time, kept tiny (``retry_backoff: 0.01s``); the few
tests about waiting itself (Retry-After, ``wait_for_key``, ``queue_timeout``) measure the mock's arrival times
with generous bounds. The fault matrix (every failure × stream × keys) is tests/test_resilience_matrix.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from at_gateway.services import Services
from tests.conftest import GATEWAY_KEY, RunningGateway, base_config, run_gateway, run_live
from tests.mock_upstream import MockUpstream, Received, Reply, chat_completion, stream_of, wait_until

CHAT = "/v1/chat/completions"
KEYS = [f"sk-resilience-key-{i}-{'q' * 20}" for i in range(3)]
ADMIN_TOKEN = "adm-" + "r" * 32
FAST = "0.01s"  # retry_backoff in tests: a retry follows at once, the jitter stays measurable


def err(status: int, message: str = "upstream says no") -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error"}}


# -- harness -------------------------------------------------------------------------------------------------

class FakeClock:
    """What keys and circuits are told the time is; a test moves it with :meth:`advance`."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def clocked(clock: FakeClock) -> Callable[[Any], Any]:
    async def factory(config: Any) -> Services:
        return Services(clock=clock)
    return factory


class Script:
    """A mock reply that plays ``replies`` in order (then ``then`` forever) and records when each request came."""

    def __init__(self, *replies: Reply, then: Reply | None = None) -> None:
        self.replies = list(replies)
        self.then = then or Reply(body=chat_completion("scripted ok"))
        self.times: list[float] = []

    def __call__(self, rec: Received) -> Reply:
        self.times.append(time.monotonic())
        return self.replies.pop(0) if self.replies else self.then

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


class PerKey:
    """A mock reply chosen by the provider key the request carries (index in :data:`KEYS`)."""

    def __init__(self, default: Reply | None = None, **by_index: Reply | Callable[[Received], Reply]) -> None:
        self.by: dict[int, Any] = {int(k[1:]): v for k, v in by_index.items()}  # k0=..., k1=...
        self.default = default or Reply(body=chat_completion("ok"))

    def __call__(self, rec: Received) -> Reply:
        found = self.by.get(key_of(rec), self.default)
        return found(rec) if callable(found) else found


def key_of(rec: Received) -> int:
    return KEYS.index(rec.headers["authorization"].removeprefix("Bearer "))


def seen(upstream: MockUpstream, model: str) -> list[int]:
    """Which key each request for ``model`` carried, in arrival order."""
    return [key_of(r) for r in list(upstream.received) if r.body and r.json.get("model") == model]


def hits(upstream: MockUpstream, model: str) -> int:
    return sum(1 for r in list(upstream.received) if r.body and r.json.get("model") == model)


def keyed(name: str, url: str, n: int = 3, weights: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    """An openai provider with ``n`` keys from :data:`KEYS` (weighted when ``weights``)."""
    keys: list[Any] = ([{"key": KEYS[i], "weight": w} for i, w in enumerate(weights)] if weights
                       else KEYS[:n])
    return {"name": name, "type": "openai", "base_url": url, "api_keys": keys, **extra}


def config(upstream: MockUpstream, providers: list[dict[str, Any]], routes: list[dict[str, Any]],
           **top: Any) -> dict[str, Any]:
    """``providers`` plus ``up2`` (one key, the fallback steps' provider) and ``routes``."""
    raw = base_config(upstream.url, routes, **top)
    raw["providers"] = [*providers, raw["providers"][1]]
    return raw


def route(*steps: dict[str, Any], name: str = "r") -> list[dict[str, Any]]:
    return [{"name": name, "steps": list(steps)}]


FALLBACK = {"provider": "up2", "model": "fallback"}


def chat(gw: RunningGateway, model: str | None = "r", *, stream: bool = False, key: str = GATEWAY_KEY,
         **extra: Any) -> httpx.Response:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], **extra}
    if model is not None:
        body["model"] = model
    if stream:
        body["stream"] = True
    return httpx.post(gw.url + CHAT, json=body, headers={"authorization": f"Bearer {key}"}, timeout=30)


def content(resp: httpx.Response) -> str:
    return str(resp.json()["choices"][0]["message"]["content"])


def last_log(gw: RunningGateway, count: int) -> dict[str, Any]:
    """The ``count``-th request line (the gateway has answered that many requests)."""
    return gw.request_logs(count)[count - 1]


@pytest.fixture(autouse=True)
def _fallback(upstream: MockUpstream) -> None:
    upstream.replies["fallback"] = Reply(body=chat_completion("from fallback"))


# -- retries inside a step ----------------------------------------------------------------------------------

def test_every_retry_is_an_attempt_in_the_header_and_the_log(upstream: MockUpstream) -> None:
    upstream.replies["m"] = Script(Reply(500, err(500)), Reply(503, err(503)), then=Reply(body=chat_completion("3rd")))
    raw = config(upstream, [keyed("p", upstream.url, 1)],
                 route({"provider": "p", "model": "m", "retries": 2, "retry_backoff": FAST}))
    with run_gateway(raw) as gw:
        r = chat(gw)
        assert r.status_code == 200 and content(r) == "3rd"
        assert r.headers["x-gateway-attempts"] == "3"
        line = last_log(gw, 1)
        assert line["attempts"] == 3 and line["status"] == 200
        assert [a["status"] for a in line["failed_attempts"]] == [500, 503]
    assert hits(upstream, "m") == 3


def test_retries_that_all_fail_are_each_in_the_502_body(upstream: MockUpstream) -> None:
    upstream.replies["m"] = Reply(500, err(500, "boom"))
    raw = config(upstream, [keyed("p", upstream.url, 1, cooldown={"failures": 10})],
                 route({"provider": "p", "model": "m", "retries": 3, "retry_backoff": FAST}))
    with run_gateway(raw) as gw:
        r = chat(gw)
        assert r.status_code == 502
        assert r.headers["x-gateway-attempts"] == "4"
        error = r.json()["error"]
        assert error["message"].startswith("all 1 step(s) of route 'r' failed after 4 attempts; last error: ")
        attempts = error["attempts"]
        assert [a["status"] for a in attempts] == [500] * 4 and all("boom" in a["error"] for a in attempts)
        line = last_log(gw, 1)
        assert line["status"] == 502 and line["attempts"] == 4 and len(line["failed_attempts"]) == 4
    assert hits(upstream, "m") == 4


@pytest.mark.parametrize("where", ["step", "provider"])
def test_backoff_is_capped_by_retry_backoff_max(upstream: MockUpstream, where: str) -> None:
    """A 5 s base doubling each time, capped at 0.1 s: every wait is at most the cap (full jitter: 0..cap)."""
    script = upstream.replies["m"] = Script(then=Reply(500, err(500)))
    knobs: dict[str, Any] = {"retries": 4, "retry_backoff": "5s", "retry_backoff_max": "0.1s"}
    step = {"provider": "p", "model": "m", "timeout": "20s", **(knobs if where == "step" else {})}
    prov = keyed("p", upstream.url, 1, cooldown={"failures": 10}, **(knobs if where == "provider" else {}))
    with run_gateway(config(upstream, [prov], route(step))) as gw:
        started = time.monotonic()
        r = chat(gw)
        elapsed = time.monotonic() - started
    assert r.status_code == 502 and r.headers["x-gateway-attempts"] == "5"
    assert len(script.times) == 5
    assert all(g < 0.1 + 0.4 for g in script.gaps()), script.gaps()  # the cap, plus a loaded machine's slack
    assert elapsed < 3


def test_a_retry_waits_for_the_latest_retry_after(upstream: MockUpstream) -> None:
    """Two 429s asking 1 s then 0.2 s: the second wait follows the second answer, not the first
    (BerriAI/litellm #20722). One key, so the same key goes again and its Retry-After decides."""
    script = upstream.replies["m"] = Script(
        Reply(429, err(429, "slow down"), headers={"retry-after": "1"}),
        Reply(429, err(429, "slow down"), headers={"retry-after": "0.2"}),
        then=Reply(body=chat_completion("after waiting")))
    # A cooldown floor below the asked waits: the key rests what the upstream asked (see the report on keys.py).
    prov = keyed("p", upstream.url, 1, cooldown={"initial": "0.01s", "max": "0.02s"})
    raw = config(upstream, [prov], route({"provider": "p", "model": "m", "timeout": "10s", "retries": 2,
                                          "retry_backoff": FAST}))
    with run_gateway(raw) as gw:
        r = chat(gw)
    assert r.status_code == 200 and content(r) == "after waiting"
    assert r.headers["x-gateway-attempts"] == "3"
    first, second = script.gaps()
    assert 0.95 <= first < 1.8, script.gaps()
    assert 0.18 <= second < 0.7, script.gaps()  # 1 s again would be the first answer's value


def test_a_retry_after_longer_than_the_step_has_left_falls_through_at_once(upstream: MockUpstream) -> None:
    upstream.replies["m"] = Reply(429, err(429), headers={"retry-after": "5"})
    raw = config(upstream, [keyed("p", upstream.url, 1)],
                 route({"provider": "p", "model": "m", "timeout": "2s", "retries": 3, "retry_backoff": FAST}, FALLBACK))
    with run_gateway(raw) as gw:
        started = time.monotonic()
        r = chat(gw)
        assert time.monotonic() - started < 1.5
        assert r.status_code == 200 and content(r) == "from fallback"
        assert r.headers["x-gateway-attempts"] == "2"
    assert hits(upstream, "m") == 1


@pytest.mark.parametrize("status", [500, 429])
def test_a_retry_takes_the_next_key(upstream: MockUpstream, status: int) -> None:
    upstream.replies["m"] = Reply(status, err(status), headers={"retry-after": "1"} if status == 429 else {})
    clock = FakeClock()
    raw = config(upstream, [keyed("p", upstream.url, 3)],
                 route({"provider": "p", "model": "m", "retries": 2, "retry_backoff": FAST}))
    with run_gateway(raw, services=clocked(clock)) as gw:
        r = chat(gw)
        assert r.headers["x-gateway-attempts"] == "3"
        assert [a["key"] for a in r.json()["error"]["attempts"]] == [0, 1, 2]
        if status == 429:  # only rate limits: 429, and when to come back (every key rests 1 s)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "upstream_rate_limited"
        else:
            assert r.status_code == 502
    assert seen(upstream, "m") == [0, 1, 2]


@pytest.mark.parametrize("status", [400, 404, 422])
def test_a_request_error_is_never_retried(upstream: MockUpstream, status: int) -> None:
    upstream.replies["m"] = Reply(status, err(status, "your request is wrong"))
    raw = config(upstream, [keyed("p", upstream.url, 3)],
                 route({"provider": "p", "model": "m", "retries": 3, "retry_backoff": FAST}))
    with run_gateway(raw) as gw:
        r = chat(gw)
        assert r.status_code == status and "your request is wrong" in r.json()["error"]["message"]
        assert r.headers["x-gateway-attempts"] == "1"
        described = gw.gateway.targets["p"].pool.describe(time.monotonic())  # type: ignore[union-attr]
        assert all(k["state"] == "ok" and k["failures"] == 0 for k in described)  # no key is blamed
    assert hits(upstream, "m") == 1


def test_a_stream_is_never_retried_after_its_first_chunk(upstream: MockUpstream) -> None:
    upstream.replies["m"] = Reply(sse=stream_of("one", "two", "three"), reset_after=2)
    raw = config(upstream, [keyed("p", upstream.url, 3)],
                 route({"provider": "p", "model": "m", "retries": 3, "retry_backoff": FAST}))
    with run_gateway(raw) as gw:
        r = chat(gw, stream=True)
        assert r.status_code == 200
        assert b'"one"' in r.content and b"stream_interrupted" in r.content and b"[DONE]" not in r.content
        line = last_log(gw, 1)
        assert line["attempts"] == 1 and line["outcome"] == 502
    assert hits(upstream, "m") == 1


def test_a_stream_failing_before_its_first_chunk_is_retried(upstream: MockUpstream) -> None:
    upstream.replies["m"] = Script(Reply(503, err(503)), then=Reply(sse=stream_of("second", " try")))
    raw = config(upstream, [keyed("p", upstream.url, 3)],
                 route({"provider": "p", "model": "m", "retries": 3, "retry_backoff": FAST}))
    with run_gateway(raw) as gw:
        r = chat(gw, stream=True)
        assert r.status_code == 200 and r.headers["x-gateway-attempts"] == "2"
        assert b'"second"' in r.content and r.content.endswith(b"data: [DONE]\n\n")
    assert seen(upstream, "m") == [0, 1]


# -- several keys --------------------------------------------------------------------------------------------

def test_weighted_round_robin_holds_over_a_few_requests(upstream: MockUpstream) -> None:
    """Smooth weighted round-robin (nginx): weights 5, 1, 1 give a a b a c a a, every 7 requests, in order."""
    raw = config(upstream, [keyed("p", upstream.url, weights=[5, 1, 1])], route({"provider": "p", "model": "m"}))
    with run_gateway(raw) as gw:
        assert all(chat(gw).status_code == 200 for _ in range(14))
    assert seen(upstream, "m") == [0, 0, 1, 0, 2, 0, 0] * 2


def test_fill_first_uses_the_first_key_until_it_rests(upstream: MockUpstream) -> None:
    clock = FakeClock()
    upstream.replies["m"] = PerKey(k0=Script(Reply(429, err(429), headers={"retry-after": "10"})))
    raw = config(upstream, [keyed("p", upstream.url, 3, key_strategy="fill-first")],
                 route({"provider": "p", "model": "m", "retries": 1, "retry_backoff": FAST}))
    with run_gateway(raw, services=clocked(clock)) as gw:
        assert [chat(gw).status_code for _ in range(3)] == [200] * 3
        clock.advance(10.5)
        assert chat(gw).status_code == 200
    # the first 429s (the key rests 10 s, the retry takes key 1), key 1 until key 0 is back
    assert seen(upstream, "m") == [0, 1, 1, 1, 0]


def test_least_busy_takes_the_key_with_fewest_requests_in_flight(upstream: MockUpstream) -> None:
    release = {i: threading.Event() for i in range(3)}

    def held(i: int) -> Callable[[Received], Reply]:
        def reply(rec: Received) -> Reply:
            release[i].wait(10)
            return Reply(body=chat_completion(f"key {i}"))
        return reply

    upstream.replies["m"] = PerKey(k0=held(0), k1=held(1), k2=held(2))
    raw = config(upstream, [keyed("p", upstream.url, 3, key_strategy="least-busy")],
                 route({"provider": "p", "model": "m"}))
    with run_gateway(raw) as gw:
        answers: dict[int, str] = {}

        def send(n: int) -> None:
            answers[n] = content(chat(gw))

        threads = []
        try:
            for n in range(3):  # one in flight on each key, each waits for the one before to arrive
                threads.append(threading.Thread(target=send, args=(n,)))
                threads[-1].start()
                assert wait_until(lambda n=n: hits(upstream, "m") == n + 1)  # type: ignore[misc]
            release[1].set()  # key 1 is free again; keys 0 and 2 still have one in flight
            threads[1].join(10)
            send(3)
        finally:
            for ev in release.values():
                ev.set()
            for t in threads:
                t.join(10)
    assert seen(upstream, "m") == [0, 1, 2, 1]  # round-robin would have taken key 0 for the 4th
    assert answers[3] == "key 1"


@pytest.mark.parametrize("header", [{"retry-after": "7"}, {"retry-after-ms": "7000"},
                                    {"x-ratelimit-reset-requests": "7s"}], ids=lambda h: next(iter(h)))
def test_a_429_cools_its_key_for_what_the_upstream_asked_and_the_others_serve(upstream: MockUpstream,
                                                                             header: dict[str, str]) -> None:
    clock = FakeClock()
    upstream.replies["m"] = PerKey(k0=Script(Reply(429, err(429), headers=header)))
    raw = config(upstream, [keyed("p", upstream.url, 2)],
                 route({"provider": "p", "model": "m", "retries": 1, "retry_backoff": FAST}))
    with run_gateway(raw, services=clocked(clock)) as gw:
        r = chat(gw)
        assert r.status_code == 200 and r.headers["x-gateway-attempts"] == "2"
        pool = gw.gateway.targets["p"].pool
        assert pool is not None
        k0 = pool.describe(clock())[0]
        assert k0["state"] == "cooling" and k0["cooling_for"] == pytest.approx(7.0)
        assert [chat(gw).status_code for _ in range(3)] == [200] * 3
        clock.advance(6.9)
        assert chat(gw).status_code == 200
        assert seen(upstream, "m") == [0, 1, 1, 1, 1, 1]
        clock.advance(0.2)
        assert [chat(gw).status_code for _ in range(2)] == [200] * 2
        assert 0 in seen(upstream, "m")[6:]  # back in the rotation


def test_a_401_disables_its_key_until_a_reload(upstream: MockUpstream, tmp_path: Path) -> None:
    refused = {KEYS[0]}

    def answer(rec: Received) -> Reply:
        if rec.headers["authorization"].removeprefix("Bearer ") in refused:
            return Reply(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
        return Reply(body=chat_completion("ok"))

    upstream.replies["m"] = answer
    raw = config(upstream, [keyed("p", upstream.url, 2)], route({"provider": "p", "model": "m"}),
                 store={"path": str(tmp_path / "gw.db")}, admin_token=ADMIN_TOKEN)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    with run_live(raw, source=str(path)) as gw:
        r = chat(gw)
        # Not the client's fault, and not retried (a 4xx): the gateway's key was refused
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_auth_failed"
        assert [chat(gw).status_code for _ in range(4)] == [200] * 4
        assert seen(upstream, "m") == [0, 1, 1, 1, 1]
        refusals = [ln for ln in gw.log_lines() if "refused by the upstream" in ln]
        assert len(refusals) == 1 and "key 0 of 2" in refusals[0]
        assert not any(k in gw.logs.getvalue() for k in KEYS)  # the index, never the key
        refused.clear()  # the operator fixed the key upstream, then reloads
        r = httpx.post(gw.url + "/admin/api/v1/reload", headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                       timeout=10)
        assert r.status_code == 200, r.text
        assert [chat(gw).status_code for _ in range(2)] == [200] * 2
        assert 0 in seen(upstream, "m")[5:]


def test_a_reload_keeps_the_cooldowns_and_circuits_of_what_it_did_not_change(upstream: MockUpstream) -> None:
    from at_gateway.app import Gateway
    from at_gateway.config import build_config

    clock = FakeClock()
    upstream.replies["m"] = PerKey(k0=Reply(429, err(429), headers={"retry-after": "30"}))
    upstream.replies["flaky"] = Reply(500, err(500))
    prov = keyed("p", upstream.url, 2, breaker={"failures": 1})
    raw = config(upstream, [prov], route({"provider": "p", "model": "m", "retries": 1, "retry_backoff": FAST}) +
                 route({"provider": "p", "model": "flaky"}, FALLBACK, name="f"))
    with run_gateway(raw, services=clocked(clock)) as gw:
        assert chat(gw).status_code == 200  # key 0 rests 30 s
        assert content(chat(gw, "f")) == "from fallback"  # the circuit p/flaky opens
        changed = {**prov, "api_keys": [KEYS[0], KEYS[2]]}  # key 1 replaced by key 2
        new_raw = config(upstream, [changed], raw["routes"])
        old = gw.gateway

        async def reload() -> Gateway:  # what Live does on a reload: a new gateway over the same client
            return Gateway(build_config(new_raw, "test-config"), client=old.client, usage=old.usage,
                           services=old.services)

        fresh = gw.portal.call(reload)
        pool = fresh.targets["p"].pool
        assert pool is not None
        assert [(k["state"], k["cooling_for"]) for k in pool.describe(clock())] == [("cooling", 30.0), ("ok", 0.0)]
        assert fresh.targets["p"].breaker("flaky").state(clock()) == "open"


def test_every_key_cooling_fails_the_step_at_once_and_the_route_falls_through(upstream: MockUpstream) -> None:
    clock = FakeClock()
    upstream.replies["m"] = Reply(429, err(429), headers={"retry-after": "30"})
    raw = config(upstream, [keyed("p", upstream.url, 2)],
                 route({"provider": "p", "model": "m", "retries": 1, "retry_backoff": FAST}, FALLBACK))
    with run_gateway(raw, services=clocked(clock)) as gw:
        r = chat(gw)  # both keys 429 (each rests 30 s), then the fallback
        assert content(r) == "from fallback" and r.headers["x-gateway-attempts"] == "3"
        clock.advance(10)
        started = time.monotonic()
        r = chat(gw)
        assert time.monotonic() - started < 1
        assert content(r) == "from fallback" and r.headers["x-gateway-attempts"] == "2"
        skipped = last_log(gw, 2)["failed_attempts"]
        assert len(skipped) == 1 and skipped[0]["error"] == "all keys cooling down, next free in 20.0s"
    assert hits(upstream, "m") == 2  # the second request sent nothing to the cooling keys


def test_only_rate_limits_answer_429_with_the_shortest_cooldown(upstream: MockUpstream) -> None:
    clock = FakeClock()
    upstream.replies["m"] = Reply(429, err(429), headers={"retry-after": "30"})
    upstream.replies["fallback"] = Reply(429, err(429), headers={"retry-after": "10"})
    raw = config(upstream, [keyed("p", upstream.url, 2)],
                 route({"provider": "p", "model": "m", "retries": 1, "retry_backoff": FAST}, FALLBACK))
    with run_gateway(raw, services=clocked(clock)) as gw:
        r = chat(gw)
        assert r.status_code == 429 and r.headers["retry-after"] == "10"
        clock.advance(4)
        r = chat(gw)  # every step skipped: nothing sent, and when to come back
        body = r.json()["error"]
        assert r.status_code == 429 and r.headers["retry-after"] == "6"
        assert body["code"] == "upstream_rate_limited" and body["type"] == "rate_limit_error"
        assert [a["error"] for a in body["attempts"]] == ["all keys cooling down, next free in 26.0s",
                                                          "all keys cooling down, next free in 6.0s"]
    assert hits(upstream, "m") == 2 and hits(upstream, "fallback") == 1


def test_wait_for_key_waits_for_a_key_that_frees_up_soon(upstream: MockUpstream) -> None:
    script = upstream.replies["m"] = Script(Reply(429, err(429), headers={"retry-after-ms": "1500"}))
    prov = keyed("p", upstream.url, 1, cooldown={"initial": "0.01s", "max": "0.02s"})
    raw = config(upstream, [prov], [
        {"name": "nowait", "steps": [{"provider": "p", "model": "m"}]},
        {"name": "wait", "steps": [{"provider": "p", "model": "m", "wait_for_key": "3s"}]}])
    with run_gateway(raw) as gw:
        assert chat(gw, "nowait").status_code == 429  # the key rests 1.5 s
        r = chat(gw, "nowait")
        assert r.status_code == 429 and "all keys cooling down" in r.json()["error"]["message"]
        assert len(script.times) == 1  # failed at once, nothing sent
        r = chat(gw, "wait")
        assert r.status_code == 200 and r.headers["x-gateway-attempts"] == "1"
    assert len(script.times) == 2 and 1.4 <= script.gaps()[0] < 3


# -- circuit breakers ----------------------------------------------------------------------------------------

class Gate:
    """A mock reply that waits (up to 10 s) for :meth:`open` before answering: a request held in flight."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.event = threading.Event()
        self.arrived = 0

    def __call__(self, rec: Received) -> Reply:
        self.arrived += 1
        self.event.wait(10)
        return self.reply

    def open(self) -> None:
        self.event.set()


@contextmanager
def in_thread(fn: Callable[[], Any]) -> Iterator[list[Any]]:
    """Run ``fn`` in a thread for the ``with`` block; its result is in the yielded list afterwards."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    try:
        yield out
    finally:
        t.join(20)
    assert out, "the request in the thread did not finish"


BREAKER_ROUTE = route({"provider": "p", "model": "flaky"}, FALLBACK)


def breaker_config(upstream: MockUpstream) -> dict[str, Any]:
    # cooldown off: the key must not rest after these failures, so what skips the step is the circuit alone
    prov = keyed("p", upstream.url, 1, cooldown="off", breaker={"failures": 3, "open_for": "30s"})
    return config(upstream, [prov], BREAKER_ROUTE)


def open_the_circuit(gw: RunningGateway, upstream: MockUpstream) -> None:
    upstream.replies["flaky"] = Reply(500, err(500))
    for _ in range(3):
        assert content(chat(gw)) == "from fallback"
    assert hits(upstream, "flaky") == 3


def test_the_circuit_opens_after_n_failures_and_the_step_is_skipped_without_a_request(
        upstream: MockUpstream) -> None:
    clock = FakeClock()
    with run_gateway(breaker_config(upstream), services=clocked(clock)) as gw:
        open_the_circuit(gw, upstream)
        clock.advance(5)
        started = time.monotonic()
        r = chat(gw)
        assert time.monotonic() - started < 1
        assert content(r) == "from fallback" and r.headers["x-gateway-attempts"] == "2"
        skipped = last_log(gw, 4)["failed_attempts"][0]
        assert skipped["error"] == "circuit open (for 25.0s more)" and skipped["status"] is None
        assert hits(upstream, "flaky") == 3  # no request reached the upstream
        assert any("circuit p/flaky: closed -> open after 3 failures" in ln for ln in gw.log_lines())


def test_half_open_lets_one_probe_through_and_its_success_closes_the_circuit(upstream: MockUpstream) -> None:
    clock = FakeClock()
    with run_gateway(breaker_config(upstream), services=clocked(clock)) as gw:
        open_the_circuit(gw, upstream)
        clock.advance(31)
        gate = upstream.replies["flaky"] = Gate(Reply(body=chat_completion("the probe")))
        with in_thread(lambda: chat(gw)) as probe:
            assert wait_until(lambda: gate.arrived == 1)
            for n in range(3):  # while the probe is out, the others skip the step at once
                r = chat(gw)
                assert content(r) == "from fallback"
                error = last_log(gw, 4 + n)["failed_attempts"][0]["error"]  # the probe is not logged yet
                assert error.startswith("circuit half-open"), error
            assert gate.arrived == 1 and hits(upstream, "flaky") == 4
            gate.open()
        assert content(probe[0]) == "the probe"
        assert content(chat(gw)) == "the probe"  # closed: the step is tried again
        assert hits(upstream, "flaky") == 5
        logs = "\n".join(gw.log_lines())
        assert "open -> half-open" in logs and "half-open -> closed" in logs


def test_a_failed_probe_opens_the_circuit_again(upstream: MockUpstream) -> None:
    clock = FakeClock()
    with run_gateway(breaker_config(upstream), services=clocked(clock)) as gw:
        open_the_circuit(gw, upstream)
        clock.advance(31)
        assert content(chat(gw)) == "from fallback"  # the probe: 500
        assert hits(upstream, "flaky") == 4
        clock.advance(1)
        assert content(chat(gw)) == "from fallback"
        assert last_log(gw, 5)["failed_attempts"][0]["error"] == "circuit open (for 29.0s more)"
        assert hits(upstream, "flaky") == 4
        assert any("half-open -> open (the probe failed)" in ln for ln in gw.log_lines())
        upstream.replies["flaky"] = Reply(body=chat_completion("healed"))
        clock.advance(30)
        assert content(chat(gw)) == "healed"


def test_streams_broken_after_their_first_chunk_open_the_circuit(upstream: MockUpstream) -> None:
    """A break after the first chunk is not retried (the client has the chunk), but it is the target's failure
    all the same: a provider that always breaks its streams gets its circuit opened like one that fails before."""
    clock = FakeClock()
    upstream.replies["flaky"] = Reply(sse=stream_of("a", "b", "c"), reset_after=2)
    upstream.replies["fallback"] = Reply(sse=stream_of("from", " fallback"))
    with run_gateway(breaker_config(upstream), services=clocked(clock)) as gw:
        for _ in range(3):
            r = chat(gw, stream=True)
            assert b"stream_interrupted" in r.content and r.headers["x-gateway-provider"] == "p"
        r = chat(gw, stream=True)
        assert r.headers["x-gateway-provider"] == "up2" and r.content.endswith(b"data: [DONE]\n\n")
        assert last_log(gw, 4)["failed_attempts"][0]["error"] == "circuit open (for 30.0s more)"
    assert hits(upstream, "flaky") == 3


# -- hedged steps --------------------------------------------------------------------------------------------

def hedge_config(upstream: MockUpstream, hedge_after: str = "0.2s") -> dict[str, Any]:
    raw = base_config(upstream.url, route({"provider": "up1", "model": "slow", "hedge_after": hedge_after,
                                           "timeout": "10s"},
                                          {"provider": "up2", "model": "fast", "timeout": "10s"}))
    return raw


def no_pooled_loser(gw: RunningGateway, upstream: MockUpstream) -> None:
    """Two connections were opened (one per step); the winner's is pooled, the loser's was closed."""
    assert wait_until(lambda: gw.gateway.client.stats() == {"active": 0, "idle": 1}), gw.gateway.client.stats()
    assert upstream.connections == 2


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_hedge_starts_the_next_step_and_the_winner_cancels_the_loser(upstream: MockUpstream,
                                                                       stream: bool) -> None:
    gate = upstream.replies["slow"] = Gate(Reply(sse=stream_of("slow")) if stream
                                           else Reply(body=chat_completion("slow")))
    upstream.replies["fast"] = Reply(sse=stream_of("fast", " one")) if stream else Reply(body=chat_completion("fast"))
    with run_gateway(hedge_config(upstream)) as gw:
        try:
            started = time.monotonic()
            r = chat(gw, stream=stream)
            assert time.monotonic() - started < 5
            assert r.status_code == 200 and r.headers["x-gateway-attempts"] == "2"
            assert r.headers["x-gateway-provider"] == "up2"
            if stream:
                assert b'"fast"' in r.content and b'"slow"' not in r.content
                assert r.content.endswith(b"data: [DONE]\n\n")
            else:
                assert content(r) == "fast"
            line = last_log(gw, 1)
            assert line["provider"] == "up2" and line["attempts"] == 2
            (lost,) = line["failed_attempts"]
            assert lost["provider"] == "up1" and lost["model"] == "slow" and "cancelled" in lost["error"]
            no_pooled_loser(gw, upstream)
            # the pooled connection is the winner's: the next request reuses it, nothing new is opened
            assert chat(gw, stream=stream).status_code == 200
            assert upstream.connections == 2 + 1  # ...except the new hedge's slow one
        finally:
            gate.open()
    assert gate.arrived == 2


def test_a_first_step_answering_before_hedge_after_never_starts_the_second(upstream: MockUpstream) -> None:
    upstream.replies["slow"] = lambda rec: (Reply(sse=stream_of("in", " time")) if rec.json.get("stream")
                                            else Reply(body=chat_completion("in time")))
    with run_gateway(hedge_config(upstream, "2s")) as gw:
        r = chat(gw)
        assert content(r) == "in time" and r.headers["x-gateway-attempts"] == "1"
        r = chat(gw, stream=True)
        assert r.headers["x-gateway-attempts"] == "1" and b'" time"' in r.content
    assert hits(upstream, "fast") == 0


def test_a_first_step_failing_before_hedge_after_falls_through_at_once(upstream: MockUpstream) -> None:
    upstream.replies["slow"] = Reply(500, err(500))
    upstream.replies["fast"] = Reply(body=chat_completion("fast"))
    with run_gateway(hedge_config(upstream, "5s")) as gw:
        started = time.monotonic()
        r = chat(gw)
        assert time.monotonic() - started < 2
        assert content(r) == "fast" and r.headers["x-gateway-attempts"] == "2"


# -- addressing: models lists, provider/model --------------------------------------------------------------

MODEL_ROUTES = [{"name": "a", "steps": [{"provider": "up1", "model": "a-model"}]},
                {"name": "b", "steps": [{"provider": "up2", "model": "b-model"}]}]


def test_a_models_list_is_tried_in_order_as_one_route(upstream: MockUpstream) -> None:
    upstream.replies["a-model"] = Reply(503, err(503))
    upstream.replies["b-model"] = Reply(body=chat_completion("from b"))
    with run_gateway(base_config(upstream.url, MODEL_ROUTES)) as gw:
        r = chat(gw, None, models=["a", "b"])  # no "model": the list names the routes
        assert r.status_code == 200 and content(r) == "from b"
        assert r.headers["x-gateway-route"] == "a" and r.headers["x-gateway-attempts"] == "2"
        assert r.headers["x-gateway-provider"] == "up2" and r.headers["x-gateway-model"] == "b-model"
        assert "models" not in upstream.received[-1].json  # not passed upstream
        r = chat(gw, None, models=["a", "nope"])
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = chat(gw, None, models="a")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_models"


def test_a_models_list_may_name_only_routes_the_client_key_may_use(upstream: MockUpstream, tmp_path: Path) -> None:
    from at_gateway.store import db
    from at_gateway.store.keys import KeyStore, open_key_cache

    raw = base_config(upstream.url, MODEL_ROUTES, store={"path": str(tmp_path / "gw.db")})
    conn = db.connect(str(tmp_path / "gw.db"))
    try:
        _, client_key = KeyStore(conn).create("only-b", routes=["b"])
    finally:
        conn.close()

    async def keys_only(cfg: Any) -> Services:
        return Services(keys=await open_key_cache(cfg))

    upstream.replies["b-model"] = Reply(body=chat_completion("from b"))
    with run_gateway(raw, services=keys_only) as gw:
        r = chat(gw, None, key=client_key, models=["a", "b"])
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
        r = chat(gw, None, key=client_key, models=["b"])
        assert r.status_code == 200 and content(r) == "from b"
    assert hits(upstream, "a-model") == 0


def test_allow_direct_addresses_provider_slash_model_through_keys_and_retries(upstream: MockUpstream) -> None:
    upstream.replies["raw-model"] = PerKey(k0=Reply(500, err(500)), default=Reply(body=chat_completion("direct")))
    prov = keyed("p", upstream.url, 2, retries=1, retry_backoff=FAST)
    off = config(upstream, [prov], route({"provider": "p", "model": "x"}))
    with run_gateway(off) as gw:
        r = chat(gw, "p/raw-model")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert hits(upstream, "raw-model") == 0
    with run_gateway({**off, "allow_direct": True}) as gw:
        r = chat(gw, "p/raw-model")
        assert r.status_code == 200 and content(r) == "direct"
        assert r.headers["x-gateway-route"] == "p/raw-model" and r.headers["x-gateway-attempts"] == "2"
        assert chat(gw, "nosuch/raw-model").status_code == 404
    assert seen(upstream, "raw-model") == [0, 1]  # the provider's retries, with its next key


def test_max_concurrency_makes_the_next_request_wait_then_fall_through(upstream: MockUpstream) -> None:
    gate = upstream.replies["m"] = Gate(Reply(body=chat_completion("held")))
    prov = keyed("p", upstream.url, 1, max_concurrency=1, queue_timeout="0.5s")
    with run_gateway(config(upstream, [prov], route({"provider": "p", "model": "m"}, FALLBACK))) as gw:
        try:
            with in_thread(lambda: chat(gw)) as held:
                assert wait_until(lambda: gate.arrived == 1)
                started = time.monotonic()
                r = chat(gw)
                waited = time.monotonic() - started
                assert content(r) == "from fallback" and 0.45 <= waited < 3
                error = last_log(gw, 1)["failed_attempts"][0]["error"]
                assert "max_concurrency" in error and "queue_timeout" in error
                gate.open()
            assert content(held[0]) == "held"
        finally:
            gate.open()
        assert content(chat(gw)) == "held"  # the slot is free again
    assert gate.arrived == 2


@contextmanager
def held_stream(gw: RunningGateway, model: str = "r") -> Iterator[list[bytes]]:
    """A stream request in a thread, inside the block once its first bytes reached the client; its whole
    body is in the yielded list afterwards."""
    body: list[bytes] = []
    first = threading.Event()

    def run() -> None:
        with httpx.stream("POST", gw.url + CHAT, headers={"authorization": f"Bearer {GATEWAY_KEY}"}, timeout=30,
                          json={"model": model, "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
            got = b""
            for part in r.iter_bytes():
                got += part
                first.set()
            body.append(got)

    t = threading.Thread(target=run)
    t.start()
    try:
        assert first.wait(10)
        yield body
    finally:
        t.join(20)


def test_max_concurrency_counts_a_stream_until_it_ends(upstream: MockUpstream) -> None:
    release = threading.Event()
    upstream.replies["m"] = Reply(sse=stream_of("a", "b", "c"), hold=release, hold_after=2)
    prov = keyed("p", upstream.url, 1, max_concurrency=1, queue_timeout="0.3s")
    with run_gateway(config(upstream, [prov], route({"provider": "p", "model": "m"}, FALLBACK))) as gw:
        try:
            with held_stream(gw) as body:
                started = time.monotonic()
                r = chat(gw)  # the stream holds the one slot though its first chunk went out long ago
                assert content(r) == "from fallback" and time.monotonic() - started >= 0.28
                release.set()
            assert body[0].endswith(b"data: [DONE]\n\n")
        finally:
            release.set()
        assert b"[DONE]" in chat(gw, stream=True).content  # the slot was given back when the stream ended
    assert hits(upstream, "m") == 2


def test_least_busy_counts_a_stream_in_flight_until_it_ends(upstream: MockUpstream) -> None:
    release = threading.Event()
    upstream.replies["m"] = PerKey(k0=Reply(sse=stream_of("a", "b"), hold=release, hold_after=2),
                                   default=Reply(body=chat_completion("other key")))
    raw = config(upstream, [keyed("p", upstream.url, 2, key_strategy="least-busy")],
                 route({"provider": "p", "model": "m"}))
    with run_gateway(raw) as gw:
        try:
            with held_stream(gw):
                assert content(chat(gw)) == "other key"
                release.set()
        finally:
            release.set()
    assert seen(upstream, "m") == [0, 1]


@pytest.mark.parametrize("status, limited", [(500, False), (503, False), (429, True)])
def test_keys_resting_after_failures_are_not_called_rate_limited(upstream: MockUpstream, status: int,
                                                                  limited: bool) -> None:
    # One key: failures in a row (cooldown.failures) rest it as 429s do. A later request that finds it resting
    # is a 429 "rate limited upstream" with Retry-After only when the rest came from 429s.
    upstream.replies["m"] = Reply(status, err(status), headers={"retry-after": "30"} if status == 429 else {})
    clock = FakeClock()
    raw = config(upstream, [keyed("p", upstream.url, 1, cooldown={"failures": 1, "initial": "30s"})],
                 route({"provider": "p", "model": "m"}))
    with run_gateway(raw, services=clocked(clock)) as gw:
        first = chat(gw)
        assert first.status_code == (429 if limited else 502)
        again = chat(gw)  # the key rests: nothing goes out
        assert hits(upstream, "m") == 1
        err_body = again.json()["error"]
        if limited:
            assert again.status_code == 429 and err_body["code"] == "upstream_rate_limited"
            assert int(again.headers["retry-after"]) >= 1
        else:
            assert again.status_code == 502 and err_body["code"] != "upstream_rate_limited", again.text
            assert "retry-after" not in again.headers
