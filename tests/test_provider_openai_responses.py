"""``type: openai`` with ``wire_api: responses``: the openai SDK as the client, the gateway, and a Responses
API mock that checks every request and everything it sends with the SDK's own types.

First the mock itself (the SDK straight against it, so the mock is known to speak what the SDK reads),
then chat completions through the gateway onto such a provider (translated both ways), then the native
methods the Responses door uses, then the configuration.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import openai
import pytest

from at_gateway.config import build_config, validate_provider
from at_gateway.errors import StepFailed
from at_gateway.http.pool import UpstreamClient
from at_gateway.providers import build_provider
from at_gateway.providers.base import StreamState
from at_gateway.providers.openai import OpenAIProvider
from at_gateway.providers.openai_responses import OpenAIResponsesProvider, StreamTranslator, to_responses
from tests.conftest import GATEWAY_KEY, base_config, run_gateway
from tests.mock_responses import (
    API_KEY,
    ResponsesMock,
    check_events,
    check_request,
    check_response,
    custom_tool_call,
    error_event,
    error_reply,
    failed_events,
    function_call,
    message,
    numbered,
    provider,
    reasoning,
    response,
    sse,
    stream_events,
    stream_reply,
    usage,
)
from tests.mock_upstream import MockUpstream, Received, Reply, chat_completion, stream_of

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]}}}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def oai(upstream: MockUpstream) -> Iterator[ResponsesMock]:
    mock = ResponsesMock(upstream)
    yield mock
    assert mock.problems == [], "the gateway sent requests the Responses API would refuse"


def config(upstream: MockUpstream, *routes: tuple[str, list[dict[str, Any]]], **extra: Any) -> dict[str, Any]:
    """A gateway config with a Responses provider ``oair`` on the mock (and base_config's chat ``up1``)."""
    cfg = base_config(upstream.url, [{"name": name, "steps": steps} for name, steps in routes])
    cfg["providers"].append(provider(upstream, **extra))
    return cfg


def one(model: str, route: str = "r") -> tuple[str, list[dict[str, Any]]]:
    return route, [{"provider": "oair", "model": model, "timeout": "10s"}]


def sdk(gw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=20)


def collect(stream: Any) -> tuple[list[Any], str, str, dict[int, dict[str, Any]], Any]:
    """(chunks, content, reasoning, tool calls by index, usage) of an openai SDK chat stream."""
    chunks = list(stream)
    content, thoughts, calls, used = "", "", {}, None
    for c in chunks:
        if c.usage is not None:
            used = c.usage
        for ch in c.choices:
            d = ch.delta
            content += d.content or ""
            thoughts += getattr(d, "reasoning_content", None) or ""
            for tc in d.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": "", "deltas": 0})
                call["deltas"] += 1
                if tc.id:
                    assert call["id"] is None and call["deltas"] == 1, "id and name come once, in the first delta"
                    call["id"], call["name"] = tc.id, tc.function.name
                call["arguments"] += (tc.function.arguments or "") if tc.function else ""
    return chunks, content, thoughts, calls, used


# ---------------------------------------------------------------------------
# The mock itself
# ---------------------------------------------------------------------------

def test_the_mock_speaks_what_the_sdk_reads(upstream: MockUpstream, oai: ResponsesMock) -> None:
    oai.on("gpt-a", lambda body: response(reasoning("Thinking.", encrypted_content="enc-1"), message("Hello there!"),
                                          usage=usage(10, 3, cached=4, reasoning=1)))
    client = openai.OpenAI(base_url=upstream.url + "/v1", api_key=API_KEY, max_retries=0)
    first = client.responses.create(model="gpt-a", input="hi", instructions="Be brief.")
    assert first.output_text == "Hello there!" and first.instructions == "Be brief." and first.model == "gpt-a"
    assert first.usage is not None and first.usage.input_tokens_details.cached_tokens == 4
    with client.responses.stream(model="gpt-a", input="hi", store=False,
                                 include=["reasoning.encrypted_content"]) as stream:
        kinds = [ev.type for ev in stream]
        final = stream.get_final_response()  # the SDK's accumulator took the whole sequence
    assert final.output_text == "Hello there!"
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    follow = client.responses.create(model="gpt-a", input="again", previous_response_id=first.id)
    assert follow.previous_response_id == first.id
    assert client.responses.retrieve(first.id).id == first.id
    assert final.id not in oai.stored  # store: false
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="gpt-a", input="x", previous_response_id="resp_unknown")
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "previous_response_not_found"
    assert info.value.body["param"] == "previous_response_id"
    oai.problems.clear()  # that refusal was the point


