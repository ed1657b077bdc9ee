"""``type: anthropic``: the openai SDK as the client, the gateway, and a wire-accurate Anthropic mock.

Golden fixtures in ``tests/fixtures/anthropic/`` pin the mapping both ways (request,
response and stream); regenerate them with ``AT_GATEWAY_UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from at_gateway.config import build_config
from at_gateway.errors import StepFailed
from at_gateway.http.pool import UpstreamClient
from at_gateway.providers import build_provider
from at_gateway.providers.anthropic import (
    StreamTranslator,
    error_from_anthropic,
    from_anthropic,
    to_anthropic,
)
from at_gateway.providers.base import QuotedFailure
from tests.conftest import GATEWAY_KEY, base_config, run_gateway
from tests.mock_anthropic import (
    API_KEY,
    AnthropicMock,
    check_request,
    error_reply,
    message,
    stream_events,
    stream_reply,
    text,
    thinking,
    tool_use,
)
from tests.mock_upstream import MockUpstream, Received, Reply, chat_completion, stream_of

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "anthropic").glob("*.json"))
UPDATE_GOLDEN = os.environ.get("AT_GATEWAY_UPDATE_GOLDEN") == "1"
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture
def claude(upstream: MockUpstream) -> Iterator[AnthropicMock]:
    mock = AnthropicMock(upstream)
    yield mock
    assert mock.problems == [], "the gateway sent requests that break the Messages API schema"


def config(upstream: MockUpstream, *routes: tuple[str, list[dict[str, Any]]], **provider: Any) -> dict[str, Any]:
    """A gateway config with an ``anthropic`` provider named ``claude`` pointing at the mock."""
    cfg = base_config(upstream.url, [{"name": name, "steps": steps} for name, steps in routes])
    cfg["providers"].append({"name": "claude", "type": "anthropic", "base_url": upstream.url, "api_key": API_KEY,
                             "max_tokens": 1000, **provider})
    return cfg


def one(model: str, route: str = "r") -> tuple[str, list[dict[str, Any]]]:
    return route, [{"provider": "claude", "model": model, "timeout": "10s"}]


def sdk(gw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=20)


def collect(stream: Any) -> tuple[list[Any], str, str, dict[int, dict[str, Any]], Any]:
    """(chunks, content, reasoning, tool calls by index, usage) of an openai SDK stream."""
    chunks = list(stream)
    content, reasoning, calls, usage = "", "", {}, None
    for c in chunks:
        if c.usage is not None:
            usage = c.usage
        for ch in c.choices:
            d = ch.delta
            content += d.content or ""
            reasoning += getattr(d, "reasoning_content", None) or ""
            for tc in d.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": "", "deltas": 0})
                call["deltas"] += 1
                if tc.id:
                    assert call["id"] is None, "id sent twice for one tool call"
                    call["id"] = tc.id
                    call["name"] = tc.function.name
                    assert call["deltas"] == 1, "id and name must come in the tool call's first delta"
                call["arguments"] += (tc.function.arguments or "") if tc.function else ""
    return chunks, content, reasoning, calls, usage


# ---------------------------------------------------------------------------
# Golden fixtures
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_golden(path: Path) -> None:
    case = json.loads(path.read_text())
    tr = to_anthropic(case["openai_request"], case["model"], 4096)
    response = from_anthropic(case["anthropic_response"], tr.json_tool, created=0)
    st = StreamTranslator(json_tool=tr.json_tool, include_usage=True, created=0, model=case["model"])
    chunks = [c for name, data in case["anthropic_stream"] for c in st.feed(name, data)]
    got = {"anthropic_request": tr.body, "openai_response": response, "openai_chunks": chunks}
    if UPDATE_GOLDEN:
        case = {**case, **got}
        path.write_text(json.dumps(case, indent=1, ensure_ascii=False) + "\n")
    for key, value in got.items():
        assert case.get(key) == value, f"{path.name}: {key} differs from the golden fixture"
    # The request is valid for the documented schema (as the mock judges it).
    rec = Received("POST", "/v1/messages", {"x-api-key": API_KEY, "anthropic-version": "2023-06-01",
                                            "content-type": "application/json"}, json.dumps(tr.body).encode())
    assert check_request(rec) == []
    # The stream tells the same story as the non-stream answer.
    assert st.finished
    msg = response["choices"][0]["message"]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    if tr.json_tool:
        assert json.loads(streamed) == json.loads(msg["content"])
    else:
        assert streamed == (msg["content"] or "")
    assert "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks if c["choices"]) == \
        msg.get("reasoning_content", "")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == response["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == response["usage"]
    streamed_calls: dict[int, str] = {}
    for c in chunks[:-1]:
        for tc in c["choices"][0]["delta"].get("tool_calls", []):
            streamed_calls[tc["index"]] = streamed_calls.get(tc["index"], "") + tc["function"]["arguments"]
    want = [json.loads(t["function"]["arguments"]) for t in msg.get("tool_calls", [])]
    assert [json.loads(streamed_calls[i]) for i in sorted(streamed_calls)] == want


def test_golden_fixtures_exist() -> None:
    assert len(FIXTURES) >= 8


# ---------------------------------------------------------------------------
# Through the gateway, the openai SDK as the client
# ---------------------------------------------------------------------------

def test_text_non_stream(upstream: MockUpstream, claude: AnthropicMock) -> None:
    claude.on("claude-a", lambda body: message(text("Hello!"), usage={
        "input_tokens": 10, "output_tokens": 3, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 300}))
    with run_gateway(config(upstream, one("claude-a"))) as gw:
        raw = sdk(gw).chat.completions.with_raw_response.create(model="r", messages=[
            {"role": "system", "content": "Be brief."}, {"role": "developer", "content": "No emoji."},
            {"role": "user", "content": "hi"}], stop=["STOP"], temperature=0.3)
        resp = raw.parse()
    assert raw.headers["x-gateway-provider"] == "claude"
    assert resp.choices[0].message.content == "Hello!"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (330, 3, 333)
    assert resp.usage.prompt_tokens_details is not None and resp.usage.prompt_tokens_details.cached_tokens == 300
    sent = claude.requests[0]
    assert sent["system"] == [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "No emoji."}]
    assert sent["messages"] == [{"role": "user", "content": "hi"}]
    assert sent["max_tokens"] == 1000  # the provider's default
    assert sent["stop_sequences"] == ["STOP"] and sent["temperature"] == 0.3 and "stream" not in sent
    rec = upstream.received[0]
    assert rec.path == "/v1/messages" and rec.headers["x-api-key"] == API_KEY
    assert rec.headers["anthropic-version"] == "2023-06-01"


def test_text_stream_with_usage(upstream: MockUpstream, claude: AnthropicMock) -> None:
    claude.on("claude-a", lambda body: message(text("Hello from a stream"), usage={
        "input_tokens": 7, "output_tokens": 5, "cache_read_input_tokens": 40}))
    with run_gateway(config(upstream, one("claude-a"))) as gw:
        stream = sdk(gw).chat.completions.create(model="r", stream=True, max_completion_tokens=77,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "hi"}])
        chunks, content, _, calls, usage = collect(stream)
    assert content == "Hello from a stream" and not calls
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # deltas, not one blob
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens_details.cached_tokens) == (47, 5, 40)
    sent = claude.requests[0]
    assert sent["stream"] is True and sent["max_tokens"] == 77 and "stream_options" not in sent


def test_stream_without_include_usage_has_no_usage_chunk(upstream: MockUpstream, claude: AnthropicMock) -> None:
    claude.on("claude-a", lambda body: message(text("ok")))
    with run_gateway(config(upstream, one("claude-a"))) as gw:
        chunks, content, *_ = collect(sdk(gw).chat.completions.create(
            model="r", stream=True, messages=[{"role": "user", "content": "hi"}]))
    assert content == "ok"
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    logged = gw.request_logs()[-1]  # usage is still counted for the request log
    assert logged["tokens"] == {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}


def _weather_turns(body: dict[str, Any]) -> dict[str, Any]:
    """Turn 1 asks for two tools; turn 2 (tool results back) answers in text."""
    last = body["messages"][-1]
    if last["role"] == "user" and isinstance(last["content"], list) and last["content"][0]["type"] == "tool_result":
        return message(text("Paris 18C, Rome 24C."), usage={"input_tokens": 90, "output_tokens": 9})
    return message(text("Checking."), tool_use("toolu_01Paris", "get_weather", {"city": "Paris"}),
                   tool_use("toolu_02Rome", "get_weather", {"city": "Rome"}), stop_reason="tool_use",
                   usage={"input_tokens": 50, "output_tokens": 30})


def _second_turn_messages(first: Any) -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        first,
        {"role": "tool", "tool_call_id": "toolu_01Paris", "content": "18C"},
        {"role": "tool", "tool_call_id": "toolu_02Rome", "content": "24C"},
    ]


def _check_second_turn_request(sent: dict[str, Any]) -> None:
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][1]["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "toolu_01Paris", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_02Rome", "name": "get_weather", "input": {"city": "Rome"}}]
    assert sent["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_01Paris", "content": "18C"},
        {"type": "tool_result", "tool_use_id": "toolu_02Rome", "content": "24C"}]


def test_two_turn_tool_call_non_stream(upstream: MockUpstream, claude: AnthropicMock) -> None:
    claude.on("claude-t", _weather_turns)
    with run_gateway(config(upstream, one("claude-t"))) as gw:
        client = sdk(gw)
        r1 = client.chat.completions.create(model="r", tools=[WEATHER], tool_choice="required",
                                            messages=[{"role": "user", "content": "Weather in Paris and Rome?"}])
        choice = r1.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Checking."
        calls = choice.message.tool_calls or []
        assert [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("toolu_01Paris", "get_weather", {"city": "Paris"}), ("toolu_02Rome", "get_weather", {"city": "Rome"})]
        assert claude.requests[0]["tool_choice"] == {"type": "any"}
        assert claude.requests[0]["tools"] == [{"name": "get_weather", "description": "Current weather for a city",
                                                "input_schema": WEATHER["function"]["parameters"]}]
        r2 = client.chat.completions.create(model="r", tools=[WEATHER],
                                            messages=_second_turn_messages(choice.message.model_dump()))
    assert r2.choices[0].message.content == "Paris 18C, Rome 24C." and r2.choices[0].finish_reason == "stop"
    _check_second_turn_request(claude.requests[1])


def test_two_turn_tool_call_stream(upstream: MockUpstream, claude: AnthropicMock) -> None:
    claude.on("claude-t", _weather_turns)
    with run_gateway(config(upstream, one("claude-t"))) as gw:
        client = sdk(gw)
        chunks, content, _, calls, _ = collect(client.chat.completions.create(
            model="r", stream=True, tools=[WEATHER],
            messages=[{"role": "user", "content": "Weather in Paris and Rome?"}]))
        assert content == "Checking."
        assert sorted(calls) == [0, 1]
        assert [(calls[i]["id"], calls[i]["name"], json.loads(calls[i]["arguments"])) for i in (0, 1)] == [
            ("toolu_01Paris", "get_weather", {"city": "Paris"}), ("toolu_02Rome", "get_weather", {"city": "Rome"})]
        assert all(calls[i]["deltas"] > 2 for i in (0, 1))  # arguments arrive as input_json_delta fragments
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        assistant = {"role": "assistant", "content": content, "tool_calls": [
            {"id": calls[i]["id"], "type": "function",
             "function": {"name": calls[i]["name"], "arguments": calls[i]["arguments"]}} for i in (0, 1)]}
        _, content2, *_ = collect(client.chat.completions.create(
            model="r", stream=True, tools=[WEATHER],
            messages=_second_turn_messages(assistant)))
    assert content2 == "Paris 18C, Rome 24C."
    _check_second_turn_request(claude.requests[1])


def test_images(upstream: MockUpstream, claude: AnthropicMock) -> None:
    claude.on("claude-i", lambda body: message(text("Two images.")))
    content = [{"type": "text", "text": "What are these?"},
               {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
               {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]
    with run_gateway(config(upstream, one("claude-i"))) as gw:
        r = sdk(gw).chat.completions.create(model="r", messages=[{"role": "user", "content": content}])
        _, streamed, *_ = collect(sdk(gw).chat.completions.create(
            model="r", stream=True, messages=[{"role": "user", "content": content}]))
    assert r.choices[0].message.content == "Two images." == streamed
    for sent in claude.requests:
        assert sent["messages"][0]["content"] == [
            {"type": "text", "text": "What are these?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}}]


PERSON = {"type": "json_schema", "json_schema": {"name": "person", "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"]}}}


def test_json_schema_mode(upstream: MockUpstream, claude: AnthropicMock) -> None:
    claude.on("claude-j", lambda body: message(tool_use("toolu_01J", body["tool_choice"]["name"],
                                                        {"name": "Ada", "age": 36}), stop_reason="tool_use"))
    with run_gateway(config(upstream, one("claude-j"))) as gw:
        r = sdk(gw).chat.completions.create(model="r", response_format=PERSON,
                                            messages=[{"role": "user", "content": "Invent a person."}])
        chunks, streamed, _, calls, _ = collect(sdk(gw).chat.completions.create(
            model="r", stream=True, response_format=PERSON,
            messages=[{"role": "user", "content": "Invent a person."}]))
    assert json.loads(r.choices[0].message.content or "") == {"name": "Ada", "age": 36}
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert json.loads(streamed) == {"name": "Ada", "age": 36} and not calls
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    sent = claude.requests[0]
    assert sent["tool_choice"] == {"type": "tool", "name": "person"}
    assert sent["tools"][0]["input_schema"] == PERSON["json_schema"]["schema"]
    assert "response_format" not in sent


def test_json_object_mode(upstream: MockUpstream, claude: AnthropicMock) -> None:
    claude.on("claude-j", lambda body: message(text('{"ok": true}')))
    with run_gateway(config(upstream, one("claude-j"))) as gw:
        r = sdk(gw).chat.completions.create(model="r", response_format={"type": "json_object"},
                                            messages=[{"role": "user", "content": "JSON please"}])
    assert json.loads(r.choices[0].message.content or "") == {"ok": True}
    assert "JSON" in claude.requests[0]["system"] and "tools" not in claude.requests[0]


def test_thinking_becomes_reasoning_content(upstream: MockUpstream, claude: AnthropicMock) -> None:
    claude.on("claude-th", lambda body: message(thinking("Let me add: 2 + 2 = 4."), text("4"),
                                                usage={"input_tokens": 9, "output_tokens": 30}))
    with run_gateway(config(upstream, one("claude-th"))) as gw:
        r = sdk(gw).chat.completions.create(model="r", messages=[{"role": "user", "content": "2+2?"}],
                                            extra_body={"thinking": {"type": "enabled", "budget_tokens": 1024}})
        _, content, reasoning, *_ = collect(sdk(gw).chat.completions.create(
            model="r", stream=True, messages=[{"role": "user", "content": "2+2?"}]))
    msg = r.choices[0].message
    assert msg.content == "4" and getattr(msg, "reasoning_content", None) == "Let me add: 2 + 2 = 4."
    assert content == "4" and reasoning == "Let me add: 2 + 2 = 4."
    assert claude.requests[0]["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert claude.requests[0]["max_tokens"] == 2024  # the default, plus room for the thinking budget


@pytest.mark.parametrize(("stop_reason", "finish"), [("end_turn", "stop"), ("stop_sequence", "stop"),
                                                     ("max_tokens", "length"), ("tool_use", "tool_calls"),
                                                     ("refusal", "content_filter")])
def test_stop_reasons(upstream: MockUpstream, claude: AnthropicMock, stop_reason: str, finish: str) -> None:
    blocks = [text("x")] + ([tool_use("toolu_1", "get_weather", {"city": "Oslo"})] if finish == "tool_calls" else [])
    claude.on("claude-s", lambda body: message(*blocks, stop_reason=stop_reason))
    with run_gateway(config(upstream, one("claude-s"))) as gw:
        r = sdk(gw).chat.completions.create(model="r", messages=[{"role": "user", "content": "hi"}])
        chunks, *_ = collect(sdk(gw).chat.completions.create(
            model="r", stream=True, messages=[{"role": "user", "content": "hi"}]))
    assert r.choices[0].finish_reason == finish
    assert chunks[-1].choices[0].finish_reason == finish


# ---------------------------------------------------------------------------
# Errors and fallback
# ---------------------------------------------------------------------------

def _partial(*deltas: str) -> list[tuple[str, dict[str, Any]]]:
    full = stream_events(message(text("".join(deltas))), piece=len(deltas[0]))
    return full[:2 + 1 + len(deltas)]  # message_start, ping, block start, the text deltas


OVERLOADED = ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})


def test_mid_stream_error_event_is_a_visible_error(upstream: MockUpstream, claude: AnthropicMock) -> None:
    claude.on("claude-e", lambda body: stream_reply([*_partial("Hello", " worl"), OVERLOADED]))
    with run_gateway(config(upstream, one("claude-e"))) as gw:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY}, json={
                "model": "r", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as resp:
            lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
        got = ""
        with pytest.raises(openai.APIError, match="Overloaded"):
            for c in sdk(gw).chat.completions.create(model="r", stream=True,
                                                     messages=[{"role": "user", "content": "hi"}]):
                got += (c.choices[0].delta.content or "") if c.choices else ""
    assert got == "Hello worl"
    assert "data: [DONE]" not in lines
    err = json.loads(lines[-1][6:])["error"]
    assert err["code"] == "stream_interrupted" and "overloaded_error: Overloaded" in err["message"]


def test_cut_stream_after_content_is_a_visible_error(upstream: MockUpstream, claude: AnthropicMock) -> None:
    events = stream_events(message(text("Hello world, this is long")), piece=5)
    claude.on("claude-e", lambda body: stream_reply(events, reset_after=6))
    with run_gateway(config(upstream, one("claude-e"))) as gw:
        got = ""
        with pytest.raises(openai.APIError):
            for c in sdk(gw).chat.completions.create(model="r", stream=True,
                                                     messages=[{"role": "user", "content": "hi"}]):
                got += (c.choices[0].delta.content or "") if c.choices else ""
    assert got.startswith("Hello") and got != "Hello world, this is long"


def test_stream_ending_without_message_stop_is_an_error(upstream: MockUpstream, claude: AnthropicMock) -> None:
    events = stream_events(message(text("Hello world")), piece=5)[:-1]  # clean close, but no message_stop
    claude.on("claude-e", lambda body: stream_reply(events))
    with run_gateway(config(upstream, one("claude-e"))) as gw:
        with pytest.raises(openai.APIError, match="message_stop"):
            list(sdk(gw).chat.completions.create(model="r", stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]))


FALLBACK = ("fb", [{"provider": "claude", "model": "claude-bad", "timeout": "10s"},
                   {"provider": "up1", "model": "gpt-next", "timeout": "10s"}])

EARLY_FAILURES = {
    "http-529-overloaded": error_reply(529, "overloaded_error", "Overloaded"),
    "http-500-api-error": error_reply(500, "api_error", "Internal server error"),
    "error-event-after-message-start": stream_reply([*_partial("x")[:2], OVERLOADED]),
    "cut-before-content": stream_reply(stream_events(message(text("Hello"))), reset_after=2),
    "2xx-error-body": Reply(body={"type": "error", "error": {"type": "api_error", "message": "odd"}}),
}


EARLY_CASES = [(f, False) for f, r in sorted(EARLY_FAILURES.items()) if r.sse is None] + \
    [(f, True) for f in sorted(EARLY_FAILURES)]


@pytest.mark.parametrize(("failure", "streaming"), EARLY_CASES,
                         ids=[f"{f}-{'stream' if s else 'json'}" for f, s in EARLY_CASES])
def test_early_failures_fall_through(upstream: MockUpstream, claude: AnthropicMock, failure: str,
                                     streaming: bool) -> None:
    reply = EARLY_FAILURES[failure]
    claude.on("claude-bad", lambda body: reply)
    upstream.replies["gpt-next"] = Reply(sse=stream_of("from", " openai")) if streaming else \
        Reply(body=chat_completion("from openai"))
    with run_gateway(config(upstream, FALLBACK)) as gw:
        client = sdk(gw)
        if streaming:
            with client.chat.completions.with_streaming_response.create(
                    model="fb", stream=True, messages=[{"role": "user", "content": "hi"}]) as resp:
                assert resp.headers["x-gateway-attempts"] == "2"
                assert "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices) == "from openai"
        else:
            raw = client.chat.completions.with_raw_response.create(
                model="fb", messages=[{"role": "user", "content": "hi"}])
            assert raw.headers["x-gateway-attempts"] == "2" and raw.headers["x-gateway-provider"] == "up1"
            assert raw.parse().choices[0].message.content == "from openai"


def test_overloaded_alone_is_502_with_anthropic_message(upstream: MockUpstream, claude: AnthropicMock) -> None:
    claude.on("claude-bad", lambda body: error_reply(529, "overloaded_error", "Overloaded right now"))
    with run_gateway(config(upstream, one("claude-bad"))) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "r", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 502
    attempt = r.json()["error"]["attempts"][0]
    assert attempt["status"] == 529 and "overloaded_error: Overloaded right now" in attempt["error"]


def test_invalid_request_is_400_with_anthropic_message(upstream: MockUpstream, claude: AnthropicMock) -> None:
    msg = "prompt is too long: 250000 tokens > 200000 maximum"
    claude.on("claude-bad", lambda body: error_reply(400, "invalid_request_error", msg))
    with run_gateway(config(upstream, one("claude-bad"))) as gw:
        with pytest.raises(openai.BadRequestError) as info:
            sdk(gw).chat.completions.create(model="r", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError) as info2:
            sdk(gw).chat.completions.create(model="r", stream=True, messages=[{"role": "user", "content": "hi"}])
    for exc in (info.value, info2.value):
        assert exc.status_code == 400 and msg in exc.message
        assert isinstance(exc.body, dict) and exc.body.get("type") == "invalid_request_error"


def test_untranslatable_request_falls_through(upstream: MockUpstream, claude: AnthropicMock) -> None:
    upstream.replies["gpt-next"] = Reply(body=chat_completion("two choices handled elsewhere"))
    with run_gateway(config(upstream, FALLBACK)) as gw:
        r = sdk(gw).chat.completions.create(model="fb", n=2, messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "two choices handled elsewhere"
    assert not claude.requests  # nothing untranslatable reached Anthropic


def test_untranslatable_request_alone_is_400(upstream: MockUpstream, claude: AnthropicMock) -> None:
    with run_gateway(config(upstream, one("claude-a"))) as gw:
        with pytest.raises(openai.BadRequestError, match="input_audio") as info:
            sdk(gw).chat.completions.create(model="r", messages=[{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}])
    assert info.value.status_code == 400 and not upstream.received


# ---------------------------------------------------------------------------
# Mapping details (pure functions) and configuration
# ---------------------------------------------------------------------------

def _choice(**body: Any) -> Any:
    body = {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER], **body}
    return to_anthropic(body, "m").body.get("tool_choice")


def test_tool_choice_mapping() -> None:
    assert _choice() is None
    assert _choice(tool_choice="auto") == {"type": "auto"}
    assert _choice(tool_choice="none") == {"type": "none"}
    assert _choice(tool_choice="required") == {"type": "any"}
    assert _choice(tool_choice={"type": "function", "function": {"name": "get_weather"}}) == \
        {"type": "tool", "name": "get_weather"}
    assert _choice(parallel_tool_calls=False) == {"type": "auto", "disable_parallel_tool_use": True}
    assert _choice(tool_choice="required", parallel_tool_calls=False) == \
        {"type": "any", "disable_parallel_tool_use": True}
    assert _choice(tools=None, tool_choice="auto") is None  # no tools: nothing to choose from
    allowed = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "get_weather"}}]}}
    assert _choice(tool_choice=allowed) == {"type": "any"}


def test_request_mapping_details() -> None:
    body = {"messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"},  # merged into one turn
        {"role": "assistant", "content": ""},  # empty: dropped (Anthropic rejects empty text)
        {"role": "user", "content": [{"type": "file", "file": {"file_data": f"data:application/pdf;base64,{PNG}"}}]},
    ], "max_tokens": 5, "max_completion_tokens": 9, "stop": [], "temperature": 0}
    out = to_anthropic(body, "m", 123).body
    assert out["max_tokens"] == 9 and out["temperature"] == 0.0 and "stop_sequences" not in out
    assert out["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": PNG}}]}]
    assert to_anthropic({"messages": [{"role": "user", "content": "x"}]}, "m", 123).body["max_tokens"] == 123
    for bad, why in [
        ({"n": 3}, "n:"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}]},
         "image URL"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/tiff;base64,AAAA"}}]}]}, "image/tiff"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {
            "name": "f", "arguments": "{not json"}}]}]}, "not valid JSON"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
        ({"tools": [{"type": "web_search"}]}, "only function tools"),
        ({"messages": [{"role": "function", "content": "x"}]}, "role"),
        ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "at least one"),
    ]:
        with pytest.raises(StepFailed, match=why) as info:
            to_anthropic({"messages": [{"role": "user", "content": "x"}], **bad}, "m")
        assert info.value.status == 400


def test_tool_ids_are_sanitised_the_same_on_both_sides() -> None:
    out = to_anthropic({"messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "call:1/a", "type": "function",
                                              "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call:1/a", "content": "done"}]}, "m").body
    assert out["messages"][1]["content"][0]["id"] == out["messages"][2]["content"][0]["tool_use_id"] == "call_1_a"


def test_malformed_upstream_fields_are_failed_steps_not_crashes() -> None:
    """An index or usage of the wrong JSON type from upstream is a failed step (or ignored), never a TypeError
    escaping routing as a bare 500 that skips the route's next step."""
    st = StreamTranslator()
    st.feed("message_start", {"message": {"id": "msg_1", "usage": {"input_tokens": 3}}})
    with pytest.raises(StepFailed, match="never started"):
        st.feed("content_block_delta", {"index": {"0": 1}, "delta": {"type": "text_delta", "text": "x"}})
    assert st.feed("content_block_stop", {"index": [0]}) == []
    odd = from_anthropic({"type": "message", "content": [{"type": "text", "text": "hi"}], "usage": [1]})
    assert odd["choices"][0]["message"]["content"] == "hi" and odd["usage"]["total_tokens"] == 0
    # An odd error event keeps an echoed key whole, so that routing's redaction by value still finds it.
    echoed = error_from_anthropic(None, {"type": "error", "error": "x" * 190 + API_KEY})
    assert isinstance(echoed, QuotedFailure) and API_KEY in echoed.quoted and API_KEY not in echoed.message


