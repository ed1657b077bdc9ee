"""The Gemini door (``/v1beta/models/{route}:generateContent``, ``:streamGenerateContent``, ``:countTokens``, also
under ``/v1/models/``): the official ``google-genai`` SDK as the client, through the gateway to the wire-checking
mocks: Gemini and Vertex express (native: the body as sent), OpenAI and Anthropic (translated).

The mocks refuse what the real APIs refuse (``GeminiMock.problems``, ``AnthropicMock.problems`` stay empty), and
every test asserts what the upstream received, what the client got and what the request log says.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google import genai
from google.genai import errors, types

from at_gateway.config import Step
from at_gateway.doors.gemini import GeminiDoor
from at_gateway.providers.base import Completion
from tests.conftest import GATEWAY_KEY, RunningGateway, base_config, run_gateway
from tests.mock_anthropic import API_KEY as ANTHROPIC_KEY
from tests.mock_anthropic import AnthropicMock, message
from tests.mock_anthropic import text as a_text
from tests.mock_google import API_KEY as GEMINI_KEY
from tests.mock_google import GeminiMock, call, error_reply, response, sse, text, usage
from tests.mock_upstream import MockUpstream, Reply, chunk
from tests.test_doors import _key
from tests.test_keys import keyed_gateway

MODEL = "gemini-2.5-flash"
G3 = "gemini-3-flash-preview"
GPT = "gpt-4o-mini"
CLAUDE = "claude-sonnet-4-5"
VERTEX_KEY = "vertex-express-key-123"
SECRETS = ("sk-upstream-secret-1", "sk-upstream-secret-2", GEMINI_KEY, ANTHROPIC_KEY, VERTEX_KEY)
SIG = "c2lnbmF0dXJlLW9mLXRoZS10aG91Z2h0"  # a thought signature (base64)
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
HI = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
OPENAI_USAGE = {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}
SAFETY = [{"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"}]
WEATHER = types.Tool(function_declarations=[types.FunctionDeclaration(
    name="get_weather", description="Current weather in a city.",
    parameters=types.Schema(type=types.Type.OBJECT, properties={
        "city": types.Schema(type=types.Type.STRING, description="City name"),
        "unit": types.Schema(type=types.Type.STRING, enum=["c", "f"], nullable=True)}, required=["city"]))])
WEATHER_CHAT = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": ["string", "null"], "enum": ["c", "f", None]}}, "required": ["city"]}}}


@pytest.fixture(autouse=True)
def no_google_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK reads these; none on this machine may change what a test sends."""
    for var in ("GOOGLE_API_KEY", "GEMINI_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_CLOUD_PROJECT",
                "GOOGLE_CLOUD_LOCATION", "GOOGLE_GENAI_API_VERSION", "GOOGLE_GEMINI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def gem(upstream: MockUpstream) -> Iterator[GeminiMock]:
    mock = GeminiMock(upstream)
    yield mock
    assert mock.problems == [], "the gateway sent requests the Gemini API would refuse"


@pytest.fixture
def claude(upstream: MockUpstream) -> Iterator[AnthropicMock]:
    mock = AnthropicMock(upstream)
    yield mock
    assert mock.problems == [], "the gateway sent requests the Messages API would refuse"


@pytest.fixture
def vx(other: MockUpstream) -> Iterator[GeminiMock]:
    mock = GeminiMock(other, vertex=True, api_key=VERTEX_KEY)
    yield mock
    assert mock.problems == [], "the gateway sent requests Vertex AI would refuse"


ROUTES = [
    {"name": "g", "steps": [{"provider": "gem", "model": MODEL}]},
    {"name": "g3", "steps": [{"provider": "gem", "model": G3}]},
    {"name": "v", "steps": [{"provider": "vx", "model": MODEL}]},
    {"name": "o", "steps": [{"provider": "up1", "model": GPT}]},
    {"name": "c", "steps": [{"provider": "claude", "model": CLAUDE}]},
    {"name": "fb", "steps": [{"provider": "up1", "model": "gpt-broken"}, {"provider": "gem", "model": MODEL}]},
]


def config(upstream: MockUpstream, vertex_url: str, **top: Any) -> dict[str, Any]:
    cfg = base_config(upstream.url, ROUTES, **top)
    cfg["providers"] += [
        {"name": "gem", "type": "gemini", "base_url": upstream.url, "api_key": GEMINI_KEY},
        {"name": "claude", "type": "anthropic", "base_url": upstream.url, "api_key": ANTHROPIC_KEY},
        {"name": "vx", "type": "vertex", "base_url": vertex_url, "api_key": VERTEX_KEY},
    ]
    return cfg


@pytest.fixture
def gw(upstream: MockUpstream, other: MockUpstream, gem: GeminiMock, vx: GeminiMock,
       claude: AnthropicMock) -> Iterator[RunningGateway]:
    with run_gateway(config(upstream, other.url)) as running:
        yield running
        for secret in SECRETS:
            assert secret not in running.logs.getvalue()


_CLIENTS: list[genai.Client] = []  # a Client closes its connections when collected: kept until the test ends


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def client(gw: RunningGateway, version: str | None = "v1beta", key: str = GATEWAY_KEY) -> genai.Client:
    """The SDK pointed at the gateway; ``version=None``: the SDK's own default path (``/v1/models/...``)."""
    opts = types.HttpOptions(base_url=gw.url, api_version=version) if version else types.HttpOptions(base_url=gw.url)
    c = genai.Client(api_key=key, http_options=opts)
    _CLIENTS.append(c)
    return c


def post(gw: RunningGateway, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(gw.url + path, json=body, headers=headers or {"x-goog-api-key": GATEWAY_KEY}, timeout=10)


def data_events(raw: bytes) -> list[dict[str, Any]]:
    """Every event of an SSE body, asserting each is one ``data:`` line (Google's SDKs read nothing else)."""
    out = []
    for ev in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not ev.strip():
            continue
        assert ev.startswith(b"data: ") and ev.count(b"\n") == 0, ev
        out.append(json.loads(ev[6:]))
    return out


def completion(msg: dict[str, Any], finish: str = "stop", usage_: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-abc", "object": "chat.completion", "created": 1, "model": GPT,
            "choices": [{"index": 0, "message": {"role": "assistant", **msg}, "finish_reason": finish}],
            "usage": usage_ or OPENAI_USAGE}


def openai_answers(upstream: MockUpstream, *replies: Reply, model: str = GPT) -> None:
    """Answer ``model``'s next requests with these in turn (the last repeats)."""
    queue = list(replies)

    def answer(rec: Any) -> Reply:
        return queue.pop(0) if len(queue) > 1 else queue[0]
    upstream.replies[model] = answer


def openai_stream(*words: str, reset_after: int | None = None) -> Reply:
    events: list[Any] = [chunk("", role=True, model=GPT), *[chunk(w, model=GPT) for w in words]]
    events += [chunk(finish="stop", model=GPT), chunk(choices=False, usage=OPENAI_USAGE, model=GPT)]
    return Reply(sse=events, reset_after=reset_after)


def answer_hello(upstream: MockUpstream, gem: GeminiMock, vx: GeminiMock, claude: AnthropicMock) -> None:
    """Every upstream answers "Hello there" with 12 prompt and 4 output tokens, whole or streamed."""
    whole = response(text("Hello there"), meta=usage(12, 4), model=MODEL, candidates=[
        {"index": 0, "content": {"role": "model", "parts": [text("Hello there")]}, "finishReason": "STOP",
         "safetyRatings": SAFETY}])
    streamed = sse(response(text("Hel"), finish=None, meta=usage(12, 1)),
                   response(model=MODEL, meta=usage(12, 4), candidates=[
                       {"index": 0, "content": {"role": "model", "parts": [text("lo there")]},
                        "finishReason": "STOP", "safetyRatings": SAFETY}]))
    for mock in (gem, vx):
        mock.on(MODEL, lambda c: streamed if c.stream else Reply(body=whole))
    upstream.replies[GPT] = lambda rec: (openai_stream("Hel", "lo there") if rec.json.get("stream")
                                         else Reply(body=completion({"content": "Hello there"})))
    claude.on(CLAUDE, lambda body: message(a_text("Hello there"), model=CLAUDE, usage={
        "input_tokens": 12, "output_tokens": 4, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}))


def sent_to(route: str, upstream: MockUpstream, gem: GeminiMock, vx: GeminiMock,
            claude: AnthropicMock) -> tuple[str, dict[str, Any]]:
    """The path and body the route's upstream received last."""
    if route in ("g", "g3"):
        return gem.calls[-1].received.path, gem.calls[-1].body
    if route == "v":
        return vx.calls[-1].received.path, vx.calls[-1].body
    if route == "c":
        return "/v1/messages", claude.requests[-1]
    rec = [r for r in upstream.received if r.path == "/chat/completions"][-1]
    return rec.path, rec.json


GEN_CONFIG = types.GenerateContentConfig(system_instruction="Be brief.", temperature=0.5, max_output_tokens=64)
NATIVE_BODY = {"contents": [{"role": "user", "parts": [{"text": "Hi there"}]}],
               "systemInstruction": {"role": "user", "parts": [{"text": "Be brief."}]},
               "generationConfig": {"temperature": 0.5, "maxOutputTokens": 64}}
CHAT_MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]

# route -> (the upstream path, a check of the body it received)
EXPECTED: dict[str, tuple[str, Callable[[dict[str, Any]], bool]]] = {
    "g": (f"/v1beta/models/{MODEL}:generateContent", lambda b: b == NATIVE_BODY),
    "v": (f"/v1/publishers/google/models/{MODEL}:generateContent", lambda b: b == NATIVE_BODY),
    "o": ("/chat/completions", lambda b: b == {"model": GPT, "messages": CHAT_MESSAGES, "temperature": 0.5,
                                               "max_tokens": 64}),
    "c": ("/v1/messages", lambda b: b["system"] == "Be brief." and b["max_tokens"] == 64
          and b["messages"] == [{"role": "user", "content": "Hi there"}] and b["temperature"] == 0.5),
}


# ---------------------------------------------------------------------------
# generateContent and streamGenerateContent on every step type
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["v1beta", None], ids=["v1beta", "sdk-default-path"])
@pytest.mark.parametrize("route", ["g", "v", "o", "c"])
def test_generate_content_on_every_step_type(gw: RunningGateway, upstream: MockUpstream, gem: GeminiMock,
                                             vx: GeminiMock, claude: AnthropicMock, route: str,
                                             version: str | None) -> None:
    answer_hello(upstream, gem, vx, claude)
    got = client(gw, version).models.generate_content(model=route, contents="Hi there", config=GEN_CONFIG)
    assert got.text == "Hello there"
    assert got.candidates and got.candidates[0].finish_reason == types.FinishReason.STOP
    meta = got.usage_metadata
    assert meta and (meta.prompt_token_count, meta.candidates_token_count, meta.total_token_count) == (12, 4, 16)
    path, body = sent_to(route, upstream, gem, vx, claude)
    want_path, check = EXPECTED[route]
    assert path == want_path and check(body), body
    # Gemini's safety ratings come back when the step is Gemini (native): the answer is Gemini's own
    assert bool(got.candidates[0].safety_ratings) == (route in ("g", "v"))
    line = gw.request_logs()[-1]
    assert line["door"] == "gemini" and line["route"] == route and line["status"] == 200
    assert line["tokens"] == OPENAI_USAGE