GOOD = {"model": "m", "input": [
    {"role": "developer", "content": "Be nice."},
    {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},  # as Codex sends
    {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
    {"type": "function_call_output", "call_id": "c1", "output": "x"},
    {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"}],
    "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": False},
              {"type": "custom", "name": "apply_patch", "description": "Patch files."}, {"type": "web_search"}],
    "include": ["reasoning.encrypted_content"], "store": False, "stream": True, "prompt_cache_key": "k",
    "reasoning": {"effort": "high", "summary": "auto"}, "parallel_tool_calls": True, "max_output_tokens": 16}


def _bad(path: str, value: Any) -> dict[str, Any]:
    """GOOD with ``value`` at ``path`` (dots and list indexes; ``...`` deletes)."""
    body = copy.deepcopy(GOOD)
    *parents, last = [int(x) if x.isdigit() else x for x in path.split(".")]
    node: Any = body
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return body


REFUSED = {
    "unknown top-level field": (_bad("temperatur", 1), "Unknown parameter: 'temperatur'"),
    "unknown nested field": (_bad("input.1.content.0.bogus", 1), "input[1].content[0].bogus"),
    "wrong type": (_bad("max_output_tokens", "20"), "max_output_tokens"),
    "below the minimum": (_bad("max_output_tokens", 1), "Expected a value >= 16"),
    "unknown effort": (_bad("reasoning.effort", "extreme"), "reasoning.effort"),
    "input_text in an assistant message": (_bad("input.2.content.0.type", "input_text"), "'output_text'"),
    "output without its call": (_bad("input.4.call_id", "c9"), "No tool call found"),
    "call without its output": (_bad("input.4", {"role": "user", "content": "?"}), "No tool output found"),
    "strict schema not strict": (_bad("tools.0.strict", True), "'additionalProperties' is required"),
    "omitted strict means strict": (_bad("tools.0.strict", ...), "'additionalProperties' is required"),
    "unknown tool choice": (_bad("tool_choice", {"type": "function", "name": "g"}), "Tool choice 'g' not found"),
    "stream_options without stream": ({**_bad("stream", False), "stream_options": {"include_obfuscation": False}},
                                      "stream_options is only allowed"),
    "reasoning item nobody kept": (_bad("input.5.encrypted_content", ...), "Items are not persisted"),
    "unknown item type": (_bad("input.0", {"type": "mystery"}), "Invalid value: 'mystery'"),
}


def _rec(body: dict[str, Any], key: str = API_KEY) -> Received:
    return Received("POST", "/v1/responses", {"authorization": f"Bearer {key}", "content-type": "application/json"},
                    json.dumps(body).encode())


@pytest.mark.parametrize("case", sorted(REFUSED), ids=sorted(REFUSED))
def test_the_mock_refuses_what_the_api_refuses(case: str) -> None:
    assert check_request(_rec(GOOD)) == []
    body, expected = REFUSED[case]
    problems = [str(p) for p in check_request(_rec(body))]
    assert problems and any(expected in p for p in problems), problems


def test_the_mock_checks_its_own_answers() -> None:
    with pytest.raises(AssertionError, match="does not know"):
        check_response({**response(message("x")), "surprise": 1})
    with pytest.raises(AssertionError, match="Response"):
        check_response({**response(message("x")), "created_at": "yesterday"})
    events = stream_events(response(message("Hello"), function_call("c1", "f", {"a": 1})))
    delta = next(e for e in events if e["type"] == "response.output_text.delta")
    with pytest.raises(AssertionError, match="accumulator"):  # a delta before its item was added
        check_events(numbered([events[0], {k: v for k, v in delta.items() if k != "sequence_number"}]))
    with pytest.raises(AssertionError, match="sequence_number"):
        check_events([events[0], {**events[1], "sequence_number": 5}])
    kinds = [e["type"] for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.output_item.added", *["response.function_call_arguments.delta"] * 2,
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert sse(events[0]).startswith(b"event: response.created\ndata: {")
    failing = failed_events("insufficient_quota", "Quota exceeded", message("partial"))
    assert failing[-1]["type"] == "response.failed" and failing[-1]["response"]["error"]["code"] == "insufficient_quota"
    assert error_event("server_error", "boom", 3)["sequence_number"] == 3
    custom = [e["type"] for e in stream_events(response(custom_tool_call("c2", "apply_patch", "*** Begin")))]
    assert custom[2:] == ["response.output_item.added", *["response.custom_tool_call_input.delta"] * 3,
                          "response.custom_tool_call_input.done", "response.output_item.done", "response.completed"]


# ---------------------------------------------------------------------------
# Chat completions through the gateway onto a Responses upstream
# ---------------------------------------------------------------------------

def test_text_non_stream(upstream: MockUpstream, oai: ResponsesMock) -> None:
    oai.on("gpt-r", lambda body: response(message("Hello!"), usage=usage(330, 3, cached=300, reasoning=1)))
    with run_gateway(config(upstream, one("gpt-r"))) as gw:
        raw = sdk(gw).chat.completions.with_raw_response.create(
            model="r", messages=[{"role": "system", "content": "Be brief."},
                                 {"role": "developer", "content": "No emoji."}, {"role": "user", "content": "hi"}],
            temperature=0.3, top_p=0.9, max_tokens=1, reasoning_effort="low", user="u-1", prompt_cache_key="pk",
            stop=["STOP"], seed=7, metadata={"team": "a"})
        resp = raw.parse()
        logged = gw.request_logs()[-1]
    assert raw.headers["x-gateway-provider"] == "oair"
    assert resp.choices[0].message.content == "Hello!" and resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (330, 3)
    assert resp.usage.prompt_tokens_details is not None and resp.usage.prompt_tokens_details.cached_tokens == 300
    assert resp.usage.completion_tokens_details is not None
    assert resp.usage.completion_tokens_details.reasoning_tokens == 1
    rec = upstream.received[-1]
    assert rec.path == "/v1/responses" and rec.headers["authorization"] == f"Bearer {API_KEY}"
    assert rec.json == {
        "model": "gpt-r", "store": False,
        "input": [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "No emoji."},
                  {"role": "user", "content": "hi"}],
        "max_output_tokens": 16,  # raised to the API's minimum: a max_tokens: 1 probe must not fail
        "reasoning": {"effort": "low"}, "temperature": 0.3, "top_p": 0.9, "user": "u-1", "prompt_cache_key": "pk",
        "metadata": {"team": "a"}}  # stop and seed: the Responses API has neither
    assert logged["tokens"]["prompt_tokens"] == 330 and logged["tokens"]["completion_tokens"] == 3


def test_text_stream_with_usage(upstream: MockUpstream, oai: ResponsesMock) -> None:
    oai.on("gpt-r", lambda body: response(reasoning("Short thought."), message("Hello from a stream"),
                                          usage=usage(7, 5, cached=2, reasoning=2)))
    with run_gateway(config(upstream, one("gpt-r"))) as gw:
        chunks, content, thoughts, calls, used = collect(sdk(gw).chat.completions.create(
            model="r", stream=True, stream_options={"include_usage": True}, max_completion_tokens=77, messages=HI))
        logged = gw.request_logs()[-1]
    assert content == "Hello from a stream" and thoughts == "Short thought." and not calls
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # deltas, not one blob
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and (used.prompt_tokens, used.completion_tokens, used.total_tokens) == (7, 5, 12)
    assert used.prompt_tokens_details.cached_tokens == 2 and used.completion_tokens_details.reasoning_tokens == 2
    sent = upstream.received[-1].json
    assert sent["stream"] is True and sent["max_output_tokens"] == 77 and "stream_options" not in sent
    assert logged["tokens"]["total_tokens"] == 12


def test_stream_without_include_usage_still_counts(upstream: MockUpstream, oai: ResponsesMock) -> None:
    oai.on("gpt-r", lambda body: response(message("ok")))
    with run_gateway(config(upstream, one("gpt-r"))) as gw:
        chunks, content, *_ = collect(sdk(gw).chat.completions.create(model="r", stream=True, messages=HI))
        logged = gw.request_logs()[-1]
    assert content == "ok" and all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert logged["tokens"] == {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}


def _weather(body: dict[str, Any]) -> dict[str, Any]:
    """Turn 1 asks for two tools; turn 2 (their outputs back) answers in text."""
    if body["input"][-1].get("type") == "function_call_output":
        return response(message("Paris 18C, Rome 24C."), usage=usage(90, 9))
    return response(message("Checking."), function_call("call_Paris", "get_weather", {"city": "Paris"}),
                    function_call("call_Rome", "get_weather", {"city": "Rome"}), usage=usage(50, 30))


def _second_turn(assistant: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": "Weather in Paris and Rome?"}, assistant,
            {"role": "tool", "tool_call_id": "call_Paris", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_Rome", "content": [{"type": "text", "text": "24C"}]}]


@pytest.mark.parametrize("streaming", [False, True], ids=["json", "stream"])
def test_tools_over_two_turns(upstream: MockUpstream, oai: ResponsesMock, streaming: bool) -> None:
    oai.on("gpt-t", _weather)
    with run_gateway(config(upstream, one("gpt-t"))) as gw:
        client = sdk(gw)
        first = {"model": "r", "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": True,
                 "messages": [{"role": "user", "content": "Weather in Paris and Rome?"}]}
        if streaming:
            chunks, content, _, calls, _ = collect(client.chat.completions.create(stream=True, **first))
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
            assert all(calls[i]["deltas"] > 2 for i in (0, 1))  # arguments come as fragments
            got = [(calls[i]["id"], calls[i]["name"], json.loads(calls[i]["arguments"])) for i in (0, 1)]
            assistant = {"role": "assistant", "content": content, "tool_calls": [
                {"id": calls[i]["id"], "type": "function",
                 "function": {"name": calls[i]["name"], "arguments": calls[i]["arguments"]}} for i in (0, 1)]}
        else:
            choice = client.chat.completions.create(**first).choices[0]
            assert choice.finish_reason == "tool_calls"
            content = choice.message.content or ""
            got = [(c.id, c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
            assistant = choice.message.model_dump(exclude_none=True)
        assert content == "Checking."
        assert got == [("call_Paris", "get_weather", {"city": "Paris"}), ("call_Rome", "get_weather", {"city": "Rome"})]
        if streaming:
            _, answer, *_ = collect(client.chat.completions.create(model="r", stream=True, tools=[WEATHER],
                                                                   messages=_second_turn(assistant)))
        else:
            answer = client.chat.completions.create(model="r", tools=[WEATHER],
                                                    messages=_second_turn(assistant)).choices[0].message.content
    assert answer == "Paris 18C, Rome 24C."
    turn1, turn2 = oai.requests
    assert turn1["tools"] == [{"type": "function", "name": "get_weather", "description": "Current weather for a city",
                               "parameters": WEATHER["function"]["parameters"], "strict": False}]
    assert turn1["tool_choice"] == "required" and turn1["parallel_tool_calls"] is True
    assert turn2["input"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking."},
        {"type": "function_call", "call_id": "call_Paris", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "call_Rome", "name": "get_weather", "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "call_Paris", "output": "18C"},
        {"type": "function_call_output", "call_id": "call_Rome", "output": "24C"}]


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
PERSON = {"name": "person", "strict": True, "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"], "additionalProperties": False}}
STRICT_CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
               "additionalProperties": False}
MAPPED = {  # chat request fields -> what the Responses request carries
    "json_schema": ({"response_format": {"type": "json_schema", "json_schema": PERSON}, "verbosity": "low"},
                    {"text": {"format": {"type": "json_schema", **PERSON}, "verbosity": "low"}}),
    "json_object": ({"response_format": {"type": "json_object"}}, {"text": {"format": {"type": "json_object"}}}),
    "named tool": ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                   {"tool_choice": {"type": "function", "name": "get_weather"}}),
    "allowed tools": ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "allowed_tools": {
        "mode": "auto", "tools": [{"type": "function", "function": {"name": "get_weather"}}]}}},
        {"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "function",
                                                                             "name": "get_weather"}]}}),
    "strict tool": ({"tools": [{"type": "function", "function": {**WEATHER["function"], "strict": True,
                                                                 "parameters": STRICT_CITY}}]},
                    {"tools": [{"type": "function", "name": "get_weather", "parameters": STRICT_CITY, "strict": True,
                                "description": "Current weather for a city"}]}),
    "images and files": ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
        {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{PNG}", "filename": "a.pdf"}}]}]},
        {"input": [{"role": "user", "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}", "detail": "low"},
            {"type": "input_image", "image_url": "https://example.com/a.jpg", "detail": "auto"},
            {"type": "input_file", "file_data": f"data:application/pdf;base64,{PNG}", "filename": "a.pdf"}]}]}),
}


