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


def test_stream_502_carries_the_gateway_headers(upstream: MockUpstream) -> None:
    upstream.replies["first"] = Reply(status=500, body={"error": {"message": "a"}})
    upstream.replies["second"] = Reply(status=503, body={"error": {"message": "b"}})
    with run_gateway(base_config(upstream.url, FALLBACK_ROUTE)) as gw:
        for stream in (False, True):
            r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                           json={"model": "r", "stream": stream, "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 502
            assert (r.headers["x-gateway-route"], r.headers["x-gateway-provider"], r.headers["x-gateway-model"],
                    r.headers["x-gateway-attempts"]) == ("r", "up2", "second", "2"), stream


@pytest.mark.parametrize("replies", [
    [Reply(status=400, body={"error": {"message": "bad"}}), Reply(status=404, body={"error": {"message": "nope"}})],
    [Reply(status=400, body={"error": {"message": "bad"}}), Reply(status=500, body={"error": {"message": "boom"}})],
    [Reply(status=400, body={"error": {"message": "bad"}}), Reply(reset=True)],
])
def test_different_failures_are_502_not_a_4xx(upstream: MockUpstream, replies: list[Reply]) -> None:
    upstream.replies["first"], upstream.replies["second"] = replies
    with run_gateway(base_config(upstream.url, FALLBACK_ROUTE)) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "r", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "all_steps_failed"


def test_malformed_usage_chunk_mid_stream_is_an_error_event(upstream: MockUpstream) -> None:
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "m"}]}]
    upstream.replies["m"] = Reply(sse=[chunk("", role=True), chunk("a"), b'data: {"usage": {"total_tokens": 1}, x\n\n'])
    with run_gateway(base_config(upstream.url, route)) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]})
        assert b"[DONE]" not in r.content
        last = json.loads(r.content.strip().split(b"\n\n")[-1][6:])
        assert last["error"]["code"] == "stream_interrupted" and "not JSON" in last["error"]["message"]
        assert "unhandled" not in gw.logs.getvalue()


def test_configured_keys_are_redacted_by_value(upstream: MockUpstream) -> None:
    """A key with no token shape (no sk-, no Bearer) is still never repeated: not in the 502, not in the log."""
    plain = "plainUpstreamKeyValue42"
    cfg = base_config(upstream.url, FALLBACK_ROUTE)
    cfg["providers"][0]["api_key"] = plain
    upstream.replies["first"] = Reply(status=401, body={"error": {"message": f"key {plain} was revoked"}})
    # A non-JSON body cut for quoting: the key straddles the cut, and not even its start may leak.
    upstream.replies["second"] = Reply(status=403, body="x" * 279 + f" {plain} rejected")
    with run_gateway(cfg) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "r", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 502
        assert plain[:6] not in r.text and "[REDACTED]" in r.json()["error"]["attempts"][0]["error"]
        log = json.dumps(gw.request_logs()[-1])
        assert plain[:6] not in log and "[REDACTED]" in log


def test_keepalive_then_all_steps_fail_is_an_error_event_without_done(upstream: MockUpstream) -> None:
    upstream.replies["first"] = Reply(status=500, body={"error": {"message": "a"}}, delay=0.3)
    upstream.replies["second"] = Reply(status=503, body={"error": {"message": "b"}})
    with run_gateway(base_config(upstream.url, FALLBACK_ROUTE, stream_keepalive_interval="0.05s")) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200  # the answer had started: the failure can only be an event now
        assert r.content.startswith(b": keep-alive\n\n") and b"[DONE]" not in r.content
        last = json.loads(r.content.strip().split(b"\n\n")[-1][6:])
        assert last["error"]["code"] == "all_steps_failed" and len(last["error"]["attempts"]) == 2


def test_keepalive_then_second_step_answers(upstream: MockUpstream) -> None:
    upstream.replies["first"] = Reply(status=500, body={"error": {"message": "a"}}, delay=0.3)
    upstream.replies["second"] = Reply(sse=stream_of("two"))
    with run_gateway(base_config(upstream.url, FALLBACK_ROUTE, stream_keepalive_interval="0.05s")) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]})
        assert r.content.startswith(b": keep-alive\n\n") and r.content.endswith(b"data: [DONE]\n\n")
        assert b'"two"' in r.content
        assert gw.request_logs()[-1]["provider"] == "up2"