@pytest.mark.parametrize("route", ["g", "v", "o", "c"])
def test_generate_content_stream_on_every_step_type(gw: RunningGateway, upstream: MockUpstream, gem: GeminiMock,
                                                    vx: GeminiMock, claude: AnthropicMock, route: str) -> None:
    answer_hello(upstream, gem, vx, claude)
    chunks = list(client(gw).models.generate_content_stream(model=route, contents="Hi there", config=GEN_CONFIG))
    assert "".join(c.text or "" for c in chunks) == "Hello there"
    last = chunks[-1]
    assert last.candidates and last.candidates[0].finish_reason == types.FinishReason.STOP
    assert [c for c in chunks if c.candidates and c.candidates[0].finish_reason] == [last]  # one end, the last
    assert last.usage_metadata and last.usage_metadata.total_token_count == 16
    path, body = sent_to(route, upstream, gem, vx, claude)
    if route in ("g", "v"):
        assert path == EXPECTED[route][0].replace(":generateContent", ":streamGenerateContent?alt=sse")
        assert body == NATIVE_BODY
        assert last.candidates[0].safety_ratings  # passed through as Gemini sent them
    elif route == "o":
        assert body == {"model": GPT, "messages": CHAT_MESSAGES, "temperature": 0.5, "max_tokens": 64,
                        "stream": True, "stream_options": {"include_usage": True}}
    else:
        assert body["stream"] is True and body["system"] == "Be brief."
    line = gw.request_logs()[-1]
    assert line["door"] == "gemini" and line["stream"] is True and line["tokens"] == OPENAI_USAGE


