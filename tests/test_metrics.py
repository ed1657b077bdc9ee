"""``{base_path}/metrics``: the exposition (parsed back with prometheus_client's parser), how each family moves
for the requests that move it (a 200, a fallback, a stream, a key's rpm limit, tokens and cost, an open
circuit), the label caps (top keys, ``per_key: false``, records per table, distinct routes and models, and
``allow_direct``'s client-named routes counted as ``direct:<provider>`` with their models capped), the seed's
names, auth, 404 when off, and the Grafana dashboard naming only metrics the gateway exports.

Everything goes through a real gateway on a real socket with a mock upstream, except the label-escaping and
label-cap tests, which feed one process's :class:`~at_gateway.metrics.Metrics` contexts made by hand (a newline
in a route name, thousands of names) and render them with a real Gateway.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import at_gateway
from at_gateway.app import Gateway
from at_gateway.config import Limits, build_config
from at_gateway.context import Attempt, RequestContext
from at_gateway.metrics import Metrics
from at_gateway.metrics.exposition import Family, render
from at_gateway.service import open_services
from at_gateway.services import Services
from at_gateway.store import db
from at_gateway.store.keys import KeyStore
from tests.conftest import GATEWAY_KEY, RunningGateway, base_config, run_gateway
from tests.mock_upstream import MockUpstream, Reply, chat_completion, stream_of, wait_until

H = {"x-api-key": GATEWAY_KEY}
MSG = [{"role": "user", "content": "hi"}]
ADMIN = "adm-" + "m" * 32
ROOT = Path(__file__).resolve().parent.parent

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- reading a scrape back ----------------------------------------------------------------------------------------
def parse(text: str) -> tuple[dict[str, Any], Samples]:
    """(families by name, samples) as prometheus_client's parser reads them."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples: Samples = {}
    for f in families.values():
        for s in f.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return families, samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when there is none); a label given as
    ``""`` must be absent (Prometheus's empty value)."""
    want = {(k, v) for k, v in labels.items() if v}
    absent = {k for k, v in labels.items() if not v}
    return sum(v for (n, ls), v in samples.items()
               if n == name and want <= ls and not absent & {k for k, _ in ls})


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(ls).get(label, "") for (n, ls) in samples if n == name}


