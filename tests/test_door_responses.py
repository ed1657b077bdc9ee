"""The Responses door: ``POST /v1/responses`` and ``GET``/``DELETE /v1/responses/{id}``, with the ``openai`` SDK as
the client, through the gateway to the wire-checking mocks: OpenAI chat (MockUpstream), Anthropic, Gemini, Vertex
express (translated) and a Responses upstream (``wire_api: responses``, native).

What the gateway sends is checked by the mocks (and asserted on); what it answers is checked with the SDK's own
types, strictly (``tests.mock_responses.check_response``/``check_events``: unknown fields, wrong types, and the
SDK's stream accumulator over the whole event sequence).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from at_gateway.service import open_services
from at_gateway.store import db
from at_gateway.store.keys import KeyStore
from tests import mock_anthropic as ma
from tests import mock_google as mg
from tests import mock_responses as mr
from tests.conftest import GATEWAY_KEY, RunningGateway, base_config, run_gateway
from tests.mock_upstream import MockUpstream, Received, Reply, chat_completion, chunk, stream_of, wait_until
from tests.test_service import gateway_process

OTHER_KEY = "test-gateway-key-456"
UPSTREAM_SECRETS = ("sk-upstream-secret-1", "sk-upstream-secret-2", ma.API_KEY, mg.API_KEY, mr.API_KEY)
ROUTES = [
    {"name": "gpt", "steps": [{"provider": "up1", "model": "gpt-4o-mini"}]},
    {"name": "o3", "steps": [{"provider": "up1", "model": "o3-mini"}]},
    {"name": "tools", "steps": [{"provider": "up1", "model": "tool-model"}]},
    {"name": "streamer", "steps": [{"provider": "up1", "model": "stream-model"}]},
]
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
PATCH = {"type": "custom", "name": "apply_patch", "description": "Apply a patch to files",
         "format": {"type": "grammar", "syntax": "lark", "definition": "start: begin_patch hunk+ end_patch"}}
USAGE = {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16,
         "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 2}}


def sdk(gw: RunningGateway, key: str = GATEWAY_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=20)


def config(upstream: MockUpstream, routes: list[dict[str, Any]] | None = None, tmp_path: Path | None = None,
           **top: Any) -> dict[str, Any]:
    """The gateway's config; with ``tmp_path`` a store file (responses are kept), else in memory."""
    cfg = base_config(upstream.url, routes or ROUTES, api_keys=[GATEWAY_KEY, OTHER_KEY], **top)
    del cfg["api_key"]
    if tmp_path is not None:
        cfg["store"] = {"path": str(tmp_path / "gw.db")}
    return cfg


@contextmanager
def gateway(raw: dict[str, Any]) -> Iterator[RunningGateway]:
    """A gateway with its services opened as ``serve`` opens them (the kept responses among them)."""
    with run_gateway(raw, services=open_services) as gw:
        yield gw
        for secret in UPSTREAM_SECRETS:
            assert secret not in gw.logs.getvalue()


def events_of(raw: bytes) -> list[dict[str, Any]]:
    """The ``data:`` objects of an SSE body, each checked to be named by its ``event:`` line."""
    out = []
    for block in raw.decode().split("\n\n"):
        lines = block.strip().splitlines()
        data = [ln[6:] for ln in lines if ln.startswith("data: ")]
        if not data:
            continue
        obj = json.loads(data[0])
        assert f"event: {obj['type']}" in lines, block
        out.append(obj)
    return out


def raw_stream(gw: RunningGateway, body: dict[str, Any], key: str = GATEWAY_KEY) -> httpx.Response:
    r = httpx.post(gw.url + "/v1/responses", json={**body, "stream": True}, timeout=20,
                   headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream", r.text
    return r


def types_of(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"].removeprefix("response.") for e in events]


def tool_stream(call_id: str, name: str, arguments: str, piece: int = 5, text: str | None = None) -> list[Any]:
    """An OpenAI chat stream that (after ``text``, if any) calls one tool, its arguments in pieces."""
    events: list[Any] = [chunk("", role=True)]
    if text:
        events.append(chunk(text))
    head = chunk()
    head["choices"][0]["delta"] = {"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                                   "function": {"name": name, "arguments": ""}}]}
    events.append(head)
    for i in range(0, len(arguments), piece):
        c = chunk()
        c["choices"][0]["delta"] = {"tool_calls": [{"index": 0, "function": {"arguments": arguments[i:i + piece]}}]}
        events.append(c)
    events.append(chunk(finish="tool_calls"))
    events.append(chunk(choices=False, usage={"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}))
    return events


def tool_completion(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    done = chat_completion("", usage={"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16})
    done["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]}
    done["choices"][0]["finish_reason"] = "tool_calls"
    return done


# -- translated: the request ------------------------------------------------------------------------------------

def test_a_response_on_an_openai_chat_step(upstream: MockUpstream) -> None:
    upstream.replies["gpt-4o-mini"] = Reply(body=chat_completion("Paris.", model="gpt-4o-mini", usage=USAGE))
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    with gateway(config(upstream)) as gw:
        raw = sdk(gw).responses.with_raw_response.create(
            model="gpt", input="Capital of France?", instructions="Answer in one word.", max_output_tokens=50,
            reasoning={"effort": "low", "summary": "auto"}, temperature=0.2, top_p=0.9, prompt_cache_key="conv-1",
            safety_identifier="user-7", store=False, metadata={"ticket": "42"},
            text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True},
                  "verbosity": "low"})
        resp = raw.parse()
        body = json.loads(raw.text)
        log = gw.request_logs()[-1]
    assert upstream.received[-1].path == "/chat/completions"
    assert upstream.received[-1].json == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "Answer in one word."},
                     {"role": "user", "content": "Capital of France?"}],
        "max_tokens": 50, "reasoning_effort": "low", "temperature": 0.2, "top_p": 0.9, "prompt_cache_key": "conv-1",
        "safety_identifier": "user-7", "verbosity": "low",
        "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}}
    mr.check_response(body)  # the SDK's Response, strictly: no unknown field, no wrong type
    assert resp.id.startswith("resp_") and resp.object == "response" and resp.status == "completed"
    assert resp.output_text == "Paris." and resp.model == "gpt-4o-mini"
    assert [o.type for o in resp.output] == ["message"]
    assert resp.instructions == "Answer in one word." and resp.metadata == {"ticket": "42"}
    assert resp.usage is not None and resp.usage.input_tokens == 11 and resp.usage.output_tokens == 5
    assert resp.usage.input_tokens_details.cached_tokens == 4
    assert resp.usage.output_tokens_details.reasoning_tokens == 2 and resp.usage.total_tokens == 16
    assert raw.headers["x-gateway-route"] == "gpt" and "x-gateway-warning" not in raw.headers
    assert log["door"] == "responses" and log["route"] == "gpt" and log["status"] == 200
    assert log["tokens"] == {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}


ITEMS_IN = [
    {"type": "message", "role": "developer", "content": "Be terse."},
    {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "What is in this image?"},
        {"type": "input_image", "image_url": "https://example.com/cat.png", "detail": "low"}]},
    {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "A cat."}]},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
    {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city":"Rome"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": "-3C"},
    {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "21C"}]},
    {"type": "custom_tool_call", "call_id": "call_3", "name": "apply_patch", "input": "*** Begin Patch"},
    {"type": "custom_tool_call_output", "call_id": "call_3", "output": "Done!"},
    {"role": "user", "content": "Thanks"},
]
ITEMS_OUT = [
    {"role": "developer", "content": "Be terse."},
    {"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                 {"type": "image_url", "image_url": {"url": "https://example.com/cat.png",
                                                                     "detail": "low"}}]},
    {"role": "assistant", "content": "A cat.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "-3C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "21C"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_3", "type": "function", "function": {"name": "apply_patch",
                                                          "arguments": '{"input": "*** Begin Patch"}'}}]},
    {"role": "tool", "tool_call_id": "call_3", "content": "Done!"},
    {"role": "user", "content": "Thanks"},
]
CUSTOM_FN = {"type": "function", "function": {
    "name": "apply_patch", "description": "Apply a patch to files\n\nThe input must follow this lark grammar:\n"
                                          "start: begin_patch hunk+ end_patch",
    "parameters": {"type": "object", "properties": {"input": {"type": "string", "description":
                                                              "The tool's whole input, as free text."}},
                   "required": ["input"], "additionalProperties": False}}}