def test_a_translated_stream_reads_as_gemini_frames_it(gw: RunningGateway, upstream: MockUpstream) -> None:
    upstream.replies[GPT] = openai_stream("Hel", "lo")
    r = post(gw, "/v1beta/models/o:streamGenerateContent?alt=sse",
             HI)
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    events = data_events(r.content)
    for ev in events:
        types.GenerateContentResponse.model_validate(ev)
    assert [p["text"] for ev in events[:-1] for p in ev["candidates"][0]["content"]["parts"]] == ["Hel", "lo"]
    assert events[-1]["candidates"][0]["finishReason"] == "STOP"
    assert events[-1]["usageMetadata"] == {"promptTokenCount": 12, "candidatesTokenCount": 4, "totalTokenCount": 16}
    assert {ev["modelVersion"] for ev in events} == {GPT} and len({ev["responseId"] for ev in events}) == 1


# ---------------------------------------------------------------------------
# Function calling over two turns
# ---------------------------------------------------------------------------

def test_function_calling_over_two_turns_translated(gw: RunningGateway, upstream: MockUpstream) -> None:
    openai_answers(upstream, Reply(body=completion({"content": None, "tool_calls": [
        {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        finish="tool_calls")), Reply(body=completion({"content": "21 degrees in Paris."})))
    cfg = types.GenerateContentConfig(tools=[WEATHER], tool_config=types.ToolConfig(
        function_calling_config=types.FunctionCallingConfig(mode=types.FunctionCallingConfigMode.AUTO)))
    c = client(gw)
    user = types.Content(role="user", parts=[types.Part(text="Weather in Paris?")])
    first = c.models.generate_content(model="o", contents=[user], config=cfg)
    assert first.function_calls and first.function_calls[0].name == "get_weather"
    assert first.function_calls[0].args == {"city": "Paris"}
    assert first.candidates and first.candidates[0].finish_reason == types.FinishReason.STOP
    sent = upstream.received[-1].json
    assert sent["tools"] == [WEATHER_CHAT] and sent["tool_choice"] == "auto"

    assert first.candidates[0].content
    history = [user, first.candidates[0].content, types.Content(role="user", parts=[
        types.Part.from_function_response(name="get_weather", response={"temp_c": 21})])]
    second = c.models.generate_content(model="o", contents=history, config=cfg)
    assert second.text == "21 degrees in Paris."
    assert upstream.received[-1].json["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"temp_c":21}'}]


def test_function_calling_over_two_turns_native_keeps_the_thought_signature(gw: RunningGateway,
                                                                            gem: GeminiMock) -> None:
    # Gemini 3 refuses a function-call turn without its signature (the mock too): only a native route keeps it.
    gem.on(G3, Reply(body=response(call("get_weather", {"city": "Paris"}, sig=SIG), model=G3)),
           Reply(body=response(text("21 degrees in Paris."), model=G3)))
    c = client(gw)
    cfg = types.GenerateContentConfig(tools=[WEATHER])
    user = types.Content(role="user", parts=[types.Part(text="Weather in Paris?")])
    first = c.models.generate_content(model="g3", contents=[user], config=cfg)
    assert first.function_calls and first.function_calls[0].args == {"city": "Paris"}
    assert first.candidates and first.candidates[0].content
    history = [user, first.candidates[0].content, types.Content(role="user", parts=[
        types.Part.from_function_response(name="get_weather", response={"temp_c": 21})])]
    second = c.models.generate_content(model="g3", contents=history, config=cfg)
    assert second.text == "21 degrees in Paris."
    sent = gem.calls[-1].body
    assert sent["contents"][1]["parts"][0]["thoughtSignature"] == SIG
    assert sent["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"
    assert gem.calls[-1].received.path == f"/v1beta/models/{G3}:generateContent"


def test_function_calls_stream_whole_on_a_translated_route(gw: RunningGateway, upstream: MockUpstream) -> None:
    first: dict[str, Any] = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather"}}
    events: list[Any] = [chunk("", role=True, model=GPT)]
    for i, frag in enumerate(['{"ci', 'ty":"Pa', 'ris"}']):
        ev = chunk(model=GPT)
        tc = {**first, "function": {**first["function"], "arguments": frag}} if i == 0 else {
            "index": 0, "function": {"arguments": frag}}
        ev["choices"][0]["delta"] = {"tool_calls": [tc]}
        events.append(ev)
    events += [chunk(finish="tool_calls", model=GPT), chunk(choices=False, usage=OPENAI_USAGE, model=GPT)]
    upstream.replies[GPT] = Reply(sse=events)
    chunks = list(client(gw).models.generate_content_stream(model="o", contents="Weather in Paris?",
                                                            config=types.GenerateContentConfig(tools=[WEATHER])))
    calls = [fc for ch in chunks for fc in ch.function_calls or []]
    assert [(fc.id, fc.name, fc.args) for fc in calls] == [("call_1", "get_weather", {"city": "Paris"})]
    assert chunks[-1].candidates and chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP


# ---------------------------------------------------------------------------
# countTokens
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("route, forwarded_to", [
    ("g", f"/v1beta/models/{MODEL}:countTokens"),
    ("v", f"/v1/publishers/google/models/{MODEL}:countTokens"),
    ("fb", f"/v1beta/models/{MODEL}:countTokens"),  # the openai step cannot count: the gemini step does
    ("o", None),  # no gemini/vertex step: an estimate
    ("c", None),
])
def test_count_tokens_is_forwarded_to_a_gemini_step_else_estimated(gw: RunningGateway, upstream: MockUpstream,
                                                                   gem: GeminiMock, vx: GeminiMock, route: str,
                                                                   forwarded_to: str | None) -> None:
    got = client(gw).models.count_tokens(model=route, contents="one two three four")
    assert got.sdk_http_response and got.sdk_http_response.headers is not None
    estimated = got.sdk_http_response.headers.get("x-gateway-token-count")
    if forwarded_to is None:
        assert estimated == "estimated"
        assert got.total_tokens is not None and got.total_tokens >= 4  # conservative: never below the words
        assert gem.count_calls == [] and vx.count_calls == []
    else:
        assert estimated is None and got.total_tokens == 4  # the mock counts words
        mock = vx if route == "v" else gem
        assert mock.count_calls[-1].received.path == forwarded_to
        assert mock.count_calls[-1].body == {"contents": [{"role": "user", "parts": [{"text": "one two three four"}]}]}
    assert [r for r in upstream.received if r.path == "/chat/completions"] == []  # counting never generates
    line = gw.request_logs()[-1]
    assert line["door"] == "gemini" and line["status"] == 200 and "tokens" not in line


@pytest.mark.parametrize("route, body, mock_name, expect", [
    # The Gemini API counts a whole request only as generateContentRequest (with its model): wrapped for it
    ("g", {"contents": [{"role": "user", "parts": [{"text": "a b"}]}],
           "systemInstruction": {"parts": [{"text": "c d e"}]}}, "gem",
     {"generateContentRequest": {"model": f"models/{MODEL}", "contents": [{"role": "user", "parts": [{"text": "a b"}]}],
                                 "systemInstruction": {"parts": [{"text": "c d e"}]}}}),
    # Vertex takes the request's fields at the top level: unwrapped for it
    ("v", {"generateContentRequest": {"model": "models/anything", "contents": [
        {"role": "user", "parts": [{"text": "a b"}]}], "systemInstruction": {"parts": [{"text": "c d e"}]}}}, "vx",
     {"contents": [{"role": "user", "parts": [{"text": "a b"}]}], "systemInstruction": {"parts": [{"text": "c d e"}]}}),
])
def test_count_tokens_speaks_each_apis_request_form(gw: RunningGateway, gem: GeminiMock, vx: GeminiMock, route: str,
                                                    body: dict[str, Any], mock_name: str,
                                                    expect: dict[str, Any]) -> None:
    r = post(gw, f"/v1beta/models/{route}:countTokens", body)
    assert r.status_code == 200, r.text
    assert r.json()["totalTokens"] == 5
    mock = gem if mock_name == "gem" else vx
    assert mock.count_calls[-1].body == expect


def test_count_tokens_falls_back_to_an_estimate_when_the_step_fails(gw: RunningGateway, gem: GeminiMock) -> None:
    gem.on_count(MODEL, error_reply(503, "overloaded"))
    r = post(gw, "/v1beta/models/g:countTokens", {"contents": [{"role": "user", "parts": [{"text": "x " * 40}]}]})
    assert r.status_code == 200 and r.headers["x-gateway-token-count"] == "estimated"
    assert r.json()["totalTokens"] >= 40
    # a request the API refuses is the client's to fix: its error, not a guess
    gem.on_count(MODEL, error_reply(400, "contents is not valid"))
    r = post(gw, "/v1beta/models/g:countTokens", {"contents": [{"role": "user", "parts": [{"text": "x"}]}]})
    assert r.status_code == 400 and r.json()["error"]["status"] == "INVALID_ARGUMENT"


# ---------------------------------------------------------------------------
# Fallback and broken streams
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_first_step_falls_back_to_the_next(gw: RunningGateway, upstream: MockUpstream, gem: GeminiMock,
                                                     vx: GeminiMock, claude: AnthropicMock, stream: bool) -> None:
    answer_hello(upstream, gem, vx, claude)
    upstream.replies["gpt-broken"] = Reply(status=500, body={"error": {"message": "boom", "type": "server_error"}})
    c = client(gw)
    if stream:
        chunks = list(c.models.generate_content_stream(model="fb", contents="Hi there", config=GEN_CONFIG))
        assert "".join(ch.text or "" for ch in chunks) == "Hello there"
    else:
        assert c.models.generate_content(model="fb", contents="Hi there", config=GEN_CONFIG).text == "Hello there"
    assert gem.calls[-1].body == NATIVE_BODY
    line = gw.request_logs()[-1]
    assert line["attempts"] == 2 and line["provider"] == "gem" and line["status"] == 200
    assert line["failed_attempts"][0]["status"] == 500


@pytest.mark.parametrize("route", ["o", "g"])
def test_a_stream_broken_midway_ends_with_geminis_error_event(gw: RunningGateway, upstream: MockUpstream,
                                                              gem: GeminiMock, route: str) -> None:
    upstream.replies[GPT] = openai_stream("Hel", "lo", "there", reset_after=3)
    gem.on(MODEL, sse(response(text("Hel"), finish=None), response(text("lo"), finish=None), reset_after=2))
    seen: list[str] = []
    with pytest.raises(errors.ServerError) as caught:
        for ch in client(gw).models.generate_content_stream(model=route, contents="hi"):
            seen.append(ch.text or "")
    assert "".join(seen) == "Hello"  # what came before the break was delivered
    assert caught.value.code == 502 and caught.value.status == "UNAVAILABLE"

    r = post(gw, f"/v1beta/models/{route}:streamGenerateContent?alt=sse", HI)
    events = data_events(r.content)
    assert all("finishReason" not in str(ev) for ev in events)  # never looks finished
    err = events[-1]["error"]
    assert err["code"] == 502 and err["status"] == "UNAVAILABLE" and "interrupted" in err["message"]
    line = gw.request_logs(2)[-1]
    assert line["status"] == 200 and line["outcome"] == 502


# ---------------------------------------------------------------------------
# Errors in Gemini's shape
# ---------------------------------------------------------------------------

def gemini_error(r: httpx.Response, status: int, name: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["status"] == name and isinstance(err["message"], str), err
    for secret in SECRETS:
        assert secret not in r.text
    return err


@pytest.mark.parametrize("body, fragment", [
    ({}, "contents"),
    ({"contents": []}, "contents"),
    ({"contents": "hi"}, "contents"),
    ({"contents": [{"role": "user"}]}, "contents[0].parts"),
    ({"contents": [{"role": "user", "parts": [{}]}]}, "contents[0].parts[0]"),
    ({"contents": [{"role": "robot", "parts": [{"text": "hi"}]}]}, "contents[0].role"),
    ({"contents": [{"parts": [{"inlineData": {"mimeType": "image/png"}}]}]}, "inlineData.data"),
    ({"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"temperature": "hot"}}, "temperature"),
    ({"contents": [{"parts": [{"text": "hi"}]}], "tools": {"functionDeclarations": []}}, "tools"),
    ({"contents": [{"parts": [{"text": "hi"}]}], "toolConfig": {"functionCallingConfig": {"mode": "SOMETIMES"}}},
     "mode"),
])
def test_a_request_the_api_would_refuse_is_invalid_argument(gw: RunningGateway, upstream: MockUpstream,
                                                            body: dict[str, Any], fragment: str) -> None:
    err = gemini_error(post(gw, "/v1beta/models/o:generateContent", body), 400, "INVALID_ARGUMENT")
    assert fragment in err["message"]
    assert upstream.received == []


def test_errors_are_the_sdks_exceptions_with_geminis_codes(gw: RunningGateway, upstream: MockUpstream,
                                                           gem: GeminiMock) -> None:
    cases: list[tuple[Callable[[], Any], type[errors.APIError], int, str]] = [
        (lambda: client(gw).models.generate_content(model="nope", contents="hi"), errors.ClientError, 404,
         "NOT_FOUND"),
        (lambda: client(gw, key="wrong").models.generate_content(model="o", contents="hi"), errors.ClientError, 401,
         "UNAUTHENTICATED"),
        (lambda: client(gw).models.generate_content(model="o", contents="hi"), errors.ClientError, 429,
         "RESOURCE_EXHAUSTED"),
        (lambda: client(gw).models.generate_content(model="g", contents="hi"), errors.ClientError, 400,
         "INVALID_ARGUMENT"),
        (lambda: list(client(gw).models.generate_content_stream(model="g", contents="hi")), errors.ClientError, 400,
         "INVALID_ARGUMENT"),
    ]
    upstream.replies[GPT] = Reply(status=429, body={"error": {"message": "slow down", "type": "rate_limit_error"}},
                                  headers={"retry-after": "7"})
    gem.on(MODEL, error_reply(400, "Invalid value at 'contents[0]' (with " + GEMINI_KEY + ")"))
    for fn, cls, code, name in cases:
        with pytest.raises(cls) as caught:
            fn()
        assert caught.value.code == code and caught.value.status == name, caught.value
        for secret in SECRETS:
            assert secret not in str(caught.value.details)
    r = post(gw, "/v1beta/models/o:generateContent", {"contents": [{"parts": [{"text": "hi"}]}]})
    gemini_error(r, 429, "RESOURCE_EXHAUSTED")
    assert int(r.headers["retry-after"]) >= 1
    err = gemini_error(post(gw, "/v1beta/models/g:generateContent", HI),
                       400, "INVALID_ARGUMENT")
    assert "Invalid value at 'contents[0]'" in err["message"]  # the upstream's own words, its key redacted


def test_a_stream_whose_every_step_fails_is_an_error_answer_not_a_200_with_comments(
        upstream: MockUpstream, other: MockUpstream, gem: GeminiMock, vx: GeminiMock, claude: AnthropicMock) -> None:
    # Google's SDKs read nothing but data: lines, so this door sends no keep-alive comments: the head waits for
    # a step's first chunk, and when every step fails the client gets the error status itself.
    upstream.replies["gpt-broken"] = Reply(sse=[b'data: {"error": {"message": "boom", "code": 500}}\n\n'],
                                           done=False)
    gem.on(MODEL, error_reply(503, "The model is overloaded."))
    with run_gateway(config(upstream, other.url, stream_keepalive_interval=0.05)) as gw:
        r = httpx.post(gw.url + "/v1beta/models/fb:streamGenerateContent?alt=sse", json=HI,
                       headers={"x-goog-api-key": GATEWAY_KEY}, timeout=10)
    assert r.status_code >= 500 and r.json()["error"]["status"] in ("UNAVAILABLE", "INTERNAL"), r.text
    assert b":" not in r.content[:1]


# ---------------------------------------------------------------------------
# The request forms the SDKs and REST clients send
# ---------------------------------------------------------------------------

def test_snake_case_spellings_translate_like_camel_case(gw: RunningGateway, upstream: MockUpstream) -> None:
    upstream.replies[GPT] = Reply(body=completion({"content": '{"q":"cats"}'}))
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    body = {
        "system_instruction": {"parts": [{"text": "Be brief."}, {"text": "No emoji."}]},
        "contents": [{"role": "user", "parts": [
            {"text": "Describe these"},
            {"inline_data": {"mime_type": "image/png", "data": PNG}},
            {"file_data": {"mime_type": "image/jpeg", "file_uri": "https://example.com/cat.jpg"}},
            {"inline_data": {"mime_type": "application/pdf", "data": PNG}},
            {"inline_data": {"mime_type": "audio/wav", "data": PNG}}]}],
        "tools": [{"function_declarations": [{"name": "lookup", "description": "Look it up",
                                              "parameters_json_schema": schema}]}],
        "tool_config": {"function_calling_config": {"mode": "ANY", "allowed_function_names": ["lookup"]}},
        "generation_config": {"temperature": 0.1, "top_p": 0.5, "max_output_tokens": 99, "stop_sequences": ["END"],
                              "candidate_count": 2, "seed": 3, "presence_penalty": 0.2, "frequency_penalty": 0.3,
                              "response_mime_type": "application/json", "response_json_schema": schema,
                              "thinking_config": {"thinking_budget": 1024, "include_thoughts": True}},
        "safety_settings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
    }
    r = post(gw, "/v1beta/models/o:generateContent?key=" + GATEWAY_KEY, body, headers={})
    assert r.status_code == 200, r.text
    types.GenerateContentResponse.model_validate(r.json())
    assert upstream.received[-1].json == {
        "model": GPT,
        "messages": [
            {"role": "system", "content": "Be brief."}, {"role": "system", "content": "No emoji."},
            {"role": "user", "content": [
                {"type": "text", "text": "Describe these"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                {"type": "file", "file": {"filename": "file.pdf", "file_data": "data:application/pdf;base64," + PNG}},
                {"type": "input_audio", "input_audio": {"data": PNG, "format": "wav"}}]}],
        "tools": [{"type": "function", "function": {"name": "lookup", "description": "Look it up",
                                                    "parameters": schema}}],
        "tool_choice": {"type": "function", "function": {"name": "lookup"}},
        "temperature": 0.1, "top_p": 0.5, "max_tokens": 99, "stop": ["END"], "n": 2, "seed": 3,
        "presence_penalty": 0.2, "frequency_penalty": 0.3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}},
        "reasoning_effort": "low",
    }
    assert "safetySettings" in r.headers["x-gateway-warning"]  # dropped on a translated step, and said so


def test_gemini_schemas_become_json_schema(gw: RunningGateway, upstream: MockUpstream) -> None:
    upstream.replies[GPT] = Reply(body=completion({"content": "{}"}))
    schema = {"type": "OBJECT", "propertyOrdering": ["a", "b"], "properties": {
        "a": {"type": "ARRAY", "items": {"type": "INTEGER", "format": "int32"}, "minItems": 1},
        "b": {"anyOf": [{"type": "STRING"}, {"type": "NUMBER"}], "nullable": True, "description": "either"}},
        "required": ["a"]}
    r = post(gw, "/v1beta/models/o:generateContent", {
        "contents": [{"parts": [{"text": "hi"}]}],
        "generationConfig": {"responseMimeType": "application/json", "responseSchema": schema}})
    assert r.status_code == 200, r.text
    assert upstream.received[-1].json["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "response", "schema": {"type": "object", "properties": {
            "a": {"type": "array", "items": {"type": "integer", "format": "int32"}, "minItems": 1},
            "b": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "null"}], "description": "either"}},
            "required": ["a"]}}}


def test_a_conversation_with_thoughts_calls_and_results_translates_whole(gw: RunningGateway,
                                                                         upstream: MockUpstream) -> None:
    upstream.replies[GPT] = Reply(body=completion({"content": "done"}))
    body = {"contents": [
        {"role": "user", "parts": [{"text": "Weather in Paris and Rome?"}]},
        {"role": "model", "parts": [{"text": "thinking", "thought": True}, {"text": "Checking."},
                                    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                                     "thoughtSignature": SIG},
                                    {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"t": 21}}},
                                   {"functionResponse": {"name": "get_weather", "response": {"t": 25}}},
                                   {"text": "Thanks"}]}]}
    r = post(gw, "/v1beta/models/o:generateContent", body)
    assert r.status_code == 200, r.text
    msgs = upstream.received[-1].json["messages"]
    ids = [tc["id"] for tc in msgs[1]["tool_calls"]]
    assert len(set(ids)) == 2
    assert msgs == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": ids[0], "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": ids[1], "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": ids[0], "content": '{"t":21}'},
        {"role": "tool", "tool_call_id": ids[1], "content": '{"t":25}'},
        {"role": "user", "content": "Thanks"}]