def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    r = httpx.get(url + "/metrics", headers=headers or {}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(r.text)[1]


def scrape_until(url: str, pred: Callable[[Samples], bool], timeout: float = 5.0,
                 headers: dict[str, str] | None = None) -> Samples:
    """Scrape until ``pred`` holds for what was scraped (a condition, no sleep of a guessed length)."""
    got: dict[str, Samples] = {}

    def check() -> bool:
        got["s"] = scrape(url, headers)
        return pred(got["s"])

    assert wait_until(check, timeout), got.get("s")
    return got["s"]


def serving(raw: dict[str, Any]) -> Any:
    return run_gateway(raw, services=open_services)


# -- the exposition writer ------------------------------------------------------------------------------------
def test_the_exposition_parses_back_with_names_types_help_escapes_and_cumulative_buckets() -> None:
    weird = 'a\\b"c\nd'
    text = render([
        Family("atg_demo_total", "counter", 'Help with a \\ backslash\nand a newline.',
               [((("route", weird), ("status", "2xx")), 3), ((("route", "plain"),), 0.25)]),
        Family("atg_gauge", "gauge", "A gauge.", [((), 7)]),
        Family("atg_latency_seconds", "histogram", "A histogram.",
               [((("route", weird),), ((0.1, 1.0), [2, 1, 4], 12.5))]),
        Family("atg_empty_total", "counter", "No series yet.", []),
    ]).decode()
    families, samples = parse(text)
    assert {n: f.type for n, f in families.items()} == {
        "atg_demo": "counter", "atg_gauge": "gauge", "atg_latency_seconds": "histogram", "atg_empty": "counter"}
    assert families["atg_demo"].documentation == "Help with a \\ backslash\nand a newline."
    assert samples[("atg_demo_total", frozenset({("route", weird), ("status", "2xx")}))] == 3
    assert samples[("atg_demo_total", frozenset({("route", "plain")}))] == 0.25
    assert samples[("atg_gauge", frozenset())] == 7
    buckets = [(s.labels["le"], s.value) for s in families["atg_latency_seconds"].samples
               if s.name == "atg_latency_seconds_bucket"]
    assert buckets == [("0.1", 2), ("1.0", 3), ("+Inf", 7)]  # cumulative, +Inf = count
    assert total(samples, "atg_latency_seconds_count", route=weird) == 7
    assert total(samples, "atg_latency_seconds_sum", route=weird) == 12.5
    assert '\\"' in text and "\\n" in text and "\\\\" in text  # escaped on the wire, not raw
    assert text.count("\n# TYPE atg_empty_total counter\n") == 1


def test_route_names_no_config_accepts_are_escaped_through_a_real_gateway_render() -> None:
    config = build_config(base_config("http://127.0.0.1:9", metrics={"enabled": True}), "test")
    services = Services()
    metrics = services.metrics = Metrics(config, services)
    gateway = Gateway(config, services=services)
    weird = 'r"ou\\te\nname'
    ctx = RequestContext("r1", method="POST", path="/v1/chat/completions", client="key0", route=weird,
                         provider="echo", model="echo-1", status=200)
    ctx.attempts.append(Attempt(0, "echo", "echo-1", status=200, ok=True))
    metrics.started(ctx)
    metrics.observe(ctx)
    families, samples = parse(metrics.render(gateway).decode())
    assert total(samples, "atg_requests_total", route=weird, door="chat", status="2xx") == 1
    assert total(samples, "atg_attempts_total", route=weird, provider="echo", outcome="ok") == 1
    assert total(samples, "gen_ai_server_request_duration_count", gen_ai_request_model=weird) == 1
    histogram = [s for s in families["atg_request_duration_seconds"].samples if s.labels.get("route") == weird]
    counts = [s.value for s in histogram if s.name.endswith("_bucket")]
    assert counts == sorted(counts) and histogram[-1].name.endswith("_count")


# -- how each family moves ------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    act: Callable[[RunningGateway, dict[str, str]], None]
    requests: int  # how many it makes: the scrape after waits until all are counted
    # (sample name, labels, how much it moves); a 0 says it must not move
    moves: list[tuple[str, dict[str, str], float]] = field(default_factory=list)
    grows: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # moves by more than 0 (sums of time)


def chat(gw: RunningGateway, model: str, headers: dict[str, str] = H, **extra: Any) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", headers=headers, json={"model": model, "messages": MSG, **extra},
                      timeout=10)


def _plain(gw: RunningGateway, keys: dict[str, str]) -> None:
    assert chat(gw, "plain").status_code == 200


def _fallback(gw: RunningGateway, keys: dict[str, str]) -> None:
    r = chat(gw, "fallback")
    assert r.status_code == 200 and r.headers["x-gateway-provider"] == "up2"