WEATHER_FN = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                               "parameters": WEATHER["parameters"], "strict": True}}


@pytest.mark.parametrize("route, request_, sent, warning", [
    pytest.param("gpt", {"input": ITEMS_IN}, {"messages": ITEMS_OUT}, None, id="input-items"),
    pytest.param("gpt", {"input": "hi", "tools": [{**WEATHER, "strict": True}, PATCH, {"type": "web_search"}],
                         "tool_choice": {"type": "function", "name": "get_weather"}, "parallel_tool_calls": False},
                 {"tools": [WEATHER_FN, CUSTOM_FN], "tool_choice": {"type": "function",
                                                                    "function": {"name": "get_weather"}},
                  "parallel_tool_calls": False}, "built-in tools dropped on translated steps: web_search",
                 id="tools"),
    pytest.param("gpt", {"input": "hi", "tools": [WEATHER, PATCH], "tool_choice": {
        "type": "allowed_tools", "mode": "required", "tools": [{"type": "custom", "name": "apply_patch"}]}},
                 {"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
                     {"type": "function", "function": {"name": "apply_patch"}}]}}}, None, id="allowed-tools"),
    pytest.param("gpt", {"input": "hi", "tools": [{"type": "web_search"}], "tool_choice": "required",
                         "parallel_tool_calls": True}, {}, "web_search", id="only-built-in-tools"),
    pytest.param("gpt", {"input": "hi", "text": {"format": {"type": "json_object"}}, "user": "u1"},
                 {"response_format": {"type": "json_object"}, "user": "u1"}, None, id="json-object"),
    pytest.param("o3", {"input": "hi", "max_output_tokens": 300, "reasoning": {"effort": "high"}},
                 {"max_completion_tokens": 300, "reasoning_effort": "high"}, None, id="reasoning-model-tokens"),
    pytest.param("gpt", {"input": [{"type": "message", "role": "user", "content": "hi"},
                                   {"type": "web_search_call", "id": "ws_1", "status": "completed"},
                                   {"type": "item_reference", "id": "msg_9"}]},
                 {"messages": [{"role": "user", "content": "hi"}]},
                 "input items dropped on translated steps: web_search_call, item_reference", id="dropped-items"),
])
def test_the_request_as_the_chat_body(upstream: MockUpstream, route: str, request_: dict[str, Any],
                                      sent: dict[str, Any], warning: str | None) -> None:
    upstream.default = Reply(body=chat_completion("ok"))
    with gateway(config(upstream)) as gw:
        raw = httpx.post(gw.url + "/v1/responses", json={"model": route, **request_}, timeout=20,
                         headers={"authorization": f"Bearer {GATEWAY_KEY}"})
    assert raw.status_code == 200, raw.text
    got = upstream.received[-1].json
    for key, value in sent.items():
        assert got[key] == value, key
    if not any(t["type"] in ("function", "custom") for t in request_.get("tools", [])):
        assert "tools" not in got and "tool_choice" not in got and "parallel_tool_calls" not in got
    assert "max_tokens" not in got or route != "o3"
    if warning is None:
        assert "x-gateway-warning" not in raw.headers
    else:
        assert warning in raw.headers["x-gateway-warning"]


# -- translated: answers and streams ----------------------------------------------------------------------------

def test_a_stream_of_text_has_every_event_in_order_with_sequence_numbers(upstream: MockUpstream) -> None:
    upstream.replies["stream-model"] = Reply(sse=stream_of("Hel", "lo", " there"))
    with gateway(config(upstream)) as gw:
        events = events_of(raw_stream(gw, {"model": "streamer", "input": "hi"}).content)
        with sdk(gw).responses.stream(model="streamer", input="hi") as stream:
            seen = [e.type for e in stream]
            final = stream.get_final_response()
        log = gw.request_logs(2)[-1]
    mr.check_events(events)  # SDK types, strictly; sequence numbers 0, 1, 2, ...; the SDK's accumulator
    assert types_of(events) == ["created", "in_progress", "output_item.added", "content_part.added",
                                "output_text.delta", "output_text.delta", "output_text.delta", "output_text.done",
                                "content_part.done", "output_item.done", "completed"]
    assert seen == [e["type"] for e in events]
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == ["Hel", "lo", " there"]
    assert events[0]["response"]["id"] == events[-1]["response"]["id"]
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == "Hello there"
    assert done["usage"]["input_tokens"] == 2 and done["usage"]["output_tokens"] == 3
    assert final.output_text == "Hello there" and final.usage is not None and final.usage.total_tokens == 5
    sent = upstream.received[-1].json
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert log["door"] == "responses" and log["stream"] is True and log["tokens"]["completion_tokens"] == 3