@pytest.mark.parametrize("route", ["o", "g"])
def test_a_stream_without_alt_sse_is_a_json_array(gw: RunningGateway, upstream: MockUpstream, gem: GeminiMock,
                                                  vx: GeminiMock, claude: AnthropicMock, route: str) -> None:
    answer_hello(upstream, gem, vx, claude)
    r = post(gw, f"/v1beta/models/{route}:streamGenerateContent", HI)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    items = json.loads(r.content)
    assert isinstance(items, list) and len(items) >= 2
    for item in items:
        types.GenerateContentResponse.model_validate(item)
    assert "".join(p.get("text", "") for i in items for c in i.get("candidates", [])
                   for p in c.get("content", {}).get("parts", [])) == "Hello there"
    assert items[-1]["candidates"][0]["finishReason"] == "STOP"
    if route == "g":
        assert gem.calls[-1].received.path.endswith(":streamGenerateContent?alt=sse")  # upstream: SSE always


def test_a_broken_json_array_stream_ends_with_the_error_object(gw: RunningGateway, upstream: MockUpstream) -> None:
    upstream.replies[GPT] = openai_stream("Hel", "lo", reset_after=2)
    r = post(gw, "/v1beta/models/o:streamGenerateContent", {"contents": [{"parts": [{"text": "hi"}]}]})
    items = json.loads(r.content)  # still one whole JSON array
    assert items[-1]["error"]["code"] == 502 and "finishReason" not in r.text


