"""``type: gemini`` through the gateway: the official openai SDK as the client, a wire-accurate Gemini mock upstream.

The golden tests at the end translate the request/response pairs kept in
``tests/fixtures/gemini/`` so that a change to any mapping shows as a diff;
``AT_GATEWAY_UPDATE_GOLDEN=1`` rewrites their expected halves.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from at_gateway.config import build_config
from at_gateway.errors import ConfigError, StepFailed
from at_gateway.providers.gemini import (
    SKIP_SIGNATURE,
    SignatureCache,
    StreamTranslator,
    build_request,
    completion_from_gemini,
)
from tests.conftest import GATEWAY_KEY, base_config, run_gateway
from tests.mock_google import API_KEY, GeminiMock, call, error_reply, response, sse, text, thought, usage
from tests.mock_upstream import MockUpstream, Reply

MODEL = "gemini-2.5-flash"
G3 = "gemini-3-flash-preview"
FIXTURES = Path(__file__).parent / "fixtures" / "gemini"

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather",
    "description": "Current weather in a city.",
    "parameters": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "GetWeather",
        "type": "object",
        "properties": {
            "city": {"type": "string", "title": "City", "description": "City name"},
            "unit": {"anyOf": [{"$ref": "#/$defs/Unit"}, {"type": "null"}], "default": None},
            "days": {"type": "integer", "minimum": 1, "maximum": 7, "exclusiveMaximum": 8},
        },
        "required": ["city"],
        "additionalProperties": False,
        "$defs": {"Unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "title": "Unit"}},
    },
}}
WEATHER_DECL = {
    "name": "get_weather",
    "description": "Current weather in a city.",
    "parameters": {
        "type": "OBJECT",
        "properties": {
            "city": {"type": "STRING", "description": "City name"},
            "unit": {"nullable": True, "enum": ["celsius", "fahrenheit"], "type": "STRING"},
            "days": {"type": "INTEGER", "minimum": 1, "maximum": 7, "description": "(must be < 8)"},
        },
        "required": ["city"],
    },
}


@pytest.fixture
def gemini(upstream: MockUpstream) -> Iterator[GeminiMock]:
    mock = GeminiMock(upstream)
    yield mock
    assert mock.problems == [], "the gateway sent requests the Gemini API would refuse"


def config(mock: GeminiMock, **provider: Any) -> dict[str, Any]:
    routes = [
        {"name": "g", "steps": [{"provider": "gem", "model": MODEL}]},
        {"name": "g3", "steps": [{"provider": "gem", "model": G3}]},
        {"name": "g-then-echo", "steps": [{"provider": "gem", "model": MODEL}, {"provider": "echo", "model": "e"}]},
    ]
    cfg = base_config(mock.url, routes)
    cfg["providers"].append({"name": "gem", "type": "gemini", "base_url": mock.url, "api_key": API_KEY, **provider})
    return cfg


def sdk(gw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=20)


def raw_stream(gw: Any, body: dict[str, Any]) -> list[bytes]:
    r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY}, json={**body, "stream": True})
    assert r.headers["content-type"] == "text/event-stream"
    return [e for e in r.content.split(b"\n\n") if e]


USER = {"role": "user", "content": "What is the weather in Paris?"}


# ---------------------------------------------------------------------------
# Text, stream and generation config
# ---------------------------------------------------------------------------

def test_non_stream_text_usage_and_generation_config(gemini: GeminiMock) -> None:
    gemini.on(MODEL, Reply(body=response(thought("thinking..."), text("Hello"), text(" there"),
                                         meta=usage(12, 4, thoughts=3, cached=2))))
    with run_gateway(config(gemini)) as gw:
        raw = sdk(gw).chat.completions.with_raw_response.create(
            model="g", temperature=0.2, top_p=0.9, max_tokens=50, stop=["END"], seed=7, presence_penalty=0.1,
            reasoning_effort="low",
            messages=[{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "No emoji."},
                      {"role": "user", "content": "hi"}])
        c = raw.parse()
    got = gemini.calls[-1]
    assert got.received.path == f"/v1beta/models/{MODEL}:generateContent"
    assert got.received.headers["x-goog-api-key"] == API_KEY
    assert got.body == {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "No emoji."}]},
        "generationConfig": {"temperature": 0.2, "topP": 0.9, "presencePenalty": 0.1, "seed": 7,
                             "maxOutputTokens": 50, "stopSequences": ["END"],
                             "thinkingConfig": {"thinkingBudget": 1024, "includeThoughts": True}},
    }
    assert raw.headers["x-gateway-provider"] == "gem"
    assert c.choices[0].message.content == "Hello there"
    assert c.choices[0].message.model_extra["reasoning_content"] == "thinking..."
    assert c.choices[0].finish_reason == "stop"
    assert c.id == "chatcmpl-resp-abc" and c.model == MODEL
    assert c.usage is not None
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (12, 7, 19)
    assert c.usage.prompt_tokens_details.cached_tokens == 2
    assert c.usage.completion_tokens_details.reasoning_tokens == 3


def test_stream_text_with_usage(gemini: GeminiMock) -> None:
    gemini.on(MODEL, sse(response(text("Hel"), finish=None, meta=usage(5, 1)),
                         response(text("lo"), finish=None, meta=usage(5, 2)),
                         response(text("!"), meta=usage(5, 3))))
    with run_gateway(config(gemini)) as gw:
        chunks = list(sdk(gw).chat.completions.create(model="g", stream=True, messages=[USER],
                                                      stream_options={"include_usage": True}))
        assert gemini.calls[-1].received.path == f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello!"
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == "stop" and finishes[:-1] == [None] * (len(finishes) - 1)
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.total_tokens) == (5, 8)
        # Without include_usage: no usage chunk, and the stream ends with [DONE].
        events = raw_stream(gw, {"model": "g", "messages": [USER]})
        assert events[-1] == b"data: [DONE]"
        assert all(b'"usage"' not in e for e in events)
        log = gw.request_logs()[-1]
        assert log["tokens"]["total_tokens"] == 8


# ---------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------

def test_two_turn_tool_call_keeps_ids_and_thought_signature(gemini: GeminiMock) -> None:
    gemini.on(G3,
              Reply(body=response(call("get_weather", {"city": "Paris", "unit": "celsius"}, sig="c2lnbmF0dXJlLTE="),
                                  meta=usage(20, 5), model=G3)),
              Reply(body=response(text("It is 18°C in Paris."), meta=usage(40, 8), model=G3)))
    with run_gateway(config(gemini)) as gw:
        client = sdk(gw)
        r1 = client.chat.completions.create(model="g3", messages=[USER], tools=[WEATHER_TOOL], tool_choice="auto")
        msg = r1.choices[0].message
        assert r1.choices[0].finish_reason == "tool_calls"
        assert msg.content is None and msg.tool_calls is not None and len(msg.tool_calls) == 1
        tc = msg.tool_calls[0]
        assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name == "get_weather"
        assert json.loads(tc.function.arguments) == {"city": "Paris", "unit": "celsius"}
        first = gemini.calls[-1].body
        assert first["tools"] == [{"functionDeclarations": [WEATHER_DECL]}]
        assert first["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}

        r2 = client.chat.completions.create(model="g3", tools=[WEATHER_TOOL], messages=[
            USER, msg, {"role": "tool", "tool_call_id": tc.id, "content": json.dumps({"temp_c": 18})}])
        assert r2.choices[0].message.content == "It is 18°C in Paris."
        assert r2.choices[0].finish_reason == "stop"
    assert gemini.calls[-1].body["contents"] == [
        {"role": "user", "parts": [{"text": "What is the weather in Paris?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather",
                                                      "args": {"city": "Paris", "unit": "celsius"}, "id": tc.id},
                                     "thoughtSignature": "c2lnbmF0dXJlLTE="}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp_c": 18},
                                                          "id": tc.id}}]},
    ]


def test_stream_parallel_tool_calls_then_results_in_one_turn(gemini: GeminiMock) -> None:
    gemini.on(MODEL,
              sse(response(text("Let me check."), finish=None),
                  response(call("get_weather", {"city": "Oslo"}, id="fc-1"), call("get_time", {"tz": "CET"}, id="fc-2"),
                           meta=usage(30, 9))),
              sse(response(text("Oslo: 3°C, "), finish=None), response(text("12:00."), meta=usage(50, 6))))
    tools = [WEATHER_TOOL, {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}}}}]
    with run_gateway(config(gemini)) as gw:
        client = sdk(gw)
        chunks = list(client.chat.completions.create(model="g", stream=True, messages=[USER], tools=tools,
                                                     tool_choice="required"))
        assert gemini.calls[-1].body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
        deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        assert [(d.index, d.id, d.type, d.function.name, d.function.arguments) for d in deltas] == [
            (0, "fc-1", "function", "get_weather", '{"city":"Oslo"}'),
            (1, "fc-2", "function", "get_time", '{"tz":"CET"}')]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Let me check."
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

        assistant = {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": d.id, "type": "function", "function": {"name": d.function.name, "arguments": d.function.arguments}}
            for d in deltas]}
        second = list(client.chat.completions.create(model="g", stream=True, tools=tools, messages=[
            USER, assistant, {"role": "tool", "tool_call_id": "fc-1", "content": "3°C"},
            {"role": "tool", "tool_call_id": "fc-2", "content": [{"type": "text", "text": "12:00"}]}]))
        assert "".join(c.choices[0].delta.content or "" for c in second if c.choices) == "Oslo: 3°C, 12:00."
    assert gemini.calls[-1].body["contents"][1:] == [
        {"role": "model", "parts": [{"text": "Let me check."},
                                    {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}, "id": "fc-1"}},
                                    {"functionCall": {"name": "get_time", "args": {"tz": "CET"}, "id": "fc-2"}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"output": "3°C"},
                                                          "id": "fc-1"}},
                                   {"functionResponse": {"name": "get_time", "response": {"output": "12:00"},
                                                          "id": "fc-2"}}]},
    ]


def test_history_from_another_provider_is_vouched_for_on_gemini_3(gemini: GeminiMock) -> None:
    gemini.on(G3, Reply(body=response(text("ok"), meta=usage(), model=G3)))
    history = [USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "toolu_01ABC", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_01ABC", "content": "sunny"}]
    with run_gateway(config(gemini)) as gw:
        assert sdk(gw).chat.completions.create(model="g3", messages=history,
                                               tools=[WEATHER_TOOL]).choices[0].message.content == "ok"
    part = gemini.calls[-1].body["contents"][1]["parts"][0]
    assert part["thoughtSignature"] == SKIP_SIGNATURE
    assert part["functionCall"]["id"] == "toolu_01ABC"


def test_named_tool_choice_and_bad_tool_history(gemini: GeminiMock) -> None:
    gemini.on(MODEL, Reply(body=response(call("get_weather", {"city": "Rome"}), meta=usage())))
    with run_gateway(config(gemini)) as gw:
        client = sdk(gw)
        client.chat.completions.create(model="g", messages=[USER], tools=[WEATHER_TOOL],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert gemini.calls[-1].body["toolConfig"] == {
            "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}
        n = len(gemini.calls)
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="g", messages=[USER, {"role": "tool", "tool_call_id": "nope",
                                                                       "content": "x"}])
        assert "matches no tool call" in exc.value.message
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="g", messages=[USER], tools=[{"type": "web_search"}])  # type: ignore
        assert "not supported by Gemini" in exc.value.message
        assert len(gemini.calls) == n  # refused before anything was sent


# ---------------------------------------------------------------------------
# Images and JSON mode
# ---------------------------------------------------------------------------

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def test_images_inline_and_by_url(gemini: GeminiMock) -> None:
    gemini.on(MODEL, Reply(body=response(text("Two cats."), meta=usage())))
    with run_gateway(config(gemini)) as gw:
        c = sdk(gw).chat.completions.create(model="g", messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in these?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.webp"}},
            {"type": "image_url", "image_url": {"url": "gs://bucket/photo.jpg"}},
        ]}])
    assert c.choices[0].message.content == "Two cats."
    assert gemini.calls[-1].body["contents"] == [{"role": "user", "parts": [
        {"text": "What is in these?"},
        {"inlineData": {"mimeType": "image/png", "data": PNG}},
        {"fileData": {"mimeType": "image/webp", "fileUri": "https://example.com/cat.webp"}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "gs://bucket/photo.jpg"}},
    ]}]


def test_bad_image_is_a_400_before_any_upstream_call(gemini: GeminiMock) -> None:
    with run_gateway(config(gemini)) as gw:
        with pytest.raises(openai.BadRequestError) as exc:
            sdk(gw).chat.completions.create(model="g", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}])
        assert "not valid base64" in exc.value.message
    assert gemini.calls == []


class City(BaseModel):
    name: str
    population: int | None = None
    tags: list[str]


def test_json_modes(gemini: GeminiMock) -> None:
    gemini.on(MODEL, Reply(body=response(text('{"name": "Oslo", "population": 700000, "tags": ["cold"]}'),
                                         meta=usage())))
    with run_gateway(config(gemini)) as gw:
        client = sdk(gw)
        c = client.chat.completions.create(model="g", messages=[USER], response_format={"type": "json_object"})
        assert json.loads(c.choices[0].message.content or "")["name"] == "Oslo"
        assert gemini.calls[-1].body["generationConfig"] == {"responseMimeType": "application/json"}

        parsed = client.chat.completions.parse(model="g", messages=[USER], response_format=City)
        assert parsed.choices[0].message.parsed == City(name="Oslo", population=700000, tags=["cold"])
    assert gemini.calls[-1].body["generationConfig"] == {
        "responseMimeType": "application/json",
        "responseSchema": {"type": "OBJECT", "properties": {
            "name": {"type": "STRING"},
            "population": {"nullable": True, "type": "INTEGER"},
            "tags": {"type": "ARRAY", "items": {"type": "STRING"}},
        }, "required": ["name", "population", "tags"]},
    }


# ---------------------------------------------------------------------------
# Finish reasons and errors
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(("reason", "expected"), [
    ("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"), ("RECITATION", "content_filter"),
    ("PROHIBITED_CONTENT", "content_filter"), ("SPII", "content_filter"), ("BLOCKLIST", "content_filter"),
])
def test_finish_reasons(gemini: GeminiMock, reason: str, expected: str) -> None:
    gemini.on(MODEL, Reply(body=response(text("partial"), finish=reason, meta=usage())))
    with run_gateway(config(gemini)) as gw:
        assert sdk(gw).chat.completions.create(model="g", messages=[USER]).choices[0].finish_reason == expected


def test_safety_stop_in_stream_is_content_filter(gemini: GeminiMock) -> None:
    gemini.on(MODEL, sse(response(text("Once upon"), finish=None), response(finish="SAFETY", meta=usage())))
    with run_gateway(config(gemini)) as gw:
        chunks = list(sdk(gw).chat.completions.create(model="g", stream=True, messages=[USER]))
    assert chunks[-1].choices[0].finish_reason == "content_filter"


@pytest.mark.parametrize("reason", ["MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "OTHER", "SOMETHING_NEW"])
def test_broken_finish_reasons_are_errors_never_a_stop(gemini: GeminiMock, reason: str) -> None:
    cand = {"index": 0, "finishReason": reason, "finishMessage": "Malformed function call: print(x"}
    if reason == "SOMETHING_NEW":
        gemini.on(MODEL, Reply(body={"candidates": [cand], "usageMetadata": usage()}))
    else:
        gemini.on(MODEL, Reply(body=response(candidates=[cand], meta=usage())))
    with run_gateway(config(gemini)) as gw:
        client = sdk(gw)
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model="g", messages=[USER])
        assert exc.value.status_code == 502 and reason in exc.value.message
        # With a next step, the route falls through to it.
        raw = client.chat.completions.with_raw_response.create(model="g-then-echo", messages=[USER])
        assert raw.headers["x-gateway-attempts"] == "2" and raw.headers["x-gateway-provider"] == "echo"


def test_malformed_function_call_mid_stream_is_an_error_event(gemini: GeminiMock) -> None:
    gemini.on(MODEL, sse(response(text("Calling the tool"), finish=None),
                         response(candidates=[{"index": 0, "finishReason": "MALFORMED_FUNCTION_CALL"}])))
    with run_gateway(config(gemini)) as gw:
        events = raw_stream(gw, {"model": "g-then-echo", "messages": [USER]})
        assert b"[DONE]" not in events[-1] and b"Calling the tool" in events[0]
        err = json.loads(events[-1][6:])["error"]
        assert err["code"] == "stream_interrupted" and "MALFORMED_FUNCTION_CALL" in err["message"]
        with pytest.raises(openai.APIError):
            for _ in sdk(gw).chat.completions.create(model="g", stream=True, messages=[USER]):
                pass


def test_mid_stream_error_event(gemini: GeminiMock) -> None:
    gemini.on(MODEL, sse(response(text("partial"), finish=None),
                         {"error": {"code": 500, "message": "Internal error encountered.", "status": "INTERNAL"}}))
    with run_gateway(config(gemini)) as gw:
        got: list[str] = []
        with pytest.raises(openai.APIError) as exc:
            for c in sdk(gw).chat.completions.create(model="g", stream=True, messages=[USER]):
                got.append(c.choices[0].delta.content or "")
        assert "".join(got) == "partial" and "Internal error encountered" in str(exc.value)
        events = raw_stream(gw, {"model": "g", "messages": [USER]})
        assert all(b"[DONE]" not in e for e in events)
        assert json.loads(events[-1][6:])["error"]["code"] == "stream_interrupted"


def test_cut_or_unfinished_stream_is_an_error_event(gemini: GeminiMock) -> None:
    gemini.on(MODEL, sse(response(text("a"), finish=None), response(text("b"), finish=None), reset_after=1),
              sse(response(text("a"), finish=None), response(text("b"), finish=None)))
    with run_gateway(config(gemini)) as gw:
        for _ in range(2):
            events = raw_stream(gw, {"model": "g", "messages": [USER]})
            assert b'"a"' in events[0] and b"[DONE]" not in events[-1]
            assert json.loads(events[-1][6:])["error"]["code"] == "stream_interrupted"


def test_errors_before_the_first_chunk_fall_through(gemini: GeminiMock) -> None:
    gemini.on(MODEL, error_reply(429, "Resource has been exhausted (e.g. check quota)."),
              sse({"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}),
              sse(response(candidates=[{"index": 0, "finishReason": "OTHER"}])))
    with run_gateway(config(gemini)) as gw:
        client = sdk(gw)
        raw = client.chat.completions.with_raw_response.create(model="g-then-echo", messages=[USER])
        assert raw.headers["x-gateway-provider"] == "echo" and raw.headers["x-gateway-attempts"] == "2"
        for _ in range(2):
            with client.chat.completions.with_streaming_response.create(
                    model="g-then-echo", stream=True, messages=[USER]) as resp:
                assert resp.headers["x-gateway-provider"] == "echo"
                assert "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices) == USER["content"]


def test_upstream_4xx_keeps_message_and_status(gemini: GeminiMock) -> None:
    gemini.on(MODEL, error_reply(400, "Invalid value at 'contents[0]': bad thing"))
    with run_gateway(config(gemini)) as gw:
        with pytest.raises(openai.BadRequestError) as exc:
            sdk(gw).chat.completions.create(model="g", messages=[USER])
        assert "bad thing" in exc.value.message and exc.value.body["code"] == "invalid_argument"


def test_bad_api_key_and_no_key_leak(gemini: GeminiMock) -> None:
    gemini.on(MODEL, Reply(body=response(text("x"))))
    with run_gateway(config(gemini, api_key="wrong-gemini-key-999")) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "g", "messages": [USER]})
        assert r.status_code == 400 and "API key not valid" in r.text
        assert "wrong-gemini-key-999" not in r.text and "wrong-gemini-key-999" not in gw.logs.getvalue()


def test_prompt_blocked_is_a_content_filter_400(gemini: GeminiMock) -> None:
    gemini.on(MODEL, Reply(body={"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": usage(8, 0)}))
    with run_gateway(config(gemini)) as gw:
        with pytest.raises(openai.BadRequestError) as exc:
            sdk(gw).chat.completions.create(model="g", messages=[USER])
        assert exc.value.body["code"] == "content_filter" and "SAFETY" in exc.value.message


def test_config_defaults_and_keys(tmp_path: Path) -> None:
    cfg = build_config({"api_key": "k", "providers": [{"name": "g", "type": "gemini", "api_key": "x",
                                                       "safety_settings": [{"category": "HARM_CATEGORY_HARASSMENT",
                                                                            "threshold": "BLOCK_NONE"}]}],
                        "routes": [{"name": "r", "steps": [{"provider": "g", "model": MODEL}]}]}, "t")
    assert cfg.providers["g"].base_url is None
    from at_gateway.http.pool import UpstreamClient
    from at_gateway.providers.gemini import GeminiProvider
    p = GeminiProvider(cfg.providers["g"], UpstreamClient())
    assert p.base == "https://generativelanguage.googleapis.com/v1beta"
    with pytest.raises(ConfigError) as exc:
        build_config({"api_key": "k", "providers": [{"name": "g", "type": "gemini", "project": "p"}]}, "t")
    assert "providers[0].project: unknown key" in str(exc.value)


def test_safety_settings_are_sent(gemini: GeminiMock) -> None:
    settings = [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_ONLY_HIGH"}]
    gemini.on(MODEL, Reply(body=response(text("x"), meta=usage())))
    with run_gateway(config(gemini, safety_settings=settings)) as gw:
        sdk(gw).chat.completions.create(model="g", messages=[USER])
    assert gemini.calls[-1].body["safetySettings"] == settings


# ---------------------------------------------------------------------------
# Golden fixtures: request and response pairs per mapping
# ---------------------------------------------------------------------------

GOLDEN = sorted(FIXTURES.glob("*.json"))


def _ids() -> Any:
    counter = itertools.count(1)
    return lambda: f"call_{next(counter)}"


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_golden(path: Path) -> None:
    case = json.loads(path.read_text())
    model = case["model"]
    cache = SignatureCache()
    for k, v in (case.get("signatures") or {}).items():
        cache.put(k, v)
    actual: dict[str, Any] = {
        "gemini_request": build_request(case["openai_request"], model, send_ids=not case.get("vertex"),
                                        signatures=cache)}
    new_id = _ids()
    if "gemini_response" in case:
        actual["openai_response"] = completion_from_gemini(case["gemini_response"], model, new_id=new_id,
                                                           signatures=cache, created=1700000000)
    if "gemini_events" in case:
        tr = StreamTranslator(model, new_id=new_id, signatures=cache, created=1700000000)
        chunks = [c for ev in case["gemini_events"] for c in tr.feed(ev)]
        actual["openai_chunks"] = chunks + tr.close(include_usage=True)
    if case.get("signatures_after") is not None or cache._items:
        actual["signatures_after"] = dict(cache._items)
    if os.environ.get("AT_GATEWAY_UPDATE_GOLDEN") == "1":  # as the anthropic goldens: "0" must not rewrite
        path.write_text(json.dumps({**case, **actual}, indent=2, ensure_ascii=False) + "\n")
        return
    for key, value in actual.items():
        assert value == case.get(key), f"{path.name}: {key} differs from the fixture"


def test_malformed_functions_and_finish_reason_are_failed_steps_not_crashes() -> None:
    """A ``functions`` that is not an array is the client's 400; a ``finishReason`` that is not a string is a
    failed step. Neither may escape as a TypeError (a bare 500 that skips the route's next step)."""
    with pytest.raises(StepFailed, match="'functions' must be an array") as exc:
        build_request({"messages": [USER], "functions": 1.5}, MODEL)
    assert exc.value.status == 400
    with pytest.raises(StepFailed, match="finishReason"):
        completion_from_gemini({"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": ["STOP"]}]},
                               MODEL)
    with pytest.raises(StepFailed, match="finishReason"):
        StreamTranslator(MODEL).feed({"candidates": [{"finishReason": {"r": 1}}]})