def _stream(gw: RunningGateway, keys: dict[str, str]) -> None:
    with httpx.stream("POST", gw.url + "/v1/chat/completions", headers=H, timeout=10, json={
            "model": "stream", "messages": MSG, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.read().endswith(b"data: [DONE]\n\n")


def _limited(gw: RunningGateway, keys: dict[str, str]) -> None:
    auth = {"authorization": "Bearer " + keys["secret"]}
    assert chat(gw, "plain", auth).status_code == 200
    r = chat(gw, "plain", auth)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"


def _priced(gw: RunningGateway, keys: dict[str, str]) -> None:
    assert chat(gw, "priced").status_code == 200


def _circuit(gw: RunningGateway, keys: dict[str, str]) -> None:
    for _ in range(2):  # the first opens flaky's circuit (failures: 1), the second finds it open
        r = chat(gw, "circuit")
        assert r.status_code == 200 and r.headers["x-gateway-provider"] == "echo"


CHAT_OP = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "openai"}
CASES = [
    Case("a 200", _plain, 1, [
        ("atg_requests_total", {"route": "plain", "door": "chat", "status": "2xx"}, 1),
        ("atg_attempts_total", {"route": "plain", "provider": "up1", "model": "ok", "outcome": "ok"}, 1),
        ("atg_fallbacks_total", {}, 0),
        ("atg_request_duration_seconds_count", {"route": "plain", "provider": "up1"}, 1),
        ("atg_time_to_first_token_seconds_count", {}, 0),  # not a stream
        ("atg_tokens_total", {"route": "plain", "kind": "prompt"}, 3),
        ("atg_tokens_total", {"route": "plain", "kind": "completion"}, 1),
        ("atg_key_requests_total", {"key": "key0", "status": "2xx"}, 1),
        ("gen_ai_server_request_duration_count", {**CHAT_OP, "gen_ai_request_model": "plain",
                                                  "gen_ai_response_model": "ok"}, 1),
        ("gen_ai_client_token_usage_sum", {"gen_ai_request_model": "plain", "gen_ai_token_type": "input"}, 3),
        ("gen_ai_client_token_usage_count", {"gen_ai_request_model": "plain", "gen_ai_token_type": "output"}, 1),
        ("atg_rate_limited_total", {}, 0),
    ], [("atg_request_duration_seconds_sum", {"route": "plain"})]),
    Case("a fallback", _fallback, 1, [
        ("atg_requests_total", {"route": "fallback", "status": "2xx"}, 1),
        ("atg_attempts_total", {"route": "fallback", "provider": "up1", "model": "broken", "outcome": "http_error"}, 1),
        ("atg_attempts_total", {"route": "fallback", "provider": "up2", "model": "ok", "outcome": "ok"}, 1),
        ("atg_fallbacks_total", {"route": "fallback"}, 1),
        ("atg_request_duration_seconds_count", {"route": "fallback", "provider": "up2"}, 1),
        ("gen_ai_server_request_duration_count", {"gen_ai_request_model": "fallback", "error_type": ""}, 1),
    ]),
    Case("a stream with its time to first token", _stream, 1, [
        ("atg_requests_total", {"route": "stream", "status": "2xx"}, 1),
        ("atg_time_to_first_token_seconds_count", {"route": "stream", "provider": "up1"}, 1),
        ("gen_ai_server_time_to_first_token_count", {**CHAT_OP, "gen_ai_request_model": "stream",
                                                     "gen_ai_response_model": "streamed"}, 1),
        ("atg_tokens_total", {"route": "stream", "kind": "completion"}, 3),
        ("atg_tokens_total", {"route": "stream", "kind": "prompt"}, 2),
    ], [("atg_time_to_first_token_seconds_sum", {"route": "stream"})]),
    Case("a 429 from a client key's rpm", _limited, 2, [
        ("atg_rate_limited_total", {"limit": "rpm"}, 1),
        ("atg_requests_total", {"route": "plain", "status": "4xx"}, 1),
        ("atg_requests_total", {"route": "plain", "status": "2xx"}, 1),
        ("atg_attempts_total", {"route": "plain"}, 1),  # the refused request never reached a step
        ("gen_ai_server_request_duration_count", {"gen_ai_request_model": "plain", "error_type": "429"}, 1),
    ]),
    Case("tokens and cost", _priced, 1, [
        ("atg_tokens_total", {"route": "priced", "provider": "up1", "model": "priced", "kind": "prompt"}, 1000),
        ("atg_tokens_total", {"route": "priced", "kind": "completion"}, 100),
        ("atg_tokens_total", {"route": "priced", "kind": "cached"}, 200),
        ("atg_tokens_total", {"route": "priced", "kind": "reasoning"}, 40),
        # 800 uncached at $1/M, 200 cached at $0.5/M, 100 out at $2/M
        ("atg_cost_usd_total", {"route": "priced", "provider": "up1", "model": "priced"}, 0.0011),
        ("atg_key_cost_usd_total", {"key": "key0"}, 0.0011),
        ("atg_key_tokens_total", {"key": "key0", "kind": "prompt"}, 1000),
        ("gen_ai_client_token_usage_sum", {"gen_ai_request_model": "priced", "gen_ai_token_type": "output"}, 100),
    ]),
    Case("an open circuit", _circuit, 2, [
        ("atg_attempts_total", {"route": "circuit", "provider": "flaky", "outcome": "http_error"}, 1),
        ("atg_attempts_total", {"route": "circuit", "provider": "flaky", "outcome": "circuit_open"}, 1),
        ("atg_attempts_total", {"route": "circuit", "provider": "echo", "outcome": "ok"}, 2),
        ("atg_fallbacks_total", {"route": "circuit"}, 2),
        ("atg_requests_total", {"route": "circuit", "status": "2xx"}, 2),
    ]),
]


@pytest.fixture(scope="module")
def moving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningGateway, dict[str, str]]]:
    upstream = MockUpstream().start()
    upstream.replies["broken"] = Reply(status=500, body={"error": {"message": "boom"}})
    upstream.replies["streamed"] = Reply(sse=stream_of("a", "b", "c"))  # 2 prompt, 3 completion tokens
    upstream.replies["priced"] = Reply(body=chat_completion(usage={
        "prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100,
        "prompt_tokens_details": {"cached_tokens": 200}, "completion_tokens_details": {"reasoning_tokens": 40}}))
    path = tmp_path_factory.mktemp("metrics") / "gw.db"
    conn = db.connect(str(path))
    try:
        stored, secret = KeyStore(conn).create("limited", limits=Limits(rpm=1))
    finally:
        conn.close()
    routes = [
        {"name": "plain", "steps": [{"provider": "up1", "model": "ok"}]},
        {"name": "fallback", "steps": [{"provider": "up1", "model": "broken"}, {"provider": "up2", "model": "ok"}]},
        {"name": "stream", "steps": [{"provider": "up1", "model": "streamed"}]},
        {"name": "priced", "steps": [{"provider": "up1", "model": "priced",
                                      "price": {"input": 1, "output": 2, "cached_input": 0.5}}]},
        {"name": "circuit", "steps": [{"provider": "flaky", "model": "broken"},
                                      {"provider": "echo", "model": "echo-1"}]},
    ]
    raw = base_config(upstream.url, routes, metrics={"enabled": True}, store={"path": str(path)})
    raw["providers"].append({"name": "flaky", "type": "openai", "base_url": upstream.url, "api_key": "sk-flaky-123",
                             "breaker": {"failures": 1, "open_for": 600}})
    try:
        with serving(raw) as gw:
            yield gw, {"secret": secret, "id": stored.key.id}
    finally:
        upstream.stop()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_family_moves_as_it_should(moving: tuple[RunningGateway, dict[str, str]], case: Case) -> None:
    gw, keys = moving
    before = scrape(gw.url)
    case.act(gw, keys)
    # A request is counted when its handler finishes, just after the client got its answer: wait for that.
    want = total(before, "atg_requests_total") + case.requests
    after = scrape_until(gw.url, lambda s: total(s, "atg_requests_total") == want)
    for name, labels, delta in case.moves:
        if name.startswith("atg_rate_limited") and delta:
            labels = {**labels, "key": keys["id"]}
        moved = total(after, name, **labels) - total(before, name, **labels)
        assert moved == pytest.approx(delta), (name, labels)
    for name, labels in case.grows:
        assert total(after, name, **labels) > total(before, name, **labels), (name, labels)