def test_keep_alives_never_reach_a_gemini_client(upstream: MockUpstream, other: MockUpstream, gem: GeminiMock,
                                                 vx: GeminiMock, claude: AnthropicMock) -> None:
    # Google's SDKs read only `data:` lines (the JS ones hang on anything else): the SSE comments the
    # gateway sends other doors while a step is slow must not reach this one.
    # The upstream answers after 0.3 s: six keep-alive intervals, in which other doors would get comments.
    upstream.replies[GPT] = Reply(sse=openai_stream("Hel", "lo").sse, delay=0.3)
    with run_gateway(config(upstream, other.url, stream_keepalive_interval=0.05)) as gw, \
            httpx.stream("POST", gw.url + "/v1beta/models/o:streamGenerateContent?alt=sse",
                         json={"contents": [{"parts": [{"text": "hi"}]}]},
                         headers={"x-goog-api-key": GATEWAY_KEY}, timeout=10) as r:
        assert r.status_code == 200
        raw = r.read()
    assert not raw.startswith(b":") and b"\n:" not in raw
    got = data_events(raw)  # asserts every event is a data line: no ": keep-alive", no ": x-gateway-..." comment
    assert "".join(p["text"] for ev in got for c in ev.get("candidates", [])
                   for p in c.get("content", {}).get("parts", [])) == "Hello"