def test_an_echoed_key_in_a_long_error_page_is_redacted_whole(gemini: GeminiMock) -> None:
    """A non-JSON error page that echoes our key near the cut-off: the key must reach redaction whole,
    or its start would leak into the error the client sees and into the log."""
    gemini.on(MODEL, Reply(status=502, body=("<p>" + "x" * 272 + API_KEY + "</p>").encode()))
    with run_gateway(config(gemini)) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                       json={"model": "g", "messages": [USER]})
        logs = gw.logs.getvalue()
    assert r.status_code == 502 and "xxxx" in r.text
    assert API_KEY[:12] not in r.text and API_KEY[:12] not in logs


def test_without_ids_tool_results_follow_the_order_of_the_calls() -> None:
    """Vertex gets no ids and pairs function responses with calls by position, so tool messages that
    arrive in another order (OpenAI pairs them by tool_call_id) are put back in the calls' order."""
    messages = [USER, {"role": "assistant", "tool_calls": [
        {"id": "c-paris", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "c-nice", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Nice"}'}}]},
        {"role": "tool", "tool_call_id": "c-nice", "content": "rain"},
        {"role": "tool", "tool_call_id": "c-paris", "content": "sun"},
        {"role": "user", "content": "And tomorrow?"}]
    outputs = [p["functionResponse"]["response"]["output"]
               for p in build_request({"messages": messages}, MODEL, send_ids=False)["contents"][2]["parts"]]
    assert outputs == ["sun", "rain"]
    # With ids (the Gemini API) they pair by id, so the client's order stays.
    with_ids = build_request({"messages": messages}, MODEL)["contents"][2]["parts"]
    assert [(p["functionResponse"]["id"], p["functionResponse"]["response"]["output"]) for p in with_ids] == [
        ("c-nice", "rain"), ("c-paris", "sun")]