def test_every_step_429_passes_429_on_and_every_timeout_is_504(upstream: MockUpstream) -> None:
    upstream.replies["first"] = Reply(status=429, body={"error": {"message": "slow down"}})
    upstream.replies["second"] = Reply(status=429, body={"error": {"message": "slow down too"}})
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "first"}, {"provider": "up2", "model": "second"}]},
             {"name": "t", "steps": [{"provider": "slow1", "model": "late", "timeout": "0.1s"},
                                     {"provider": "slow2", "model": "late", "timeout": "0.1s"}]}]
    upstream.replies["late"] = Reply(delay=2, body=chat_completion("late"))
    cfg = base_config(upstream.url, route)
    cfg["providers"] += [{"name": n, "type": "openai", "base_url": upstream.url, "api_key": f"sk-{n}-key"}
                         for n in ("slow1", "slow2")]
    with run_gateway(cfg) as gw:
        msgs = [{"role": "user", "content": "x"}]
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "r", "messages": msgs})
        assert r.status_code == 429
        assert r.json()["error"]["type"] == "rate_limit_error" and len(r.json()["error"]["attempts"]) == 2
        assert r.json()["error"]["code"] == "upstream_rate_limited" and r.headers["retry-after"] == "1"
        # The keys rest (cooldown.initial, 1s): the next request fails at once, without asking upstream.
        sent = len(upstream.received)
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "r", "messages": msgs})
        assert r.status_code == 429 and len(upstream.received) == sent
        assert "all keys cooling down" in r.json()["error"]["attempts"][0]["error"]
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "t", "messages": msgs})
        assert r.status_code == 504
        err = r.json()["error"]
        assert err["code"] == "all_steps_timed_out" and [a["status"] for a in err["attempts"]] == [None, None]


def test_an_adapter_bug_is_a_failed_step_not_a_500(upstream: MockUpstream) -> None:
    """An exception an adapter did not foresee fails its step; the next step answers."""
    from at_gateway.providers.base import Completion, Provider

    class Broken(Provider):
        async def complete(self, body: dict[str, Any], step: Any) -> Completion:
            raise RuntimeError("a bug with sk-secretsecretsecret inside")

        async def stream(self, body: dict[str, Any], step: Any, state: Any) -> Any:
            raise RuntimeError("a bug")
            yield b""  # an async generator

    route = [{"name": "r", "steps": [{"provider": "up1", "model": "m"}, {"provider": "echo", "model": "e"}]}]
    with run_gateway(base_config(upstream.url, route)) as gw:
        gw.gateway.targets["up1"].adapters[0] = Broken(gw.gateway.config.providers["up1"], gw.gateway.client)
        for stream in (False, True):
            r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                           json={"model": "r", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and r.headers["x-gateway-attempts"] == "2"
            assert r.headers["x-gateway-provider"] == "echo"
            line = gw.request_logs(2 if stream else 1)[-1]
            assert line["failed_attempts"][0]["error"] == "internal error in the up1 adapter (RuntimeError)"
        logs = gw.logs.getvalue()
        assert "provider up1 raised" in logs and "sk-secretsecretsecret" not in logs


def test_an_internal_error_is_logged_as_500_not_as_a_disconnect(upstream: MockUpstream) -> None:
    class BrokenRouter:
        async def complete(self, *args: Any) -> Any:
            raise RuntimeError("a bug")

    with run_gateway(base_config(upstream.url)) as gw:
        gw.gateway.router = BrokenRouter()  # type: ignore[assignment]
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "demo", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 500 and "a bug" not in r.text and "Traceback" not in r.text
        line = gw.request_logs()[-1]
        assert line["status"] == 500 and line["error"] == "internal error: RuntimeError"


@pytest.mark.parametrize("status", [401, 403])
def test_upstreams_refusing_the_gateways_credentials_is_502_not_the_clients_401(upstream: MockUpstream,
                                                                                status: int) -> None:
    refused = Reply(status=status, body={"error": {"message": "Incorrect API key provided",
                                                   "type": "invalid_request_error", "code": "invalid_api_key"}})
    upstream.replies["first"] = refused
    upstream.replies["second"] = refused
    with run_gateway(base_config(upstream.url, FALLBACK_ROUTE)) as gw:
        with pytest.raises(openai.APIStatusError) as exc:
            sdk(gw).chat.completions.create(model="r", messages=[{"role": "user", "content": "x"}])
        assert exc.value.status_code == 502
        assert exc.value.body["code"] == "upstream_auth_failed"
        assert "gateway's credentials" in exc.value.body["message"]


def test_a_token_configured_in_headers_is_redacted_without_its_scheme(upstream: MockUpstream) -> None:
    token = "plainEntraToken0042"
    cfg = base_config(upstream.url, FALLBACK_ROUTE)
    cfg["providers"][0]["headers"] = {"Authorization": f"Bearer {token}"}
    upstream.replies["first"] = Reply(status=401, body={"error": {"message": f"token {token} expired"}})
    upstream.replies["second"] = Reply(status=500, body={"error": {"message": "down"}})
    with run_gateway(cfg) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "r", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 502 and token not in r.text and "token [REDACTED] expired" in r.text
        assert token not in json.dumps(gw.request_logs()[-1])


def test_stream_is_relayed_as_it_comes_not_buffered(upstream: MockUpstream) -> None:
    """The upstream holds its stream after the first chunks until the client has seen them."""
    import threading

    hold = threading.Event()
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "m"}]}]
    upstream.replies["m"] = Reply(sse=stream_of("early", "late"), hold=hold, hold_after=2)
    with run_gateway(base_config(upstream.url, route)) as gw:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY}, timeout=20,
                          json={"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
            seen = b""
            it = r.iter_raw()
            while b'"early"' not in seen:
                seen += next(it)
            hold.set()
            seen += b"".join(it)
        assert upstream.hold_timeouts == 0
        assert b'"late"' in seen and seen.endswith(b"data: [DONE]\n\n")


def test_step_timeout_bounds_the_first_chunk_not_the_whole_stream(upstream: MockUpstream) -> None:
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "m", "timeout": "0.5s"}]}]
    upstream.replies["m"] = Reply(sse=stream_of("a", "b", "c", "d"), sse_delay=0.15)  # >= 0.9 s in all
    with run_gateway(base_config(upstream.url, route)) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]})
        assert r.content.endswith(b"data: [DONE]\n\n") and r.content.count(b'"content"') == 5


