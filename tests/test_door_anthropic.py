"""The Anthropic Messages door (``POST /v1/messages``, ``/v1/messages/count_tokens``): the official ``anthropic``
SDK as the client, through the gateway, to the wire-checking mocks: OpenAI (MockUpstream), Anthropic
(AnthropicMock: native passthrough), Gemini and Vertex express mode (GeminiMock: translated).

What each test asserts is in its name; the upstream side is checked on what the mocks received, and the
mocks themselves refuse (and record) anything their API would refuse.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import anthropic
import httpx
import pytest

from at_gateway.doors.anthropic import AnthropicDoor, estimate_tokens
from at_gateway.doors.base import Call, dumps
from tests.conftest import GATEWAY_KEY, RunningGateway, base_config, run_gateway
from tests.mock_anthropic import (
    API_KEY,
    API_VERSION,
    AnthropicMock,
    error_reply,
    frame,
    message,
    serve_count_tokens,
    stream_events,
    stream_reply,
    text,
    thinking,
    tool_use,
)
from tests.mock_anthropic import sse as anthropic_sse
from tests.mock_google import API_KEY as GEMINI_KEY
from tests.mock_google import GeminiMock, response, sse, usage
from tests.mock_google import text as gtext
from tests.mock_upstream import MockUpstream, Received, Reply, chat_completion, chunk, stream_of

SDK_VERSION = anthropic._constants.ANTHROPIC_API_VERSION  # what the SDK sends (2026-10-21 in 2.15)
CLAUDE = "claude-sonnet-4-5"
GPT = "gpt-4o-mini"
GEM = "gemini-2.5-flash"
VERTEX_KEY = "vertex-express-key-123"
UPSTREAM_SECRETS = ("sk-upstream-secret-1", "sk-upstream-secret-2", API_KEY, GEMINI_KEY, VERTEX_KEY)
WEATHER = {"name": "get_weather", "description": "Current weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
OA_WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                                               "parameters": WEATHER["input_schema"]}}
USER = {"role": "user", "content": "hi"}

ROUTES = [
    {"name": "oa", "steps": [{"provider": "up1", "model": GPT}]},
    {"name": "reasoner", "steps": [{"provider": "up1", "model": "o4-mini"}]},
    {"name": "cl", "steps": [{"provider": "claude", "model": CLAUDE}]},
    {"name": "gm", "steps": [{"provider": "gem", "model": GEM}]},
    {"name": "vx", "steps": [{"provider": "vx", "model": GEM}]},
    {"name": "oa-then-cl", "steps": [{"provider": "up1", "model": "broken"},
                                     {"provider": "claude", "model": CLAUDE}]},
    {"name": "cl-then-oa", "steps": [{"provider": "claude", "model": "claude-busy"},
                                     {"provider": "up1", "model": GPT}]},
    {"name": "busy", "steps": [{"provider": "claude", "model": "claude-busy"},
                               {"provider": "claude", "model": "claude-unavailable"}]},
    {"name": "busy-then-broken", "steps": [{"provider": "claude", "model": "claude-busy"},
                                           {"provider": "up1", "model": "broken"}]},
    {"name": "cl-then-cl", "steps": [{"provider": "claude", "model": "claude-busy"},
                                     {"provider": "claude", "model": CLAUDE}]},
    {"name": "oa-cut", "steps": [{"provider": "up1", "model": "gpt-cut"}]},
    {"name": "cl-cut", "steps": [{"provider": "claude", "model": "claude-cut"}]},
    {"name": "oa-bad", "steps": [{"provider": "up1", "model": "gpt-bad"}]},
    {"name": "oa-limited", "steps": [{"provider": "up1", "model": "gpt-limited"}]},
]


# ---------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------

@pytest.fixture
def claude(upstream: MockUpstream) -> Iterator[AnthropicMock]:
    # The SDK's own anthropic-version passes through to anthropic steps, as the brief wants: accept it too.
    mock = AnthropicMock(upstream, versions=(API_VERSION, SDK_VERSION))
    yield mock
    assert mock.problems == [], "the gateway sent requests that break the Messages API schema"


def _google(vertex: bool) -> Iterator[GeminiMock]:
    up = MockUpstream().start()
    mock = GeminiMock(up, vertex=vertex, api_key=VERTEX_KEY if vertex else GEMINI_KEY)
    try:
        yield mock
    finally:
        up.stop()
    assert mock.problems == [], "the gateway sent requests the Gemini API would refuse"


@pytest.fixture
def google() -> Iterator[GeminiMock]:
    yield from _google(False)


@pytest.fixture
def vertex() -> Iterator[GeminiMock]:
    yield from _google(True)


class Mocks(NamedTuple):
    upstream: MockUpstream  # OpenAI, and Anthropic on the same server (replies by model)
    claude: AnthropicMock
    google: GeminiMock
    vertex: GeminiMock


@pytest.fixture
def mocks(upstream: MockUpstream, claude: AnthropicMock, google: GeminiMock, vertex: GeminiMock) -> Mocks:
    return Mocks(upstream, claude, google, vertex)


def config(m: Mocks, **top: Any) -> dict[str, Any]:
    cfg = base_config(m.upstream.url, ROUTES, **top)
    cfg["providers"] += [
        {"name": "claude", "type": "anthropic", "base_url": m.upstream.url, "api_key": API_KEY},
        {"name": "gem", "type": "gemini", "base_url": m.google.url, "api_key": GEMINI_KEY},
        {"name": "vx", "type": "vertex", "base_url": m.vertex.url, "location": "europe-west4", "api_key": VERTEX_KEY},
    ]
    return cfg


@pytest.fixture
def gw(mocks: Mocks) -> Iterator[RunningGateway]:
    with run_gateway(config(mocks)) as running:
        yield running


def sdk(gw: RunningGateway, **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=GATEWAY_KEY, max_retries=0, timeout=20, **kw)


def kw(body: dict[str, Any]) -> dict[str, Any]:
    """SDK arguments for a wire body: this SDK has no sampling parameters (temperature, top_p, top_k) of its
    own any more, so they travel as extra_body, as a client still sending them would."""
    sampling = {k: body[k] for k in ("temperature", "top_p", "top_k") if k in body}
    rest = {k: v for k, v in body.items() if k not in sampling}
    return {**rest, "extra_body": sampling} if sampling else rest


def raw_events(gw: RunningGateway, body: dict[str, Any]) -> list[tuple[str, Any]]:
    """The (event name, data) pairs of a streamed answer, as the wire has them."""
    r = httpx.post(gw.url + "/v1/messages", json={**body, "stream": True}, timeout=20,
                   headers={"x-api-key": GATEWAY_KEY, "anthropic-version": "2023-06-01"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/event-stream"
    out = []
    for block in r.text.split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        if not lines:
            continue
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ") and len(lines) == 2, block
        data = json.loads(lines[1][6:])
        assert data["type"] == lines[0][7:], block  # the data's type names the event, as Anthropic sends it
        out.append((lines[0][7:], data))
    return out


def names(events: list[tuple[str, Any]]) -> list[str]:
    """Event names with runs of content_block_delta collapsed to one."""
    out: list[str] = []
    for name, _ in events:
        if not (out and name == out[-1] == "content_block_delta"):
            out.append(name)
    return out


def oa_usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def tool_chunk(index: int, args: str, call_id: str | None = None, name: str | None = None) -> dict[str, Any]:
    tc: dict[str, Any] = {"index": index, "function": {"arguments": args}}
    if call_id:
        tc.update(id=call_id, type="function")
        tc["function"]["name"] = name
    return {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": GPT,
            "choices": [{"index": 0, "delta": {"tool_calls": [tc]}, "finish_reason": None}]}


def no_secrets(gw: RunningGateway, *texts: str) -> None:
    for secret in UPSTREAM_SECRETS:
        assert secret not in gw.logs.getvalue()
        for t in texts:
            assert secret not in t


# ---------------------------------------------------------------------------
# Each provider type as the step: a whole answer and a stream
# ---------------------------------------------------------------------------

class StepCase(NamedTuple):
    route: str
    setup: Callable[[Mocks], None]
    check: Callable[[Mocks], None]  # what the upstream received for a whole answer


def _setup_oa(m: Mocks) -> None:
    m.upstream.replies[GPT] = lambda rec: (
        Reply(sse=stream_of("Hel", "lo", "!")) if rec.json.get("stream")
        else Reply(body=chat_completion("Hello!", model=GPT, usage=oa_usage(50, 5, cached=30))))


def _check_oa(m: Mocks) -> None:
    assert m.upstream.received[-1].json == {
        "model": GPT, "max_tokens": 100, "temperature": 0.2, "stop": ["END"], "user": "u-1",
        "messages": [{"role": "system", "content": "Be brief."}, USER]}


def _setup_cl(m: Mocks) -> None:
    m.claude.on(CLAUDE, lambda body: message(text("Hello!"), model=CLAUDE, usage={
        "input_tokens": 10, "output_tokens": 3, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 300}))


def _check_cl(m: Mocks) -> None:
    # native: the body as the SDK sent it, only the model rewritten (it was already the step's: no route alias)
    assert m.claude.requests[-1] == {"model": CLAUDE, "max_tokens": 100, "temperature": 0.2, "stop_sequences": ["END"],
                                     "metadata": {"user_id": "u-1"}, "system": "Be brief.", "messages": [USER]}


def _gemini_answers(mock: GeminiMock) -> None:
    mock.on(GEM, lambda c: sse(response(gtext("Hel"), finish=None), response(gtext("lo!"), meta=usage(12, 4, cached=2)))
            if c.stream else Reply(body=response(gtext("Hello!"), meta=usage(12, 4, cached=2))))


def _check_gemini(mock: GeminiMock, path: str) -> None:
    got = mock.calls[-1]
    assert got.received.path == path
    assert got.body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert got.body["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]
    gen = got.body["generationConfig"]
    assert (gen["maxOutputTokens"], gen["stopSequences"], gen["temperature"]) == (100, ["END"], 0.2)


STEP_CASES = [
    StepCase("oa", _setup_oa, _check_oa),
    StepCase("cl", _setup_cl, _check_cl),
    StepCase("gm", lambda m: _gemini_answers(m.google),
             lambda m: _check_gemini(m.google, f"/v1beta/models/{GEM}:generateContent")),
    StepCase("vx", lambda m: _gemini_answers(m.vertex),
             lambda m: _check_gemini(m.vertex, f"/v1/publishers/google/models/{GEM}:generateContent")),
]
STEP_IDS = [c.route for c in STEP_CASES]
ASK = {"max_tokens": 100, "temperature": 0.2, "stop_sequences": ["END"], "metadata": {"user_id": "u-1"},
       "system": "Be brief.", "messages": [USER]}


@pytest.mark.parametrize("case", STEP_CASES, ids=STEP_IDS)
def test_a_whole_answer_from_each_step_type(mocks: Mocks, gw: RunningGateway, case: StepCase) -> None:
    case.setup(mocks)
    raw = sdk(gw).messages.with_raw_response.create(model=case.route, **kw(ASK))
    msg = raw.parse()
    assert raw.headers["content-type"] == "application/json" and raw.headers["x-gateway-route"] == case.route
    assert msg.type == "message" and msg.role == "assistant"
    assert [(b.type, getattr(b, "text", None)) for b in msg.content] == [("text", "Hello!")]
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    case.check(mocks)
    # usage in Anthropic's terms, and the same tokens in the request log (OpenAI's terms: cache inside the prompt)
    u = msg.usage
    log = gw.request_logs()[-1]
    assert log["door"] == "anthropic" and log["status"] == 200
    assert log["tokens"]["prompt_tokens"] == u.input_tokens + (u.cache_read_input_tokens or 0) + (
        u.cache_creation_input_tokens or 0)
    assert log["tokens"]["completion_tokens"] == u.output_tokens > 0
    if case.route == "oa":
        assert (u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens, u.output_tokens) == \
            (20, 30, 0, 5)
    if case.route == "cl":
        assert (u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens) == (10, 300, 20)
    no_secrets(gw, raw.http_response.text)


@pytest.mark.parametrize("case", STEP_CASES, ids=STEP_IDS)
def test_a_stream_from_each_step_type_has_the_exact_event_sequence(mocks: Mocks, gw: RunningGateway,
                                                                   case: StepCase) -> None:
    case.setup(mocks)
    events = raw_events(gw, {"model": case.route, **ASK})
    # Translated: ping after the first content_block_start, as the Messages API documents its streams; native
    # (cl): the upstream's own events, in its order.
    head = ["content_block_start", "ping"] if case.route != "cl" else ["ping", "content_block_start"]
    assert names(events) == ["message_start", *head, "content_block_delta",
                             "content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["role"] == "assistant" and start["content"] == [] and start["stop_reason"] is None
    block_start = next(d for n, d in events if n == "content_block_start")
    assert block_start == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert len(deltas) >= 2 and all(d["type"] == "text_delta" for d in deltas)
    assert "".join(d["text"] for d in deltas) == "Hello!"
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "end_turn" and delta["usage"]["output_tokens"] > 0
    with sdk(gw).messages.stream(model=case.route, **kw(ASK)) as stream:
        assert "".join(stream.text_stream) == "Hello!"
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn"
    log = gw.request_logs(2)[-1]
    assert log["stream"] is True and log["tokens"]["completion_tokens"] == final.usage.output_tokens
    assert log["tokens"]["prompt_tokens"] == final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) + (
        final.usage.cache_creation_input_tokens or 0) > 0
    if case.route == "oa":
        sent = mocks.upstream.received[-1].json
        assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


# ---------------------------------------------------------------------------
# Tools over two turns
# ---------------------------------------------------------------------------

def test_tools_over_two_turns_translated(mocks: Mocks, gw: RunningGateway) -> None:
    calls = [{"id": "call_abc", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    first = chat_completion(None, model=GPT)
    first["choices"][0].update(message={"role": "assistant", "content": None, "tool_calls": calls},
                               finish_reason="tool_calls")
    mocks.upstream.replies[GPT] = lambda rec: Reply(body=first if len(rec.json["messages"]) == 1
                                                    else chat_completion("Sunny in Paris.", model=GPT))
    client = sdk(gw)
    msg = client.messages.create(model="oa", max_tokens=200, messages=[{"role": "user", "content": "Weather?"}],
                                 tools=[{**WEATHER, "cache_control": {"type": "ephemeral"}}],
                                 tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert msg.stop_reason == "tool_use"
    assert [(b.type, b.id, b.name, b.input) for b in msg.content if b.type == "tool_use"] == \
        [("tool_use", "call_abc", "get_weather", {"city": "Paris"})]
    sent = mocks.upstream.received[-1].json
    assert sent["tools"] == [OA_WEATHER]
    assert sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is False
    second = client.messages.create(model="oa", max_tokens=200, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_abc", "content": "sunny, 24C"},
                                     {"type": "text", "text": "Thanks."}]}])
    assert second.content[0].type == "text" and second.content[0].text == "Sunny in Paris."
    assert mocks.upstream.received[-1].json["messages"] == [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_abc", "content": "sunny, 24C"},
        {"role": "user", "content": "Thanks."},
    ]


def test_a_streamed_tool_call_translated_is_input_json_deltas(mocks: Mocks, gw: RunningGateway) -> None:
    mocks.upstream.replies[GPT] = Reply(sse=[
        chunk("", role=True, model=GPT), chunk("Let me check.", model=GPT),
        tool_chunk(0, "", "call_1", "get_weather"), tool_chunk(0, '{"city":'), tool_chunk(0, '"Paris"}'),
        tool_chunk(1, '{"city":"Rome"}', "call_2", "get_weather"),
        chunk(finish="tool_calls", model=GPT), chunk(choices=False, usage=oa_usage(9, 7))])
    body = {"model": "oa", "max_tokens": 200, "tools": [WEATHER], "messages": [{"role": "user", "content": "Weather?"}]}
    events = raw_events(gw, body)
    assert names(events) == ["message_start",
                             "content_block_start", "ping", "content_block_delta", "content_block_stop",
                             "content_block_start", "content_block_delta", "content_block_stop",
                             "content_block_start", "content_block_delta", "content_block_stop",
                             "message_delta", "message_stop"]
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert starts[1] == {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}
    assert [d["index"] for n, d in events if n == "content_block_start"] == [0, 1, 2]
    json_deltas = [d["delta"]["partial_json"] for n, d in events if n == "content_block_delta" and d["index"] == 1]
    assert json_deltas == ['{"city":', '"Paris"}']
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert events[-2][1]["usage"] == {"input_tokens": 9, "cache_creation_input_tokens": 0,
                                      "cache_read_input_tokens": 0, "output_tokens": 7}
    with sdk(gw).messages.stream(**body) as stream:
        final = stream.get_final_message()
    assert [(b.type, getattr(b, "input", None)) for b in final.content] == [
        ("text", None), ("tool_use", {"city": "Paris"}), ("tool_use", {"city": "Rome"})]



def well_formed(events: list[tuple[str, Any]]) -> None:
    """The Messages stream's block rules: indexes 0, 1, ... in order, one block open at a time, every delta
    inside its block's start and stop."""
    open_, next_ = None, 0
    for name, d in events:
        if name == "content_block_start":
            assert open_ is None and d["index"] == next_, (name, d, open_)
            open_, next_ = d["index"], next_ + 1
        elif name == "content_block_delta":
            assert d["index"] == open_, (name, d, open_)
        elif name == "content_block_stop":
            assert d["index"] == open_, (name, d, open_)
            open_ = None
    assert open_ is None