def test_scrapes_are_not_requests_and_the_fixed_families_are_there(
        moving: tuple[RunningGateway, dict[str, str]]) -> None:
    gw, keys = moving
    _plain(gw, keys)  # a request through the pool: its connection is idle in it afterwards
    first = scrape(gw.url)
    for _ in range(3):
        assert httpx.get(gw.url + "/health", timeout=5).status_code == 200  # a load balancer's probes
        again = scrape(gw.url)
    assert total(again, "atg_requests_total") == total(first, "atg_requests_total")
    assert total(again, "atg_requests_in_flight") == 0  # the scrape itself is not a request in flight
    assert again[("atg_build_info", frozenset({("version", at_gateway.__version__),
                                               ("commit", _commit())}))] == 1
    assert again[("atg_workers", frozenset())] == 1
    assert again[("atg_store_write_errors_total", frozenset())] == 0
    now = time.time()
    assert now - 3600 < again[("process_start_time_seconds", frozenset())] <= now
    assert again[("process_resident_memory_bytes", frozenset())] > 1 << 20
    assert again[("process_open_fds", frozenset())] > 3
    assert again[("process_cpu_seconds_total", frozenset())] > 0
    # the mock upstream's pooled keep-alive connection, idle between requests
    origins = label_values(again, "atg_upstream_connections", "origin")
    assert any(re.fullmatch(r"http://127\.0\.0\.1:\d+", o) for o in origins), origins
    assert total(again, "atg_upstream_connections", state="idle") >= 1
    assert total(again, "atg_upstream_connections", state="active") == 0


def _commit() -> str:
    try:
        from at_gateway._build import COMMIT  # type: ignore[import-not-found]
    except ImportError:
        return "unknown"
    return str(COMMIT or "unknown")