def test_reasoning_and_text_stream_as_two_items(upstream: MockUpstream) -> None:
    events: list[Any] = [chunk("", role=True)]
    for part in ("Think", "ing"):
        c = chunk()
        c["choices"][0]["delta"] = {"reasoning_content": part}
        events.append(c)
    events += [chunk("Answer"), chunk(finish="stop"), chunk(choices=False, usage=USAGE)]
    upstream.replies["stream-model"] = Reply(sse=events)
    upstream.replies["gpt-4o-mini"] = Reply(body={**chat_completion("Answer", usage=USAGE), "choices": [{
        "index": 0, "message": {"role": "assistant", "content": "Answer", "reasoning_content": "Thinking"},
        "finish_reason": "stop"}]})
    with gateway(config(upstream)) as gw:
        got = events_of(raw_stream(gw, {"model": "streamer", "input": "hi"}).content)
        whole = sdk(gw).responses.create(model="gpt", input="hi")
    mr.check_events(got)
    assert types_of(got) == ["created", "in_progress", "output_item.added", "content_part.added",
                             "reasoning_text.delta", "reasoning_text.delta", "reasoning_text.done",
                             "content_part.done", "output_item.done", "output_item.added", "content_part.added",
                             "output_text.delta", "output_text.done", "content_part.done", "output_item.done",
                             "completed"]
    final = got[-1]["response"]
    assert [o["type"] for o in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["content"] == [{"type": "reasoning_text", "text": "Thinking"}]
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == 2
    assert [o.type for o in whole.output] == ["reasoning", "message"] and whole.output_text == "Answer"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_function_calling_over_two_turns(upstream: MockUpstream, stream: bool) -> None:
    def answer(rec: Received) -> Reply:
        if rec.json["messages"][-1]["role"] == "tool":
            return Reply(sse=stream_of("It is ", "-3C.")) if stream else Reply(body=chat_completion("It is -3C."))
        args = '{"city": "Oslo"}'
        return Reply(sse=tool_stream("call_abc", "get_weather", args)) if stream else Reply(
            body=tool_completion("call_abc", "get_weather", args))

    upstream.replies["tool-model"] = answer
    history: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}]
    with gateway(config(upstream)) as gw:
        client = sdk(gw)
        if stream:
            with client.responses.stream(model="tools", input=history, tools=[WEATHER]) as s:
                kinds = [e.type for e in s]
                first = s.get_final_response()
            assert "response.function_call_arguments.delta" in kinds
            assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                                  "response.completed"]
        else:
            first = client.responses.create(model="tools", input=history, tools=[WEATHER])
        [call] = first.output
        assert call.type == "function_call" and call.call_id == "call_abc" and call.name == "get_weather"
        assert json.loads(call.arguments) == {"city": "Oslo"}
        history += [call.model_dump(exclude_none=True),
                    {"type": "function_call_output", "call_id": call.call_id, "output": "-3C"}]
        second = client.responses.create(model="tools", input=history, tools=[WEATHER], stream=stream)
        text = "".join(e.delta for e in second if e.type == "response.output_text.delta") if stream \
            else second.output_text  # type: ignore[union-attr]
    assert text == "It is -3C."
    sent = upstream.received[-1].json["messages"]
    assert sent[1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
    assert sent[2] == {"role": "tool", "tool_call_id": "call_abc", "content": "-3C"}


def test_parallel_tool_calls_in_one_stream_are_one_item_each_even_interleaved(upstream: MockUpstream) -> None:
    both = chunk()
    both["choices"][0]["delta"] = {"tool_calls": [
        {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"ci'}},
        {"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_weather",
                                                                       "arguments": '{"city":"Rome"}'}}]}
    late = chunk()  # the first call's rest after the second began (interleaved fragments)
    late["choices"][0]["delta"] = {"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"Oslo"}'}}]}
    upstream.replies["tool-model"] = Reply(sse=[chunk("", role=True), both, late, chunk(finish="tool_calls")])
    with gateway(config(upstream)) as gw:
        events = events_of(raw_stream(gw, {"model": "tools", "input": "hi", "tools": [WEATHER]}).content)
    mr.check_events(events)
    output = events[-1]["response"]["output"]
    assert [(o["type"], o["call_id"]) for o in output] == [("function_call", "call_a"), ("function_call", "call_b")]
    assert [o["arguments"] for o in output] == ['{"city":"Oslo"}', '{"city":"Rome"}']
    assert types_of(events).count("function_call_arguments.done") == 2
    assert events[-1]["response"]["usage"]["total_tokens"] == 0  # the upstream gave none


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_custom_tool_goes_as_a_one_string_function_and_comes_back_as_custom_tool_call(
        upstream: MockUpstream, stream: bool) -> None:
    patch = "*** Begin Patch\n*** Add File: a.txt\n+hi\n*** End Patch"
    args = json.dumps({"input": patch})
    upstream.replies["tool-model"] = Reply(sse=tool_stream("call_p", "apply_patch", args, text="Patching.")) \
        if stream else Reply(body=tool_completion("call_p", "apply_patch", args))
    with gateway(config(upstream)) as gw:
        if stream:
            events = events_of(raw_stream(gw, {"model": "tools", "input": "add a.txt", "tools": [PATCH]}).content)
            mr.check_events(events)
            assert types_of(events)[-5:] == ["output_item.added", "custom_tool_call_input.delta",
                                             "custom_tool_call_input.done", "output_item.done", "completed"]
            output = events[-1]["response"]["output"]
        else:
            resp = sdk(gw).responses.create(model="tools", input="add a.txt", tools=[PATCH])  # type: ignore[list-item]
            output = [o.model_dump(exclude_none=True) for o in resp.output]
    assert upstream.received[-1].json["tools"] == [CUSTOM_FN]
    call = output[-1]
    assert call["type"] == "custom_tool_call" and call["name"] == "apply_patch" and call["call_id"] == "call_p"
    assert call["input"] == patch


# -- previous_response_id, GET and DELETE -------------------------------------------------------------------------

def test_a_follow_up_gets_the_earlier_turns_as_context(upstream: MockUpstream, tmp_path: Path) -> None:
    turns = iter(["Hello Ada.", "You are Ada.", "Ada, again."])
    upstream.replies["gpt-4o-mini"] = lambda rec: Reply(body=chat_completion(next(turns)))
    with gateway(config(upstream, tmp_path=tmp_path)) as gw:
        client = sdk(gw)
        one = client.responses.create(model="gpt", input="I am Ada.", instructions="Turn one only.")
        two = client.responses.create(model="gpt", input="Who am I?", previous_response_id=one.id)
        three = client.responses.create(model="gpt", input=[{"role": "user", "content": "Once more?"}],
                                        previous_response_id=two.id, instructions="Now these.")
    first, second, third = (r.json["messages"] for r in upstream.received)
    assert first == [{"role": "system", "content": "Turn one only."}, {"role": "user", "content": "I am Ada."}]
    assert second == [{"role": "user", "content": "I am Ada."}, {"role": "assistant", "content": "Hello Ada."},
                      {"role": "user", "content": "Who am I?"}]  # instructions are not carried over
    assert third == [{"role": "system", "content": "Now these."}, *second,
                     {"role": "assistant", "content": "You are Ada."}, {"role": "user", "content": "Once more?"}]
    assert two.previous_response_id == one.id and three.output_text == "Ada, again."


def test_a_streamed_answer_is_kept_before_response_completed_goes_out(upstream: MockUpstream,
                                                                     tmp_path: Path) -> None:
    """The follow-up is sent the moment ``response.completed`` arrives, while the first stream is still open:
    it finds the first turn, so the write came before that event."""
    upstream.replies["stream-model"] = Reply(sse=stream_of("Hello", " Ada."))
    upstream.replies["gpt-4o-mini"] = Reply(body=chat_completion("You are Ada."))
    with gateway(config(upstream, tmp_path=tmp_path)) as gw:
        client = sdk(gw)
        follow = None
        with client.responses.stream(model="streamer", input="I am Ada.") as s:
            for event in s:
                if event.type == "response.completed":
                    follow = sdk(gw).responses.create(model="gpt", input="Who am I?",
                                                      previous_response_id=event.response.id)
    assert follow is not None and follow.output_text == "You are Ada."
    assert upstream.received[-1].json["messages"] == [
        {"role": "user", "content": "I am Ada."}, {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": "Who am I?"}]


def test_retrieve_input_items_and_delete_a_kept_response(upstream: MockUpstream, tmp_path: Path) -> None:
    upstream.replies["gpt-4o-mini"] = Reply(body=chat_completion("Hi!"))
    with gateway(config(upstream, tmp_path=tmp_path)) as gw:
        client = sdk(gw)
        made = client.responses.create(model="gpt", input="Hello")
        follow = client.responses.create(model="gpt", input="Again", previous_response_id=made.id)
        got = client.responses.retrieve(made.id)
        raw = httpx.get(f"{gw.url}/v1/responses/{made.id}", headers={"x-api-key": GATEWAY_KEY})
        items = client.responses.input_items.list(follow.id)
        oldest = client.responses.input_items.list(follow.id, order="asc", limit=2)
        with pytest.raises(openai.NotFoundError):
            sdk(gw, OTHER_KEY).responses.retrieve(made.id)  # another key's response does not exist for it
        with pytest.raises(openai.NotFoundError):
            sdk(gw, OTHER_KEY).responses.delete(made.id)
        with pytest.raises(openai.BadRequestError):
            sdk(gw, OTHER_KEY).responses.create(model="gpt", input="x", previous_response_id=made.id)
        assert client.responses.delete(made.id) is None
        with pytest.raises(openai.NotFoundError) as gone:
            client.responses.retrieve(made.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.delete(made.id)
        with pytest.raises(openai.BadRequestError) as chained:
            client.responses.create(model="gpt", input="x", previous_response_id=made.id)
        client.responses.retrieve(follow.id)  # the follow-up carries its context: it outlives the first
    assert raw.status_code == 200 and json.loads(raw.content) == json.loads(made.model_dump_json(exclude_unset=True))
    assert got.id == made.id and got.output_text == "Hi!" and got.usage == made.usage
    assert [(i.type, getattr(i, "role", None)) for i in items.data] == [
        ("message", "user"), ("message", "assistant"), ("message", "user")]  # newest first
    assert [i.content[0].text for i in oldest.data] == ["Hello", "Hi!"] and oldest.has_more is True  # type: ignore
    assert all(i.id for i in items.data) and items.first_id == items.data[0].id
    assert gone.value.body["code"] == "response_not_found"  # type: ignore[index]
    assert chained.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert chained.value.body["code"] == "previous_response_not_found"  # type: ignore[index]


def test_store_false_keeps_nothing(upstream: MockUpstream, tmp_path: Path) -> None:
    upstream.replies["gpt-4o-mini"] = Reply(body=chat_completion("Hi!"))
    with gateway(config(upstream, tmp_path=tmp_path)) as gw:
        made = sdk(gw).responses.create(model="gpt", input="Hello", store=False)
        with pytest.raises(openai.NotFoundError):
            sdk(gw).responses.retrieve(made.id)
        with pytest.raises(openai.BadRequestError):
            sdk(gw).responses.create(model="gpt", input="x", previous_response_id=made.id)
    conn = db.connect(str(tmp_path / "gw.db"))
    assert conn.execute("SELECT count(*) FROM responses").fetchone() == (0,)
    conn.close()


def test_without_a_store_file_previous_response_id_and_get_are_a_clear_400(upstream: MockUpstream) -> None:
    upstream.replies["gpt-4o-mini"] = Reply(body=chat_completion("Hi!"))
    with gateway(config(upstream)) as gw:
        made = sdk(gw).responses.create(model="gpt", input="Hello")
        with pytest.raises(openai.BadRequestError) as follow:
            sdk(gw).responses.create(model="gpt", input="x", previous_response_id=made.id)
        with pytest.raises(openai.BadRequestError) as get:
            sdk(gw).responses.retrieve(made.id)
    assert follow.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert follow.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    for err in (follow, get):
        assert "store.path" in err.value.message and err.value.body["code"] == "store_in_memory"  # type: ignore


def test_a_follow_up_right_after_the_answer_finds_it_on_the_other_worker(upstream: MockUpstream,
                                                                        tmp_path: Path) -> None:
    """``workers: 2`` on one store file: a connection held to each worker (told apart by the admin API's pid),
    each turn made on one worker and its follow-up sent on the other right after the answer (whole, or the
    moment ``response.completed`` arrived, the first stream still open)."""
    admin = "adm-" + "0123456789abcdef" * 2
    upstream.replies["gpt-4o-mini"] = lambda rec: Reply(body=chat_completion(f"ok {len(upstream.received)}"))
    upstream.replies["stream-model"] = Reply(sse=stream_of("streamed"))
    cfg = config(upstream, tmp_path=tmp_path, workers=2, admin_token=admin)
    with gateway_process(cfg, tmp_path) as (proc, url, _, logfile):
        assert wait_until(lambda: logfile.read_text().count("listening on") == 2, 15), logfile.read_text()
        workers: dict[int, httpx.Client] = {}
        for _ in range(200):  # new connections until each worker holds one (the kernel spreads them)
            c = httpx.Client(base_url=url, headers={"x-api-key": GATEWAY_KEY}, timeout=20)
            pid = c.get("/admin/api/v1/health", headers={"authorization": f"Bearer {admin}"}).json()["pid"]
            if pid in workers:
                c.close()
            else:
                workers[pid] = c
            if len(workers) == 2:
                break
        try:
            assert len(workers) == 2, "the kernel never gave the second worker a connection"
            one, two = workers.values()
            for i in range(4):
                maker, follower = (one, two) if i % 2 == 0 else (two, one)
                turn = {"model": "gpt", "input": f"turn {i}"}
                if i < 2:
                    made = maker.post("/v1/responses", json=turn)
                    assert made.status_code == 200, made.text
                    follow = follower.post("/v1/responses", json={"model": "gpt", "input": "next",
                                                                  "previous_response_id": made.json()["id"]})
                else:
                    with maker.stream("POST", "/v1/responses", json={**turn, "model": "streamer",
                                                                     "stream": True}) as r:
                        lines = r.iter_lines()
                        rid = next(json.loads(ln[6:])["response"]["id"] for ln in lines
                                   if ln.startswith("data: ") and '"response.completed"' in ln)
                        follow = follower.post("/v1/responses", json={"model": "gpt", "input": "next",
                                                                      "previous_response_id": rid})
                        list(lines)
                assert follow.status_code == 200, follow.text
                assert upstream.received[-1].json["messages"][0] == {"role": "user", "content": f"turn {i}"}
        finally:
            for c in workers.values():
                c.close()


# -- errors -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("request_, exc, param", [
    ({"model": "nope", "input": "hi"}, openai.NotFoundError, None),
    ({"model": "gpt", "input": 42}, openai.BadRequestError, "input"),
    ({"model": "gpt", "input": ["hi"]}, openai.BadRequestError, "input[0]"),
    ({"model": "gpt", "input": [{"type": "message", "role": "robot", "content": "x"}]}, openai.BadRequestError,
     "input[0].role"),
    ({"model": "gpt", "input": [{"type": "function_call_output", "output": "x"}]}, openai.BadRequestError,
     "input[0].call_id"),
    ({"model": "gpt", "input": "hi", "max_output_tokens": 0}, openai.BadRequestError, "max_output_tokens"),
    ({"model": "gpt", "input": "hi", "background": True}, openai.BadRequestError, "background"),
    ({"model": "gpt", "input": "hi", "tools": [{"type": "function"}]}, openai.BadRequestError, "tools[0].name"),
    ({"model": "gpt", "input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}},
     openai.BadRequestError, "text.format"),
    ({"model": "gpt"}, openai.BadRequestError, "input"),
])
def test_requests_the_api_would_refuse(upstream: MockUpstream, request_: dict[str, Any], exc: type[Exception],
                                       param: str | None) -> None:
    with gateway(config(upstream)) as gw, pytest.raises(exc) as err:
        sdk(gw).post("/responses", body=request_, cast_to=httpx.Response)
    assert upstream.received == []
    body = err.value.body  # type: ignore[attr-defined]
    assert isinstance(body["message"], str) and body["type"] == "invalid_request_error"
    if param is not None:
        assert body["param"] == param


@pytest.mark.parametrize("reply, exc, code", [
    (Reply(status=429, body={"error": {"message": "Rate limit reached", "type": "requests",
                                       "code": "rate_limit_exceeded"}}), openai.RateLimitError, None),
    (Reply(status=400, body={"error": {"message": "This model's maximum context length is 128000 tokens",
                                       "type": "invalid_request_error", "code": "context_length_exceeded"}}),
     openai.BadRequestError, "context_length_exceeded"),
    (Reply(status=401, body={"error": {"message": "bad key", "type": "invalid_request_error"}}),
     openai.InternalServerError, "upstream_auth_failed"),  # the gateway's credentials, not the client's
    (Reply(status=500, body={"error": {"message": "boom", "type": "server_error"}}), openai.InternalServerError,
     None),
])
def test_upstream_failures_are_the_sdks_exceptions(upstream: MockUpstream, reply: Reply, exc: type[Exception],
                                                   code: str | None) -> None:
    upstream.replies["gpt-4o-mini"] = reply
    with gateway(config(upstream)) as gw, pytest.raises(exc) as err:
        sdk(gw).responses.create(model="gpt", input="hi")
    if code is not None:
        assert err.value.body["code"] == code  # type: ignore[attr-defined]
    assert "sk-upstream-secret-1" not in str(err.value.body)  # type: ignore[attr-defined]


def test_a_wrong_gateway_key_is_the_sdks_authentication_error(upstream: MockUpstream, tmp_path: Path) -> None:
    with gateway(config(upstream, tmp_path=tmp_path)) as gw:
        for call in (lambda c: c.responses.create(model="gpt", input="hi"), lambda c: c.responses.retrieve("resp_1"),
                     lambda c: c.responses.delete("resp_1")):
            with pytest.raises(openai.AuthenticationError):
                call(sdk(gw, "wrong-key"))
    assert upstream.received == []


RATE_EVENT = {"error": {"message": "Rate limit reached; retry in 2s", "type": "rate_limit_error",
                        "code": "rate_limit_exceeded"}}


@pytest.mark.parametrize("reply, code", [
    (Reply(sse=stream_of("one", "two", "three"), reset_after=3), "server_error"),
    (Reply(sse=[*stream_of("one", usage=False)[:2], RATE_EVENT], done=False), "rate_limit_exceeded"),
], ids=["connection-reset", "rate-limit-event"])
def test_a_stream_that_breaks_ends_with_response_failed(upstream: MockUpstream, reply: Reply, code: str) -> None:
    upstream.replies["stream-model"] = reply
    with gateway(config(upstream)) as gw:
        events = events_of(raw_stream(gw, {"model": "streamer", "input": "hi"}).content)
        log = gw.request_logs()[-1]
    mr.check_events(events)
    assert types_of(events)[:2] == ["created", "in_progress"] and "completed" not in types_of(events)
    failed = events[-1]
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["code"] == code and failed["response"]["id"] == events[0]["response"]["id"]
    if code == "rate_limit_exceeded":
        assert "try again in 2s" in failed["response"]["error"]["message"]  # what Codex reads its wait from
    assert log["status"] == 200 and log["outcome"] == 502


def test_every_step_failing_after_the_head_ends_with_response_failed(upstream: MockUpstream) -> None:
    """Keep-alives sent the head before any step answered: the failure can only be an event now."""
    release = threading.Event()

    def limited(rec: Received) -> Reply:
        release.wait(10)  # until the client has read a keep-alive (the head is out)
        return Reply(status=429, body={"error": {"message": "Rate limit reached", "type": "requests",
                                                 "code": "rate_limit_exceeded"}})

    upstream.replies["stream-model"] = limited
    with gateway(config(upstream, stream_keepalive_interval="20ms")) as gw:
        with httpx.stream("POST", gw.url + "/v1/responses", headers={"x-api-key": GATEWAY_KEY}, timeout=20,
                          json={"model": "streamer", "input": "hi", "stream": True}) as r:
            chunks = r.iter_bytes()
            head = next(chunks)
            release.set()
            rest = b"".join(chunks)
    assert r.status_code == 200 and head.startswith(b": keep-alive")
    events = events_of(rest)
    mr.check_events(events)
    assert types_of(events) == ["created", "in_progress", "failed"]
    assert events[-1]["response"]["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_failing_first_step_falls_back_to_the_next(upstream: MockUpstream, stream: bool) -> None:
    routes = [{"name": "fb", "steps": [{"provider": "up1", "model": "broken"}, {"provider": "up2", "model": "good"}]}]
    upstream.replies["broken"] = Reply(status=503, body={"error": {"message": "overloaded", "type": "server_error"}})
    upstream.replies["good"] = Reply(sse=stream_of("saved")) if stream else Reply(body=chat_completion("saved"))
    with gateway(config(upstream, routes)) as gw:
        raw = sdk(gw).responses.with_raw_response.create(model="fb", input="hi", stream=stream)
        result = raw.parse()
        text = "".join(e.delta for e in result if e.type == "response.output_text.delta") if stream \
            else result.output_text  # type: ignore[union-attr]
        log = gw.request_logs()[-1]
    assert text == "saved" and raw.headers["x-gateway-attempts"] == "2"
    assert [r.json["model"] for r in upstream.received] == ["broken", "good"]
    assert log["provider"] == "up2" and log["failed_attempts"][0]["status"] == 503


# -- Codex CLI ----------------------------------------------------------------------------------------------------

def test_what_codex_sends_works_on_a_translated_step(upstream: MockUpstream, tmp_path: Path) -> None:
    """The whole history in input (reasoning items with encrypted content), include, prompt_cache_key, store:
    false, parallel_tool_calls false, a custom tool, built-in tools; and a max_output_tokens: 1 probe."""
    upstream.replies["tool-model"] = Reply(sse=[*stream_of("x", usage=False)[:2], chunk(finish="length"),
                                                chunk(choices=False, usage={"prompt_tokens": 900,
                                                                            "completion_tokens": 1,
                                                                            "total_tokens": 901})])
    body = {
        "model": "tools", "instructions": "You are Codex.", "stream": True, "store": False,
        "include": ["reasoning.encrypted_content"], "prompt_cache_key": "0199-uuid", "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"}, "tool_choice": "auto", "max_output_tokens": 1,
        "tools": [{"type": "function", "name": "shell", "description": "Run a command", "strict": False,
                   "parameters": {"type": "object", "properties": {"command": {"type": "array",
                                                                               "items": {"type": "string"}}}}},
                  PATCH, {"type": "web_search"}, {"type": "local_shell"}],
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list files"}]},
                  {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA..."},
                  {"type": "function_call", "name": "shell", "arguments": '{"command":["ls"]}', "call_id": "c1"},
                  {"type": "function_call_output", "call_id": "c1", "output": "a.txt"}],
    }
    with gateway(config(upstream, tmp_path=tmp_path)) as gw:
        r = raw_stream(gw, body)
        events = events_of(r.content)
        with pytest.raises(openai.NotFoundError):
            sdk(gw).responses.retrieve(events[-1]["response"]["id"])  # store: false
    mr.check_events(events)
    assert "web_search, local_shell" in r.headers["x-gateway-warning"]
    sent = upstream.received[-1].json
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "tool"]
    assert [t["function"]["name"] for t in sent["tools"]] == ["shell", "apply_patch"]
    assert sent["parallel_tool_calls"] is False and sent["prompt_cache_key"] == "0199-uuid"
    assert sent["max_tokens"] == 1 and sent["reasoning_effort"] == "medium" and "include" not in sent
    final = events[-1]
    assert final["type"] == "response.incomplete" and final["response"]["incomplete_details"] == {
        "reason": "max_output_tokens"}
    assert final["response"]["usage"]["input_tokens"] == 900 and final["response"]["id"].startswith("resp_")


# -- each provider type as the (translated) step --------------------------------------------------------------------

@contextmanager
def mock_of(kind: str) -> Iterator[tuple[MockUpstream, dict[str, Any], Callable[[], list[str]]]]:
    """A fresh upstream playing ``kind``, the provider entry for it, and its problems so far."""
    up = MockUpstream().start()
    try:
        if kind == "anthropic":
            claude = ma.AnthropicMock(up)
            claude.on("claude-x", lambda body: ma.message(
                ma.thinking("Let me see."), ma.text("Bonjour!"), usage={
                    "input_tokens": 10, "output_tokens": 4, "cache_read_input_tokens": 6,
                    "cache_creation_input_tokens": 0}))
            yield up, {"name": "p", "type": "anthropic", "base_url": up.url, "api_key": ma.API_KEY,
                       "max_tokens": 1000}, lambda: claude.problems
        elif kind in ("gemini", "vertex-express"):
            vertex = kind != "gemini"
            key = "vertex-express-key-123" if vertex else mg.API_KEY
            gem = mg.GeminiMock(up, vertex=vertex, api_key=key)
            answer = mg.response(mg.thought("Let me see."), mg.text("Bonjour!"), meta=mg.usage(10, 4, cached=6))
            gem.on("claude-x", lambda call: mg.sse(answer) if call.stream else Reply(body=answer))
            entry = {"name": "p", "type": "vertex" if vertex else "gemini", "base_url": up.url, "api_key": key}
            yield up, entry, lambda: gem.problems
        else:
            raise AssertionError(kind)
    finally:
        up.stop()


@pytest.mark.parametrize("kind", ["anthropic", "gemini", "vertex-express"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_each_provider_type_as_a_translated_step(kind: str, stream: bool) -> None:
    with mock_of(kind) as (up, provider, problems):
        raw = base_config(up.url, [{"name": "r", "steps": [{"provider": "p", "model": "claude-x"}]}])
        raw["providers"].append(provider)
        with gateway(raw) as gw:
            if stream:
                events = events_of(raw_stream(gw, {"model": "r", "input": "Say hi in French.",
                                                   "instructions": "Be brief."}).content)
                mr.check_events(events)
                resp = events[-1]["response"]
            else:
                resp = sdk(gw).responses.create(model="r", input="Say hi in French.",
                                                instructions="Be brief.").model_dump(exclude_none=True)
            log = gw.request_logs()[-1]
        assert problems() == []
        sent = up.received[-1].json
    assert resp["status"] == "completed" and resp["output"][-1]["content"][0]["text"] == "Bonjour!"
    assert resp["output"][0]["type"] == "reasoning"  # thinking / thought parts, as reasoning text
    assert resp["usage"]["input_tokens"] >= 10 and resp["usage"]["output_tokens"] >= 4
    assert resp["usage"]["input_tokens_details"]["cached_tokens"] == 6
    system = sent.get("system") or sent.get("systemInstruction")
    assert "Be brief." in json.dumps(system)
    assert log["door"] == "responses" and log["provider"] == "p" and log["tokens"]["prompt_tokens"] >= 10


# -- native: a Responses upstream (wire_api: responses) ---------------------------------------------------------------

@pytest.fixture
def responses_api(upstream: MockUpstream) -> Iterator[mr.ResponsesMock]:
    mock = mr.ResponsesMock(upstream)
    yield mock
    assert mock.problems == [], "the gateway sent requests the Responses API would refuse"


def native_config(upstream: MockUpstream, tmp_path: Path | None = None, **top: Any) -> dict[str, Any]:
    routes = [{"name": "native", "steps": [{"provider": "oair", "model": "gpt-5-mini"}]},
              {"name": "mixed", "steps": [{"provider": "oair", "model": "cut"},
                                          {"provider": "up1", "model": "gpt-4o-mini"}]},
              {"name": "cut", "steps": [{"provider": "oair", "model": "cut"}]},
              {"name": "native-fails", "steps": [{"provider": "oair", "model": "failing"}]}]
    cfg = config(upstream, routes, tmp_path, **top)
    cfg["providers"].append(mr.provider(upstream))
    return cfg


def test_native_whole_answer_passes_the_body_and_the_answer_through(upstream: MockUpstream,
                                                                   responses_api: mr.ResponsesMock) -> None:
    made = mr.response(mr.reasoning("Thinking", encrypted_content="enc-1"), mr.message("Hi there"),
                       usage=mr.usage(20, 8, cached=12, reasoning=3))
    responses_api.on("gpt-5-mini", lambda body: made)
    body = {"model": "native", "input": [{"role": "user", "content": "Hi"}], "instructions": "Be kind.",
            "tools": [{"type": "web_search"}], "include": ["reasoning.encrypted_content"], "store": False,
            "reasoning": {"effort": "low", "summary": "auto"}, "max_output_tokens": 100}
    with gateway(native_config(upstream)) as gw:
        r = httpx.post(gw.url + "/v1/responses", json=body, headers={"x-api-key": GATEWAY_KEY}, timeout=20)
        log = gw.request_logs()[-1]
    assert r.status_code == 200, r.text
    assert upstream.received[-1].path == "/v1/responses"
    assert upstream.received[-1].json == {**body, "model": "gpt-5-mini"}  # as sent, model rewritten
    answer = r.json()
    assert answer == mr.echo(upstream.received[-1].json, made)  # the upstream's answer, as it sent it
    assert [o["type"] for o in answer["output"]] == ["reasoning", "message"]
    assert answer["output"][0]["encrypted_content"] == "enc-1"  # what only the native API carries
    assert "x-gateway-warning" not in r.headers  # nothing was dropped: the only step is native
    assert log["tokens"] == {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28}


def test_native_stream_events_pass_through_unchanged(upstream: MockUpstream, responses_api: mr.ResponsesMock,
                                                     tmp_path: Path) -> None:
    sent: list[bytes] = []

    def scenario(body: dict[str, Any]) -> Reply:
        resp = mr.echo(body, mr.response(mr.message("Hello from upstream"), mr.function_call("c1", "f", {"a": 1})))
        reply = mr.stream_reply(mr.stream_events(resp))
        sent.extend(reply.sse or [])
        return reply

    responses_api.on("gpt-5-mini", scenario)
    with gateway(native_config(upstream, tmp_path)) as gw:
        r = raw_stream(gw, {"model": "native", "input": "hi"})
        rid = events_of(r.content)[-1]["response"]["id"]
        kept = sdk(gw).responses.retrieve(rid)  # a native answer is kept too, under the upstream's id
        log = gw.request_logs(2)[0]
    assert r.content == b"".join(sent)  # byte for byte
    assert kept.output_text == "Hello from upstream"
    assert log["provider"] == "oair" and log["tokens"]["total_tokens"] == 18


def test_native_follow_up_gets_the_expanded_input_not_previous_response_id(
        upstream: MockUpstream, responses_api: mr.ResponsesMock, tmp_path: Path) -> None:
    turn = iter([mr.function_call("call_1", "get_weather", {"city": "Oslo"}), mr.message("-3C in Oslo.")])
    responses_api.on("gpt-5-mini", lambda body: mr.response(next(turn)))
    with gateway(native_config(upstream, tmp_path)) as gw:
        client = sdk(gw)
        one = client.responses.create(model="native", input="Weather in Oslo?", tools=[WEATHER])
        two = client.responses.create(model="native", previous_response_id=one.id, tools=[WEATHER], input=[
            {"type": "function_call_output", "call_id": "call_1", "output": "-3C"}])
    assert two.output_text == "-3C in Oslo."
    second = upstream.received[-1].json
    assert "previous_response_id" not in second
    assert [(i.get("type"), i.get("role")) for i in second["input"]] == [
        ("message", "user"), ("function_call", None), ("function_call_output", None)]
    assert second["input"][1]["call_id"] == "call_1" and "id" not in second["input"][1]


@pytest.mark.parametrize("scenario, code", [
    (lambda body: mr.stream_reply(mr.stream_events(mr.response(mr.message("a long answer here"))), reset_after=5),
     "server_error"),
    (lambda body: mr.stream_reply(mr.failed_events("rate_limit_exceeded", "Slow down; try again in 3s.",
                                                   mr.message("partial"))), "rate_limit_exceeded"),
    (lambda body: mr.stream_reply(mr.failed_events("insufficient_quota", "You exceeded your quota.",
                                                   mr.message("partial"))), "insufficient_quota"),
], ids=["reset", "rate-limited", "quota"])
def test_a_native_stream_that_breaks_ends_with_response_failed(upstream: MockUpstream,
                                                             responses_api: mr.ResponsesMock,
                                                             scenario: Callable[[dict[str, Any]], Reply],
                                                             code: str) -> None:
    responses_api.on("cut", scenario)
    with gateway(native_config(upstream)) as gw:
        events = events_of(raw_stream(gw, {"model": "cut", "input": "hi"}).content)
    mr.check_events(events)  # one id throughout, sequence numbers go on counting
    assert events[-1]["type"] == "response.failed" and "response.completed" not in types_of(events)
    assert events[-1]["response"]["error"]["code"] == code
    assert events[-1]["response"]["id"] == events[0]["response"]["id"]


def test_a_mixed_route_falls_back_from_native_to_translated_and_warns(upstream: MockUpstream,
                                                                      responses_api: mr.ResponsesMock) -> None:
    responses_api.on("cut", lambda body: mr.error_reply(500, "The server had an error", "server_error"))
    upstream.replies["gpt-4o-mini"] = Reply(body=chat_completion("from chat"))
    with gateway(native_config(upstream)) as gw:
        raw = sdk(gw).responses.with_raw_response.create(model="mixed", input="hi",
                                                          tools=[{"type": "web_search"}])
    assert raw.parse().output_text == "from chat"
    assert "web_search" in raw.headers["x-gateway-warning"]  # the route has a translated step
    assert upstream.received[0].json["tools"] == [{"type": "web_search"}]  # the native step had it
    assert "tools" not in upstream.received[1].json


def test_a_client_keys_rules_reach_a_native_step_without_showing_in_the_answer(
        upstream: MockUpstream, responses_api: mr.ResponsesMock, tmp_path: Path) -> None:
    conn = db.connect(str(tmp_path / "gw.db"))
    key = KeyStore(conn).create("door-key", system_prompt="Never swear.", max_tokens=64)[1]
    conn.close()
    responses_api.on("gpt-5-mini", lambda body: mr.response(mr.message("Fine.")))
    with gateway(native_config(upstream, tmp_path)) as gw:
        resp = sdk(gw, key).responses.create(model="native", input="hi", instructions="Mine.",
                                             max_output_tokens=500)
    sent = upstream.received[-1].json
    assert sent["input"][0] == {"type": "message", "role": "system", "content": "Never swear."}
    assert sent["instructions"] == "Mine." and sent["max_output_tokens"] == 64
    assert resp.instructions == "Mine."


# -- reasoning items the gateway made, and native steps -----------------------------------------------------------

REASONED = {**chat_completion("first", usage=USAGE), "choices": [{
    "index": 0, "message": {"role": "assistant", "content": "first", "reasoning_content": "thinking..."},
    "finish_reason": "stop"}]}


def mixed_config(upstream: MockUpstream, tmp_path: Path) -> dict[str, Any]:
    """A native route and a translated one, sharing the store."""
    cfg = native_config(upstream, tmp_path)
    cfg["routes"].append({"name": "gpt", "steps": [{"provider": "up1", "model": "gpt-4o-mini"}]})
    cfg["routes"].append({"name": "streamer", "steps": [{"provider": "up1", "model": "stream-model"}]})
    return cfg


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_reasoning_the_gateway_made_is_marked_and_never_replayed_to_a_native_step(
        upstream: MockUpstream, responses_api: mr.ResponsesMock, tmp_path: Path, stream: bool) -> None:
    """A translated step's reasoning (Anthropic thinking, Gemini thoughts, reasoning_content) comes back as a
    ``reasoning`` item whose id the gateway minted (``rs_atg_...``); a Responses upstream does not know that id
    and refuses it (400 item_not_found), so native steps get the context without it: expanded from
    previous_response_id, or resent by the client itself. The upstream's own reasoning items go on as sent."""
    steps: list[Any] = [chunk("", role=True)]
    for part in ("think", "ing..."):
        c = chunk()
        c["choices"][0]["delta"] = {"reasoning_content": part}
        steps.append(c)
    steps += [chunk("first"), chunk(finish="stop"), chunk(choices=False, usage=USAGE)]
    upstream.replies["stream-model"] = Reply(sse=steps)
    upstream.replies["gpt-4o-mini"] = Reply(body=REASONED)
    theirs = mr.reasoning("Upstream thought", encrypted_content="enc-9", item_id="rs_upstream1")
    turns = iter([mr.response(theirs, mr.message("second")), mr.response(mr.message("third"))])
    responses_api.on("gpt-5-mini", lambda body: next(turns))
    with gateway(mixed_config(upstream, tmp_path)) as gw:
        client = sdk(gw)
        if stream:
            events = events_of(raw_stream(gw, {"model": "streamer", "input": "hi"}).content)
            mr.check_events(events)
            added = [e["item"]["id"] for e in events if e["type"] == "response.output_item.added"
                     and e["item"]["type"] == "reasoning"]
            one = events[-1]["response"]
            assert added and all(i.startswith("rs_atg_") for i in added)
        else:
            one = client.responses.create(model="gpt", input="hi").model_dump(exclude_none=True)
        mine = one["output"][0]
        assert mine["type"] == "reasoning" and mine["id"].startswith("rs_atg_")
        two = client.responses.create(model="native", input="more", previous_response_id=one["id"],
                                      include=["reasoning.encrypted_content"])
        expanded = upstream.received[-1].json["input"]
        # the client resends the whole history itself (Codex with store: false): both turns' output
        history = [{"role": "user", "content": "hi"}, *one["output"], {"role": "user", "content": "more"},
                   *(o.model_dump(exclude_none=True) for o in two.output), {"role": "user", "content": "again"}]
        three = client.responses.create(model="native", input=history, store=False)  # type: ignore[arg-type]
        resent = upstream.received[-1].json["input"]
    assert two.output_text == "second" and three.output_text == "third"
    assert [(i.get("type"), i.get("role")) for i in expanded] == [("message", "user"), ("message", "assistant"),
                                                                  ("message", "user")]
    assert "rs_atg_" not in json.dumps(expanded) and "thinking..." not in json.dumps(expanded)
    assert "rs_atg_" not in json.dumps(resent)
    assert [i.get("id") for i in resent if i.get("type") == "reasoning"] == ["rs_upstream1"]  # the upstream's own
    assert [(i.get("type", "message"), i.get("role")) for i in resent] == [
        ("message", "user"), ("message", "assistant"), ("message", "user"), ("reasoning", None),
        ("message", "assistant"), ("message", "user")]


@pytest.mark.parametrize("cap, asked, sent", [
    (8, 500, 16), (8, None, 16), (64, 500, 64), (64, 20, 20), (64, None, 64), (8, 10, 16),
], ids=["cap-below-16", "cap-below-16-none-asked", "cap", "below-cap", "cap-none-asked", "both-below-16"])
def test_a_keys_cap_on_a_native_step_is_never_below_the_apis_minimum(
        upstream: MockUpstream, responses_api: mr.ResponsesMock, tmp_path: Path, cap: int, asked: int | None,
        sent: int) -> None:
    """The Responses API refuses ``max_output_tokens`` below 16 (integer_below_min_value): a key's smaller cap
    reaches a native step as 16, as translated steps onto a Responses upstream get it (MIN_OUTPUT_TOKENS)."""
    conn = db.connect(str(tmp_path / "gw.db"))
    key = KeyStore(conn).create("capped", max_tokens=cap)[1]
    conn.close()
    responses_api.on("gpt-5-mini", lambda body: mr.response(mr.message("Fine.")))
    body: dict[str, Any] = {"model": "native", "input": "hi"}
    if asked is not None:
        body["max_output_tokens"] = asked
    with gateway(native_config(upstream, tmp_path)) as gw:
        r = httpx.post(gw.url + "/v1/responses", json=body, headers={"authorization": f"Bearer {key}"}, timeout=20)
    assert r.status_code == 200, r.text
    assert upstream.received[-1].json["max_output_tokens"] == sent


def refusal_chunk(text: str, role: bool = False) -> dict[str, Any]:
    c = chunk(role=role)
    c["choices"][0]["delta"]["refusal"] = text
    return c


@pytest.mark.parametrize("before", [None, "Let me see. "], ids=["refusal", "text-then-refusal"])
def test_a_refusal_streams_as_a_refusal_part(upstream: MockUpstream, before: str | None) -> None:
    """A chat ``refusal`` delta is a refusal content part of the assistant message (``content_part.added``
    of type refusal, ``response.refusal.delta``/``.done``), as OpenAI streams one; after text, the same
    message's next part."""
    events: list[Any] = [chunk("", role=True)]
    if before:
        events.append(chunk(before))
    events += [refusal_chunk("I can't"), refusal_chunk(" help with that."), chunk(finish="stop"),
               chunk(choices=False, usage=USAGE)]
    upstream.replies["stream-model"] = Reply(sse=events)
    with gateway(config(upstream)) as gw:
        got = events_of(raw_stream(gw, {"model": "streamer", "input": "hi"}).content)
        with sdk(gw).responses.stream(model="streamer", input="hi") as s:
            for _ in s:
                pass
            final = s.get_final_response()
    mr.check_events(got)  # the SDK's types and accumulator
    refusal = ["content_part.added", "refusal.delta", "refusal.delta", "refusal.done", "content_part.done"]
    text = ["content_part.added", "output_text.delta", "output_text.done", "content_part.done"] if before else []
    assert types_of(got) == ["created", "in_progress", "output_item.added", *text, *refusal, "output_item.done",
                             "completed"]
    index = 1 if before else 0
    added = next(e for e in got if e["type"] == "response.content_part.added" and e["part"]["type"] == "refusal")
    assert added["content_index"] == index and added["part"] == {"type": "refusal", "refusal": ""}
    done = next(e for e in got if e["type"] == "response.refusal.done")
    assert done["refusal"] == "I can't help with that." and done["content_index"] == index
    [message] = got[-1]["response"]["output"]
    assert message["content"][index] == {"type": "refusal", "refusal": "I can't help with that."}
    assert [p["type"] for p in message["content"]] == (["output_text", "refusal"] if before else ["refusal"])
    assert final.output[0].content[index].type == "refusal"  # type: ignore[union-attr]


def call_chunk(index: Any, call_id: str | None = None, name: str | None = None, arguments: str | None = None
               ) -> dict[str, Any]:
    """A chunk with one tool-call fragment (``index`` as given, None too: some upstreams send null)."""
    fragment: dict[str, Any] = {"index": index, "type": "function", "function": {}}
    if call_id is not None:
        fragment["id"] = call_id
    if name is not None:
        fragment["function"]["name"] = name
    if arguments is not None:
        fragment["function"]["arguments"] = arguments
    c = chunk()
    c["choices"][0]["delta"] = {"tool_calls": [fragment]}
    return c


NONCONFORMANT_CALLS: dict[str, tuple[list[Any], list[tuple[str, str, str]]]] = {
    # case: (the fragments, the calls that must come out: (call_id, name, arguments))
    "index-null": ([call_chunk(None, "call_1", "f", "{}")], [("call_1", "f", "{}")]),
    "index-null-twice": ([call_chunk(None, "call_1", "f", '{"a":1}'), call_chunk(None, "call_2", "g", '{"b":2}')],
                         [("call_1", "f", '{"a":1}'), ("call_2", "g", '{"b":2}')]),
    "index-null-continued": ([call_chunk(None, "call_1", "f", '{"a":'), call_chunk(None, arguments="1}")],
                             [("call_1", "f", '{"a":1}')]),
    "new-id-same-index": ([call_chunk(0, "call_1", "f", '{"a":1}'), call_chunk(0, "call_2", "g", '{"b":2}')],
                          [("call_1", "f", '{"a":1}'), ("call_2", "g", '{"b":2}')]),
    "new-id-then-rest": ([call_chunk(0, "call_1", "f", '{"a":1}'), call_chunk(0, "call_2", "g", '{"b":'),
                          call_chunk(0, arguments="2}")],
                         [("call_1", "f", '{"a":1}'), ("call_2", "g", '{"b":2}')]),
    "name-repeated": ([call_chunk(0, "call_1", "f", '{"a":'), call_chunk(0, name="f", arguments="1}")],
                      [("call_1", "f", '{"a":1}')]),
}


@pytest.mark.parametrize("case", list(NONCONFORMANT_CALLS))
def test_nonconformant_tool_call_fragments(upstream: MockUpstream, case: str) -> None:
    """``index: null`` is the next free index (a fragment without id or name goes on with the last call); a
    fragment with another ``id`` on an index whose call has one starts a new call; names never concatenate."""
    fragments, want = NONCONFORMANT_CALLS[case]
    upstream.replies["tool-model"] = Reply(sse=[chunk("", role=True), *fragments, chunk(finish="tool_calls")])
    with gateway(config(upstream)) as gw:
        events = events_of(raw_stream(gw, {"model": "tools", "input": "hi", "tools": [WEATHER]}).content)
    mr.check_events(events)
    output = events[-1]["response"]["output"]
    assert [(o["call_id"], o["name"], o["arguments"]) for o in output] == want