def test_validate_options() -> None:
    from at_gateway.providers.options import check_options

    assert check_options("anthropic", {"max_tokens": 100, "anthropic_version": "2023-06-01"}) == []
    assert len(check_options("anthropic", {"max_tokens": 0, "anthropic_version": ""})) == 2


def test_config_defaults_and_keys() -> None:
    cfg = build_config({"api_key": "k", "providers": [
        {"name": "c", "type": "anthropic", "api_key": "sk-ant-x", "max_tokens": 2048,
         "anthropic_version": "2023-06-01"}], "routes": []}, "t")
    provider = build_provider(cfg.providers["c"], UpstreamClient())
    assert provider.url == "https://api.anthropic.com/v1/messages"
    assert provider.max_tokens == 2048
    with_v1 = build_config({"api_key": "k", "providers": [
        {"name": "c", "type": "anthropic", "base_url": "https://proxy.example/anthropic/v1/"}], "routes": []}, "t")
    assert build_provider(with_v1.providers["c"], UpstreamClient()).url == \
        "https://proxy.example/anthropic/v1/messages"
    with pytest.raises(Exception, match="max_tokns"):
        build_config({"api_key": "k", "providers": [{"name": "c", "type": "anthropic", "max_tokns": 1}],
                      "routes": []}, "t")