@pytest.mark.parametrize("case", sorted(MAPPED), ids=sorted(MAPPED))
def test_request_mapping(upstream: MockUpstream, oai: ResponsesMock, case: str) -> None:
    chat, expected = MAPPED[case]
    oai.on("gpt-m", lambda body: response(message('{"name":"Ada","age":36}')))
    with run_gateway(config(upstream, one("gpt-m"))) as gw:
        r = sdk(gw).chat.completions.create(model="r", **{"messages": HI, **chat})
    assert r.choices[0].message.content == '{"name":"Ada","age":36}'
    sent = oai.requests[-1]
    for key, value in expected.items():
        assert sent[key] == value


FINISHES = {
    "incomplete: max_output_tokens": (response(message("Trunc"), incomplete="max_output_tokens"), "length"),
    "incomplete: content_filter": (response(message("Hm"), incomplete="content_filter"), "content_filter"),
    "refusal": (response(message(refusal="I can't help with that.")), "stop"),
}


@pytest.mark.parametrize("case", sorted(FINISHES), ids=sorted(FINISHES))
def test_finish_reasons(upstream: MockUpstream, oai: ResponsesMock, case: str) -> None:
    answer, finish = FINISHES[case]
    oai.on("gpt-f", lambda body: copy.deepcopy(answer))
    with run_gateway(config(upstream, one("gpt-f"))) as gw:
        r = sdk(gw).chat.completions.create(model="r", messages=HI)
        chunks = list(sdk(gw).chat.completions.create(model="r", stream=True, messages=HI))
    assert r.choices[0].finish_reason == finish == chunks[-1].choices[0].finish_reason
    streamed_refusal = "".join(c.choices[0].delta.refusal or "" for c in chunks if c.choices)
    if case == "refusal":
        assert r.choices[0].message.refusal == streamed_refusal == "I can't help with that."
        assert r.choices[0].message.content is None
    else:
        assert r.choices[0].message.content == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# ---------------------------------------------------------------------------
