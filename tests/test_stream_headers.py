"""What a stream's head, comments and request log say when the head had to go out before the answer was known.

Keep-alive comments start the response while the gateway still waits for a first chunk, so the head
cannot name the step that will answer: it carries only what is already true, and the answering step
is told in an SSE comment. Once the head went out, a failure can only be an error event: the log
records what the client got (200 and the event) and the status that would have been answered.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GATEWAY_KEY, base_config, run_gateway
from tests.mock_upstream import MockUpstream, Reply, chat_completion, stream_of

ROUTE = [{"name": "r", "steps": [
    {"provider": "up1", "model": "first", "timeout": "5s"},
    {"provider": "up2", "model": "second", "timeout": "5s"},
]}]
STEP_HEADERS = ("x-gateway-provider", "x-gateway-model", "x-gateway-attempts")
BODY = {"model": "r", "stream": True, "messages": [{"role": "user", "content": "x"}]}


def slow_then_failing(hold: threading.Event) -> Reply:
    """A stream whose head comes at once and whose first event, an error, only once ``hold`` is set."""
    return Reply(sse=[{"error": {"message": "overloaded", "type": "server_error"}}], hold=hold, hold_after=0)


def events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e]


def test_head_sent_by_a_keepalive_names_no_step_and_the_answering_step_comes_as_a_comment(
        upstream: MockUpstream) -> None:
    hold = threading.Event()
    upstream.replies["first"] = slow_then_failing(hold)
    upstream.replies["second"] = Reply(sse=stream_of("two"))
    with run_gateway(base_config(upstream.url, ROUTE, stream_keepalive_interval="0.05s")) as gw:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=BODY,
                          headers={"x-api-key": GATEWAY_KEY, "x-request-id": "rid-1"}) as r:
            # The head arrived with the first keep-alive, while step 1 was still being tried.
            assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
            assert r.headers["x-request-id"] == "rid-1" and r.headers["x-gateway-route"] == "r"
            assert not [h for h in STEP_HEADERS if h in r.headers], r.headers
            hold.set()
            raw = r.read()
        evs = events(raw)
        assert evs[0] == b": keep-alive"
        told = [e for e in evs if e.startswith(b": x-gateway-")]
        assert told == [b": x-gateway-provider: up2\n: x-gateway-model: second\n: x-gateway-attempts: 2"], evs
        first_data = next(i for i, e in enumerate(evs) if e.startswith(b"data:"))
        assert evs.index(told[0]) < first_data  # told before the first chunk
        assert raw.endswith(b"data: [DONE]\n\n")
        line = gw.request_logs()[-1]
        assert (line["status"], line["provider"], line["model"], line["attempts"]) == (200, "up2", "second", 2)
        assert "outcome" not in line

        # The official SDK reads such a stream as any other (the comment is ignored) and sees the same head.
        hold.clear()
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=20)
        with client.chat.completions.with_streaming_response.create(
                model="r", stream=True, messages=[{"role": "user", "content": "x"}]) as resp:
            assert resp.headers["x-gateway-route"] == "r" and "x-gateway-provider" not in resp.headers
            hold.set()
            text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
        assert text == "two"


def test_head_without_keepalive_still_names_the_step(upstream: MockUpstream) -> None:
    upstream.replies["first"] = Reply(status=500, body={"error": {"message": "a"}})
    upstream.replies["second"] = Reply(sse=stream_of("two"))
    with run_gateway(base_config(upstream.url, ROUTE)) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", json=BODY, headers={"x-api-key": GATEWAY_KEY})
        assert [r.headers[h] for h in STEP_HEADERS] == ["up2", "second", "2"]
        assert b": x-gateway-" not in r.content  # nothing to tell: the head said it all


def _after_the_head(gw: Any, hold: threading.Event) -> tuple[httpx.Response, bytes]:
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=BODY, headers={"x-api-key": GATEWAY_KEY}) as r:
        hold.set()  # the head is here (sent with a keep-alive): now let step 1 fail
        return r, r.read()


@pytest.mark.parametrize("second, outcome, code", [
    (Reply(status=503, body={"error": {"message": "b"}}), 502, "all_steps_failed"),
    (Reply(status=429, body={"error": {"message": "b"}}), 502, "all_steps_failed"),
    (Reply(delay=3, body=chat_completion("late")), 502, "all_steps_failed"),
])
def test_all_steps_failing_after_the_head_is_logged_as_what_the_client_got(
        upstream: MockUpstream, second: Reply, outcome: int, code: str) -> None:
    hold = threading.Event()
    upstream.replies["first"] = slow_then_failing(hold)
    upstream.replies["second"] = second
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "first", "timeout": "5s"},
                                     {"provider": "up2", "model": "second", "timeout": "0.3s"}]}]
    with run_gateway(base_config(upstream.url, route, stream_keepalive_interval="0.05s")) as gw:
        r, raw = _after_the_head(gw, hold)
        assert r.status_code == 200 and b"[DONE]" not in raw
        err = json.loads(events(raw)[-1][6:])["error"]
        assert err["code"] == code and err["status"] == outcome and len(err["attempts"]) == 2
        line = gw.request_logs()[-1]
        assert line["status"] == 200 and line["outcome"] == outcome
        assert line["error"] == err["message"]


def test_all_steps_timing_out_after_the_head_carries_504_in_the_event_and_the_log(upstream: MockUpstream) -> None:
    upstream.replies["late"] = Reply(delay=3, body=chat_completion("late"))
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "late", "timeout": "0.2s"},
                                     {"provider": "up2", "model": "late", "timeout": "0.2s"}]}]
    with run_gateway(base_config(upstream.url, route, stream_keepalive_interval="0.05s")) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", json=BODY, headers={"x-api-key": GATEWAY_KEY})
        assert r.status_code == 200 and r.content.startswith(b": keep-alive\n\n")
        err = json.loads(events(r.content)[-1][6:])["error"]
        assert err["code"] == "all_steps_timed_out" and err["status"] == 504
        line = gw.request_logs()[-1]
        assert (line["status"], line["outcome"]) == (200, 504)


def test_a_stream_interrupted_mid_way_is_logged_as_200_with_a_502_outcome(upstream: MockUpstream) -> None:
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "m"}]}]
    upstream.replies["m"] = Reply(sse=stream_of("a", "b", "c"), reset_after=2)
    with run_gateway(base_config(upstream.url, route)) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", json={**BODY, "model": "r"},
                       headers={"x-api-key": GATEWAY_KEY})
        assert r.status_code == 200 and b"[DONE]" not in r.content
        err = json.loads(events(r.content)[-1][6:])["error"]
        assert err["code"] == "stream_interrupted" and err["status"] == 502
        line = gw.request_logs()[-1]
        assert (line["status"], line["outcome"], line["provider"]) == (200, 502, "up1")
        assert line["error"].startswith("upstream stream interrupted")


def test_a_stream_stalled_mid_way_is_logged_as_200_with_a_504_outcome(upstream: MockUpstream) -> None:
    """stream_idle_timeout after the first chunk: the event and the log say 504, as a whole answer would."""
    hold = threading.Event()
    route = [{"name": "r", "steps": [{"provider": "up1", "model": "m"}]}]
    upstream.replies["m"] = Reply(sse=stream_of("a", "b"), hold=hold, hold_after=1)
    try:
        with run_gateway(base_config(upstream.url, route, stream_idle_timeout="0.2s")) as gw:
            r = httpx.post(gw.url + "/v1/chat/completions", json=BODY, headers={"x-api-key": GATEWAY_KEY})
            assert r.status_code == 200 and b"[DONE]" not in r.content
            err = json.loads(events(r.content)[-1][6:])["error"]
            assert err["code"] == "stream_interrupted" and err["status"] == 504
            line = gw.request_logs()[-1]
            assert (line["status"], line["outcome"]) == (200, 504)
    finally:
        hold.set()
