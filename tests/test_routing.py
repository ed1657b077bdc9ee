"""Routes and fallback, through the official openai SDK against a real mock upstream."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GATEWAY_KEY, base_config, run_gateway
from tests.mock_upstream import MockUpstream, Reply, chat_completion, chunk, stream_of

FALLBACK_ROUTE = [{"name": "r", "steps": [
    {"provider": "up1", "model": "first", "timeout": "1s"},
    {"provider": "up2", "model": "second", "timeout": "5s"},
]}]


def sdk(gw: Any, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=20, **kw)


FIRST_STEP_FAILURES = {
    "500": Reply(status=500, body={"error": {"message": "boom", "type": "server_error"}}),
    "429": Reply(status=429, body={"error": {"message": "slow down", "type": "rate_limit"}}),
    "timeout": Reply(delay=3, body=chat_completion("late")),
    "garbage": Reply(body=b"<html>not json</html>"),
    "not-a-completion": Reply(body={"object": "list", "data": []}),
    "reset": Reply(reset=True),
    "truncated": Reply(body=chat_completion("cut"), truncate=True),
}


@pytest.mark.parametrize("failure", sorted(FIRST_STEP_FAILURES))
def test_non_stream_falls_through_to_second_step(upstream: MockUpstream, failure: str) -> None:
    upstream.replies["first"] = FIRST_STEP_FAILURES[failure]
    upstream.replies["second"] = Reply(body=chat_completion("from step 2"))
    with run_gateway(base_config(upstream.url, FALLBACK_ROUTE)) as gw:
        raw = sdk(gw).chat.completions.with_raw_response.create(
            model="r", messages=[{"role": "user", "content": "hi"}])
        assert raw.headers["x-gateway-attempts"] == "2"
        assert raw.headers["x-gateway-provider"] == "up2"
        assert raw.headers["x-gateway-model"] == "second"
        assert raw.headers["x-gateway-route"] == "r"
        assert raw.parse().choices[0].message.content == "from step 2"


STREAM_FAILURES = {
    **FIRST_STEP_FAILURES,
    "sse-error-first": Reply(sse=[{"error": {"message": "overloaded"}}]),
    "sse-empty": Reply(sse=[], done=False),
    "sse-reset-before-first": Reply(sse=[chunk("x")], reset_after=0),
    "sse-garbage": Reply(sse=["not json"]),
}


@pytest.mark.parametrize("failure", sorted(STREAM_FAILURES))
def test_stream_falls_through_before_first_chunk(upstream: MockUpstream, failure: str) -> None:
    upstream.replies["first"] = STREAM_FAILURES[failure]
    upstream.replies["second"] = Reply(sse=stream_of("from", " two"))
    with run_gateway(base_config(upstream.url, FALLBACK_ROUTE)) as gw:
        with sdk(gw).chat.completions.with_streaming_response.create(
                model="r", stream=True, messages=[{"role": "user", "content": "hi"}]) as resp:
            assert resp.headers["x-gateway-attempts"] == "2"
            assert resp.headers["x-gateway-provider"] == "up2"
            text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
        assert text == "from two"


def test_refused_connection_falls_through(upstream: MockUpstream) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()  # nothing listens there now
    cfg = base_config(upstream.url, FALLBACK_ROUTE)
    cfg["providers"][0]["base_url"] = dead
    upstream.replies["second"] = Reply(body=chat_completion("ok"))
    with run_gateway(cfg) as gw:
        raw = sdk(gw).chat.completions.with_raw_response.create(model="r", messages=[{"role": "user", "content": "x"}])
        assert raw.headers["x-gateway-attempts"] == "2"
        assert raw.parse().choices[0].message.content == "ok"


def test_all_steps_failed_gives_502_with_attempts(upstream: MockUpstream) -> None:
    upstream.replies["first"] = Reply(status=500, body={"error": {"message": "bad sk-abcdefghijklmnop key"}})
    upstream.replies["second"] = Reply(status=503, body="down for maintenance")
    with run_gateway(base_config(upstream.url, FALLBACK_ROUTE)) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "r", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 502
        err = r.json()["error"]
        assert err["type"] == "upstream_error" and err["code"] == "all_steps_failed"
        assert [(a["step"], a["provider"], a["model"], a["status"]) for a in err["attempts"]] == [
            (0, "up1", "first", 500), (1, "up2", "second", 503)]
        assert "sk-abcdefghijklmnop" not in r.text and "[REDACTED]" in err["attempts"][0]["error"]
        assert r.headers["x-gateway-attempts"] == "2"
        with pytest.raises(openai.APIStatusError) as exc:
            sdk(gw).chat.completions.create(model="r", messages=[{"role": "user", "content": "x"}])
        assert exc.value.status_code == 502


def test_same_4xx_everywhere_is_passed_on(upstream: MockUpstream) -> None:
    bad = Reply(status=400, body={"error": {"message": "messages: bad role", "type": "invalid_request_error",
                                            "code": "invalid_value"}})
    upstream.replies["first"] = bad
    upstream.replies["second"] = bad
    with run_gateway(base_config(upstream.url, FALLBACK_ROUTE)) as gw:
        with pytest.raises(openai.BadRequestError) as exc:
            sdk(gw).chat.completions.create(model="r", messages=[{"role": "user", "content": "x"}])
        assert "bad role" in str(exc.value)
        assert exc.value.body["code"] == "invalid_value"


def test_all_stream_steps_failed_is_502_json(upstream: MockUpstream) -> None:
    upstream.replies["first"] = Reply(status=500, body={"error": {"message": "a"}})
    upstream.replies["second"] = Reply(sse=[], done=False)
    with run_gateway(base_config(upstream.url, FALLBACK_ROUTE)) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 502
        assert len(r.json()["error"]["attempts"]) == 2


def test_body_passes_through_with_model_replaced(upstream: MockUpstream) -> None:
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "real-model"}]}]
    with run_gateway(base_config(upstream.url, route)) as gw:
        body = {"model": "r", "messages": [{"role": "user", "content": "x"}], "temperature": 0.3,
                "some_vendor_field": {"nested": [1, 2]}, "user": "u1"}
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"authorization": f"Bearer {GATEWAY_KEY}"}, json=body)
        assert r.status_code == 200
        got = upstream.received[-1]
        assert got.path == "/chat/completions"
        assert got.headers["authorization"] == "Bearer sk-upstream-secret-1"
        assert got.json == {**body, "model": "real-model"}


@pytest.mark.parametrize(("mode", "dropped", "kept"), [
    ("tools", {"response_format"}, {"tools", "tool_choice", "parallel_tool_calls"}),
    ("format", {"tools", "tool_choice", "parallel_tool_calls"}, {"response_format"}),
])
def test_conflict_resolution(upstream: MockUpstream, mode: str, dropped: set[str], kept: set[str]) -> None:
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "m", "conflict_resolution": mode}]}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with run_gateway(base_config(upstream.url, route)) as gw:
        both = {"model": "r", "messages": [{"role": "user", "content": "x"}], "tools": tools,
                "tool_choice": "auto", "parallel_tool_calls": True, "response_format": {"type": "json_object"}}
        httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY}, json=both)
        sent = upstream.received[-1].json
        assert not dropped & set(sent) and kept <= set(sent)
        # Only one of the two: nothing is dropped.
        only_tools = {k: v for k, v in both.items() if k != "response_format"}
        httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY}, json=only_tools)
        assert set(upstream.received[-1].json) == {*only_tools} - {"model"} | {"model"}


def test_unknown_model_is_404(upstream: MockUpstream) -> None:
    with run_gateway(base_config(upstream.url)) as gw:
        with pytest.raises(openai.NotFoundError) as exc:
            sdk(gw).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        assert exc.value.body["code"] == "model_not_found"


def test_stream_passes_chunks_through_and_ends_with_done(upstream: MockUpstream) -> None:
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "m"}]}]
    upstream.replies["m"] = Reply(sse=stream_of("a", "b", "c"))
    with run_gateway(base_config(upstream.url, route)) as gw:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                          json={"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
            assert r.headers["content-type"] == "text/event-stream"
            body = r.read()
        events = [e for e in body.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        # Upstream was asked for usage; the client was not, so the usage-only chunk is dropped.
        assert upstream.received[-1].json["stream_options"] == {"include_usage": True}
        assert all(b'"usage"' not in e for e in events)
        sent = [json.loads(e[6:]) for e in events[:-1]]
        assert [c["choices"][0]["delta"].get("content") for c in sent] == ["", "a", "b", "c", None]
        # the request log got the usage anyway
        line = gw.request_logs()[-1]
        assert line["tokens"]["total_tokens"] == 5


def test_stream_usage_when_client_asks(upstream: MockUpstream) -> None:
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "m"}]}]
    upstream.replies["m"] = Reply(sse=stream_of("a"))
    with run_gateway(base_config(upstream.url, route)) as gw:
        stream = sdk(gw).chat.completions.create(model="r", stream=True, stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "x"}])
        chunks = list(stream)
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 3


def test_mid_stream_failure_is_an_error_event_without_done(upstream: MockUpstream) -> None:
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "m"}, {"provider": "up2", "model": "n"}]}]
    upstream.replies["m"] = Reply(sse=stream_of("a", "b", "c"), reset_after=2)
    with run_gateway(base_config(upstream.url, route)) as gw:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                          json={"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
            body = r.read()
        assert b"[DONE]" not in body
        last = json.loads(body.strip().split(b"\n\n")[-1][6:])
        assert last["error"]["code"] == "stream_interrupted"
        assert len([x for x in upstream.received if x.json["model"] == "n"]) == 0  # no fallback after first chunk
        # the SDK raises instead of reporting a clean finish
        with pytest.raises(openai.APIError):
            for _ in sdk(gw).chat.completions.create(model="r", stream=True,
                                                     messages=[{"role": "user", "content": "x"}]):
                pass


def test_stream_without_done_or_finish_is_broken(upstream: MockUpstream) -> None:
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "m"}]}]
    upstream.replies["m"] = Reply(sse=[chunk("", role=True), chunk("a")], done=False)
    with run_gateway(base_config(upstream.url, route)) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]})
        assert b"[DONE]" not in r.content and b"stream_interrupted" in r.content


def test_stream_idle_timeout(upstream: MockUpstream) -> None:
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "m"}]}]
    upstream.replies["m"] = Reply(sse=stream_of("a", "b"), sse_delay=1.0)
    with run_gateway(base_config(upstream.url, route, stream_idle_timeout="0.2s")) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]})
        assert b"stream_idle_timeout" in r.content and b"[DONE]" not in r.content


def test_keepalive_comments_while_waiting_for_first_chunk(upstream: MockUpstream) -> None:
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "m", "timeout": "5s"}]}]
    upstream.replies["m"] = Reply(sse=stream_of("late"), delay=0.5)
    with run_gateway(base_config(upstream.url, route, stream_keepalive_interval="0.1s")) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]})
        assert r.content.startswith(b": keep-alive\n\n")
        assert r.content.endswith(b"data: [DONE]\n\n")


def test_request_id_echoed_and_generated(upstream: MockUpstream) -> None:
    with run_gateway(base_config(upstream.url)) as gw:
        h = {"x-api-key": GATEWAY_KEY}
        body = {"model": "demo", "messages": [{"role": "user", "content": "x"}]}
        r1 = httpx.post(gw.url + "/v1/chat/completions", headers={**h, "x-request-id": "abc-123"}, json=body)
        r2 = httpx.post(gw.url + "/v1/chat/completions", headers=h, json=body)
        r3 = httpx.get(gw.url + "/v1/models")
        assert r1.headers["x-request-id"] == "abc-123"
        assert len(r2.headers["x-request-id"]) >= 16
        assert r3.status_code == 401 and r3.headers["x-request-id"]