# Errors and fallback
# ---------------------------------------------------------------------------

def test_upstream_errors_are_the_sdks_exceptions(upstream: MockUpstream, oai: ResponsesMock) -> None:
    oai.on("gpt-400", lambda body: error_reply(400, "Invalid 'input[0]': too long.", code="string_above_max_length",
                                               param="input[0]"))
    oai.on("gpt-429", lambda body: error_reply(429, "Rate limit reached for requests", "requests",
                                               "rate_limit_exceeded", headers={"retry-after": "1"}))
    with run_gateway(config(upstream, one("gpt-400"), one("gpt-429", "limited"))) as gw:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as bad:
                sdk(gw).chat.completions.create(model="r", stream=stream, messages=HI)
            assert "too long" in bad.value.message and isinstance(bad.value.body, dict)
            assert bad.value.body["code"] == "string_above_max_length"
        with pytest.raises(openai.RateLimitError) as limited:
            sdk(gw).chat.completions.create(model="limited", messages=HI)
    assert "Rate limit reached" in limited.value.message and API_KEY not in limited.value.message


def _partial(text: str, upto: int) -> list[dict[str, Any]]:
    """The first ``upto`` events of a text stream (created, in_progress, item, part, deltas...)."""
    return stream_events(response(message(text)), piece=5)[:upto]