def test_log_level_is_configurable(upstream: MockUpstream) -> None:
    body = {"model": "demo", "messages": [{"role": "user", "content": "x"}]}
    with run_gateway(base_config(upstream.url)) as gw:
        httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY}, json=body)
        line = gw.request_logs()[-1]
        assert line["level"] == "info" and line["time"].endswith("Z") and "T" in line["time"]
    with run_gateway(base_config(upstream.url, log_level="warning")) as gw:
        httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY}, json=body)
        httpx.get(gw.url + "/nope")
    assert gw.log_lines() == []  # looked at once the server stopped: every request line would be written by now


def test_a_connection_broken_after_done_still_ends_with_done(upstream: MockUpstream) -> None:
    """[DONE] arrived: the answer is whole, even if the upstream then resets instead of ending the body."""
    events = [*stream_of("a", "b"), b"data: [DONE]\n\n"]
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "m"}]}]
    upstream.replies["m"] = Reply(sse=events, done=False, reset_after=len(events))
    with run_gateway(base_config(upstream.url, route)) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]})
        assert r.content.endswith(b"data: [DONE]\n\n") and b"error" not in r.content
        assert gw.request_logs()[-1]["status"] == 200


def test_passed_on_4xx_code_and_type_are_redacted(upstream: MockUpstream) -> None:
    bad = Reply(status=400, body={"error": {"message": "no", "code": "sk-abcdefghijklmnop",
                                            "type": "x" * 5000}})
    upstream.replies["first"] = upstream.replies["second"] = bad
    with run_gateway(base_config(upstream.url, FALLBACK_ROUTE)) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "r", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400
        err = r.json()["error"]
        assert "abcdefghijklmnop" not in r.text and "[REDACTED]" in err["code"] and len(err["type"]) <= 100


def test_configured_headers_override_ours(upstream: MockUpstream) -> None:
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "m"}]}]
    cfg = base_config(upstream.url, route)
    cfg["providers"][0]["headers"] = {"Authorization": "Bearer entra-token-value", "X-Title": "my-app"}
    with run_gateway(cfg) as gw:
        httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                   json={"model": "r", "messages": [{"role": "user", "content": "x"}]})
    got = upstream.received[-1]
    raw_auth = [v for k, v in got.raw_headers if k.lower() == "authorization"]
    assert raw_auth == ["Bearer entra-token-value"]  # one Authorization header: the configured one
    assert got.headers["x-title"] == "my-app"


def test_stream_usage_false_leaves_stream_options_alone(upstream: MockUpstream) -> None:
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "m"}]}]
    cfg = base_config(upstream.url, route)
    cfg["providers"][0]["stream_usage"] = False
    upstream.replies["m"] = Reply(sse=stream_of("a", usage=False))
    with run_gateway(cfg) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]})
        assert r.content.endswith(b"data: [DONE]\n\n")
    assert "stream_options" not in upstream.received[-1].json