# -- label caps ------------------------------------------------------------------------------------------------
KEYS3 = ["caps-key-0-abcdef", "caps-key-1-abcdef", "caps-key-2-abcdef"]


def test_key_ids_are_capped_to_the_top_n_with_an_other_bucket_and_the_seed_names_are_there(
        upstream: MockUpstream) -> None:
    upstream.replies["broken"] = Reply(status=500, body={"error": {"message": "boom"}})
    routes = [{"name": "plain", "steps": [{"provider": "up1", "model": "ok"}]},
              {"name": "fallback", "steps": [{"provider": "up1", "model": "broken"},
                                             {"provider": "up2", "model": "ok"}]}]
    raw = base_config(upstream.url, routes, api_keys=KEYS3,
                      metrics={"enabled": True, "top_keys": 2, "seed_names": True})
    del raw["api_key"]
    with serving(raw) as gw:
        for k in [KEYS3[0], KEYS3[1], KEYS3[2], KEYS3[2]]:
            assert chat(gw, "plain", {"x-api-key": k}).status_code == 200
        assert chat(gw, "fallback", {"x-api-key": KEYS3[2]}).status_code == 200
        s = scrape_until(gw.url, lambda s: total(s, "atg_requests_total") == 5)
    assert label_values(s, "atg_key_requests_total", "key") == {"key0", "key1", "other"}
    assert total(s, "atg_key_requests_total", key="other") == 3
    assert total(s, "atg_key_requests_total", key="key0") == 1
    # the seed's names and labels, for users migrating from it
    assert total(s, "ai_gateway_requests_total", client_id="key0", model="plain", status="200") == 1
    assert total(s, "ai_gateway_requests_total", client_id="other") == 3
    assert total(s, "ai_gateway_input_tokens_total", model="plain") == 12  # 4 answers of 3 prompt tokens
    assert total(s, "ai_gateway_output_tokens_total", client_id="key1") == 1
    assert total(s, "ai_gateway_request_duration_seconds_count", model="plain") == 4
    assert total(s, "ai_gateway_upstream_errors_total", client_id="other", model="fallback", provider="up1") == 1
    assert s[("ai_gateway_requests_in_progress", frozenset())] == 0


def test_the_top_keys_come_from_the_stores_usage_then_first_come(upstream: MockUpstream, tmp_path: Path) -> None:
    """key2 made the most requests lately and key1 some: they hold the two places; key0, new, is other."""
    path = tmp_path / "gw.db"
    conn = db.connect(str(path))
    try:
        day = time.strftime("%Y-%m-%d", time.gmtime())
        conn.executemany("INSERT INTO usage_daily (day, key_id, route, provider, model, requests) VALUES "
                         "(?, ?, 'plain', 'up1', 'ok', ?)", [(day, "key2", 50), (day, "key1", 5)])
    finally:
        conn.close()
    routes = [{"name": "plain", "steps": [{"provider": "up1", "model": "ok"}]}]
    raw = base_config(upstream.url, routes, api_keys=KEYS3, store={"path": str(path)},
                      metrics={"enabled": True, "top_keys": 2})
    del raw["api_key"]
    with serving(raw) as gw:
        for k in KEYS3:
            assert chat(gw, "plain", {"x-api-key": k}).status_code == 200
        s = scrape_until(gw.url, lambda s: total(s, "atg_requests_total") == 3)
    assert {dict(ls)["key"]: v for (n, ls), v in s.items() if n == "atg_key_requests_total"} == {
        "key1": 1, "key2": 1, "other": 1}


def _observe(metrics: Metrics, route: str, model: str, provider: str = "up1", i: int = 0) -> None:
    ctx = RequestContext(f"r{i}", path="/v1/chat/completions", client="key0", route=route, provider=provider,
                         model=model, status=200)
    ctx.attempts.append(Attempt(0, provider, model, status=200, ok=True))
    metrics.observe(ctx)


def _local(raw: dict[str, Any]) -> tuple[Metrics, Gateway]:
    """One process's metrics and a real gateway to render them with (contexts fed by hand)."""
    config = build_config(raw, "test")
    services = Services()
    metrics = services.metrics = Metrics(config, services)
    return metrics, Gateway(config, services=services)