EARLY = {  # failures before any content: the route falls through to the chat upstream
    "http-500": error_reply(500, "The server had an error", "server_error"),
    "http-429-insufficient-quota": error_reply(429, "You exceeded your current quota", "insufficient_quota",
                                               "insufficient_quota"),
    "response.failed-after-created": stream_reply(failed_events("server_error", "Something went wrong")),
    "error-event-after-created": stream_reply([*_partial("x", 2), error_event("server_error", "boom", 2)]),
    "cut-before-content": stream_reply(stream_events(response(message("Hello"))), reset_after=3),
    "2xx-failed-response": Reply(body=response(status="failed", error={"code": "server_error", "message": "odd"},
                                               usage=None)),
    "2xx-not-a-response": Reply(body=chat_completion("I am a chat completion")),
}
EARLY_CASES = [(f, False) for f, r in sorted(EARLY.items()) if r.sse is None] + [(f, True) for f in sorted(EARLY)]


@pytest.mark.parametrize(("failure", "streaming"), EARLY_CASES,
                         ids=[f"{f}-{'stream' if s else 'json'}" for f, s in EARLY_CASES])
def test_early_failures_fall_through(upstream: MockUpstream, oai: ResponsesMock, failure: str,
                                     streaming: bool) -> None:
    reply = EARLY[failure]
    oai.on("gpt-bad", lambda body: reply)
    upstream.replies["gpt-next"] = Reply(sse=stream_of("from", " chat")) if streaming else \
        Reply(body=chat_completion("from chat"))
    route = ("fb", [{"provider": "oair", "model": "gpt-bad", "timeout": "10s"},
                    {"provider": "up1", "model": "gpt-next", "timeout": "10s"}])
    with run_gateway(config(upstream, route)) as gw:
        client = sdk(gw)
        if streaming:
            with client.chat.completions.with_streaming_response.create(model="fb", stream=True,
                                                                        messages=HI) as resp:
                assert resp.headers["x-gateway-attempts"] == "2" and resp.headers["x-gateway-provider"] == "up1"
                assert "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices) == "from chat"
        else:
            raw = client.chat.completions.with_raw_response.create(model="fb", messages=HI)
            assert raw.headers["x-gateway-attempts"] == "2" and raw.headers["x-gateway-provider"] == "up1"
            assert raw.parse().choices[0].message.content == "from chat"
    assert upstream.received[0].path == "/v1/responses" and upstream.received[-1].path == "/chat/completions"