# ---------------------------------------------------------------------------
# The mock itself speaks Anthropic's wire format (checked with the official SDK)
# ---------------------------------------------------------------------------

def test_mock_is_wire_accurate_for_the_official_anthropic_sdk(upstream: MockUpstream, claude: AnthropicMock,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    want = message(thinking("hmm"), text("Hi there"), tool_use("toolu_9", "get_weather", {"city": "Oslo"}),
                   stop_reason="tool_use")
    claude.on("claude-sdk", lambda body: want)
    # This SDK release defaults to a newer version header and bearer auth; pin it to what we follow.
    client = anthropic.Anthropic(base_url=upstream.url, api_key=None, max_retries=0, default_headers={
        "x-api-key": API_KEY, "anthropic-version": "2023-06-01"})
    got = client.messages.create(model="claude-sdk", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    assert got.model_dump(exclude_none=True) == anthropic.types.Message.model_validate(want).model_dump(
        exclude_none=True)
    with client.messages.stream(model="claude-sdk", max_tokens=100,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[2].input == {"city": "Oslo"}
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == want["usage"]["output_tokens"]
    claude.on("claude-bad", lambda body: error_reply(529, "overloaded_error", "Overloaded"))
    with pytest.raises(anthropic.APIStatusError) as info:
        client.messages.create(model="claude-bad", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 529
    # The checker catches what the real API would refuse.
    bad = Received("POST", "/v1/messages", {"x-api-key": API_KEY, "anthropic-version": "2023-06-01",
                                            "content-type": "application/json"}, json.dumps({
                                                "model": "m", "messages": [{"role": "assistant", "content": ""}],
                                                "response_format": {}}).encode())
    problems = " | ".join(check_request(bad))
    for needle in ("max_tokens", "response_format: unknown", "first message", "must not be empty"):
        assert needle in problems