def blocks(events: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Each block's type and what its deltas add up to (a tool's input decoded)."""
    out: list[list[Any]] = []
    for name, d in events:
        if name == "content_block_start":
            out.append([d["content_block"]["type"], ""])
        elif name == "content_block_delta":
            delta = d["delta"]
            out[d["index"]][1] += delta.get("text") or delta.get("partial_json") or ""
    return [(kind, json.loads(got) if kind == "tool_use" else got) for kind, got in out]


PARIS, ROME, OSLO = '{"city":"Paris"}', '{"city":"Rome"}', '{"city":"Oslo"}'


@pytest.mark.parametrize("chunks, expected", [
    pytest.param([tool_chunk(0, "", "call_1", "get_weather"), tool_chunk(1, "", "call_2", "get_weather"),
                  tool_chunk(0, PARIS), tool_chunk(1, ROME)],
                 [("tool_use", {"city": "Paris"}), ("tool_use", {"city": "Rome"})], id="starts-then-arguments"),
    pytest.param([tool_chunk(0, '{"city":', "call_1", "get_weather"), tool_chunk(1, '{"ci', "call_2", "get_weather"),
                  tool_chunk(0, '"Paris"}'), tool_chunk(1, 'ty":"Rome"}')],
                 [("tool_use", {"city": "Paris"}), ("tool_use", {"city": "Rome"})], id="fragments-alternate"),
    pytest.param([tool_chunk(0, "", "call_1", "get_weather"), tool_chunk(1, "", "call_2", "get_weather"),
                  tool_chunk(2, OSLO, "call_3", "get_weather"), tool_chunk(1, ROME), tool_chunk(0, PARIS)],
                 [("tool_use", {"city": "Paris"}), ("tool_use", {"city": "Rome"}), ("tool_use", {"city": "Oslo"})],
                 id="three-calls-backwards"),
    pytest.param([tool_chunk(0, '{"city":', "call_1", "get_weather"), chunk("Checking.", model=GPT),
                  tool_chunk(0, '"Paris"}')],
                 [("tool_use", {"city": "Paris"}), ("text", "Checking.")], id="text-inside-a-call"),
])
def test_interleaved_tool_call_fragments_stay_inside_their_blocks(mocks: Mocks, gw: RunningGateway,
                                                                  chunks: list[Any],
                                                                  expected: list[tuple[str, Any]]) -> None:
    """Some upstreams start every call before sending arguments (or alternate them): the open block keeps
    streaming; the other calls are held and sent whole, each delta inside its own block."""
    mocks.upstream.replies[GPT] = Reply(sse=[chunk("", role=True, model=GPT), *chunks,
                                             chunk(finish="tool_calls", model=GPT)])
    body: dict[str, Any] = {"model": "oa", "max_tokens": 200, "tools": [WEATHER],
                            "messages": [{"role": "user", "content": "Weather?"}]}
    events = raw_events(gw, body)
    well_formed(events)
    assert blocks(events) == expected
    ids = [d["content_block"].get("id") for n, d in events if n == "content_block_start"]
    assert [i for i in ids if i] == [f"call_{n + 1}" for n in range(len(ids)) if expected[n][0] == "tool_use"]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    with sdk(gw).messages.stream(**body) as stream:
        final = stream.get_final_message()
    assert [(b.type, getattr(b, "input", None) or getattr(b, "text", None)) for b in final.content] == expected


def test_tools_over_two_turns_native_pass_through_unchanged(mocks: Mocks, gw: RunningGateway) -> None:
    mocks.claude.on(CLAUDE, lambda body: message(tool_use("toolu_01A", "get_weather", {"city": "Paris"}),
                                                 stop_reason="tool_use") if len(body["messages"]) == 1
                    else message(text("Sunny.")))
    client = sdk(gw)
    with client.messages.stream(model="cl", max_tokens=200, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"},
                                messages=[{"role": "user", "content": "Weather?"}]) as stream:
        first = stream.get_final_message()
    assert first.stop_reason == "tool_use" and first.content[0].input == {"city": "Paris"}
    turns = [{"role": "user", "content": "Weather?"},
             {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01A", "content": "sunny",
                                           "is_error": False}]}]
    second = client.messages.create(model="cl", max_tokens=200, tools=[WEATHER], messages=turns)
    assert second.content[0].text == "Sunny."
    assert mocks.claude.requests[-1]["messages"] == turns
    assert mocks.claude.requests[0]["tool_choice"] == {"type": "tool", "name": "get_weather"}


@pytest.mark.parametrize("choice, expected", [
    ({"type": "auto"}, {"tool_choice": "auto"}),
    ({"type": "any"}, {"tool_choice": "required"}),
    ({"type": "none"}, {"tool_choice": "none"}),
    ({"type": "tool", "name": "get_weather"},
     {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ({"type": "any", "disable_parallel_tool_use": True}, {"tool_choice": "required", "parallel_tool_calls": False}),
])
def test_tool_choice_translated(mocks: Mocks, gw: RunningGateway, choice: dict[str, Any],
                                expected: dict[str, Any]) -> None:
    mocks.upstream.replies[GPT] = Reply(body=chat_completion("ok", model=GPT))
    sdk(gw).messages.create(model="oa", max_tokens=10, tools=[WEATHER], tool_choice=choice,
                            messages=[USER])
    sent = mocks.upstream.received[-1].json
    assert {k: sent[k] for k in expected} == expected
    assert "parallel_tool_calls" in expected or "parallel_tool_calls" not in sent


# ---------------------------------------------------------------------------
# Thinking, signatures, cache_control, Claude Code's shapes
# ---------------------------------------------------------------------------

def test_thinking_and_signatures_survive_a_native_route_across_turns(mocks: Mocks, gw: RunningGateway) -> None:
    thought = thinking("Let me think about Paris.")
    mocks.claude.on(CLAUDE, lambda body: message(thought, text("Paris.")))
    client = sdk(gw, default_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"})
    ask = {"model": "cl", "max_tokens": 4000, "thinking": {"type": "enabled", "budget_tokens": 2048}}
    events = raw_events(gw, {**ask, "messages": [USER]})
    sig = [d["delta"] for n, d in events if n == "content_block_delta" and d["delta"]["type"] == "signature_delta"]
    assert sig == [{"type": "signature_delta", "signature": thought["signature"]}]
    with client.messages.stream(**ask, messages=[USER]) as stream:
        first = stream.get_final_message()
    block = first.content[0]
    assert block.type == "thinking" and block.signature == thought["signature"]
    turns = [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
             {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
             {"role": "user", "content": "And Rome?"}]
    system = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
    client.messages.create(**ask, system=system, messages=turns)
    got = mocks.claude.requests[-1]
    assert got["messages"] == turns and got["system"] == system and got["thinking"] == ask["thinking"]
    rec = mocks.upstream.received[-1]
    assert rec.headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert rec.headers["anthropic-version"] == SDK_VERSION and rec.headers["x-api-key"] == API_KEY


def test_reasoning_from_a_translated_step_is_a_thinking_block(mocks: Mocks, gw: RunningGateway) -> None:
    whole = chat_completion("Paris.", model=GPT)
    whole["choices"][0]["message"]["reasoning_content"] = "The capital of France."
    reasoning = [{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": GPT,
                  "choices": [{"index": 0, "delta": {"reasoning_content": part}, "finish_reason": None}]}
                 for part in ("The capital ", "of France.")]
    mocks.upstream.replies[GPT] = lambda rec: Reply(
        sse=[chunk("", role=True), *reasoning, chunk("Paris."), chunk(finish="stop")]) \
        if rec.json.get("stream") else Reply(body=whole)
    msg = sdk(gw).messages.create(model="oa", max_tokens=50, messages=[USER])
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in msg.content] == [
        ("thinking", "The capital of France."), ("text", "Paris.")]
    events = raw_events(gw, {"model": "oa", "max_tokens": 50, "messages": [USER]})
    kinds = [(d["content_block"]["type"] if n == "content_block_start" else d["delta"]["type"])
             for n, d in events if n in ("content_block_start", "content_block_delta")]
    assert kinds == ["thinking", "thinking_delta", "thinking_delta", "text", "text_delta"]


@pytest.mark.parametrize("route, expected, absent", [
    # a chat model: no reasoning_effort (it would refuse it), max_tokens as Anthropic named it
    ("oa", {"max_tokens": 4000}, ("reasoning_effort", "max_completion_tokens", "top_k", "thinking")),
    # an OpenAI reasoning model: the budget as an effort, and the token field such models take
    ("reasoner", {"max_completion_tokens": 4000, "reasoning_effort": "medium"}, ("max_tokens", "top_k")),
])
def test_thinking_and_top_k_reach_openai_steps_as_they_can_take_them(mocks: Mocks, gw: RunningGateway, route: str,
                                                                     expected: dict[str, Any],
                                                                     absent: tuple[str, ...]) -> None:
    mocks.upstream.default = Reply(body=chat_completion("ok"))
    sdk(gw).messages.create(model=route, max_tokens=4000, extra_body={"top_k": 40}, messages=[USER],
                            thinking={"type": "enabled", "budget_tokens": 8000})
    sent = mocks.upstream.received[-1].json
    assert {k: sent.get(k) for k in expected} == expected
    assert [k for k in absent if k in sent] == []


def test_thinking_and_top_k_reach_a_gemini_step(mocks: Mocks, gw: RunningGateway) -> None:
    _gemini_answers(mocks.google)
    sdk(gw).messages.create(model="gm", max_tokens=4000, extra_body={"top_k": 40}, messages=[USER],
                            thinking={"type": "enabled", "budget_tokens": 2048})
    gen = mocks.google.calls[-1].body["generationConfig"]
    assert gen["topK"] == 40 and gen["thinkingConfig"]["includeThoughts"] is True


def test_claude_codes_shapes_are_accepted_on_a_translated_route(mocks: Mocks, gw: RunningGateway) -> None:
    """Claude Code sends system blocks with cache_control, role "system" messages mid-conversation and
    cache_control on content blocks: all accepted, the system texts kept in their place."""
    mocks.upstream.replies[GPT] = Reply(body=chat_completion("ok", model=GPT))
    body = {
        "model": "oa", "max_tokens": 100,
        "system": [{"type": "text", "text": "You are Claude Code."},
                   {"type": "text", "text": "Be careful.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": "Hello."},
            {"role": "system", "content": "The user switched to plan mode."},
            {"role": "user", "content": [{"type": "text", "text": "Plan it."},
                                         {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                      "data": "iVBORw0KGgo="}},
                                         {"type": "image", "source": {"type": "url",
                                                                      "url": "https://example.com/a.png"}}]},
        ]}
    r = httpx.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": GATEWAY_KEY}, timeout=20)
    assert r.status_code == 200, r.text
    assert mocks.upstream.received[-1].json["messages"] == [
        {"role": "system", "content": "You are Claude Code.\n\nBe careful."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "system", "content": "The user switched to plan mode."},
        {"role": "user", "content": [{"type": "text", "text": "Plan it."},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                                     {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
    ]



@pytest.mark.parametrize("content, is_error, expected", [
    ("ls: permission denied", True, "Error: ls: permission denied"),
    ([{"type": "text", "text": "exit 1"}, {"type": "text", "text": "no such file"}], True,
     "Error: exit 1\nno such file"),
    ("fine", False, "fine"),
    ("fine", None, "fine"),
])
def test_a_failed_tool_result_says_so_on_a_translated_step(mocks: Mocks, gw: RunningGateway, content: Any,
                                                           is_error: bool | None, expected: str) -> None:
    """Chat's tool messages have no is_error: the model is told in the content, as the flag tells Claude."""
    mocks.upstream.replies[GPT] = Reply(body=chat_completion("ok", model=GPT))
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": "toolu_01", "content": content}
    if is_error is not None:
        result["is_error"] = is_error
    ask: dict[str, Any] = {"model": "oa", "max_tokens": 10, "tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [result]}]}
    sdk(gw).messages.create(**ask)
    sent = mocks.upstream.received[-1].json["messages"]
    assert sent[-1] == {"role": "tool", "tool_call_id": "toolu_01", "content": expected}


def test_built_in_tools_are_dropped_on_translated_steps_with_a_warning(mocks: Mocks, gw: RunningGateway) -> None:
    mocks.upstream.replies[GPT] = Reply(body=chat_completion("ok", model=GPT))
    raw = sdk(gw).messages.with_raw_response.create(
        model="oa", max_tokens=10, messages=[USER],
        tools=[WEATHER, {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}])
    assert raw.parse().content[0].text == "ok"
    assert mocks.upstream.received[-1].json["tools"] == [OA_WEATHER]
    assert "web_search" in raw.headers["x-gateway-warning"]


@pytest.mark.parametrize("finish, extra, stop_reason, stop_sequence", [
    ("stop", {}, "end_turn", None),
    ("length", {}, "max_tokens", None),
    ("tool_calls", {}, "tool_use", None),
    ("content_filter", {}, "refusal", None),
    ("stop", {"stop_reason": "END"}, "stop_sequence", "END"),  # vLLM and kin name the stop sequence that matched
])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_reason_mapping(mocks: Mocks, gw: RunningGateway, finish: str, extra: dict[str, Any], stop_reason: str,
                             stop_sequence: str | None, stream: bool) -> None:
    whole = chat_completion("ok", model=GPT)
    whole["choices"][0].update(finish_reason=finish, **extra)
    last = chunk(finish=finish, model=GPT)
    last["choices"][0].update(extra)
    mocks.upstream.replies[GPT] = Reply(sse=[chunk("", role=True), chunk("ok"), last]) if stream else Reply(body=whole)
    ask = {"model": "oa", "max_tokens": 10, "stop_sequences": ["END"], "messages": [USER]}
    if stream:
        with sdk(gw).messages.stream(**ask) as s:
            msg = s.get_final_message()
    else:
        msg = sdk(gw).messages.create(**ask)
    assert (msg.stop_reason, msg.stop_sequence) == (stop_reason, stop_sequence)


# ---------------------------------------------------------------------------
# count_tokens
# ---------------------------------------------------------------------------

COUNT_ASK = {"system": "Be brief.", "messages": [{"role": "user", "content": "What is the weather in Paris? " * 40}],
             "tools": [WEATHER]}


def test_count_tokens_is_forwarded_to_an_anthropic_step(mocks: Mocks, gw: RunningGateway) -> None:
    seen: list[Received] = []
    serve_count_tokens(mocks.claude, CLAUDE, 42, seen)
    raw = sdk(gw).messages.with_raw_response.count_tokens(model="cl", **COUNT_ASK)
    assert raw.parse().input_tokens == 42
    assert "x-gateway-token-count" not in raw.headers and raw.headers["x-gateway-provider"] == "claude"
    assert json.loads(seen[-1].body) == {"model": CLAUDE, **COUNT_ASK}
    # Claude Code's call: the beta path, its anthropic-beta header passed on unchanged
    beta = sdk(gw).beta.messages.count_tokens(model="cl", betas=["context-1m-2025-08-07"], **COUNT_ASK)
    assert beta.input_tokens == 42
    assert seen[-1].headers["anthropic-beta"] == "context-1m-2025-08-07,token-counting-2024-11-01"
    assert seen[-1].path == "/v1/messages/count_tokens"
    log = gw.request_logs(2)[-1]
    assert log["door"] == "anthropic" and log["path"] == "/v1/messages/count_tokens" and log["status"] == 200


def test_count_tokens_falls_through_anthropic_steps(mocks: Mocks, gw: RunningGateway) -> None:
    serve_count_tokens(mocks.claude, "claude-busy", error_reply(529, "overloaded_error", "Overloaded"))
    serve_count_tokens(mocks.claude, CLAUDE, 42)
    raw = sdk(gw).messages.with_raw_response.count_tokens(model="cl-then-cl", **COUNT_ASK)
    assert raw.parse().input_tokens == 42 and raw.headers["x-gateway-attempts"] == "2"


@pytest.mark.parametrize("route", ["oa", "gm", "cl-then-oa"], ids=["no-anthropic-step", "gemini", "anthropic-fails"])
def test_count_tokens_is_a_marked_conservative_estimate_without_a_working_anthropic_step(
        mocks: Mocks, gw: RunningGateway, route: str) -> None:
    serve_count_tokens(mocks.claude, "claude-busy", error_reply(529, "overloaded_error", "Overloaded"))
    raw = sdk(gw).messages.with_raw_response.count_tokens(model=route, **COUNT_ASK)
    count = raw.parse().input_tokens
    assert raw.headers["x-gateway-token-count"] == "estimated"
    text_chars = len(json.dumps(COUNT_ASK))
    assert text_chars / 4 <= count <= text_chars  # more than a tokenizer would count, never absurd
    assert [r.path for r in mocks.upstream.received if r.path != "/v1/messages/count_tokens"] == []
    assert mocks.google.calls == []


def test_count_tokens_passes_an_anthropic_refusal_and_its_errors_are_anthropic_shaped(mocks: Mocks,
                                                                                      gw: RunningGateway) -> None:
    serve_count_tokens(mocks.claude, CLAUDE, error_reply(400, "invalid_request_error", "messages: bad"))
    with pytest.raises(anthropic.BadRequestError) as bad:
        sdk(gw).messages.count_tokens(model="cl", messages=[USER])
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        sdk(gw).messages.count_tokens(model="nope", messages=[USER])
    r = httpx.post(gw.url + "/v1/messages/count_tokens", json={"model": "oa"}, headers={"x-api-key": GATEWAY_KEY})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "messages" in r.json()["error"]["message"]


def test_the_estimate_counts_every_part_of_a_request() -> None:
    base = {"model": "m", "messages": [USER]}
    small = estimate_tokens(base)
    for extra in ({"system": "x" * 400}, {"tools": [WEATHER]},
                  {"messages": [{"role": "user", "content": [{"type": "image", "source": {
                      "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]},
                  {"messages": [USER, {"role": "assistant", "content": [
                      {"type": "tool_use", "id": "t", "name": "f", "input": {"q": "y" * 400}}]}]}):
        assert estimate_tokens({**base, **extra}) > small + 50, extra


# ---------------------------------------------------------------------------
# Errors, fallback, broken streams
# ---------------------------------------------------------------------------

def _error_cases() -> list[Any]:
    return [
        pytest.param("oa", {"api_key": "wrong"}, anthropic.AuthenticationError, 401, "authentication_error", id="401"),
        pytest.param("nope", {}, anthropic.NotFoundError, 404, "not_found_error", id="404"),
        pytest.param("oa-bad", {}, anthropic.BadRequestError, 400, "invalid_request_error", id="upstream-400"),
        pytest.param("oa-limited", {}, anthropic.RateLimitError, 429, "rate_limit_error", id="429"),
        pytest.param("oa-then-cl-broken", {}, anthropic.InternalServerError, 502, "api_error", id="all-failed"),
        pytest.param("busy", {}, anthropic.OverloadedError, 529, "overloaded_error", id="all-overloaded"),
        pytest.param("busy-then-broken", {}, anthropic.InternalServerError, 502, "api_error", id="not-all-overloaded"),
    ]


def _error_replies(m: Mocks) -> None:
    m.upstream.replies["broken"] = Reply(status=500, body={"error": {"message": "boom sk-upstream-secret-1",
                                                                      "type": "server_error"}})
    m.upstream.replies["gpt-bad"] = Reply(status=400, body={"error": {
        "message": "bad request, key sk-upstream-secret-1", "type": "invalid_request_error", "code": None}})
    m.upstream.replies["gpt-limited"] = Reply(status=429, body={"error": {"message": "slow down",
                                                                           "type": "rate_limit_error"}})
    m.claude.on("claude-busy", lambda body: error_reply(529, "overloaded_error", "Overloaded"))
    m.claude.on("claude-unavailable", lambda body: error_reply(503, "api_error", "unavailable"))


@pytest.mark.parametrize("route, client_kw, exc_type, status, etype", _error_cases())
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_errors_are_the_sdks_exception_classes(mocks: Mocks, route: str, client_kw: dict[str, Any], exc_type: type,
                                               status: int, etype: str, stream: bool) -> None:
    _error_replies(mocks)
    routes = [*ROUTES, {"name": "oa-then-cl-broken", "steps": [{"provider": "up1", "model": "broken"},
                                                               {"provider": "up1", "model": "broken"}]}]
    cfg = config(mocks)
    cfg["routes"] = routes
    with run_gateway(cfg) as gw:
        client = anthropic.Anthropic(base_url=gw.url, max_retries=0, timeout=20,
                                     **{"api_key": GATEWAY_KEY, **client_kw})
        with pytest.raises(exc_type) as info:
            if stream:
                with client.messages.stream(model=route, max_tokens=10, messages=[USER]) as s:
                    s.get_final_message()
            else:
                client.messages.create(model=route, max_tokens=10, messages=[USER])
        err = info.value
        assert type(err) is exc_type and err.status_code == status
        assert err.body == {"type": "error", "error": {"type": etype, "message": err.body["error"]["message"]}}
        assert err.response.headers["x-request-id"]
        no_secrets(gw, err.response.text)


@pytest.mark.parametrize("body, where", [
    ({"model": "oa", "messages": [USER]}, "max_tokens"),
    ({"model": "oa", "max_tokens": "10", "messages": [USER]}, "max_tokens"),
    ({"model": "oa", "max_tokens": 10}, "messages"),
    ({"model": "oa", "max_tokens": 10, "messages": []}, "messages"),
    ({"model": "oa", "max_tokens": 10, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"model": "oa", "max_tokens": 10, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"model": "oa", "max_tokens": 10, "messages": [{"role": "user", "content": [{"text": "x"}]}]},
     "messages.0.content.0"),
    ({"model": "oa", "max_tokens": 10, "messages": [USER], "stream": "yes"}, "stream"),
    ({"model": "oa", "max_tokens": 10, "messages": [USER], "system": 5}, "system"),
    ({"max_tokens": 10, "messages": [USER]}, "model"),
    ({"model": "oa", "max_tokens": 0, "messages": [USER]}, "max_tokens"),
    ({"model": "oa", "max_tokens": -1, "messages": [USER]}, "max_tokens"),
    ({"model": "oa", "max_tokens": 10, "messages": [USER], "metadata": "u-1"}, "metadata"),
    ({"model": "oa", "max_tokens": 10, "messages": [USER], "thinking": "enabled"}, "thinking"),
    ({"model": "oa", "max_tokens": 10, "messages": [USER], "output_config": "high"}, "output_config"),
    ({"model": "oa", "max_tokens": 10, "messages": [USER], "output_config": {"effort": {}}}, "output_config.effort"),
    ({"model": "oa", "max_tokens": 10, "messages": [USER], "output_config": {"effort": []}}, "output_config.effort"),
    ({"model": "oa", "max_tokens": 10, "messages": [USER], "output_config": {"effort": 3}}, "output_config.effort"),
    ({"model": "oa", "max_tokens": 10, "messages": [USER], "stop_sequences": "END"}, "stop_sequences"),
    ({"model": "oa", "max_tokens": 10, "messages": [USER], "stop_sequences": ["END", 5]}, "stop_sequences.1"),
])
def test_what_the_messages_api_refuses_is_a_clear_400(mocks: Mocks, gw: RunningGateway, body: dict[str, Any],
                                                      where: str) -> None:
    r = httpx.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": GATEWAY_KEY}, timeout=20)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert err["error"]["message"].startswith(where), err
    assert mocks.upstream.received == []


@pytest.mark.parametrize("route", ["oa-then-cl", "cl-then-oa"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_failing_first_step_falls_through(mocks: Mocks, gw: RunningGateway, route: str, stream: bool) -> None:
    _error_replies(mocks)
    _setup_oa(mocks)
    _setup_cl(mocks)
    client = sdk(gw)
    if stream:
        with client.messages.stream(model=route, max_tokens=10, messages=[USER]) as s:
            assert "".join(s.text_stream) == "Hello!"
            headers = s.response.headers
    else:
        raw = client.messages.with_raw_response.create(model=route, max_tokens=10, messages=[USER])
        assert raw.parse().content[0].text == "Hello!"
        headers = raw.headers
    assert headers["x-gateway-attempts"] == "2"
    assert headers["x-gateway-provider"] == ("claude" if route == "oa-then-cl" else "up1")
    log = gw.request_logs()[-1]
    assert [a["status"] for a in log["failed_attempts"]] == [500 if route == "oa-then-cl" else 529]


@pytest.mark.parametrize("route", ["oa-cut", "cl-cut"], ids=["translated", "native"])
def test_a_stream_broken_after_its_first_event_ends_with_an_error_event(mocks: Mocks, gw: RunningGateway,
                                                                        route: str) -> None:
    mocks.upstream.replies["gpt-cut"] = Reply(sse=stream_of("one ", "two ", "three ", "four"), reset_after=3)
    mocks.claude.on("claude-cut", lambda body: stream_reply(stream_events(message(text("one two three four"))),
                                                            reset_after=5))
    events = raw_events(gw, {"model": route, "max_tokens": 10, "messages": [USER]})
    assert events[0][0] == "message_start" and "message_stop" not in names(events)
    assert any(n == "content_block_delta" for n, _ in events)
    last_name, last = events[-1]
    assert last_name == "error" and last["error"]["type"] == "api_error"
    assert set(last) == {"type", "error"} and set(last["error"]) == {"type", "message"}
    with pytest.raises(anthropic.APIStatusError) as info:
        with sdk(gw).messages.stream(model=route, max_tokens=10, messages=[USER]) as s:
            s.get_final_message()
    assert info.value.body["error"]["type"] == "api_error"
    log = gw.request_logs(2)[-1]
    assert log["status"] == 200 and log["outcome"] == 502
    no_secrets(gw, json.dumps(events))



def _openai_error_midway(code: str) -> Reply:
    return Reply(sse=[chunk("", role=True, model=GPT), chunk("Hel", model=GPT),
                      {"error": {"message": "Rate limit reached", "type": "requests", "code": code}}], done=False)


def _anthropic_error_midway(etype: str) -> Reply:
    head = frame(stream_events(message(text("Hello world"), model=CLAUDE)))[:5]  # into the text block
    return Reply(sse=[*head, anthropic_sse("error", {"type": "error", "error": {"type": etype, "message": "oops"}})],
                 done=False)


@pytest.mark.parametrize("route, reply, etype", [
    ("oa", _openai_error_midway("rate_limit_exceeded"), "rate_limit_error"),
    ("oa", _openai_error_midway("insufficient_quota"), "rate_limit_error"),
    ("oa", _openai_error_midway("server_error"), "api_error"),
    ("cl", _anthropic_error_midway("overloaded_error"), "overloaded_error"),
    ("cl", _anthropic_error_midway("rate_limit_error"), "rate_limit_error"),
    ("cl", _anthropic_error_midway("invalid_request_error"), "invalid_request_error"),
    ("cl", _anthropic_error_midway("api_error"), "api_error"),
], ids=["oa-rate-limit", "oa-quota", "oa-server", "cl-overloaded", "cl-rate-limit", "cl-invalid", "cl-api"])
def test_a_mid_stream_error_keeps_the_upstreams_error_type(mocks: Mocks, gw: RunningGateway, route: str,
                                                           reply: Reply, etype: str) -> None:
    """Claude Code waits and retries on overloaded_error and rate_limit_error: a stream that breaks with one
    must say which, not a generic api_error."""
    mocks.upstream.replies[GPT if route == "oa" else CLAUDE] = reply
    events = raw_events(gw, {"model": route, "max_tokens": 10, "messages": [USER]})
    assert any(n == "content_block_delta" for n, _ in events) and "message_stop" not in names(events)
    name, last = events[-1]
    assert name == "error" and last["error"]["type"] == etype, last
    assert set(last) == {"type", "error"} and set(last["error"]) == {"type", "message"}


@pytest.mark.parametrize("error, etype", [
    ({"status": 502, "upstream_code": "overloaded_error"}, "overloaded_error"),
    ({"status": 502, "upstream_code": "rate_limit_error"}, "rate_limit_error"),
    ({"status": 502, "upstream_code": "rate_limit_exceeded"}, "rate_limit_error"),
    ({"status": 502, "upstream_code": "insufficient_quota"}, "rate_limit_error"),
    ({"status": 502, "upstream_code": "invalid_request_error"}, "invalid_request_error"),
    ({"status": 502, "upstream_code": "authentication_error"}, "authentication_error"),
    ({"status": 502, "upstream_code": "permission_error"}, "permission_error"),
    ({"status": 502, "upstream_code": "not_found_error"}, "not_found_error"),
    ({"status": 502, "upstream_code": "server_error"}, "api_error"),  # not one of Anthropic's: by status
    ({"status": 504}, "api_error"),
    ({"status": 429}, "rate_limit_error"),
    # every step failed after keep-alives: the route's verdict, as the whole answer would give it
    ({"status": 502, "upstream_code": "rate_limit_exceeded", "attempts": [{"status": 500}, {"status": 429}]},
     "api_error"),
    ({"status": 502, "upstream_code": "api_error", "attempts": [{"status": 529}, {"status": 503}]},
     "overloaded_error"),
])
@pytest.mark.parametrize("native", [False, True], ids=["translated", "native"])
def test_the_stream_error_events_type(error: dict[str, Any], etype: str, native: bool) -> None:
    door = AnthropicDoor(None)
    renderer = door.renderer(Call(door, "r", {"messages": []}, stream=True), None, native=native)
    out = renderer.fail({"error": {"message": "what happened", "type": "upstream_error", "code": "stream_interrupted",
                                   **error}})
    assert out.startswith(b"event: error\ndata: ") and out.endswith(b"\n\n")
    assert json.loads(out.split(b"data: ", 1)[1]) == {"type": "error", "error": {"type": etype,
                                                                                 "message": "what happened"}}


def _data_only(events: list[tuple[str, dict[str, Any]]]) -> list[bytes]:
    """Anthropic's events without their ``event:`` lines (SSE allows it; some proxies and clones send this)."""
    return [b"data: " + json.dumps(d).encode() + b"\n\n" for _, d in events]


def test_a_native_stream_of_data_only_events_ends_cleanly(mocks: Mocks, gw: RunningGateway) -> None:
    mocks.claude.on(CLAUDE, lambda body: Reply(sse=_data_only(stream_events(message(text("Hello"), model=CLAUDE))),
                                               done=False))
    r = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": GATEWAY_KEY}, timeout=20,
                   json={"model": "cl", "max_tokens": 10, "stream": True, "messages": [USER]})
    assert r.status_code == 200
    assert "event: error" not in r.text
    types = [json.loads(b[6:])["type"] for b in r.text.split("\n\n") if b.startswith("data: ")]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    log = gw.request_logs()[-1]
    assert log.get("error") is None and log["tokens"]["completion_tokens"] == 6


def test_a_data_only_stream_failing_before_its_first_block_falls_through(mocks: Mocks, gw: RunningGateway) -> None:
    """message_start and ping are held by their data's type too: an error before the first block is still a
    failed step, and the route goes on."""
    head = stream_events(message(text("Hello"), model="claude-busy"))[:2]
    error = ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    mocks.claude.on("claude-busy", lambda body: Reply(sse=_data_only([*head, error]), done=False))
    _setup_oa(mocks)
    ask: dict[str, Any] = {"model": "cl-then-oa", "max_tokens": 10, "messages": [USER]}
    with sdk(gw).messages.stream(**ask) as s:
        assert "".join(s.text_stream) == "Hello!"
        headers = s.response.headers
    assert headers["x-gateway-attempts"] == "2" and headers["x-gateway-provider"] == "up1"


def test_a_stream_without_content_still_opens_and_ends(mocks: Mocks, gw: RunningGateway) -> None:
    mocks.upstream.replies[GPT] = Reply(sse=[chunk("", role=True), chunk(finish="length")])
    events = raw_events(gw, {"model": "oa", "max_tokens": 1, "messages": [USER]})
    assert names(events) == ["message_start", "ping", "message_delta", "message_stop"]
    assert events[2][1]["delta"]["stop_reason"] == "max_tokens"



@pytest.mark.parametrize("content", ["", None])
def test_an_empty_translated_answer_has_no_content_blocks(mocks: Mocks, gw: RunningGateway,
                                                          content: str | None) -> None:
    """As Anthropic answers it: an empty text block would be refused when the client sends the turn back."""
    mocks.upstream.replies[GPT] = Reply(body=chat_completion(content, model=GPT))  # type: ignore[arg-type]
    ask: dict[str, Any] = {"model": "oa", "max_tokens": 10, "messages": [USER]}
    raw = sdk(gw).messages.with_raw_response.create(**ask)
    assert json.loads(raw.http_response.text)["content"] == []
    assert raw.parse().content == []


LONE = "x\ud800y"  # a lone surrogate, as an upstream's JSON escape can carry it


def test_dumps_escapes_what_utf_8_cannot_carry() -> None:
    assert dumps({"t": "é😀"}) == '{"t":"é😀"}'.encode()  # UTF-8 as it is, normally
    assert dumps({"t": LONE, "u": "é"}) == b'{"t":"x\\ud800y","u":"\\u00e9"}'
    assert json.loads(dumps({"t": LONE})) == {"t": LONE}


def test_a_lone_surrogate_from_upstream_reaches_the_client_escaped(mocks: Mocks, gw: RunningGateway) -> None:
    """The fast path passes the upstream's escape on as it is; the decoded path (the first chunk, a whole answer)
    must not fail the step over it."""
    head = '{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
    first = head + '"delta":{"content":"x\\ud800y"},"finish_reason":null}]}'
    mocks.upstream.replies[GPT] = lambda rec: Reply(sse=[first, first, chunk(finish="stop")]) \
        if rec.json.get("stream") else Reply(body=json.dumps(chat_completion(LONE, model=GPT)).encode(),
                                             headers={"content-type": "application/json"})
    events = raw_events(gw, {"model": "oa", "max_tokens": 10, "messages": [USER]})
    assert [d["delta"]["text"] for n, d in events if n == "content_block_delta"] == [LONE, LONE]
    assert names(events)[-1] == "message_stop"
    r = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": GATEWAY_KEY}, timeout=20,
                   json={"model": "oa", "max_tokens": 10, "messages": [USER]})
    assert r.status_code == 200 and r.json()["content"] == [{"type": "text", "text": LONE}]


def test_every_step_failing_after_keep_alives_ends_with_the_error_event(mocks: Mocks) -> None:
    release = threading.Event()

    def overloaded(body: dict[str, Any]) -> Reply:
        release.wait(10)  # until the client has read a keep-alive (the head is out)
        return error_reply(529, "overloaded_error", "Overloaded")

    mocks.claude.on("claude-busy", overloaded)
    mocks.claude.on("claude-unavailable", lambda body: error_reply(503, "api_error", "unavailable"))
    with run_gateway(config(mocks, stream_keepalive_interval="20ms")) as gw:
        with httpx.stream("POST", gw.url + "/v1/messages", headers={"x-api-key": GATEWAY_KEY}, timeout=20,
                          json={"model": "busy", "max_tokens": 10, "stream": True, "messages": [USER]}) as r:
            chunks = r.iter_bytes()
            head = next(chunks)
            release.set()
            rest = b"".join(chunks)
    assert r.status_code == 200 and head.startswith(b": keep-alive")
    events = [e for e in rest.split(b"\n\n") if e and not e.startswith(b":")]
    assert len(events) == 1 and events[0].startswith(b"event: error\ndata: ")
    assert json.loads(events[0].split(b"data: ", 1)[1])["error"]["type"] == "overloaded_error"


@pytest.mark.parametrize("status, attempts, expected", [
    (400, None, (400, "invalid_request_error")),
    (401, None, (401, "authentication_error")),
    (403, None, (403, "permission_error")),
    (404, None, (404, "not_found_error")),
    (405, None, (405, "invalid_request_error")),
    (413, None, (413, "request_too_large")),
    (429, None, (429, "rate_limit_error")),
    (500, None, (500, "api_error")),
    (502, [{"status": 529}, {"status": 503}], (529, "overloaded_error")),
    (502, [{"status": 529}, {"status": None}], (502, "api_error")),  # a step that did not answer is no overload
    (504, None, (504, "api_error")),
])
def test_anthropics_error_type_per_status(status: int, attempts: Any, expected: tuple[int, str]) -> None:
    from at_gateway.errors import GatewayError

    exc = GatewayError("what happened", status=status, extra={"attempts": attempts} if attempts else None)
    got_status, body = AnthropicDoor(None).error_body(exc)
    assert (got_status, json.loads(body)) == (expected[0], {"type": "error", "error": {
        "type": expected[1], "message": "what happened"}})


# ---------------------------------------------------------------------------
# A client key's rules on a native route; headers that only anthropic steps get
# ---------------------------------------------------------------------------

def test_a_client_keys_system_prompt_and_cap_hold_on_a_native_route(mocks: Mocks, tmp_path: Path) -> None:
    from at_gateway.store import db
    from at_gateway.store.keys import KeyStore
    from tests.test_keys import keyed_gateway

    conn = db.connect(str(tmp_path / "gw.db"))
    try:
        key = KeyStore(conn).create("door-key", system_prompt="Be brief.", max_tokens=8)[1]
    finally:
        conn.close()
    _setup_cl(mocks)
    with keyed_gateway(config(mocks, store={"path": str(tmp_path / "gw.db")})) as gw:
        client = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=20)
        client.messages.create(model="cl", max_tokens=500, system="Mine.", messages=[USER])
        client.messages.create(model="cl", max_tokens=5, messages=[USER],
                               system=[{"type": "text", "text": "Mine.", "cache_control": {"type": "ephemeral"}}])
    first, second = mocks.claude.requests
    assert first["system"] == [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Mine."}]
    assert first["max_tokens"] == 8
    assert second["system"] == [{"type": "text", "text": "Be brief."},
                                {"type": "text", "text": "Mine.", "cache_control": {"type": "ephemeral"}}]
    assert second["max_tokens"] == 5


def test_anthropic_headers_reach_only_anthropic_steps(mocks: Mocks, gw: RunningGateway) -> None:
    _setup_oa(mocks)
    sdk(gw, default_headers={"anthropic-beta": "prompt-caching-2024-07-31"}).messages.create(
        model="oa", max_tokens=10, messages=[USER])
    rec = mocks.upstream.received[-1]
    assert "anthropic-beta" not in rec.headers and "anthropic-version" not in rec.headers
    assert "x-api-key" not in rec.headers and rec.headers["authorization"] == "Bearer sk-upstream-secret-1"


# ---------------------------------------------------------------------------
# The translated stream's fast path: the same bytes as decoding and encoding
# ---------------------------------------------------------------------------

def _chunk_bytes(delta: dict[str, Any], *, compact: bool = True, finish: Any = None, **extra: Any) -> bytes:
    obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    text_ = json.dumps(obj, separators=(",", ":") if compact else None, ensure_ascii=compact)
    return b"data: " + text_.encode() + b"\n\n"


FAST_CASES = [
    _chunk_bytes({"content": "tok1 "}),
    _chunk_bytes({"content": "tok1 "}, compact=False),
    _chunk_bytes({"content": 'quote " backslash \\ newline \n tab \t é 😀'}),
    _chunk_bytes({"content": 'quote " é 😀 \u2028'}, compact=False),
    _chunk_bytes({"role": "assistant", "content": "again"}),
    _chunk_bytes({"content": "x"}, usage=None, obfuscation="abc"),
    _chunk_bytes({"content": ""}),
    _chunk_bytes({"content": "done"}, finish="stop"),
    _chunk_bytes({"content": None}),
    _chunk_bytes({"content": "x", "reasoning_content": None}),
    _chunk_bytes({"content": "x"}, usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}),
    _chunk_bytes({"content": "a"}) + _chunk_bytes({"content": "b"}),
    b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
    b'"delta":{"content":"x"},"logprobs":null,"finish_reason":null}]}\n\n',
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null},'
    b'{"index":1,"delta":{"content":"y"},"finish_reason":null}]}\n\n',
]


def _decoded(out: bytes) -> list[tuple[bytes, Any]]:
    """Each event's name line and decoded data (the fast path keeps the upstream's escapes, decoding does not)."""
    events = []
    for event in out.split(b"\n\n")[:-1]:
        head, data = event.split(b"\ndata: ")
        obj = json.loads(data)
        if obj["type"] == "message_start":
            assert obj["message"]["id"].startswith("msg_")
            obj["message"]["id"] = "msg_*"  # random per message
        events.append((head, obj))
    assert out.endswith(b"\n\n") or out == b""
    return events


@pytest.mark.parametrize("raw", FAST_CASES)
def test_the_fast_path_renders_what_decoding_renders(raw: bytes) -> None:
    door = AnthropicDoor(None)
    call = Call(door, "r", {"messages": []}, stream=True)
    fast, slow = door.renderer(call, None, native=False), door.renderer(call, None, native=False)
    slow.fast = None  # decode every chunk
    opening = _chunk_bytes({"role": "assistant", "content": "Hi"})
    assert len(_decoded(fast.feed(opening))) == len(_decoded(slow.feed(opening))) == 4  # start, ping, block, delta
    assert _decoded(fast.feed(raw)) == _decoded(slow.feed(raw))
    assert _decoded(fast.close()) == _decoded(slow.close())


def test_a_whole_stream_in_one_read_renders_as_decoding_does() -> None:
    """The bench's shape: the role chunk, the text chunks and the end arrive joined in one read."""
    door = AnthropicDoor(None)
    call = Call(door, "r", {"messages": []}, stream=True)
    fast, slow = door.renderer(call, None, native=False), door.renderer(call, None, native=False)
    slow.fast = None
    joined = b"".join([_chunk_bytes({"role": "assistant", "content": ""}),
                       *(_chunk_bytes({"content": f"tok{i} "}) for i in range(5)),
                       _chunk_bytes({}, finish="length"),
                       b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
                       b'"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}\n\n'])
    out = fast.feed(joined) + fast.close()
    assert _decoded(out) == _decoded(slow.feed(joined) + slow.close())
    kinds = [head.split(b"event: ")[1] for head, _ in _decoded(out)]
    assert kinds == [b"message_start", b"content_block_start", b"ping", *[b"content_block_delta"] * 5,
                     b"content_block_stop", b"message_delta", b"message_stop"]
    delta = _decoded(out)[-2][1]
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 5


@pytest.mark.parametrize("user_id", ["u-1", "x" * 64, "user_" + "a1b2" * 30 + "_account__session_" + "f" * 36])
def test_metadata_user_id_reaches_chat_within_its_length_cap(mocks: Mocks, gw: RunningGateway, user_id: str) -> None:
    # Claude Code's ids run to ~150 characters; OpenAI caps `user` at 64: longer ones go as a stable digest.
    mocks.upstream.replies[GPT] = Reply(body=chat_completion("ok", model=GPT))
    body = {"model": "oa", "max_tokens": 10, "metadata": {"user_id": user_id}, "messages": [USER]}
    sent = []
    for _ in range(2):
        r = httpx.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": GATEWAY_KEY}, timeout=20)
        assert r.status_code == 200, r.text
        sent.append(mocks.upstream.received[-1].json["user"])
    assert sent[0] == sent[1] and len(sent[0]) <= 64  # the same user: the same value every time
    assert (sent[0] == user_id) is (len(user_id) <= 64)