LATE = {  # failures after content went out: the chat stream ends with its error event, never [DONE]
    "reset": (stream_reply(stream_events(response(message("Hello world, this is long"))), reset_after=7),
              "interrupted"),
    "response.failed": (stream_reply([*_partial("Hello world", 6), *numbered(
        [{"type": "response.failed", "response": response(status="failed", usage=None, error={
            "code": "rate_limit_exceeded", "message": "Rate limit reached. Please try again in 2s."})}], 6)]),
        "rate_limit_exceeded: Rate limit reached"),
    "error event": (stream_reply([*_partial("Hello world", 6), error_event("server_error", "The model crashed", 6)]),
                    "server_error: The model crashed"),
    "clean end without response.completed": (stream_reply(stream_events(response(message("Hello world")))[:-1]),
                                             "before response.completed"),
}


@pytest.mark.parametrize("case", sorted(LATE), ids=sorted(LATE))
def test_mid_stream_failures_are_visible(upstream: MockUpstream, oai: ResponsesMock, case: str) -> None:
    reply, expected = LATE[case]
    oai.on("gpt-cut", lambda body: reply)
    with run_gateway(config(upstream, one("gpt-cut"))) as gw:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", headers={"x-api-key": GATEWAY_KEY},
                          json={"model": "r", "stream": True, "messages": HI}) as resp:
            lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    with run_gateway(config(upstream, one("gpt-cut"))) as gw:  # a fresh one: a 429 cools the provider's key
        got = ""
        with pytest.raises(openai.APIError):
            for c in sdk(gw).chat.completions.create(model="r", stream=True, messages=HI):
                got += (c.choices[0].delta.content or "") if c.choices else ""
    assert got.startswith("Hello") and "data: [DONE]" not in lines
    err = json.loads(lines[-1][6:])["error"]
    assert err["code"] == "stream_interrupted" and expected in err["message"]


def test_untranslatable_request_falls_through(upstream: MockUpstream, oai: ResponsesMock) -> None:
    upstream.replies["gpt-next"] = Reply(body=chat_completion("two choices elsewhere"))
    route = ("fb", [{"provider": "oair", "model": "gpt-x", "timeout": "10s"},
                    {"provider": "up1", "model": "gpt-next", "timeout": "10s"}])
    with run_gateway(config(upstream, route, one("gpt-x"))) as gw:
        r = sdk(gw).chat.completions.create(model="fb", n=2, messages=HI)
        with pytest.raises(openai.BadRequestError, match="n > 1"):
            sdk(gw).chat.completions.create(model="r", n=2, messages=HI)
    assert r.choices[0].message.content == "two choices elsewhere"
    assert not oai.requests and all(rec.path == "/chat/completions" for rec in upstream.received)


def test_models_list_is_unaffected(upstream: MockUpstream, oai: ResponsesMock) -> None:
    with run_gateway(config(upstream, one("gpt-r"), one("gpt-r", "other"))) as gw:
        ids = [m.id for m in sdk(gw).models.list()]
    assert sorted(ids) == ["other", "r"] and not upstream.received


# ---------------------------------------------------------------------------
# Native: what the Responses door calls (send_native / stream_native), on real sockets
# ---------------------------------------------------------------------------