def test_a_client_keys_prompt_and_cap_apply_to_native_and_translated_bodies(
        upstream: MockUpstream, other: MockUpstream, gem: GeminiMock, vx: GeminiMock, claude: AnthropicMock,
        tmp_path: Path) -> None:
    answer_hello(upstream, gem, vx, claude)
    key = _key(tmp_path, system_prompt="Key rules.", max_tokens=8)
    with keyed_gateway(config(upstream, other.url, store={"path": str(tmp_path / "gw.db")})) as gw:
        c = client(gw, key=key)
        cfg = types.GenerateContentConfig(system_instruction="Mine.", max_output_tokens=500)
        assert c.models.generate_content(model="g", contents="Hi there", config=cfg).text == "Hello there"
        sent = gem.calls[-1].body
        assert [p["text"] for p in sent["systemInstruction"]["parts"]] == ["Key rules.", "Mine."]
        assert sent["generationConfig"]["maxOutputTokens"] == 8
        assert c.models.generate_content(model="o", contents="Hi there", config=cfg).text == "Hello there"
        sent = upstream.received[-1].json
        assert sent["messages"][:2] == [{"role": "system", "content": "Key rules."},
                                        {"role": "system", "content": "Mine."}]
        assert sent["max_tokens"] == 8


# ---------------------------------------------------------------------------
# The translation tables (no sockets: what a chat completion becomes)
# ---------------------------------------------------------------------------

STEP = Step("up1", GPT, 30.0)