def test_a_table_full_of_series_sends_new_routes_and_models_to_other(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past :data:`MAX_SERIES` records a table takes no new route or model: they count as other."""
    from at_gateway.metrics import registry

    monkeypatch.setattr(registry, "MAX_SERIES", 3)
    metrics, gateway = _local(base_config("http://127.0.0.1:9", metrics={"enabled": True}))
    for i in range(10):
        _observe(metrics, f"route-{i}", f"model-{i}", i=i)
    _, s = parse(metrics.render(gateway).decode())
    assert label_values(s, "atg_requests_total", "route") == {"route-0", "route-1", "route-2", "other"}
    assert total(s, "atg_requests_total", route="other") == 7
    assert label_values(s, "atg_attempts_total", "model") == {"model-0", "model-1", "model-2", "other"}
    assert total(s, "atg_attempts_total", model="other", outcome="ok") == 7


def test_distinct_routes_and_models_are_capped_not_only_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records multiply by door, status and key: the values of route and model are capped on their own."""
    from at_gateway.metrics import registry

    monkeypatch.setattr(registry, "MAX_ROUTES", 4)
    monkeypatch.setattr(registry, "MAX_MODELS", 2)
    metrics, gateway = _local(base_config("http://127.0.0.1:9", metrics={"enabled": True}))
    for i in range(10):
        _observe(metrics, f"route-{i}", f"model-{i}", i=i)
    _, s = parse(metrics.render(gateway).decode())
    assert label_values(s, "atg_requests_total", "route") == {"route-0", "route-1", "route-2", "route-3", "other"}
    assert label_values(s, "atg_attempts_total", "model") == {"model-0", "model-1", "other"}
    assert label_values(s, "gen_ai_server_request_duration_count", "gen_ai_response_model") == {
        "model-0", "model-1", "other"}
    assert total(s, "atg_requests_total") == 10 and total(s, "atg_requests_total", route="other") == 6


def test_direct_routes_are_one_route_per_provider_and_their_models_are_capped() -> None:
    """``allow_direct``: a client names ``provider/anything``. Each such request counts under the route
    ``direct:<provider>``, its model among at most :data:`MAX_DIRECT_MODELS` names (then other), so that no
    client can add series at will; a configured route whose name holds a ``/`` keeps its name."""
    from at_gateway.metrics.registry import MAX_DIRECT_MODELS

    pinned = {"name": "up1/pinned", "steps": [{"provider": "up1", "model": "pinned-model"}]}
    metrics, gateway = _local(base_config("http://127.0.0.1:9", [pinned], metrics={"enabled": True},
                                          allow_direct=True))
    for i in range(300):
        _observe(metrics, f'up1/m-{i:05d}-"\\\n<img>', f'm-{i:05d}-"\\\n<img>', i=i)
    for i in range(5):
        _observe(metrics, f"up2/x-{i}", f"x-{i}", provider="up2", i=i)
    _observe(metrics, "up1/pinned", "pinned-model")
    text = metrics.render(gateway).decode()
    _, s = parse(text)
    assert label_values(s, "atg_requests_total", "route") == {"direct:up1", "direct:up2", "up1/pinned"}
    assert total(s, "atg_requests_total", route="direct:up1") == 300
    assert total(s, "atg_requests_total", route="direct:up2") == 5
    assert label_values(s, "gen_ai_server_request_duration_count", "gen_ai_request_model") == {
        "direct:up1", "direct:up2", "up1/pinned"}
    models = label_values(s, "atg_attempts_total", "model")
    assert len(models) == MAX_DIRECT_MODELS + 2 and {"other", "pinned-model"} <= models
    assert total(s, "atg_attempts_total", route="direct:up1", model="other") == 300 - MAX_DIRECT_MODELS
    assert total(s, "atg_attempts_total", route="direct:up2", model="other") == 5  # the cap is full already
    assert label_values(s, "gen_ai_server_request_duration_count", "gen_ai_response_model") == models
    assert len(text) < 2_000_000, len(text)  # ~100 models' series, not 300 (nor 5000)


def test_a_direct_request_through_a_real_gateway_counts_under_its_provider(upstream: MockUpstream) -> None:
    with serving(base_config(upstream.url, metrics={"enabled": True}, allow_direct=True)) as gw:
        for model in ("up1/alpha", "up1/beta", "up2/gamma", "demo"):
            assert chat(gw, model).status_code == 200, model
        s = scrape_until(gw.url, lambda s: total(s, "atg_requests_total") == 4)
    assert label_values(s, "atg_requests_total", "route") == {"direct:up1", "direct:up2", "demo"}
    assert total(s, "atg_requests_total", route="direct:up1", status="2xx") == 2
    assert label_values(s, "atg_attempts_total", "model") == {"alpha", "beta", "gamma", "echo-1"}


OUTCOME_CASES = [
    (Attempt(0, "p", "m", status=200, ok=True), "ok"),
    (Attempt(0, "p", "m", status=200, ok=True, error="upstream stream interrupted"), "stream_error"),
    (Attempt(0, "p", "m", status=500, error="HTTP 500"), "http_error"),
    (Attempt(0, "p", "m", status=429, error="HTTP 429", cooling=1.0), "rate_limited"),
    (Attempt(0, "p", "m", timeout=True, error="timed out after 5s"), "timeout"),
    (Attempt(0, "p", "m", error="cannot connect to 127.0.0.1:9: Connection refused"), "connect_error"),
    (Attempt(0, "p", "m", error="connect to h:443 timed out after 10s"), "connect_error"),
    (Attempt(0, "p", "m", error="invalid HTTP from upstream: bad header"), "upstream_error"),
    (Attempt(0, "p", "m", skipped=True, error="circuit open (for 3.0s more)"), "circuit_open"),
    (Attempt(0, "p", "m", skipped=True, error="circuit half-open (its one probe request is in flight)"),
     "circuit_open"),
    (Attempt(0, "p", "m", skipped=True, cooling=2.0, error="all keys cooling down, next free in 2.0s"), "keys_cooling"),
    (Attempt(0, "p", "m", skipped=True, error="all keys disabled (refused with 401/403 until the next reload)"),
     "keys_disabled"),
    (Attempt(0, "p", "m", error="provider p is at max_concurrency (4 requests in flight) and none finished"), "busy"),
    (Attempt(0, "p", "m", error="cancelled: step 1 answered first (hedge_after)"), "cancelled"),
    (Attempt(0, "p", "m"), "cancelled"),  # still at it when the client left
]


@pytest.mark.parametrize("attempt,outcome", OUTCOME_CASES, ids=[c[1] + str(i) for i, c in enumerate(OUTCOME_CASES)])
def test_attempt_outcomes(attempt: Attempt, outcome: str) -> None:
    from at_gateway.metrics.registry import OUTCOMES, attempt_outcome

    assert attempt_outcome(attempt) == outcome and outcome in OUTCOMES


def test_per_key_false_drops_key_ids_and_the_seed_names_are_off_by_default(upstream: MockUpstream) -> None:
    routes = [{"name": "plain", "limits": {"rpm": 1}, "steps": [{"provider": "up1", "model": "ok"}]}]
    with serving(base_config(upstream.url, routes, metrics={"enabled": True, "per_key": False})) as gw:
        assert chat(gw, "plain").status_code == 200
        assert chat(gw, "plain").status_code == 429
        scrape_until(gw.url, lambda s: total(s, "atg_requests_total") == 2)
        families, s = parse(httpx.get(gw.url + "/metrics").text)
    assert not [n for n in families if n.startswith("atg_key_")]
    assert not [n for n in families if n.startswith("ai_gateway_")]
    assert not any("key" in dict(ls) for (_, ls) in s)
    assert s[("atg_rate_limited_total", frozenset({("limit", "route_rpm")}))] == 1  # a route's own limit


LIMIT_CASES = [  # (the subject, the refusal's limit): a second request of 10 tokens / 10 nano-dollars is refused
    (("key:k", 1, None, None, None, None, None, None), "rpm"),
    (("key:k", None, 1, None, None, None, None, None), "rph"),
    (("key:k", None, None, 1, None, None, None, None), "rpd"),
    (("key:k", None, None, None, 10, None, None, None), "tpm"),
    (("key:k", None, None, None, None, 10, None, None), "tpd"),
    (("key:k", None, None, None, None, None, 10, "day"), "budget"),
    (("route:r", 1, None, None, None, None, None, None), "route_rpm"),
    (("route:r", None, None, None, 10, None, None, None), "route_tpm"),
]


@pytest.mark.parametrize("subject,limit", LIMIT_CASES, ids=[c[1] for c in LIMIT_CASES])
def test_a_refusal_names_the_limit_that_refused(subject: tuple[Any, ...], limit: str) -> None:
    from at_gateway.limits.base import LimitState

    state = LimitState("UTC", clock=lambda: 1000.0, wall=lambda: 1_800_000_000.0)
    assert state.admit([subject], 10, 10)[0]
    refused = state.admit([subject], 10, 10)
    assert refused[0] == 0 and refused[5] == limit


# -- auth, 404 when off, base_path ---------------------------------------------------------------------------------
def basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


PASSWORD = "metrics-pass-1234"
BASIC_AND_ADMIN = {"metrics": {"enabled": True, "username": "prom", "password": PASSWORD}, "admin_token": ADMIN}
ADMIN_ONLY = {"metrics": {"enabled": True}, "admin_token": ADMIN}
OPEN = {"metrics": {"enabled": True}}
AUTH_CASES = [
    ("basic, right", BASIC_AND_ADMIN, basic("prom", PASSWORD), 200, None),
    ("basic, wrong password", BASIC_AND_ADMIN, basic("prom", PASSWORD + "x"), 401, "Basic"),
    ("basic, wrong user", BASIC_AND_ADMIN, basic("prometheus", PASSWORD), 401, "Basic"),
    ("basic, not base64", BASIC_AND_ADMIN, {"authorization": "Basic %%%"}, 401, "Basic"),
    ("nothing sent", BASIC_AND_ADMIN, {}, 401, "Basic"),
    ("the admin token as bearer", BASIC_AND_ADMIN, {"authorization": "Bearer " + ADMIN}, 200, None),
    ("a wrong bearer", BASIC_AND_ADMIN, {"authorization": "Bearer " + ADMIN + "x"}, 401, "Basic"),
    ("the gateway key is not a metrics credential", BASIC_AND_ADMIN, {"authorization": "Bearer " + GATEWAY_KEY},
     401, "Basic"),
    ("admin token only: bearer", ADMIN_ONLY, {"authorization": "Bearer " + ADMIN}, 200, None),
    ("admin token only: nothing", ADMIN_ONLY, {}, 401, "Bearer"),
    ("admin token only: basic is no admin token", ADMIN_ONLY, basic("prom", ADMIN), 401, "Bearer"),
    ("neither: open", OPEN, {}, 200, None),
]


@pytest.mark.parametrize("name,top,headers,status,scheme", AUTH_CASES, ids=[c[0] for c in AUTH_CASES])
def test_metrics_auth(upstream: MockUpstream, name: str, top: dict[str, Any], headers: dict[str, str], status: int,
                      scheme: str | None) -> None:
    with serving(base_config(upstream.url, **top)) as gw:
        r = httpx.get(gw.url + "/metrics", headers=headers)
    assert r.status_code == status, r.text
    if status == 401:
        assert r.headers["www-authenticate"].startswith(scheme + ' realm="at-gateway metrics"')
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and PASSWORD not in r.text and ADMIN not in r.text
    else:
        assert "# TYPE atg_requests_total counter" in r.text


def test_metrics_off_is_404_and_base_path_applies(upstream: MockUpstream) -> None:
    with serving(base_config(upstream.url)) as gw:
        r = httpx.get(gw.url + "/metrics")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    assert "metrics.enabled" in r.json()["error"]["message"]
    with serving(base_config(upstream.url, base_path="/llm", metrics={"enabled": True})) as gw:
        assert httpx.get(gw.url + "/metrics").status_code == 404
        assert "# TYPE atg_requests_total counter" in httpx.get(gw.url + "/llm/metrics").text
        assert httpx.post(gw.url + "/llm/metrics").status_code == 405


# -- the Grafana dashboard ---------------------------------------------------------------------------------------
def test_the_grafana_dashboard_uses_only_metrics_the_gateway_exports(upstream: MockUpstream) -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    # every metric in the dashboard's queries is written with a selector or a range: name{...} or name[...]
    used = {m for e in exprs for m in re.findall(r"\b([a-z_]+)(?=[{\[])", e)}
    with serving(base_config(upstream.url, metrics={"enabled": True})) as gw:
        families, _ = parse(httpx.get(gw.url + "/metrics").text)
    exported = set()
    for name, f in families.items():
        exported |= {name, name + "_total"} if f.type == "counter" else {name}
        if f.type == "histogram":
            exported |= {name + "_bucket", name + "_sum", name + "_count"}
    assert len(used) >= 12 and used <= exported, used - exported
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