def _native(upstream: MockUpstream, body: dict[str, Any], stream: bool,
            headers: list[tuple[bytes, bytes]] | None = None) -> tuple[Any, StreamState]:
    """Run one native call of a built provider against the mock: (bytes or events, state)."""
    cfg = build_config({"api_key": "k", "providers": [provider(upstream)], "routes": []}, "t")
    step = build_config({"api_key": "k", "providers": [provider(upstream)],
                         "routes": [{"name": "r", "steps": [{"provider": "oair", "model": body["model"]}]}]},
                        "t").routes["r"].steps[0]

    async def go() -> tuple[Any, StreamState]:
        client = UpstreamClient()
        adapter = build_provider(cfg.providers["oair"], client)
        state = StreamState()
        try:
            assert adapter.native("responses", step) and not adapter.native("anthropic.messages", step)
            if not stream:
                return await adapter.send_native("responses", body, step, headers or []), state
            out = []
            async for chunk in adapter.stream_native("responses", body, step, state, headers or []):
                out.append(chunk)
            return out, state
        finally:
            await client.aclose()

    return anyio.run(go)


CODEX = {"model": "gpt-codex", "instructions": "You are Codex.", "store": False, "stream": True,
         "include": ["reasoning.encrypted_content"], "prompt_cache_key": "session-1", "parallel_tool_calls": False,
         "reasoning": {"effort": "medium", "summary": "auto"}, "tool_choice": "auto",
         "tools": [{"type": "custom", "name": "apply_patch", "description": "Patch files.",
                    "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}},
                   {"type": "web_search"}],
         "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Fix it."}]},
                   {"type": "reasoning", "id": "rs_prev", "summary": [], "encrypted_content": "opaque-prev"},
                   {"type": "custom_tool_call", "call_id": "call_p1", "name": "apply_patch", "input": "*** Begin"},
                   {"type": "custom_tool_call_output", "call_id": "call_p1", "output": "Done."}]}


def test_native_stream_passes_events_through(upstream: MockUpstream, oai: ResponsesMock) -> None:
    answer = response(reasoning("Patching.", encrypted_content="opaque-new"),
                      custom_tool_call("call_p2", "apply_patch", "*** Begin Patch\n*** End Patch"),
                      usage=usage(1200, 40, cached=1000, reasoning=12))
    sent_events = stream_events(answer)
    oai.on("gpt-codex", lambda body: stream_reply(sent_events))
    chunks, state = _native(upstream, CODEX, stream=True, headers=[(b"openai-beta", b"responses=v1"),
                                                                   (b"authorization", b"Bearer client-key")])
    assert b"".join(chunks) == b"".join(sse(ev) for ev in sent_events)  # byte for byte, in order
    assert state.usage == {"prompt_tokens": 1200, "completion_tokens": 40, "total_tokens": 1240,
                           "prompt_tokens_details": {"cached_tokens": 1000},
                           "completion_tokens_details": {"reasoning_tokens": 12}}
    rec = upstream.received[-1]
    assert rec.json == CODEX  # as the client sent it
    assert rec.headers["openai-beta"] == "responses=v1" and rec.headers["authorization"] == f"Bearer {API_KEY}"


def test_native_whole_answer(upstream: MockUpstream, oai: ResponsesMock) -> None:
    oai.on("gpt-codex", lambda body: response(message("Done."), usage=usage(20, 2)))
    done, _ = _native(upstream, {**CODEX, "stream": False}, stream=False)
    obj = json.loads(done.body)
    assert obj["object"] == "response" and obj["output"][0]["content"][0]["text"] == "Done."
    assert obj["tools"][0]["name"] == "apply_patch"  # the upstream's own echo, untouched
    assert done.usage["prompt_tokens"] == 20 and done.usage["completion_tokens"] == 2


NATIVE_FAILURES: dict[str, tuple[Any, int | None]] = {
    "response.failed rate_limit_exceeded": (failed_events(
        "rate_limit_exceeded", "Rate limit reached. Please try again in 1.5s.", message("partial")), 429),
    "response.failed insufficient_quota": (failed_events("insufficient_quota", "No quota"), 429),
    "response.failed context_length_exceeded": (failed_events("context_length_exceeded", "Too long"), 400),
    "response.failed server_error": (failed_events("server_error", "Oops"), 500),
    "error event": ([*stream_events(response(message("x")))[:2], error_event("invalid_prompt", "Bad prompt", 2)],
                    400),
    "end without response.completed": (stream_events(response(message("Hello")))[:-1], None),
    # Not the documented shape (the SDK's type would refuse it, so it is written by hand): a nested error.
    "nested error event server_error": (Reply(sse=[sse(stream_events(response())[0]), b'event: error\ndata: '
                                                   b'{"type":"error","error":{"code":"server_error","message":"x"}}\n\n'],
                                              done=False), 500),
}