@pytest.mark.parametrize("msg, finish, usage_, thoughts, want_parts, want_finish, want_usage", [
    ({"content": "hi"}, "stop", OPENAI_USAGE, False, [{"text": "hi"}], "STOP",
     {"promptTokenCount": 12, "candidatesTokenCount": 4, "totalTokenCount": 16}),
    ({"content": "cut"}, "length", OPENAI_USAGE, False, [{"text": "cut"}], "MAX_TOKENS", None),
    ({"content": None}, "content_filter", OPENAI_USAGE, False, [], "SAFETY", None),
    ({"content": "4", "reasoning_content": "2+2"}, "stop",
     {**OPENAI_USAGE, "completion_tokens_details": {"reasoning_tokens": 3},
      "prompt_tokens_details": {"cached_tokens": 5}}, True,
     [{"text": "2+2", "thought": True}, {"text": "4"}], "STOP",
     {"promptTokenCount": 12, "candidatesTokenCount": 1, "totalTokenCount": 16, "thoughtsTokenCount": 3,
      "cachedContentTokenCount": 5}),
    ({"content": "4", "reasoning_content": "2+2"}, "stop", OPENAI_USAGE, False, [{"text": "4"}], "STOP", None),
    ({"content": None, "tool_calls": [{"id": "call_9", "type": "function",
                                       "function": {"name": "f", "arguments": "{\"a\":1}"}}]}, "tool_calls",
     OPENAI_USAGE, False, [{"functionCall": {"id": "call_9", "name": "f", "args": {"a": 1}}}], "STOP", None),
])
def test_a_chat_completion_as_a_gemini_answer(msg: dict[str, Any], finish: str, usage_: dict[str, Any],
                                              thoughts: bool, want_parts: list[Any], want_finish: str,
                                              want_usage: dict[str, Any] | None) -> None:
    door = GeminiDoor(None)
    body: dict[str, Any] = {"contents": [{"parts": [{"text": "q"}]}]}
    if thoughts:
        body["generationConfig"] = {"thinkingConfig": {"includeThoughts": True}}
    call_ = door.build_call("o", body, stream=False)
    done = completion(msg, finish, usage_)
    out = json.loads(door.render(call_, Completion(json.dumps(done).encode(), done["usage"]), STEP))
    types.GenerateContentResponse.model_validate(out)
    cand = out["candidates"][0]
    assert cand.get("content", {}).get("parts", []) == want_parts
    assert cand["finishReason"] == want_finish and out["modelVersion"] == GPT
    if want_usage is not None:
        assert out["usageMetadata"] == want_usage


# ---------------------------------------------------------------------------
# A key's rules on either spelling; refusals; native-only routes; tool-call fragments
# ---------------------------------------------------------------------------

C_HI = [{"role": "user", "parts": [{"text": "hi"}]}]
KEY_SYSTEM = {"parts": [{"text": "Key rules."}]}
SPELLINGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # case: (what the client sent besides contents, what the native upstream must get besides contents)
    "camel": ({"generationConfig": {"maxOutputTokens": 500}},
              {"generationConfig": {"maxOutputTokens": 8}, "systemInstruction": KEY_SYSTEM}),
    "snake": ({"generation_config": {"max_output_tokens": 500, "temperature": 0.5},
               "system_instruction": {"parts": [{"text": "Mine."}]}},
              {"generationConfig": {"maxOutputTokens": 8, "temperature": 0.5},
               "systemInstruction": {"parts": [{"text": "Key rules."}, {"text": "Mine."}]}}),
    "both-spellings": ({"generationConfig": {"maxOutputTokens": 500}, "generation_config": {"max_output_tokens": 500}},
                       {"generationConfig": {"maxOutputTokens": 8}, "systemInstruction": KEY_SYSTEM}),
    "camel-null-and-snake": ({"generationConfig": None, "generation_config": {"max_output_tokens": 500}},
                             {"generationConfig": {"maxOutputTokens": 8}, "systemInstruction": KEY_SYSTEM}),
    "inner-null-and-snake": ({"generationConfig": {"maxOutputTokens": None, "max_output_tokens": 500}},
                             {"generationConfig": {"maxOutputTokens": 8}, "systemInstruction": KEY_SYSTEM}),
    "system-null-and-snake": ({"systemInstruction": None, "system_instruction": {"parts": [{"text": "Mine."}]}},
                              {"generationConfig": {"maxOutputTokens": 8},
                               "systemInstruction": {"parts": [{"text": "Key rules."}, {"text": "Mine."}]}}),
    "below-the-cap": ({"generation_config": {"max_output_tokens": 5}},
                      {"generationConfig": {"maxOutputTokens": 5}, "systemInstruction": KEY_SYSTEM}),
}


@pytest.mark.parametrize("case", list(SPELLINGS))
def test_a_keys_prompt_and_cap_reach_a_native_step_whatever_the_spelling(
        upstream: MockUpstream, other: MockUpstream, gem: GeminiMock, vx: GeminiMock, claude: AnthropicMock,
        tmp_path: Path, case: str) -> None:
    """The REST API reads both spellings of a field: a key's cap and system prompt must hold for either, so the
    native body has the snake_case ones folded into camelCase before the key's rules apply (no spelling left
    for the upstream to read uncapped)."""
    sent_fields, want = SPELLINGS[case]
    answer_hello(upstream, gem, vx, claude)
    key = _key(tmp_path, system_prompt="Key rules.", max_tokens=8)
    with keyed_gateway(config(upstream, other.url, store={"path": str(tmp_path / "gw.db")})) as gw:
        r = post(gw, "/v1beta/models/g:generateContent", {"contents": C_HI, **sent_fields},
                 headers={"x-goog-api-key": key})
    assert r.status_code == 200, r.text
    assert gem.calls[-1].body == {"contents": C_HI, **want}


@pytest.mark.parametrize("finish, want_finish", [("stop", "STOP"), ("content_filter", "SAFETY")])
def test_a_refusal_is_a_text_part_whole_and_streamed(gw: RunningGateway, upstream: MockUpstream, finish: str,
                                                     want_finish: str) -> None:
    """A chat ``refusal`` (OpenAI's structured refusals) is the answer's text; the finishReason is what the chat
    answer's finish_reason says."""
    refusal = chunk(role=True, model=GPT)
    refusal["choices"][0]["delta"]["refusal"] = "I can't"
    more = chunk(model=GPT)
    more["choices"][0]["delta"]["refusal"] = " help."
    upstream.replies[GPT] = lambda rec: Reply(sse=[refusal, more, chunk(finish=finish, model=GPT),
                                                   chunk(choices=False, usage=OPENAI_USAGE, model=GPT)]) \
        if rec.json.get("stream") else Reply(body=completion({"content": None, "refusal": "I can't help."}, finish))
    c = client(gw)
    whole = c.models.generate_content(model="o", contents="hi")
    streamed = list(c.models.generate_content_stream(model="o", contents="hi"))
    assert whole.text == "I can't help."
    assert whole.candidates and whole.candidates[0].finish_reason == want_finish
    assert "".join(ch.text or "" for ch in streamed) == "I can't help."
    assert streamed[-1].candidates and streamed[-1].candidates[0].finish_reason == want_finish


