"""What every front door shares (at_gateway/doors): the paths, the key, the route, a client key's rules,
the error shapes, the request log. Each door's own format is tested in tests/test_door_<name>.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import anthropic
import httpx
import openai
import pytest

from at_gateway.store import db
from at_gateway.store.keys import KeyStore
from tests.conftest import GATEWAY_KEY, RunningGateway, base_config, run_gateway
from tests.mock_upstream import MockUpstream, Reply, chat_completion
from tests.test_keys import keyed_gateway

ROUTES = [
    {"name": "gpt", "steps": [{"provider": "up1", "model": "gpt-4o-mini"}]},
    {"name": "other", "steps": [{"provider": "up2", "model": "gpt-4o"}]},
    {"name": "emb", "steps": [{"provider": "up1", "model": "text-embedding-3-small"}]},
    {"name": "legacy", "steps": [{"provider": "up1", "model": "gpt-3.5-turbo-instruct"}]},
    {"name": "llama3:8b", "steps": [{"provider": "up1", "model": "gpt-4o-mini"}]},
]
UPSTREAM_KEYS = ("sk-upstream-secret-1", "sk-upstream-secret-2")


def _anthropic_error(j: Any, status: int) -> bool:
    return j["type"] == "error" and isinstance(j["error"]["type"], str) and isinstance(j["error"]["message"], str)


def _openai_error(j: Any, status: int) -> bool:
    return isinstance(j["error"]["message"], str) and isinstance(j["error"]["type"], str)


def _gemini_error(j: Any, status: int) -> bool:
    err = j["error"]
    return err["code"] == status and isinstance(err["message"], str) and err["status"].isupper()


class DoorCase(NamedTuple):
    name: str
    path: Callable[[str], str]  # the path for a model (route) name
    body: Callable[[str], dict[str, Any]]
    shaped: Callable[[Any, int], bool]  # is this error body in the door's own shape
    route: str  # a route that serves it


DOORS = [
    DoorCase("anthropic", lambda m: "/v1/messages",
             lambda m: {"model": m, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
             _anthropic_error, "gpt"),
    DoorCase("responses", lambda m: "/v1/responses", lambda m: {"model": m, "input": "hi", "store": False},
             _openai_error, "gpt"),
    DoorCase("gemini", lambda m: f"/v1beta/models/{m}:generateContent",
             lambda m: {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}, _gemini_error, "gpt"),
    DoorCase("embeddings", lambda m: "/v1/embeddings", lambda m: {"model": m, "input": "hi"}, _openai_error, "emb"),
    DoorCase("completions", lambda m: "/v1/completions", lambda m: {"model": m, "prompt": "hi", "max_tokens": 5},
             _openai_error, "legacy"),
]
IDS = [d.name for d in DOORS]


def _answers(upstream: MockUpstream) -> None:
    """The mock's answer per upstream model: a chat completion, embeddings, a legacy completion."""
    upstream.replies["gpt-4o-mini"] = Reply(body=chat_completion("hello there", model="gpt-4o-mini"))
    upstream.replies["text-embedding-3-small"] = Reply(body={
        "object": "list", "model": "text-embedding-3-small",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 1.0]}],
        "usage": {"prompt_tokens": 1, "total_tokens": 1}})
    upstream.replies["gpt-3.5-turbo-instruct"] = Reply(body={
        "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "gpt-3.5-turbo-instruct",
        "choices": [{"index": 0, "text": " there", "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


@pytest.fixture
def gw(upstream: MockUpstream) -> Any:
    _answers(upstream)
    with run_gateway(base_config(upstream.url, routes=ROUTES)) as running:
        yield running


def post(gw: RunningGateway, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    h = {"x-api-key": GATEWAY_KEY} if headers is None else headers
    return httpx.post(gw.url + path, json=body, headers=h, timeout=10)


@pytest.mark.parametrize("door", DOORS, ids=IDS)
def test_every_door_serves_a_route_and_the_log_names_the_door(gw: RunningGateway, upstream: MockUpstream,
                                                               door: DoorCase) -> None:
    r = post(gw, door.path(door.route), door.body(door.route))
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-route"] == door.route and r.headers["x-gateway-provider"] == "up1"
    assert r.headers["x-request-id"]
    sent = upstream.received[-1]
    assert sent.headers["authorization"] == "Bearer sk-upstream-secret-1"
    line = gw.request_logs()[-1]
    assert line["door"] == door.name and line["status"] == 200 and line["route"] == door.route
    assert line["tokens"]["prompt_tokens"] >= 1, line  # usage is accounted whatever the door
    for secret in UPSTREAM_KEYS:
        assert secret not in r.text and secret not in gw.logs.getvalue()


@pytest.mark.parametrize("door", DOORS, ids=IDS)
@pytest.mark.parametrize("headers, why", [
    ({}, "no key"),
    ({"x-api-key": "wrong-key"}, "wrong key"),
    ({"authorization": "Bearer " + GATEWAY_KEY[:-1]}, "near miss"),
])
def test_a_missing_or_wrong_key_is_401_in_the_doors_shape(gw: RunningGateway, upstream: MockUpstream,
                                                          door: DoorCase, headers: dict[str, str], why: str) -> None:
    r = post(gw, door.path(door.route), door.body(door.route), headers)
    assert r.status_code == 401, (why, r.text)
    assert door.shaped(r.json(), 401), r.text
    assert upstream.received == []


@pytest.mark.parametrize("door", DOORS, ids=IDS)
def test_an_unknown_model_is_404_in_the_doors_shape(gw: RunningGateway, upstream: MockUpstream,
                                                    door: DoorCase) -> None:
    r = post(gw, door.path("no-such-route"), door.body("no-such-route"))
    assert r.status_code == 404, r.text
    assert door.shaped(r.json(), 404) and "no-such-route" in r.text
    assert upstream.received == []


@pytest.mark.parametrize("door", DOORS, ids=IDS)
@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"'])
def test_a_body_that_is_not_a_json_object_is_400_in_the_doors_shape(gw: RunningGateway, upstream: MockUpstream,
                                                                    door: DoorCase, raw: bytes) -> None:
    r = httpx.post(gw.url + door.path(door.route), content=raw,
                   headers={"x-api-key": GATEWAY_KEY, "content-type": "application/json"}, timeout=10)
    assert r.status_code == 400, r.text
    assert door.shaped(r.json(), 400), r.text
    assert upstream.received == []


@pytest.mark.parametrize("door", DOORS, ids=IDS)
def test_get_on_a_door_is_405_with_allow_in_the_doors_shape(gw: RunningGateway, door: DoorCase) -> None:
    r = httpx.get(gw.url + door.path(door.route), headers={"x-api-key": GATEWAY_KEY}, timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert door.shaped(r.json(), 405), r.text


@pytest.mark.parametrize("door", DOORS, ids=IDS)
def test_every_step_failing_is_an_error_in_the_doors_shape(upstream: MockUpstream, door: DoorCase) -> None:
    routes = [{"name": "down", "steps": [{"provider": "up1", "model": "broken-a"},
                                         {"provider": "up2", "model": "broken-b"}]}]
    upstream.replies["broken-a"] = Reply(status=500, body={"error": {"message": "boom a", "type": "server_error"}})
    upstream.replies["broken-b"] = Reply(status=502, body={"error": {"message": "boom b", "type": "server_error"}})
    with run_gateway(base_config(upstream.url, routes=routes)) as gw:
        r = post(gw, door.path("down"), door.body("down"))
        assert r.status_code >= 500, r.text
        assert door.shaped(r.json(), r.status_code), r.text
        assert [rec.json["model"] for rec in upstream.received] == ["broken-a", "broken-b"]
        assert r.headers["x-gateway-attempts"] == "2"


@pytest.mark.parametrize("how", ["x-goog-api-key", "query"])
def test_gemini_takes_the_key_its_own_ways(gw: RunningGateway, how: str) -> None:
    door = DOORS[IDS.index("gemini")]
    path = door.path("gpt")
    if how == "query":
        r = httpx.post(gw.url + path + "?key=" + GATEWAY_KEY, json=door.body("gpt"), timeout=10)
        bad = httpx.post(gw.url + path + "?key=wrong-" + GATEWAY_KEY, json=door.body("gpt"), timeout=10)
    else:
        r = post(gw, path, door.body("gpt"), {"x-goog-api-key": GATEWAY_KEY})
        bad = post(gw, path, door.body("gpt"), {"x-goog-api-key": "wrong"})
    assert r.status_code == 200, r.text
    assert bad.status_code == 401 and _gemini_error(bad.json(), 401)
    # a key in the query never reaches the log: the log keeps the path only
    assert GATEWAY_KEY not in gw.logs.getvalue()


def test_the_other_doors_do_not_take_googles_key_spellings(gw: RunningGateway) -> None:
    door = DOORS[IDS.index("anthropic")]
    r = post(gw, door.path("gpt"), door.body("gpt"), {"x-goog-api-key": GATEWAY_KEY})
    assert r.status_code == 401 and _anthropic_error(r.json(), 401)


def test_models_list_reads_as_openai_and_as_anthropic(gw: RunningGateway) -> None:
    names = [r["name"] for r in ROUTES]
    oa = openai.OpenAI(api_key=GATEWAY_KEY, base_url=gw.url + "/v1", max_retries=0)
    assert [m.id for m in oa.models.list()] == names
    an = anthropic.Anthropic(api_key=GATEWAY_KEY, base_url=gw.url, max_retries=0)
    page = an.models.list()
    assert [m.id for m in page.data] == names
    assert all(m.type == "model" and m.display_name == m.id for m in page.data)
    raw = httpx.get(gw.url + "/v1/models", headers={"x-api-key": GATEWAY_KEY}, timeout=10).json()
    for m in raw["data"]:  # strictly Anthropic's ModelInfo too (required fields included)
        anthropic.types.ModelInfo.model_validate(m, strict=False)
        assert m["lifecycle"] == "active"
    assert page.has_more is False and page.first_id == names[0] and page.last_id == names[-1]


def test_a_route_named_with_a_colon_is_still_a_model_and_a_gemini_model(gw: RunningGateway) -> None:
    got = httpx.get(gw.url + "/v1/models/llama3:8b", headers={"x-api-key": GATEWAY_KEY}, timeout=10)
    assert got.status_code == 200 and got.json()["id"] == "llama3:8b"
    door = DOORS[IDS.index("gemini")]
    r = post(gw, "/v1/models/llama3:8b:generateContent", door.body("llama3:8b"))
    assert r.status_code == 200 and r.headers["x-gateway-route"] == "llama3:8b", r.text


def test_doors_live_under_base_path(upstream: MockUpstream) -> None:
    _answers(upstream)
    with run_gateway(base_config(upstream.url, routes=ROUTES, base_path="/llm")) as gw:
        for door in DOORS:
            assert post(gw, "/llm" + door.path(door.route), door.body(door.route)).status_code == 200, door.name
            assert post(gw, door.path(door.route), door.body(door.route)).status_code == 404, door.name


# -- a client key's rules hold at every door --------------------------------------------------------------

def _key(tmp_path: Path, **settings: Any) -> str:
    conn = db.connect(str(tmp_path / "gw.db"))
    try:
        return KeyStore(conn).create("door-key", **settings)[1]
    finally:
        conn.close()


@pytest.mark.parametrize("door", DOORS, ids=IDS)
def test_a_client_key_may_use_only_its_routes_at_every_door(upstream: MockUpstream, tmp_path: Path,
                                                            door: DoorCase) -> None:
    _answers(upstream)
    key = _key(tmp_path, routes=["other"])
    raw = base_config(upstream.url, routes=ROUTES, store={"path": str(tmp_path / "gw.db")})
    with keyed_gateway(raw) as gw:
        r = post(gw, door.path(door.route), door.body(door.route), {"authorization": "Bearer " + key})
        assert r.status_code == 403, r.text
        assert door.shaped(r.json(), 403), r.text
        assert upstream.received == []


def test_a_client_keys_system_prompt_and_cap_reach_the_upstream_through_the_anthropic_door(
        upstream: MockUpstream, tmp_path: Path) -> None:
    _answers(upstream)
    key = _key(tmp_path, system_prompt="Be brief.", max_tokens=8)
    raw = base_config(upstream.url, routes=ROUTES, store={"path": str(tmp_path / "gw.db")})
    with keyed_gateway(raw) as gw:
        r = post(gw, "/v1/messages", {"model": "gpt", "max_tokens": 500, "system": "Mine.",
                                      "messages": [{"role": "user", "content": "hi"}]},
                 {"x-api-key": key})
        assert r.status_code == 200, r.text
        sent = upstream.received[-1].json
        assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
        assert json.dumps(sent["messages"][1]).find("Mine.") >= 0
        assert sent.get("max_tokens", sent.get("max_completion_tokens")) == 8


@pytest.mark.parametrize("method, path", [("POST", "/v1beta/models/gpt:embedContent"), ("GET", "/v1beta/models"),
                                          ("GET", "/v1beta/models/gpt"), ("POST", "/v1beta/files")])
def test_other_gemini_paths_are_a_google_shaped_404(gw: RunningGateway, upstream: MockUpstream, method: str,
                                                    path: str) -> None:
    r = httpx.request(method, gw.url + path, headers={"x-goog-api-key": GATEWAY_KEY}, timeout=10,
                      json={} if method == "POST" else None)
    assert r.status_code == 404 and _gemini_error(r.json(), 404), r.text
    assert upstream.received == []
    bad = httpx.request(method, gw.url + path, timeout=10)  # the key first: a 401 says nothing about paths
    assert bad.status_code == 401 and _gemini_error(bad.json(), 401)


def test_a_warning_that_would_end_in_a_space_is_still_sent(gw: RunningGateway) -> None:
    # The warning names what translation dropped, in the client's own words: a name ending in a space (or a cut
    # at 512 bytes landing on one) must not make the answer unsendable (h11 refuses a header value ending in
    # whitespace), after the upstream was already paid.
    body = {"model": "gpt", "input": "hi", "store": False,
            "tools": [{"type": "web_search "}, *[{"type": f"builtin_{i} "} for i in range(60)]]}
    r = post(gw, "/v1/responses", body)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200:
        warning = r.headers.get("x-gateway-warning", "")
        assert warning == warning.strip() and len(warning) <= 512


def test_a_bug_at_a_door_is_a_500_in_the_doors_shape(gw: RunningGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    # Not our network layer: a door's parse made to fail as a bug would (an exception that is no GatewayError).
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(gw.gateway.doors["anthropic"], "parse", broken)
    r = post(gw, "/v1/messages", {"model": "gpt", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 500 and _anthropic_error(r.json(), 500), r.text
    assert "a bug" not in r.text and "Traceback" not in r.text
    assert "unhandled error in handler" in gw.logs.getvalue()