@pytest.mark.parametrize("case", sorted(NATIVE_FAILURES), ids=sorted(NATIVE_FAILURES))
def test_native_stream_failures(upstream: MockUpstream, oai: ResponsesMock, case: str) -> None:
    events, status = NATIVE_FAILURES[case]
    oai.on("gpt-codex", lambda body: events if isinstance(events, Reply) else stream_reply(events))
    with pytest.raises(StepFailed) as info:
        _native(upstream, CODEX, stream=True)
    assert info.value.status == status
    if status is not None:
        code = "invalid_prompt" if case == "error event" else case.split()[-1]
        assert info.value.error is not None and info.value.error["code"] == code
    assert info.value.retry_after == (1.5 if "rate_limit" in case else None)  # from "try again in 1.5s"


def test_native_http_errors(upstream: MockUpstream, oai: ResponsesMock) -> None:
    oai.on("gpt-codex", lambda body: error_reply(429, "You exceeded your current quota", "insufficient_quota",
                                                 "insufficient_quota", headers={"retry-after": "3"}))
    for stream in (False, True):
        with pytest.raises(StepFailed) as info:
            _native(upstream, {**CODEX, "stream": stream}, stream=stream)
        assert info.value.status == 429 and info.value.retry_after == 3
        assert info.value.error is not None and info.value.error["code"] == "insufficient_quota"


# ---------------------------------------------------------------------------
# Pure parts and configuration
# ---------------------------------------------------------------------------

def test_translator_fast_path_equals_the_decoded_path() -> None:
    events = stream_events(response(message('He said "hi" \\ é ✓\n')), piece=3)
    fast, slow = StreamTranslator(True, "m"), StreamTranslator(True, "m")
    fast_out: list[bytes] = []
    slow_out: list[bytes] = []
    for ev in events:
        framed = sse(ev)
        fast.feed(framed, fast_out)
        slow.feed(b"data: " + json.dumps(ev).encode() + b"\n\n", slow_out)  # no event: line, so decoded
    assert [json.loads(c[6:]) for c in fast_out] == [json.loads(c[6:]) for c in slow_out]
    text = "".join(json.loads(c[6:])["choices"][0]["delta"].get("content") or ""
                   for c in fast_out if json.loads(c[6:])["choices"])
    assert text == 'He said "hi" \\ é ✓\n'


def test_translation_refuses_what_it_cannot_say() -> None:
    for body, match in (({"messages": HI, "n": 3}, "n > 1"),
                        ({"messages": HI, "modalities": ["text", "audio"]}, "audio"),
                        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "role 'function'"),
                        ({"messages": HI, "tools": [{"type": "custom", "custom": {"name": "x"}}]}, "only function"),
                        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
                         "input_audio")):
        with pytest.raises(StepFailed, match=match) as info:
            to_responses(body, "m")
        assert info.value.status == 400


WIRE_API_PROBLEMS = {
    "unknown value": ({"wire_api": "assistants"}, "providers[0].wire_api: must be chat (POST /chat/completions, "
                                                  "the default) or responses"),
    "not a string": ({"wire_api": ["responses"]}, "providers[0].wire_api: must be chat"),
    "stream_usage has no effect": ({"wire_api": "responses", "stream_usage": False},
                                   "providers[0].stream_usage: only for wire_api: chat"),
}


@pytest.mark.parametrize("case", sorted(WIRE_API_PROBLEMS), ids=sorted(WIRE_API_PROBLEMS))
def test_wire_api_is_checked(case: str) -> None:
    extra, problem = WIRE_API_PROBLEMS[case]
    with pytest.raises(Exception) as info:
        build_config({"api_key": "k", "providers": [{"name": "o", "type": "openai", "base_url": "http://h", **extra}],
                      "routes": []}, "t")
    assert problem in str(info.value)


def test_wire_api_picks_the_adapter() -> None:
    built = {}
    for wire in (None, "chat", "responses"):
        spec = {"name": "o", "type": "openai", "preset": "openai", **({"wire_api": wire} if wire else {})}
        cfg, problems = validate_provider(spec)
        assert problems == [] and cfg is not None
        built[wire] = build_provider(cfg, UpstreamClient())
    assert type(built[None]) is OpenAIProvider and type(built["chat"]) is OpenAIProvider
    responses = built["responses"]
    assert isinstance(responses, OpenAIResponsesProvider)
    assert responses.responses_url == "https://api.openai.com/v1/responses"
    assert not built["chat"].native("responses", None)  # type: ignore[arg-type]
    _, problems = validate_provider({"name": "a", "type": "azure", "base_url": "https://x.openai.azure.com",
                                     "wire_api": "responses"})
    assert any("wire_api" in p for p in problems)  # an openai option only