NATIVE_ONLY = {
    # case: (a body Gemini takes, which the translation drops or cannot carry)
    "built-ins-and-settings": {"contents": C_HI, "tools": [{"googleSearch": {}}], "generationConfig": {"topK": 3},
                               "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]},
    "image-in-system-instruction": {"contents": C_HI, "systemInstruction": {
        "parts": [{"inlineData": {"mimeType": "image/png", "data": PNG}}]}},
    "numbers-as-strings": {"contents": C_HI, "generationConfig": {"temperature": "0.5", "maxOutputTokens": "64"}},
    "code-execution-only": {"contents": [{"role": "user", "parts": [
        {"executableCode": {"language": "PYTHON", "code": "print(1)"}}]}]},
}


@pytest.mark.parametrize("case", list(NATIVE_ONLY))
def test_a_route_of_native_steps_only_passes_the_body_on_without_warnings(upstream: MockUpstream,
                                                                           other: MockUpstream, case: str) -> None:
    """Warnings are about translated steps and the translation's refusals about what it cannot carry: on a route
    whose every step is native, neither applies; the upstream gets the body as sent and is the judge of it."""
    body = NATIVE_ONLY[case]
    path = f"/v1beta/models/{MODEL}:generateContent"
    upstream.replies[path] = Reply(body=response(text("hi"), meta=usage(3, 1), model=MODEL))
    with run_gateway(config(upstream, other.url)) as gw:
        r = post(gw, "/v1beta/models/g:generateContent", body)
    assert r.status_code == 200, r.text
    assert "x-gateway-warning" not in r.headers
    assert upstream.received[-1].path == path and upstream.received[-1].json == body


def test_a_route_with_a_translated_step_still_warns_and_reads_numbers_as_strings(
        gw: RunningGateway, upstream: MockUpstream, gem: GeminiMock) -> None:
    gem.on(MODEL, lambda c: Reply(body=response(text("hi"), meta=usage(3, 1), model=MODEL)))
    upstream.replies["gpt-broken"] = Reply(status=500, body={"error": {"message": "boom"}})
    upstream.replies[GPT] = Reply(body=completion({"content": "hi"}))
    r = post(gw, "/v1beta/models/fb:generateContent", NATIVE_ONLY["built-ins-and-settings"])
    assert r.status_code == 200, r.text
    assert "googleSearch" in r.headers["x-gateway-warning"] and "topK" in r.headers["x-gateway-warning"]
    # proto3 JSON takes numbers as strings: so does the translation
    r = post(gw, "/v1beta/models/o:generateContent", NATIVE_ONLY["numbers-as-strings"])
    assert r.status_code == 200, r.text
    sent = upstream.received[-1].json
    assert sent["temperature"] == 0.5 and sent["max_tokens"] == 64
    # a translated route still refuses what only the translation cannot carry, with Gemini's 400
    err = gemini_error(post(gw, "/v1beta/models/o:generateContent", NATIVE_ONLY["code-execution-only"]),
                       400, "INVALID_ARGUMENT")
    assert "contents" in err["message"]


def tool_fragment(index: Any, call_id: str | None = None, name: str | None = None,
                  arguments: str | None = None) -> dict[str, Any]:
    fragment: dict[str, Any] = {"index": index, "type": "function", "function": {}}
    if call_id is not None:
        fragment["id"] = call_id
    if name is not None:
        fragment["function"]["name"] = name
    if arguments is not None:
        fragment["function"]["arguments"] = arguments
    ev = chunk(model=GPT)
    ev["choices"][0]["delta"] = {"tool_calls": [fragment]}
    return ev


FRAGMENTS: dict[str, tuple[list[Any], list[tuple[str, str, dict[str, Any]]]]] = {
    # case: (the fragments, the calls that must come out: (id, name, args))
    "index-null": ([tool_fragment(None, "call_1", "f", "{}")], [("call_1", "f", {})]),
    "index-null-twice": ([tool_fragment(None, "call_1", "f", '{"a":1}'), tool_fragment(None, "call_2", "g", '{"b":2}')],
                         [("call_1", "f", {"a": 1}), ("call_2", "g", {"b": 2})]),
    "index-null-continued": ([tool_fragment(None, "call_1", "f", '{"a":'), tool_fragment(None, arguments="1}")],
                             [("call_1", "f", {"a": 1})]),
    "new-id-same-index": ([tool_fragment(0, "call_1", "f", '{"a":1}'), tool_fragment(0, "call_2", "g", '{"b":2}')],
                          [("call_1", "f", {"a": 1}), ("call_2", "g", {"b": 2})]),
    "new-id-then-rest": ([tool_fragment(0, "call_1", "f", '{"a":1}'), tool_fragment(0, "call_2", "g", '{"b":'),
                          tool_fragment(0, arguments="2}")],
                         [("call_1", "f", {"a": 1}), ("call_2", "g", {"b": 2})]),
    "name-repeated": ([tool_fragment(0, "call_1", "f", '{"a":'), tool_fragment(0, name="f", arguments="1}")],
                      [("call_1", "f", {"a": 1})]),
}


@pytest.mark.parametrize("case", list(FRAGMENTS))
def test_nonconformant_tool_call_fragments_stream_as_whole_calls(gw: RunningGateway, upstream: MockUpstream,
                                                                  case: str) -> None:
    """``index: null`` is the next free index (a fragment without id or name goes on with the last call); a
    fragment with another ``id`` on an index whose call has one is a new call; names are never joined."""
    fragments, want = FRAGMENTS[case]
    upstream.replies[GPT] = Reply(sse=[chunk("", role=True, model=GPT), *fragments, chunk(finish="tool_calls",
                                                                                          model=GPT)])
    chunks = list(client(gw).models.generate_content_stream(model="o", contents="hi"))
    assert [(fc.id, fc.name, fc.args) for ch in chunks for fc in ch.function_calls or []] == want
